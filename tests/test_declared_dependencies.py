"""Every module the project or its tests import comes from a dependency pyproject.toml declares.

A package that is only installed on this machine by hand, or only arrives as some other package's
dependency (cloudpickle came with an old tool, not with anything we declare), makes a run green here
and red on a new machine. So: each top-level import under the project's folders must be the standard
library, the project itself, a module beside the importing file (bench scripts), or provided by a
distribution named in [project] dependencies, an extra, or [build-system] requires.
"""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("meddistill", "operator", "jobs", "serve", "tests", "bench", "tools")
OWN = {"meddistill", "tests"}


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)).lower()


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = list(project["project"]["dependencies"]) + list(project["build-system"]["requires"])
    for extra in project["project"].get("optional-dependencies", {}).values():
        reqs += [r for r in extra if not r.startswith("meddistill")]
    return {_name(r) for r in reqs}


def imports() -> dict[str, set[str]]:
    """{top-level module: files importing it} for absolute imports under the project's folders."""
    found: dict[str, set[str]] = {}
    files = [REPO / "setup.py"] + [f for d in FOLDERS for f in (REPO / d).rglob("*.py")]
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in OWN or (f.parent / f"{top}.py").is_file():
                    continue
                found.setdefault(top, set()).add(str(f.relative_to(REPO)))
    return found


def undeclared(found: dict[str, set[str]], wanted: set[str], providers: dict[str, list[str]]) -> list[str]:
    problems = []
    for module, files in sorted(found.items()):
        dists = {_name(d) for d in providers.get(module, [])}
        where = ", ".join(sorted(files)[:3])
        if not dists:
            problems.append(f"{module} (imported by {where}) is not installed: declare the distribution that provides it")
        elif not dists & wanted:
            problems.append(f"{module} (imported by {where}) comes from {sorted(dists)}, which pyproject.toml does not "
                            "declare: add it to dependencies (or the dev extra for tests)")
    return problems


def test_every_imported_module_comes_from_a_declared_distribution():
    problems = undeclared(imports(), declared(), packages_distributions())
    assert not problems, "\n".join(problems)


def test_the_check_refuses_an_import_only_a_transitive_or_missing_package_provides():
    found = imports()
    assert {"torch", "ray", "kopf", "pytest", "llama_cpp"} <= set(found)  # it reads every folder
    wanted = declared()
    # cloudpickle was installed on CI's machine but declared by nothing: the check names it.
    problems = undeclared({"cloudpickle": {"tests/x.py"}}, wanted, {"cloudpickle": ["cloudpickle"]})
    assert len(problems) == 1 and "cloudpickle" in problems[0] and "does not declare" in problems[0]
    assert "not installed" in undeclared({"nowhere_pkg": {"tests/x.py"}}, wanted, {})[0]
    assert not undeclared({"yaml": {"x.py"}}, wanted, {"yaml": ["PyYAML"]})  # names normalised
