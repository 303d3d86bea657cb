"""Package layout: every folder installs under the one top-level package `attnserve`.

The repository keeps `model/`, `export/`, `server/` and `bench/` at its root (the layout is part
of the design), and setuptools' `package_dir` maps them to `attnserve.model`, `attnserve.export`,
`attnserve.server` and `attnserve.bench`. Folders that are absent are skipped: the serving image
builds from a context holding only `attnserve/` and `server/` (deploy/docker/*.dockerignore).
Everything else (metadata, dependencies, scripts) is in pyproject.toml.
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
# package -> the folder that holds it
FOLDERS = {
    "attnserve": "attnserve",
    "attnserve.model": "model",
    "attnserve.export": "export",
    "attnserve.server": "server",
    "attnserve.bench": "bench",
}

package_dir = {package: folder for package, folder in FOLDERS.items() if (ROOT / folder / "__init__.py").is_file()}
# Subpackages inside a mapped folder (attnserve/v1 for the generated stubs) follow their parent.
packages = [f"{package}.{sub}" if sub else package
            for package, folder in package_dir.items()
            for sub in ["", *find_packages(str(ROOT / folder))]]

setup(package_dir=package_dir, packages=packages)  # package data: [tool.setuptools.package-data] in pyproject.toml
