"""Stage one under torchrun: two CPU processes (gloo) through the real launcher and the real CLI
on the real fixture, against the one-process run."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from rela_pipeline.shards.format import MANIFEST_NAME
from rela_pipeline.shards.manifest import read_manifest, reproducible_part, verify_shard_set
from tests.conftest import TRAIN_DIR, journal_rows
from tests.test_torchrun import _children, _environ

CLI = str(Path(sys.executable).parent / "rela-pipeline")
INTERRUPTING_CLI = str(Path(__file__).parent / "interrupting_cli.py")
SLOW_PHASE_CLI = str(Path(__file__).parent / "slow_phase_cli.py")
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default per rank; the one-process runs match it
# 300 images: 10 batches of 32, 8 shard blocks of 40 (each rank writes 4).
FAST = [
    "--prior",
    "random:resnet18",
    "--image-size",
    "32",
    "--num-workers",
    "0",
    "--batch-size",
    "32",
    "--shard-size",
    "40",
    "--device",
    "cpu",
    "--keep-embeddings",
]
# 224 px in batches of 4 with a record per batch: long enough to kill a rank in the middle.
SLOW = [
    "--prior",
    "random:resnet18",
    "--batch-size",
    "4",
    "--num-workers",
    "0",
    "--shard-size",
    "64",
    "--device",
    "cpu",
    "--checkpoint-seconds",
    "1e-9",
    "--keep-embeddings",
]


def one_process(out: Path, *args: str, data: str | Path = TRAIN_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "-q", "embed", "--data", str(data), "--out", str(out), *args], capture_output=True, text=True, timeout=600, env=ONE_THREAD)


def torchrun_command(out: Path, *args: str, data: str | Path = TRAIN_DIR) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--no-python",
        CLI,
        "-q",
        "embed",
        "--data",
        str(data),
        "--out",
        str(out),
        *args,
    ]


def samples(out: Path) -> dict[str, dict]:
    """``{key: {"target": float array, "json": metadata}}`` of every sample in the shard set."""
    found: dict[str, dict] = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, _, field = member.name.partition(".")
                data = archive.extractfile(member).read()
                if field == "target.npy":
                    found.setdefault(key, {})["target"] = np.load(io.BytesIO(data))
                elif field == "json":
                    found.setdefault(key, {})["json"] = json.loads(data)
    return found


def test_two_ranks_write_the_one_process_shard_set_byte_for_byte(tmp_path):
    """Same batches, same transport chunks, same score blocks and same shard blocks, each computed
    with the same kernels and thread count: every file but the manifest's run record is identical."""
    one, two = tmp_path / "one", tmp_path / "two"
    alone = one_process(one, *FAST)
    assert alone.returncode == 0, alone.stderr[-3000:]
    done = subprocess.run(torchrun_command(two, *FAST), capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote 300 samples") == 1  # rank 0 reports for the job
    assert verify_shard_set(two).ok
    names = sorted(p.name for p in two.iterdir())
    assert names == sorted(p.name for p in one.iterdir()) and ".work" not in names
    for name in names:
        if name != MANIFEST_NAME:
            assert (two / name).read_bytes() == (one / name).read_bytes(), name  # shards, transport, scores, embeddings
    assert reproducible_part(read_manifest(two)) == reproducible_part(read_manifest(one))
    assert read_manifest(two)["run"]["world_size"] == 2 and read_manifest(one)["run"]["world_size"] == 1


def test_a_rank_killed_while_embedding_then_resume_completes_the_set(tmp_path):
    out, reference = tmp_path / "out", tmp_path / "reference"
    job = subprocess.Popen(torchrun_command(out, *SLOW), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    try:
        deadline = time.monotonic() + 300
        while not ((out / ".work" / "rank-1.json").is_file() and journal_rows(out) > 0):  # each rank has finished a batch
            assert job.poll() is None and time.monotonic() < deadline, "a rank recorded no batch"
            time.sleep(0.1)
        workers = _children(job.pid)
        victim = next(pid for pid in workers if _environ(pid).get("RANK") == "1")
        os.kill(victim, signal.SIGKILL)
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert not (out / MANIFEST_NAME).exists()
    progress = json.loads((out / ".work" / "rank-1.json").read_text())["state"]["embed"]["chunks"]
    assert progress and progress[0][0] == 148  # rank 1 embeds batches 37..74 of 75 (rank_share)

    # --resume in one process (another world size) keeps what both ranks finished and embeds the rest.
    resumed = one_process(out, *SLOW, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = read_manifest(out)["run"]
    assert run["resumed"] and 0 < run["images_embedded"] < 300 - len(progress) * 4
    assert verify_shard_set(out).ok
    alone = one_process(reference, *SLOW)
    assert alone.returncode == 0, alone.stderr[-3000:]
    got, expected = samples(out), samples(reference)
    assert sorted(got) == sorted(expected)
    embeddings = np.load(out / "embeddings.npy"), np.load(reference / "embeddings.npy")
    assert np.array_equal(*embeddings)  # each row from the batch it has in one process
    for key in expected:
        assert np.array_equal(got[key]["target"], expected[key]["target"]), key


def test_a_rank_stopped_while_writing_shards_then_resume_with_the_same_world_size(tmp_path):
    """Rank 1 stops after two of its four shards (webdataset closes a shard when the next sample comes);
    rank 0 is stopped by torchrun wherever it was. A
    two-rank --resume keeps every finished part shard and writes the one-process set."""
    one, out = tmp_path / "one", tmp_path / "out"
    assert one_process(one, *FAST).returncode == 0
    stopped = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            INTERRUPTING_CLI,
            "-q",
            "embed",
            "--data",
            str(TRAIN_DIR),
            "--out",
            str(out),
            *FAST,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**ONE_THREAD, "INTERRUPT_RANK": "1", "INTERRUPT_AT_SAMPLE": "81"},
    )
    assert stopped.returncode != 0 and not (out / MANIFEST_NAME).exists()
    part = json.loads((out / ".work" / "rank-1.json").read_text())["state"]["shard_part"]
    assert [s["samples"] for s in part] == [40, 40]
    done = subprocess.run(torchrun_command(out, *FAST, "--resume"), capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]
    run = read_manifest(out)["run"]
    assert run["images_embedded"] == 0 and run["shards_reused"] >= 2
    for name in sorted(p.name for p in one.iterdir()):
        if name != MANIFEST_NAME:
            assert (out / name).read_bytes() == (one / name).read_bytes(), name
    assert verify_shard_set(out).ok


def test_the_other_ranks_wait_out_a_phase_rank_0_runs_alone(tmp_path):
    """Rank 0 fits the transport alone for 12 s (planted) while rank 1 waits: with a 4 s collective
    timeout the job still finishes, because the wait is bounded by --dist-wait-timeout; with a
    4 s wait timeout it fails with one line per rank, naming the lost contact."""

    def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            SLOW_PHASE_CLI,
            "-q",
            "embed",
            "--data",
            str(TRAIN_DIR),
            "--out",
            str(out),
            *FAST,
            "--dist-timeout",
            "4",
            *extra,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, env={**ONE_THREAD, "SLOW_PHASE_S": "12"})

    started = time.monotonic()
    done = run(tmp_path / "waited")
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - started > 12 and verify_shard_set(tmp_path / "waited").ok
    done = run(tmp_path / "timed-out", "--dist-wait-timeout", "4")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: rank 1 of 2")]
    assert len(errors) == 1 and "lost contact with the other ranks" in errors[0], done.stderr[-3000:]
    assert not (tmp_path / "timed-out" / MANIFEST_NAME).exists()
