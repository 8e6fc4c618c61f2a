"""The training-throughput benchmark runs at a tiny size and reports consistent numbers."""

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
        "--warmup", "2", "--device", "cpu", "--num-workers", "0", "--out", str(out),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    assert [row["phase"] for row in result["rows"]] == ["ReLA phase", "BYOL phase"]
    for row in result["rows"]:
        assert row["model_only_img_s"] > 0 and row["pipeline_img_s"] > 0
        assert abs(row["ratio"] - row["pipeline_img_s"] / row["model_only_img_s"]) < 0.01
