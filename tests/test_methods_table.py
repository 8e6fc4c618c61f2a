"""The methods-table benchmark at a tiny size on the real fixture: each method's plateau study, its
cells at the plateau, the constant schedule where the adaptive switch never fired, the floors;
it resumes without retraining."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import FIXTURE_ROOT, assert_one_line_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import methods_table  # noqa: E402

METHODS = "byol"


def run_table(out: Path, *extra: str) -> int:
    return methods_table.main(
        [
            *extra,
            "--profile",
            "cpu",
            "--tiny",
            "--seeds",
            "1",
            "--data",
            str(FIXTURE_ROOT),
            "--out",
            str(out),
            "--methods",
            METHODS,
            "--device",
            "cpu",
            "--num-workers",
            "0",
        ]
    )


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("methods")
    out = root / "table"
    assert run_table(out, "--snapshot", str(root / "snapshot")) == 0
    return out


def test_each_method_has_its_plateau_and_its_cells_at_it(table):
    payload = json.loads((table / "results.json").read_text())
    profile = methods_table.tiny(methods_table.PROFILES["cpu"])
    for method in METHODS.split(","):
        state = payload["plateau"][method]
        points = [p["epochs"] for p in state["points"]]
        assert points[0] == profile.epochs and all(b == 2 * a for a, b in zip(points, points[1:]))
        gains = [b["linear_probe_top1"] - a["linear_probe_top1"] for a, b in zip(state["points"], state["points"][1:])]
        # the plateau is the last E whose doubling added under the gain, else the largest E run
        expected = next((points[i] for i, g in enumerate(gains) if g < methods_table.PLATEAU_GAIN), points[-1])
        assert state["plateau"] == expected
        cells = {r["cell"]: r for r in payload["rows"] if r["kind"] == "cell" and r["method"] == method}
        assert {f"{method}-100", f"{method}-20", f"{method}-rela-random-20"} <= set(cells)
        assert all(r["epochs"] == expected and not r["provisional"] for r in cells.values())
        # method* at the plateau is the study's own run: the same checkpoint, scored on test
        star = next(r for r in payload["runs"][method] if r["cell"] == f"{method}-100")
        assert (table / "runs" / f"e{expected}" / f"{method}-100" / "seed0" / "val.json").is_file() and star["split"] == "test"
        adaptive = cells[f"{method}-rela-random-20"]
        constant = [r for r in cells.values() if r["schedule"].startswith("constant:")]
        if adaptive["switch_steps"] == "never":  # then the schedule the validation split prefers runs too
            chosen = json.loads((table / "schedules" / f"{method}-e{expected}.json").read_text())
            assert chosen["preferred"] == max(chosen["val_linear_probe_top1"], key=chosen["val_linear_probe_top1"].get)
            assert [r["schedule"] for r in constant] == [chosen["preferred"]]
        else:
            assert not constant


def test_floors_csv_markdown_and_plot(table):
    payload = json.loads((table / "results.json").read_text())
    rows = list(csv.DictReader((table / "results.csv").open()))
    assert [r["cell"] for r in rows] == [r["cell"] for r in payload["rows"]]
    assert {r["cell"] for r in rows if r["kind"] == "floor"} == {"floor-pixels", "floor-untrained", "floor-prior-random"}
    report = (table / "results.md").read_text()
    for row in payload["rows"]:
        assert row["label"] in report
    assert "does ReLA at 20% reach method*" in report and (table / "methods.png").stat().st_size > 10_000
    # the validation choice of a constant schedule is reported for exactly the methods whose constant cell ran
    constant_cells = {r["method"]: r["schedule"] for r in payload["rows"] if r["kind"] == "cell" and r["schedule"].startswith("constant:")}
    assert {m: c["preferred"] for m, c in payload["constant_schedules"].items()} == constant_cells
    assert all(f"`{schedule}`" in report for schedule in constant_cells.values())
    cells = [r for r in payload["rows"] if r["kind"] == "cell"]
    # the precision is pinned (fp32 by default) so that cells from different CPUs compare
    assert payload["machine"]["cpu"] and cells and all(r["precision"] == "fp32" and r["cpu"] for r in cells)
    # each bar of a method's panel has its own name, the ReLA bars their schedule
    for method in {r["method"] for r in cells}:
        mine = [r for r in cells if r["method"] == method]
        names = [methods_table.bar_name(r) for r in mine]
        assert len(set(names)) == len(names) and names[0] == "method*"
        assert all(r["schedule"] in name for r, name in zip(mine, names) if r["schedule"] != "none")


def test_a_fresh_machine_resumes_from_the_snapshot(table, tmp_path, monkeypatch):
    snapshot = table.parent / "snapshot"
    carried = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    # the outputs and each finished run's results, no checkpoints
    assert {"results.json", "results.csv", "results.md", "methods.png"} <= set(carried)
    assert all(not p.startswith("runs/") or p.endswith(("/val.json", "/test.json")) for p in carried)
    assert json.loads((snapshot / "results.json").read_text())["rows"] == json.loads((table / "results.json").read_text())["rows"]

    def refuse(*args, **kwargs):
        raise AssertionError("a run the snapshot holds was trained again")

    import budget_table

    monkeypatch.setattr(budget_table, "run_train", refuse)
    monkeypatch.setattr(budget_table.BudgetTable, "floor_features", refuse)  # the floors travel too
    fresh = tmp_path / "fresh"
    assert run_table(fresh, "--snapshot", str(snapshot)) == 0
    assert json.loads((fresh / "results.json").read_text())["rows"] == json.loads((table / "results.json").read_text())["rows"]


def test_a_fresh_machine_refuses_a_changed_stage_one_unless_allowed(table, tmp_path, monkeypatch, capsys):
    # the fresh machine re-embeds stage one; finished runs trained on another shard set must not
    # mix with new ones unless the user says so, and then the change is on record
    import budget_table

    snapshot = tmp_path / "snapshot"
    shutil.copytree(table.parent / "snapshot", snapshot)
    payload = json.loads((snapshot / "results.json").read_text())
    manifest = json.loads((Path(payload["stage_one"]["shards"]) / "manifest.json").read_text())
    assert payload["stage_one"]["checksums"] == budget_table.stage_one_checksums(manifest)
    shard = manifest["shards"][0]["name"]
    payload["stage_one"]["checksums"]["shards"][shard] = "0" * 64  # as if the finished runs had trained on another set
    (snapshot / "results.json").write_text(json.dumps(payload))

    def refuse(*args, **kwargs):
        raise AssertionError("a run was trained on a changed stage one")

    with monkeypatch.context() as patch:
        patch.setattr(budget_table, "run_train", refuse)
        capsys.readouterr()
        code = run_table(tmp_path / "fresh", "--snapshot", str(snapshot))
        assert_one_line_error(code, capsys.readouterr().err, f"differs from the one the finished runs in {snapshot / 'results.json'} trained on ({shard})")
    assert run_table(tmp_path / "fresh", "--snapshot", str(snapshot), "--allow-stage-one-change") == 0
    stage_one = json.loads((snapshot / "results.json").read_text())["stage_one"]
    assert stage_one["checksums"] == budget_table.stage_one_checksums(manifest)
    assert [change["differing"] for change in stage_one["changes"]] == [[shard]]


def test_git_commits_what_the_committed_snapshot_carries():
    # `runs/` in .gitignore once matched benchmarks/results/methods-cpu/runs/ too, so the committed
    # snapshot held the outputs but none of the finished runs a fresh machine resumes from
    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    snapshot = Path("benchmarks/results/methods-cpu")
    samples = [snapshot / pattern.replace("e*", "e20").replace("seed*", "seed0").replace("*", "byol-100") for pattern in methods_table.FINISHED_RUN_GLOBS]
    ignored = subprocess.run(["git", "check-ignore", *map(str, samples)], cwd=repo, capture_output=True, text=True)
    assert ignored.returncode == 1, f"git ignores: {ignored.stdout.split()}"  # 1: none of them is ignored


def test_rerun_trains_nothing_again(table, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    import budget_table  # the methods table trains through BudgetTable.train

    monkeypatch.setattr(budget_table, "run_train", refuse)
    before = json.loads((table / "results.json").read_text())["rows"]
    assert run_table(table) == 0
    assert json.loads((table / "results.json").read_text())["rows"] == before


def test_an_unknown_method_is_one_line(tmp_path, capsys):
    code = methods_table.main(["--tiny", "--out", str(tmp_path / "t"), "--methods", "byol,mae", "--data", str(FIXTURE_ROOT)])
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == [
        "error: unknown method(s) mae; methods are: " + ", ".join(methods_table.METHOD_LABELS)
    ]


@pytest.mark.parametrize("switch_step", [None, 7])
def test_seed_zero_alone_gets_the_constant_schedule_when_its_switch_never_fired(tmp_path, switch_step):
    # until the switch fires an adaptive run trains the ReLA loss alone, so the first pass over the
    # methods (seed 0 of a 3-seed table) must already run the constant-schedule cell
    profile = dataclasses.replace(methods_table.tiny(methods_table.PROFILES["cpu"]), seeds=3)
    table = methods_table.MethodsTable(profile, tmp_path, FIXTURE_ROOT, ["byol"], device="cpu")
    table.shards, table.splits = "shards", SimpleNamespace(val=Path("val"), test=Path("test"))
    asked = []

    def record(cell, seed, epochs, shards, split, split_name):
        asked.append((cell.key, cell.schedule, seed, split_name))
        fired = switch_step if cell.kind == "rela" else None
        score = {"constant:0.5": 0.9}.get(cell.schedule, 0.8)
        return {"kind": cell.kind, "schedule": cell.schedule, "rela_switch_step": fired, "linear_probe_top1": score}

    table.method_run = record
    table.cells_of("byol", range(1))
    constant = [a for a in asked if a[0].startswith("byol-rela-random-20-constant")]
    if switch_step is None:
        # the three fractions scored on validation, then the preferred one on the test split
        assert sorted(a[1] for a in constant if a[3] == "val") == [f"constant:{f}" for f in methods_table.CONSTANT_FRACTIONS]
        assert [a[1:] for a in constant if a[3] == "test"] == [("constant:0.5", 0, "test")]
    else:
        assert constant == []
    assert {a[2] for a in asked} == {0}


def test_the_other_seeds_20_percent_cells_run_before_their_method_star(tmp_path):
    # a method* run is five times a 20% run: the other seeds' 20% cells of every method, which carry
    # the comparison of ReLA with the method at 20%, come before any other seed's method*
    profile = dataclasses.replace(methods_table.tiny(methods_table.PROFILES["cpu"]), seeds=3)
    table = methods_table.MethodsTable(profile, tmp_path, FIXTURE_ROOT, ["byol", "simclr"], device="cpu")
    table.shards, table.splits = "shards", SimpleNamespace(val=Path("val"), test=Path("test"))
    asked, cache = [], {}

    def record(cell, seed, epochs, shards, split, split_name):  # cached per run, as method_run is
        key = (cell.key, seed, epochs, split_name)
        if key not in cache:
            asked.append((cell.method, cell.kind, seed, split_name))
            cache[key] = {"kind": cell.kind, "schedule": cell.schedule, "rela_switch_step": None, "linear_probe_top1": 0.8}
        return cache[key]

    table.method_run = record
    results: dict = {}
    table.run_passes(results, lambda: None)
    tested = [a for a in asked if a[3] == "test"]
    first_star = min(i for i, (_, kind, seed, _) in enumerate(tested) if seed > 0 and kind == "star")
    assert {(m, k, s) for m, k, s, _ in tested[:first_star] if s > 0} == {
        (m, k, s) for m in ("byol", "simclr") for k in ("baseline", "rela", "rela-constant") for s in (1, 2)
    }
    # every cell of every seed ran once on the test split, and each method reports them all
    assert len(tested) == len(set(tested)) == 2 * 4 * 3
    assert all(len(results[m]) == 4 * 3 for m in ("byol", "simclr"))


def test_a_resumed_table_reports_the_finished_cells_before_their_turn(table, monkeypatch):
    # an invocation cut off before it reaches a method must still report that method's finished cells
    before = json.loads((table / "results.json").read_text())["rows"]

    def cut_off(self, *args, **kwargs):
        raise RuntimeError("cut off before the first method's turn")

    monkeypatch.setattr(methods_table.MethodsTable, "cells_of", cut_off)
    with pytest.raises(RuntimeError, match="cut off"):
        run_table(table)
    assert json.loads((table / "results.json").read_text())["rows"] == before


def test_a_resumed_table_never_reports_a_variant_s_runs_as_its_base_method(tmp_path):
    # "dino-2views-*" directories share the "dino-" prefix: a resumed table listed them under DINO too
    profile = methods_table.tiny(methods_table.PROFILES["cpu"])
    table = methods_table.MethodsTable(profile, tmp_path, FIXTURE_ROOT, ["dino", "dino-2views"], device="cpu")
    for method in ("dino", "dino-2views"):
        run = table.runs_dir(profile.epochs) / f"{method}-100" / "seed0" / "test.json"
        run.parent.mkdir(parents=True)
        run.write_text(json.dumps({"method": method, "cell": f"{method}-100", "kind": "star", "schedule": "none"}))
    assert [r["cell"] for r in table.finished_cells("dino")] == ["dino-100"]
    assert [r["cell"] for r in table.finished_cells("dino-2views")] == ["dino-2views-100"]


def test_train_seconds_are_averaged_per_cpu_never_across_machines():
    # seeds of one cell may train on different machines (--snapshot); their seconds do not mix
    runs = [
        {"cpu": "AMD EPYC (no native bf16)", "train_seconds": 400.0},
        {"cpu": "Intel(R) Xeon(R) Processor (native bf16)", "train_seconds": 300.0},
        {"cpu": "Intel(R) Xeon(R) Processor (native bf16)", "train_seconds": 340.0},
        {"train_seconds": 90.0},
    ]
    assert methods_table.train_seconds_by_cpu(runs) == ("AMD EPYC (no native bf16): 400; Intel(R) Xeon(R) Processor (native bf16): 320; not recorded: 90")


def test_a_variant_entry_trains_its_method_with_its_settings(tmp_path, monkeypatch):
    # "dino-2views" is DINO with --local-views 0: the TrainConfig the table builds for it must say so,
    # while a plain "dino" entry keeps lightly's recipe (local_views None: its 6 local views)
    import budget_table

    profile = methods_table.tiny(methods_table.PROFILES["cpu"])
    table = methods_table.MethodsTable(profile, tmp_path, FIXTURE_ROOT, ["dino", "dino-2views"], device="cpu")
    table.splits = SimpleNamespace(train=Path("train"), val=Path("val"), test=Path("test"))
    configs = []

    class Stop(Exception):
        pass

    def capture(config):
        configs.append(config)
        raise Stop

    monkeypatch.setattr(budget_table, "run_train", capture)
    for entry in ("dino", "dino-2views"):
        with pytest.raises(Stop):
            table.method_run(methods_table.MethodCell(entry, "star"), 0, profile.epochs, "shards", Path("val"), "val")
    plain, variant = configs
    assert (plain.method, plain.local_views) == ("dino", None)
    assert (variant.method, variant.local_views) == ("dino", 0)
    assert variant.out_dir.parts[-3:] == ("dino-2views-100", "seed0", "train")  # its own runs, never DINO's
    assert methods_table.MethodCell("dino-2views", "baseline").label == "DINO (2 views) 20%"


def _row(values: list[float]) -> dict:
    mean, std = methods_table.mean_std(values)
    return {"linear_probe": mean, "linear_probe_std": std, "seeds": len(values)}


def test_the_reading_judges_a_difference_by_welchs_test_over_the_seeds():
    from scipy.stats import ttest_ind

    rela, star = [0.8697, 0.8650, 0.8744], [0.8843, 0.8712, 0.8749]
    comparison = methods_table.compare_cells(_row(rela), _row(star))
    # the summary-statistics path agrees with Welch's test on the seeds' own values
    assert comparison["p_value"] == pytest.approx(ttest_ind(rela, star, equal_var=False).pvalue)
    assert comparison["difference"] == pytest.approx(sum(rela) / 3 - sum(star) / 3)
    assert comparison["standard_error"] ** 2 == pytest.approx(_row(rela)["linear_probe_std"] ** 2 / 3 + _row(star)["linear_probe_std"] ** 2 / 3)
    # a gap the seeds cannot tell from noise, a resolved one each way, and a single seed
    assert comparison["difference"] < 0 and not methods_table.resolved(comparison)
    assert methods_table.reaches_method_star(comparison) == "within the noise"
    far_below = methods_table.compare_cells(_row([0.80, 0.801, 0.799]), _row(star))
    assert methods_table.resolved(far_below) and methods_table.reaches_method_star(far_below) == "no"
    assert methods_table.reaches_method_star(methods_table.compare_cells(_row([0.95, 0.951, 0.949]), _row(star))) == "yes, resolved"
    one_seed = methods_table.compare_cells(_row(rela), _row([0.8843]))
    assert one_seed["p_value"] is None and methods_table.resolved(one_seed) is None
    assert methods_table.reaches_method_star(one_seed).startswith("not judged")
