"""The budget-table benchmark runs at a tiny size on the real fixture, fills every cell, and resumes."""

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
    return budget_table.main([
        "--profile", "cpu", "--tiny", "--seeds", str(SEEDS), "--data", str(FIXTURE_ROOT), "--out", str(out),
        "--device", "cpu", "--num-workers", "0", *extra,
    ])


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("budget") / "table"
    assert run_table(out) == 0
    return out


def test_every_cell_is_filled_with_all_seeds_and_consistent_aggregates(table):
    payload = json.loads((table / "results.json").read_text())
    cells = budget_table.table_cells()
    rows = {row["cell"]: row for row in payload["cells"]}
    assert list(rows) == [cell.key for cell in cells]
    assert {row["prior"] for row in rows.values()} == {"", "random", "byol*"}
    assert {row["subset"] for row in rows.values()} == {"random", *budget_table.SCORE_SUBSET_RULES}
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


def test_budget_and_stage_one_cost_are_relative_to_byol_star(table):
    payload = json.loads((table / "results.json").read_text())
    rows = {row["cell"]: row for row in payload["cells"]}
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
    assert payload["stage_one"]["byol*"]["prior"].endswith("runs/byol-100/seed0/train/backbone.pt")


def test_csv_markdown_and_plot_hold_every_cell(table):
    with open(table / "results.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    keys = [cell.key for cell in budget_table.table_cells()]
    assert [r["cell"] for r in csv_rows] == keys
    assert all(r["linear_probe_mean"] and r["knn_std"] for r in csv_rows)
    table_lines = (table / "results.md").read_text().strip().splitlines()
    assert len(table_lines) == 2 + len(keys)
    assert all(line.count("±") == 2 for line in table_lines[2:])
    png = (table / "budget_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not list(table.rglob("*.partial"))


def test_rerun_redoes_only_missing_runs(table):
    results = sorted(table.glob("runs/*/seed*/result.json"))
    assert len(results) == len(budget_table.table_cells()) * SEEDS
    before = {path: path.stat().st_mtime_ns for path in results}
    redo = table / "runs" / "byol-rela-random-10" / "seed1" / "result.json"
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
    # MISSION.md step 6: ResNet-18 with the CIFAR stem at 32 px, AdamW 1e-3 / 0.01, batch 128, mixed
    # precision (fp16 in the paper; auto resolves to bf16 on GPUs that have it).
    assert (gpu.backbone, gpu.cifar_stem, gpu.image_size, gpu.batch_size, gpu.lr, gpu.weight_decay, gpu.precision) == (
        "resnet18", True, 32, 128, 1e-3, 0.01, "auto")
    assert gpu.limit_per_class is None  # the whole train split
    out = tmp_path / "gpu"
    code = budget_table.main([
        "--profile", "gpu", "--tiny", "--seeds", "1", "--cells", "byol-rela-random-50", "--data", str(FIXTURE_ROOT),
        "--out", str(out), "--device", "cpu", "--num-workers", "0",
    ])
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    assert [row["cell"] for row in payload["cells"]] == ["byol-100", "byol-rela-random-50"]
    for cell in ("byol-100", "byol-rela-random-50"):
        config = json.loads((out / "runs" / cell / "seed0" / "train" / "config.json").read_text())
        assert (config["backbone"], config["cifar_stem"], config["image_size"]) == ("resnet18", True, 32)
    assert (out / "budget_curve.png").stat().st_size > 0


def test_unknown_cell_is_a_one_line_error(tmp_path, capsys):
    assert run_table(tmp_path / "t", "--cells", "byol-rela-random-30") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown cell(s) byol-rela-random-30" in err[0]
    assert not (tmp_path / "t").exists()
