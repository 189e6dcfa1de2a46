"""The CLI front door: every command is registered and its --help teaches."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meddistill.cli import COMMANDS, build_parser

NAMES = [m.removesuffix("_cmd") for m, _ in COMMANDS]


def test_every_command_is_registered():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_command_help_explains_itself(name):
    out = subprocess.run([sys.executable, "-m", "meddistill.cli", name, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"usage: meddistill {name}" in out.stdout and len(out.stdout) > 200


def test_top_level_help_shows_the_quickstart():
    out = subprocess.run([sys.executable, "-m", "meddistill.cli", "--help"], capture_output=True, text=True)
    assert "meddistill run examples/quickstart.yaml" in out.stdout
    assert "95% CI" in out.stdout


@pytest.mark.parametrize("given, expected", [(None, "10000"), ("250", "250")])
def test_the_cli_sets_a_short_openmp_spin_before_torch_loads_unless_the_user_set_one(given, expected):
    import os

    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    code = ("import os, sys; import meddistill.cli; assert 'torch' not in sys.modules; "
            "print(os.environ['GOMP_SPINCOUNT'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
