"""Speed must cost no accuracy: the PIL data path before against the new default path.

Trains BYOL and BYOL + ReLA (adaptive schedule) on one shard set at one budget, with several seeds,
on two data paths, and evaluates every run with ``eval``'s linear probe and k-NN:

* ``pil`` (before): ``--augment pil --precision fp32``: per-image PIL views (lightly's transforms;
  made in the DataLoader workers when the committed results were measured, in the main process
  from the stream path's decoded batches since the data paths were unified), fp32 NCHW;
* ``device`` (the new default): ``--augment device --data-path auto --precision auto``: the set
  decoded once into memory, views batched on the training device, bf16 autocast where the
  hardware has it, channels_last.

Every finished run is saved (``runs/<path>-<method>/seed<k>/result.json``); rerunning the same
command skips those and resumes a killed training run from its last epoch. Outputs in ``--out``:
``results.json`` (every run and the aggregates) and ``results.md``.

Example (the README's numbers; Fashion-MNIST train split, random ResNet-18 prior at 64 px)::

    python benchmarks/augment_equivalence.py --shards runs/demo/shards --train data/fashion-mnist/train \\
        --test data/fashion-mnist/test --out runs/augment-equivalence
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from budget_table import machine_info, mean_std

from rela_pipeline.errors import RelaError
from rela_pipeline.fileio import atomic_write, write_json_atomic
from rela_pipeline.stages.evaluate import EvalConfig, run_eval
from rela_pipeline.stages.train import TrainConfig, run_train

PATHS = {
    "pil": {"augment": "pil", "data_path": "stream", "precision": "fp32"},
    "device": {"augment": "device", "data_path": "auto", "precision": "auto"},
}
METHODS = {"byol": "none", "byol-rela": "adaptive"}
LABELS = {"byol": "BYOL", "byol-rela": "BYOL + ReLA", "pil": "PIL views, fp32 (before)", "device": "device views, memory, auto precision (new default)"}


def run_one(args: argparse.Namespace, path: str, method: str, seed: int) -> dict[str, Any]:
    """Train (or resume) and evaluate one run; saved as ``result.json`` in its directory."""
    run = args.out / "runs" / f"{path}-{method}" / f"seed{seed}"
    saved = run / "result.json"
    if saved.exists():
        return json.loads(saved.read_text())
    train_out = run / "train"
    if not (train_out / "summary.json").exists():
        resume = (train_out / "checkpoints" / "last.pt").exists()
        run_train(
            TrainConfig(
                shards=str(args.shards),
                out_dir=train_out,
                method="byol",
                backbone="convnet",
                image_size=32,
                epochs=args.epochs,
                batch_size=128,
                data_ratio=args.ratio,
                rela_schedule=METHODS[method],
                seed=seed,
                device=args.device,
                num_workers=args.num_workers,
                resume=resume,
                overwrite=not resume,
                progress=False,
                verify=seed == 0 and path == "pil",
                **PATHS[path],
            )
        )
    summary = json.loads((train_out / "summary.json").read_text())
    evaluation = run_eval(
        EvalConfig(
            checkpoint=Path(summary["checkpoint"]),
            train_dir=args.train,
            test_dir=args.test,
            device=args.device,
            num_workers=args.num_workers,
            seed=seed,
            progress=False,
        )
    )
    result = {
        "path": path,
        "method": method,
        "seed": seed,
        "linear_probe_top1": evaluation["linear_probe"]["top1"],
        "knn_top1": evaluation["knn"]["top1"],
        "train_seconds": summary["wall_clock_s"],
        "data_load_s": summary.get("data_load_s", 0.0),
        "steps": summary["budget"]["steps"],
        "budget_fraction": summary["budget"]["fraction"],
        "rela_switch_step": summary["rela_switch_step"],
        "resolved": summary.get("resolved"),
        "final_images_per_s": summary["final"].get("images_per_s"),
    }
    write_json_atomic(saved, result)
    return result


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, path): means and sample stds over seeds."""
    rows = []
    for method in METHODS:
        for path in PATHS:
            runs = [r for r in results if r["method"] == method and r["path"] == path]
            if not runs:
                continue
            probe, knn = mean_std([r["linear_probe_top1"] for r in runs]), mean_std([r["knn_top1"] for r in runs])
            seconds = mean_std([r["train_seconds"] for r in runs])
            rows.append(
                {
                    "method": method,
                    "path": path,
                    "seeds": len(runs),
                    "linear_probe_mean": probe[0],
                    "linear_probe_std": probe[1],
                    "knn_mean": knn[0],
                    "knn_std": knn[1],
                    "train_seconds_mean": seconds[0],
                    "train_seconds_std": seconds[1],
                    "data_load_s_mean": sum(r["data_load_s"] for r in runs) / len(runs),
                    "steps": runs[0]["steps"],
                    "budget_fraction": runs[0]["budget_fraction"],
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The aggregate rows as a Markdown table (accuracies in %, mean +- std)."""
    lines = [
        "| method | data path | seeds | linear probe top-1 | k-NN top-1 | training wall-clock | steps (budget) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {LABELS[r['method']]} | {LABELS[r['path']]} | {r['seeds']} | {100 * r['linear_probe_mean']:.2f} ± {100 * r['linear_probe_std']:.2f} "
            f"| {100 * r['knn_mean']:.2f} ± {100 * r['knn_std']:.2f} | {r['train_seconds_mean']:.0f} ± {r['train_seconds_std']:.0f} s "
            f"| {r['steps']} ({r['budget_fraction']:.1%}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--train", type=Path, required=True, help="labelled ImageFolder for the probe and the k-NN bank")
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="output directory; rerun the same command to resume")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--ratio", type=float, default=0.2, help="the budget: each epoch's fraction of the data")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--paths", default="pil,device", help="comma-separated data paths to run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    machine = machine_info(args.device)
    results = []
    try:
        for seed in range(args.seeds):  # seeds outermost: every cell has a result early
            for method in METHODS:
                for path in [p for p in args.paths.split(",") if p]:
                    if path not in PATHS:
                        raise RelaError(f"unknown data path {path!r}; choose from {', '.join(PATHS)}")
                    result = run_one(args, path, method, seed)
                    results.append(result)
                    print(
                        f"{method} {path} seed {seed}: probe {result['linear_probe_top1']:.2%} k-NN {result['knn_top1']:.2%} "
                        f"train {result['train_seconds']:.0f} s",
                        flush=True,
                    )
    except RelaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = aggregate(results)
    payload = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "paths": PATHS,
        "machine": machine,
        "rows": rows,
        "runs": results,
        "wall_clock_s_this_invocation": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(args.out / "results.json", payload)
    with atomic_write(args.out / "results.md", "w") as handle:
        handle.write(markdown(rows))
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
