"""Stage two: train a self-supervised student on a shard set with the ReLA alignment loss.

The loop is :func:`run_train` in :mod:`.loop`; its parts are :mod:`.config`, :mod:`.data`,
:mod:`.step`, :mod:`.checkpoints` and :mod:`.metrics`. A run directory's layout is documented in
:mod:`.checkpoints`.
"""

from __future__ import annotations

from ..._lazy import lazy_exports

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


__getattr__ = lazy_exports(__name__, _EXPORTS)


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
