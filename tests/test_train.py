"""Stage two on the real fixture: training, budget accounting, resume, custom methods, bad input."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from rela_pipeline.errors import RelaError
from rela_pipeline.models import build_backbone, load_backbone_checkpoint, safe_torch_load, save_backbone_checkpoint
from rela_pipeline.priors import load_prior
from rela_pipeline.stages.embed import run_embed
from rela_pipeline.stages.evaluate import EvalConfig, run_eval
from rela_pipeline.stages.train import TrainConfig, run_train
from rela_pipeline.stages.train import loop as train_loop
from tests.conftest import TEST_DIR, TRAIN_DIR, assert_one_line_error, run_cli, small_embed_config


def config(shards: Path, out: Path, **overrides) -> TrainConfig:
    """Fast CPU settings: ConvNet student, 32 px, batch 32 (9 steps per epoch on 300 samples)."""
    settings = dict(shards=str(shards), out_dir=out, epochs=2, batch_size=32, num_workers=0, log_every=3, progress=False, device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def intervals(run: Path) -> list[dict]:
    return [r for r in records(run) if "event" not in r]


def test_train_then_eval_end_to_end_and_the_rela_loss_falls(shard_set, tmp_path):
    shards, manifest = shard_set
    run = tmp_path / "run"
    summary = run_train(config(shards, run, epochs=6, log_every=9, rela_schedule="constant:1.0"))
    logged = intervals(run)
    assert [r["step"] for r in logged] == [9, 18, 27, 36, 45, 54]
    assert all(r["phase"] == "rela" and r["ssl_loss"] is None for r in logged)
    assert not [r for r in records(run) if r.get("event") == "rela_switch"]  # ReLA to the end: no switch to log
    first, last = logged[0]["rela_loss"], logged[-1]["rela_loss"]
    assert last < first - 0.03, (first, last)  # the student aligns with the transported prior targets
    for key in ("loss", "rho", "probe_acc", "lr", "images_per_s", "images_seen", "budget_fraction"):
        assert key in logged[-1]
    assert summary["budget"] == {"steps": 54, "images_seen": 54 * 32, "full_run_steps": 54, "fraction": 1.0}

    # The trained backbone is a checkpoint: loadable weights-only, usable as a stage-one prior, evaluable.
    payload = torch.load(run / "backbone.pt", weights_only=True)
    assert payload["step"] == 54 and payload["backbone"] == {"name": "convnet", "cifar_stem": True}
    prior = load_prior(f"checkpoint:{run / 'backbone.pt'}")
    reembedded = run_embed(small_embed_config(TRAIN_DIR, tmp_path / "reembed", prior=f"checkpoint:{run / 'backbone.pt'}", image_size=None))
    assert reembedded["prior"]["embedding_dim"] == 256 and prior.preprocessing.crop_size == 32
    result = run_eval(
        EvalConfig(
            checkpoint=run / "backbone.pt", train_dir=TRAIN_DIR, test_dir=TEST_DIR, device="cpu", num_workers=0, probe_epochs=5, knn_k=20, progress=False
        )
    )
    assert result["step"] == 54 and 0.0 <= result["linear_probe"]["top1"] <= 1.0 and result["knn"]["top1"] > 0.2


def test_constant_schedule_switches_to_the_method_loss_and_logs_the_step(shard_set, tmp_path):
    shards, _ = shard_set
    run = tmp_path / "run"
    summary = run_train(config(shards, run, method="simclr", rela_schedule="constant:0.5"))
    assert summary["rela_switch_step"] == 9  # ceil(0.5 * 18 steps)
    events = [r for r in records(run) if r.get("event") == "rela_switch"]
    assert len(events) == 1 and events[0]["step"] == 9
    logged = intervals(run)
    assert [r["phase"] for r in logged] == ["rela"] * 3 + ["ssl"] * 3
    assert all(r["rela_loss"] is None and r["ssl_loss"] is not None for r in logged[3:])


def test_budget_accounting_on_a_dynamic_subset(shard_set, tmp_path):
    shards, _ = shard_set
    summary = run_train(config(shards, tmp_path / "run", epochs=3, data_ratio=0.5, rela_schedule="none"))
    # 150 samples per epoch -> 4 batches of 32; the full run would take 9 per epoch.
    assert summary["budget"]["steps"] == 12 and summary["budget"]["images_seen"] == 12 * 32
    assert summary["budget"]["full_run_steps"] == 27 and summary["budget"]["fraction"] == pytest.approx(12 / 27, abs=1e-6)
    epochs = [r for r in records(tmp_path / "run") if r.get("event") == "epoch_end"]
    assert [e["epoch_steps"] for e in epochs] == [4, 4, 4]


def test_pil_views_follow_the_one_epoch_plan_on_both_data_paths(shard_set):
    """The PIL path reads its batches from the same plan and decoder as the device path: the same
    subset, order and images on the memory and stream paths, and per-image views that are a
    function of the batch's seed alone (the same on both paths, other for another batch)."""
    from rela_pipeline.shards.batches import ShardBatches
    from rela_pipeline.subsets import SubsetSampler
    from rela_pipeline.views import PerImageViews, byol_views, rela_views

    shards, _ = shard_set
    paths = {
        path: ShardBatches(
            str(shards),
            batch_size=20,
            image_size=32,
            target_dim=16,
            data_ratio=0.4,
            seed=1,
            device="cpu",
            data_path=path,
            num_workers=2,
            verify=False,
            progress=False,
        )
        for path in ("memory", "stream")
    }
    sampler = SubsetSampler(paths["memory"].num_samples, 0.4, seed=1, min_size=20)
    views = PerImageViews(rela_views(32))
    for epoch in (0, 1):
        batches = {path: list(data.epoch(epoch)) for path, data in paths.items()}
        assert len(batches["memory"]) == len(batches["stream"]) == 120 // 20
        seen = sorted(int(i) for b in batches["memory"] for i in b.index)
        assert set(seen) <= set(sampler.indices(epoch).tolist()) and len(seen) == 120
        for memory, stream in zip(batches["memory"], batches["stream"]):
            assert torch.equal(memory.index, stream.index) and torch.equal(memory.images, stream.images)
            made = memory.views(views)
            assert len(made) == 2 and made[0].shape == (20, 3, 32, 32) and made[0].dtype == torch.float32
            assert all(torch.equal(a, b) for a, b in zip(made, stream.views(views)))  # same seed, same views
        assert not torch.equal(batches["memory"][0].views(views)[0], batches["memory"][1].views(views)[0])
    ssl = batches["memory"][0].views(PerImageViews(byol_views(32)))
    assert len(ssl) == 2 and not torch.equal(ssl[0], batches["memory"][0].views(views)[0])


def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(shard_set, tmp_path, monkeypatch):
    shards, _ = shard_set
    straight = tmp_path / "straight"
    run_train(config(shards, straight, epochs=3, rela_schedule="constant:0.5"))

    crashed = tmp_path / "crashed"
    crash_after_first_epoch(monkeypatch, lambda: run_train(config(shards, crashed, epochs=3, rela_schedule="constant:0.5")))
    assert torch.load(crashed / "checkpoints" / "last.pt", weights_only=True)["step"] == 9
    assert not (crashed / "backbone.pt").exists()

    summary = run_train(config(shards, crashed, epochs=3, rela_schedule="constant:0.5", resume=True))
    assert summary["budget"]["steps"] == 27 and summary["rela_switch_step"] == 14
    steps = [r["step"] for r in intervals(crashed)]
    assert steps == sorted(set(steps)) and steps[-1] == 27  # no step logged twice
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(crashed / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()  # both invocations' event files, read as one run
    assert [e.step for e in events.Scalars("train/loss")] == steps
    resumed, _ = load_backbone_checkpoint(crashed / "backbone.pt")
    reference, _ = load_backbone_checkpoint(straight / "backbone.pt")
    for (name, a), b in zip(resumed.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=f"{name} differs after resume")


def crash_after_first_epoch(monkeypatch, run) -> None:
    """Call ``run`` with checkpointing patched to raise KeyboardInterrupt right after epoch 0's checkpoint."""
    real_save = train_loop.save_checkpoint

    def save_then_crash(out, cfg, *args):
        real_save(out, cfg, *args)
        if args[-3] == 0:  # the epoch argument
            raise KeyboardInterrupt

    monkeypatch.setattr(train_loop, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(train_loop, "save_checkpoint", real_save)


@pytest.mark.parametrize("first, then", [("memory", "stream"), ("stream", "memory")])
def test_resume_across_data_paths_matches_an_uninterrupted_run(shard_set, tmp_path, monkeypatch, first, then):
    shards, _ = shard_set
    straight = tmp_path / "straight"
    reference_summary = run_train(config(shards, straight, epochs=2, data_path=then, rela_schedule="constant:0.5"))
    crashed = tmp_path / "crashed"
    crash_after_first_epoch(monkeypatch, lambda: run_train(config(shards, crashed, epochs=2, data_path=first, rela_schedule="constant:0.5")))
    summary = run_train(config(shards, crashed, epochs=2, data_path=then, rela_schedule="constant:0.5", resume=True))
    assert summary["resolved"]["data_path"] == then and summary["budget"] == reference_summary["budget"]
    resumed, _ = load_backbone_checkpoint(crashed / "backbone.pt")
    reference, _ = load_backbone_checkpoint(straight / "backbone.pt")
    for (name, a), b in zip(resumed.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=f"{name} differs after resuming on the {then} path")


def test_resume_refuses_other_settings_and_runs_need_a_flag_to_reuse_a_directory(shard_set, tmp_path):
    shards, _ = shard_set
    run = tmp_path / "run"
    run_train(config(shards, run, epochs=1, rela_schedule="none"))
    with pytest.raises(RelaError, match="not empty"):
        run_train(config(shards, run, epochs=1, rela_schedule="none"))
    with pytest.raises(RelaError, match="different settings.*backbone"):
        run_train(config(shards, run, epochs=1, rela_schedule="none", backbone="resnet18", resume=True))
    summary = run_train(config(shards, run, epochs=1, rela_schedule="none", overwrite=True))
    assert summary["budget"]["steps"] == 9


class ToyMethod(nn.Module):
    """A user-defined SSL method: a predictor on top of the backbone, a plain regression loss."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.predictor = nn.Linear(backbone.feature_dim, backbone.feature_dim)
        self.calls = 0
        self.momentum_steps: list[int] = []

    def forward(self, views):
        self.calls += 1
        a, b = self.backbone(views[0]), self.backbone(views[1])
        return nn.functional.mse_loss(self.predictor(a), b.detach())

    def update_momentum(self, step, total_steps):
        self.momentum_steps.append(step)


def recording_factory(method_class):
    """A ``method_factory`` that also keeps the method it builds: ``(made, factory)``."""
    made = []

    def factory(backbone):
        made.append(method_class(backbone))
        return made[-1]

    return made, factory


def test_any_method_gets_rela_through_the_python_api(shard_set, tmp_path):
    from rela_pipeline.batched_views import batched_simclr_views

    shards, _ = shard_set
    made, factory = recording_factory(ToyMethod)
    summary = run_train(
        config(shards, tmp_path / "run", method="toy", rela_schedule="constant:0.5"), method_factory=factory, ssl_views=batched_simclr_views(32)
    )
    toy = made[0]
    assert toy.calls == 9  # only the SSL half of the 18 steps called the method's loss
    assert toy.momentum_steps == list(range(18))  # its momentum hook ran on every step, ReLA phase included
    assert summary["rela_switch_step"] == 9 and summary["method"] == "toy"
    with pytest.raises(RelaError, match="view transform"):
        run_train(config(shards, tmp_path / "other", method="toy"), method_factory=ToyMethod)


def test_the_pil_path_switches_to_the_methods_views_on_the_next_batch(shard_set, tmp_path):
    """Per-image PIL views are made when the loop takes a batch, so the first SSL-phase batch
    already carries DINO's 2 global + 6 local crops (no prefetched ReLA views)."""
    from rela_pipeline.views import dino_views

    shards, _ = shard_set
    made, factory = recording_factory(ViewCounter)
    summary = run_train(
        config(shards, tmp_path / "run", method="toy", rela_schedule="constant:0.5", num_workers=1, augment="pil"),
        method_factory=factory,
        ssl_views=dino_views(32),
    )
    assert summary["rela_switch_step"] == 9
    assert made[0].view_counts == [8] * 9


class ViewCounter(ToyMethod):
    """Records how many views each SSL-phase batch brought."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        self.view_counts: list[int] = []

    def forward(self, views):
        self.view_counts.append(len(views))
        return super().forward(views)


def test_dino_trains_on_multi_crop_views(shard_set, tmp_path):
    """The student sees DINO's 2 global and 6 local crops every step, the teacher follows it by
    EMA (moved from its start, not equal to the student) and the loss's centre is updated."""
    from rela_pipeline.batched_views import batched_method_views
    from rela_pipeline.methods import DINO

    shards, _ = shard_set
    made: list = []

    def factory(backbone):
        method = DINO(backbone)
        method.sizes, method.teacher_start = [], copy.deepcopy(method.backbone_momentum.state_dict())
        backbone.register_forward_pre_hook(lambda module, args: method.sizes.append(args[0].shape[-1]))
        made.append(method)
        return method

    summary = run_train(
        config(shards, tmp_path / "run", method="dino", epochs=1, rela_schedule="none"), method_factory=factory, ssl_views=batched_method_views("dino", 32)
    )
    dino = made[0]
    assert summary["budget"]["steps"] == 9
    assert dino.sizes == [32, 32, 14, 14, 14, 14, 14, 14] * 9
    teacher, student = dino.backbone_momentum.state_dict(), dino.backbone.state_dict()
    moved = [k for k, v in teacher.items() if v.is_floating_point() and not torch.equal(v, dino.teacher_start[k])]
    assert moved and any(not torch.equal(teacher[k], student[k]) for k in moved)
    assert dino.criterion.center.abs().sum() > 0
    losses = [r["ssl_loss"] for r in intervals(tmp_path / "run")]
    assert all(math.isfinite(loss) for loss in losses)


# ----------------------------------------------------------------------------------- bad input


def test_missing_shard_fails_with_its_name_or_is_skipped_with_a_warning(shard_copy, tmp_path, caplog):
    (shard_copy / "shard-000002.tar").unlink()
    code, _, stderr = run_cli(
        "train", "--shards", str(shard_copy), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "32", "--num-workers", "0", "--device", "cpu"
    )
    assert_one_line_error(code, stderr, "shard-000002.tar is missing")
    assert not (tmp_path / "run").exists()
    logging.getLogger("rela_pipeline").addHandler(caplog.handler)  # the CLI stops propagation to the root logger
    try:
        summary = run_train(config(shard_copy, tmp_path / "run", epochs=1, rela_schedule="none", skip_bad_shards=True))
    finally:
        logging.getLogger("rela_pipeline").removeHandler(caplog.handler)
    assert summary["skipped_shards"] == ["shard-000002.tar"]
    assert summary["budget"]["steps"] == (300 - 64) // 32
    assert "skipping" in caplog.text


def test_truncated_shard_is_named_before_training(shard_copy, tmp_path):
    shard = shard_copy / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    code, _, stderr = run_cli(
        "train", "--shards", str(shard_copy), "--out", str(tmp_path / "run"), "--num-workers", "0", "--device", "cpu", "--batch-size", "32"
    )
    assert_one_line_error(code, stderr, "shard-000001.tar is 5000 bytes")
    assert not (tmp_path / "run").exists()


def corrupt_in_place(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[2048:6144] = b"\x00garbage!" * (4096 // 9) + b"\x00" * (4096 % 9)  # same size, broken tar headers and members
    shard.write_bytes(bytes(data))


def test_corrupt_shard_is_refused_by_verification_before_training(shard_copy, tmp_path, caplog):
    corrupt_in_place(shard_copy / "shard-000000.tar")
    code, _, stderr = run_cli(
        "train",
        "--shards",
        str(shard_copy),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--batch-size",
        "32",
        "--no-rela",
    )
    assert_one_line_error(code, stderr, "does not verify (")
    assert "shard-000000.tar" in stderr and "--no-verify" in stderr
    assert not (tmp_path / "run").exists()
    logging.getLogger("rela_pipeline").addHandler(caplog.handler)
    try:
        summary = run_train(config(shard_copy, tmp_path / "run", epochs=1, rela_schedule="none", skip_bad_shards=True))
    finally:
        logging.getLogger("rela_pipeline").removeHandler(caplog.handler)
    assert summary["skipped_shards"] == ["shard-000000.tar"] and "fails verification" in caplog.text
    assert summary["budget"]["steps"] == (300 - 64) // 32


def test_corrupt_shard_fails_while_streaming_without_verification_and_leaves_nothing(shard_copy, tmp_path):
    corrupt_in_place(shard_copy / "shard-000000.tar")
    code, _, stderr = run_cli(
        "train",
        "--shards",
        str(shard_copy),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--batch-size",
        "32",
        "--no-rela",
        "--no-verify",
    )
    assert_one_line_error(code, stderr, "shard-000000.tar")
    assert "does not verify" not in stderr
    assert not (tmp_path / "run").exists()  # stopped before its first checkpoint: nothing half-written kept
    summary = run_train(config(shard_copy, tmp_path / "run", epochs=1, rela_schedule="none", skip_bad_shards=True, verify=False))
    assert 0 < summary["budget"]["steps"] < 9


def test_incompatible_manifest_schema_is_refused(shard_copy, tmp_path):
    manifest = json.loads((shard_copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (shard_copy / "manifest.json").write_text(json.dumps(manifest))
    code, _, stderr = run_cli("train", "--shards", str(shard_copy), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, stderr, "schema_version 99")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--data-ratio", "0"], "--data-ratio must be in (0, 1]"),
        (["--data-ratio", "1.5"], "--data-ratio must be in (0, 1]"),
        (["--method", "mocov3"], "unknown SSL method 'mocov3'"),
        (["--backbone", "vit"], "unknown backbone 'vit'"),
        (["--data-ratio", "0.05"], "empty subset"),
        (["--rela-schedule", "sometimes"], "unknown ReLA schedule"),
        (["--subset", "hardest"], "unknown subset rule"),
        (["--warmup-epochs", "10"], "--warmup-epochs must be in [0, --epochs)"),
        (["--crop-min-scale", "0"], "--crop-min-scale must be in (0, 1]"),
        (["--method", "dino", "--local-views", "-1"], "--local-views must be >= 0"),
        (["--method", "simclr", "--local-views", "2"], "method 'simclr' has none"),
    ],
)
def test_bad_train_options_give_one_line_errors_and_no_output(shard_set, tmp_path, args, fragment):
    shards, _ = shard_set
    code, _, stderr = run_cli("train", "--shards", str(shards), "--out", str(tmp_path / "run"), "--batch-size", "32", *args)
    assert_one_line_error(code, stderr, fragment)
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_from_another_backbone_is_refused(tmp_path):
    # Weights of a ResNet-18 recorded as a ConvNet: the loader must refuse them, not half-load them.
    path = tmp_path / "mislabelled.pt"
    save_backbone_checkpoint(path, build_backbone("resnet18", cifar_stem=True), {"name": "convnet"})
    code, _, stderr = run_cli("eval", "--checkpoint", str(path), "--train", str(TRAIN_DIR), "--test", str(TEST_DIR))
    assert_one_line_error(code, stderr, "does not fit the architecture")
    code, _, stderr = run_cli("embed", "--data", str(TRAIN_DIR), "--prior", f"checkpoint:{path}", "--out", str(tmp_path / "shards"))
    assert_one_line_error(code, stderr, "does not fit the architecture")


def test_training_checkpoint_is_a_weights_only_file_with_resume_state(shard_set, tmp_path):
    shards, _ = shard_set
    run_train(config(shards, tmp_path / "run", epochs=1))
    payload = safe_torch_load(tmp_path / "run" / "checkpoints" / "last.pt", "checkpoint")
    assert payload["format"] == "rela-pipeline/backbone" and payload["step"] == 9
    assert {"optimizer", "rela", "schedule", "torch_rng", "epoch"} <= set(payload["training_state"])
    assert payload["training_state"]["schedule"]["switch_step"] is None  # adaptive: still in the ReLA phase


def test_a_remote_shard_set_is_verified_by_streaming_before_training(shard_copy, tmp_path):
    url = f"pipe:cat {shard_copy}/manifest.json"
    summary = run_train(config(url, tmp_path / "run", epochs=1, rela_schedule="none"))
    assert summary["budget"]["steps"] == 300 // 32
    (shard_copy / "scores.npz").write_bytes(b"replaced")
    with pytest.raises(RelaError, match="scores.npz: sha256 .* does not match"):
        run_train(config(url, tmp_path / "run2", epochs=1, rela_schedule="none"))
    assert not (tmp_path / "run2").exists()


# ------------------------------------------------------------------------- precision and views


def test_precision_is_resolved_recorded_and_losses_stay_fp32(shard_set, tmp_path):
    from rela_pipeline.runtime import cpu_has_native_bf16

    shards, _ = shard_set
    run_train(config(shards, tmp_path / "auto", epochs=1))
    resolved = json.loads((tmp_path / "auto" / "config.json").read_text())["resolved"]
    assert resolved["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolved["memory_format"] == "channels_last" and resolved["data_path"] == "memory" and resolved["augment"] == "device"
    run_train(config(shards, tmp_path / "fp32", epochs=1, precision="fp32", data_path="stream"))
    resolved = json.loads((tmp_path / "fp32" / "config.json").read_text())["resolved"]
    assert resolved["precision"] == "fp32" and resolved["data_path"] == "stream"


@pytest.mark.parametrize("rela_phase", [True, False])
def test_a_bf16_step_keeps_losses_probe_and_weights_in_fp32(rela_phase):
    from rela_pipeline.methods import build_method
    from rela_pipeline.rela import ConstantSchedule, NoRelaSchedule, ReLA
    from rela_pipeline.runtime import Precision
    from rela_pipeline.stages.train.step import TrainStep

    torch.manual_seed(0)
    schedule = ConstantSchedule(1.0) if rela_phase else NoRelaSchedule()
    model = ReLA(build_method("byol", build_backbone("convnet")), 64, schedule)
    schedule.start(0, 10)
    step = TrainStep(model, nn.Linear(256, 10), 1e-3, 0.01, "constant", 10, Precision("bf16", "cpu"))
    views = [torch.rand(8, 3, 32, 32) for _ in range(2)]
    seen: list[torch.dtype] = []
    hook = model.backbone.features[0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    result = step(views, torch.randn(8, 64), torch.randint(0, 10, (8,)), True)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the step's own forward ran under bf16 autocast
    assert result.output.loss.dtype == torch.float32 and result.probe_loss.dtype == torch.float32
    assert model.backbone.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_custom_view_transform_of_the_wrong_shape_is_one_line_naming_the_method(shard_set, tmp_path):
    from rela_pipeline.batched_views import batched_simclr_views

    shards, _ = shard_set
    simclr = batched_simclr_views(32)
    half_batch = lambda images, generator: [v[:16] for v in simclr(images, generator)]  # noqa: E731
    with pytest.raises(RelaError) as error:
        run_train(config(shards, tmp_path / "run", method="toy", rela_schedule="none"), method_factory=ToyMethod, ssl_views=half_batch)
    message = str(error.value)
    assert "\n" not in message and message.startswith("toy views") and "(16, 3, 32, 32)" in message and "(32, 3, h, w)" in message, message
    assert not (tmp_path / "run").exists()
    pil_style = lambda image: [image, image]  # noqa: E731  a per-image transform given to the device path
    with pytest.raises(RelaError, match="toy views: the transform failed on a uint8 batch"):
        run_train(config(shards, tmp_path / "run", method="toy", rela_schedule="none"), method_factory=ToyMethod, ssl_views=pil_style)


def test_frozen_transfer_layer_keeps_its_initialisation_while_the_backbone_learns():
    from rela_pipeline.methods import build_method
    from rela_pipeline.rela import ConstantSchedule, ReLA
    from rela_pipeline.runtime import Precision
    from rela_pipeline.stages.train.step import TrainStep

    def trained(transfer: str) -> tuple[ReLA, dict]:
        torch.manual_seed(0)
        schedule = ConstantSchedule(1.0)
        model = ReLA(build_method("byol", build_backbone("convnet")), 64, schedule, transfer=transfer)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        schedule.start(0, 3)
        step = TrainStep(model, None, 1e-2, 0.01, "constant", 3, Precision("fp32", "cpu"))
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            step(
                [torch.rand(8, 3, 32, 32, generator=generator) for _ in range(2)],
                torch.randn(8, 64, generator=generator),
                torch.zeros(8, dtype=torch.long),
                False,
            )
        return model, initial

    frozen, initial = trained("frozen")
    assert not any(p.requires_grad for p in frozen.transfer.parameters())
    assert torch.equal(frozen.transfer.weight, initial["transfer.weight"]) and torch.equal(frozen.transfer.bias, initial["transfer.bias"])
    assert not torch.equal(frozen.backbone.features[0].weight, initial["method.backbone.features.0.weight"])
    moving, same_start = trained("trained")
    assert torch.equal(same_start["transfer.weight"], initial["transfer.weight"])  # both start from the same map
    assert not torch.equal(moving.transfer.weight, initial["transfer.weight"])


def test_learning_rate_warms_up_linearly_then_follows_its_schedule():
    from rela_pipeline.stages.train.step import lr_factor

    assert [lr_factor(s, 20, "cosine", 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 20, "cosine", 4) == 1.0  # the cosine starts at the top after warm-up
    assert lr_factor(12, 20, "cosine", 4) == pytest.approx(0.5)  # half-way through the remaining 16 steps
    assert lr_factor(20, 20, "cosine", 4) == pytest.approx(0.0, abs=1e-12)
    assert [lr_factor(s, 20, "constant", 2) for s in (0, 1, 2, 19)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(0, 20, "cosine", 0) == 1.0


def test_optimiser_and_view_settings_reach_the_run(shard_set, tmp_path):
    shards, _ = shard_set
    run = tmp_path / "run"
    run_train(
        config(shards, run, lr_schedule="cosine", warmup_epochs=1, teacher_momentum="constant", crop_min_scale=0.3, rela_schedule="none", log_every=1, epochs=2)
    )
    lrs = [r["lr"] for r in intervals(run)]
    steps_per_epoch = len(lrs) // 2
    # Linear warm-up over the first epoch (the logged lr is the next step's), then a falling cosine.
    assert lrs[: steps_per_epoch - 1] == pytest.approx([1e-3 * (s + 2) / steps_per_epoch for s in range(steps_per_epoch - 1)])
    assert all(a >= b for a, b in zip(lrs[steps_per_epoch - 1 :], lrs[steps_per_epoch:]))
    saved = json.loads((run / "config.json").read_text())
    assert (saved["teacher_momentum"], saved["crop_min_scale"], saved["warmup_epochs"]) == ("constant", 0.3, 1)


@pytest.mark.parametrize("augment", ["device", "pil"])
def test_local_views_reach_the_views_of_the_run(tmp_path, augment):
    from rela_pipeline.stages.train.data import view_transforms

    def n_views(local_views):
        ssl = view_transforms(TrainConfig(shards="unused", out_dir=tmp_path, method="dino", augment=augment, local_views=local_views), None)["ssl"]
        return len(ssl.recipes) if augment == "device" else len(ssl.transform.transforms)

    assert (n_views(None), n_views(0), n_views(3)) == (8, 2, 5)
