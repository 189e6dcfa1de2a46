"""The chart ships exactly the CRD `meddistill crd` generates from the typed spec."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CRD_FILE = Path(__file__).resolve().parents[1] / "charts" / "meddistill-operator" / "crds" / "meddistilljobs.yaml"


def test_chart_crd_is_generated_output():
    out = subprocess.run([sys.executable, "-m", "meddistill.cli", "crd"], capture_output=True, text=True, check=True,
                         cwd=CRD_FILE.parents[3]).stdout
    assert out == CRD_FILE.read_text(), (
        "charts/meddistill-operator/crds/meddistilljobs.yaml is stale; regenerate it with: "
        "meddistill crd -o charts/meddistill-operator/crds/meddistilljobs.yaml")
