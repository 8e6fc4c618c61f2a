"""The data side of stage two: verifying the shard set, the batches, and the views per phase.

Two augmentation paths feed the same loop with :class:`rela_pipeline.shards.batches.ShardBatch`
objects:

``device`` (default)  :class:`rela_pipeline.shards.batches.ShardBatches` hands over uint8 image
                      batches (memory or stream path) and the loop makes the views batched on the
                      training device (:mod:`rela_pipeline.batched_views`) with the recipe of the
                      current phase, so the switch from ReLA to the method's views is exact.
``pil``               the reference: :class:`rela_pipeline.shards.reader.TrainingStream` makes
                      per-sample PIL views (lightly's transforms) in the DataLoader workers; a
                      flag shared with the workers says which views to make, read once per
                      batch, so the few batches prefetched at the switch still carry ReLA views.
"""

from __future__ import annotations

import logging
import random
from typing import Callable, Iterator

import numpy as np
import torch

from ...distributed import Distribution
from ...errors import RelaError
from ...shards.batches import ShardBatch, ShardBatches, default_num_workers, view_seed
from ...shards.reader import PHASE_SSL, ShardSetSource, TrainingStream, new_phase_flag
from ...subsets import SubsetSampler
from .config import TrainConfig

logger = logging.getLogger("rela_pipeline")


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of everything random in ``epoch`` on the PIL path (a 32-bit int)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class PilShardBatches:
    """The PIL reference path: webdataset streaming with per-sample PIL views in the workers.

    Args:
        source, sampler: the shard set and its subset sampler.
        config: the run's settings (batch size, seed, shuffle buffer, skip_bad_shards).
        target_dim: K.
        rela_views, ssl_views: PIL image -> list of ``(3, S, S)`` float tensors.
        num_workers: DataLoader workers.
        device: where batches go.
        rela_active: tells, when an epoch starts, whether the ReLA phase is on.
    """

    def __init__(self, source: ShardSetSource, sampler: SubsetSampler, config: TrainConfig, target_dim: int,
                 rela_views: Callable, ssl_views: Callable, num_workers: int, device: torch.device, rela_active: Callable[[], bool]) -> None:
        self.source, self.sampler, self.config, self.rela_active = source, sampler, config, rela_active
        self.target_dim, self.num_workers, self.device = target_dim, num_workers, device
        self.rela_views, self.ssl_views = rela_views, ssl_views
        self.data_path = "stream"
        self._phase = None

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per epoch: ``subset size // B``."""
        return self.sampler.size // self.config.batch_size

    def switch_to_ssl(self) -> None:
        """Make the workers' next batches with the method's views."""
        if self._phase is not None:
            self._phase.value = PHASE_SSL

    def epoch(self, epoch: int) -> Iterator[ShardBatch]:
        """The batches of ``epoch``; their views are ready (``ShardBatch.ready_views``).

        Every generator the views may use is seeded from ``(seed, epoch)`` (torch, numpy for
        lightly's solarisation, random; DataLoader workers are seeded by torch from the epoch's
        generator), so a resumed epoch replays exactly.
        """
        value = epoch_seed(self.config.seed, epoch)
        torch.manual_seed(value)
        np.random.seed(value)
        random.seed(value)
        self._phase = new_phase_flag(self.rela_active())
        stream = TrainingStream(
            self.source, self.sampler.mask(epoch), self.target_dim, self.rela_views, self.ssl_views, self._phase,
            self.config.batch_size, self.config.seed, epoch, self.config.shuffle_buffer, self.config.skip_bad_shards,
        )
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, generator=torch.Generator().manual_seed(value),
            pin_memory=self.device.type == "cuda", prefetch_factor=2 if self.num_workers > 0 else None,
        )
        for step, batch in enumerate(loader):
            if "error" in batch:
                raise RelaError(batch["error"])
            to = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
            yield ShardBatch(None, to(batch["target"]), to(batch["label"]), to(batch["index"]), epoch, step,
                             view_seed(self.config.seed, epoch, step), ready_views=[to(v) for v in batch["views"]])


def build_training_data(config: TrainConfig, source: ShardSetSource, target_dim: int, device: torch.device,
                        pil_views: tuple[Callable, Callable] | None = None, rela_active: Callable[[], bool] = lambda: True,
                        distribution: Distribution | None = None) -> ShardBatches | PilShardBatches:
    """The run's batches: :class:`ShardBatches` for ``--augment device``, :class:`PilShardBatches`
    for ``--augment pil`` (``pil_views`` = (ReLA views, method views), PIL transforms;
    ``rela_active`` tells it the phase when an epoch starts). Under torchrun (``distribution``)
    each rank's batches are its ``B / W`` rows of every global batch (device path only).

    Raises:
        RelaError: bad data settings, an empty subset, or a set that does not fit ``--data-path memory``.
    """
    workers = config.num_workers if config.num_workers is not None else default_num_workers()
    if config.augment == "device":
        return ShardBatches(
            source, batch_size=config.batch_size, image_size=config.image_size, target_dim=target_dim,
            data_ratio=config.data_ratio, subset=config.subset, dedup_threshold=config.dedup_threshold, seed=config.seed,
            device=device, data_path=config.data_path, cache_bytes=config.cache_bytes, num_workers=workers,
            shuffle_buffer=config.shuffle_buffer, skip_bad_shards=config.skip_bad_shards,
            progress=config.progress and (distribution is None or distribution.is_main),
            rank=distribution.rank if distribution else 0, world_size=distribution.world_size if distribution else 1,
        )
    scores = source.load_scores() if config.subset != "random" else None
    sampler = SubsetSampler(source.num_samples, config.data_ratio, config.subset, scores, seed=config.seed,
                            dedup_threshold=config.dedup_threshold, min_size=config.batch_size)
    if pil_views is None:
        raise RelaError("--augment pil needs PIL view transforms")
    return PilShardBatches(source, sampler, config, target_dim, pil_views[0], pil_views[1], workers, device, rela_active)

