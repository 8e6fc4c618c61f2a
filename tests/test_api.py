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
