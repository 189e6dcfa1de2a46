"""A native crash in one test (llama.cpp's SIGILL on a processor it was not built for) fails that
test; the run goes on and its last line still counts what passed and failed (pyproject's addopts)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CRASHING = '''
import os, signal

def test_before():
    assert True

def test_dies_like_a_faulting_native_library():
    os.kill(os.getpid(), signal.SIGILL)

def test_after():
    assert True
'''


def test_a_test_that_kills_its_process_fails_and_the_run_goes_on(tmp_path):
    (tmp_path / "test_crash.py").write_text(CRASHING)
    res = subprocess.run([sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path),
                          "-p", "no:cacheprovider", "-o", "testpaths=", str(tmp_path / "test_crash.py")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert re.search(r"^=+ 1 failed, 2 passed", out, re.M), out  # the closing line counts all three
    assert "test_dies_like_a_faulting_native_library" in out and re.search(r"crashed|node down|SIGILL|signal", out), out
