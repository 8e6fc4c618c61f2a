"""Accuracy against compute budget: the paper's Table 1 protocol on real Fashion-MNIST.

Cells (each trained with 3 seeds, then evaluated with ``eval``'s linear probe and k-NN on the test
split; the probe and the k-NN bank use the benchmark's train split):

* ``BYOL*``: BYOL at 100% budget, the reference;
* ``BYOL``: BYOL at 10%, 20% and 50% budget on random dynamic subsets (the paper's baselines);
* ``BYOL + ReLA, Rand. prior``: 10/20/50% with a randomly initialised ResNet-18 as the prior;
* ``BYOL + ReLA, BYOL* prior``: 10/20/50% with the seed-0 BYOL* backbone of this very benchmark as
  a ``checkpoint:`` prior (the analogue of the paper's CIFAR-10-trained ResNet-18 prior);
* ``BYOL + ReLA, Rand. prior`` at 20% with each score-driven subset rule (``density``, ``dedup``)
  beside its ``random``-subset cell.

Budget is the paper's (MISSION.md step 5): the fraction of BYOL*'s optimisation steps, i.e. the same
epochs on ``ratio * N`` fresh random samples per epoch. The ReLA schedule is the authors' adaptive
one. Stage-one cost (embed + transport + scores, from the shard set's manifest) is reported
separately, and as a fraction of BYOL*'s mean training wall-clock. The BYOL* prior's own training is
not counted in its stage-one cost: like the paper's pretrained priors it is treated as a given model.

Profiles:

* ``cpu``: ConvNet student at 32 px, the first 1,000 images of each class of the train split (10,000
  images; the test split is complete, 10,000), 10 epochs at 100% budget, batch 128; about an hour on
  2 CPU cores.
* ``gpu``: ResNet-18 with the CIFAR stem at 32 px on the full train split (60,000), the paper's
  optimiser (AdamW 1e-3, wd 0.01, batch 128, bf16 autocast), 100 epochs at 100% budget.

``--tiny`` shrinks either profile to seconds per run (for tests): 2 epochs, probe 10 epochs, batch
16, 20 images per class when the data is prepared here. ``--epochs`` and ``--cells`` (a selection of
cells; BYOL* is always run) serve follow-up experiments, e.g. a longer schedule for a few cells.

Outputs in ``--out``: ``results.csv`` and ``results.json`` (one row per cell, plus every run),
``results.md`` (the Markdown table), ``budget_curve.png`` (top-1 against the fraction of BYOL*
compute, error bars one standard deviation over seeds). Every finished run is recorded in
``runs/<cell>/seed<k>/result.json``; rerunning the same command skips those, resumes a training run
that was killed from its last finished epoch, and redoes only what is missing.

Example (the README's numbers)::

    python benchmarks/budget_table.py --profile cpu --out runs/budget-cpu
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rela_pipeline.errors import RelaError
from rela_pipeline.fileio import atomic_write, write_json_atomic
from rela_pipeline.stages.embed import EmbedConfig, run_embed
from rela_pipeline.stages.evaluate import EvalConfig, run_eval
from rela_pipeline.stages.prepare import prepare_fashion_mnist
from rela_pipeline.stages.train import TrainConfig, run_train

BUDGETS = (0.1, 0.2, 0.5)
SCORE_SUBSET_RULES = ("density", "dedup")
SCORE_RULE_BUDGET = 0.2
RANDOM_PRIOR = "random"
BYOL_STAR_PRIOR = "byol*"
PRIOR_LABELS = {RANDOM_PRIOR: "Rand.", BYOL_STAR_PRIOR: "BYOL*"}
REFERENCE_KEY = "byol-100"


@dataclass(frozen=True)
class Profile:
    """Everything that fixes what a benchmark run computes (saved as ``settings.json``).

    Attributes:
        name: ``cpu`` or ``gpu`` (``-tiny`` appended for ``--tiny``).
        backbone, cifar_stem, image_size: the student (image_size in pixels).
        limit_per_class: images per class of the train split (the test split is always complete);
            ``None``: the whole split.
        epochs: epochs of every run (budget scales the data per epoch, not the epochs).
        batch_size: images per step.
        lr, weight_decay: AdamW.
        precision: ``train``'s ``--precision`` (auto: bf16 on CUDA and on CPUs with native bf16).
        augment: ``train``'s ``--augment`` (device: batched views on the training device; pil).
        prior_arch, prior_image_size: the ``random:`` prior (torchvision architecture, pixels).
        probe_epochs: linear-probe epochs (paper: 100).
        seeds: seeds per cell.
    """

    name: str
    backbone: str
    cifar_stem: bool
    image_size: int
    limit_per_class: int | None
    epochs: int
    batch_size: int
    lr: float = 1e-3
    weight_decay: float = 0.01
    precision: str = "auto"
    augment: str = "device"
    prior_arch: str = "resnet18"
    prior_image_size: int = 32
    probe_epochs: int = 100
    seeds: int = 3


PROFILES = {
    "cpu": Profile(name="cpu", backbone="convnet", cifar_stem=False, image_size=32, limit_per_class=1000, epochs=10, batch_size=128),
    "gpu": Profile(name="gpu", backbone="resnet18", cifar_stem=True, image_size=32, limit_per_class=None, epochs=100, batch_size=128),
}


def tiny(profile: Profile) -> Profile:
    """``profile`` shrunk to seconds per run on a CPU; the student architecture is kept."""
    return dataclasses.replace(profile, name=profile.name + "-tiny", limit_per_class=20, epochs=2, batch_size=16, probe_epochs=10)


@dataclass(frozen=True)
class Cell:
    """One cell of the table: a configuration at one budget.

    Attributes:
        key: directory-safe identifier, e.g. ``byol-rela-random-20`` or ``byol-rela-random-20-density``.
        configuration: the plot line it belongs to, e.g. ``BYOL + ReLA, Rand. prior``.
        budget: fraction of BYOL*'s optimisation steps, in (0, 1].
        prior: ``None`` (no ReLA), ``"random"`` or ``"byol*"``.
        subset: subset rule of stage two (``random``, ``density``, ``dedup``).
    """

    key: str
    configuration: str
    budget: float
    prior: str | None
    subset: str = "random"

    @property
    def label(self) -> str:
        """Human-readable row name for the table."""
        if self.prior is None and self.budget == 1.0:
            return "BYOL*"
        name = self.configuration
        return name if self.subset == "random" else f"{name}, {self.subset} subsets"


def table_cells() -> list[Cell]:
    """The cells, in run order: BYOL* first (its seed-0 backbone is a prior), then by budget."""
    cells = [Cell(REFERENCE_KEY, "BYOL", 1.0, None)]
    for budget in BUDGETS:
        pct = round(budget * 100)
        cells.append(Cell(f"byol-{pct}", "BYOL", budget, None))
        for prior in (RANDOM_PRIOR, BYOL_STAR_PRIOR):
            cells.append(Cell(f"byol-rela-{_slug(prior)}-{pct}", f"BYOL + ReLA, {PRIOR_LABELS[prior]} prior", budget, prior))
    pct = round(SCORE_RULE_BUDGET * 100)
    for rule in SCORE_SUBSET_RULES:
        cells.append(Cell(f"byol-rela-random-{pct}-{rule}", f"BYOL + ReLA, {PRIOR_LABELS[RANDOM_PRIOR]} prior", SCORE_RULE_BUDGET, RANDOM_PRIOR, rule))
    return cells


def select_cells(keys: str) -> list[Cell]:
    """The cells named in the comma-separated ``keys``, in table order, BYOL* always included.

    Raises:
        RelaError: an unknown key (the message lists the known ones).
    """
    cells = table_cells()
    wanted = {k.strip() for k in keys.split(",") if k.strip()}
    unknown = wanted - {c.key for c in cells}
    if unknown:
        raise RelaError(f"unknown cell(s) {', '.join(sorted(unknown))}; cells are: {', '.join(c.key for c in cells)}")
    return [c for c in cells if c.key in wanted or c.key == REFERENCE_KEY]


def _slug(prior: str) -> str:
    return prior.replace("*", "-star")


class BudgetTable:
    """Runs the cells into ``out`` and aggregates them; every step is skipped when already done.

    Args:
        profile: what to compute.
        out: output directory; it must be empty or hold a run with the same ``settings.json``.
        data: a directory with ``train/`` and ``test/`` ImageFolders to use as they are, or None to
            prepare Fashion-MNIST into ``out/data`` (``profile.limit_per_class`` of the train split).
        device: ``auto``, ``cpu`` or ``cuda[:N]`` for embed, train and eval.
        num_workers: DataLoader workers for train and eval (None: the stages' defaults).
        cells: the cells to run, BYOL* first (default: :func:`table_cells`).

    Raises:
        RelaError: ``out`` holds a benchmark with different settings; or any stage's error.
    """

    def __init__(self, profile: Profile, out: Path, data: Path | None, device: str = "auto", num_workers: int | None = None, cells: list[Cell] | None = None):
        self.profile, self.out, self.device, self.num_workers = profile, out, device, num_workers
        self.data = data
        self.cells = cells or table_cells()
        if self.cells[0].key != REFERENCE_KEY:
            raise RelaError(f"the first cell must be the reference {REFERENCE_KEY}")
        self.runs_total = len(self.cells) * profile.seeds

    # -- set-up -------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The inputs that results depend on; a rerun into the same ``out`` must match them."""
        return {"profile": dataclasses.asdict(self.profile), "data": str(self.data) if self.data else "fashion-mnist (prepared here)", "cells": [c.key for c in self.cells]}

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

    def data_dirs(self) -> tuple[Path, Path]:
        """``(train, test)`` ImageFolders, preparing Fashion-MNIST first if needed."""
        root = self.data
        if root is None:
            root = self.out / "data"
            if not (root / "test").is_dir():
                prepare_fashion_mnist(root, limit_per_class=self.profile.limit_per_class, overwrite=True)
        train, test = root / "train", root / "test"
        for split in (train, test):
            if not split.is_dir():
                raise RelaError(f"--data {root} has no {split.name}/ ImageFolder")
        return train, test

    # -- stage one ----------------------------------------------------------------------------
    def stage_one(self, prior: str, train_dir: Path) -> dict[str, Any]:
        """Shard set of ``prior`` (embedding it unless its manifest exists) and its cost.

        Returns:
            ``{"shards": str, "prior": str, "seconds": embed + transport + scores,
            "total_seconds": the whole ``embed`` command, "timings_s": {...}}``.
        """
        shards = self.out / "stage_one" / _slug(prior)
        manifest_path = shards / "manifest.json"
        if not manifest_path.exists():
            if prior == RANDOM_PRIOR:
                spec, image_size = f"random:{self.profile.prior_arch}", self.profile.prior_image_size
            else:
                spec, image_size = f"checkpoint:{self.byol_star_backbone()}", None
            tqdm.write(f"stage one: embedding {train_dir} with the {PRIOR_LABELS[prior]} prior ({spec})")
            run_embed(EmbedConfig(
                data_dir=train_dir, prior=spec, out_dir=shards, image_size=image_size, device=self.device,
                seed=0, overwrite=True, progress=False, shard_size=10_000,
                **({} if self.num_workers is None else {"num_workers": self.num_workers}),
            ))
        manifest = json.loads(manifest_path.read_text())
        timings = manifest["timings_s"]
        return {
            "shards": str(shards), "prior": manifest["prior"]["spec"],
            "seconds": round(timings["embed"] + timings["transport"] + timings["scores"], 3),
            "total_seconds": timings["total"], "timings_s": timings,
        }

    def byol_star_backbone(self) -> Path:
        """The seed-0 BYOL* backbone (the ``checkpoint:`` prior); it must have been trained."""
        path = self.run_dir(self.cells[0], 0) / "train" / "backbone.pt"
        if not path.exists():
            raise RelaError(f"the BYOL* prior needs {path}, which the BYOL* seed-0 run writes")
        return path

    # -- runs ---------------------------------------------------------------------------------
    def run_dir(self, cell: Cell, seed: int) -> Path:
        return self.out / "runs" / cell.key / f"seed{seed}"

    def run_one(self, cell: Cell, seed: int, shards: str, train_dir: Path, test_dir: Path) -> dict[str, Any]:
        """Train (or resume) one run and evaluate it; the result is saved as ``result.json``.

        Returns:
            ``{"cell", "seed", "linear_probe_top1", "knn_top1" (fractions in [0, 1]),
            "train_seconds", "eval_seconds", "steps", "images_seen", "budget_fraction",
            "rela_switch_step", "rela_loss", "subset" (the sampler's description)}``.
        """
        run = self.run_dir(cell, seed)
        train_out = run / "train"
        p = self.profile
        summary_path = train_out / "summary.json"
        if not summary_path.exists():
            resume = (train_out / "checkpoints" / "last.pt").exists()
            run_train(TrainConfig(
                shards=shards, out_dir=train_out, method="byol", backbone=p.backbone, cifar_stem=p.cifar_stem,
                image_size=p.image_size, epochs=p.epochs, batch_size=p.batch_size, data_ratio=cell.budget,
                subset=cell.subset, rela_schedule="adaptive" if cell.prior else "none", lr=p.lr,
                weight_decay=p.weight_decay, device=self.device, precision=p.precision, augment=p.augment, num_workers=self.num_workers,
                seed=seed, resume=resume, overwrite=not resume, progress=False,
            ))
        summary = json.loads(summary_path.read_text())
        evaluation = run_eval(EvalConfig(
            checkpoint=Path(summary["checkpoint"]), train_dir=train_dir, test_dir=test_dir, device=self.device,
            num_workers=self.num_workers, probe_epochs=p.probe_epochs, seed=seed, progress=False,
        ))
        result = {
            "cell": cell.key, "seed": seed,
            "linear_probe_top1": evaluation["linear_probe"]["top1"], "knn_top1": evaluation["knn"]["top1"],
            "train_seconds": summary["wall_clock_s"], "eval_seconds": round(evaluation["timings_s"]["total"], 2),
            "steps": summary["budget"]["steps"], "images_seen": summary["budget"]["images_seen"],
            "budget_fraction": summary["budget"]["fraction"], "rela_switch_step": summary["rela_switch_step"],
            "rela_loss": summary["rela_loss"], "subset": summary["subset"],
        }
        write_json_atomic(run / "result.json", result)
        return result

    def run(self) -> dict[str, Any]:
        """Run every missing cell and stage one, then write the result files.

        Returns:
            the ``results.json`` payload.
        """
        started = time.perf_counter()
        machine = machine_info(self.device)  # the commit this invocation starts from
        self.check_out_dir()
        train_dir, test_dir = self.data_dirs()
        stage_one: dict[str, dict[str, Any]] = {}
        results: list[dict[str, Any]] = []
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
                        stage_one[prior] = self.stage_one(prior, train_dir)
                    result = self.run_one(cell, seed, stage_one[prior]["shards"], train_dir, test_dir)
                    results.append(result)
                    bar.update()
                    tqdm.write(
                        f"{cell.label} @ {cell.budget:.0%} seed {seed}: linear probe {result['linear_probe_top1']:.2%}, "
                        f"k-NN {result['knn_top1']:.2%} (train {result['train_seconds']:.0f} s, eval {result['eval_seconds']:.0f} s)"
                    )
        for prior in sorted({RANDOM_PRIOR} | {c.prior for c in self.cells if c.prior}):
            if prior not in stage_one:
                stage_one[prior] = self.stage_one(prior, train_dir)
        payload = summarise(self.profile, self.cells, results, stage_one)
        payload["machine"] = machine
        payload["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""
        payload["wall_clock_s_this_invocation"] = round(time.perf_counter() - started, 1)
        write_outputs(self.out, payload)
        return payload


# -- aggregation and outputs ------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(profile: Profile, cells: list[Cell], results: list[dict[str, Any]], stage_one: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-run results into one row per cell.

    Compute fractions are relative to BYOL*'s means: ``images_seen / BYOL* images_seen`` (the
    paper's budget) and ``train_seconds / BYOL* train_seconds`` (measured wall-clock).

    Raises:
        RelaError: a cell has no results (nothing to aggregate).
    """
    by_cell: dict[str, list[dict[str, Any]]] = {c.key: [] for c in cells}
    for r in results:
        by_cell[r["cell"]].append(r)
    missing = [k for k, rows in by_cell.items() if not rows]
    if missing:
        raise RelaError(f"cells without results: {', '.join(missing)}")
    reference = by_cell[REFERENCE_KEY]
    ref_images = statistics.fmean(r["images_seen"] for r in reference)
    ref_seconds = statistics.fmean(r["train_seconds"] for r in reference)
    rows = []
    for cell in cells:
        runs = sorted(by_cell[cell.key], key=lambda r: r["seed"])
        probe = mean_std([r["linear_probe_top1"] for r in runs])
        knn = mean_std([r["knn_top1"] for r in runs])
        seconds = statistics.fmean(r["train_seconds"] for r in runs)
        images = statistics.fmean(r["images_seen"] for r in runs)
        prior_cost = stage_one[cell.prior]["seconds"] if cell.prior else 0.0
        rows.append({
            "cell": cell.key, "label": cell.label, "configuration": cell.configuration, "budget": cell.budget,
            "prior": cell.prior or "", "subset": cell.subset, "seeds": len(runs),
            "linear_probe_mean": probe[0], "linear_probe_std": probe[1], "knn_mean": knn[0], "knn_std": knn[1],
            "train_seconds_mean": round(seconds, 2), "images_seen": int(round(images)),
            "compute_fraction": round(images / ref_images, 4), "wall_clock_fraction": round(seconds / ref_seconds, 4),
            "stage_one_seconds": prior_cost, "stage_one_fraction": round(prior_cost / ref_seconds, 4),
            "rela_switched_runs": sum(r["rela_switch_step"] is not None for r in runs) if cell.prior else None,
        })
    return {"profile": dataclasses.asdict(profile), "cells": rows, "runs": sorted(results, key=lambda r: (r["cell"], r["seed"])), "stage_one": stage_one}


CSV_FIELDS = (
    "cell", "label", "budget", "prior", "subset", "seeds", "linear_probe_mean", "linear_probe_std", "knn_mean", "knn_std",
    "train_seconds_mean", "images_seen", "compute_fraction", "wall_clock_fraction", "stage_one_seconds", "stage_one_fraction",
    "rela_switched_runs",
)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as a GitHub Markdown table (accuracies in %, mean +- std over seeds)."""
    lines = [
        "| configuration | budget | linear probe top-1 | k-NN top-1 | training wall-clock | wall-clock / BYOL* | images seen (/ BYOL*) | stage one (s) | stage one / BYOL* |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        stage_one = f"{r['stage_one_seconds']:.1f}" if r["prior"] else "-"
        stage_one_fraction = f"{r['stage_one_fraction']:.1%}" if r["prior"] else "-"
        lines.append(
            f"| {r['label']} | {r['budget']:.0%} | {100 * r['linear_probe_mean']:.2f} ± {100 * r['linear_probe_std']:.2f} "
            f"| {100 * r['knn_mean']:.2f} ± {100 * r['knn_std']:.2f} | {r['train_seconds_mean']:.0f} s | {r['wall_clock_fraction']:.2f} "
            f"| {r['images_seen']:,} ({r['compute_fraction']:.1%}) | {stage_one} | {stage_one_fraction} |"
        )
    return "\n".join(lines) + "\n"


def plot_budget_curve(rows: list[dict[str, Any]], path: Path) -> None:
    """Top-1 against the fraction of BYOL* compute (images seen), one line per configuration.

    Two panels (linear probe, k-NN); error bars are one standard deviation over seeds; BYOL* is
    the end point of the BYOL line and a dotted reference line; score-driven subset cells are
    single markers. Written atomically as PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = rows[0]
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        name = r["configuration"] if r["subset"] == "random" else r["label"]
        lines.setdefault(name, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, metric, title in ((axes[0], "linear_probe", "linear probe"), (axes[1], "knn", "k-NN")):
        for name, points in lines.items():
            points = sorted(points, key=lambda r: r["compute_fraction"])
            xs = [r["compute_fraction"] for r in points]
            ys = [100 * r[f"{metric}_mean"] for r in points]
            errs = [100 * r[f"{metric}_std"] for r in points]
            style = "-o" if len(points) > 1 else "D"
            ax.errorbar(xs, ys, yerr=errs, fmt=style, capsize=3, label=name, markersize=5)
        ax.axhline(100 * reference[f"{metric}_mean"], color="grey", linestyle=":", linewidth=1, label="BYOL*")
        ax.set_xscale("log")
        ax.set_xticks([0.1, 0.2, 0.5, 1.0], labels=["10%", "20%", "50%", "100%"])
        ax.minorticks_off()
        ax.set_xlabel("fraction of BYOL* compute (images seen)")
        ax.set_ylabel(f"{title} top-1 (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())


def write_outputs(out: Path, payload: dict[str, Any]) -> None:
    """Write ``results.json``, ``results.csv``, ``results.md`` and ``budget_curve.png`` atomically."""
    rows = payload["cells"]
    write_json_atomic(out / "results.json", payload)
    with atomic_write(out / "results.csv", "w") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_write(out / "results.md", "w") as handle:
        handle.write(markdown_table(rows))
    plot_budget_curve(rows, out / "budget_curve.png")


def machine_info(device: str) -> dict[str, Any]:
    """Host, accelerator, versions and the git commit the benchmark ran from."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    cuda = torch.cuda.is_available() and device != "cpu"
    return {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "accelerator": torch.cuda.get_device_name(0) if cuda else None, "commit": commit, "dirty": dirty,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--out", type=Path, required=True, help="output directory; rerun the same command to resume")
    parser.add_argument("--data", type=Path, default=None, help="directory with train/ and test/ ImageFolders (default: prepare Fashion-MNIST into OUT/data)")
    parser.add_argument("--tiny", action="store_true", help="shrink the profile to seconds per run (tests)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: the profile's 3)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: the profile's)")
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
        profile = dataclasses.replace(profile, epochs=args.epochs)
    try:
        table = BudgetTable(profile, args.out, args.data, device=args.device, num_workers=args.num_workers,
                            cells=select_cells(args.cells) if args.cells else None)
        payload = table.run()
    except RelaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; finished runs are kept: rerun the same command to resume ({args.out})", file=sys.stderr)
        return 130
    print(markdown_table(payload["cells"]), end="")
    print(f"wrote {args.out}/results.{{csv,json,md}} and budget_curve.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
