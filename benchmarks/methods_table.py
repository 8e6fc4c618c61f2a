"""The evidence across methods: each method at its plateau (method*), at 20% budget, and with ReLA
(Rand. prior) at 20%, against the floors, on the budget table's protocol (:mod:`budget_table`).

For every method of ``--methods`` (default BYOL, SimCLR, DINO, DINO with two views (:data:`METHOD_VARIANTS`),
Barlow Twins, VICReg, MoCo v2 and supervised; each with the profile's student, optimiser and 0.5-1 crops):

* **Plateau.** The method at 100% budget, seed 0, for E, 2E, 4E ... epochs (the profile's E, capped
  at ``max_epochs``), scored on the validation split, until doubling adds under
  :data:`PLATEAU_GAIN` (half a point) of linear probe; method* is the run at the plateau.
* **Cells at the plateau's epochs**, seeds 0, 1, 2, evaluated on the test split: ``<m>-100``
  (method*), ``<m>-20`` (the method on a fresh random 20% subset every epoch: the paper's
  baseline) and ``<m>-rela-random-20`` (the same with the ReLA loss and the adaptive schedule,
  Rand. prior). The adaptive switch's step is recorded per run.
* **The constant schedule.** Where the adaptive switch fired in none of the seeds run so far,
  ``constant:f`` for f in :data:`CONSTANT_FRACTIONS` is scored on the validation split (seed 0) and
  the one it prefers runs as ``<m>-rela-random-20-constant`` on the same seeds; the table says which
  schedule wins. Until the switch fires, an adaptive run trains the ReLA loss alone, whatever the
  method (the views too are ReLA's), so without this cell the table would not test the
  method with ReLA at all.
* **Floors**: raw pixels, the untrained student, the Rand. prior's features (the budget table's,
  probed the same way).

Precision is pinned (``--precision``, default fp32) rather than ``auto``: a table this long is
measured over several sessions, on whatever CPU each session gets, and ``auto`` resolves to bf16 on
one CPU and fp32 on another. With one precision the accuracies of cells trained on different
machines are comparable; each run records its CPU (model and native-bf16 flag), and train seconds
are compared only between runs of one CPU.

Order of work, so that a partial table says something early: first every method's seed-0 runs at
E (its first plateau point, its 20% cell, its ReLA cell and, where that cell's switch did not fire,
the constant-schedule choice and cell), then every method's doubling study and its seed-0 cells at
the plateau, then the other seeds' 20% cells (a few minutes each: they carry the comparison of
ReLA with the method at 20%), and last the other seeds' method* (the longest runs). Every run is cached (``runs/e<E>/<cell>/seed<k>``,
a killed training run resumes from its last epoch; results in ``val.json`` / ``test.json``), so
rerunning the same command resumes. ``results.csv`` (a row per floor and per cell, ``method`` and
``label`` naming it), ``results.json``, ``results.md`` and ``methods.png`` (one panel per method,
floors as lines) are rewritten after each method's turn in each pass (the order above); a cell
still at E rather than at its method's plateau is marked ``provisional``.

``--snapshot DIR`` carries the table across machines: at the start, every finished run's result and
every chosen schedule and every floor's score in DIR that OUT lacks is copied into OUT (so those runs are not trained
again); every finished run's result is copied into DIR as it finishes, and the outputs with each rewrite
(small JSON files, no checkpoints: commit DIR and a fresh machine resumes where this one stopped).
The fresh machine re-embeds stage one, and the table goes on only if the shard set's checksums equal
those ``results.json`` records (``--allow-stage-one-change`` goes on anyway and records the change).

    python benchmarks/methods_table.py --profile cpu --out runs/methods-cpu --snapshot benchmarks/results/methods-cpu
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budget_table import (  # noqa: E402
    PROFILES,
    RANDOM_PRIOR,
    BudgetTable,
    Cell,
    Profile,
    Splits,
    floors,
    machine_info,
    mean_std,
    run_fields,
    tiny,
)
from embed_throughput import device_name  # noqa: E402
from tqdm import tqdm  # noqa: E402

from rela_pipeline.errors import RelaError  # noqa: E402
from rela_pipeline.fileio import atomic_write, write_json_atomic  # noqa: E402
from rela_pipeline.runtime import PRECISIONS, cpu_has_native_bf16  # noqa: E402
from rela_pipeline.stages.evaluate import run_eval  # noqa: E402

#: The methods of the table, in the issue's order, and their labels.
METHOD_LABELS = {
    "byol": "BYOL",
    "simclr": "SimCLR",
    "dino": "DINO",
    "dino-2views": "DINO (2 views)",
    "barlowtwins": "Barlow Twins",
    "vicreg": "VICReg",
    "moco": "MoCo v2",
    "supervised": "supervised",
}
#: Table entries that train a built-in method with settings the validation split chose over
#: lightly's recipe: entry -> (the method trained, the TrainConfig fields changed). DINO with
#: lightly's 6 local views of 14 px (crops of 5-40% of a 32 px image) scored 85.66 on validation at
#: 20 epochs; with the two full-size views alone (``--local-views 0``, as solo-learn's CIFAR
#: recipes) 87.14 (benchmarks/results/dino-settings-cpu).
METHOD_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {"dino-2views": ("dino", {"local_views": 0})}
#: The plateau: doubling the epochs adds less than this to the validation linear probe (half a point).
PLATEAU_GAIN = 0.005
#: The budget of the 20% cells.
BUDGET = 0.2
#: ``constant:<f>`` schedules scored on the validation split where the adaptive switch never fires.
CONSTANT_FRACTIONS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class MethodCell:
    """One cell: ``method`` at ``budget`` with or without ReLA, at some number of epochs.

    Attributes:
        method: a name of :data:`METHOD_LABELS` (a built-in method, or an entry of
            :data:`METHOD_VARIANTS`).
        kind: ``star`` (100%), ``baseline`` (20%), ``rela`` (20% + ReLA, adaptive) or
            ``rela-constant`` (20% + ReLA, the constant schedule the validation split prefers).
        schedule: the ReLA schedule (``none`` without ReLA).
    """

    method: str
    kind: str
    schedule: str = "none"

    @property
    def budget(self) -> float:
        return 1.0 if self.kind == "star" else BUDGET

    @property
    def key(self) -> str:
        pct = round(self.budget * 100)
        return {"star": f"{self.method}-100", "baseline": f"{self.method}-{pct}", "rela": f"{self.method}-rela-random-{pct}"}.get(
            self.kind, f"{self.method}-rela-random-{pct}-{self.schedule.replace(':', '')}"
        )

    @property
    def label(self) -> str:
        name = METHOD_LABELS[self.method]
        pct = round(self.budget * 100)
        return {
            "star": f"{name}*",
            "baseline": f"{name} {pct}%",
            "rela": f"{name} + ReLA (Rand. prior, adaptive) {pct}%",
        }.get(self.kind, f"{name} + ReLA (Rand. prior, {self.schedule}) {pct}%")

    def as_budget_cell(self) -> Cell:
        """The :class:`budget_table.Cell` that trains it (the prior, the schedule)."""
        return Cell(self.key, self.label, self.budget, RANDOM_PRIOR if self.schedule != "none" else None, schedule=self.schedule)


def cpu_record() -> str:
    """The CPU a run trained on: its model name and whether it computes bf16 natively, for
    example ``AMD EPYC (native bf16)``."""
    import torch

    return f"{device_name(torch.device('cpu'))} ({'native' if cpu_has_native_bf16() else 'no native'} bf16)"


class MethodsTable(BudgetTable):
    """The table across methods (module docstring), on :class:`budget_table.BudgetTable`'s
    splits, stage one, floors and evaluation.

    Args:
        methods: names of :data:`METHOD_LABELS`, in run order.
        snapshot: the directory of ``--snapshot`` (module docstring), or None.
        allow_stage_one_change: go on when the stage-one shard set embedded here differs from
            the one the finished runs trained on (:meth:`check_stage_one`), recording the change.

    Raises:
        RelaError: an unknown method; ``out`` holds another benchmark; (from :meth:`run_all`) a
            changed stage-one shard set without ``allow_stage_one_change``.
    """

    def __init__(
        self,
        profile: Profile,
        out: Path,
        data: Path | None,
        methods: list[str],
        device: str = "auto",
        num_workers: int | None = None,
        snapshot: Path | None = None,
        allow_stage_one_change: bool = False,
    ):
        unknown = [m for m in methods if m not in METHOD_LABELS]
        if unknown:
            raise RelaError(f"unknown method(s) {', '.join(unknown)}; methods are: {', '.join(METHOD_LABELS)}")
        self.methods = methods
        self.snapshot = snapshot
        self.allow_stage_one_change = allow_stage_one_change
        super().__init__(profile, out, data, device, num_workers, cells=[Cell("byol-100", "BYOL", 1.0, None)])
        self.plateau: dict[str, dict[str, Any]] = {}

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        settings["cells"] = "methods table"
        settings["plateau_gain"] = PLATEAU_GAIN
        return settings

    # -- one run -------------------------------------------------------------------------------
    def runs_dir(self, epochs: int) -> Path:
        """The directory of every run at ``epochs`` epochs: ``OUT/runs/e<epochs>/<cell>/seed<k>``."""
        return self.out / "runs" / f"e{epochs}"

    def plateau_point_done(self, method: str, epochs: int) -> bool:
        """Whether ``method``'s plateau-study run at ``epochs`` (100%, seed 0) is scored on validation."""
        return (self.runs_dir(epochs) / MethodCell(method, "star").key / "seed0" / "val.json").exists()

    def method_run(self, cell: MethodCell, seed: int, epochs: int, shards: str, split: Path, split_name: str) -> dict[str, Any]:
        """Train (or resume, or reuse) ``cell`` for ``epochs`` and evaluate it on ``split``; the
        result is cached in the run directory as ``<split_name>.json``."""
        run = self.runs_dir(epochs) / cell.key / f"seed{seed}"
        cached = run / f"{split_name}.json"
        if cached.exists():
            return json.loads(cached.read_text())
        if not (run / "train" / "summary.json").exists():
            tqdm.write(f"{cell.label}: seed {seed}, {epochs} epochs")
        trained, changes = METHOD_VARIANTS.get(cell.method, (cell.method, {}))
        summary = self.train(run / "train", cell.as_budget_cell(), seed, shards, epochs, method=trained, logger="none", **changes)
        evaluation = run_eval(self.eval_config(Path(summary["checkpoint"]), self.splits.train, split, seed))
        result = {
            "method": cell.method,
            **({"trained_method": trained, "settings": changes} if changes else {}),
            "cell": cell.key,
            "kind": cell.kind,
            "schedule": cell.schedule,
            "seed": seed,
            "epochs": epochs,
            "split": split_name,
            **run_fields(summary, evaluation),
            "precision": summary.get("resolved", {}).get("precision"),
            "cpu": cpu_record(),
        }
        write_json_atomic(cached, result)
        self.keep_in_snapshot(cached)
        return result

    def keep_in_snapshot(self, path: Path) -> None:
        """Copy a finished run's result (or a chosen schedule) under OUT into the snapshot at once,
        so that a machine lost in the middle of a method loses no finished run."""
        if self.snapshot is not None:
            target = self.snapshot / path.relative_to(self.out)
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(target, "wb") as handle:
                handle.write(path.read_bytes())

    def check_stage_one(self, stage_one: dict[str, Any]) -> None:
        """Refuse to add runs on a stage-one shard set other than the one the finished runs trained
        on: the checksums of ``stage_one`` (:func:`budget_table.stage_one_checksums`) against those
        the previous ``results.json`` records (the snapshot's, else OUT's). A fresh machine
        re-embeds stage one (shards are not committed), and with the same split, prior and software
        its digests are the same; a difference (another torch, another CPU's rounding) would mix two
        shard sets in one table. With ``allow_stage_one_change`` the table goes on and
        ``stage_one["changes"]`` records each earlier set's checksums. A ``results.json`` written
        before checksums were recorded has none to compare, and is only carried forward.

        Raises:
            RelaError: the digests differ and ``allow_stage_one_change`` is False.
        """
        record = next((d / "results.json" for d in (self.snapshot, self.out) if d is not None and (d / "results.json").exists()), None)
        previous = json.loads(record.read_text()).get("stage_one", {}) if record is not None else {}
        stage_one["changes"] = list(previous.get("changes", []))
        recorded, current = previous.get("checksums"), stage_one["checksums"]
        if recorded is None or recorded == current:
            return
        shard_names = sorted({*recorded["shards"], *current["shards"]})
        differing = [name for name in shard_names if recorded["shards"].get(name) != current["shards"].get(name)]
        differing += [name for name in ("transport", "scores") if recorded[name] != current[name]]
        if not self.allow_stage_one_change:
            raise RelaError(
                f"the stage-one shard set embedded here differs from the one the finished runs in {record} trained on ({', '.join(differing)}); "
                "new runs would not compare with them: rerun with --allow-stage-one-change to go on and record the change in results.json"
            )
        tqdm.write(f"stage one differs from {record} ({', '.join(differing)}); going on (--allow-stage-one-change), recorded in results.json")
        stage_one["changes"].append({"previous_checksums": recorded, "differing": differing, "cpu": cpu_record()})

    # -- the plateau ---------------------------------------------------------------------------
    def study_point(self, method: str, epochs: int) -> dict[str, Any]:
        """Method ``method`` at 100%, seed 0, ``epochs`` epochs, on the validation split."""
        return self.method_run(MethodCell(method, "star"), 0, epochs, self.shards, self.splits.val, "val")

    def study(self, method: str, extend: bool) -> dict[str, Any]:
        """The plateau study's state for ``method``: its points, and its plateau once found
        (``extend``: run the next doubling if needed; else only read what is cached or run the
        first point)."""
        p = self.profile
        points = [self.study_point(method, p.epochs)]
        epochs = p.epochs
        plateau = None
        while plateau is None:
            if not p.convergence:
                plateau = p.epochs
                break
            if 2 * epochs > p.max_epochs:
                plateau = epochs
                break
            if not extend and not self.plateau_point_done(method, 2 * epochs):
                break
            points.append(self.study_point(method, 2 * epochs))
            if points[-1]["linear_probe_top1"] - points[-2]["linear_probe_top1"] < PLATEAU_GAIN:
                plateau = epochs
            epochs *= 2
        state = {"points": points, "plateau": plateau}
        self.plateau[method] = state
        return state

    def epochs_of(self, method: str) -> tuple[int, bool]:
        """``(epochs of the method's cells, provisional)``: its plateau, or E while unknown."""
        plateau = self.plateau.get(method, {}).get("plateau")
        return (plateau, False) if plateau is not None else (self.profile.epochs, True)

    # -- the cells -----------------------------------------------------------------------------
    def cells_of(self, method: str, seeds: range, star_seeds: range | None = None) -> list[dict[str, Any]]:
        """Method ``method``'s cells at its epochs (plateau, or provisional E): method* for
        ``star_seeds`` (default ``seeds``), the 20% cells for ``seeds``; the constant-schedule cell
        when the adaptive switch fired in none of these seeds' runs."""
        epochs, _ = self.epochs_of(method)
        star_seeds = seeds if star_seeds is None else star_seeds
        results = []
        for seed in sorted({*seeds, *star_seeds}):
            cells = [MethodCell(method, "baseline"), MethodCell(method, "rela", "adaptive")] if seed in seeds else []
            for cell in ([MethodCell(method, "star")] if seed in star_seeds else []) + cells:
                results.append(self.method_run(cell, seed, epochs, self.shards, self.splits.test, "test"))
        adaptive = [r for r in results if r["kind"] == "rela"]
        if all(r["rela_switch_step"] is None for r in adaptive):
            schedule = self.preferred_constant(method, epochs)
            for seed in seeds:
                results.append(self.method_run(MethodCell(method, "rela-constant", schedule), seed, epochs, self.shards, self.splits.test, "test"))
        return results

    def finished_cells(self, method: str) -> list[dict[str, Any]]:
        """The test-split results of ``method``'s cells already cached at its epochs, trained
        nothing: what an invocation reports for a method before that method's turn comes (a resumed
        table would otherwise drop, until their turn, the methods it has not reached yet). Of the
        constant-schedule cells, only the preferred schedule's. A run counts by the method its
        result records, never by its directory's prefix: ``dino-*`` also matches ``dino-2views-*``."""
        epochs, _ = self.epochs_of(method)
        chosen = self.out / "schedules" / f"{method}-e{epochs}.json"
        preferred = json.loads(chosen.read_text())["preferred"] if chosen.exists() else None
        runs = [json.loads(path.read_text()) for path in sorted(self.runs_dir(epochs).glob(f"{method}-*/seed*/test.json"))]
        return [r for r in runs if r["method"] == method and (r["kind"] != "rela-constant" or r["schedule"] == preferred)]

    def preferred_constant(self, method: str, epochs: int) -> str:
        """The ``constant:<f>`` schedule of :data:`CONSTANT_FRACTIONS` with the best validation
        linear probe at 20%, seed 0 (cached in ``schedules/<method>-e<E>.json``)."""
        path = self.out / "schedules" / f"{method}-e{epochs}.json"
        if path.exists():
            return json.loads(path.read_text())["preferred"]
        scores = {}
        for fraction in CONSTANT_FRACTIONS:
            schedule = f"constant:{fraction}"
            cell = MethodCell(method, "rela-constant", schedule)
            run = self.method_run(cell, 0, epochs, self.shards, self.splits.val, "val")
            scores[schedule] = run["linear_probe_top1"]
        preferred = max(scores, key=scores.get)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"method": method, "epochs": epochs, "val_linear_probe_top1": scores, "preferred": preferred})
        self.keep_in_snapshot(path)
        return preferred

    def constant_schedule_choices(self) -> dict[str, dict[str, Any]]:
        """method -> the validation split's scores of the constant schedules at the method's
        current epochs and the one preferred (``schedules/<method>-e<E>.json``), for the methods
        whose choice has been made."""
        choices = {}
        for method in self.methods:
            path = self.out / "schedules" / f"{method}-e{self.epochs_of(method)[0]}.json"
            if path.exists():
                choices[method] = json.loads(path.read_text())
        return choices

    def run_all(self) -> dict[str, Any]:
        """Every run in the order of the module docstring; the outputs after each method's step."""
        started = time.perf_counter()
        machine = {**machine_info(self.device), "cpu": device_name(__import__("torch").device("cpu"))}
        self.check_out_dir()
        if self.snapshot is not None:
            copied = copy_finished_runs(self.snapshot, self.out)
            if copied:
                tqdm.write(f"{copied} finished run result(s) taken from {self.snapshot}")
        self.splits: Splits = self.data_dirs()
        stage_one = self.stage_one(RANDOM_PRIOR, self.splits.train)
        self.check_stage_one(stage_one)
        self.shards = stage_one["shards"]
        floor_results = [self.run_floor(f, seed, self.splits) for f in floors(self.profile)[:3] for seed in range(f.seeds)]
        results: dict[str, list[dict[str, Any]]] = {}

        def write() -> dict[str, Any]:
            payload = summarise_methods(self.profile, self.methods, results, self.plateau, floor_results, stage_one)
            payload.update(machine=machine, command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "")
            payload["constant_schedules"] = self.constant_schedule_choices()
            payload["wall_clock_s_this_invocation"] = round(time.perf_counter() - started, 1)
            write_method_outputs(self.out, payload)
            if self.snapshot is not None:
                write_method_outputs(self.snapshot, payload)
                copy_finished_runs(self.out, self.snapshot)
            return payload

        for method in self.methods:  # what earlier invocations finished, before anything trains
            if self.plateau_point_done(method, self.profile.epochs):
                self.study(method, extend=False)  # reads the cached points only
                results[method] = self.finished_cells(method)
        write()  # the floors and the finished cells
        self.run_passes(results, write)
        return write()

    def run_passes(self, results: dict[str, list[dict[str, Any]]], after_each: Callable[[], Any]) -> None:
        """Every run, in passes over the methods (module docstring): 1. seed 0 of every method at
        E; 2. the doubling studies, and seed 0's cells at each plateau; 3. the other seeds' 20%
        cells (the cheap ones, which carry the comparison with the method at 20%); 4. the other
        seeds' method*. ``results[method]`` is set to the method's cells and ``after_each()``
        called after each method's turn in each pass."""
        every_seed, seed_zero = range(self.profile.seeds), range(1)
        for extend, seeds, star_seeds in (
            (False, seed_zero, seed_zero),
            (True, seed_zero, seed_zero),
            (True, every_seed, seed_zero),
            (True, every_seed, every_seed),
        ):
            for method in self.methods:
                self.study(method, extend=extend)
                results[method] = self.cells_of(method, seeds, star_seeds)
                after_each()


#: The files of a finished run or choice that ``--snapshot`` carries (relative to OUT).
FINISHED_RUN_GLOBS = ("runs/e*/*/seed*/val.json", "runs/e*/*/seed*/test.json", "schedules/*.json", "floors/*/seed*.json")


def copy_finished_runs(source: Path, destination: Path) -> int:
    """Copy every file of :data:`FINISHED_RUN_GLOBS` under ``source`` that ``destination`` lacks
    (atomically; existing files are kept); returns how many were copied."""
    copied = 0
    for pattern in FINISHED_RUN_GLOBS:
        for path in sorted(source.glob(pattern)):
            target = destination / path.relative_to(source)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(target, "wb") as handle:
                    handle.write(path.read_bytes())
                copied += 1
    return copied


def _cpu_of(run: dict[str, Any]) -> str:
    return run.get("cpu") or "not recorded"


def train_seconds_by_cpu(runs: list[dict[str, Any]]) -> str:
    """The mean training wall clock (seconds) of ``runs`` per CPU, ``"CPU: mean; CPU: mean"`` in
    CPU-name order: the table's seeds may train on different machines (``--snapshot``), and a mean
    across machines of different speed would compare with nothing."""
    by_cpu: dict[str, list[float]] = {}
    for run in runs:
        by_cpu.setdefault(_cpu_of(run), []).append(run["train_seconds"])
    return "; ".join(f"{cpu}: {sum(seconds) / len(seconds):.0f}" for cpu, seconds in sorted(by_cpu.items()))


def summarise_methods(
    profile: Profile, methods: list[str], results: dict[str, list[dict[str, Any]]], plateau: dict[str, Any], floor_results: list[dict[str, Any]], stage_one
) -> dict[str, Any]:
    """The table's rows: one per floor (mean ± std over its seeds) and one per (method, cell) at
    the method's current epochs, with the ReLA switch steps and whether the epochs are the
    plateau's (else ``provisional``)."""
    rows: list[dict[str, Any]] = []
    for floor in floors(profile)[:3]:
        runs = [r for r in floor_results if r["cell"] == floor.key]
        if runs:
            lp, lp_sd = mean_std([r["linear_probe_top1"] for r in runs])
            knn, knn_sd = mean_std([r["knn_top1"] for r in runs])
            rows.append(
                {
                    "kind": "floor",
                    "method": "",
                    "cell": floor.key,
                    "label": floor.label,
                    "seeds": len(runs),
                    "linear_probe": lp,
                    "linear_probe_std": lp_sd,
                    "knn": knn,
                    "knn_std": knn_sd,
                }
            )
    for method in methods:
        state = plateau.get(method, {})
        for key in dict.fromkeys(r["cell"] for r in results.get(method, [])):
            runs = sorted((r for r in results[method] if r["cell"] == key), key=lambda r: r["seed"])
            lp, lp_sd = mean_std([r["linear_probe_top1"] for r in runs])
            knn, knn_sd = mean_std([r["knn_top1"] for r in runs])
            first = runs[0]
            rows.append(
                {
                    "kind": "cell",
                    "method": method,
                    "cell": key,
                    "label": MethodCell(method, first["kind"], first["schedule"]).label,
                    "budget": MethodCell(method, first["kind"]).budget,
                    "schedule": first["schedule"],
                    "epochs": first["epochs"],
                    "provisional": state.get("plateau") is None,
                    "seeds": len(runs),
                    "linear_probe": lp,
                    "linear_probe_std": lp_sd,
                    "knn": knn,
                    "knn_std": knn_sd,
                    "switch_steps": " ".join("never" if r["rela_switch_step"] is None else str(r["rela_switch_step"]) for r in runs)
                    if first["schedule"] != "none"
                    else "",
                    "steps": first["steps"],
                    "train_seconds_by_cpu": train_seconds_by_cpu(runs),
                    "precision": first["precision"],
                    "cpu": " / ".join(sorted({_cpu_of(r) for r in runs})),
                }
            )
    return {
        "profile": profile.name,
        "plateau_gain": PLATEAU_GAIN,
        "rows": rows,
        "plateau": plateau,
        "runs": results,
        "floors": floor_results,
        "stage_one": stage_one,
    }


CSV_FIELDS = (
    "kind",
    "method",
    "cell",
    "label",
    "budget",
    "schedule",
    "epochs",
    "provisional",
    "seeds",
    "linear_probe",
    "linear_probe_std",
    "knn",
    "knn_std",
    "switch_steps",
    "steps",
    "train_seconds_by_cpu",
    "precision",
    "cpu",
)


def markdown_methods(payload: dict[str, Any]) -> str:
    """The floors, the plateau studies, the table (percentages, mean ± std), the constant
    schedules' validation scores and the reading (:func:`markdown_reading`) as Markdown."""
    lines = ["### Floors (test split)", "", "| floor | seeds | linear probe top-1 | k-NN top-1 |", "| --- | ---: | ---: | ---: |"]
    for row in (r for r in payload["rows"] if r["kind"] == "floor"):
        lines.append(
            f"| {row['label']} | {row['seeds']} | {100 * row['linear_probe']:.2f} ± {100 * row['linear_probe_std']:.2f} | {100 * row['knn']:.2f} ± {100 * row['knn_std']:.2f} |"
        )
    lines += ["", "### Plateau studies (seed 0, 100% budget, validation split)", "", "| method | epochs: val linear probe | plateau |", "| --- | --- | ---: |"]
    for method, state in payload["plateau"].items():
        points = ", ".join(f"{p['epochs']}: {100 * p['linear_probe_top1']:.2f}" for p in state["points"])
        lines.append(f"| {METHOD_LABELS[method]} | {points} | {state['plateau'] if state['plateau'] is not None else 'not yet'} |")
    lines += [
        "",
        "### Table (test split; mean ± std over seeds)",
        "",
        "| cell | epochs | seeds | linear probe top-1 | k-NN top-1 | ReLA switch steps | train s (mean per CPU) | precision |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for row in (r for r in payload["rows"] if r["kind"] == "cell"):
        epochs = f"{row['epochs']}" + (" (provisional)" if row["provisional"] else "")
        lines.append(
            f"| {row['label']} | {epochs} | {row['seeds']} | {100 * row['linear_probe']:.2f} ± {100 * row['linear_probe_std']:.2f} | "
            f"{100 * row['knn']:.2f} ± {100 * row['knn_std']:.2f} | {row['switch_steps'] or '-'} | {row['train_seconds_by_cpu']} | {row['precision']} |"
        )
    choices = payload.get("constant_schedules", {})
    if choices:
        fractions = [f"constant:{f}" for f in CONSTANT_FRACTIONS]
        lines += [
            "",
            f"### The constant schedule, chosen on the validation split (seed 0, {round(BUDGET * 100)}%, linear probe top-1)",
            "",
            "| method | epochs | " + " | ".join(f"`{f}`" for f in fractions) + " | chosen |",
            "| --- | ---: | " + "---: | " * len(fractions) + "--- |",
        ]
        for method, choice in choices.items():
            scores = " | ".join(f"{100 * choice['val_linear_probe_top1'][f]:.2f}" if f in choice["val_linear_probe_top1"] else "-" for f in fractions)
            lines.append(f"| {METHOD_LABELS[method]} | {choice['epochs']} | {scores} | `{choice['preferred']}` |")
    lines += ["", *markdown_reading(payload)]
    return "\n".join(lines) + "\n"


#: A difference between two cells is resolved when Welch's two-sided t-test over their seeds gives p under this.
RESOLVED_P = 0.05


def compare_cells(a: dict[str, Any], b: dict[str, Any], metric: str = "linear_probe") -> dict[str, float | None]:
    """``a - b`` for two rows of the table: the difference of their mean ``metric`` (a fraction, as
    the rows hold it), the standard error of that difference, sqrt(s_a^2 / n_a + s_b^2 / n_b) with
    s the std over a row's seeds and n its number of seeds, and Welch's two-sided t-test p-value
    (:func:`scipy.stats.ttest_ind_from_stats` with ``equal_var=False``: the cells' seeds need not
    vary alike).

    Returns:
        ``{"difference": float, "standard_error": float | None, "p_value": float | None}``; the
        last two are ``None`` when either row has a single seed, whose spread is unknown. Two rows
        whose seeds agree exactly (std 0) give p 0.0 for any nonzero difference, 1.0 for none.
    """
    from scipy.stats import ttest_ind_from_stats

    difference = a[metric] - b[metric]
    if a["seeds"] < 2 or b["seeds"] < 2:
        return {"difference": difference, "standard_error": None, "p_value": None}
    standard_error = math.sqrt(a[f"{metric}_std"] ** 2 / a["seeds"] + b[f"{metric}_std"] ** 2 / b["seeds"])
    if standard_error == 0.0:
        return {"difference": difference, "standard_error": 0.0, "p_value": 0.0 if difference else 1.0}
    test = ttest_ind_from_stats(a[metric], a[f"{metric}_std"], a["seeds"], b[metric], b[f"{metric}_std"], b["seeds"], equal_var=False)
    return {"difference": difference, "standard_error": standard_error, "p_value": float(test.pvalue)}


def resolved(comparison: dict[str, float | None]) -> bool | None:
    """Whether a :func:`compare_cells` difference is beyond the seeds' noise (p under
    :data:`RESOLVED_P`); ``None`` when a single seed leaves it unjudged."""
    return None if comparison["p_value"] is None else comparison["p_value"] < RESOLVED_P


def _points(comparison: dict[str, float | None]) -> str:
    """A difference in points, with its standard error and p-value where the seeds allow."""
    text = f"{100 * comparison['difference']:+.2f}"
    if comparison["standard_error"] is None:
        return text + " (1 seed)"
    p_value = comparison["p_value"]
    return text + f" ± {100 * comparison['standard_error']:.2f} " + (f"(p {p_value:.2g})" if p_value >= 0.01 else "(p < 0.01)")


def reaches_method_star(comparison: dict[str, float | None]) -> str:
    """The verdict on ``ReLA 20% - method*``: ``yes`` (ahead, ``resolved`` if beyond the noise),
    ``within the noise`` (behind, not resolved), ``no`` (behind, resolved) or ``not judged`` (one
    seed of either)."""
    verdict = resolved(comparison)
    if verdict is None:
        return "not judged (1 seed)"
    if comparison["difference"] >= 0:
        return "yes, resolved" if verdict else "yes"
    return "no" if verdict else "within the noise"


def markdown_reading(payload: dict[str, Any]) -> list[str]:
    """The reading of the table as Markdown lines: per method and ReLA schedule, the ReLA cell at
    20% against the method at 20% and against method* (linear probe, points, ± the standard error
    of the difference, Welch's p over seeds; :func:`compare_cells`), and which schedule wins."""
    percent = round(BUDGET * 100)
    reach = [
        "### Reading: does ReLA at 20% reach method*? (linear probe, points)",
        "",
        f"Differences in points, ± their standard error, with Welch's two-sided p over the seeds; resolved when p < {RESOLVED_P}.",
        "",
        f"| method | ReLA schedule | + ReLA {percent}% | minus method {percent}% | minus method* | reaches method*? |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    schedule_rows = []
    for method in dict.fromkeys(r["method"] for r in payload["rows"] if r["kind"] == "cell"):
        mine = {r["cell"].split(f"{method}-", 1)[1]: r for r in payload["rows"] if r["kind"] == "cell" and r["method"] == method}
        star, base = mine.get("100"), mine.get(f"{percent}")
        adaptive = mine.get(f"rela-random-{percent}")
        constant = next((r for k, r in mine.items() if k.startswith(f"rela-random-{percent}-constant")), None)
        if star is None or base is None:
            continue
        label = METHOD_LABELS[method] + (" (provisional)" if star["provisional"] else "")
        for rela in (r for r in (adaptive, constant) if r is not None):
            to_star = compare_cells(rela, star)
            reach.append(
                f"| {label} | {'adaptive' if rela is adaptive else rela['schedule']} | {100 * rela['linear_probe']:.2f} | "
                f"{_points(compare_cells(rela, base))} | {_points(to_star)} | {reaches_method_star(to_star)} |"
            )
        if adaptive is not None and constant is not None:
            between = compare_cells(adaptive, constant)
            verdict = resolved(between)
            if verdict is None:
                wins = "not judged (1 seed)"
            elif not verdict:
                wins = "not resolved"
            else:
                wins = "adaptive" if between["difference"] > 0 else constant["schedule"]
            schedule_rows.append(f"| {label} | {_points(between)} | {wins} |")
    if not schedule_rows:
        return reach
    return reach + [
        "",
        "### Which ReLA schedule wins (linear probe, points)",
        "",
        "| method | adaptive minus constant | wins |",
        "| --- | ---: | --- |",
        *schedule_rows,
    ]


def bar_name(row: dict[str, Any]) -> str:
    """A cell's short name under its bar: ``method*``, ``20%``, ``ReLA 20%`` and its schedule."""
    if row["budget"] >= 1.0:
        return "method*"
    pct = f"{round(100 * row['budget'])}%"
    return pct if row["schedule"] == "none" else f"ReLA {pct}\n{row['schedule']}"


def plot_methods(payload: dict[str, Any], path: Path) -> None:
    """One panel per method: linear probe of method* (100%), the method at 20% and with ReLA at
    20% (error bars: one std over seeds; the value above each bar), floors as horizontal lines
    with one legend for the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [r for r in payload["rows"] if r["kind"] == "cell"]
    methods = list(dict.fromkeys(r["method"] for r in cells))
    if not methods:
        return
    columns = min(4, len(methods))
    rows_n = math.ceil(len(methods) / columns)
    floor_rows = [r for r in payload["rows"] if r["kind"] == "floor"]
    legend_columns = 1 if columns < 3 else len(floor_rows)
    legend_inches = 0.2 * math.ceil(len(floor_rows) / legend_columns) + 0.15
    height = 2.6 * rows_n + legend_inches
    figure, axes = plt.subplots(rows_n, columns, figsize=(3.2 * columns, height), squeeze=False, sharey=True)
    for axis, method in zip(axes.flat, methods):
        mine = [r for r in cells if r["method"] == method]
        values = [100 * r["linear_probe"] for r in mine]
        colours = ["#4c72b0" if r["budget"] >= 1.0 else "#8c8c8c" if r["schedule"] == "none" else "#dd8452" for r in mine]
        bars = axis.bar(range(len(mine)), values, yerr=[100 * r["linear_probe_std"] for r in mine], color=colours, capsize=2)
        axis.bar_label(bars, [f"{v:.1f}" for v in values], fontsize=6, padding=1)
        for floor, style in zip(floor_rows, ("--", ":", "-.")):
            axis.axhline(100 * floor["linear_probe"], linestyle=style, color="black", linewidth=0.8, label=floor["label"])
        axis.set_xticks(range(len(mine)), [bar_name(r) for r in mine], fontsize=6)
        seeds = max(r["seeds"] for r in mine)
        names = [bar_name(r).replace("\n", " ") for r in mine]
        fewer = ", ".join(f"{name}: {r['seeds']}" for name, r in zip(names, mine) if r["seeds"] < seeds)  # e.g. method* before pass 4
        title = f"{METHOD_LABELS[method]}, {mine[0]['epochs']} epochs, " + ("seed 0" if seeds == 1 else f"{seeds} seeds") + (f" ({fewer})" if fewer else "")
        axis.set_title(title + (" (provisional)" if mine[0]["provisional"] else ""), fontsize=7)
    for axis in axes.flat[len(methods) :]:
        axis.axis("off")
    values = [100 * r["linear_probe"] for r in cells + floor_rows]
    axes.flat[0].set_ylim(max(0, min(values) - 3), min(100, max(values) + 2))
    for axis in axes[:, 0]:
        axis.set_ylabel("linear probe top-1 (%)", fontsize=7)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=legend_columns, fontsize=6, frameon=False)
    figure.tight_layout(rect=(0, legend_inches / height, 1, 1))
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=120)
    plt.close(figure)


def write_method_outputs(out: Path, payload: dict[str, Any]) -> None:
    """``results.json``, ``results.csv``, ``results.md`` and ``methods.png`` in ``out`` (created if
    missing), atomically."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", payload)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in payload["rows"]:
        writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_write(out / "results.csv", "w") as handle:
        handle.write(buffer.getvalue())
    with atomic_write(out / "results.md", "w") as handle:
        handle.write(markdown_methods(payload))
    plot_methods(payload, out / "methods.png")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--out", type=Path, required=True, help="output directory; rerun the same command to resume")
    parser.add_argument("--data", type=Path, default=None, help="directory with train/ and test/ ImageFolders (default: prepare Fashion-MNIST into OUT/data)")
    parser.add_argument("--methods", default=",".join(METHOD_LABELS), help="comma-separated methods, in run order")
    parser.add_argument("--snapshot", type=Path, default=None, help="directory that carries finished runs across machines (module docstring)")
    parser.add_argument("--tiny", action="store_true", help="shrink the profile to seconds per run (tests)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: the profile's 3)")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="training precision of every run (default fp32: the same on every CPU, module docstring)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument(
        "--allow-stage-one-change",
        action="store_true",
        help="go on when the stage-one shard set embedded here differs from the one the finished runs trained on (recorded in results.json)",
    )
    args = parser.parse_args(argv)
    profile = dataclasses.replace(PROFILES[args.profile], precision=args.precision)
    if args.tiny:
        profile = tiny(profile)
    if args.seeds is not None:
        profile = dataclasses.replace(profile, seeds=args.seeds)
    try:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        table = MethodsTable(
            profile, args.out, args.data, methods, args.device, args.num_workers, snapshot=args.snapshot, allow_stage_one_change=args.allow_stage_one_change
        )
        payload = table.run_all()
    except RelaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    print(markdown_methods(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
