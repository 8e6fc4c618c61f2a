"""Stage one with 1 and N processes: ``rela-pipeline embed`` alone against the same run under
``torchrun --nproc-per-node N``, and how far apart their outputs are.

Each configuration is the real CLI in a subprocess, with ``--keep-embeddings``. Its embedding rate
is the manifest's ``throughput.embed_images_per_s``: images / seconds of the slowest rank's loop.
Its phase timings are rank 0's ``timings_s``. The configurations are interleaved for ``--rounds``
rounds (1, N, 1, N, ...) so a slow spell of a shared machine does not fall on one column. On CPU,
one process uses every core and each of N ranks ``cores / N`` threads: the same machine split two
ways (on GPUs, one GPU per rank).

The outputs of the last round are compared:

- whether every shard, ``transport.npz`` and ``scores.npz`` is byte-identical;
- the largest difference of the raw embeddings, relative to their scale;
- the largest difference of the float16 targets recomputed from each run's embeddings and
  transport: absolute (targets have unit variance; one float16 step at 1.0 is 2^-10), and in
  float16 steps (``numpy.spacing``) at the target's value, which near zero are tiny.

Byte identity needs the same kernels in the same thread count (README, "Many GPUs and nodes"); one
process with 2 threads against 2 processes with 1 thread each need not give it.

    python benchmarks/embed_distributed.py --data data/fashion-mnist/train --processes 2 \\
        --out benchmarks/results/embed-distributed-cpu.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torchrun_cli import comparison_parser, machine, run_cli

from rela_pipeline.fileio import write_json_atomic
from rela_pipeline.transport import LinearTransport


def cli_embed(data: str, out: Path, processes: int, options: list[str], threads: int) -> dict:
    """Run ``rela-pipeline embed`` with ``processes`` ranks (1: no torchrun); return its manifest.

    Raises:
        SystemExit: the run failed (its last stderr lines are printed).
    """
    run_cli(processes, ["embed", "--data", data, "--out", str(out), "--overwrite", "--keep-embeddings", *options], threads)
    return json.loads((out / "manifest.json").read_text())


def compare(one: Path, many: Path, manifests: tuple[dict, dict]) -> dict:
    """How far the N-process output is from the one-process output (see the module docstring)."""
    files = {s["name"]: s["sha256"] for s in manifests[0]["shards"]} | {
        "transport.npz": manifests[0]["transport"]["sha256"],
        "scores.npz": manifests[0]["scores"]["sha256"],
    }
    other = {s["name"]: s["sha256"] for s in manifests[1]["shards"]} | {
        "transport.npz": manifests[1]["transport"]["sha256"],
        "scores.npz": manifests[1]["scores"]["sha256"],
    }
    embeddings = [np.load(run / "embeddings.npy") for run in (one, many)]
    targets = [LinearTransport.load(run / "transport.npz").apply(torch.from_numpy(e)).numpy().astype(np.float16) for run, e in zip((one, many), embeddings)]
    apart = np.abs(targets[0].astype(np.float32) - targets[1].astype(np.float32))
    steps = apart / np.spacing(np.abs(targets[0]))
    return {
        "files_identical": files == other,
        "files_differing": sorted(name for name in files if files[name] != other.get(name)),
        "embeddings_max_abs_difference": float(np.abs(embeddings[0] - embeddings[1]).max()),
        "embeddings_abs_max": float(np.abs(embeddings[0]).max()),
        "targets_max_abs_difference": float(apart.max()),
        "targets_max_difference_float16_steps": float(steps.max()),
        "targets_fraction_differing": float(np.mean(targets[0] != targets[1])),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (argv: the command line's arguments); return the exit status."""
    parser = comparison_parser(__doc__)
    parser.add_argument("--data", required=True, help="an ImageFolder (e.g. data/fashion-mnist/train)")
    parser.add_argument("--prior", default="random:resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    options = ["--prior", args.prior, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--device", args.device, "--num-workers", "0"]
    runs: dict[int, list[dict]] = {1: [], args.processes: []}
    with tempfile.TemporaryDirectory() as scratch:
        outs = {p: Path(scratch) / f"p{p}" for p in runs}
        for round_ in range(args.rounds):
            for processes in runs:
                threads = max(cores // processes, 1)
                manifest = cli_embed(args.data, outs[processes], processes, options, threads)
                runs[processes].append(
                    {
                        "embed_images_per_s": manifest["throughput"]["embed_images_per_s"],
                        "timings_s": manifest["timings_s"],
                        "threads_per_process": threads,
                        "samples": manifest["samples"]["written"],
                        "shards": len(manifest["shards"]),
                    }
                )
                print(
                    f"round {round_}: {processes} process(es) x {threads} threads: {manifest['throughput']['embed_images_per_s']:.0f} img/s embedding, "
                    f"{manifest['timings_s']['total']:.1f} s in all",
                    flush=True,
                )
        difference = compare(outs[1], outs[args.processes], tuple(json.loads((outs[p] / "manifest.json").read_text()) for p in runs))
    rate = {p: statistics.median(r["embed_images_per_s"] for r in rs) for p, rs in runs.items()}
    total = {p: statistics.median(r["timings_s"]["total"] for r in rs) for p, rs in runs.items()}
    payload = {
        "machine": machine(),
        "settings": vars(args) | {"out": str(args.out)},
        "median_embed_images_per_s": {f"{p} process(es)": round(v, 1) for p, v in rate.items()},
        "median_total_s": {f"{p} process(es)": round(v, 2) for p, v in total.items()},
        "embed_speedup": round(rate[args.processes] / rate[1], 3),
        "output_difference": difference,
        "runs": {f"{p} process(es)": rs for p, rs in runs.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, payload)
    print(f"| processes | embedding img/s (median of {args.rounds}) | whole stage s | vs 1 process (embedding) |\n| ---: | ---: | ---: | ---: |")
    for p in runs:
        print(f"| {p} | {rate[p]:.0f} | {total[p]:.1f} | {rate[p] / rate[1]:.2f}x |")
    print(json.dumps(difference, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
