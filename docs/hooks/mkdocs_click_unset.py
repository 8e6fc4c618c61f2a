"""mkdocs hook for the CLI reference page (mkdocs-click's option tables).

Two fixes to the table rows mkdocs-click (0.9) writes, neither of which changes the CLI:

* Since click 8.3 an option without a default holds the sentinel ``click._utils.UNSET``, which
  mkdocs-click prints verbatim (``Sentinel.UNSET``) in the Default column. Such an option now reads
  as in ``--help``: ``_required`` for a required option, ``False`` for an on/off flag, ``None``
  otherwise.
* A help text is put into a Markdown table cell as it is, so ``|`` split the cell and ``<arch>`` or
  ``*.jpg`` were read as HTML and emphasis. They are escaped.

With a click or mkdocs-click that has no ``_format_table_option_row``, it does nothing.
"""

from __future__ import annotations

import copy
from typing import Any

_ESCAPES = {"|": "&#124;", "<": "&lt;", ">": "&gt;", "*": "&#42;"}


def escape_cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell, shown as written."""
    return "".join(_ESCAPES.get(char, char) for char in text)


def on_config(config: Any, **kwargs: Any) -> Any:
    """Wrap ``mkdocs_click._docs._format_table_option_row`` once, before any page is rendered."""
    try:
        from mkdocs_click import _docs
    except ImportError:
        return config
    try:
        from click._utils import UNSET
    except ImportError:  # click < 8.3: no sentinel
        UNSET = object()
    original = getattr(_docs, "_format_table_option_row", None)
    if original is None or getattr(original, "rela_pipeline_fix", False):
        return config

    def format_row(option: Any) -> str:
        shown = copy.copy(option)
        if option.help is not None:
            shown.help = escape_cell(option.help)
        if option.default is UNSET:
            shown.default = False if getattr(option, "is_bool_flag", False) and not option.required else None
        return original(shown)

    format_row.rela_pipeline_fix = True  # type: ignore[attr-defined]
    _docs._format_table_option_row = format_row
    return config
