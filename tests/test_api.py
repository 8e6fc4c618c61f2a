"""The package root exposes the public API lazily."""

from __future__ import annotations

import subprocess
import sys

import rela_pipeline


def test_every_public_name_resolves_to_its_module_object():
    for name, module in rela_pipeline._API.items():
        obj = getattr(rela_pipeline, name)
        assert obj.__module__ == module, name


def test_importing_the_package_does_not_import_torch():
    code = "import sys, rela_pipeline, rela_pipeline.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_every_package_directory_is_a_regular_package():
    """setuptools' ``find_packages`` (setup.cfg) skips a directory without ``__init__.py``, so a
    wheel would lack its modules: every directory of ``.py`` files in the package has one."""
    from pathlib import Path

    from setuptools import find_packages

    root = Path(__file__).resolve().parents[1]
    directories = {p.parent for p in (root / "rela_pipeline").rglob("*.py") if "__pycache__" not in p.parts}
    assert all((d / "__init__.py").is_file() for d in directories), sorted(str(d) for d in directories if not (d / "__init__.py").is_file())
    found = set(find_packages(str(root), include=["rela_pipeline", "rela_pipeline.*"]))
    assert {".".join(d.relative_to(root).parts) for d in directories} == found
