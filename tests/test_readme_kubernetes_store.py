"""The README's `kubectl apply` of the quickstart names a store every KubeRay pod reaches.

examples/quickstart.yaml keeps `./runs` for `meddistill run`; the README (and the chart's README)
rewrite it with sed on the way to kubectl. This fails when the example's line changes and the
sed silently stops matching, leaving a job the operator refuses (ArtifactStoreNotShared)."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from meddistill.operator.planner import artifact_store_refusal
from meddistill.spec.models import MedDistillJob
from tests.support.kube_cluster import REPO_ROOT


def _applied_quickstarts(readme: str) -> list[tuple[str, str]]:
    """(sed pattern, replacement) of each `sed 's|A|B|' examples/quickstart.yaml | kubectl apply` line."""
    lines = [ln for ln in readme.splitlines() if "examples/quickstart.yaml" in ln and "kubectl apply" in ln]
    assert lines, "no kubectl apply of examples/quickstart.yaml"
    out = []
    for ln in lines:
        assert ln.startswith("sed "), f"applies the local quickstart as is (artifacts.uri ./runs): {ln}"
        _, old, new, _ = shlex.split(ln)[1].split("|")
        out.append((old, new))
    return out


@pytest.mark.parametrize("readme", ["README.md", "charts/meddistill-operator/README.md"])
def test_the_quickstart_applied_on_kubernetes_has_a_shared_store(readme):
    example = (REPO_ROOT / "examples" / "quickstart.yaml").read_text()
    for old, new in _applied_quickstarts((REPO_ROOT / readme).read_text()):
        assert re.search(re.escape(old), example), f"{readme}'s sed pattern {old!r} no longer matches the example"
        job = MedDistillJob.model_validate(yaml.safe_load(example.replace(old, new)))
        assert artifact_store_refusal(job.spec.artifacts.uri, "per-pod") == ""
        assert artifact_store_refusal(yaml.safe_load(example)["spec"]["artifacts"]["uri"], "per-pod")  # why the sed
