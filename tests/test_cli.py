"""The CLI end to end on the real fixture, and every bad input of stage one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
import torchvision

from rela_pipeline.shards.manifest import read_manifest
from rela_pipeline.stages import embed as embed_stage
from tests.conftest import TRAIN_DIR, assert_one_line_error, journal_rows, run_cli

PAUSING_CLI = str(Path(__file__).parent / "pausing_cli.py")
FAST = ["--prior", "random:resnet18", "--image-size", "32", "--num-workers", "0", "--batch-size", "64", "--shard-size", "64", "--device", "cpu"]


def assert_no_output(out: Path) -> None:
    leftovers = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert leftovers == [], leftovers


def small_tree(tmp_path: Path, per_class: int = 4) -> Path:
    """A copy of a few real images per class, so runs are quick and may be altered."""
    root = tmp_path / "data"
    for class_dir in sorted(TRAIN_DIR.iterdir()):
        (root / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy(image, root / class_dir.name / image.name)
    return root


def test_embed_inspect_verify_end_to_end(tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("embed", "--data", str(TRAIN_DIR), "--out", str(out), *FAST)
    assert code == 0, stderr
    assert "wrote 300 samples in 5 shards" in stdout
    code, stdout, _ = run_cli("inspect", str(out))
    assert code == 0 and "300 written, 0 skipped" in stdout and "random:resnet18" in stdout
    code, stdout, _ = run_cli("verify", str(out))
    assert code == 0 and "300 samples verified" in stdout
    (out / "shard-000002.tar").write_bytes(b"not a tar")
    code, _, stderr = run_cli("verify", str(out))
    assert code == 1 and "FAIL shard-000002.tar" in stderr


def test_missing_data_dir(tmp_path):
    code, _, stderr = run_cli("embed", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), *FAST)
    assert_one_line_error(code, stderr, "not found (tried an ImageFolder directory, a file list, and a tar pattern)")
    (tmp_path / "notes.md").write_text("hello")
    code, _, stderr = run_cli("embed", "--data", str(tmp_path / "notes.md"), "--out", str(tmp_path / "out"), *FAST)
    assert_one_line_error(code, stderr, "neither a directory, a .txt/.csv file list nor .tar shards")
    code, _, stderr = run_cli("embed", "--data", str(tmp_path / "part-{000..002}.tar"), "--out", str(tmp_path / "out"), *FAST)
    assert_one_line_error(code, stderr, "the pattern matches no file")
    assert not (tmp_path / "out").exists()


def test_empty_data_dir(tmp_path):
    (tmp_path / "data").mkdir()
    code, _, stderr = run_cli("embed", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *FAST)
    assert_one_line_error(code, stderr, "data directory is empty")


def test_data_dir_without_images(tmp_path):
    (tmp_path / "data" / "cats").mkdir(parents=True)
    (tmp_path / "data" / "cats" / "notes.txt").write_text("no images here")
    code, _, stderr = run_cli("embed", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *FAST)
    assert_one_line_error(code, stderr, "no images found")
    assert_no_output(tmp_path / "out")


def test_corrupt_truncated_and_fake_images_are_skipped_and_listed(tmp_path):
    data = small_tree(tmp_path)
    real = next((data / "3_dress").iterdir()).read_bytes()
    (data / "3_dress" / "truncated.png").write_bytes(real[: len(real) // 2])
    (data / "4_coat" / "fake.jpg").write_text("this is not a JPEG")
    (data / "4_coat" / "readme.txt").write_text("ignored")
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("embed", "--data", str(data), "--out", str(out), *FAST)
    assert code == 0, stderr
    manifest = read_manifest(out)
    skipped = {item["path"]: item["reason"] for item in manifest["skipped"]}
    assert set(skipped) == {"3_dress/truncated.png", "4_coat/fake.jpg"}
    assert manifest["samples"] == {**manifest["samples"], "scanned": 42, "written": 40, "skipped": 2}
    assert {item["path"] for item in manifest["ignored"]} == {"4_coat/readme.txt"}
    assert "2 skipped" in stdout


def test_unknown_prior_spec(tmp_path):
    code, _, stderr = run_cli("embed", "--data", str(TRAIN_DIR), "--out", str(tmp_path / "out"), "--prior", "resnet50")
    assert_one_line_error(code, stderr, "valid forms: random:<torchvision arch>")
    assert_no_output(tmp_path / "out")


def test_weights_file_missing_or_of_the_wrong_architecture(tmp_path):
    code, _, stderr = run_cli("embed", "--data", str(TRAIN_DIR), "--out", str(tmp_path / "out"), "--prior", f"torchvision:resnet18:{tmp_path / 'missing.pth'}")
    assert_one_line_error(code, stderr, "not found")
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    code, _, stderr = run_cli("embed", "--data", str(TRAIN_DIR), "--out", str(tmp_path / "out"), "--prior", f"torchvision:resnet50:{weights}")
    assert_one_line_error(code, stderr, "does not fit the architecture")


def test_non_empty_out_is_refused_unless_overwrite(tmp_path):
    data = small_tree(tmp_path, per_class=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"old")
    code, _, stderr = run_cli("embed", "--data", str(data), "--out", str(out), *FAST)
    assert_one_line_error(code, stderr, "not empty; pass --overwrite")
    assert (out / "shard-000000.tar").read_bytes() == b"old"
    code, _, stderr = run_cli("embed", "--data", str(data), "--out", str(out), "--overwrite", *FAST)
    assert code == 0, stderr
    assert read_manifest(out)["samples"]["written"] == 20
    (out / "my-notes.txt").write_text("keep me")
    code, _, stderr = run_cli("embed", "--data", str(data), "--out", str(out), "--overwrite", *FAST)
    assert_one_line_error(code, stderr, "did not write")
    assert (out / "my-notes.txt").exists() and (out / "manifest.json").exists()


def paused_embed(out: Path, ready: Path, after_rows: int, *args: str, **popen) -> subprocess.Popen:
    """The real CLI's ``embed`` into ``out`` in a process that stops once ``after_rows`` rows are
    journalled, and says so by creating ``ready`` (``tests/pausing_cli.py``)."""
    command = [
        sys.executable,
        PAUSING_CLI,
        "-q",
        "embed",
        "--data",
        str(TRAIN_DIR),
        "--out",
        str(out),
        "--prior",
        "random:resnet18",
        "--batch-size",
        "4",
        "--num-workers",
        "1",
        "--device",
        "cpu",
        *args,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PAUSE_AFTER_ROWS": str(after_rows), "PAUSE_READY": str(ready)}
    return subprocess.Popen(command, text=True, cwd=Path(__file__).parent.parent, env=env, **popen)


def wait_until_paused(process: subprocess.Popen, ready: Path) -> None:
    deadline = time.monotonic() + 180
    while not ready.exists():
        assert process.poll() is None, "the run ended before its pause point"
        assert time.monotonic() < deadline, "the run did not reach its pause point"
        time.sleep(0.05)


def test_ctrl_c_in_a_real_process(tmp_path):
    """SIGINT to the real CLI mid-embedding (paused right after its first journal record, so the
    signal always lands in the embedding loop): exit 130, one line, no manifest, no partial files,
    and the run's journal kept for --resume (tests/test_resume.py resumes such runs)."""
    out, ready = tmp_path / "out", tmp_path / "paused"
    # A shell starts background jobs with SIGINT ignored, and children inherit that (CI may run the
    # suite so): give the CLI the default disposition, as an interactive terminal would.
    process = paused_embed(
        out,
        ready,
        1,
        "--checkpoint-seconds",
        "0.2",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_until_paused(process, ready)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if line.strip()] == [
        "interrupted: no manifest written; the finished work is kept in OUT: continue with --resume"
    ]
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.partial"))
    assert (out / ".work" / "journal.json").is_file() and journal_rows(out) >= 1


def test_one_embed_at_a_time_and_a_killed_run_does_not_leave_the_lock_stuck(tmp_path):
    """A second embed into OUT is refused while the first runs (paused while it holds the lock);
    after kill -9 the next run proceeds."""
    out, ready = tmp_path / "out", tmp_path / "paused"
    first = paused_embed(out, ready, 1, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_until_paused(first, ready)
    before = sorted(p.name for p in out.rglob("*"))

    code, _, stderr = run_cli("embed", "--data", str(TRAIN_DIR), "--out", str(out), "--overwrite", *FAST)
    assert_one_line_error(code, stderr, f"another embed is running (pid {first.pid} on ")
    assert first.poll() is None  # the refused run neither stopped nor disturbed the first one
    assert sorted(p.name for p in out.rglob("*")) == before

    first.kill()  # SIGKILL: no clean-up runs, the lock file stays behind
    first.wait(timeout=60)
    assert (out / embed_stage.LOCK_NAME).exists() and not (out / "manifest.json").exists()
    code, _, stderr = run_cli("embed", "--data", str(TRAIN_DIR), "--out", str(out), "--overwrite", *FAST)
    assert code == 0, stderr
    assert (out / "manifest.json").exists() and not (out / embed_stage.LOCK_NAME).exists()
    code, stdout, _ = run_cli("verify", str(out))
    assert code == 0 and "300 samples verified" in stdout


def test_unlabelled_folder_gives_shards_without_cls(tmp_path):
    data = tmp_path / "flat"
    data.mkdir()
    for i, image in enumerate(sorted(TRAIN_DIR.rglob("*.png"))[::15]):
        shutil.copy(image, data / f"img{i:03d}.png")
    out = tmp_path / "out"
    code, _, stderr = run_cli("embed", "--data", str(data), "--out", str(out), "--keep-embeddings", *FAST)
    assert code == 0, stderr
    manifest = read_manifest(out)
    assert manifest["dataset"]["labelled"] is False and manifest["dataset"]["class_names"] == []
    with tarfile.open(out / "shard-000000.tar") as archive:
        suffixes = {name.split(".", 1)[1] for name in archive.getnames()}
    assert suffixes == {"png", "target.npy", "json"}
    code, stdout, _ = run_cli("verify", str(out))
    assert code == 0 and "20 samples verified" in stdout


def test_a_non_positive_dist_timeout_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    code, _, stderr = run_cli("embed", "--data", str(TRAIN_DIR), "--prior", "random:resnet18", "--out", str(out), "--dist-timeout", "0")
    assert_one_line_error(code, stderr, "--dist-timeout must be > 0")
    assert not out.exists()
