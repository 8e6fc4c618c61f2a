"""Settings files (``--config FILE``) and the one place each default lives: the settings
dataclasses (:class:`rela_pipeline.stages.embed.EmbedConfig`,
:class:`rela_pipeline.stages.train.TrainConfig`).

A run's settings come from three layers, later ones winning:

1. the dataclass's field defaults (the command line's ``--help`` shows them from there);
2. a settings file: YAML (``.yaml``/``.yml``) or JSON, a mapping of field names to values; a
   training run's own ``RUN/config.json`` and a shard set's ``manifest.json`` (its
   ``settings``) are valid files, so one file reruns a run;
3. the flags given on the command line.

A file is checked before anything runs: a key that is no setting, or a value of the wrong type,
is one error line naming the key. Keys a run records about itself (``resolved``) are ignored, and
so are the actions of one invocation (``resume``, ``overwrite``, ``progress``): a file never
resumes or replaces a run by itself.

This module imports no torch, so the command line starts fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import RelaError

#: Keys a run writes about itself into its settings file; read back, they are ignored.
RECORDED_KEYS = frozenset({"resolved"})
#: Settings that belong to one invocation, taken from the command line only.
COMMAND_LINE_ONLY = frozenset({"resume", "overwrite", "progress"})
#: Suffixes read as YAML; every other file is read as JSON.
YAML_SUFFIXES = (".yaml", ".yml")

# Defaults the settings dataclasses share with modules that import torch or faiss (which
# re-export them), kept here so that reading the settings imports neither.

#: Seconds a collective waits for the other ranks before the job fails (the process group's timeout).
DEFAULT_TIMEOUT_S = 600.0
#: Seconds the other ranks wait while rank 0 runs a phase alone (:meth:`rela_pipeline.distributed.Distribution.on_main`).
DEFAULT_WAIT_TIMEOUT_S = 4 * 3600.0
#: Default neighbourhood size for the ``knn_density`` score (:mod:`rela_pipeline.scores`).
DEFAULT_K = 10
#: Default number of leading transported components used for scoring.
DEFAULT_SCORE_DIMS = 64


def default_num_workers() -> int:
    """DataLoader workers when none are given, in every stage (``embed``, ``train``, ``eval``):
    ``min(8, CPUs - 1)``, at least 1, so one core stays with the main process that drives the
    model."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def default_shard_writers() -> int:
    """Shard-writing processes of a one-process ``embed`` when none are given: ``min(8, CPUs)``,
    at least 1 (the other phases are finished by then, so every core can write)."""
    return max(1, min(8, os.cpu_count() or 1))


def setting_defaults(settings_class: type) -> dict[str, Any]:
    """Every field's default of a settings dataclass (``default_factory`` called), by name;
    fields without a default are left out."""
    defaults = {}
    for item in dataclasses.fields(settings_class):
        if item.default is not dataclasses.MISSING:
            defaults[item.name] = item.default
        elif item.default_factory is not dataclasses.MISSING:
            defaults[item.name] = item.default_factory()
    return defaults


def read_settings_file(path: str | Path, settings_class: type) -> dict[str, Any]:
    """The settings in a YAML or JSON file, checked against ``settings_class``'s fields and
    converted to their types (paths to :class:`~pathlib.Path`).

    A shard set's ``manifest.json`` contributes its ``settings``; :data:`RECORDED_KEYS` and
    :data:`COMMAND_LINE_ONLY` keys are dropped.

    Raises:
        RelaError: one line: the file is missing or unparsable, is not a mapping, has a key
            that is no setting (with close matches), or a value of the wrong type (naming the
            key and the type it needs).
    """
    path = Path(path)
    if not path.is_file():
        raise RelaError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in YAML_SUFFIXES:
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as error:  # yaml.YAMLError, json.JSONDecodeError: one line either way
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RelaError(f"--config {path} is not valid {'YAML' if path.suffix.lower() in YAML_SUFFIXES else 'JSON'}: {first}") from None
    if isinstance(values, Mapping) and str(values.get("schema", "")).startswith("rela-pipeline/") and isinstance(values.get("settings"), Mapping):
        values = values["settings"]  # a shard set's manifest: the settings it was made with
    if not isinstance(values, Mapping):
        raise RelaError(f"--config {path} must hold a mapping of setting names to values, not {type(values).__name__}")
    return check_settings(values, settings_class, f"--config {path}")


def check_settings(values: Mapping[str, Any], settings_class: type, where: str) -> dict[str, Any]:
    """``values`` checked against the fields of ``settings_class`` and converted to their types.

    Raises:
        RelaError: naming the first key that is no field or whose value has the wrong type.
    """
    hints = typing.get_type_hints(settings_class)
    names = [item.name for item in dataclasses.fields(settings_class)]
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key in RECORDED_KEYS or key in COMMAND_LINE_ONLY:
            continue
        if key not in hints or key not in names:
            close = difflib.get_close_matches(str(key), names, n=3)
            raise RelaError(f"{where}: unknown setting {key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        converted = _convert(value, hints[key])
        if converted is _WRONG:
            raise RelaError(f"{where}: setting {key!r} must be {_type_name(hints[key])}, got {value!r}")
        checked[key] = converted
    return checked


_WRONG = object()


def _convert(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (int, float, bool, str, Path, a union of them with None), or
    :data:`_WRONG`. An int is a float; a bool is not an int; a string is a Path."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            converted = _convert(value, option)
            if converted is not _WRONG:
                return converted
        return _WRONG
    if hint is type(None):
        return None if value is None else _WRONG
    if hint is bool:
        return value if isinstance(value, bool) else _WRONG
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _WRONG
    if hint is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _WRONG
    if hint is str:
        return value if isinstance(value, str) else _WRONG
    if hint is Path:
        return Path(value) if isinstance(value, (str, Path)) else _WRONG
    return value


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(hint))
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}.get(hint, str(hint))


def merge_settings(settings_class: type, file_values: Mapping[str, Any], given: Mapping[str, Any], required: Mapping[str, str]):
    """Build ``settings_class`` from its defaults, then ``file_values``, then ``given`` (the
    command line's explicit flags).

    Args:
        required: the fields without a default, each with the flag that sets it (for the error).

    Raises:
        RelaError: a required field is in neither layer.
    """
    values = {**file_values, **given}
    for name, flag in required.items():
        if values.get(name) is None:
            raise RelaError(f"missing {flag} (or {name!r} in --config)")
    return settings_class(**values)
