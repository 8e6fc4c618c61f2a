"""The run directory of stage two: creating or reusing it, checkpoints, and resuming.

Run directory::

    RUN/config.json            the run's settings (a resumed run must match them) and what
                               "auto" resolved to (device, precision, data path, memory format)
    RUN/metrics.jsonl          one JSON record per logging interval, per epoch and per event
    RUN/tensorboard/           the same records as TensorBoard events (``--logger tensorboard``,
                               the default; :mod:`.loggers`), or RUN/wandb/ (``--logger wandb``)
    RUN/checkpoints/last.pt    after every epoch: backbone checkpoint + everything to resume
    RUN/backbone.pt            at the end: the backbone alone (a ``checkpoint:`` prior, an eval input)
    RUN/summary.json           at the end: budget used, wall-clock, final metrics

Every file is written atomically (a ``.partial`` name, then a rename).

A resumed run replays the uninterrupted run's subsets, batches and views (all functions of
``(seed, epoch)``). On the CPU it also gives the same weights, bit for bit; on CUDA only up to
rounding, since training leaves cuDNN free to pick non-deterministic kernels (for speed).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import RelaError
from ...models import safe_torch_load, save_backbone_checkpoint
from ...priors import Preprocessing
from ...rela import ReLA
from .config import RESUMABLE_CHANGES, Budget, TrainConfig
from .loggers import TENSORBOARD_DIR, WANDB_DIR, WANDB_RUN_ID
from .step import TrainStep

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
LAST_CHECKPOINT = Path("checkpoints") / "last.pt"
BACKBONE_NAME = "backbone.pt"
SUMMARY_NAME = "summary.json"


def prepare_run_dir(config: TrainConfig) -> bool:
    """Create, reuse (``--resume``) or replace (``--overwrite``) the run directory.

    Returns:
        True when resuming from an existing checkpoint.

    Raises:
        RelaError: the directory holds a run and neither flag is given; ``--resume`` without a
            checkpoint is allowed (starts fresh) only when the directory has no other run files;
            ``--overwrite`` of a directory holding files a run does not write.
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
        known = {CONFIG_NAME, METRICS_NAME, "checkpoints", BACKBONE_NAME, SUMMARY_NAME, TENSORBOARD_DIR, WANDB_DIR, WANDB_RUN_ID}
        foreign = sorted(p.name for p in out.iterdir() if p.name not in known and not p.name.endswith(".partial"))
        if foreign:
            raise RelaError(f"--overwrite refuses to delete {out}: it holds files a run does not write ({', '.join(foreign[:3])})")
        shutil.rmtree(out)
    (out / LAST_CHECKPOINT.parent).mkdir(parents=True, exist_ok=True)
    return False


def eval_preprocessing(image_size: int) -> Preprocessing:
    """How a trained backbone sees whole images: squash-resize to S x S, ImageNet normalisation
    (the same resize as the training data path and the same normalisation as the views)."""
    return Preprocessing(resize_size=image_size, crop_size=image_size, resize_mode="squash")


@dataclass
class Progress:
    """Where a run stands: the next epoch and the wall-clock before this invocation (the budget
    used is restored into the run's :class:`Budget`)."""

    next_epoch: int = 0
    elapsed_s: float = 0.0


def save_checkpoint(
    out: Path,
    config: TrainConfig,
    backbone_config: dict[str, Any],
    rela: ReLA,
    probe: nn.Module | None,
    step: TrainStep,
    epoch: int,
    budget: Budget,
    elapsed_s: float,
) -> None:
    """Write ``RUN/checkpoints/last.pt`` after ``epoch``: the backbone in the project's checkpoint
    format plus the training state (model with heads and teacher, transfer layer, probe,
    optimiser, LR schedule, loss scale, ReLA schedule, torch RNG), all loadable with
    ``torch.load(weights_only=True)``."""
    training_state = {
        "epoch": epoch,
        "step": budget.steps,
        "images_seen": budget.images_seen,
        "elapsed_s": elapsed_s,
        "config": config.to_json(),
        "rela": rela.state_dict(),
        "probe": probe.state_dict() if probe is not None else None,
        **step.state_dict(),
        "schedule": rela.schedule.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    save_backbone_checkpoint(
        out / LAST_CHECKPOINT,
        rela.backbone,
        backbone_config,
        preprocessing=eval_preprocessing(config.image_size).to_dict(),
        step=budget.steps,
        config=config.to_json(),
        training_state=training_state,
    )


def restore_checkpoint(out: Path, config: TrainConfig, rela: ReLA, probe: nn.Module | None, step: TrainStep, budget: Budget) -> Progress:
    """Load ``RUN/checkpoints/last.pt`` into the run's objects (in place) and return where it stood.

    Raises:
        RelaError: no training state in the file, or settings that differ from the saved run's
            (other than :data:`RESUMABLE_CHANGES`; the message names up to four).
    """
    state = safe_torch_load(out / LAST_CHECKPOINT, "training checkpoint")
    training = state.get("training_state") if isinstance(state, dict) else None
    if not isinstance(training, dict):
        raise RelaError(f"{out / LAST_CHECKPOINT} holds no training state to resume from")
    check_resumable(config, training["config"])
    rela.load_state_dict(training["rela"])
    if probe is not None and training.get("probe") is not None:
        probe.load_state_dict(training["probe"])
    step.load_state_dict(training)
    rela.schedule.load_state_dict(training["schedule"])
    torch.set_rng_state(training["torch_rng"])
    budget.steps, budget.images_seen = int(training["step"]), int(training["images_seen"])
    return Progress(int(training["epoch"]) + 1, float(training["elapsed_s"]))


def check_resumable(config: TrainConfig, saved: dict[str, Any]) -> None:
    """Refuse to resume with settings that change what is computed.

    Raises:
        RelaError: naming up to four differing settings with their saved and current values.
    """
    current = config.to_json()
    differing = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in differing[:4])
        raise RelaError(f"--resume with different settings than the saved run ({details})")
