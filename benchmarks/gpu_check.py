"""GPU check: every CUDA path of both stages in one offline command, with its numbers.

On a machine with one CUDA GPU, torch installed and no network, this makes a synthetic JPEG
ImageFolder, then measures, in this order (each section a top-level key of the JSON):

``environment``  torch, CUDA, cuDNN, the GPU, the CPU model, and faiss: its version and whether it
                 sees the GPU, asked in this process after torch has initialised CUDA.
``embed``        ``run_embed`` end to end for ``random:resnet50`` and ``open_clip:ViT-B-16:random``
                 at 224 px: decoding in the CPU workers and on the GPU at the default precision
                 (fp32), and on the GPU in bf16; beside ``forward_only_images_per_s`` (the prior
                 alone on a device-resident batch, same precision); where one image's time goes
                 (read, decode, resize, copy, forward); and how far the GPU-decoded targets are
                 from the CPU-decoded ones (per transported component).
``train``        a ResNet-18 (CIFAR stem) at 32 px and a ResNet-50 at 160 px: the memory path with
                 device views (``run_train``) beside ``model_alone_images_per_s`` (the training step
                 on device-resident batches), in the ReLA and the BYOL phase, bf16; and one fp16
                 run (the loss-scaling path).
``scores``       exact and IVF faiss search at 1M x 64 on the GPU when faiss sees one, else on the
                 CPU (saying why) at a size the CPU finishes.
``eval``         ``run_eval`` of a short run's backbone on the synthetic set, on the GPU.
``methods``      every method of :data:`rela_pipeline.methods.METHODS` through ``run_train`` (memory
                 path, its own views batched on the device, bf16) on the table's GPU student
                 (ResNet-18, CIFAR stem, 32 px): img/s of the method's own phase and of the ReLA
                 phase (or its one-line error), so the cost of a gpu-profile table can be read off.

A section that fails records its one-line error and the next one runs; the JSON is rewritten
after every section, so a run stopped by a time limit keeps what it measured. The exit status
is 1 when a section failed, 2 on bad usage (no CUDA device without ``--tiny``).

``--tiny`` runs every section at toy size (4 images, a few steps, 2,000 scored samples) on
whatever device there is, in about a minute on 2 CPU cores: the test suite runs it, so the check
cannot fail on its first GPU run for a reason a CPU could have shown.

    python benchmarks/gpu_check.py --out gpu-check.json          # on the GPU machine, < 8 minutes
    python benchmarks/gpu_check.py --tiny --out /tmp/tiny.json   # anywhere
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the package itself, installed or not
from embed_throughput import bench_forward, device_name  # noqa: E402
from train_throughput import model_alone, pipeline  # noqa: E402

from rela_pipeline import __version__  # noqa: E402
from rela_pipeline.fileio import write_json_atomic  # noqa: E402
from rela_pipeline.imagefolder import decode_rgb, scan_image_folder  # noqa: E402
from rela_pipeline.priors import load_prior  # noqa: E402
from rela_pipeline.runtime import cpu_has_native_bf16, resolve_precision, resolve_prior_precision, synchronize  # noqa: E402
from rela_pipeline.shards.reader import open_shard_set  # noqa: E402
from rela_pipeline.stages.embed import EmbedConfig, run_embed  # noqa: E402
from rela_pipeline.stages.evaluate import EvalConfig, run_eval  # noqa: E402
from rela_pipeline.stages.train import TrainConfig, run_train  # noqa: E402

#: The priors of the embed section (the design card's GPU path).
PRIORS = ("random:resnet50", "open_clip:ViT-B-16:random")
#: Synthetic images: height x width in pixels (non-square, so the resize does real work).
IMAGE_SHAPE = (240, 320)
CLASSES = 10


# -- the synthetic data ------------------------------------------------------------------------
def _write_image(task: tuple[Path, int, int]) -> None:
    """One JPEG: a class-coloured oriented grating under smooth noise (class = ``label``)."""
    path, label, seed = task
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = IMAGE_SHAPE
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = math.pi * label / CLASSES
    grating = np.sin((x * math.cos(angle) + y * math.sin(angle)) * (0.05 + 0.01 * label) + rng.uniform(0, 2 * math.pi))
    colour = np.array([math.cos(2 * math.pi * label / CLASSES), math.sin(2 * math.pi * label / CLASSES), 0.5], dtype=np.float32)
    noise = np.asarray(Image.fromarray((rng.uniform(0, 255, (h // 16, w // 16, 3))).astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.float32)
    pixels = 128 + 60 * grating[..., None] * colour + 0.4 * (noise - 128)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_image_folder(root: Path, count: int, seed: int, workers: int) -> Path:
    """Write ``count`` JPEGs as ``root/<class>/<i>.jpg`` (classes balanced) and return ``root``."""
    tasks = []
    for i in range(count):
        label = i % CLASSES
        (root / f"class-{label}").mkdir(parents=True, exist_ok=True)
        tasks.append((root / f"class-{label}" / f"{i:06d}.jpg", label, seed * 1_000_003 + i))
    if workers > 1 and count > 64:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.map(_write_image, tasks, chunksize=64)
    else:
        for task in tasks:
            _write_image(task)
    return root


# -- helpers --------------------------------------------------------------------------------
def _rate(images: int, seconds: float) -> float | None:
    return round(images / seconds, 1) if seconds > 0 and math.isfinite(seconds) else None


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats become None."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _one_line(error: Exception) -> str:
    """``Type: first line of the message``, as a failed section or method records it."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _timed(device: torch.device, work: Callable[[], Any], repeats: int = 1) -> float:
    """Median seconds of ``work()`` over ``repeats`` runs, the device synchronised around each."""
    values = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        values.append(time.perf_counter() - start)
    return statistics.median(values)


# -- sections --------------------------------------------------------------------------------
def environment_section(device: torch.device) -> dict[str, Any]:
    """Versions, the GPU, the CPU, and whether faiss sees the GPU after torch initialised CUDA."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "rela_pipeline": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": device_name(torch.device("cpu")),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
    }
    if device.type == "cuda":
        torch.ones(1, device=device).sum().item()  # CUDA initialised before faiss is asked
        properties = torch.cuda.get_device_properties(device)
        info.update(
            {
                "gpu": properties.name,
                "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
                "compute_capability": f"{properties.major}.{properties.minor}",
                "bf16_supported": torch.cuda.is_bf16_supported(),
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            }
        )
    import faiss

    info["faiss"] = {"version": getattr(faiss, "__version__", None), "gpus_seen": int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0}
    info["resolved_precision"] = {"train_auto": resolve_precision("auto", device).name, "embed_auto": resolve_prior_precision("auto", device).name}
    return info


def _breakdown(data: Path, prior_spec: str, device: torch.device, batch: int, precision: str) -> dict[str, float | None]:
    """Where one image's time goes, in ms per image: file read, PIL decode, resize + crop on the
    CPU (one core), the GPU path's batched decode and resize on the device, the host-to-device
    copy of a uint8 batch, and the forward pass."""
    from torchvision.io import ImageReadMode, decode_jpeg

    index = scan_image_folder(data)
    prior = load_prior(prior_spec, seed=0)
    prior.model.to(device)
    paths = [index.root / f for f in index.files[:batch]]
    transform = prior.preprocessing.to_uint8_transform()
    start = time.perf_counter()
    blobs = [p.read_bytes() for p in paths]
    read = time.perf_counter() - start
    start = time.perf_counter()
    pictures = [decode_rgb(p) for p in paths]
    decode = time.perf_counter() - start
    start = time.perf_counter()
    crops = torch.stack([transform(picture) for picture in pictures])
    resize = time.perf_counter() - start
    pinned = crops.pin_memory() if device.type == "cuda" else crops
    copy = _timed(device, lambda: pinned.to(device, non_blocking=True), repeats=5)
    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    device_decode = _timed(device, lambda: decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device), repeats=3)
    decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    tensor_transform = prior.preprocessing.tensor_transform()
    device_resize = _timed(device, lambda: tensor_transform(torch.stack(decoded)), repeats=3)
    resolved = resolve_prior_precision(precision, device)
    on_device = crops.to(device)

    def forward() -> None:
        with torch.inference_mode(), resolved.autocast():
            prior.model(prior.preprocessing.normalise(on_device))

    forward()
    seconds = _timed(device, forward, repeats=3)
    per_image = lambda s: round(1000.0 * s / len(paths), 4)  # noqa: E731
    return {
        "images": len(paths),
        "read_ms": per_image(read),
        "cpu_decode_ms": per_image(decode),
        "cpu_resize_crop_ms": per_image(resize),
        "copy_to_device_ms": per_image(copy),
        "device_decode_ms": per_image(device_decode),
        "device_resize_crop_ms": per_image(device_resize),
        "forward_ms": per_image(seconds),
        "precision": resolved.name,
    }


def _target_agreement(reference: Path, other: Path) -> dict[str, Any]:
    """Embeddings' relative difference and ``|r|`` per transported component between two runs."""
    from prior_precision import component_correlations

    from rela_pipeline.transport import fit_linear_transport

    a, b = np.load(reference / "embeddings.npy"), np.load(other / "embeddings.npy")
    ok = np.ones(len(a), dtype=bool)
    r = component_correlations(fit_linear_transport(a, ok).apply(a).numpy(), fit_linear_transport(b, ok).apply(b).numpy())
    return {
        "embedding_relative_difference": float(np.linalg.norm(a - b) / np.linalg.norm(a)),
        "components": int(len(r)),
        "abs_r_at_component": {str(i): round(float(r[i - 1]), 4) for i in (1, 4, 16, 64, 256, 512) if i <= len(r)},
        "first_component_below_0.99": next((int(i) + 1 for i in np.flatnonzero(r < 0.99)), None),
    }


def embed_section(data: Path, work: Path, device: torch.device, tiny: bool, workers: int) -> dict[str, Any]:
    """``run_embed`` img/s per prior, decode path and precision, beside the forward pass alone."""
    batch = 4 if tiny else 256
    index = scan_image_folder(data)
    results: dict[str, Any] = {"images": len(index.files), "image_shape": list(IMAGE_SHAPE), "batch_size": batch, "num_workers": workers, "priors": {}}
    # --tiny keeps one run per decode path and per precision (a ViT-B-16 in bf16 is slow on a CPU).
    runs = [("cpu", "fp32"), ("gpu", "bf16")] if tiny else [("cpu", "fp32"), ("gpu", "fp32"), ("gpu", "bf16")]
    for spec in PRIORS:
        entry: dict[str, Any] = {"runs": {}}
        for decode, precision in runs:
            out = work / f"embed-{spec.replace(':', '_')}-{decode}-{precision}"
            config = EmbedConfig(
                data_dir=data,
                prior=spec,
                out_dir=out,
                batch_size=batch,
                num_workers=workers,
                device=str(device),
                precision=precision,
                decode=decode,
                progress=False,
                overwrite=True,
                keep_embeddings=True,
            )
            manifest = run_embed(config)
            timings = manifest["timings_s"]
            entry["runs"][f"{decode}-decode {precision}"] = {
                "embed_images_per_s": manifest["throughput"]["embed_images_per_s"],
                "end_to_end_images_per_s": _rate(len(index.files), timings["total"] - timings["load_prior"]),
                "decoded_by": manifest["throughput"].get("decoded_by"),
                "timings_s": timings,
                "resolved": manifest["resolved"],
            }
        prior = load_prior(spec, seed=0)
        prior.model.to(device)
        if device.type == "cuda":
            prior.model.to(memory_format=torch.channels_last)
        passes = min(20, max(1, len(index.files) // batch))
        for precision in ("fp32", "bf16"):
            seconds = bench_forward(index, prior, device, passes * batch, batch, resolve_prior_precision(precision, device))
            entry[f"forward_only_images_per_s_{precision}"] = _rate(passes * batch, seconds)
        for decode, precision in runs:
            row = entry["runs"][f"{decode}-decode {precision}"]
            ceiling = entry[f"forward_only_images_per_s_{precision}"]
            row["embed_over_forward_only"] = round(row["embed_images_per_s"] / ceiling, 3) if ceiling and row["embed_images_per_s"] else None
        entry["where_the_time_goes"] = _breakdown(data, spec, device, batch, "fp32")
        entry["gpu_decode_against_cpu_decode"] = _target_agreement(
            work / f"embed-{spec.replace(':', '_')}-cpu-fp32", work / f"embed-{spec.replace(':', '_')}-gpu-{runs[1][1]}"
        )
        results["priors"][spec] = entry
        del prior
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def train_section(shards: Path, work: Path, device: torch.device, tiny: bool, workers: int) -> dict[str, Any]:
    """The memory path with device views against the training step alone, per student and phase."""
    steps, warmup = (2, 1) if tiny else (60, 10)
    students = [("resnet18", 32, 2 if tiny else 512), ("resnet50", 64 if tiny else 160, 2 if tiny else 128)]
    target_dim = open_shard_set(str(shards)).target_dim
    # --tiny on a CPU without native bf16 trains the students in fp32: emulated bf16 made this
    # section take minutes there (the embed section still runs bf16, and fp16 runs below)
    precision = "bf16" if device.type == "cuda" or not tiny or cpu_has_native_bf16() else "fp32"
    results: dict[str, Any] = {"precision": precision, "steps": steps, "students": {}}
    for backbone, size, batch in students:
        entry: dict[str, Any] = {"image_size": size, "batch_size": batch}
        for phase, rela in (("rela", True), ("byol", False)):
            alone = model_alone(backbone, size, batch, steps, warmup, device, target_dim, rela, precision)
            rate, load_s = pipeline(
                str(shards),
                backbone,
                size,
                batch,
                max(steps, 3),
                str(device),
                workers,
                rela,
                {"augment": "device", "data_path": "memory", "precision": precision},
            )
            entry[phase] = {
                "model_alone_images_per_s": round(alone, 1),
                "memory_path_images_per_s": _finite(round(rate, 1)),
                "memory_over_model_alone": _finite(round(rate / alone, 3)),
                "memory_path_data_load_s": load_s,
            }
        results["students"][f"{backbone}@{size}"] = entry
    run = work / "train-fp16"
    summary = run_train(
        TrainConfig(
            shards=str(shards),
            out_dir=run,
            backbone="resnet18",
            image_size=32,
            epochs=1,
            batch_size=2 if tiny else 256,
            data_ratio=1.0,
            device=str(device),
            precision="fp16",
            data_path="memory",
            num_workers=workers,
            progress=False,
            verify=False,
            log_every=1,
            overwrite=True,
        )
    )
    scale = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["training_state"]["scaler"].get("scale")
    results["fp16"] = {
        "steps": summary["budget"]["steps"],
        "final_loss": _finite(summary["final"].get("loss")),
        "loss_scale": _finite(float(scale)) if scale is not None else None,
        "resolved": summary["resolved"],
    }
    return results


def scores_section(device: torch.device, tiny: bool) -> dict[str, Any]:
    """Exact and IVF search of clustered unit vectors, on the GPU when faiss sees one."""
    from rela_pipeline.scores import build_score_search, faiss_sees_gpu, score_rows

    gpu = device.type == "cuda" and faiss_sees_gpu()
    dims = 16 if tiny else 64
    sizes = {"exact": 2_000 if tiny else (1_000_000 if gpu else 200_000), "ivf": 2_000 if tiny else 1_000_000}
    results: dict[str, Any] = {"device": "gpu" if gpu else "cpu", "dims": dims}
    if not gpu:
        results["why_cpu"] = "no CUDA device" if device.type != "cuda" else "this faiss build sees no GPU (faiss-cpu, or no CUDA in faiss)"
    rng = np.random.default_rng(0)
    largest = max(sizes.values())
    centres = rng.standard_normal((max(16, largest // 1000), dims)).astype(np.float32)
    targets = (centres[rng.integers(0, len(centres), largest)] + 0.3 * rng.standard_normal((largest, dims)).astype(np.float32)).astype(np.float16)
    for kind, n in sizes.items():
        start = time.perf_counter()
        search = build_score_search(targets[:n], k=10, dims=dims, gpu_id=0 if gpu else None, index=kind)
        built = time.perf_counter() - start
        start = time.perf_counter()
        scored = score_rows(search, targets[:n])
        seconds = time.perf_counter() - start
        results[kind] = {
            "samples": n,
            "build_s": round(built, 2),
            "score_s": round(seconds, 2),
            "queries_per_s": _rate(n, seconds),
            "device": search.device,
            "settings": search.settings,
            "searched_exactly": scored.searched_exactly,
        }
    return results


def eval_section(shards: Path, train_dir: Path, test_dir: Path, work: Path, device: torch.device, tiny: bool, workers: int) -> dict[str, Any]:
    """A short ReLA run's backbone evaluated on the synthetic set, on the device."""
    run = work / "eval-run"
    run_train(
        TrainConfig(
            shards=str(shards),
            out_dir=run,
            backbone="resnet18",
            image_size=32,
            epochs=1,
            batch_size=2 if tiny else 256,
            device=str(device),
            data_path="memory",
            num_workers=workers,
            progress=False,
            verify=False,
            overwrite=True,
        )
    )
    start = time.perf_counter()
    result = run_eval(
        EvalConfig(
            checkpoint=run / "backbone.pt",
            train_dir=train_dir,
            test_dir=test_dir,
            device=str(device),
            num_workers=workers,
            probe_epochs=2 if tiny else 20,
            probe_lr=1e-3 if tiny else None,
            knn_k=3 if tiny else 50,
            progress=False,
        )
    )
    return {
        "seconds": round(time.perf_counter() - start, 2),
        "linear_probe_top1": result["linear_probe"]["top1"],
        "knn_top1": result["knn"]["top1"],
        "train_samples": result["train_samples"],
        "test_samples": result["test_samples"],
        "device": str(device),
        "timings_s": result["timings_s"],
    }


def methods_section(shards: Path, device: torch.device, tiny: bool, workers: int) -> dict[str, Any]:
    """Every method's training step on the device through ``run_train``, in its own phase
    (``--rela-schedule none``) and in the ReLA phase (``constant:1.0``): img/s, the median metrics
    interval rate after the first (:func:`train_throughput.pipeline`), or the run's one-line error."""
    from rela_pipeline.methods import METHODS

    steps, batch = (4, 2) if tiny else (60, 128)  # the gpu profile's batch
    precision = "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    results: dict[str, Any] = {"student": "resnet18@32 (CIFAR stem)", "batch_size": batch, "steps": steps, "precision": precision, "methods": {}}
    for method in METHODS:
        entry: dict[str, Any] = {}
        for phase, rela in (("method", False), ("rela", True)):
            if rela and method != METHODS[0] and tiny:
                continue  # --tiny: the ReLA phase once (it is the same for every method but the views)
            try:
                rate, _ = pipeline(
                    str(shards), "resnet18", 32, batch, steps, str(device), workers, rela,
                    {"augment": "device", "data_path": "memory", "precision": precision, "method": method},
                )  # fmt: skip
                entry[phase] = {"images_per_s": _finite(round(rate, 1))}
            except Exception as error:  # noqa: BLE001 - one method failing does not hide the others
                entry[phase] = {"error": _one_line(error)[:300]}
        results["methods"][method] = entry
    failures = [f"{m}/{phase}" for m, entry in results["methods"].items() for phase, row in entry.items() if "error" in row]
    if failures:
        results["error"] = "failed: " + ", ".join(failures)
    return results


def print_table(record: dict[str, Any]) -> None:
    """The short table of the headline numbers."""
    env = record.get("environment", {})
    print(
        f"\n# GPU check: {env.get('gpu', env.get('cpu'))}, torch {env.get('torch')} (CUDA {env.get('cuda')}), faiss sees {env.get('faiss', {}).get('gpus_seen')} GPUs"
    )
    embed = record.get("embed", {})
    if "priors" in embed:
        print("\n| prior | run | embed img/s | end to end img/s | forward alone img/s | embed / forward |\n|---|---|---:|---:|---:|---:|")
        for spec, entry in embed["priors"].items():
            for name, row in entry["runs"].items():
                precision = name.split()[-1]
                print(
                    f"| {spec} | {name} | {row['embed_images_per_s']} | {row['end_to_end_images_per_s']} | {entry[f'forward_only_images_per_s_{precision}']} | {row['embed_over_forward_only']} |"
                )
    train = record.get("train", {})
    if "students" in train:
        print("\n| student | phase | model alone img/s | memory path img/s | ratio |\n|---|---|---:|---:|---:|")
        for student, entry in train["students"].items():
            for phase in ("rela", "byol"):
                row = entry[phase]
                print(f"| {student} | {phase} | {row['model_alone_images_per_s']} | {row['memory_path_images_per_s']} | {row['memory_over_model_alone']} |")
    scores = record.get("scores", {})
    for kind in ("exact", "ivf"):
        if kind in scores:
            row = scores[kind]
            print(
                f"scores {kind} on {row['device']}: {row['samples']} x {scores['dims']} built in {row['build_s']} s, scored in {row['score_s']} s ({row['queries_per_s']} queries/s)"
            )
    if "linear_probe_top1" in record.get("eval", {}):
        print(
            f"eval on {record['eval']['device']}: linear probe {record['eval']['linear_probe_top1']:.3f}, k-NN {record['eval']['knn_top1']:.3f} in {record['eval']['seconds']} s"
        )
    methods = record.get("methods", {})
    if "methods" in methods:
        print(f"\n| method ({methods['student']}, {methods['precision']}) | own phase img/s | ReLA phase img/s |\n|---|---:|---:|")
        for method, entry in methods["methods"].items():
            cell = lambda row: row.get("images_per_s", row.get("error", "")) if row else ""  # noqa: E731
            print(f"| {method} | {cell(entry.get('method'))} | {cell(entry.get('rela'))} |")
    for name, section in record.items():
        if isinstance(section, dict) and "error" in section:
            print(f"FAILED {name}: {section['error']}")


def main(argv: list[str] | None = None) -> int:
    """Run every section; write the JSON after each; print the table. Returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="every section at toy size, on whatever device there is (the test suite's run)")
    parser.add_argument("--images", type=int, default=None, help="synthetic train images [default: 20,000; --tiny: 4]")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers [default: min(8, CPUs); --tiny: 0]")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory [default: a temporary one, removed at the end]")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("error: no CUDA device: the GPU check needs one (--tiny runs every section at toy size on the CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = args.images or (4 if args.tiny else 20_000)
    workers = args.num_workers if args.num_workers is not None else (0 if args.tiny else min(8, os.cpu_count() or 1))
    record: dict[str, Any] = {"command": [sys.executable, *sys.argv], "tiny": args.tiny, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="rela-gpu-check-"))
    failed = False

    def section(name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        nonlocal failed
        t = time.perf_counter()
        print(f"[{time.perf_counter() - started:6.1f}s] {name} ...", flush=True)
        try:
            result = run()
        except Exception as error:  # noqa: BLE001 - the check records it and goes on
            failed = True
            result = {"error": _one_line(error)[:400], "traceback": traceback.format_exc()[-2000:]}
        result["section_s"] = round(time.perf_counter() - t, 2)
        record[name] = result
        record["total_s"] = round(time.perf_counter() - started, 2)
        write_json_atomic(args.out, record)
        return result

    try:
        section("environment", lambda: environment_section(device))
        data: dict[str, Path] = {}

        def make_data() -> dict[str, Any]:
            t = time.perf_counter()
            data["train"] = make_image_folder(work / "data" / "train", images, seed=0, workers=max(1, os.cpu_count() or 1))
            test_images = max(min(images, CLASSES), images // 10)  # every train class in the test split
            data["test"] = make_image_folder(work / "data" / "test", test_images, seed=1, workers=max(1, os.cpu_count() or 1))
            return {"train_images": images, "test_images": test_images, "seconds": round(time.perf_counter() - t, 2)}

        section("data", make_data)
        section("embed", lambda: embed_section(data["train"], work, device, args.tiny, workers))
        shards = work / f"embed-{PRIORS[0].replace(':', '_')}-cpu-fp32"
        section("train", lambda: train_section(shards, work, device, args.tiny, workers))
        section("scores", lambda: scores_section(device, args.tiny))
        section("eval", lambda: eval_section(shards, data["train"], data["test"], work, device, args.tiny, workers))
        section("methods", lambda: methods_section(shards, device, args.tiny, workers))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(record)
    print(f"\n{args.out}: {record['total_s']} s{' (tiny)' if args.tiny else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
