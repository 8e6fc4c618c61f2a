"""The data side of stage two: the run's batches and the views of each phase.

Every run reads its batches from one :class:`rela_pipeline.shards.batches.ShardBatches`: one epoch
plan (:mod:`rela_pipeline.shards.plan`), one decoder, the memory or the stream path. The views
are made from each batch's uint8 images when the loop takes it, with the recipe of the phase the
schedule is in, so the switch from the ReLA views to the method's is exact on every path:

``device`` (default)  batched on the training device (:mod:`rela_pipeline.batched_views`);
``pil``               per image with PIL (lightly's transforms, or a custom method's own), through
                      :class:`rela_pipeline.views.PerImageViews`: the reference path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...distributed import Distribution
from ...shards.batches import ShardBatches, default_num_workers
from ...shards.reader import ShardSetSource
from ...views import PerImageViews, method_views, rela_views
from .config import TrainConfig


def view_transforms(config: TrainConfig, ssl_views: Callable | None) -> dict[str, Callable]:
    """The batched view transform of each phase, ``{"rela": ..., "ssl": ...}``, for the configured
    augment path (``ssl_views``: a custom method's, batched for ``device``, per image for ``pil``)."""
    size = config.image_size
    if config.augment == "pil":
        ssl = ssl_views if ssl_views is not None else method_views(config.method, size, config.crop_min_scale, config.local_views)
        return {"rela": PerImageViews(rela_views(size)), "ssl": ssl if isinstance(ssl, PerImageViews) else PerImageViews(ssl)}
    from ...batched_views import batched_method_views, batched_rela_views

    return {
        "rela": batched_rela_views(size),
        "ssl": ssl_views if ssl_views is not None else batched_method_views(config.method, size, config.crop_min_scale, config.local_views),
    }


def build_training_data(
    config: TrainConfig, source: ShardSetSource, target_dim: int, device: torch.device, distribution: Distribution | None = None
) -> ShardBatches:
    """The run's batches (:class:`ShardBatches` with the config's data settings). Under torchrun
    (``distribution``) each rank's batches are its ``B / W`` rows of every global batch.

    Raises:
        RelaError: bad data settings, an empty subset, or a set that does not fit ``--data-path memory``.
    """
    workers = config.num_workers if config.num_workers is not None else default_num_workers()
    return ShardBatches(
        source,
        batch_size=config.batch_size,
        image_size=config.image_size,
        target_dim=target_dim,
        data_ratio=config.data_ratio,
        subset=config.subset,
        dedup_threshold=config.dedup_threshold,
        seed=config.seed,
        device=device,
        data_path=config.data_path,
        cache_bytes=config.cache_bytes,
        num_workers=workers,
        shuffle_buffer=config.shuffle_buffer,
        skip_bad_shards=config.skip_bad_shards,
        progress=config.progress and (distribution is None or distribution.is_main),
        rank=distribution.rank if distribution else 0,
        world_size=distribution.world_size if distribution else 1,
    )
