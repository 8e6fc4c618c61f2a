"""Stage two: train a self-supervised student on a shard set with the ReLA alignment loss.

The loop is :func:`run_train` in :mod:`.loop`; its parts are :mod:`.config`, :mod:`.data`,
:mod:`.step`, :mod:`.checkpoints` and :mod:`.metrics`. A run directory's layout is documented in
:mod:`.checkpoints`.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Where each public name lives (imported on first use: reading :class:`TrainConfig` imports no torch).
_EXPORTS = {
    "TrainConfig": ".config",
    "Budget": ".config",
    "AUGMENT_PATHS": ".config",
    "RESUMABLE_CHANGES": ".config",
    "run_train": ".loop",
    "verified": "rela_pipeline.shards.reader",
    "default_num_workers": "rela_pipeline.settings",
    "CONFIG_NAME": ".checkpoints",
    "METRICS_NAME": ".checkpoints",
    "LAST_CHECKPOINT": ".checkpoints",
    "BACKBONE_NAME": ".checkpoints",
    "SUMMARY_NAME": ".checkpoints",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)


__all__ = [
    "TrainConfig",
    "Budget",
    "run_train",
    "verified",
    "default_num_workers",
    "AUGMENT_PATHS",
    "RESUMABLE_CHANGES",
    "CONFIG_NAME",
    "METRICS_NAME",
    "LAST_CHECKPOINT",
    "BACKBONE_NAME",
    "SUMMARY_NAME",
]
