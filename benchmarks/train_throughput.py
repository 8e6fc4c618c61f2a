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
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rela_pipeline.methods import build_method
from rela_pipeline.models import build_backbone
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


def model_alone(
    backbone_name: str, image_size: int, batch_size: int, steps: int, warmup: int, device: torch.device, target_dim: int, rela: bool, precision: str
) -> float:
    """Images per second of :class:`TrainStep` (the training step ``run_train`` uses: same
    precision, memory format, optimiser and probe) on device-resident random batches.

    Returns:
        images/s over ``steps`` timed steps after ``warmup`` untimed ones.
    """
    torch.manual_seed(0)
    backbone = build_backbone(backbone_name, cifar_stem=image_size <= 64)
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
                **overrides,
            )
        )
        records = [json.loads(line) for line in (Path(run) / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r][1:]
    return (statistics.median(rates) if rates else float("nan")), summary["data_load_s"]


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
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device).name
    workers = args.num_workers if args.num_workers is not None else default_num_workers()
    target_dim = open_shard_set(args.shards).target_dim
    rows = []
    for phase, rela in (("ReLA phase", True), ("BYOL phase", False)):
        measured: dict[str, list[float]] = {}
        load_s: list[float] = []
        for _ in range(args.rounds):
            measured.setdefault("model alone", []).append(
                model_alone(args.backbone, args.image_size, args.batch_size, args.steps, args.warmup, device, target_dim, rela, precision)
            )
            measured.setdefault("model alone, fp32", []).append(
                model_alone(args.backbone, args.image_size, args.batch_size, args.steps, args.warmup, device, target_dim, rela, "fp32")
            )
            for label, overrides in PIPELINES.items():
                overrides = {"precision": precision, **overrides}
                rate, seconds = pipeline(args.shards, args.backbone, args.image_size, args.batch_size, args.steps, str(device), workers, rela, overrides)
                measured.setdefault(label, []).append(rate)
                if overrides["data_path"] == "memory":
                    load_s.append(seconds)
        row = {"phase": phase, **{label: round(statistics.median(values), 1) for label, values in measured.items()}}
        row["rounds"] = {label: [round(v, 1) for v in values] for label, values in measured.items()}
        row["memory: data_load_s"] = round(statistics.median(load_s), 2)
        row["memory / model alone"] = round(row["memory + device views"] / row["model alone"], 3)
        row["memory / PIL (before)"] = round(row["memory + device views"] / row["PIL stream (before)"], 3)
        row["stream / PIL (before)"] = round(row["stream + device views"] / row["PIL stream (before)"], 3)
        rows.append(row)
    host = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "workers": workers,
        "precision": precision,
    }
    print(f"BYOL + ReLA, {args.backbone} at {args.image_size} px, batch {args.batch_size}, {host['device']}, {workers} workers, precision {precision}")
    columns = ["model alone", "model alone, fp32", *PIPELINES, "memory / model alone", "memory / PIL (before)"]
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
