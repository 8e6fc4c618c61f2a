"""Training throughput of stage two: images per second of each data path beside the model alone.

For BYOL + ReLA, in one process on one machine, for the ReLA phase and the BYOL phase, it measures:

* ``model alone``: optimisation steps on batches already on the device (no data, no views), at
  the precision and memory format ``train`` resolves to (``--precision auto``);
* ``PIL stream (before)``: ``run_train --augment pil --data-path stream --precision fp32``, the
  views and numerics before the device views existed: per-image PIL views (lightly's transforms),
  fp32 NCHW. Since the data paths were unified the PIL views are made in the main process from
  the stream path's decoded batches; the committed results were measured when its DataLoader
  workers made them;
* ``stream + device views``: ``run_train --augment device --data-path stream`` (tar reading and
  decoding in workers, views batched on the device);
* ``memory + device views``: ``run_train --augment device --data-path memory`` (decoded once;
  the one-off decoding pass is reported apart, as ``data_load_s``).

The ``run_train`` rates are the median of ``metrics.jsonl`` interval rates after the first
interval (which includes start-up). Every measurement is repeated ``--rounds`` times, the rounds
interleaved (model alone, then each path, then again), and the table gives the medians, so a
slow spell of a shared machine does not fall on one column only; the JSON keeps every value.
Report ratios, not absolute rates, across machines. Example (the README's CPU numbers)::

    python benchmarks/train_throughput.py --shards runs/demo/shards --backbone convnet --image-size 32 \\
        --batch-size 128 --steps 60 --out benchmarks/results/train-throughput-cpu.json

``--backbone`` takes every student name (``timm:<name>``, ``torchvision:<arch>``); ``--paths
memory --phases rela`` measures only the memory path in the ReLA phase (the students page)::

    python benchmarks/train_throughput.py --shards SHARDS --backbone timm:resnet10t --paths memory \\
        --phases rela --no-fp32 --batch-size 64 --steps 12 --warmup 3 --rounds 2 --out students/timm_resnet10t.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rela_pipeline.methods import build_method
from rela_pipeline.models import backbone_config, build_backbone
from rela_pipeline.rela import ConstantSchedule, NoRelaSchedule, ReLA
from rela_pipeline.runtime import resolve_device, resolve_precision, uses_channels_last
from rela_pipeline.shards.reader import open_shard_set
from rela_pipeline.stages.train import TrainConfig, default_num_workers, run_train
from rela_pipeline.stages.train.step import TrainStep

#: The data paths measured through ``run_train``: label -> TrainConfig overrides.
PIPELINES = {
    "PIL stream (before)": {"augment": "pil", "data_path": "stream", "precision": "fp32"},
    "stream + device views": {"augment": "device", "data_path": "stream"},
    "memory + device views": {"augment": "device", "data_path": "memory"},
}
#: ``--paths`` names of the :data:`PIPELINES`.
PATH_NAMES = {"pil": "PIL stream (before)", "stream": "stream + device views", "memory": "memory + device views"}
#: ``--phases`` names: phase label and whether ReLA is on.
PHASES = {"rela": ("ReLA phase", True), "byol": ("BYOL phase", False)}


def model_alone(
    backbone_name: str, image_size: int, batch_size: int, steps: int, warmup: int, device: torch.device, target_dim: int, rela: bool, precision: str
) -> float:
    """Images per second of :class:`TrainStep` (the training step ``run_train`` uses: same
    precision, memory format, optimiser and probe) on device-resident random batches.

    Returns:
        images/s over ``steps`` timed steps after ``warmup`` untimed ones.
    """
    torch.manual_seed(0)
    backbone = build_backbone(**backbone_config(backbone_name, image_size <= 64, image_size))
    schedule = ConstantSchedule(1.0) if rela else NoRelaSchedule()
    model = ReLA(build_method("byol", backbone), min(backbone.feature_dim, target_dim), schedule).to(device)
    schedule.start(0, steps + warmup)
    probe = torch.nn.Linear(backbone.feature_dim, 10).to(device)
    step = TrainStep(model, probe, 1e-3, 0.01, "constant", steps + warmup, resolve_precision(precision, device))
    memory_format = torch.channels_last if uses_channels_last(backbone) else torch.contiguous_format
    views = [torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=memory_format) for _ in range(2)]
    targets = torch.randn(batch_size, model.target_dim, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)

    def one(i: int) -> None:
        result = step(views, targets, labels, True)
        model.step_end(result.output, i, steps + warmup)

    for i in range(warmup):
        one(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        one(warmup + i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    step.close()
    return steps * batch_size / (time.perf_counter() - start)


def pipeline(
    shards: str, backbone_name: str, image_size: int, batch_size: int, steps: int, device: str, num_workers: int, rela: bool, overrides: dict
) -> tuple[float, float]:
    """``(images/s, data_load_s)`` of ``run_train`` over about ``steps`` steps of one epoch: the
    median interval rate after the first interval, and the one-off data loading time."""
    source = open_shard_set(shards)
    ratio = min(1.0, steps * batch_size / source.num_samples)
    with tempfile.TemporaryDirectory() as run:
        summary = run_train(
            TrainConfig(
                shards=shards,
                out_dir=Path(run) / "run",
                backbone=backbone_name,
                image_size=image_size,
                epochs=1,
                batch_size=batch_size,
                data_ratio=ratio,
                rela_schedule="constant:1.0" if rela else "none",
                device=device,
                num_workers=num_workers,
                log_every=max(1, steps // 6),
                progress=False,
                verify=False,
                logger="none",  # metrics.jsonl only, as before loggers existed: no TensorBoard writes in the rate
                **overrides,
            )
        )
        records = [json.loads(line) for line in (Path(run) / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r][1:]
    return (statistics.median(rates) if rates else float("nan")), summary["data_load_s"]


def cpu_model() -> str:
    """The CPU's ``model name`` from ``/proc/cpuinfo`` ("unknown" where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def git_commit() -> str | None:
    """The checkout's commit (``git rev-parse --short HEAD``), or None outside a git checkout."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True, help="an embed output directory")
    parser.add_argument("--backbone", default="convnet")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every measurement (medians reported)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="precision of the new paths and of the model alone")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--paths", default="pil,stream,memory", help="data paths measured through run_train, of: pil, stream, memory")
    parser.add_argument("--phases", default="rela,byol", help="phases measured, of: rela, byol")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the process (torch.set_num_threads) [default: torch's, one per core]; 1 on a shared machine, where threads that wait for each other stall",
    )
    parser.add_argument("--no-fp32", action="store_true", help="skip the fp32 model-alone column (the resolved precision's is always measured)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        pipelines = {PATH_NAMES[p]: PIPELINES[PATH_NAMES[p]] for p in args.paths.split(",")}
        phases = [PHASES[p] for p in args.phases.split(",")]
    except KeyError as error:
        parser.error(f"unknown --paths or --phases entry {error}")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    precision = resolve_precision(args.precision, device).name
    workers = args.num_workers if args.num_workers is not None else default_num_workers()
    target_dim = open_shard_set(args.shards).target_dim
    rows = []
    for phase, rela in phases:
        measured: dict[str, list[float]] = {}
        load_s: list[float] = []
        for _ in range(args.rounds):
            measured.setdefault("model alone", []).append(
                model_alone(args.backbone, args.image_size, args.batch_size, args.steps, args.warmup, device, target_dim, rela, precision)
            )
            if not args.no_fp32:
                measured.setdefault("model alone, fp32", []).append(
                    model_alone(args.backbone, args.image_size, args.batch_size, args.steps, args.warmup, device, target_dim, rela, "fp32")
                )
            for label, overrides in pipelines.items():
                overrides = {"precision": precision, **overrides}
                rate, seconds = pipeline(args.shards, args.backbone, args.image_size, args.batch_size, args.steps, str(device), workers, rela, overrides)
                measured.setdefault(label, []).append(rate)
                if overrides["data_path"] == "memory":
                    load_s.append(seconds)
        row = {"phase": phase, **{label: round(statistics.median(values), 1) for label, values in measured.items()}}
        row["rounds"] = {label: [round(v, 1) for v in values] for label, values in measured.items()}
        memory, stream, pil = (row.get(PATH_NAMES[p]) for p in ("memory", "stream", "pil"))
        if memory is not None:
            row["memory: data_load_s"] = round(statistics.median(load_s), 2)
            row["memory / model alone"] = round(memory / row["model alone"], 3)
        if memory is not None and pil is not None:
            row["memory / PIL (before)"] = round(memory / pil, 3)
        if stream is not None and pil is not None:
            row["stream / PIL (before)"] = round(stream / pil, 3)
        rows.append(row)
    host = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "cpu_model": cpu_model(),
        "commit": git_commit(),
        "cpus": torch.get_num_threads(),  # torch threads (--threads)
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "workers": workers,
        "precision": precision,
        # 1-minute load average at the start and the end: other work on a shared machine shows here
        "loadavg_1min": [round(load_start[0], 2), round(os.getloadavg()[0], 2)] if load_start else None,
    }
    print(f"BYOL + ReLA, {args.backbone} at {args.image_size} px, batch {args.batch_size}, {host['device']}, {workers} workers, precision {precision}")
    columns = [c for c in ["model alone", "model alone, fp32", *PIPELINES, "memory / model alone", "memory / PIL (before)"] if c in rows[0]]
    print("| phase | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for row in rows:
        print(f"| {row['phase']} | " + " | ".join(f"{row[c]:.2f}" if "/" in c else f"{row[c]:.0f}" for c in columns) + " |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "host": host, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
