"""Lazy public names for the package root and the stage packages (PEP 562), so that importing
them, reading the settings dataclasses and the CLI's ``--help`` load no torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports each name of ``exports`` (name ->
    module, absolute or relative to ``package``) from its module on first use.

    Raises (from the returned function):
        AttributeError: a name that is not exported.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    return __getattr__
