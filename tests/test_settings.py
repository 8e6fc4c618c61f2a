"""Settings files (``--config``) and the one source of defaults; TensorBoard logging read back
with TensorBoard's own reader."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from rela_pipeline.cli import SettingOption, embed, train
from rela_pipeline.settings import read_settings_file, setting_defaults
from rela_pipeline.stages.embed.config import EmbedConfig
from rela_pipeline.stages.train.config import TrainConfig
from tests.conftest import TRAIN_DIR, assert_one_line_error, run_cli

FAST_TRAIN = ["--epochs", "1", "--batch-size", "32", "--num-workers", "0", "--log-every", "3", "--device", "cpu"]


def test_every_setting_flag_names_a_field_and_holds_no_default_of_its_own():
    for command, cls in ((embed, EmbedConfig), (train, TrainConfig)):
        fields = {f.name for f in dataclasses.fields(cls)}
        options = [p for p in command.params if isinstance(p, SettingOption)]
        assert {p.name for p in options} <= fields
        own = [p.name for p in options if p.default not in (None, False) and not repr(p.default).endswith("UNSET")]  # click's "no default"
        assert not own, own
        # every field but the caller-only ones has a flag
        assert fields - {p.name for p in options} <= {"shuffle_buffer", "progress"}, fields - {p.name for p in options}


def test_help_shows_the_dataclass_defaults_and_reading_them_imports_no_torch():
    code = (
        "import sys; from click.testing import CliRunner; from rela_pipeline.cli import main; "
        "out = CliRunner().invoke(main, ['train', '--help']).output; "
        "print(json.dumps({'torch': 'torch' in sys.modules, 'help': out}))"
    )
    result = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    shown = json.loads(result.stdout)
    assert not shown["torch"]
    text = " ".join(shown["help"].split())
    defaults = setting_defaults(TrainConfig)
    for flag, name in (("--lr", "lr"), ("--epochs", "epochs"), ("--dedup-threshold", "dedup_threshold"), ("--dist-wait-timeout", "dist_wait_timeout_s")):
        assert f"[default: {defaults[name]}]" in text.split(flag, 1)[1][:400], flag
    packed = "".join(text.split())  # click wraps long values at hyphens
    assert "[default:tensorboard]" in packed and "[default:online-probe]" in packed


def test_a_runs_config_json_reruns_it_and_a_flag_overrides_a_file_value(shard_set, tmp_path):
    shards, _ = shard_set
    first = tmp_path / "first"
    code, _, stderr = run_cli("train", "--shards", str(shards), "--out", str(first), *FAST_TRAIN, "--lr", "0.002", "--method", "simclr", "--no-online-probe")
    assert code == 0, stderr
    recorded = json.loads((first / "config.json").read_text())
    assert recorded["lr"] == 0.002 and recorded["method"] == "simclr" and recorded["online_probe"] is False

    second = tmp_path / "second"
    code, _, stderr = run_cli("train", "--config", str(first / "config.json"), "--out", str(second), "--seed", "3")
    assert code == 0, stderr
    rerun = json.loads((second / "config.json").read_text())
    assert rerun["seed"] == 3 and rerun["out_dir"] == str(second)
    same = {k: v for k, v in recorded.items() if k not in ("seed", "out_dir", "resolved")}
    assert {k: rerun[k] for k in same} == same

    # Without --out the file's own run directory is named, and a file never overwrites: refused.
    code, _, stderr = run_cli("train", "--config", str(first / "config.json"))
    assert_one_line_error(code, stderr, "is not empty")


def test_yaml_settings_for_embed_and_a_manifest_reruns_its_settings(tmp_path):
    settings = tmp_path / "embed.yaml"
    settings.write_text(f"data_dir: {TRAIN_DIR}\nprior: random:resnet18\nimage_size: 32\nshard_size: 50\nscore_dims: 16\nnum_workers: 0\ndevice: cpu\n")
    out = tmp_path / "out"
    code, _, stderr = run_cli("embed", "--config", str(settings), "--out", str(out), "--shard-size", "120")
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["shard_size"] == 120 and manifest["settings"]["score_dims"] == 16
    assert [s["samples"] for s in manifest["shards"]] == [120, 120, 60]

    assert read_settings_file(out / "manifest.json", EmbedConfig) == manifest["settings"]
    again = tmp_path / "again"  # the manifest reruns the run: the same shards, byte for byte
    code, _, stderr = run_cli("embed", "--config", str(out / "manifest.json"), "--out", str(again), "--num-workers", "0", "--device", "cpu")
    assert code == 0, stderr
    assert [s["sha256"] for s in json.loads((again / "manifest.json").read_text())["shards"]] == [s["sha256"] for s in manifest["shards"]]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"lr": 0.1, "epoch": 3}', "unknown setting 'epoch' (did you mean epochs"),
        ('{"epochs": "ten"}', "setting 'epochs' must be an integer, got 'ten'"),
        ('{"epochs": true}', "setting 'epochs' must be an integer"),
        ('{"crop_min_scale": "small"}', "setting 'crop_min_scale' must be a number or null"),
        ("[1, 2]", "must hold a mapping of setting names to values"),
        ("{not json", "is not valid JSON"),
    ],
)
def test_a_bad_settings_file_is_one_line_naming_the_key(shard_set, tmp_path, text, fragment):
    shards, _ = shard_set
    bad = tmp_path / "settings.json"
    bad.write_text(text)
    code, _, stderr = run_cli("train", "--config", str(bad), "--shards", str(shards), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, stderr, fragment)
    assert not (tmp_path / "run").exists()


def test_a_required_setting_in_neither_layer_and_a_missing_file_are_one_line(tmp_path):
    code, _, stderr = run_cli("embed", "--prior", "random:resnet18", "--out", str(tmp_path / "out"))
    assert_one_line_error(code, stderr, "missing --data (or 'data_dir' in --config)")
    code, _, stderr = run_cli("train", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, stderr, "nope.yaml: no such file")
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1,\n")
    code, _, stderr = run_cli("train", "--config", str(broken), "--out", str(tmp_path / "run"))
    assert_one_line_error(code, stderr, "is not valid YAML")


def test_tensorboard_events_read_back_with_tensorboards_reader(shard_set, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shards, _ = shard_set
    run = tmp_path / "run"
    # 18 steps; ReLA for the first half (constant:0.5; no rho, which only the adaptive rule has), then BYOL alone.
    code, _, stderr = run_cli("train", "--shards", str(shards), "--out", str(run), *FAST_TRAIN, "--epochs", "2", "--rela-schedule", "constant:0.5")
    assert code == 0, stderr
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    intervals = [r for r in jsonl if "event" not in r]
    switch = next(r for r in jsonl if r.get("event") == "rela_switch")

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "rela/loss", "train/lr", "throughput/images_per_s", "probe/accuracy", "rela/active"} <= tags
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [r["step"] for r in intervals]
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in intervals], rel=1e-6)
    active = {e.step: e.value for e in events.Scalars("rela/active")}
    assert active == {r["step"]: float(r["phase"] == "rela") for r in intervals}
    assert set(active.values()) == {0.0, 1.0}
    switch_texts = events.Tensors("events/rela_switch/text_summary")
    assert [e.step for e in switch_texts] == [switch["step"]]
    assert f"step {switch['step']}" in switch_texts[0].tensor_proto.string_val[0].decode()
    assert "settings/text_summary" in events.Tags()["tensors"]


def test_logger_none_writes_no_events_and_wandb_without_the_package_is_one_line(shard_set, tmp_path):
    shards, _ = shard_set
    run = tmp_path / "run"
    code, _, stderr = run_cli("train", "--shards", str(shards), "--out", str(run), *FAST_TRAIN, "--logger", "none")
    assert code == 0, stderr
    assert (run / "metrics.jsonl").is_file() and not (run / "tensorboard").exists()
    try:
        import wandb  # noqa: F401
    except ImportError:
        code, _, stderr = run_cli("train", "--shards", str(shards), "--out", str(tmp_path / "w"), *FAST_TRAIN, "--logger", "wandb")
        assert_one_line_error(code, stderr, "--logger wandb needs the wandb package")
