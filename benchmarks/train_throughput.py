"""Training throughput of stage two: images per second, the full pipeline beside the model alone.

For BYOL + ReLA, in one process on one machine, it measures:

* ``model_only``: optimisation steps on batches already on the device (no data loading), for the
  ReLA phase (backbone + transfer layer) and for the BYOL phase (online + teacher networks);
* ``pipeline``: ``run_train`` streaming the shard set (decode, views in worker processes, transfer
  to the device), one run per phase, img/s from ``metrics.jsonl`` after the first interval.

The ratio pipeline / model_only says how much the data path costs. Example (the issue's GPU
setting: ResNet-18 with the CIFAR stem at 32 px)::

    python benchmarks/train_throughput.py --shards runs/demo/shards --backbone resnet18 --image-size 32 \\
        --batch-size 256 --steps 60 --out runs/train_throughput.json
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
from rela_pipeline.runtime import autocast_and_scaler, resolve_device
from rela_pipeline.shards.reader import open_shard_set
from rela_pipeline.stages.train import TrainConfig, default_num_workers, run_train


def model_only(backbone_name: str, image_size: int, batch_size: int, steps: int, warmup: int, device: torch.device, target_dim: int, rela: bool) -> float:
    """Images per second of optimisation steps on device-resident random batches.

    Returns:
        images/s over ``steps`` timed steps after ``warmup`` untimed ones.
    """
    torch.manual_seed(0)
    backbone = build_backbone(backbone_name, cifar_stem=image_size <= 64)
    schedule = ConstantSchedule(1.0) if rela else NoRelaSchedule()
    model = ReLA(build_method("byol", backbone), min(backbone.feature_dim, target_dim), schedule).to(device)
    schedule.start(0, steps + warmup)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    autocast, scaler = autocast_and_scaler(device, True)
    views = [torch.randn(batch_size, 3, image_size, image_size, device=device) for _ in range(2)]
    targets = torch.randn(batch_size, target_dim, device=device)

    def step(i: int) -> None:
        with autocast():
            out = model(views, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out.loss).backward()
        scaler.step(optimizer)
        scaler.update()
        model.step_end(out, i, steps + warmup)

    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def pipeline(shards: str, backbone_name: str, image_size: int, batch_size: int, steps: int, device: str, num_workers: int, rela: bool) -> float:
    """Images per second of ``run_train`` over the shard set (one epoch of about ``steps`` steps),
    the median of the interval rates after the first interval (which includes start-up)."""
    source = open_shard_set(shards)
    ratio = min(1.0, steps * batch_size / source.num_samples)
    with tempfile.TemporaryDirectory() as run:
        run_train(TrainConfig(
            shards=shards, out_dir=Path(run) / "run", backbone=backbone_name, image_size=image_size, epochs=1,
            batch_size=batch_size, data_ratio=ratio, rela_schedule="constant:1.0" if rela else "none",
            device=device, num_workers=num_workers, log_every=max(1, steps // 6), progress=False,
        ))
        records = [json.loads(line) for line in (Path(run) / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r][1:]
    return statistics.median(rates) if rates else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True, help="an embed output directory")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    workers = args.num_workers if args.num_workers is not None else default_num_workers()
    target_dim = open_shard_set(args.shards).target_dim
    rows = []
    for phase, rela in (("ReLA phase", True), ("BYOL phase", False)):
        alone = model_only(args.backbone, args.image_size, args.batch_size, args.steps, args.warmup, device, target_dim, rela)
        streamed = pipeline(args.shards, args.backbone, args.image_size, args.batch_size, args.steps, str(device), workers, rela)
        rows.append({"phase": phase, "model_only_img_s": round(alone, 1), "pipeline_img_s": round(streamed, 1), "ratio": round(streamed / alone, 3)})
    host = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu", "torch": torch.__version__, "workers": workers}
    print(f"BYOL + ReLA, {args.backbone} at {args.image_size} px, batch {args.batch_size}, {host['device']}, {workers} workers")
    print("| phase | model alone, img/s | full pipeline, img/s | pipeline / model |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['phase']} | {row['model_only_img_s']:.0f} | {row['pipeline_img_s']:.0f} | {row['ratio']:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "host": host, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
