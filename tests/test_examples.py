"""The docs' examples (``docs/custom-methods.md``: the run_train example and the own-loop example) and the
Lightning example run as written, on the real fixture."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


EXAMPLES_PAGE = ROOT / "docs" / "custom-methods.md"


def docs_block(containing: str, page: Path = EXAMPLES_PAGE) -> str:
    """The first ```python block of a docs page whose text, or the line just before it, contains ``containing``."""
    text = page.read_text()
    for match in re.finditer(r"([^\n]*)\n```python\n(.*?)```", text, re.S):
        if containing in match.group(1) or containing in match.group(2):
            return match.group(2)
    raise AssertionError(f"no python block with {containing!r} in {page.relative_to(ROOT)}")


def test_docs_own_loop_example_runs_as_written_and_trains(shard_set, tmp_path, monkeypatch):
    shards, _ = shard_set
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    os.symlink(shards, tmp_path / "runs" / "demo" / "shards")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(docs_block("class VICRegLite"), namespace)  # defines the method (the run_train call runs too)
    exec(docs_block("own-loop example"), namespace)
    batches, model = namespace["batches"], namespace["model"]
    assert namespace["step"] == 2 * len(batches) > 0
    assert batches.data_path == "memory" and model.phase == "rela"  # 2 steps: the adaptive switch has not fired
    initial = namespace["build_backbone"]("convnet").state_dict()
    changed = [k for k, v in model.backbone.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, initial[k])]
    assert changed  # the loop trained the backbone
    assert (tmp_path / "runs" / "vicreg-rela" / "backbone.pt").is_file()  # the run_train example ran too


def test_lightning_example_trains_on_shard_batches(shard_set):
    shards, _ = shard_set
    spec = importlib.util.spec_from_file_location("lightning_rela", ROOT / "examples" / "lightning_rela.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    untrained = example.build_backbone("convnet").state_dict()
    module = example.train(str(shards), epochs=2, batch_size=32, data_ratio=0.5, schedule="constant:0.5")
    steps = 2 * (150 // 32)
    assert module.steps_done == steps and module.trainer.global_step == steps
    assert module.rela.schedule.switch_step == steps // 2 and module.rela.phase == "ssl"  # ReLA, then BYOL's loss
    trained = module.rela.backbone.state_dict()
    assert any(not torch.equal(trained[k], untrained[k]) for k in trained if trained[k].dtype.is_floating_point)
