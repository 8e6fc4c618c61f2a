"""Stage two's throughput with 1 and N processes: ``rela-pipeline train`` alone against the same
run under ``torchrun --nproc-per-node N`` (DistributedDataParallel), same global batch.

Each configuration is the real CLI in a subprocess; its rate is the median of the
``metrics.jsonl`` interval rates after the first interval (start-up excluded; images of the global
batch per second of the whole job), and the run's wall-clock (the memory path's one decoding pass
included) is kept beside it. The configurations are interleaved for ``--rounds`` rounds (1, N, 1,
N, ...) so a slow spell of a shared machine does not fall on one column; the table gives medians,
the JSON every value. On CPU, one process uses every core (torch's intra-op threads) and each of N
ranks ``cores / N`` threads, so the comparison is the same machine split two ways; on GPUs, one
GPU per rank. Example (the README's CPU numbers)::

    python benchmarks/train_distributed.py --shards runs/demo/shards --processes 2 \\
        --out benchmarks/results/train-distributed-cpu.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from torchrun_cli import comparison_parser, machine, run_cli

from rela_pipeline.fileio import write_json_atomic


def cli_train(shards: str, out: Path, processes: int, options: list[str], threads: int) -> dict:
    """Run ``rela-pipeline train`` with ``processes`` ranks (1: no torchrun) and return its rates.

    Raises:
        SystemExit: the run failed (its last stderr lines are printed).
    """
    run_cli(processes, ["train", "--shards", shards, "--out", str(out), "--overwrite", *options], threads)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r][1:]
    summary = json.loads((out / "summary.json").read_text())
    return {
        "images_per_s": statistics.median(rates),
        "interval_rates": rates,
        "wall_clock_s": summary["wall_clock_s"],
        "data_load_s": summary["data_load_s"],
        "steps": summary["budget"]["steps"],
        "images_seen": summary["budget"]["images_seen"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (argv: the command line's arguments); return the exit status."""
    parser = comparison_parser(__doc__)
    parser.add_argument("--shards", required=True, help="a shard set (e.g. runs/demo/shards)")
    parser.add_argument("--backbone", default="convnet")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data-ratio", type=float, default=0.25)
    parser.add_argument("--log-every", type=int, default=5, help="steps per rate interval")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    options = [
        "--backbone",
        args.backbone,
        "--image-size",
        str(args.image_size),
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--data-ratio",
        str(args.data_ratio),
        "--data-path",
        "memory",
        "--device",
        args.device,
        "--num-workers",
        "0",
        "--log-every",
        str(args.log_every),
    ]
    # The ReLA phase (the adaptive schedule does not switch in a run this short) and BYOL alone.
    phases = {"ReLA phase": [], "BYOL (--no-rela)": ["--no-rela"]}
    results: dict[tuple[str, int], list[dict]] = {(phase, p): [] for phase in phases for p in (1, args.processes)}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for phase, processes in results:
                threads = max(cores // processes, 1)
                result = cli_train(args.shards, Path(scratch) / f"p{processes}", processes, options + phases[phase], threads)
                results[(phase, processes)].append(result)
                print(f"round {round_}: {phase}, {processes} process(es) x {threads} threads: {result['images_per_s']:.0f} img/s", flush=True)
    median = {key: statistics.median(r["images_per_s"] for r in runs) for key, runs in results.items()}
    payload = {
        "machine": machine(),
        "settings": vars(args) | {"out": str(args.out)},
        "median_images_per_s": {f"{phase}, {p} process(es)": round(v, 1) for (phase, p), v in median.items()},
        "speedup": {phase: round(median[(phase, args.processes)] / median[(phase, 1)], 3) for phase in phases},
        "runs": {f"{phase}, {p} process(es)": runs for (phase, p), runs in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, payload)
    print(f"| phase | processes | img/s (median of {args.rounds}) | vs 1 process |\n| --- | ---: | ---: | ---: |")
    for (phase, p), v in median.items():
        print(f"| {phase} | {p} | {v:.0f} | {v / median[(phase, 1)]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
