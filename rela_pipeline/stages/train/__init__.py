"""Stage two: train a self-supervised student on a shard set with the ReLA alignment loss.

The loop is :func:`run_train` in :mod:`.loop`; its parts are :mod:`.config`, :mod:`.data`,
:mod:`.step`, :mod:`.checkpoints` and :mod:`.metrics`. A run directory's layout is documented in
:mod:`.checkpoints`.
"""

from ...shards.batches import default_num_workers
from ...shards.reader import verified
from .checkpoints import BACKBONE_NAME, CONFIG_NAME, LAST_CHECKPOINT, METRICS_NAME, SUMMARY_NAME
from .config import AUGMENT_PATHS, RESUMABLE_CHANGES, Budget, TrainConfig
from .loop import run_train

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
