"""Stage one end to end at scale with real images: synthetic JPEGs as WebDataset tars and as an
ImageFolder, embedded by ``rela-pipeline embed`` itself, phase by phase.

For each size N (default 100,000 and 1,000,000) it writes N small JPEGs (``--image-px``, default
32 px; ten classes of coloured gratings) once as tars in img2dataset's layout (``{key}.jpg`` +
``{key}.cls``, 10,000 samples a shard) and once as an ImageFolder (the same bytes), then measures:

* the scan alone: ``scan_image_folder`` of the ImageFolder and the tars' one pass
  (``open_tar_source``: headers, offsets and every shard's SHA-256), seconds and files per second;
* ``run_embed`` end to end for each kind (``--kinds``) with the cheapest real prior that fits the
  run (``--prior``, default a random ResNet-18 at ``--image-size`` 32): the manifest's per-phase
  seconds (scan, load_prior, embed = read + decode + forward, transport, scores, write_shards) and
  the process's peak resident memory, and its peak anonymous memory (``RssAnon``: without the
  file pages of memory-mapped arrays), from which the bytes each sample costs;
* from the two sizes, each phase's growth exponent ``log(t2 / t1) / log(N2 / N1)``.

Each (size, kind) cell is saved as soon as it is measured (``--out`` JSON, rewritten after every
cell), and a rerun skips the cells already there, so the run resumes. Inputs are kept under
``--work`` (default ``runs/scale-images``) for reruns; ``--clean`` removes them at the end.
``--cold-cache`` (root) drops the page cache before each scan and each run, so that every cell
reads its input from disk, as a first run on an input larger than memory does.

    python benchmarks/scale_images.py --sizes 100000 1000000 --cold-cache --out benchmarks/results/scale-images-cpu.json
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing
import os
import resource
import shutil
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_throughput import device_name  # noqa: E402
from stage_one_io import cpu_flag, drop_page_cache  # noqa: E402

from rela_pipeline.fileio import write_json_atomic  # noqa: E402
from rela_pipeline.runtime import cpu_has_native_bf16  # noqa: E402

CLASSES = 10
PER_SHARD = 10_000


def _encode(task: tuple[int, int, int]) -> list[bytes]:
    """JPEG bytes of images ``start .. stop - 1`` (a class-coloured grating and noise each)."""
    from PIL import Image

    start, stop, size = task
    out = []
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        label = i % CLASSES
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        angle = math.pi * label / CLASSES
        grating = np.sin((x * math.cos(angle) + y * math.sin(angle)) * (0.3 + 0.05 * label) + rng.uniform(0, 6.3))
        colour = np.array([math.cos(2 * math.pi * label / CLASSES), math.sin(2 * math.pi * label / CLASSES), 0.5], dtype=np.float32)
        pixels = 128 + 70 * grating[..., None] * colour + rng.normal(0, 12, (size, size, 3))
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    archive.addfile(info, io.BytesIO(data))


def make_inputs(root: Path, count: int, size: int, workers: int) -> tuple[Path, str]:
    """Write ``count`` JPEGs under ``root`` as an ImageFolder and as tars (once; kept for reruns);
    return the ImageFolder root and the tar pattern."""
    folder, tars = root / "imagefolder", root / "tars"
    pattern = str(tars / f"part-{{000000..{(count - 1) // PER_SHARD:06d}}}.tar")
    done = root / ".complete"
    if done.exists():
        return folder, pattern
    shutil.rmtree(root, ignore_errors=True)
    for label in range(CLASSES):
        (folder / f"class-{label}").mkdir(parents=True)
    tars.mkdir(parents=True)
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for shard in range((count + PER_SHARD - 1) // PER_SHARD):
            first = shard * PER_SHARD
            last = min(count, first + PER_SHARD)
            blocks = pool.map(_encode, [(a, min(a + 1000, last), size) for a in range(first, last, 1000)])
            images = [data for block in blocks for data in block]
            with tarfile.open(tars / f"part-{shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as archive:
                for offset, data in enumerate(images):
                    i = first + offset
                    _add(archive, f"{i:09d}.jpg", data)
                    _add(archive, f"{i:09d}.cls", str(i % CLASSES).encode())
                    (folder / f"class-{i % CLASSES}" / f"{i:09d}.jpg").write_bytes(data)
    done.touch()
    return folder, pattern


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonymousMemoryPeak:
    """Peak anonymous resident memory (``RssAnon`` of ``/proc/self/status``, MiB) while in the
    ``with`` block, sampled every ``interval_s`` seconds on a thread.

    ``ru_maxrss`` also counts the file pages of memory-mapped arrays (the embeddings, the targets),
    which the kernel drops under pressure; ``RssAnon`` is the memory a run really holds, so the
    bytes a sample costs are the difference of its peaks at two sizes. Linux only (else 0)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s, self.peak_mib = interval_s, 0.0
        self._stop = threading.Event()

    @staticmethod
    def current_mib() -> float:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_mib = max(self.peak_mib, self.current_mib())

    def __enter__(self) -> AnonymousMemoryPeak:
        self.peak_mib = self.current_mib()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self.current_mib())


def main(argv: list[str] | None = None) -> dict:
    """Measure every (size, kind) cell not yet in ``--out``; write the JSON after each."""
    import json

    import torch

    from rela_pipeline.imagefolder import scan_image_folder
    from rela_pipeline.sources import open_tar_source
    from rela_pipeline.stages.embed import EmbedConfig, run_embed

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", default=["webdataset", "imagefolder"], choices=["webdataset", "imagefolder"])
    parser.add_argument("--embed-sizes", type=int, nargs="*", default=None, help="the sizes embedded end to end [default: all]; the others are only scanned")
    parser.add_argument("--image-px", type=int, default=32, help="side of the synthetic JPEGs")
    parser.add_argument("--prior", default="random:resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--work", type=Path, default=Path("runs/scale-images"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cold-cache", action="store_true", help="drop the page cache before each scan and each run (needs root)")
    parser.add_argument("--clean", action="store_true", help="remove the inputs and outputs under --work at the end")
    args = parser.parse_args(argv)
    record = json.loads(args.out.read_text()) if args.out.is_file() else {}
    record.setdefault("cells", {})
    record["machine"] = {
        "cpu": device_name(torch.device("cpu")),
        "cpu_count": os.cpu_count(),
        "avx512": cpu_flag("avx512f"),
        "native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    record["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    cores = max(1, os.cpu_count() or 1)
    for count in args.sizes:
        t = time.perf_counter()
        folder, pattern = make_inputs(args.work / f"n{count}", count, args.image_px, cores)
        record["cells"].setdefault(str(count), {})["inputs_s"] = record["cells"].get(str(count), {}).get("inputs_s") or round(time.perf_counter() - t, 1)
        cell = record["cells"][str(count)]
        if "scan" not in cell:
            cold = drop_page_cache() if args.cold_cache else False
            t = time.perf_counter()
            index = scan_image_folder(folder)
            folder_s = time.perf_counter() - t
            cold = (drop_page_cache() if args.cold_cache else False) and cold
            t = time.perf_counter()
            source = open_tar_source(pattern)
            tar_s = time.perf_counter() - t
            cell["scan"] = {
                "imagefolder_s": round(folder_s, 4),
                "imagefolder_files_per_s": round(len(index.files) / max(folder_s, 1e-9)),
                "tars_s": round(tar_s, 4),
                "tar_samples_per_s": round(len(source.files) / max(tar_s, 1e-9)),
                "tar_bytes": int(sum(r["bytes"] for r in source.shard_records)),
                "cold_cache": cold,
            }
            del index, source
            write_json_atomic(args.out, record)
            print(f"N={count}: scan {cell['scan']}", flush=True)
        for kind in args.kinds:
            if kind in cell or (args.embed_sizes is not None and count not in args.embed_sizes):
                continue
            out = args.work / f"n{count}" / f"out-{kind}"
            config = EmbedConfig(
                data_dir=pattern if kind == "webdataset" else folder,
                prior=args.prior,
                out_dir=out,
                image_size=args.image_size,
                batch_size=args.batch_size,
                device="cpu",
                progress=False,
                overwrite=True,
                **({"num_workers": args.num_workers} if args.num_workers is not None else {}),
            )
            before, anonymous_before = peak_rss_mib(), AnonymousMemoryPeak.current_mib()
            cold = drop_page_cache() if args.cold_cache else False
            t = time.perf_counter()
            with AnonymousMemoryPeak() as anonymous:
                manifest = run_embed(config)
            wall = time.perf_counter() - t
            timings = manifest["timings_s"]
            phases = {k: v for k, v in timings.items() if k != "total"}
            forward_and_decode = timings.get("embed", 0.0)
            cell[kind] = {
                "wall_s": round(wall, 1),
                "timings_s": timings,
                "embed_images_per_s": manifest["throughput"]["embed_images_per_s"],
                "not_embedding_fraction": round(1.0 - forward_and_decode / timings["total"], 3),
                "peak_rss_mib": round(peak_rss_mib(), 1),
                "peak_rss_mib_before": round(before, 1),
                "peak_anonymous_rss_mib": round(anonymous.peak_mib, 1),
                "anonymous_rss_mib_before": round(anonymous_before, 1),
                "written": manifest["samples"]["written"],
                "shard_bytes": int(sum(s["bytes"] for s in manifest["shards"])),
                "phases": list(phases),
                "num_workers": config.num_workers,
                "load_average_1min_after": round(os.getloadavg()[0], 2),  # another job on the machine shows here
                "cold_cache": cold,
            }
            shutil.rmtree(out, ignore_errors=True)
            write_json_atomic(args.out, record)
            print(f"N={count} {kind}: {cell[kind]['wall_s']} s, {timings}", flush=True)
    sizes = sorted(int(n) for n in record["cells"])
    scanned = [n for n in sizes if "scan" in record["cells"][str(n)]]
    if len(scanned) >= 2:
        first, last = (record["cells"][str(n)]["scan"] for n in (scanned[0], scanned[-1]))
        ratio = math.log(scanned[-1] / scanned[0])
        record["scan_growth_exponents"] = {
            "sizes": [scanned[0], scanned[-1]],
            **{key: round(math.log(max(last[key], 1e-4) / max(first[key], 1e-4)) / ratio, 2) for key in ("imagefolder_s", "tars_s")},
        }
    sizes = [n for n in sizes if any(kind in record["cells"][str(n)] for kind in args.kinds)]
    if len(sizes) >= 2:
        small, large = (record["cells"][str(n)] for n in (sizes[0], sizes[-1]))
        ratio = math.log(sizes[-1] / sizes[0])
        exponents = {}
        for kind in args.kinds:
            if kind in small and kind in large:
                exponents[kind] = {
                    phase: round(math.log(max(large[kind]["timings_s"][phase], 1e-3) / max(small[kind]["timings_s"][phase], 1e-3)) / ratio, 2)
                    for phase in large[kind]["timings_s"]
                    if phase in small[kind]["timings_s"]
                }
        record["growth_exponents"] = {"sizes": [sizes[0], sizes[-1]], **exponents}
        record["memory_bytes_per_sample"] = {
            kind: round((large[kind]["peak_anonymous_rss_mib"] - small[kind]["peak_anonymous_rss_mib"]) * 2**20 / (sizes[-1] - sizes[0]))
            for kind in args.kinds
            if "peak_anonymous_rss_mib" in small.get(kind, {}) and "peak_anonymous_rss_mib" in large.get(kind, {})
        }
    write_json_atomic(args.out, record)
    if args.clean:
        shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
