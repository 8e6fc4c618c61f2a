"""The budget-table benchmark runs at a tiny size on the real fixture: floors, the convergence study,
every cell with its few-label columns; it resumes and refuses other settings."""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

import pytest
from conftest import FIXTURE_ROOT

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import budget_table  # noqa: E402

SEEDS = 2


def run_table(out: Path, *extra: str) -> int:
    return budget_table.main(
        [
            "--profile",
            "cpu",
            "--tiny",
            "--seeds",
            str(SEEDS),
            "--data",
            str(FIXTURE_ROOT),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--num-workers",
            "0",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("budget") / "table"
    assert run_table(out) == 0
    return out


def cell_rows(payload: dict) -> dict:
    return {row["cell"]: row for row in payload["cells"] if row["kind"] == "cell"}


def test_every_cell_is_filled_with_all_seeds_and_consistent_aggregates(table):
    payload = json.loads((table / "results.json").read_text())
    cells = budget_table.table_cells()
    rows = cell_rows(payload)
    assert not payload["partial"]
    assert list(rows) == [cell.key for cell in cells]
    assert {row["prior"] for row in rows.values()} == {"", "random", "byol*"}
    assert {row["subset"] for row in rows.values()} == {"random", *budget_table.SCORE_SUBSET_RULES}
    assert {row["schedule"] for row in rows.values() if row["prior"]} == {"adaptive", budget_table.CONSTANT_SCHEDULE}
    assert {row["transfer"] for row in rows.values() if row["prior"]} == {"trained", "frozen"}
    for cell in cells:
        row = rows[cell.key]
        runs = [r for r in payload["runs"] if r["cell"] == cell.key]
        assert sorted(r["seed"] for r in runs) == list(range(SEEDS))
        for metric in ("linear_probe_top1", "knn_top1"):
            assert all(0.0 <= r[metric] <= 1.0 for r in runs)
        probe = [r["linear_probe_top1"] for r in runs]
        assert row["linear_probe_mean"] == pytest.approx(statistics.fmean(probe))
        assert row["linear_probe_std"] == pytest.approx(statistics.stdev(probe))
        assert row["knn_mean"] == pytest.approx(statistics.fmean(r["knn_top1"] for r in runs))
        assert row["images_seen"] > 0 and row["train_seconds_mean"] > 0
        # ReLA runs carry a ReLA loss; the baselines do not.
        assert all((r["rela_loss"]["first_interval"] is not None) == (cell.prior is not None) for r in runs)
        # Few-label columns: per run the mean over draws, per row the mean over seeds.
        for n in (1, 5):
            values = [r["few_label"][str(n)]["knn"] for r in runs]
            assert row[f"knn_{n}_mean"] == pytest.approx(statistics.fmean(values))
    # The constant schedule switches at half the steps; the frozen transfer layer never moved.
    constant = [r for r in payload["runs"] if r["cell"] == "byol-rela-random-20-constant"]
    assert all(r["rela_switch_step"] == -(-r["steps"] // 2) for r in constant)
    for seed in range(SEEDS):
        config = json.loads((table / "runs" / f"e{payload['epochs']}" / "byol-rela-random-20-frozen" / f"seed{seed}" / "train" / "config.json").read_text())
        assert config["transfer"] == "frozen"


def test_floors_are_probed_like_students_on_the_same_splits(table):
    payload = json.loads((table / "results.json").read_text())
    floors = {row["cell"]: row for row in payload["cells"] if row["kind"] == "floor"}
    assert list(floors) == ["floor-pixels", "floor-untrained", "floor-prior-random", "floor-prior-byol-star"]
    assert floors["floor-untrained"]["seeds"] == SEEDS and floors["floor-pixels"]["seeds"] == 1
    runs = {(r["cell"], r["seed"]): r for r in payload["floors"]}
    assert runs[("floor-pixels", 0)]["feature_dim"] == 3 * 32 * 32
    assert runs[("floor-untrained", 0)]["feature_dim"] == runs[("floor-prior-byol-star", 0)]["feature_dim"] == 256
    assert runs[("floor-prior-random", 0)]["feature_dim"] == 512
    # Two seeds of an untrained student are two different networks.
    assert runs[("floor-untrained", 0)]["few_label"] != runs[("floor-untrained", 1)]["few_label"]
    # The BYOL* prior's features are BYOL*'s seed-0 backbone: the same frozen features, the same k-NN.
    byol_star = next(r for r in payload["runs"] if r["cell"] == "byol-100" and r["seed"] == 0)
    assert runs[("floor-prior-byol-star", 0)]["knn_top1"] == byol_star["knn_top1"]
    for row in floors.values():
        assert 0.0 <= row["linear_probe_mean"] <= 1.0 and 0.0 <= row["knn_1_mean"] <= 1.0


def test_convergence_study_doubles_epochs_until_the_plateau_and_byol_star_is_its_run(table):
    payload = json.loads((table / "results.json").read_text())
    points = payload["convergence"]
    profile = budget_table.tiny(budget_table.PROFILES["cpu"])
    assert [p["epochs"] for p in points][0] == profile.epochs
    assert all(b["epochs"] == 2 * a["epochs"] for a, b in zip(points, points[1:]))
    assert all(b["steps"] == 2 * a["steps"] for a, b in zip(points, points[1:]))
    # The rule: stop at the first doubling that adds under PLATEAU_GAIN (BYOL* = the shorter run),
    # else at the cap (BYOL* = the longest run).
    gains = [b["val_linear_probe_top1"] - a["val_linear_probe_top1"] for a, b in zip(points, points[1:])]
    expected = points[-2]["epochs"] if gains and gains[-1] < budget_table.PLATEAU_GAIN else points[-1]["epochs"]
    assert payload["epochs"] == expected
    assert all(g >= budget_table.PLATEAU_GAIN for g in gains[:-1])
    # BYOL* seed 0 is the study's run at the plateau: the same training, not a second one.
    byol_star = next(r for r in payload["runs"] if r["cell"] == "byol-100" and r["seed"] == 0)
    point = next(p for p in points if p["epochs"] == payload["epochs"])
    assert byol_star["steps"] == point["steps"] and byol_star["train_seconds"] == point["train_seconds"]


def test_budget_and_stage_one_cost_are_relative_to_byol_star(table):
    payload = json.loads((table / "results.json").read_text())
    rows = cell_rows(payload)
    reference = rows["byol-100"]
    assert reference["compute_fraction"] == 1.0 and reference["wall_clock_fraction"] == 1.0
    baselines = [rows[f"byol-{round(100 * b)}"] for b in budget_table.BUDGETS]
    assert [r["images_seen"] for r in baselines] == sorted(r["images_seen"] for r in baselines)
    assert all(r["images_seen"] < reference["images_seen"] for r in baselines)
    for key in ("byol-rela-random-20", "byol-rela-byol-star-20"):
        # ReLA cells train on exactly the steps of the same-budget baseline.
        assert rows[key]["images_seen"] == rows["byol-20"]["images_seen"]
    for prior in ("random", "byol*"):
        cost = payload["stage_one"][prior]
        assert cost["seconds"] > 0
        assert cost["seconds"] == pytest.approx(sum(cost["timings_s"][k] for k in ("embed", "transport", "scores")), abs=1e-3)
    row = rows["byol-rela-byol-star-50"]
    # Both sides are rounded for the table (4 digits, 0.01 s): compare to 1%.
    assert row["stage_one_fraction"] == pytest.approx(row["stage_one_seconds"] / reference["train_seconds_mean"], rel=0.01)
    # The BYOL* prior is the seed-0 BYOL* backbone of this very table.
    assert payload["stage_one"]["byol*"]["prior"].endswith(f"runs/e{payload['epochs']}/byol-100/seed0/train/backbone.pt")


def test_csv_markdown_and_plot_hold_every_cell(table):
    with open(table / "results.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    keys = [cell.key for cell in budget_table.table_cells()]
    floor_keys = [f.key for f in budget_table.floors(budget_table.PROFILES["cpu"])]
    assert [r["cell"] for r in csv_rows] == floor_keys + keys
    assert [r["kind"] for r in csv_rows] == ["floor"] * len(floor_keys) + ["cell"] * len(keys)
    assert all(r["linear_probe_mean"] and r["knn_std"] and r["probe_5_mean"] for r in csv_rows)
    report = (table / "results.md").read_text()
    table_lines = [line for line in report.split("## Table")[1].split("## Few labels")[0].strip().splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + len(keys)
    assert all(line.count("±") == 2 for line in table_lines[2:])
    assert "## Floors" in report and "## Convergence" in report
    for name in ("budget_curve.png", "convergence.png"):
        png = (table / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not list(table.rglob("*.partial"))


def test_rerun_redoes_only_missing_runs(table):
    results = sorted(table.glob("runs/e*/*/seed*/result.json"))
    assert len(results) == len(budget_table.table_cells()) * SEEDS
    before = {path: path.stat().st_mtime_ns for path in results}
    epochs = json.loads((table / "results.json").read_text())["epochs"]
    redo = table / "runs" / f"e{epochs}" / "byol-rela-random-10" / "seed1" / "result.json"
    first = json.loads(redo.read_text())
    redo.unlink()
    assert run_table(table) == 0
    changed = [path for path in results if path.stat().st_mtime_ns != before.get(path)]
    assert changed == [redo]
    again = json.loads(redo.read_text())
    # Training was finished, so only the evaluation ran again, and it is deterministic.
    assert again["linear_probe_top1"] == first["linear_probe_top1"] and again["knn_top1"] == first["knn_top1"]


def test_other_settings_in_the_same_directory_are_refused(table, capsys):
    assert run_table(table, "--profile", "gpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "other settings" in err[0]


def test_gpu_profile_is_the_papers_resnet18_setting_and_runs_tiny_on_cpu(tmp_path):
    gpu = budget_table.PROFILES["gpu"]
    # The paper's setup (the authors' code): ResNet-18 with the CIFAR stem at 32 px, AdamW 1e-3 / 0.01, batch 128, mixed
    # precision (fp16 in the paper; auto resolves to bf16 on GPUs that have it).
    assert (gpu.backbone, gpu.cifar_stem, gpu.image_size, gpu.batch_size, gpu.lr, gpu.weight_decay, gpu.precision) == (
        "resnet18",
        True,
        32,
        128,
        1e-3,
        0.01,
        "auto",
    )
    assert gpu.limit_per_class is None  # the whole train split
    out = tmp_path / "gpu"
    code = budget_table.main(
        [
            "--profile",
            "gpu",
            "--tiny",
            "--seeds",
            "1",
            "--epochs",
            "1",
            "--cells",
            "byol-rela-random-50",
            "--data",
            str(FIXTURE_ROOT),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--num-workers",
            "0",
        ]
    )
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    assert [row["cell"] for row in payload["cells"] if row["kind"] == "cell"] == ["byol-100", "byol-rela-random-50"]
    assert payload["convergence"] == [] and payload["epochs"] == 1  # --epochs skips the study
    for cell in ("byol-100", "byol-rela-random-50"):
        config = json.loads((out / "runs" / "e1" / cell / "seed0" / "train" / "config.json").read_text())
        assert (config["backbone"], config["cifar_stem"], config["image_size"]) == ("resnet18", True, 32)
    assert (out / "budget_curve.png").stat().st_size > 0


def test_unknown_cell_is_a_one_line_error(tmp_path, capsys):
    assert run_table(tmp_path / "t", "--cells", "byol-rela-random-30") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown cell(s) byol-rela-random-30" in err[0]
    assert not (tmp_path / "t").exists()
