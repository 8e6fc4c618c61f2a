"""Throughput of stage one (``rela-pipeline embed``), measured against its own ceiling.

Four modes run side by side in one process on the same machine, on the first N images (sorted
relative paths, as the stage orders them) of an ImageFolder:

``naive``         a per-image loop: decode -> uint8 transform -> normalise -> model(x[None])
                  -> ``.cpu()``; the baseline a straightforward script would get.
``forward_only``  the prior's forward pass alone (normalise + model, same autocast and
                  channels_last as the stage) on one pre-decoded uint8 batch already on the
                  device, ``ceil(N / batch)`` passes (the last one partial), warm-up excluded,
                  CUDA synchronised before the clock stops: the ceiling for the stage.
``embed_loop``    :func:`embed_images`: DataLoader decoding + forward + memory-map writes +
                  progress checkpoints (the stage's default interval).
``full_stage``    :func:`run_embed` end to end (scan, embed, transport, faiss scores, shards,
                  manifest) into a temporary OUT; img/s excludes prior loading (the row
                  ``full_stage+load`` includes it).

Why: the stage should be bound by the model, not by decoding, host/device copies or writing.
The goal on a GPU (H100) is ``full_stage`` >= 90% of ``forward_only`` img/s. On a small CPU
machine the forward pass dominates and the ratios mostly show the cost of the workers sharing
the cores with the model.

The default ``--data`` is the 300-image test fixture (a smoke run); for real numbers pass the
prepared Fashion-MNIST train split (60,000 images), e.g. ``--data data/fashion-mnist/train``.

    python benchmarks/embed_throughput.py --data data/fashion-mnist/train --image-size 64 --out bench.json
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rela_pipeline.fileio import create_npy_memmap, write_json_atomic
from rela_pipeline.imagefolder import ImageFolderIndex, decode_rgb, scan_image_folder
from rela_pipeline.priors import Prior, load_prior
from rela_pipeline.runtime import Precision, resolve_device, resolve_prior_precision
from rela_pipeline.stages.embed import EmbedConfig, default_batch_size, embed_images, embedding_dim, run_embed

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fashion_mnist_mini" / "train"


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA work (no-op on CPU) so the clock measures finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model name from /proc/cpuinfo (platform string as a fallback)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


def make_subset(data: Path, count: int, root: Path) -> ImageFolderIndex:
    """Symlink the first ``count`` images (sorted) of ``data`` under ``root``, keeping class folders."""
    source = scan_image_folder(data)
    for relative in source.files[:count]:
        link = root / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source.root / relative)
    return scan_image_folder(root)


def bench_naive(index: ImageFolderIndex, prior: Prior, device: torch.device, count: int, precision: Precision) -> float:
    """Seconds for the per-image loop over the first ``count`` images (2 warm-up images excluded)."""
    transform, pre = prior.preprocessing.to_uint8_transform(), prior.preprocessing
    paths = [index.root / f for f in index.files[:count]]

    def one(path: Path) -> torch.Tensor:
        x = transform(decode_rgb(path)).to(device)
        with precision.autocast():
            return prior.model(pre.normalise(x[None])).cpu()

    with torch.inference_mode():
        for path in paths[:2]:
            one(path)
        start = time.perf_counter()
        for path in paths:
            one(path)
    return time.perf_counter() - start


def bench_forward(index: ImageFolderIndex, prior: Prior, device: torch.device, count: int, batch: int, precision: Precision) -> float:
    """Seconds for ``ceil(count / batch)`` forward passes at ``precision`` on one pre-loaded batch
    (warm-up excluded; the device synchronised before the clock stops)."""
    transform, pre = prior.preprocessing.to_uint8_transform(), prior.preprocessing
    files = [index.files[i % len(index.files)] for i in range(batch)]
    images = torch.stack([transform(decode_rgb(index.root / f)) for f in files]).to(device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    sizes = [batch] * (count // batch) + ([count % batch] if count % batch else [])

    def run(size: int) -> None:
        with precision.autocast():
            prior.model(pre.normalise(images[:size]))

    with torch.inference_mode():
        for size in sorted(set(sizes)):
            run(size)
        _sync(device)
        start = time.perf_counter()
        for size in sizes:
            run(size)
        _sync(device)
    return time.perf_counter() - start


def median_seconds(repeats: int, measure) -> tuple[float, list[float]]:
    """Run ``measure()`` ``repeats`` times; return the median and all values (seconds)."""
    values = [measure() for _ in range(repeats)]
    return statistics.median(values), values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--data",
        type=Path,
        default=FIXTURE,
        help="ImageFolder root; the default is a 300-image fixture, pass the prepared Fashion-MNIST train split for real numbers",
    )
    p.add_argument("--prior", default="random:resnet18")
    p.add_argument("--image-size", type=int, default=None, help="resize to this size (default: the prior's own preprocessing)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the stage's (256 on CUDA, 32 on CPU)")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", help="the prior's forward pass (embed --precision)")
    p.add_argument("--images", type=int, default=8192, help="N for forward_only, embed_loop and full_stage")
    p.add_argument("--naive-images", type=int, default=512)
    p.add_argument("--repeats", type=int, default=1, help="runs per mode; the median is reported")
    p.add_argument("--out", type=Path, default=None, help="write all numbers as JSON to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the four modes, print the Markdown table, write the JSON; return the JSON record."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.batch_size is None:
        args.batch_size = default_batch_size(device)
    precision = resolve_prior_precision(args.precision, device)
    prior = load_prior(args.prior, image_size=args.image_size)
    prior.model.to(device)
    if device.type == "cuda":  # as embed_images does
        prior.model.to(memory_format=torch.channels_last)
    machine = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "precision": precision.name,
    }
    size = prior.preprocessing.crop_size
    print(
        f"# embed throughput: {machine['device_name']} ({device}), torch {torch.__version__}, prior {args.prior}, "
        f"image size {size}, batch size {args.batch_size}, workers {args.num_workers}"
    )
    results: dict[str, dict] = {}
    stage_timings: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rela-bench-") as tmp:
        index = make_subset(args.data, args.images, Path(tmp) / "data")
        n, n_naive = len(index.files), min(args.naive_images, len(index.files))
        if n < args.images:
            print(f"note: {args.data} holds only {n} images; N = {n}")

        def stage() -> float:
            out = Path(tmp) / "out"
            config = EmbedConfig(
                data_dir=index.root,
                prior=args.prior,
                out_dir=out,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                device=args.device,
                precision=args.precision,
                image_size=args.image_size,
                progress=False,
            )
            timings = run_embed(config)["timings_s"]
            stage_timings.append(timings)
            shutil.rmtree(out)
            return timings["total"] - timings["load_prior"]

        def loop() -> float:
            embeddings = create_npy_memmap(Path(tmp) / "embeddings.npy", "float32", (n, embedding_dim(prior, device)))
            return embed_images(
                index,
                prior,
                embeddings,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                device=device,
                precision=precision,
                progress=False,
                on_checkpoint=lambda *_: embeddings.flush(),
            ).seconds

        measures = {
            "forward_only": (n, lambda: bench_forward(index, prior, device, n, args.batch_size, precision)),
            "naive": (n_naive, lambda: bench_naive(index, prior, device, n_naive, precision)),
            "embed_loop": (n, loop),
            "full_stage": (n, stage),
        }
        for mode, (count, measure) in measures.items():
            seconds, values = median_seconds(args.repeats, measure)
            results[mode] = {"images": count, "seconds": seconds, "seconds_all": values}
    with_load = [t["total"] for t in stage_timings]
    results["full_stage+load"] = {"images": n, "seconds": statistics.median(with_load), "seconds_all": with_load}
    ceiling = n / results["forward_only"]["seconds"]
    print("\n| mode | images | seconds | img/s | ratio to forward_only |\n|---|---:|---:|---:|---:|")
    for mode in ("naive", "forward_only", "embed_loop", "full_stage", "full_stage+load"):
        r = results[mode]
        r["images_per_s"] = r["images"] / r["seconds"]
        r["ratio_to_forward_only"] = r["images_per_s"] / ceiling
        print(f"| {mode} | {r['images']} | {r['seconds']:.2f} | {r['images_per_s']:.1f} | {r['ratio_to_forward_only']:.3f} |")
    record = {
        "command": [sys.executable, *sys.argv],
        "machine": machine,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"image_size_used": size},
        "results": results,
        "full_stage_timings_s": stage_timings,
    }
    if args.out is not None:
        write_json_atomic(args.out, record)
    return record


if __name__ == "__main__":
    main()
