"""Maps the repository's top-level folders to import names under `meddistill`.

`operator/` would shadow the standard library's `operator` module if imported by its folder name,
so every folder is imported as `meddistill.<folder>` instead. Everything else is in pyproject.toml.
"""
from setuptools import find_packages, setup

ROOTS = {
    "meddistill": "meddistill",  # the shared core: spec, data, prompts, evaluation, CLI
    "meddistill.operator": "operator",  # the kopf controller
    "meddistill.jobs": "jobs",  # one recipe per pipeline stage
    "meddistill.serve": "serve",  # the Ray Serve app
}

packages, package_dir = [], {}
for name, folder in ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir)
