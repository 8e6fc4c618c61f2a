"""Stage two under torchrun: two CPU processes (gloo) through the real launcher and the real CLI."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import run_cli
from distributed_worker import FIRST_STEP_GRADIENTS

CLI = str(Path(sys.executable).parent / "rela-pipeline")
WORKER = str(Path(__file__).parent / "distributed_worker.py")


def train_args(shards: Path, out: Path, epochs: int = 2, *extra: str) -> list[str]:
    """``train`` options shared by the one-process and the two-process runs (240 of the 300
    samples per epoch: 7 steps of 32)."""
    return [
        "train",
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--batch-size",
        "32",
        "--image-size",
        "32",
        "--data-ratio",
        "0.8",
        "--data-path",
        "memory",
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--no-verify",
        "--log-every",
        "3",
        *extra,
    ]


def torchrun(*args: str, nproc: int = 2, timeout: float = 300, python: bool = False) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N [--no-python] ARGS`` as a subprocess."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    command += list(args) if python else ["--no-python", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_two_processes_train_the_one_process_budget(shard_set, tmp_path):
    shards, _ = shard_set
    code, _, _ = run_cli(*train_args(shards, tmp_path / "one"))
    assert code == 0
    done = torchrun(CLI, "-q", *train_args(shards, tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = summary(tmp_path / "one"), summary(tmp_path / "two")
    assert two["budget"] == one["budget"]  # steps, images seen, full-run steps, fraction
    ranks = two["distributed"]
    assert ranks["world_size"] == 2 and ranks["backend"] == "gloo"
    assert ranks["steps_per_rank"] == [one["budget"]["steps"]] * 2
    assert ranks["samples_per_rank_this_invocation"] == [one["budget"]["images_seen"] // 2] * 2
    # The adaptive schedule's loss averages, rho and switch step are bit-identical on both ranks
    # (each rank feeds it the ReLA loss averaged over the ranks; the run fails otherwise).
    states = ranks["rela_schedule_per_rank"]
    assert states[0] == states[1] and states[0]["l_fast"] < 1.0
    # Rank 0 alone wrote the run: one config, one metrics file with records averaged over ranks.
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and len(steps) == len([r for r in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines() if '"loss"' in r])
    assert json.loads((tmp_path / "two" / "config.json").read_text())["resolved"]["world_size"] == 2
    assert "trained" in done.stdout and done.stdout.count("trained") == 1  # rank 0 reports for the job


def test_the_switch_from_rela_to_simclr_under_ddp(shard_set, tmp_path):
    """The phases train different parameters (transfer layer, then heads) and SimCLR gathers its
    negatives from both ranks: the run crosses the switch without hanging and logs both phases. On
    the stream path, where each rank reads its own part of the shards."""
    shards, _ = shard_set
    done = torchrun(CLI, "-q", *train_args(shards, tmp_path / "run", 2, "--method", "simclr", "--rela-schedule", "constant:0.5", "--data-path", "stream"))
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    switch = [r for r in records if r.get("event") == "rela_switch"]
    assert len(switch) == 1 and switch[0]["step"] == 7  # half of 2 epochs x 7 steps
    phases = {r["phase"] for r in records if "phase" in r}
    assert phases == {"rela", "ssl"}
    assert all(r["ssl_loss"] > 0 for r in records if r.get("phase") == "ssl")
    ranks = summary(tmp_path / "run")["distributed"]
    assert ranks["rela_schedule_per_rank"][0]["switch_step"] == 7
    assert ranks["steps_per_rank"] == [14, 14] and ranks["samples_per_rank_this_invocation"] == [224, 224]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]["data_path"] == "stream"


#: float32 unit roundoff.
EPS32 = float(torch.finfo(torch.float32).eps)
#: The longest reduction in the step's gradients: a 3x3 convolution's weight gradient sums over
#: the batch and every output position, B x H x W = 32 x 32 x 32 terms.
LONGEST_REDUCTION = 32 * 32 * 32
#: The relative gradient difference allowed between one process and two: 8 log2(L) eps (1.4e-5)
#: held on an AVX-512 CPU, but an AVX2 CPU's kernels sum in another order and gave up to 4.3e-5
#: (first conv layer); 2e-4 stays orders of magnitude below what a wrong distributed step moves
#: (a missing average halves or doubles a gradient; a term not gathered changes it at 1e-2 or more).
GRADIENT_TOLERANCE = max(8 * math.log2(LONGEST_REDUCTION) * EPS32, 2e-4)


def test_two_processes_compute_what_one_process_computes(shard_set, tmp_path):
    """What DDP guarantees: at the same global batch the gradient the optimiser sees, averaged over
    the two ranks, equals the one-process gradient up to float32 summation order. Blocked and
    pairwise float32 sums of n terms in two orders differ by about log2(n) roundoffs relative to
    the sum; the tolerance allows 8 times that for the longest reduction (1.4e-5; about 2e-7 is
    measured on AVX-512 and AVX2 kernels alike). After the first step the runs are compared by
    their budgets only: AdamW turns a rounding-sized gradient difference into a full-size step of
    either sign, so later weights differ by an amount that depends on the machine's kernels."""
    shards, _ = shard_set
    alone = subprocess.run([sys.executable, WORKER, str(shards), str(tmp_path / "one")], capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    done = torchrun(WORKER, str(shards), str(tmp_path / "two"), python=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary(tmp_path / "two")["budget"] == summary(tmp_path / "one")["budget"]
    one, two = (torch.load(tmp_path / run / FIRST_STEP_GRADIENTS, weights_only=True) for run in ("one", "two"))
    assert len(one) == len(two) > 10  # backbone, transfer layer and probe parameters
    tolerance = GRADIENT_TOLERANCE
    for index, (alone_grad, ddp_grad) in enumerate(zip(one, two)):
        assert alone_grad.shape == ddp_grad.shape and alone_grad.norm() > 0
        relative = ((alone_grad - ddp_grad).norm() / alone_grad.norm()).item()
        assert relative < tolerance, (index, relative, tolerance)


def test_a_killed_rank_ends_the_job_and_resume_finishes_it(shard_set, tmp_path):
    shards, _ = shard_set
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python", CLI, "-q", *train_args(shards, run, 40)]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "last.pt").is_file():
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.2)
        workers = _children(job.pid)
        assert len(workers) == 2
        victim = next(pid for pid in workers if _environ(pid).get("RANK") == "1")
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = job.communicate(timeout=120)
        ended_in = time.monotonic() - killed_at
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert ended_in < 60
    assert re.search(r"rank\s*:\s*1\b", stderr), stderr[-2000:]  # torchrun's report names the failed rank
    assert not (run / "summary.json").exists()
    # --resume with another world size (one process) finishes the same run.
    code, _, _ = run_cli(*train_args(shards, run, 40, "--resume"))
    assert code == 0
    finished = summary(run)
    assert finished["budget"]["steps"] == 40 * (240 // 32)  # data ratio 0.8 of 300 samples, batches of 32


def test_settings_a_rank_cannot_run_end_the_job_with_one_line_per_rank(shard_set, tmp_path):
    shards, _ = shard_set
    args = train_args(shards, tmp_path / "run")
    args[args.index("--batch-size") + 1] = "33"
    done = torchrun(CLI, "-q", *args)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert sorted(errors) == [f"error: rank {r} of 2: --batch-size 33 (the global batch) does not split evenly over 2 processes" for r in (0, 1)]
    assert not (tmp_path / "run").exists()
    done = torchrun(CLI, "-q", *train_args(shards, tmp_path / "run", 2, "--sync-batchnorm"))
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all("--sync-batchnorm needs CUDA ranks" in line for line in errors)


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = (Path("/proc") / str(pid) / "environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
