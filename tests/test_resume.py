"""Stage one survives interruption: kill -9, Ctrl-C and a full disk are resumed with --resume into
the very bytes an uninterrupted run writes; and two runs write the same bytes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rela_pipeline.fileio import HashingFile
from rela_pipeline.shards.format import MANIFEST_NAME
from rela_pipeline.shards.manifest import VARYING_FIELDS, read_manifest, reproducible_part, verify_shard_set
from rela_pipeline.shards.writer import ShardSetWriter
from tests.conftest import TRAIN_DIR, assert_one_line_error, journal_rows, run_cli

REPO = Path(__file__).parent.parent
BASE = ["--prior", "random:resnet18", "--image-size", "32", "--num-workers", "0", "--batch-size", "64", "--shard-size", "64", "--device", "cpu"]
FAST = [*BASE, "--shard-writers", "1"]  # one writer, straight into OUT: the tests below name its shard files
# 224 px and batches of 4: about 10 s of embedding on CPU, long enough to be killed in the middle.
SLOW = ["--prior", "random:resnet18", "--batch-size", "4", "--num-workers", "1", "--shard-size", "64", "--device", "cpu"]


def embed(out: Path, *args: str) -> tuple[int, str, str]:
    return run_cli("embed", "--data", str(TRAIN_DIR), "--out", str(out), *args)


def assert_same_shard_set(out: Path, reference: Path) -> None:
    """Same file names, byte-identical files, manifests equal apart from the varying fields."""
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in reference.iterdir())
    for name in names:
        if name != MANIFEST_NAME:
            assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert reproducible_part(read_manifest(out)) == reproducible_part(read_manifest(reference))
    assert verify_shard_set(out).ok


def uninterrupted_run(tmp_path_factory, *args: str) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    code, _, stderr = embed(out, *args)
    assert code == 0, stderr
    return out


@pytest.fixture(scope="module")
def fast_reference(tmp_path_factory) -> Path:
    return uninterrupted_run(tmp_path_factory, *FAST)


@pytest.fixture(scope="module")
def slow_reference(tmp_path_factory) -> Path:
    return uninterrupted_run(tmp_path_factory, *SLOW)


def test_two_runs_write_byte_identical_shard_sets(fast_reference, tmp_path):
    out = tmp_path / "again"
    code, _, stderr = embed(out, *FAST)
    assert code == 0, stderr
    assert_same_shard_set(out, fast_reference)
    first, second = read_manifest(fast_reference), read_manifest(out)
    assert first["run"]["out_dir"] != second["run"]["out_dir"]  # a varying field does vary
    assert set(first) - set(reproducible_part(first)) == set(VARYING_FIELDS)


def test_kill_9_while_embedding_then_resume_gives_the_uninterrupted_shard_set(slow_reference, tmp_path):
    out, ready = tmp_path / "out", tmp_path / "paused"
    # The run stops once 40 rows are journalled (tests/pausing_cli.py), so the kill always lands mid-embedding.
    command = [
        sys.executable,
        str(REPO / "tests" / "pausing_cli.py"),
        "-q",
        "embed",
        "--data",
        str(TRAIN_DIR),
        "--out",
        str(out),
        *SLOW,
        "--checkpoint-seconds",
        "0.2",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PAUSE_AFTER_ROWS": "40", "PAUSE_READY": str(ready)}
    )
    deadline = time.monotonic() + 180
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run did not reach its pause point"
        time.sleep(0.02)
    process.kill()  # SIGKILL: nothing of the run's own clean-up happens
    process.wait(timeout=60)
    embedded = journal_rows(out)
    assert 40 <= embedded < 300
    assert not (out / MANIFEST_NAME).exists() and (out / ".work" / "embeddings.npy").exists()

    code, _, stderr = embed(out, *SLOW, "--resume")
    assert code == 0, stderr
    run = read_manifest(out)["run"]
    assert run["resumed"] is True and run["images_embedded"] == 300 - embedded  # finished rows were not redone
    assert_same_shard_set(out, slow_reference)


def interrupt_at_sample(monkeypatch, count: int, error: BaseException) -> None:
    """Make the shard writer raise ``error`` instead of writing the ``count``-th sample (0-based)."""
    written = []
    original = ShardSetWriter.write

    def write(self, sample):
        if len(written) == count:
            raise error
        written.append(sample["__key__"])
        original(self, sample)

    monkeypatch.setattr(ShardSetWriter, "write", write)


def test_ctrl_c_while_writing_shards_keeps_finished_shards_and_resume_completes(fast_reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_at_sample(patch, 100, KeyboardInterrupt())  # shard 0 (64 samples) is finished, shard 1 is not
        code, _, stderr = embed(out, *FAST)
    assert code == 130 and "Traceback" not in stderr
    assert stderr.strip() == "interrupted: no manifest written; the finished work is kept in OUT: continue with --resume"
    assert not (out / MANIFEST_NAME).exists() and not list(out.glob("*.partial"))
    assert (out / "shard-000000.tar").read_bytes() == (fast_reference / "shard-000000.tar").read_bytes()
    code, _, stderr = embed(out, *FAST)  # without --resume the interrupted run is not touched
    assert_one_line_error(code, stderr, "holds an interrupted embed run; pass --resume")

    code, _, stderr = embed(out, *FAST, "--resume")
    assert code == 0, stderr
    run = read_manifest(out)["run"]
    assert (run["images_embedded"], run["shards_reused"]) == (0, 1)
    assert_same_shard_set(out, fast_reference)


def test_disk_full_while_writing_shards_stops_cleanly_and_resume_finishes(fast_reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    original = HashingFile.write

    def write(self, data):  # the device fills up while the third shard is written
        if str(self.name).endswith("shard-000002.tar.partial"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
        return original(self, data)

    with monkeypatch.context() as patch:
        patch.setattr(HashingFile, "write", write)
        code, _, stderr = embed(out, *FAST)
    assert_one_line_error(code, stderr, "No space left on device")
    assert "shard-000002.tar.partial" in stderr and "--resume" in stderr
    assert not (out / MANIFEST_NAME).exists() and not list(out.glob("*.partial"))
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]

    code, _, stderr = embed(out, *FAST, "--resume")  # space is back
    assert code == 0, stderr
    assert read_manifest(out)["run"]["shards_reused"] == 2
    assert_same_shard_set(out, fast_reference)


def test_disk_full_when_reserving_the_embeddings_file(fast_reference, tmp_path, monkeypatch):
    """The memory-map's blocks are reserved first: a full disk is an error, not a SIGBUS later."""
    out = tmp_path / "out"

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "posix_fallocate", no_space)
        code, _, stderr = embed(out, *FAST)
    assert_one_line_error(code, stderr, "No space left on device")
    assert not (out / MANIFEST_NAME).exists()
    code, _, stderr = embed(out, *FAST, "--resume")
    assert code == 0, stderr
    assert_same_shard_set(out, fast_reference)


def test_resume_redoes_exactly_what_no_longer_matches_its_checksum(fast_reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_at_sample(patch, 200, KeyboardInterrupt())
        code, _, _ = embed(out, *FAST, "--checkpoint-seconds", "1e-9")  # a journal record per batch of 64
    assert code == 130
    embeddings = np.load(out / ".work" / "embeddings.npy", mmap_mode="r+")
    embeddings[130, 0] += 1.0  # inside rows [128, 192)
    embeddings.flush()
    del embeddings
    with open(out / "shard-000001.tar", "r+b") as shard:  # shard 0 stays intact
        shard.seek(700)
        byte = shard.read(1)
        shard.seek(700)
        shard.write(bytes([byte[0] ^ 0xFF]))

    code, _, stderr = embed(out, *FAST, "--resume", "--checkpoint-seconds", "1e-9")
    assert code == 0, stderr
    run = read_manifest(out)["run"]
    assert run["images_embedded"] == 64  # only the altered batch [128, 192): the later ones still match their checksums
    assert run["shards_reused"] == 0  # the embeddings changed, so every later phase was redone
    assert_same_shard_set(out, fast_reference)


def test_resume_keeps_a_shard_prefix_and_redoes_an_altered_shard(fast_reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_at_sample(patch, 200, KeyboardInterrupt())  # shards 0-2 finished
        embed(out, *FAST)
    with open(out / "shard-000001.tar", "r+b") as shard:
        shard.seek(700)
        byte = shard.read(1)
        shard.seek(700)
        shard.write(bytes([byte[0] ^ 0xFF]))
    code, _, stderr = embed(out, *FAST, "--resume")
    assert code == 0, stderr
    run = read_manifest(out)["run"]
    assert (run["images_embedded"], run["shards_reused"]) == (0, 1)
    assert_same_shard_set(out, fast_reference)


def writers(count: int) -> list[str]:
    return [*BASE, "--shard-writers", str(count)]


def test_shard_writing_processes_write_the_one_writer_bytes(fast_reference, tmp_path):
    for count in (2, 3, 5):  # 300 samples in 5 shards of 64 (the last 44): 2-3 shards a writer, and 1 each
        code, _, stderr = embed(tmp_path / f"writers-{count}", *writers(count))
        assert code == 0, stderr
        assert read_manifest(tmp_path / f"writers-{count}")["run"]["shard_writers"] == count
        assert_same_shard_set(tmp_path / f"writers-{count}", fast_reference)


def test_an_interrupted_writing_process_stops_the_run_and_resume_keeps_each_ones_finished_shards(fast_reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_at_sample(patch, 100, KeyboardInterrupt())  # in each of 2 processes: its first shard is finished, its second is not
        code, _, stderr = embed(out, *writers(2))
    assert code == 130 and "Traceback" not in stderr and "--resume" in stderr
    assert not (out / MANIFEST_NAME).exists() and not list(out.rglob("*.partial")) and not list(out.glob("shard-*.tar"))
    code, _, stderr = embed(out, *writers(2), "--resume")
    assert code == 0, stderr
    assert read_manifest(out)["run"]["shards_reused"] == 2
    assert_same_shard_set(out, fast_reference)


def test_a_failing_writing_process_is_one_line_and_resume_finishes(fast_reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_at_sample(patch, 70, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        code, _, stderr = embed(out, *writers(2))
    assert_one_line_error(code, stderr, "a shard-writing process failed (OSError: [Errno 28] No space left on device)")
    assert "--resume" in stderr and not list(out.rglob("*.partial"))
    code, _, stderr = embed(out, *writers(2), "--resume")
    assert code == 0, stderr
    assert_same_shard_set(out, fast_reference)


def process_is_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] in "ZX"  # a zombie waits for its reaper
    except (OSError, IndexError):
        return True


def test_kill_9_while_processes_write_shards_kills_them_and_resume_gives_the_same_bytes(fast_reference, tmp_path):
    out, ready = tmp_path / "out", tmp_path / "paused"
    command = [sys.executable, str(REPO / "tests" / "pausing_cli.py"), "-q", "embed", "--data", str(TRAIN_DIR), "--out", str(out), *writers(2)]
    # Each writing process stops after 70 samples (tests/pausing_cli.py): its first shard finished, its second begun.
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PAUSE_AFTER_SAMPLES": "70", "PAUSE_READY": str(ready)},
    )
    deadline = time.monotonic() + 180
    while len(paused := list(tmp_path.glob("paused.*"))) < 2:
        assert process.poll() is None and time.monotonic() < deadline, "the writers did not reach their pause point"
        time.sleep(0.02)
    pids = [int(p.suffix[1:]) for p in paused]
    assert process.pid not in pids
    process.kill()
    process.wait(timeout=60)
    deadline = time.monotonic() + 10
    while not all(process_is_gone(pid) for pid in pids):  # no writer outlives the run it belongs to
        assert time.monotonic() < deadline, f"writing processes {pids} outlived their killed parent"
        time.sleep(0.05)
    assert not (out / MANIFEST_NAME).exists()

    code, _, stderr = embed(out, *writers(2), "--resume")
    assert code == 0, stderr
    assert read_manifest(out)["run"]["shards_reused"] == 2
    assert_same_shard_set(out, fast_reference)


def test_resume_refuses_other_settings_and_touches_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_at_sample(patch, 100, KeyboardInterrupt())
        embed(out, *FAST)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, stderr = embed(out, *FAST, "--resume", "--seed", "1")
    assert_one_line_error(code, stderr, "was started differently (settings.seed: 0 -> 1)")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    code, _, stderr = embed(out, *FAST, "--resume", "--overwrite")
    assert_one_line_error(code, stderr, "--resume and --overwrite exclude each other")


def test_resume_refuses_rows_of_another_resolved_device_or_precision(tmp_path, monkeypatch):
    """The identity records what ``--device`` and ``--precision`` resolved to, not what was given:
    a run started with ``auto`` on a GPU and resumed with ``auto`` on the CPU would otherwise mix
    rows of two devices. The GPU start is the journal's record, rewritten as a GPU run writes it."""
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_at_sample(patch, 100, KeyboardInterrupt())
        embed(out, *FAST)
    journal = out / ".work" / "journal.json"
    record = json.loads(journal.read_text())
    assert record["identity"]["resolved"] == {"device": "cpu", "precision": "fp32", "decode": "cpu"}
    code, _, stderr = embed(out, *FAST, "--resume", "--precision", "bf16")
    assert_one_line_error(code, stderr, "was started differently (resolved.precision: 'fp32' -> 'bf16')")
    record["identity"]["resolved"]["device"] = "cuda"
    journal.write_text(json.dumps(record))
    code, _, stderr = embed(out, *[a if a != "cpu" else "auto" for a in FAST], "--resume")
    assert_one_line_error(code, stderr, "was started differently (resolved.device: 'cuda' -> 'cpu')")


def test_resume_on_a_complete_set_does_nothing_and_on_an_empty_out_starts_fresh(fast_reference, tmp_path):
    done = tmp_path / "done"
    shutil.copytree(fast_reference, done)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in done.iterdir()}
    code, _, stderr = embed(done, *FAST, "--resume")
    assert code == 0, stderr
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in done.iterdir()} == before
    code, _, stderr = embed(done, *FAST, "--resume", "--shard-size", "100")
    assert_one_line_error(code, stderr, "made differently (settings.shard_size: 64 -> 100)")

    fresh = tmp_path / "fresh"
    code, _, stderr = embed(fresh, *FAST, "--resume")
    assert code == 0, stderr
    assert read_manifest(fresh)["run"]["resumed"] is False
    assert_same_shard_set(fresh, fast_reference)
