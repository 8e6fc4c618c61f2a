"""Griffe extension for the API pages: show the package's reST roles as Markdown code.

The docstrings are Google style but name other objects with Sphinx roles
(``:func:`run_embed```, ``:class:`~rela_pipeline.errors.RelaError```) and open literal blocks
with ``::``. Markdown would print those as they are; this rewrites, before the docstrings are
parsed, each role to inline code of its target (``~`` keeping the last name, as Sphinx does) and a
line-ending ``::`` to ``:`` (the indented block after it is already a Markdown code block).
The source files are not changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:attr|class|data|exc|func|meth|mod|obj|const):`(~?)([^`]+)`")
LITERAL_BLOCK = re.compile(r"(?<=\S)::$", re.M)


def rewrite(text: str) -> str:
    """``text`` with reST roles as inline code and ``::`` line endings as ``:``."""

    def role(match: re.Match[str]) -> str:
        target = match.group(2)
        return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"

    return LITERAL_BLOCK.sub(":", ROLE.sub(role, text))


class RstRoles(griffe.Extension):
    """Rewrite every docstring of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Walk the package after it (and any namespace subpackage added before) is loaded."""
        self._walk(pkg, set())

    def _walk(self, obj: griffe.Object, seen: set[int]) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, seen)
