"""The real ``rela-pipeline`` CLI with 1 or N processes, for the benchmarks that compare them
(``embed_distributed.py``, ``train_distributed.py``)."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch


def run_cli(processes: int, args: list[str], threads: int) -> subprocess.CompletedProcess:
    """``rela-pipeline -q ARGS`` alone (``processes == 1``) or under ``torchrun --standalone
    --nproc-per-node N --no-python``, with ``OMP_NUM_THREADS=threads`` per process.

    Raises:
        SystemExit: the run failed (its last stderr lines are printed).
    """
    command = [str(Path(sys.executable).parent / "rela-pipeline"), "-q", *args]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), "--no-python", *command]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        sys.exit(f"{processes} process(es) failed:\n{done.stderr[-2000:]}")
    return done


def machine() -> dict:
    """The machine a benchmark ran on: CPU, cores, torch version, GPU name (None without one)."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count() or 1,
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def comparison_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the arguments every 1-against-N comparison takes: ``--processes`` (N),
    ``--device``, ``--rounds`` and ``--out`` (the JSON result); the benchmark adds its own."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="N, the ranks of the distributed run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per rank)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", required=True, type=Path, help="JSON result")
    return parser
