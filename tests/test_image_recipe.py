"""The image has one recipe: the Dockerfile and the local build (tools/image/build.sh, used by the
one-node cluster tests) run the same tools/image/install.sh steps on the same files and start the
same way. These fail when the two drift."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from meddistill.operator.backends.kuberay_objects import POD_UID

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    """A script of tools/image as a module (they are not a package the project installs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "image" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dockerfile_config = _tool("dockerfile_config")


def _last_stage() -> list[str]:
    lines = dockerfile_config.logical_lines((ROOT / "Dockerfile").read_text())
    start = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    return lines[start + 1:]


def test_both_builds_run_install_sh_deps_then_app():
    runs = [line for line in _last_stage() if line.upper().startswith("RUN ")]
    steps = [m.group(1) for line in runs for m in re.finditer(r"tools/image/install\.sh (\w+)", line)]
    assert steps == ["deps", "app"], runs
    build = (ROOT / "tools/image/build.sh").read_text()
    assert re.search(r'run_layer "\$DEPS" .* deps', build) and re.search(r'run_layer "\$APP" .* app', build)


def test_both_builds_copy_the_same_sources():
    """What the Dockerfile COPYs into /src is what build.sh stages (top-level names)."""
    copied = set()
    for line in _last_stage():
        if line.upper().startswith("COPY ") and "--from=" not in line:
            copied |= {p.rstrip("/").split("/")[0] for p in shlex.split(line)[1:-1]}
    staged = re.search(r'cp -r ([^"]+?) "\$1"/\)', (ROOT / "tools/image/build.sh").read_text()).group(1).split()
    assert copied == set(staged), (sorted(copied), sorted(staged))


def test_run_config_is_read_from_the_dockerfile_and_fits_the_pods():
    out = subprocess.run([sys.executable, str(ROOT / "tools/image/dockerfile_config.py"), str(ROOT / "Dockerfile")],
                         capture_output=True, text=True, check=True).stdout
    config = __import__("json").loads(out)
    assert config["Entrypoint"] == ["meddistill"] and config["Cmd"] == ["operator"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PATH"].startswith("/opt/meddistill/bin:")  # install.sh's venv
    # The pods run as the image's user: kuberay_objects' POD_UID and the chart's runAsUser.
    assert config["User"] == f"{POD_UID}:{POD_UID}"
    chart = (ROOT / "charts/meddistill-operator/templates/deployment.yaml").read_text()
    assert f"runAsUser: {POD_UID}" in chart
    assert f"--uid {POD_UID}" in (ROOT / "tools/image/install.sh").read_text()
