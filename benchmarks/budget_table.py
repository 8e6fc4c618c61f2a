"""Accuracy against compute budget: the paper's Table 1 protocol on real Fashion-MNIST, with floors.

Order of work (each step cached, so rerunning the same command resumes):

1. **Splits.** ``train`` (the student's images, the probes' labels, the k-NN bank), ``val`` (carved
   out of the train split: settings and epochs are chosen on it, never on test) and ``test``.
2. **Floors**, probed exactly like a student on the same splits: raw pixels (normalised,
   ``S x S x 3``), the untrained student (one per seed, the very initialisation ``train`` gives that
   seed), the Rand. prior's own features and, once trained, the BYOL* prior's (BYOL* seed 0). What
   a student gets without learning, and by copying its prior.
3. **Convergence study** of BYOL (seed 0, 100% budget): E, 2E, 4E ... epochs, scored on ``val``,
   until doubling adds under 1 point of linear probe (or ``max_epochs``); BYOL* is the run at the
   plateau, and its seed-0 training is reused as the table's.
4. **Cells** (3 seeds each, evaluated on ``test``), all at BYOL*'s epochs:

   * ``BYOL*``: BYOL at 100% budget, the reference;
   * ``BYOL``: BYOL at 10%, 20% and 50% budget on random dynamic subsets (the paper's baselines);
   * ``BYOL + ReLA, Rand. prior``: 10/20/50% with a randomly initialised ResNet-18 as the prior;
   * ``BYOL + ReLA, BYOL* prior``: 10/20/50% with the seed-0 BYOL* backbone as a ``checkpoint:``
     prior (the analogue of the paper's CIFAR-10-trained ResNet-18 prior);
   * at 20%, Rand. prior, one setting changed each: the score-driven subsets (``density``,
     ``dedup``), the ``constant:0.5`` ReLA schedule, and the other ``--transfer`` mode.

Every evaluation is ``eval``'s: linear probe (standardised features, learning rate chosen on held-out
train rows), k-NN, and the few-label columns (10 and 100 labelled train images per class, mean over
3 draws). Budget is the paper's (the authors' code): the fraction of BYOL*'s optimisation steps,
i.e. the same epochs on ``ratio * N`` fresh random samples per epoch. Stage-one cost (embed +
transport + scores, from the shard set's manifest) is reported separately, and as a fraction of
BYOL*'s mean training wall-clock; the BYOL* prior's own training is not counted (like the paper's
pretrained priors it is treated as a given model).

Profiles:

* ``cpu``: ConvNet student at 32 px; the first 1,000 images of each class of the train split
  (10,000), the next 500 per class as validation, the whole test split (10,000); batch 128; BYOL
  settings chosen on the validation split by ``benchmarks/ssl_settings.py`` (README); convergence
  study from 20 epochs, capped at 80. About 2 hours on 2 CPU cores.
* ``gpu``: ResNet-18 with the CIFAR stem at 32 px on the whole train split less 500 validation
  images per class, the paper's optimiser (AdamW 1e-3, wd 0.01, batch 128, bf16 autocast);
  convergence study from 100 epochs, capped at 800.

``--tiny`` shrinks either profile to seconds per run (for tests): 1 and 2 epochs in the study,
probe 10 epochs, batch 16, 20 train and 10 validation images per class, few-label 1 and 5.
``--epochs`` fixes the epochs and skips the study; ``--cells`` selects cells (BYOL* is always run).

Outputs in ``--out`` (rewritten after every finished run, so a partial table is readable):
``results.csv`` (one row per floor and per cell, ``kind`` telling them apart), ``results.json``
(the rows, every run, the floors, the convergence points), ``results.md`` (floors, convergence,
table, few-label table), ``budget_curve.png`` (top-1 against the fraction of BYOL* compute, error
bars one standard deviation over seeds, floors as dashed lines), ``convergence.png`` (the study's
validation accuracies against epochs). Runs live in
``runs/e<epochs>/<cell>/seed<k>``; a killed training run resumes from its last finished epoch.

Example (the README's numbers)::

    python benchmarks/budget_table.py --profile cpu --out runs/budget-cpu
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from rela_pipeline.errors import RelaError
from rela_pipeline.fileio import atomic_write, write_json_atomic
from rela_pipeline.models import build_backbone
from rela_pipeline.priors import load_prior
from rela_pipeline.runtime import resolve_device
from rela_pipeline.stages.embed import EmbedConfig, run_embed
from rela_pipeline.stages.evaluate import EvalConfig, evaluate_features, extract_features, run_eval, scan_labelled_splits
from rela_pipeline.stages.prepare import prepare_fashion_mnist
from rela_pipeline.stages.train import TrainConfig, run_train
from rela_pipeline.stages.train.checkpoints import eval_preprocessing

BUDGETS = (0.1, 0.2, 0.5)
SCORE_SUBSET_RULES = ("density", "dedup")
SCORE_RULE_BUDGET = 0.2
RANDOM_PRIOR = "random"
BYOL_STAR_PRIOR = "byol*"
PRIOR_LABELS = {RANDOM_PRIOR: "Rand.", BYOL_STAR_PRIOR: "BYOL*"}
REFERENCE_KEY = "byol-100"
#: The convergence study stops when doubling the epochs adds less than this to the validation
#: linear probe (a fraction: 1 point).
PLATEAU_GAIN = 0.01
#: The alternative ReLA schedule's cell (``constant:<fraction>``), beside the adaptive switch.
CONSTANT_SCHEDULE = "constant:0.5"


@dataclass(frozen=True)
class Profile:
    """Everything that fixes what a benchmark run computes (saved as ``settings.json``).

    Attributes:
        name: ``cpu`` or ``gpu`` (``-tiny`` appended for ``--tiny``).
        backbone, cifar_stem, image_size: the student (image_size in pixels).
        limit_per_class: images per class of the train split the student and the probe see (the
            test split is always complete); ``None``: the whole split less the validation images.
        epochs: with ``convergence``, the first epoch count E of the convergence study (E, 2E,
            4E ... up to ``max_epochs``); without, the epochs of every run. Budget scales the data
            per epoch, never the epochs.
        batch_size: images per step.
        val_per_class: images per class carved out of the train split, after the first
            ``limit_per_class``, as the validation split that settings and epochs are chosen on.
        convergence: find BYOL*'s epochs with the convergence study (else use ``epochs``).
        max_epochs: the convergence study's cap.
        lr, weight_decay: AdamW.
        lr_schedule, warmup_epochs: ``train``'s ``--lr-schedule`` and ``--warmup-epochs``.
        teacher_momentum: ``train``'s ``--teacher-momentum`` (cosine | constant).
        crop_min_scale: ``train``'s ``--crop-min-scale`` (None: BYOL's 0.08).
        transfer: ``train``'s ``--transfer`` of the ReLA cells (trained | frozen); one cell uses
            the other mode.
        precision: ``train``'s ``--precision`` (auto: bf16 on CUDA and on CPUs with native bf16).
        augment: ``train``'s ``--augment`` (device: batched views on the training device; pil).
        prior_arch, prior_image_size: the ``random:`` prior (torchvision architecture, pixels).
        probe_epochs: linear-probe epochs (paper: 100).
        few_label: labelled train images per class of the few-label columns.
        few_label_draws: draws per few-label entry.
        seeds: seeds per cell.
    """

    name: str
    backbone: str
    cifar_stem: bool
    image_size: int
    limit_per_class: int | None
    epochs: int
    batch_size: int
    val_per_class: int = 500
    convergence: bool = True
    max_epochs: int = 160
    lr: float = 1e-3
    weight_decay: float = 0.01
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    teacher_momentum: str = "cosine"
    crop_min_scale: float | None = None
    transfer: str = "trained"
    precision: str = "auto"
    augment: str = "device"
    prior_arch: str = "resnet18"
    prior_image_size: int = 32
    probe_epochs: int = 100
    few_label: tuple[int, ...] = (10, 100)
    few_label_draws: int = 3
    seeds: int = 3


PROFILES = {
    # BYOL's settings for 28 px grayscale images, chosen on the validation split (README "Evidence"):
    # warm-up + cosine learning rate, and crops of at least half the image.
    "cpu": Profile(
        name="cpu",
        backbone="convnet",
        cifar_stem=False,
        image_size=32,
        limit_per_class=1000,
        epochs=20,
        batch_size=128,
        max_epochs=80,
        lr_schedule="cosine",
        warmup_epochs=2.0,
        crop_min_scale=0.5,
    ),
    # The paper's ResNet-18 setting on the same 28 px data: crops of at least half the image (a
    # property of the data, found with the ConvNet; not yet validated for ResNet-18 on a GPU).
    "gpu": Profile(
        name="gpu", backbone="resnet18", cifar_stem=True, image_size=32, limit_per_class=None, epochs=100, batch_size=128, max_epochs=800, crop_min_scale=0.5
    ),
}


def tiny(profile: Profile) -> Profile:
    """``profile`` shrunk to seconds per run on a CPU; the student architecture is kept (a warm-up
    becomes half an epoch, so the 1-epoch runs keep one)."""
    return dataclasses.replace(
        profile,
        name=profile.name + "-tiny",
        limit_per_class=20,
        val_per_class=10,
        epochs=1,
        max_epochs=2,
        batch_size=16,
        probe_epochs=10,
        few_label=(1, 5),
        few_label_draws=2,
        warmup_epochs=0.5 if profile.warmup_epochs else 0.0,
    )


@dataclass(frozen=True)
class Cell:
    """One cell of the table: a configuration at one budget.

    Attributes:
        key: directory-safe identifier, e.g. ``byol-rela-random-20`` or ``byol-rela-random-20-density``.
        configuration: the plot line it belongs to, e.g. ``BYOL + ReLA, Rand. prior``.
        budget: fraction of BYOL*'s optimisation steps, in (0, 1].
        prior: ``None`` (no ReLA), ``"random"`` or ``"byol*"``.
        subset: subset rule of stage two (``random``, ``density``, ``dedup``).
        schedule: the ReLA schedule (``adaptive`` or ``constant:<fraction>``).
        transfer: ``trained``/``frozen``, or None for the profile's.
    """

    key: str
    configuration: str
    budget: float
    prior: str | None
    subset: str = "random"
    schedule: str = "adaptive"
    transfer: str | None = None

    @property
    def variant(self) -> bool:
        """True for the single-marker cells that differ from their line in one setting."""
        return self.subset != "random" or self.schedule != "adaptive" or self.transfer is not None

    @property
    def label(self) -> str:
        """Human-readable row name for the table."""
        if self.prior is None and self.budget == 1.0:
            return "BYOL*"
        parts = [self.configuration]
        if self.subset != "random":
            parts.append(f"{self.subset} subsets")
        if self.schedule != "adaptive":
            parts.append(f"{self.schedule} schedule")
        if self.transfer is not None:
            parts.append(f"{self.transfer} transfer")
        return ", ".join(parts)


def table_cells(profile: Profile | None = None) -> list[Cell]:
    """The cells, in run order: BYOL* first (its seed-0 backbone is a prior), then by budget, then
    the single-setting variants at 20%: each score-driven subset rule, the constant ReLA schedule,
    and the other transfer mode than ``profile``'s (default: trained, so frozen)."""
    other = "trained" if profile is not None and profile.transfer == "frozen" else "frozen"
    cells = [Cell(REFERENCE_KEY, "BYOL", 1.0, None)]
    for budget in BUDGETS:
        pct = round(budget * 100)
        cells.append(Cell(f"byol-{pct}", "BYOL", budget, None))
        for prior in (RANDOM_PRIOR, BYOL_STAR_PRIOR):
            cells.append(Cell(f"byol-rela-{_slug(prior)}-{pct}", f"BYOL + ReLA, {PRIOR_LABELS[prior]} prior", budget, prior))
    pct = round(SCORE_RULE_BUDGET * 100)
    configuration = f"BYOL + ReLA, {PRIOR_LABELS[RANDOM_PRIOR]} prior"
    for rule in SCORE_SUBSET_RULES:
        cells.append(Cell(f"byol-rela-random-{pct}-{rule}", configuration, SCORE_RULE_BUDGET, RANDOM_PRIOR, rule))
    cells.append(Cell(f"byol-rela-random-{pct}-constant", configuration, SCORE_RULE_BUDGET, RANDOM_PRIOR, schedule=CONSTANT_SCHEDULE))
    cells.append(Cell(f"byol-rela-random-{pct}-{other}", configuration, SCORE_RULE_BUDGET, RANDOM_PRIOR, transfer=other))
    return cells


def select_cells(keys: str, profile: Profile | None = None) -> list[Cell]:
    """The cells named in the comma-separated ``keys``, in table order, BYOL* always included.

    Raises:
        RelaError: an unknown key (the message lists the known ones).
    """
    cells = table_cells(profile)
    wanted = {k.strip() for k in keys.split(",") if k.strip()}
    unknown = wanted - {c.key for c in cells}
    if unknown:
        raise RelaError(f"unknown cell(s) {', '.join(sorted(unknown))}; cells are: {', '.join(c.key for c in cells)}")
    return [c for c in cells if c.key in wanted or c.key == REFERENCE_KEY]


@dataclass(frozen=True)
class Floor:
    """A floor: features the student gets without self-supervised learning, probed like a student.

    Attributes:
        key: ``floor-pixels``, ``floor-untrained``, ``floor-prior-random`` or ``floor-prior-byol-star``.
        label: the row name.
        seeds: how many seeds (untrained students: one per seed; the others are deterministic).
    """

    key: str
    label: str
    seeds: int = 1


def floors(profile: Profile) -> list[Floor]:
    """The floors of the table: raw pixels, the untrained student (one per seed) and each prior's
    own features (what the student could get by copying it)."""
    return [
        Floor("floor-pixels", f"raw pixels ({profile.image_size} x {profile.image_size} x 3, normalised)"),
        Floor("floor-untrained", f"untrained student ({profile.backbone})", seeds=profile.seeds),
        Floor("floor-prior-random", f"Rand. prior's features (random:{profile.prior_arch})"),
        Floor("floor-prior-byol-star", "BYOL* prior's features (BYOL* seed 0)"),
    ]


@dataclass(frozen=True)
class Splits:
    """The benchmark's ImageFolders: ``train`` (students, probes and k-NN banks), ``val`` (carved
    out of the train split; settings and epochs are chosen on it) and ``test`` (the table)."""

    train: Path
    val: Path
    test: Path


def _carve(source_train: Path, splits: Splits, profile: Profile) -> None:
    """Write ``splits.train`` and ``splits.val`` from ``source_train`` (hard links, copies across
    file systems): per class in file-name order, the first ``limit_per_class`` images (None: all
    but the last ``val_per_class``) and the next ``val_per_class``."""
    for name, split in (("train", splits.train), ("val", splits.val)):
        partial = split.with_name(f".{name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        for class_dir in sorted(p for p in source_train.iterdir() if p.is_dir()):
            files = sorted(class_dir.iterdir())
            cut = len(files) - profile.val_per_class if profile.limit_per_class is None else profile.limit_per_class
            chosen = files[:cut] if name == "train" else files[cut : cut + profile.val_per_class]
            if not chosen:
                raise RelaError(f"{class_dir} has {len(files)} images: too few for {cut} train and {profile.val_per_class} validation images")
            (partial / class_dir.name).mkdir(parents=True)
            for file in chosen:
                try:
                    os.link(file, partial / class_dir.name / file.name)
                except OSError:
                    shutil.copy2(file, partial / class_dir.name / file.name)
        os.replace(partial, split)


def benchmark_splits(data: Path | None, prepared: Path, profile: Profile) -> Splits:
    """The profile's splits, carved into ``prepared`` from ``data`` or from Fashion-MNIST.

    ``data`` holds ``train/`` and ``test/`` ImageFolders (``val/`` too, then all three are used
    as they are). Otherwise the train split (``data/train``, or Fashion-MNIST's first
    ``limit_per_class + val_per_class`` train images per class in IDX order, written with
    :func:`prepare_fashion_mnist`) is cut per class (:func:`_carve`): its first ``limit_per_class``
    images form ``train``, the next ``val_per_class`` form ``val``; disjoint by construction.

    Raises:
        RelaError: ``data`` lacks ``train/`` or ``test/``, or a class has too few images.
    """
    if data is not None:
        for split in (data / "train", data / "test"):
            if not split.is_dir():
                raise RelaError(f"--data {data} has no {split.name}/ ImageFolder")
        if (data / "val").is_dir():
            return Splits(data / "train", data / "val", data / "test")
    splits = Splits(prepared / "train", prepared / "val", prepared / "test" if data is None else data / "test")
    if splits.train.is_dir() and splits.val.is_dir() and splits.test.is_dir():
        return splits
    if data is None:
        source = prepared / "source"
        limit = None if profile.limit_per_class is None else profile.limit_per_class + profile.val_per_class
        if not (source / "test").is_dir():
            prepare_fashion_mnist(source, limit_per_class=limit, overwrite=True)
        _carve(source / "train", splits, profile)
        if not splits.test.exists():
            os.replace(source / "test", splits.test)
    else:
        _carve(data / "train", splits, profile)
    return splits


def train_config(
    profile: Profile,
    *,
    shards: str,
    out_dir: Path,
    seed: int,
    epochs: int | None = None,
    budget: float = 1.0,
    subset: str = "random",
    rela_schedule: str = "none",
    device: str = "auto",
    num_workers: int | None = None,
    **overrides: Any,
) -> TrainConfig:
    """The :class:`TrainConfig` of one benchmark run: the profile's student and optimiser for
    ``epochs`` (default the profile's) at ``budget`` (``--data-ratio``), resuming from the run's
    last checkpoint when there is one. ``overrides`` replace any :class:`TrainConfig` field."""
    resume = (out_dir / "checkpoints" / "last.pt").exists()
    fields = dict(
        shards=shards,
        out_dir=out_dir,
        method="byol",
        backbone=profile.backbone,
        cifar_stem=profile.cifar_stem,
        image_size=profile.image_size,
        epochs=epochs or profile.epochs,
        batch_size=profile.batch_size,
        data_ratio=budget,
        subset=subset,
        rela_schedule=rela_schedule,
        transfer=profile.transfer,
        lr=profile.lr,
        weight_decay=profile.weight_decay,
        lr_schedule=profile.lr_schedule,
        warmup_epochs=profile.warmup_epochs,
        teacher_momentum=profile.teacher_momentum,
        crop_min_scale=profile.crop_min_scale,
        device=device,
        precision=profile.precision,
        augment=profile.augment,
        num_workers=num_workers,
        seed=seed,
        resume=resume,
        overwrite=not resume,
        progress=False,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def run_fields(summary: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    """What every benchmark keeps of one run: from ``eval``'s result, the linear probe and k-NN
    top-1 (fractions) and the few-label means; from ``train``'s ``summary.json``, the seconds,
    steps, budget fraction and ReLA switch step."""
    return {
        "linear_probe_top1": evaluation["linear_probe"]["top1"],
        "knn_top1": evaluation["knn"]["top1"],
        "few_label": _few_label_means(evaluation),
        "train_seconds": summary["wall_clock_s"],
        "eval_seconds": round(evaluation["timings_s"]["total"], 2),
        "steps": summary["budget"]["steps"],
        "budget_fraction": summary["budget"]["fraction"],
        "rela_switch_step": summary["rela_switch_step"],
    }


def _slug(prior: str) -> str:
    return prior.replace("*", "-star")


def stage_one_checksums(manifest: dict[str, Any]) -> dict[str, Any]:
    """The SHA-256 digests a shard set's manifest records: ``{"shards": {name: sha256},
    "transport": sha256, "scores": sha256}``. Shards are byte-reproducible (fixed tar mtime, seeded
    embedding), so two machines with the same kind of CPU that embed the same split with the same
    prior and software agree on every digest (another instruction set rounds differently:
    docs/shards.md); a run trained on one set compares exactly with a run trained on another only if
    they do."""
    return {
        "shards": {shard["name"]: shard["sha256"] for shard in manifest["shards"]},
        "transport": manifest["transport"]["sha256"],
        "scores": manifest["scores"]["sha256"],
    }


class BudgetTable:
    """Runs the floors, the convergence study and the cells into ``out`` and aggregates them;
    every step is skipped when already done.

    Args:
        profile: what to compute.
        out: output directory; it must be empty or hold a run with the same ``settings.json``.
        data: a directory with ``train/`` and ``test/`` ImageFolders (and optionally ``val/``), or
            None to prepare Fashion-MNIST into ``out/data``.
        device: ``auto``, ``cpu`` or ``cuda[:N]`` for embed, train and eval.
        num_workers: DataLoader workers for train and eval (None: the stages' defaults).
        cells: the cells to run, BYOL* first (default: :func:`table_cells`).

    Raises:
        RelaError: ``out`` holds a benchmark with different settings; or any stage's error.
    """

    def __init__(self, profile: Profile, out: Path, data: Path | None, device: str = "auto", num_workers: int | None = None, cells: list[Cell] | None = None):
        self.profile, self.out, self.device, self.num_workers = profile, out, device, num_workers
        self.data = data
        self.cells = cells or table_cells(profile)
        if self.cells[0].key != REFERENCE_KEY:
            raise RelaError(f"the first cell must be the reference {REFERENCE_KEY}")
        self.runs_total = len(self.cells) * profile.seeds

    # -- set-up -------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The inputs that results depend on; a rerun into the same ``out`` must match them."""
        profile = dataclasses.asdict(self.profile)
        profile["few_label"] = list(profile["few_label"])
        return {"profile": profile, "data": str(self.data) if self.data else "fashion-mnist (prepared here)", "cells": [c.key for c in self.cells]}

    def check_out_dir(self) -> None:
        """Create ``out`` or check that it holds this very benchmark (so resuming is safe)."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "settings.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved != self.settings():
                raise RelaError(f"{self.out} holds a budget table with other settings ({path}); use another --out")
        elif any(self.out.iterdir()):
            raise RelaError(f"{self.out} is not empty and holds no budget table; use an empty or new --out")
        else:
            write_json_atomic(path, self.settings())

    def data_dirs(self) -> Splits:
        """The train, validation and test ImageFolders, preparing Fashion-MNIST first if needed."""
        return benchmark_splits(self.data, self.out / "data", self.profile)

    def eval_config(self, checkpoint: Path, train_dir: Path, test_dir: Path, seed: int) -> EvalConfig:
        """``eval``'s settings for one run: the profile's probe and few-label protocol."""
        p = self.profile
        return EvalConfig(
            checkpoint=checkpoint,
            train_dir=train_dir,
            test_dir=test_dir,
            device=self.device,
            num_workers=self.num_workers,
            probe_epochs=p.probe_epochs,
            few_label=p.few_label,
            few_label_draws=p.few_label_draws,
            seed=seed,
            progress=False,
        )

    # -- stage one ----------------------------------------------------------------------------
    def stage_one(self, prior: str, train_dir: Path) -> dict[str, Any]:
        """Shard set of ``prior`` (embedding it unless its manifest exists) and its cost.

        Returns:
            ``{"shards": str, "prior": str, "seconds": embed + transport + scores,
            "total_seconds": the whole ``embed`` command, "timings_s": {...},
            "checksums": stage_one_checksums(manifest)}``.
        """
        shards = self.out / "stage_one" / _slug(prior)
        manifest_path = shards / "manifest.json"
        if not manifest_path.exists():
            spec, image_size = self.prior_spec(prior)
            tqdm.write(f"stage one: embedding {train_dir} with the {PRIOR_LABELS[prior]} prior ({spec})")
            run_embed(
                EmbedConfig(
                    data_dir=train_dir,
                    prior=spec,
                    out_dir=shards,
                    image_size=image_size,
                    device=self.device,
                    seed=0,
                    overwrite=True,
                    progress=False,
                    shard_size=10_000,
                    **({} if self.num_workers is None else {"num_workers": self.num_workers}),
                )
            )
        manifest = json.loads(manifest_path.read_text())
        timings = manifest["timings_s"]
        return {
            "shards": str(shards),
            "prior": manifest["prior"]["spec"],
            "seconds": round(timings["embed"] + timings["transport"] + timings["scores"], 3),
            "total_seconds": timings["total"],
            "timings_s": timings,
            "checksums": stage_one_checksums(manifest),
        }

    def prior_spec(self, prior: str) -> tuple[str, int | None]:
        """``(prior spec, image size)`` of ``prior`` for ``embed`` (seed 0)."""
        if prior == RANDOM_PRIOR:
            return f"random:{self.profile.prior_arch}", self.profile.prior_image_size
        return f"checkpoint:{self.byol_star_backbone()}", None

    def byol_star_backbone(self) -> Path:
        """The seed-0 BYOL* backbone (the ``checkpoint:`` prior); it must have been trained."""
        path = self.run_dir(self.cells[0], 0) / "train" / "backbone.pt"
        if not path.exists():
            raise RelaError(f"the BYOL* prior needs {path}, which the BYOL* seed-0 run writes")
        return path

    # -- floors -------------------------------------------------------------------------------
    def floor_features(self, floor: Floor, seed: int) -> tuple[nn.Module, Any]:
        """The model and preprocessing whose frozen features make ``floor`` (seed ``seed``)."""
        p = self.profile
        if floor.key == "floor-pixels":
            return nn.Flatten(), eval_preprocessing(p.image_size)
        if floor.key == "floor-untrained":
            torch.manual_seed(seed)  # exactly the initialisation ``train`` gives the student of this seed
            return build_backbone(p.backbone, cifar_stem=p.cifar_stem), eval_preprocessing(p.image_size)
        if floor.key == "floor-prior-random":
            prior = load_prior(f"random:{p.prior_arch}", seed=0, image_size=p.prior_image_size)
            return prior.model, prior.preprocessing
        prior = load_prior(f"checkpoint:{self.byol_star_backbone()}")
        return prior.model, prior.preprocessing

    def run_floor(self, floor: Floor, seed: int, splits: Splits) -> dict[str, Any]:
        """Probe one floor on the test split like a student; cached as ``floors/<key>/seed<k>.json``.

        Returns:
            ``{"cell": key, "seed", "linear_probe_top1", "knn_top1", "few_label": {...},
            "feature_dim", "eval_seconds"}``.
        """
        path = self.out / "floors" / floor.key / f"seed{seed}.json"
        if path.exists():
            return json.loads(path.read_text())
        started = time.perf_counter()
        model, preprocessing = self.floor_features(floor, seed)
        train_index, test_index = scan_labelled_splits(splits.train, splits.test)
        config = self.eval_config(Path("-"), splits.train, splits.test, seed)
        common = dict(device=self.device, batch_size=config.batch_size, num_workers=config.resolved_num_workers())
        train_x, train_y = extract_features(model, train_index, preprocessing, **common)
        test_x, test_y = extract_features(model, test_index, preprocessing, **common)
        device = resolve_device(self.device)
        protocols = evaluate_features(train_x, train_y, test_x, test_y, num_classes=len(train_index.class_names), config=config, device=device)
        result = {
            "cell": floor.key,
            "seed": seed,
            "linear_probe_top1": protocols["linear_probe"]["top1"],
            "knn_top1": protocols["knn"]["top1"],
            "few_label": _few_label_means(protocols),
            "feature_dim": int(train_x.shape[1]),
            "eval_seconds": round(time.perf_counter() - started, 2),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, result)
        return result

    # -- the convergence study ----------------------------------------------------------------
    def convergence(self, shards: str, splits: Splits) -> tuple[int, list[dict[str, Any]]]:
        """BYOL (seed 0, 100% budget) at E, 2E, 4E ... epochs, each scored on the validation split,
        until doubling adds under :data:`PLATEAU_GAIN` of linear probe or ``max_epochs`` is reached.

        Each run is the table's BYOL* seed-0 run at that epoch count (``runs/e<E>/byol-100/seed0``),
        so the plateau run is reused as BYOL*. Scores are cached in ``convergence/e<E>.json``.

        Returns:
            ``(plateau epochs, [{"epochs", "val_linear_probe_top1", "val_knn_top1", "steps",
            "train_seconds"}, ...])``: the plateau is the last E whose doubling adds under the
            gain, else the largest E run.
        """
        p = self.profile
        if not p.convergence:
            return p.epochs, []
        points: list[dict[str, Any]] = []
        epochs = p.epochs
        while True:
            points.append(self.convergence_point(epochs, shards, splits))
            tqdm.write(f"convergence: BYOL {epochs} epochs: val linear probe {points[-1]['val_linear_probe_top1']:.2%}, k-NN {points[-1]['val_knn_top1']:.2%}")
            if len(points) >= 2 and points[-1]["val_linear_probe_top1"] - points[-2]["val_linear_probe_top1"] < PLATEAU_GAIN:
                return points[-2]["epochs"], points
            if 2 * epochs > p.max_epochs:
                return epochs, points
            epochs *= 2

    def convergence_point(self, epochs: int, shards: str, splits: Splits) -> dict[str, Any]:
        path = self.out / "convergence" / f"e{epochs}.json"
        if path.exists():
            return json.loads(path.read_text())
        train_out = self.run_dir(self.cells[0], 0, epochs) / "train"
        summary = self.train(train_out, self.cells[0], 0, shards, epochs)
        evaluation = run_eval(self.eval_config(Path(summary["checkpoint"]), splits.train, splits.val, 0))
        point = {
            "epochs": epochs,
            "val_linear_probe_top1": evaluation["linear_probe"]["top1"],
            "val_knn_top1": evaluation["knn"]["top1"],
            "val_few_label": _few_label_means(evaluation),
            "steps": summary["budget"]["steps"],
            "train_seconds": summary["wall_clock_s"],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, point)
        return point

    # -- runs ---------------------------------------------------------------------------------
    def run_dir(self, cell: Cell, seed: int, epochs: int | None = None) -> Path:
        """``runs/e<epochs>/<cell>/seed<k>`` (default: the table's epochs, known after the study)."""
        return self.out / "runs" / f"e{epochs or self.epochs}" / cell.key / f"seed{seed}"

    def train(self, train_out: Path, cell: Cell, seed: int, shards: str, epochs: int, **settings: Any) -> dict[str, Any]:
        """Train (or resume, or reuse) one run; returns its ``summary.json``. ``settings``
        replace :class:`TrainConfig` fields (e.g. ``method``)."""
        summary_path = train_out / "summary.json"
        if not summary_path.exists():
            overrides = ({} if cell.transfer is None else {"transfer": cell.transfer}) | settings
            run_train(
                train_config(
                    self.profile,
                    shards=shards,
                    out_dir=train_out,
                    seed=seed,
                    epochs=epochs,
                    budget=cell.budget,
                    subset=cell.subset,
                    rela_schedule=cell.schedule if cell.prior else "none",
                    device=self.device,
                    num_workers=self.num_workers,
                    **overrides,
                )
            )
        return json.loads(summary_path.read_text())

    def run_one(self, cell: Cell, seed: int, shards: str, splits: Splits) -> dict[str, Any]:
        """Train (or resume) one run and evaluate it on the test split; saved as ``result.json``.

        Returns:
            ``{"cell", "seed", "linear_probe_top1", "knn_top1" (fractions in [0, 1]), "few_label"
            ({n: {"linear_probe", "knn"}}, means over draws), "train_seconds", "eval_seconds",
            "steps", "images_seen", "budget_fraction", "rela_switch_step", "rela_loss", "subset"
            (the sampler's description), "epochs"}``.
        """
        run = self.run_dir(cell, seed)
        summary = self.train(run / "train", cell, seed, shards, self.epochs)
        evaluation = run_eval(self.eval_config(Path(summary["checkpoint"]), splits.train, splits.test, seed))
        result = {
            "cell": cell.key,
            "seed": seed,
            **run_fields(summary, evaluation),
            "images_seen": summary["budget"]["images_seen"],
            "rela_loss": summary["rela_loss"],
            "subset": summary["subset"],
            "epochs": self.epochs,
        }
        write_json_atomic(run / "result.json", result)
        return result

    def run(self) -> dict[str, Any]:
        """Run the floors, the convergence study, every missing cell and stage one, then write
        the result files (rewritten after every finished run, so a partial table is readable).

        Returns:
            the ``results.json`` payload.
        """
        started = time.perf_counter()
        machine = machine_info(self.device)  # the commit this invocation starts from
        self.check_out_dir()
        splits = self.data_dirs()
        stage_one = {RANDOM_PRIOR: self.stage_one(RANDOM_PRIOR, splits.train)}
        floor_results = [self.run_floor(f, seed, splits) for f in floors(self.profile)[:3] for seed in range(f.seeds)]
        self.epochs, convergence = self.convergence(stage_one[RANDOM_PRIOR]["shards"], splits)
        results: list[dict[str, Any]] = []

        def write(final: bool) -> dict[str, Any]:
            for prior in {c.prior for c in self.cells if c.prior} - set(stage_one):
                if (self.out / "stage_one" / _slug(prior) / "manifest.json").exists():  # embedded before a resume
                    stage_one[prior] = self.stage_one(prior, splits.train)
            payload = summarise(self.profile, self.cells, results, stage_one, floor_results, convergence, self.epochs, partial=not final)
            payload["machine"] = machine
            payload["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""
            payload["wall_clock_s_this_invocation"] = round(time.perf_counter() - started, 1)
            write_outputs(self.out, payload)
            return payload

        with tqdm(total=self.runs_total, desc="budget table", unit="run", dynamic_ncols=True) as bar:
            # Seeds outermost: after the first pass every cell has one seed, a usable table early.
            for seed in range(self.profile.seeds):
                for cell in self.cells:
                    saved = self.run_dir(cell, seed) / "result.json"
                    if saved.exists():
                        results.append(json.loads(saved.read_text()))
                        bar.update()
                        continue
                    prior = cell.prior or RANDOM_PRIOR  # the baselines read the same shards, targets unused
                    if prior not in stage_one:
                        stage_one[prior] = self.stage_one(prior, splits.train)
                    result = self.run_one(cell, seed, stage_one[prior]["shards"], splits)
                    results.append(result)
                    bar.update()
                    tqdm.write(
                        f"{cell.label} @ {cell.budget:.0%} seed {seed}: linear probe {result['linear_probe_top1']:.2%}, "
                        f"k-NN {result['knn_top1']:.2%} (train {result['train_seconds']:.0f} s, eval {result['eval_seconds']:.0f} s)"
                    )
                    if cell.key == REFERENCE_KEY and seed == 0:
                        floor_results.append(self.run_floor(floors(self.profile)[3], 0, splits))
                    write(final=False)
        if not any(r["cell"] == "floor-prior-byol-star" for r in floor_results):
            floor_results.append(self.run_floor(floors(self.profile)[3], 0, splits))
        for prior in sorted({RANDOM_PRIOR} | {c.prior for c in self.cells if c.prior}):
            if prior not in stage_one:
                stage_one[prior] = self.stage_one(prior, splits.train)
        return write(final=True)


# -- aggregation and outputs ------------------------------------------------------------------
def _few_label_means(evaluation: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{n: {"linear_probe": mean over draws, "knn": mean over draws}}`` of an evaluation."""
    return {n: {"linear_probe": few["linear_probe"]["top1"], "knn": few["knn"]["top1"]} for n, few in evaluation.get("few_label", {}).items()}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _accuracy_columns(runs: list[dict[str, Any]], few_label: tuple[int, ...]) -> dict[str, Any]:
    """Mean and std over runs of the full and few-label accuracies (column names as in the CSV)."""
    columns: dict[str, Any] = {}
    probe, knn = mean_std([r["linear_probe_top1"] for r in runs]), mean_std([r["knn_top1"] for r in runs])
    columns.update(linear_probe_mean=probe[0], linear_probe_std=probe[1], knn_mean=knn[0], knn_std=knn[1])
    for n in few_label:
        for metric, name in (("linear_probe", "probe"), ("knn", "knn")):
            values = [r["few_label"][str(n)][metric] for r in runs if str(n) in r.get("few_label", {})]
            mean, std = mean_std(values) if values else (math.nan, math.nan)
            columns[f"{name}_{n}_mean"], columns[f"{name}_{n}_std"] = mean, std
    return columns


def summarise(
    profile: Profile,
    cells: list[Cell],
    results: list[dict[str, Any]],
    stage_one: dict[str, dict[str, Any]],
    floor_results: list[dict[str, Any]] = (),
    convergence: list[dict[str, Any]] = (),
    epochs: int | None = None,
    partial: bool = False,
) -> dict[str, Any]:
    """Aggregate per-run results into one row per floor and per cell.

    Compute fractions are relative to BYOL*'s means: ``images_seen / BYOL* images_seen`` (the
    paper's budget) and ``train_seconds / BYOL* train_seconds`` (measured wall-clock).

    Args:
        partial: a table mid-run: cells without results are left out (else an error).

    Raises:
        RelaError: a cell has no results and ``partial`` is false, or BYOL* has none.
    """
    by_cell: dict[str, list[dict[str, Any]]] = {c.key: [] for c in cells}
    for r in results:
        by_cell[r["cell"]].append(r)
    missing = [k for k, rows in by_cell.items() if not rows]
    if (missing and not partial) or not by_cell[REFERENCE_KEY]:
        raise RelaError(f"cells without results: {', '.join(missing)}")
    reference = by_cell[REFERENCE_KEY]
    ref_images = statistics.fmean(r["images_seen"] for r in reference)
    ref_seconds = statistics.fmean(r["train_seconds"] for r in reference)
    rows = []
    for floor in floors(profile):
        runs = [r for r in floor_results if r["cell"] == floor.key]
        if runs:
            rows.append(
                {
                    "kind": "floor",
                    "cell": floor.key,
                    "label": f"floor: {floor.label}",
                    "configuration": "floor",
                    "seeds": len(runs),
                    **_accuracy_columns(runs, profile.few_label),
                }
            )
    for cell in cells:
        runs = sorted(by_cell[cell.key], key=lambda r: r["seed"])
        if not runs:
            continue
        seconds = statistics.fmean(r["train_seconds"] for r in runs)
        images = statistics.fmean(r["images_seen"] for r in runs)
        prior_cost = stage_one[cell.prior]["seconds"] if cell.prior else 0.0
        rows.append(
            {
                "kind": "cell",
                "cell": cell.key,
                "label": cell.label,
                "configuration": cell.configuration,
                "variant": cell.variant,
                "budget": cell.budget,
                "prior": cell.prior or "",
                "subset": cell.subset,
                "schedule": cell.schedule if cell.prior else "",
                "transfer": (cell.transfer or profile.transfer) if cell.prior else "",
                "seeds": len(runs),
                "epochs": epochs,
                **_accuracy_columns(runs, profile.few_label),
                "train_seconds_mean": round(seconds, 2),
                "images_seen": int(round(images)),
                "compute_fraction": round(images / ref_images, 4),
                "wall_clock_fraction": round(seconds / ref_seconds, 4),
                "stage_one_seconds": prior_cost,
                "stage_one_fraction": round(prior_cost / ref_seconds, 4),
                "rela_switched_runs": sum(r["rela_switch_step"] is not None for r in runs) if cell.prior else None,
                "rela_switch_steps": " ".join("never" if r["rela_switch_step"] is None else str(r["rela_switch_step"]) for r in runs) if cell.prior else "",
            }
        )
    profile_dict = dataclasses.asdict(profile)
    profile_dict["few_label"] = list(profile.few_label)
    return {
        "profile": profile_dict,
        "epochs": epochs,
        "partial": partial,
        "cells": rows,
        "convergence": list(convergence),
        "runs": sorted(results, key=lambda r: (r["cell"], r["seed"])),
        "floors": list(floor_results),
        "stage_one": stage_one,
    }


def csv_fields(few_label: tuple[int, ...]) -> tuple[str, ...]:
    """The columns of ``results.csv`` (``kind`` tells floors from cells)."""
    few = tuple(f"{name}_{n}_{stat}" for n in few_label for name in ("probe", "knn") for stat in ("mean", "std"))
    return (
        "kind",
        "cell",
        "label",
        "budget",
        "prior",
        "subset",
        "schedule",
        "transfer",
        "seeds",
        "epochs",
        "linear_probe_mean",
        "linear_probe_std",
        "knn_mean",
        "knn_std",
        *few,
        "train_seconds_mean",
        "images_seen",
        "compute_fraction",
        "wall_clock_fraction",
        "stage_one_seconds",
        "stage_one_fraction",
        "rela_switched_runs",
        "rela_switch_steps",
    )


def _pm(row: dict[str, Any], prefix: str) -> str:
    mean, std = row.get(f"{prefix}_mean"), row.get(f"{prefix}_std")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The cells as a GitHub Markdown table (accuracies in %, mean +- std over seeds)."""
    lines = [
        "| configuration | budget | seeds | linear probe top-1 | k-NN top-1 | training wall-clock | wall-clock / BYOL* | images seen (/ BYOL*) | stage one (s) | stage one / BYOL* | ReLA switch steps |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if r.get("kind", "cell") != "cell":
            continue
        stage_one = f"{r['stage_one_seconds']:.1f}" if r["prior"] else "-"
        stage_one_fraction = f"{r['stage_one_fraction']:.1%}" if r["prior"] else "-"
        switches = r.get("rela_switch_steps") or "-"
        lines.append(
            f"| {r['label']} | {r['budget']:.0%} | {r['seeds']} | {_pm(r, 'linear_probe')} | {_pm(r, 'knn')} | {r['train_seconds_mean']:.0f} s "
            f"| {r['wall_clock_fraction']:.2f} | {r['images_seen']:,} ({r['compute_fraction']:.1%}) | {stage_one} | {stage_one_fraction} | {switches} |"
        )
    return "\n".join(lines) + "\n"


def markdown_report(payload: dict[str, Any]) -> str:
    """``results.md``: floors, the convergence study, the table and the few-label table."""
    few_label = tuple(payload["profile"]["few_label"])
    rows = payload["cells"]
    parts = ["## Floors (test split; no self-supervised training)\n", "| floor | seeds | linear probe top-1 | k-NN top-1 |", "| --- | ---: | ---: | ---: |"]
    parts += [f"| {r['label'].removeprefix('floor: ')} | {r['seeds']} | {_pm(r, 'linear_probe')} | {_pm(r, 'knn')} |" for r in rows if r["kind"] == "floor"]
    if payload["convergence"]:
        parts += [
            "",
            f"## Convergence of BYOL (seed 0, validation split); BYOL* = {payload['epochs']} epochs\n",
            "| epochs | steps | val linear probe | val k-NN | train wall-clock |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        parts += [
            f"| {c['epochs']} | {c['steps']} | {100 * c['val_linear_probe_top1']:.2f} | {100 * c['val_knn_top1']:.2f} | {c['train_seconds']:.0f} s |"
            for c in payload["convergence"]
        ]
    parts += [
        "",
        f"## Table ({payload['epochs']} epochs at 100% budget; test split; mean ± std over seeds)"
        + (" - partial, still running" if payload.get("partial") else "")
        + "\n",
        markdown_table(rows).rstrip(),
    ]
    if few_label:
        header = " | ".join(f"{name} {n}/class" for n in few_label for name in ("linear probe", "k-NN"))
        parts += [
            "",
            "## Few labels (mean over draws, then mean ± std over seeds)\n",
            f"| row | budget | seeds | {header} |",
            "| --- | ---: | ---: | " + " | ".join("---:" for _ in range(2 * len(few_label))) + " |",
        ]
        for r in rows:
            cols = " | ".join(_pm(r, f"{name}_{n}") for n in few_label for name in ("probe", "knn"))
            budget = f"{r['budget']:.0%}" if r["kind"] == "cell" else "-"
            parts.append(f"| {r['label']} | {budget} | {r['seeds']} | {cols} |")
    return "\n".join(parts) + "\n"


def plot_budget_curve(rows: list[dict[str, Any]], path: Path) -> None:
    """Top-1 against the fraction of BYOL* compute (images seen), one line per configuration.

    Two panels (linear probe, k-NN); error bars are one standard deviation over seeds; BYOL* is
    the end point of the BYOL line and a dotted reference line; single-setting variants (subset
    rules, schedule, transfer) are single markers; floors are dashed horizontal lines. Written
    atomically as PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [r for r in rows if r["kind"] == "cell"]
    floor_rows = [r for r in rows if r["kind"] == "floor"]
    reference = cells[0]
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in cells:
        lines.setdefault(r["label"] if r.get("variant") else r["configuration"], []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    for ax, metric, title in ((axes[0], "linear_probe", "linear probe"), (axes[1], "knn", "k-NN")):
        for name, points in lines.items():
            points = sorted(points, key=lambda r: r["compute_fraction"])
            xs = [r["compute_fraction"] for r in points]
            ys = [100 * r[f"{metric}_mean"] for r in points]
            errs = [100 * r[f"{metric}_std"] for r in points]
            style = "-o" if len(points) > 1 else "D"
            ax.errorbar(xs, ys, yerr=errs, fmt=style, capsize=3, label=name, markersize=5)
        ax.axhline(100 * reference[f"{metric}_mean"], color="grey", linestyle=":", linewidth=1, label="BYOL*")
        for i, r in enumerate(floor_rows):
            ax.axhline(100 * r[f"{metric}_mean"], color=f"C{(i + 6) % 10}", linestyle="--", linewidth=1, label=r["label"])
        ax.set_xscale("log")
        ax.set_xticks([0.1, 0.2, 0.5, 1.0], labels=["10%", "20%", "50%", "100%"])
        ax.minorticks_off()
        ax.set_xlabel("fraction of BYOL* compute (images seen)")
        ax.set_ylabel(f"{title} top-1 (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())


def plot_convergence(points: list[dict[str, Any]], plateau: int, path: Path) -> None:
    """BYOL's validation linear probe and k-NN against epochs (the convergence study), the plateau
    run marked; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    epochs = [p["epochs"] for p in points]
    for key, label in (("val_linear_probe_top1", "linear probe"), ("val_knn_top1", "k-NN")):
        ax.plot(epochs, [100 * p[key] for p in points], "-o", label=label)
    ax.axvline(plateau, color="grey", linestyle=":", linewidth=1, label=f"BYOL* ({plateau} epochs)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(epochs, labels=[str(e) for e in epochs])
    ax.minorticks_off()
    ax.set_xlabel("epochs (100% budget, seed 0)")
    ax.set_ylabel("validation top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())


def write_outputs(out: Path, payload: dict[str, Any]) -> None:
    """Write ``results.json``, ``results.csv``, ``results.md``, ``budget_curve.png`` and (after a
    convergence study) ``convergence.png`` atomically."""
    rows = payload["cells"]
    write_json_atomic(out / "results.json", payload)
    with atomic_write(out / "results.csv", "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_fields(tuple(payload["profile"]["few_label"])), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_write(out / "results.md", "w") as handle:
        handle.write(markdown_report(payload))
    plot_budget_curve(rows, out / "budget_curve.png")
    if payload["convergence"]:
        plot_convergence(payload["convergence"], payload["epochs"], out / "convergence.png")


def machine_info(device: str) -> dict[str, Any]:
    """Host, accelerator, versions and the git commit the benchmark ran from."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(
            subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    cuda = torch.cuda.is_available() and device != "cpu"
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "accelerator": torch.cuda.get_device_name(0) if cuda else None,
        "commit": commit,
        "dirty": dirty,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--out", type=Path, required=True, help="output directory; rerun the same command to resume")
    parser.add_argument("--data", type=Path, default=None, help="directory with train/ and test/ ImageFolders (default: prepare Fashion-MNIST into OUT/data)")
    parser.add_argument("--tiny", action="store_true", help="shrink the profile to seconds per run (tests)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: the profile's 3)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every run, skipping the convergence study (default: the study's plateau)")
    parser.add_argument("--cells", default=None, help="comma-separated cell keys to run (BYOL*, byol-100, is always run); default: all")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=None)
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.tiny:
        profile = tiny(profile)
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error("--seeds must be >= 1")
        profile = dataclasses.replace(profile, seeds=args.seeds)
    if args.epochs is not None:
        if args.epochs < 1:
            parser.error("--epochs must be >= 1")
        profile = dataclasses.replace(profile, epochs=args.epochs, convergence=False)
    try:
        table = BudgetTable(
            profile, args.out, args.data, device=args.device, num_workers=args.num_workers, cells=select_cells(args.cells, profile) if args.cells else None
        )
        payload = table.run()
    except RelaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; finished runs are kept: rerun the same command to resume ({args.out})", file=sys.stderr)
        return 130
    print(markdown_report(payload), end="")
    print(f"wrote {args.out}/results.{{csv,json,md}} and budget_curve.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
