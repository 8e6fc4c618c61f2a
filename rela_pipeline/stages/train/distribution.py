"""Stage two across processes (``torchrun``): what changes when the loop runs on W ranks.

* **Data.** ``--batch-size`` is the global batch B; each rank gets ``B / W`` rows of every batch
  (:class:`rela_pipeline.shards.batches.ShardBatches` with ``rank`` and ``world_size``), so the
  steps, the images seen and the budget are those of one process for any W.
* **Model.** The ReLA-wrapped method and the online probe are each wrapped in
  :class:`torch.nn.parallel.DistributedDataParallel` (gradients averaged over the ranks, which with
  per-rank mean losses is the gradient of the global batch's mean loss).
  ``find_unused_parameters=True`` because the ReLA phase trains the transfer layer and not the
  heads, and the SSL phase the heads and not the transfer layer. Teachers are not parameters the
  optimiser sees; they follow identical students with the same EMA, so they stay identical.
  ``--sync-batchnorm`` converts BatchNorm layers to :class:`torch.nn.SyncBatchNorm` (CUDA only in
  PyTorch), so batch statistics are the global batch's.
* **Cross-rank terms.** SimCLR gathers the negatives of every rank (lightly's
  ``NTXentLoss(gather_distributed=True)``); DINO's centre is all-reduced by lightly's ``DINOLoss``
  whenever a process group exists; Barlow Twins' loss runs on the embeddings gathered from every
  rank, VICReg's variance and covariance terms and SwaV's Sinkhorn codes span every rank, and
  MoCo's memory bank enqueues every rank's keys (:mod:`rela_pipeline.methods`).
* **Schedule.** The adaptive ReLA schedule reads the ReLA loss averaged over the ranks, so every
  rank switches on the same step; :func:`agreed` checks that at the end.
* **Files.** Rank 0 alone writes the run directory (config, metrics averaged over the ranks,
  checkpoints, backbone, summary); every rank reads the same checkpoint on ``--resume``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ...distributed import Distribution
from ...errors import RelaError
from ...shards.plan import local_batch_size
from .config import TrainConfig

logger = logging.getLogger("rela_pipeline")


def check_distributed_settings(config: TrainConfig, distribution: Distribution, device: torch.device) -> None:
    """Refuse settings that cannot run on several ranks.

    Raises:
        RelaError: ``--augment pil`` (the one-process reference path), ``--sync-batchnorm`` on
            CPU ranks, or a global batch that does not split evenly over the ranks.
    """
    if not distribution.enabled:
        return
    if config.augment == "pil":
        raise RelaError("--augment pil is the one-process reference path; under torchrun use --augment device")
    if config.sync_batchnorm and device.type != "cuda":
        raise RelaError("--sync-batchnorm needs CUDA ranks (PyTorch's SyncBatchNorm runs on GPUs only)")
    local_batch_size(config.batch_size, distribution.world_size)


def parallel_modules(rela: nn.Module, probe: nn.Module | None, distribution: Distribution | None, sync_batchnorm: bool) -> tuple[nn.Module, nn.Module | None]:
    """The modules the step calls forward on: ``rela`` and ``probe`` themselves in one process,
    else each wrapped in ``DistributedDataParallel`` (module docstring). Call after the modules are
    on their device and in their memory format, and before the optimiser is built.

    Returns:
        ``(forward module of the student, forward module of the probe or None)``.
    """
    if sync_batchnorm:
        nn.SyncBatchNorm.convert_sync_batchnorm(rela)  # replaces the BatchNorm children in place
    if distribution is None or not distribution.enabled:
        return rela, probe
    from torch.nn.parallel import DistributedDataParallel

    device = next(rela.parameters()).device
    ids = [device] if device.type == "cuda" else None
    wrapped = DistributedDataParallel(rela, device_ids=ids, find_unused_parameters=True)
    wrapped_probe = DistributedDataParallel(probe, device_ids=ids) if probe is not None else None
    return wrapped, wrapped_probe


def agreed(distribution: Distribution, value: Any, what: str) -> list[Any]:
    """Every rank's ``value`` (rank order); they must all be equal.

    Raises:
        RelaError: the ranks disagree (naming ``what`` and the values).
    """
    values = distribution.gather(value)
    if any(v != values[0] for v in values):
        raise RelaError(f"the ranks disagree on {what}: {values}")
    return values
