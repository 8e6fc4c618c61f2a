"""The training-throughput benchmark runs at a tiny size and reports every data path with consistent ratios."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import train_throughput  # noqa: E402


def test_train_throughput_reports_both_phases_with_consistent_ratios(shard_set, tmp_path):
    shards, _ = shard_set
    out = tmp_path / "bench.json"
    code = train_throughput.main([
        "--shards", str(shards), "--backbone", "convnet", "--batch-size", "16", "--steps", "12",
        "--warmup", "2", "--rounds", "2", "--device", "cpu", "--num-workers", "0", "--out", str(out),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    assert [row["phase"] for row in result["rows"]] == ["ReLA phase", "BYOL phase"]
    assert result["host"]["precision"] in ("bf16", "fp32")
    for row in result["rows"]:
        for column in ("model alone", "model alone, fp32", *train_throughput.PIPELINES):
            assert row[column] > 0, column
        assert abs(row["memory / model alone"] - row["memory + device views"] / row["model alone"]) < 0.01
        assert abs(row["memory / PIL (before)"] - row["memory + device views"] / row["PIL stream (before)"]) < 0.01
        assert row["memory: data_load_s"] > 0  # the one-off decoding pass is reported, not hidden in the rate
        assert all(len(values) == 2 for values in row["rounds"].values())
