"""What `pip install .` (not -e) ships: every folder with Python code is a package setup.py finds.

A folder without __init__.py imports fine from a checkout (a namespace package) and is silently left
out of the wheel: the image's operator then died with "No module named 'meddistill.spec'".
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOTS = ("meddistill", "operator", "jobs", "serve")


def test_every_folder_with_python_code_is_a_package():
    missing = sorted(
        str(d.relative_to(ROOT)) for top in ROOTS for d in [ROOT / top, *(ROOT / top).rglob("*")]
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py")) and not (d / "__init__.py").exists()
    )
    assert missing == [], f"add an __init__.py to {missing}: setup.py's find_packages leaves them out of the wheel"
