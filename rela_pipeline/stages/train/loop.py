"""The stage-two loop, top to bottom: build the student, the data and the step, then train.

``run_train`` builds a student backbone, wraps an SSL method (built-in or the caller's) in
:class:`rela_pipeline.rela.ReLA`, and trains it on a fresh dynamic subset every epoch. Its parts:

* :mod:`.config`       settings (:class:`TrainConfig`) and the budget;
* :mod:`.data`         the batches (memory or stream path) and the views of each phase;
* :mod:`.step`         one optimisation step: precision, memory format, optimiser, probe;
* :mod:`.distribution` what changes under torchrun (DDP, the ranks' shares, rank 0 writes);
* :mod:`.checkpoints`  the run directory, checkpoints and resuming;
* :mod:`.metrics`      ``metrics.jsonl``.

Budget (the paper's, as in the authors' code): the fraction of the full run's optimisation steps, the full run being
the same epochs over all N samples with the same batch size.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...distributed import Distribution, collective_failures, init_distribution, quiet_unless_main
from ...errors import RelaError
from ...fileio import write_json_atomic
from ...methods import build_method
from ...models import backbone_config as make_backbone_config
from ...models import build_backbone, save_backbone_checkpoint
from ...rela import ReLA, parse_schedule
from ...runtime import resolve_precision
from ...shards.reader import ShardSetSource, open_shard_set, verified
from .checkpoints import (
    BACKBONE_NAME,
    CONFIG_NAME,
    LAST_CHECKPOINT,
    METRICS_NAME,
    SUMMARY_NAME,
    Progress,
    eval_preprocessing,
    prepare_run_dir,
    restore_checkpoint,
    save_checkpoint,
)
from .config import Budget, TrainConfig
from .data import build_training_data, view_transforms
from .distribution import agreed, check_distributed_settings
from .loggers import open_sinks
from .metrics import Interval, MetricsLog, finite_or_none
from .step import TrainStep

logger = logging.getLogger("rela_pipeline")


def run_train(
    config: TrainConfig,
    *,
    method_factory: Callable[[nn.Module], nn.Module] | None = None,
    ssl_views: Callable | None = None,
) -> dict[str, Any]:
    """Train a student on a shard set and return the run summary (also ``RUN/summary.json``).

    Args:
        config: the run's settings.
        method_factory: for a custom SSL method, ``backbone -> method`` where the method is an
            ``nn.Module`` with ``backbone`` and ``forward(views) -> loss`` (optionally
            ``update_momentum(step, total_steps)``); see :mod:`rela_pipeline.rela`. Default: the
            built-in ``config.method``.
        ssl_views: the custom method's views: with ``augment="device"`` a batched transform
            ``(uint8 (B, 3, S, S), torch.Generator) -> list of float (B, 3, s, s)`` (e.g.
            :func:`rela_pipeline.batched_views.batched_method_views`); with ``augment="pil"`` a PIL
            transform (RGB image -> list of ``(3, S, S)`` tensors). Default: the built-in method's.

    Returns:
        The summary dict: budget (steps, images_seen, full_run_steps, fraction), wall-clock
        seconds (the memory path's decoding pass included), data loading seconds (that pass), ReLA switch step, the ReLA loss of the first and last
        logged intervals of this invocation, the last interval's metrics, what "auto" resolved to,
        and output paths.

    Under torchrun (``torchrun --nproc-per-node N ...``, :mod:`.distribution`) every rank calls
    it with the same config; rank 0 verifies the set, prepares the run directory (which must be on
    a filesystem every rank sees) and writes every file; every rank returns the summary.

    Raises:
        RelaError: bad settings, a shard set that fails its checks, bad shards or samples met
            while reading (unless ``skip_bad_shards``), an empty subset, a set that does not fit
            ``data_path="memory"``, views of the wrong shape, a resume whose settings differ, or
            (under torchrun) settings that cannot run on several ranks or a process group that
            does not form. Before the first checkpoint the run directory is removed; after it
            the checkpoint stays so ``--resume`` can continue.
    """
    custom = method_factory is not None
    config.validate(custom_method=custom)
    if custom and ssl_views is None:
        raise RelaError("a custom method needs its view transform (ssl_views=)")
    distribution, device = init_distribution(config.device, config.dist_timeout_s, config.dist_wait_timeout_s)
    try:
        with quiet_unless_main(distribution):
            check_distributed_settings(config, distribution, device)
            source = open_shard_set(config.shards, skip_bad_shards=config.skip_bad_shards)
            if config.verify:  # once, on rank 0; the other ranks leave out the shards it left out
                skipped = distribution.on_main(lambda: verified(source, config.skip_bad_shards).skipped_shards)
                if skipped != source.skipped_shards:
                    source = source.without([name for name in skipped if name not in source.skipped_shards])
            out = Path(config.out_dir)
            created = not out.exists()
            resuming = distribution.on_main(lambda: prepare_run_dir(config))
            try:
                with collective_failures(distribution):
                    return _train(config, source, device, distribution, resuming=resuming, method_factory=method_factory, ssl_views=ssl_views)
            except BaseException:
                if distribution.is_main and created and not (out / LAST_CHECKPOINT).is_file():
                    shutil.rmtree(out, ignore_errors=True)
                raise
    finally:
        distribution.close()


@dataclass
class Student:
    """The model side of a run: the backbone, the SSL method, the ReLA wrapper and the online probe.

    Attributes:
        backbone: the network being pretrained (``backbone.feature_dim`` = F).
        backbone_config: how to rebuild it (``{"name", "cifar_stem"}``, plus ``"image_size"`` for
            ``torchvision:``/``timm:`` students; :func:`rela_pipeline.models.backbone_config`),
            saved in checkpoints.
        rela: the :class:`ReLA` wrapper around the method, on the training device.
        probe: a linear classifier ``F -> classes`` on the device, or None (unlabelled set, or
            ``online_probe=False``).
        labelled: whether the shard set has real labels.
    """

    backbone: nn.Module
    backbone_config: dict[str, Any]
    rela: ReLA
    probe: nn.Module | None
    labelled: bool


def build_student(config: TrainConfig, source: ShardSetSource, device: torch.device, method_factory: Callable[[nn.Module], nn.Module] | None) -> Student:
    """Seed, then build the backbone, the method (built-in or ``method_factory``'s), the ReLA
    wrapper with ``K = min(F, target dim)`` and the online probe.

    Raises:
        RelaError: a custom method that does not keep the backbone it was given, or ``supervised``
            on an unlabelled set.
    """
    torch.manual_seed(config.seed)
    backbone_config = make_backbone_config(config.backbone, config.use_cifar_stem, config.image_size)
    backbone = build_backbone(**backbone_config)
    labelled = bool(source.manifest["dataset"].get("labelled")) and bool(source.class_names)
    classes = len(source.class_names) if labelled else None  # supervised training's; an unlabelled set refuses it
    method = method_factory(backbone) if method_factory is not None else build_method(config.method, backbone, config.teacher_momentum, classes)
    if getattr(method, "backbone", None) is not backbone:
        raise RelaError("the custom method must keep the backbone it was given as its .backbone")
    target_dim = min(backbone.feature_dim, source.target_dim)
    rela = ReLA(method, target_dim, parse_schedule(config.rela_schedule), transfer=config.transfer).to(device)
    probe = nn.Linear(backbone.feature_dim, len(source.class_names)).to(device) if labelled and config.online_probe else None
    return Student(backbone, backbone_config, rela, probe, labelled)


def _train(
    config: TrainConfig,
    source: ShardSetSource,
    device: torch.device,
    distribution: Distribution,
    *,
    resuming: bool,
    method_factory: Callable[[nn.Module], nn.Module] | None,
    ssl_views: Callable | None,
) -> dict[str, Any]:
    """The run once the directory is ready: the student, the data, the step, the epochs, the summary."""
    out = Path(config.out_dir)
    main = distribution.is_main
    student = build_student(config, source, device, method_factory)
    rela, probe, backbone, labelled = student.rela, student.probe, student.backbone, student.labelled
    target_dim = rela.target_dim

    # The data and the views of each phase.
    views = view_transforms(config, ssl_views)
    data = build_training_data(config, source, target_dim, device, distribution)
    steps_per_epoch = data.steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    budget = Budget(full_run_steps=config.epochs * (source.num_samples // config.batch_size))

    # The step, then where the run stands.
    precision = resolve_precision(config.precision, device)
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    step = TrainStep(
        rela,
        probe,
        config.lr,
        config.weight_decay,
        config.lr_schedule,
        total_steps,
        precision,
        warmup_steps,
        distribution=distribution,
        sync_batchnorm=config.sync_batchnorm,
    )
    progress = restore_checkpoint(out, config, rela, probe, step, budget) if resuming else Progress()
    if resuming:
        logger.info("resuming %s after epoch %d (step %d)", out, progress.next_epoch, budget.steps)
    resolved = {
        "device": str(device),
        "precision": precision.name,
        "data_path": data.data_path,
        "augment": config.augment,
        "memory_format": "channels_last" if step.memory_format is not None else "contiguous",
        "target_dim": target_dim,
        "world_size": distribution.world_size,
        "backend": distribution.backend,
    }
    if main:
        write_json_atomic(out / CONFIG_NAME, {**config.to_json(), "resolved": resolved})
    rela.schedule.start(budget.steps, total_steps)
    logger.info(
        "training %s + %s on %s (%s, %s views, %s data path): %s; %d steps per epoch x %d epochs = %d steps (%.1f%% of the full run's %d)",
        config.method,
        config.backbone,
        device,
        precision.name,
        config.augment,
        data.data_path,
        data.sampler.describe(),
        steps_per_epoch,
        config.epochs,
        total_steps,
        100.0 * total_steps / max(budget.full_run_steps, 1),
        budget.full_run_steps,
    )
    if source.skipped_shards:
        logger.warning(
            "training without %d skipped shards (%d of %d samples readable)", len(source.skipped_shards), source.readable_samples, source.num_samples
        )
    t_start = time.perf_counter()  # the run's wall-clock includes the memory path's decoding pass
    data.prepare()  # the memory path's decoding pass
    data_load_s = time.perf_counter() - t_start

    resume_step = budget.steps if resuming else None
    metrics = MetricsLog(out / METRICS_NAME if main else None, resume_step, sinks=open_sinks(config.logger, out, config.to_json(), resume_step) if main else ())
    method_name = config.method
    rela.train()
    interval = Interval(device)
    samples_trained = 0  # by this rank, in this invocation
    bar = tqdm(total=total_steps, initial=budget.steps, unit="step", desc="train", disable=not (config.progress and main), dynamic_ncols=True)
    try:
        for epoch in range(progress.next_epoch, config.epochs):
            epoch_steps = 0
            for batch in data.epoch(epoch):
                phase = rela.phase
                batch_views = batch.views(views[phase], f"{'ReLA' if phase == 'rela' else method_name} views", step.memory_format)
                result = step(batch_views, batch.target, batch.label, labelled)
                if distribution.enabled and result.output.rela_loss is not None:
                    result.output.rela_loss = distribution.mean(result.output.rela_loss)  # the schedule switches on the same step everywhere
                samples_trained += batch.target.shape[0]
                was_active = rela.schedule.active
                rela.step_end(result.output, budget.steps, total_steps)
                if was_active and not rela.schedule.active and rela.schedule.switch_step is not None:  # constant:1.0 ends without a switch
                    metrics.write(
                        {"event": "rela_switch", "step": rela.schedule.switch_step, "epoch": epoch, "rho": finite_or_none(getattr(rela.schedule, "rho", None))}
                    )
                    logger.info("ReLA phase ends at step %d: training continues with the %s loss", rela.schedule.switch_step, method_name)
                budget.steps += 1
                budget.images_seen += config.batch_size
                epoch_steps += 1
                interval.add(result, config.batch_size)
                bar.update(1)
                if budget.steps % config.log_every == 0:
                    record = interval.record(budget, epoch, getattr(rela.schedule, "rho", None), step.optimizer.param_groups[0]["lr"], distribution)
                    metrics.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", phase=record["phase"], img_s=f"{record['images_per_s']:.0f}")
            if epoch_steps == 0:
                raise RelaError(f"epoch {epoch} produced no batch of {config.batch_size}: the readable subset is too small")
            if epoch == config.epochs - 1 and interval.images:
                metrics.write(interval.record(budget, epoch, getattr(rela.schedule, "rho", None), step.optimizer.param_groups[0]["lr"], distribution))
            elapsed = progress.elapsed_s + time.perf_counter() - t_start
            metrics.write(
                {
                    "event": "epoch_end",
                    "epoch": epoch,
                    "step": budget.steps,
                    "epoch_steps": epoch_steps,
                    "images_seen": budget.images_seen,
                    "budget_fraction": budget.fraction,
                    "elapsed_s": round(elapsed, 2),
                }
            )
            if main:
                save_checkpoint(out, config, student.backbone_config, rela, probe, step, epoch, budget, elapsed)
    finally:
        bar.close()
        step.close()
        metrics.close()
    wall = progress.elapsed_s + time.perf_counter() - t_start
    # The schedule's state (switch step, and the adaptive schedule's loss averages and rho) must be
    # bit-identical on every rank: it is fed the ReLA loss averaged over the ranks.
    schedule_states = agreed(distribution, rela.schedule.state_dict(), "the ReLA schedule's state")
    steps_per_rank = agreed(distribution, budget.steps, "the steps trained")
    samples_per_rank = distribution.gather(samples_trained)
    if main:
        save_backbone_checkpoint(
            out / BACKBONE_NAME,
            backbone,
            student.backbone_config,
            preprocessing=eval_preprocessing(config.image_size).to_dict(),
            step=budget.steps,
            config=config.to_json(),
        )
    summary = {
        "run_dir": str(out),
        "method": config.method,
        "backbone": student.backbone_config,
        "rela_schedule": config.rela_schedule,
        "rela_switch_step": rela.schedule.switch_step,
        "subset": data.sampler.describe(),
        "budget": {"steps": budget.steps, "images_seen": budget.images_seen, "full_run_steps": budget.full_run_steps, "fraction": round(budget.fraction, 6)},
        "wall_clock_s": round(wall, 2),
        "data_load_s": round(data_load_s, 2),
        "resolved": resolved,
        "final": interval.last_record,
        "rela_loss": {"first_interval": interval.first_rela_loss, "last_interval": interval.last_rela_loss},
        "checkpoint": str(out / BACKBONE_NAME),
        "shards": source.location,
        "skipped_shards": source.skipped_shards,
        "distributed": {
            "world_size": distribution.world_size,
            "backend": distribution.backend,
            "rela_schedule_per_rank": schedule_states,
            "steps_per_rank": steps_per_rank,
            "samples_per_rank_this_invocation": samples_per_rank,
        },
    }
    if main:
        write_json_atomic(out / SUMMARY_NAME, summary)
    distribution.barrier()  # every rank returns once the run's files are written
    return summary
