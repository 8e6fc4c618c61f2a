"""The built-in methods beyond BYOL, SimCLR and DINO: Barlow Twins, VICReg, MoCo v2, SwaV and
supervised training, on the real fixture (their views against lightly's transforms are checked in
tests/test_batched_views.py::test_both_view_paths_make_lightlys_recipes)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_DIR, assert_one_line_error, run_cli, small_embed_config
from distributed_worker import FIRST_STEP_GRADIENTS
from test_torchrun import GRADIENT_TOLERANCE, WORKER, torchrun

from rela_pipeline import ReLA, ShardBatches, build_backbone
from rela_pipeline.batched_views import batched_method_views, batched_rela_views
from rela_pipeline.errors import RelaError
from rela_pipeline.methods import METHODS, BarlowTwins, MoCo, Supervised, SwaV, VICReg, build_method
from rela_pipeline.recipes import method_recipes
from rela_pipeline.stages.embed import run_embed
from rela_pipeline.stages.train import TrainConfig, run_train

NEW_METHODS = ["barlowtwins", "vicreg", "moco", "swav", "supervised"]


def config(shards: Path, out: Path, **overrides) -> TrainConfig:
    """Fast CPU settings: ConvNet student, 32 px, batch 32 (9 steps per epoch on 300 samples)."""
    settings = dict(shards=str(shards), out_dir=out, epochs=2, batch_size=32, num_workers=0, log_every=9, progress=False, device="cpu", logger="none")
    settings.update(overrides)
    return TrainConfig(**settings)


def intervals(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "event" not in r]


def test_every_method_is_built_with_its_views_and_its_loss_is_an_fp32_scalar_with_gradients():
    """At the defaults (lightly's head sizes): one forward and backward on one batch of each
    method's own views under bf16 autocast (the losses are still computed in fp32)."""
    assert set(NEW_METHODS) <= set(METHODS)
    images = (torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    labels = torch.arange(8) % 3
    for name in NEW_METHODS:
        torch.manual_seed(0)
        method = build_method(name, build_backbone("convnet"), num_classes=3)
        views = batched_method_views(name, 32)(images, torch.Generator().manual_seed(1))
        assert len(views) == len(method_recipes(name, 32)) == (8 if name == "swav" else 2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = method(views, labels) if getattr(method, "needs_labels", False) else method(views)
        assert loss.shape == () and loss.dtype == torch.float32 and math.isfinite(loss.item()), name
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters()), name
    assert isinstance(build_method("moco", build_backbone("convnet"), "constant"), MoCo)
    with pytest.raises(RelaError, match="supervised needs a labelled shard set"):
        build_method("supervised", build_backbone("convnet"))


def test_building_any_method_warns_nothing():
    """Every built-in method builds without a warning; DINO's head alone used to print lightly
    1.6's ``torch.nn.utils.weight_norm`` FutureWarning on every run."""
    import warnings

    for name in METHODS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build_method(name, build_backbone("convnet"), num_classes=3)
        assert [str(w.message) for w in caught] == [], name
    head_keys = build_method("dino", build_backbone("convnet")).head.state_dict()
    assert {"weight_g", "weight_v"} <= {key.rsplit(".", 1)[-1] for key in head_keys}, "lightly's weight-norm layer, unchanged"


def test_moco_memory_bank_is_in_the_state_dict_and_restored():
    """lightly registers the bank as non-persistent buffers; MoCo makes them persistent so a
    checkpoint keeps the bank and resume continues with it."""
    torch.manual_seed(0)
    moco = MoCo(build_backbone("convnet"), memory_bank_size=64)
    state = moco.state_dict()
    bank_key, ptr_key = "criterion.memory_bank.bank", "criterion.memory_bank.bank_ptr"
    assert state[bank_key].shape == (64, 128) and int(state[ptr_key]) == 0
    views = [torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)]
    moco(views).backward()
    assert int(moco.state_dict()[ptr_key]) == 16
    fresh = MoCo(build_backbone("convnet"), memory_bank_size=64)
    fresh.load_state_dict(moco.state_dict())
    assert torch.equal(fresh.criterion.memory_bank.bank, moco.criterion.memory_bank.bank) and int(fresh.criterion.memory_bank.bank_ptr) == 16


#: How each method trains alone in the loss-falls test: the factory (None: the built-in by name at
#: its defaults), steps between log records, and the record the fall is measured from. Barlow Twins
#: with a 256-d projector: with lightly's 2048-d one, batches of 32 estimate a 2048 x 2048
#: cross-correlation and the loss is too noisy to fall visibly in 18 steps. VICReg with a 512-d
#: projector for speed, logged every 3 steps (its 2048-d default falls too, 32 -> 22 in 18 steps,
#: at several times the cost; the CLI runs below and the fp32-scalar test build both at their defaults). MoCo with a one-batch
#: memory bank, measured from the second record: while the random initial bank fills with real
#: keys the loss rises (harder negatives), which a 4096-key bank does for 128 steps.
ALONE = {
    "barlowtwins": (lambda backbone: BarlowTwins(backbone, projection_dim=256), 9, 0),
    "vicreg": (lambda backbone: VICReg(backbone, projection_dim=512), 3, 0),
    "moco": (lambda backbone: MoCo(backbone, memory_bank_size=32), 3, 1),
    "swav": (None, 3, 0),
    "supervised": (None, 9, 0),
}


@pytest.mark.parametrize("name", NEW_METHODS)
def test_method_trains_without_and_with_rela_and_its_loss_falls(name, shard_set, tmp_path):
    """Without ReLA (``none``: the method's loss from the first step) its loss falls over 18
    steps; through the CLI with ReLA for the whole run (``constant:1.0``) the ReLA loss falls."""
    shards, _ = shard_set
    factory, log_every, start = ALONE[name]
    custom = dict(method_factory=factory, ssl_views=batched_method_views(name, 32)) if factory else {}
    run_train(config(shards, tmp_path / "alone", method=name, rela_schedule="none", log_every=log_every), **custom)
    logged = intervals(tmp_path / "alone")
    assert all(r["phase"] == "ssl" and r["rela_loss"] is None for r in logged)
    first, last = logged[start]["ssl_loss"], logged[-1]["ssl_loss"]
    assert last < first - 0.02 * abs(first), (name, [r["ssl_loss"] for r in logged])

    code, _, stderr = run_cli(
        "train", "--shards", str(shards), "--out", str(tmp_path / "rela"), "--method", name, "--epochs", "2", "--batch-size", "32",
        "--num-workers", "0", "--device", "cpu", "--log-every", "9", "--logger", "none", "--rela-schedule", "constant:1.0", "--no-verify",
    )  # fmt: skip
    assert code == 0, stderr
    logged = intervals(tmp_path / "rela")
    assert [r["phase"] for r in logged] == ["rela", "rela"]
    assert logged[-1]["rela_loss"] < logged[0]["rela_loss"] - 0.01, [r["rela_loss"] for r in logged]
    assert json.loads((tmp_path / "rela" / "summary.json").read_text())["method"] == name


def test_supervised_on_an_unlabelled_set_is_one_error_line(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for index, image in enumerate(sorted(TRAIN_DIR.glob("*/*.png"))[::10]):  # 30 images, no class folders
        shutil.copy(image, flat / f"{index:03d}.png")
    manifest = run_embed(small_embed_config(flat, tmp_path / "shards"))
    assert manifest["dataset"]["labelled"] is False
    code, _, stderr = run_cli(
        "train", "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "run"), "--method", "supervised",
        "--batch-size", "8", "--num-workers", "0", "--device", "cpu", "--no-verify",
    )  # fmt: skip
    assert_one_line_error(code, stderr, "--method supervised needs a labelled shard set")
    assert not (tmp_path / "run").exists()  # refused before training: no run directory left


def test_built_in_methods_in_a_users_loop_on_shard_batches(shard_set):
    """The own-loop pattern of docs/custom-methods.md with built-in methods: SwaV's multi-crop after
    the switch, and supervised training, which takes the batch's labels."""
    shards, _ = shard_set
    batches = ShardBatches(str(shards), batch_size=32, image_size=32, data_ratio=0.5, device="cpu", num_workers=0)
    for name in ("swav", "supervised"):
        torch.manual_seed(0)
        backbone = build_backbone("convnet")
        method = build_method(name, backbone, num_classes=len(batches.class_names))
        model = ReLA(method, target_dim=min(backbone.feature_dim, batches.target_dim), schedule="constant:0.5")
        views = {"rela": batched_rela_views(32), "ssl": batched_method_views(name, 32)}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        total, step, phases = 2 * len(batches), 0, []
        for epoch in range(2):
            for batch in batches.epoch(epoch):
                made = batch.views(views[model.phase])
                out = model(made, batch.target, labels=batch.label)  # labels: used by methods with needs_labels
                optimizer.zero_grad()
                out.loss.backward()
                optimizer.step()
                model.step_end(out, step, total)
                phases.append((out.phase, len(made)))
                step += 1
        assert phases == [("rela", 2)] * (total // 2) + [("ssl", 8 if name == "swav" else 2)] * (total - total // 2), name
    with pytest.raises(RelaError, match="Supervised needs the batch's labels"):
        ReLA(Supervised(build_backbone("convnet"), 10), target_dim=8, schedule="none")([torch.zeros(2, 3, 32, 32)] * 2)
    assert isinstance(build_method("swav", build_backbone("convnet")), SwaV) and isinstance(build_method("vicreg", build_backbone("convnet")), VICReg)


@pytest.mark.parametrize("name", ["barlowtwins", "swav"])
def test_two_processes_compute_the_one_process_gradient_through_the_cross_rank_term(name, shard_set, tmp_path):
    """The method's own loss from the first step, BatchNorm-free (tests/distributed_worker.py):
    Barlow Twins' batch normalisation and cross-correlation over the embeddings gathered from both
    ranks, SwaV's Sinkhorn codes over both ranks' scores. Without the cross-rank term the two ranks'
    losses would be those of two half batches and the averaged gradient would differ from the
    one-process one by far more than float32 rounding (tolerance as in tests/test_torchrun.py)."""
    shards, _ = shard_set
    alone = subprocess.run([sys.executable, WORKER, str(shards), str(tmp_path / "one"), name], capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    done = torchrun(WORKER, str(shards), str(tmp_path / "two"), name, python=True)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (torch.load(tmp_path / run / FIRST_STEP_GRADIENTS, weights_only=True) for run in ("one", "two"))
    assert len(one) == len(two) > 10  # backbone, head (and prototypes) and probe parameters
    tolerance = GRADIENT_TOLERANCE
    scale = max(g.norm().item() for g in one)
    compared = 0
    for index, (alone_grad, ddp_grad) in enumerate(zip(one, two)):
        assert alone_grad.shape == ddp_grad.shape, index
        if alone_grad.norm() < 1e-6 * scale:
            # Zero in exact arithmetic, rounding noise in both runs: Barlow Twins' loss normalises
            # every embedding dimension over the batch, so the last layer's bias does not change it.
            assert ddp_grad.norm() < 1e-5 * scale, (index, ddp_grad.norm().item(), scale)
            continue
        relative = ((alone_grad - ddp_grad).norm() / alone_grad.norm()).item()
        assert relative < tolerance, (index, relative, tolerance)
        compared += 1
    assert compared >= len(one) - 1
