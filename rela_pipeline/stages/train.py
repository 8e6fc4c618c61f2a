"""Stage two: stream a shard set into a self-supervised learner with the ReLA alignment loss.

``run_train`` builds a student backbone, wraps an SSL method (built-in or the caller's) in
:class:`rela_pipeline.rela.ReLA`, and trains it on a fresh dynamic subset every epoch
(:class:`rela_pipeline.subsets.SubsetSampler`), streaming the shards with webdataset
(:mod:`rela_pipeline.shards.reader`).

Run directory::

    RUN/config.json            the run's settings (a resumed run must match them)
    RUN/metrics.jsonl          one JSON record per logging interval, per epoch and per event
    RUN/checkpoints/last.pt    after every epoch: backbone checkpoint + everything to resume
    RUN/backbone.pt            at the end: the backbone alone (a ``checkpoint:`` prior, an eval input)
    RUN/summary.json           at the end: budget used, wall-clock, final metrics

Every file is written atomically. Budget (MISSION.md item 5): the fraction of the full run's
optimisation steps, the full run being the same epochs over all N samples with the same batch size.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import RelaError
from ..fileio import atomic_write, write_json_atomic
from ..methods import METHODS, build_method
from ..models import BACKBONES, build_backbone, safe_torch_load, save_backbone_checkpoint
from ..priors import Preprocessing
from ..rela import ReLA, StepOutput, parse_schedule
from ..runtime import autocast_and_scaler, resolve_device
from ..shards.manifest import verify_shard_set
from ..shards.reader import PHASE_SSL, ShardSetSource, TrainingStream, new_phase_flag, open_shard_set
from ..subsets import SUBSET_RULES, SubsetSampler
from ..views import method_views, rela_views

logger = logging.getLogger("rela_pipeline")

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
LAST_CHECKPOINT = Path("checkpoints") / "last.pt"
BACKBONE_NAME = "backbone.pt"
SUMMARY_NAME = "summary.json"
#: Settings that may differ when resuming (they do not change what is computed).
RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "progress", "num_workers", "device", "log_every", "skip_bad_shards", "verify"})


@dataclass
class TrainConfig:
    """Settings of a stage-two run (the CLI's ``train`` options).

    Attributes:
        shards: shard-set directory or manifest URL (see :func:`open_shard_set`).
        out_dir: the run directory.
        method: a name in :data:`METHODS`, or a label for a caller-provided method.
        backbone: a name in :data:`BACKBONES`.
        cifar_stem: ResNet 3x3 stride-1 stem without max-pool; None means on for ``image_size <= 64``.
        image_size: S, pixels of the square training views.
        epochs: passes over the (sub-sampled) data.
        batch_size: B, images per optimisation step.
        data_ratio: r in ``(0, 1]``: each epoch trains on a fresh subset of ``round(r * N)`` samples.
        subset: subset rule, one of :data:`SUBSET_RULES`.
        dedup_threshold: cosine for the ``dedup`` rule.
        rela_schedule: ``adaptive``, ``constant:<fraction>`` or ``none`` (no ReLA: the baselines).
        lr, weight_decay: AdamW (the paper's 1e-3 and 0.01).
        lr_schedule: ``constant`` (the paper) or ``cosine`` (to 0 at the last step).
        device: "auto", "cpu", "cuda" or "cuda:N".
        amp: bf16 (fp16 with loss scaling where bf16 is unsupported) autocast on CUDA.
        num_workers: DataLoader workers decoding and augmenting; None = ``min(8, CPUs - 1)``; 0 = in
            the main process (no prefetch).
        seed: seeds the backbone, heads, subsets, shuffles and augmentations.
        shuffle_buffer: samples per worker held in webdataset's shuffle buffer.
        log_every: steps per ``metrics.jsonl`` interval record.
        online_probe: train a linear classifier on detached features when labels exist.
        skip_bad_shards: warn and skip unreadable shards and samples instead of failing (with
            ``verify``: also the shards that fail verification).
        verify: check the shard set with :func:`rela_pipeline.shards.manifest.verify_shard_set`
            before training and refuse it on any problem (a remote set is downloaded once for it,
            streaming; ``verify=False`` skips that when it was verified where its files are).
        resume: continue from ``RUN/checkpoints/last.pt``.
        overwrite: replace an existing run directory.
        progress: show a progress bar.
    """

    shards: str
    out_dir: Path
    method: str = "byol"
    backbone: str = "convnet"
    cifar_stem: bool | None = None
    image_size: int = 32
    epochs: int = 10
    batch_size: int = 128
    data_ratio: float = 1.0
    subset: str = "random"
    dedup_threshold: float = 0.98
    rela_schedule: str = "adaptive"
    lr: float = 1e-3
    weight_decay: float = 0.01
    lr_schedule: str = "constant"
    device: str = "auto"
    amp: bool = True
    num_workers: int | None = None
    seed: int = 0
    shuffle_buffer: int = 2000
    log_every: int = 20
    online_probe: bool = True
    skip_bad_shards: bool = False
    verify: bool = True
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def validate(self, custom_method: bool = False) -> None:
        """Check values before anything is read or written.

        Raises:
            RelaError: naming the first bad setting.
        """
        if not custom_method and self.method not in METHODS:
            raise RelaError(f"unknown SSL method '{self.method}'; choose one of: {', '.join(METHODS)}")
        if self.backbone not in BACKBONES:
            raise RelaError(f"unknown backbone '{self.backbone}'; choose one of: {', '.join(BACKBONES)}")
        if not 0.0 < self.data_ratio <= 1.0:
            raise RelaError(f"--data-ratio must be in (0, 1], got {self.data_ratio}")
        if self.subset not in SUBSET_RULES:
            raise RelaError(f"unknown subset rule '{self.subset}'; choose one of: {', '.join(SUBSET_RULES)}")
        parse_schedule(self.rela_schedule)
        for name in ("epochs", "batch_size", "image_size", "log_every", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise RelaError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.image_size < 8:
            raise RelaError(f"--image-size must be at least 8 pixels, got {self.image_size}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise RelaError(f"need lr > 0 and weight decay >= 0, got {self.lr} and {self.weight_decay}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise RelaError(f"--lr-schedule must be constant or cosine, got {self.lr_schedule}")
        if self.num_workers is not None and self.num_workers < 0:
            raise RelaError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.resume and self.overwrite:
            raise RelaError("--resume and --overwrite exclude each other")

    @property
    def use_cifar_stem(self) -> bool:
        """Whether the ResNet stem is the CIFAR one (explicit, or automatic at 64 px and below)."""
        return self.cifar_stem if self.cifar_stem is not None else self.image_size <= 64

    def to_json(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class Budget:
    """Compute accounting of a run (MISSION.md item 5).

    Attributes:
        steps: optimisation steps done.
        images_seen: images trained on (steps x B; each image gives two or more views).
        full_run_steps: steps of the full run: ``epochs * (N // B)``.
    """

    steps: int = 0
    images_seen: int = 0
    full_run_steps: int = 1

    @property
    def fraction(self) -> float:
        """Steps done as a fraction of the full run's steps."""
        return self.steps / max(self.full_run_steps, 1)


class _FirstOutput:
    """Forward hook keeping the first output of a module per step (online-probe features)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.value is None and isinstance(output, torch.Tensor):
            self.value = output


def default_num_workers() -> int:
    """DataLoader workers when none are given: ``min(8, CPUs - 1)``, at least 1."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _prepare_run_dir(config: TrainConfig) -> bool:
    """Create, reuse (``--resume``) or replace (``--overwrite``) the run directory.

    Returns:
        True when resuming from an existing checkpoint.

    Raises:
        RelaError: the directory holds a run and neither flag is given; ``--resume`` without a
            checkpoint is allowed (starts fresh) only when the directory has no other run files.
    """
    out = Path(config.out_dir)
    checkpoint = out / LAST_CHECKPOINT
    if out.exists() and not out.is_dir():
        raise RelaError(f"run directory {out} exists and is not a directory")
    if config.resume:
        if checkpoint.is_file():
            return True
        if out.is_dir() and any(out.iterdir()):
            raise RelaError(f"--resume: {out} has no {LAST_CHECKPOINT} to resume from (the run stopped before its first epoch ended); use --overwrite")
    elif out.is_dir() and any(out.iterdir()):
        if not config.overwrite:
            raise RelaError(f"run directory {out} is not empty; pass --resume to continue it or --overwrite to replace it")
        known = {CONFIG_NAME, METRICS_NAME, "checkpoints", BACKBONE_NAME, SUMMARY_NAME}
        foreign = sorted(p.name for p in out.iterdir() if p.name not in known and not p.name.endswith(".partial"))
        if foreign:
            raise RelaError(f"--overwrite refuses to delete {out}: it holds files a run does not write ({', '.join(foreign[:3])})")
        shutil.rmtree(out)
    (out / LAST_CHECKPOINT.parent).mkdir(parents=True, exist_ok=True)
    return False


def _check_resumable(config: TrainConfig, saved: dict[str, Any]) -> None:
    current = config.to_json()
    differing = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in differing[:4])
        raise RelaError(f"--resume with different settings than the saved run ({details})")


class _MetricsLog:
    """Appends JSON records to ``metrics.jsonl``; on resume keeps only records up to the checkpoint."""

    def __init__(self, path: Path, keep_until_step: int | None) -> None:
        self.path = path
        if keep_until_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= keep_until_step]
            with atomic_write(path, "w") as handle:
                handle.write("".join(line + "\n" for line in kept))
        elif keep_until_step is None and path.exists():
            path.unlink()
        self.handle = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.handle.write(json.dumps(clean, sort_keys=True) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def verified(source: ShardSetSource, skip_bad_shards: bool) -> ShardSetSource:
    """Verify a shard set before training (every checksum, sample key, target and the transport:
    :func:`verify_shard_set`; a remote set is streamed once for it); with ``skip_bad_shards`` the
    shards that fail are left out with a warning as long as nothing outside them fails.

    Returns:
        ``source``, or a copy without the shards that failed.

    Raises:
        RelaError: the set does not verify (the message gives the first problem and the count).
    """
    report = verify_shard_set(source.local_dir if source.local_dir is not None else source.location)
    if report.ok:
        return source
    in_shards = {problem for problems in report.shard_problems.values() for problem in problems}
    outside = [p for p in report.problems if p not in in_shards]
    if skip_bad_shards and not outside:
        for name in report.bad_shards:
            logger.warning("skipping %s: it fails verification (%s)", name, report.shard_problems[name][0])
        return source.without(report.bad_shards)
    raise RelaError(
        f"shard set {source.location} does not verify ({len(report.problems)} problem(s); first: {report.problems[0]}); "
        f"see `rela-pipeline verify {source.location}`, or pass --no-verify to train on it anyway"
    )


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
        ssl_views: the custom method's view transform (PIL RGB image -> list of ``(3, S, S)``
            float tensors); default the built-in method's views.

    Returns:
        The summary dict: budget (steps, images_seen, full_run_steps, fraction), wall-clock
        seconds, ReLA switch step, the ReLA loss of the first and last logged intervals of this
        invocation, the last interval's metrics and output paths.

    Raises:
        RelaError: bad settings, a shard set that fails its checks, bad shards or samples met
            while streaming (unless ``skip_bad_shards``), an empty subset, or a resume whose
            settings differ. Before the first checkpoint the run directory is removed; after it the
            checkpoint stays so ``--resume`` can continue.
    """
    custom = method_factory is not None
    config.validate(custom_method=custom)
    if custom and ssl_views is None:
        raise RelaError("a custom method needs its view transform (ssl_views=)")
    source = open_shard_set(config.shards, skip_bad_shards=config.skip_bad_shards)
    if config.verify:
        source = verified(source, config.skip_bad_shards)
    labelled = bool(source.manifest["dataset"].get("labelled")) and bool(source.class_names)
    scores = source.load_scores() if config.subset != "random" else None
    sampler = SubsetSampler(
        source.num_samples, config.data_ratio, config.subset, scores, seed=config.seed,
        dedup_threshold=config.dedup_threshold, min_size=config.batch_size,
    )
    device = resolve_device(config.device)
    out = Path(config.out_dir)
    created = not out.exists()
    resuming = _prepare_run_dir(config)
    try:
        return _train(config, source, sampler, labelled, device, resuming, method_factory, ssl_views)
    except BaseException:
        if created and not (out / LAST_CHECKPOINT).is_file():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(config, source: ShardSetSource, sampler: SubsetSampler, labelled: bool, device, resuming, method_factory, ssl_views) -> dict[str, Any]:
    out = Path(config.out_dir)
    torch.manual_seed(config.seed)
    backbone_config = {"name": config.backbone, "cifar_stem": config.use_cifar_stem}
    backbone = build_backbone(config.backbone, cifar_stem=config.use_cifar_stem)
    method = method_factory(backbone) if method_factory is not None else build_method(config.method, backbone)
    if getattr(method, "backbone", None) is not backbone:
        raise RelaError("the custom method must keep the backbone it was given as its .backbone")
    feature_dim = backbone.feature_dim
    target_dim = min(feature_dim, source.target_dim)
    rela = ReLA(method, target_dim, parse_schedule(config.rela_schedule)).to(device)
    num_classes = len(source.class_names)
    probe = nn.Linear(feature_dim, num_classes).to(device) if labelled and config.online_probe else None

    parameters = [{"params": [p for p in rela.parameters() if p.requires_grad]}]
    if probe is not None:
        parameters.append({"params": list(probe.parameters()), "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = sampler.size // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    budget = Budget(full_run_steps=config.epochs * (source.num_samples // config.batch_size))
    lr_lambda = (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))) if config.lr_schedule == "cosine" else (lambda s: 1.0)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    autocast, scaler = autocast_and_scaler(device, config.amp)

    start_epoch, elapsed_before = 0, 0.0
    if resuming:
        state = safe_torch_load(out / LAST_CHECKPOINT, "training checkpoint")
        training = state.get("training_state") if isinstance(state, dict) else None
        if not isinstance(training, dict):
            raise RelaError(f"{out / LAST_CHECKPOINT} holds no training state to resume from")
        _check_resumable(config, training["config"])
        rela.load_state_dict(training["rela"])
        if probe is not None and training.get("probe") is not None:
            probe.load_state_dict(training["probe"])
        optimizer.load_state_dict(training["optimizer"])
        lr_scheduler.load_state_dict(training["lr_scheduler"])
        scaler.load_state_dict(training["scaler"])
        rela.schedule.load_state_dict(training["schedule"])
        torch.set_rng_state(training["torch_rng"])
        start_epoch = int(training["epoch"]) + 1
        budget.steps, budget.images_seen = int(training["step"]), int(training["images_seen"])
        elapsed_before = float(training["elapsed_s"])
        logger.info("resuming %s after epoch %d (step %d)", out, start_epoch, budget.steps)
    write_json_atomic(out / "config.json", config.to_json())
    metrics = _MetricsLog(out / METRICS_NAME, budget.steps if resuming else None)
    rela.schedule.start(budget.steps, total_steps)

    image_size = config.image_size
    rela_transform = rela_views(image_size)
    ssl_transform = ssl_views if ssl_views is not None else method_views(config.method, image_size)
    workers = config.num_workers if config.num_workers is not None else default_num_workers()
    capture = _FirstOutput()
    hook = backbone.register_forward_hook(capture)
    logger.info(
        "training %s + %s on %s: %s; %d steps per epoch x %d epochs = %d steps (%.1f%% of the full run's %d)",
        config.method, config.backbone, device, sampler.describe(), steps_per_epoch, config.epochs,
        total_steps, 100.0 * total_steps / max(budget.full_run_steps, 1), budget.full_run_steps,
    )
    if source.skipped_shards:
        logger.warning("training without %d skipped shards (%d of %d samples readable)", len(source.skipped_shards), source.readable_samples, source.num_samples)

    rela.train()
    t_start = time.perf_counter()
    interval = _Interval()
    bar = tqdm(total=total_steps, initial=budget.steps, unit="step", desc="train", disable=not config.progress, dynamic_ncols=True)
    try:
        for epoch in range(start_epoch, config.epochs):
            _seed_epoch(config.seed, epoch)
            phase_flag = new_phase_flag(rela.schedule.active)
            stream = TrainingStream(
                source, sampler.mask(epoch), target_dim, rela_transform, ssl_transform, phase_flag,
                config.batch_size, config.seed, epoch, config.shuffle_buffer, config.skip_bad_shards,
            )
            generator = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch))
            loader = torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=workers, generator=generator, pin_memory=device.type == "cuda",
                prefetch_factor=2 if workers > 0 else None,
            )
            epoch_steps = 0
            for batch in loader:
                if "error" in batch:
                    raise RelaError(batch["error"])
                output, probe_loss, probe_correct = _step(rela, probe, optimizer, scaler, autocast, capture, batch, device)
                lr_scheduler.step()
                was_active = rela.schedule.active
                rela.step_end(output, budget.steps, total_steps)
                if was_active and not rela.schedule.active:
                    phase_flag.value = PHASE_SSL
                    metrics.write({"event": "rela_switch", "step": rela.schedule.switch_step, "epoch": epoch, "rho": _finite_or_none(getattr(rela.schedule, "rho", None))})
                    logger.info("ReLA phase ends at step %d: training continues with the %s loss", rela.schedule.switch_step, config.method)
                budget.steps += 1
                budget.images_seen += config.batch_size
                epoch_steps += 1
                interval.add(output, probe_loss, probe_correct, config.batch_size)
                bar.update(1)
                if budget.steps % config.log_every == 0:
                    record = interval.record(budget, epoch, rela, optimizer)
                    metrics.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", phase=record["phase"], img_s=f"{record['images_per_s']:.0f}")
            if epoch_steps == 0:
                raise RelaError(f"epoch {epoch} produced no batch of {config.batch_size}: the readable subset is too small")
            if epoch == config.epochs - 1 and interval.images:
                metrics.write(interval.record(budget, epoch, rela, optimizer))  # the tail interval
            elapsed = elapsed_before + time.perf_counter() - t_start
            metrics.write({"event": "epoch_end", "epoch": epoch, "step": budget.steps, "epoch_steps": epoch_steps, "images_seen": budget.images_seen, "budget_fraction": budget.fraction, "elapsed_s": round(elapsed, 2)})
            _save_checkpoint(out, config, backbone, backbone_config, rela, probe, optimizer, lr_scheduler, scaler, epoch, budget, elapsed)
    finally:
        bar.close()
        hook.remove()
        metrics.close()
    wall = elapsed_before + time.perf_counter() - t_start
    save_backbone_checkpoint(
        out / BACKBONE_NAME, backbone, backbone_config, preprocessing=_eval_preprocessing(image_size).to_dict(),
        step=budget.steps, config=config.to_json(),
    )
    summary = {
        "run_dir": str(out),
        "method": config.method,
        "backbone": backbone_config,
        "rela_schedule": config.rela_schedule,
        "rela_switch_step": rela.schedule.switch_step,
        "subset": sampler.describe(),
        "budget": {"steps": budget.steps, "images_seen": budget.images_seen, "full_run_steps": budget.full_run_steps, "fraction": round(budget.fraction, 6)},
        "wall_clock_s": round(wall, 2),
        "final": interval.last_record,
        "rela_loss": {"first_interval": interval.first_rela_loss, "last_interval": interval.last_rela_loss},
        "checkpoint": str(out / BACKBONE_NAME),
        "shards": source.location,
        "skipped_shards": source.skipped_shards,
    }
    write_json_atomic(out / SUMMARY_NAME, summary)
    return summary


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _seed_epoch(seed: int, epoch: int) -> None:
    """Seed every generator the views may use in this process (torch, numpy: lightly's
    solarisation, random) from ``(seed, epoch)``, so a resumed epoch replays exactly. DataLoader
    workers are seeded from the epoch's generator by torch itself."""
    value = _epoch_seed(seed, epoch)
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


def _eval_preprocessing(image_size: int) -> Preprocessing:
    """How a trained backbone sees whole images: squash-resize to S x S, ImageNet normalisation
    (the same normalisation as the training views)."""
    return Preprocessing(resize_size=image_size, crop_size=image_size, resize_mode="squash")


def _step(rela: ReLA, probe, optimizer, scaler, autocast, capture: _FirstOutput, batch, device) -> tuple[StepOutput, torch.Tensor | None, torch.Tensor | None]:
    views = [v.to(device, non_blocking=True) for v in batch["views"]]
    targets = batch["target"].to(device, non_blocking=True)
    labelled = bool((batch["label"] >= 0).all())  # on the host copy: no device sync per step
    labels = batch["label"].to(device, non_blocking=True)
    capture.value = None
    with autocast():
        output = rela(views, targets)
        loss = output.loss
        probe_loss = probe_correct = None
        features = capture.value
        if probe is not None and features is not None and features.shape[0] >= labels.shape[0] and labelled:
            logits = probe(features[: labels.shape[0]].detach().float())
            probe_loss = F.cross_entropy(logits, labels)
            probe_correct = (logits.argmax(1) == labels).sum().detach()
            loss = loss + probe_loss
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return output, probe_loss, probe_correct


class _Interval:
    """Accumulates one logging interval on the device (no host sync until the record is made)."""

    def __init__(self) -> None:
        self.last_record: dict[str, Any] = {}
        self.first_rela_loss: float | None = None
        self.last_rela_loss: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}
        self.images = 0
        self.probe_images = 0
        self.phase = "rela"
        self.started = time.perf_counter()

    def _add(self, name: str, value: torch.Tensor | None) -> None:
        if value is not None:
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
            self.counts[name] = self.counts.get(name, 0) + 1

    def add(self, output: StepOutput, probe_loss, probe_correct, batch_size: int) -> None:
        self.phase = output.phase
        self._add("loss", output.loss)
        self._add("rela_loss", output.rela_loss)
        self._add("ssl_loss", output.ssl_loss)
        self._add("probe_loss", probe_loss)
        if probe_correct is not None:
            self.sums["probe_correct"] = self.sums.get("probe_correct", 0.0) + probe_correct.float()
            self.probe_images += batch_size
        self.images += batch_size

    def record(self, budget: Budget, epoch: int, rela: ReLA, optimizer) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        record: dict[str, Any] = {
            "step": budget.steps, "epoch": epoch, "phase": self.phase,
            "rho": _finite_or_none(getattr(rela.schedule, "rho", None)),
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": self.images / max(seconds, 1e-9),
            "images_seen": budget.images_seen, "budget_fraction": round(budget.fraction, 6),
        }
        for name in ("loss", "rela_loss", "ssl_loss", "probe_loss"):
            record[name] = float(self.sums[name]) / self.counts[name] if name in self.counts else None
        record["probe_acc"] = float(self.sums["probe_correct"]) / self.probe_images if self.probe_images else None
        if record["rela_loss"] is not None:
            self.last_rela_loss = record["rela_loss"]
            if self.first_rela_loss is None:
                self.first_rela_loss = record["rela_loss"]
        self.last_record = record
        self._reset()
        return record


def _finite_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _save_checkpoint(out: Path, config, backbone, backbone_config, rela, probe, optimizer, lr_scheduler, scaler, epoch: int, budget: Budget, elapsed: float) -> None:
    training_state = {
        "epoch": epoch,
        "step": budget.steps,
        "images_seen": budget.images_seen,
        "elapsed_s": elapsed,
        "config": config.to_json(),
        "rela": rela.state_dict(),
        "probe": probe.state_dict() if probe is not None else None,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "schedule": rela.schedule.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    save_backbone_checkpoint(
        out / LAST_CHECKPOINT, backbone, backbone_config, preprocessing=_eval_preprocessing(config.image_size).to_dict(),
        step=budget.steps, config=config.to_json(), training_state=training_state,
    )
