"""Stage one's input reads at scale, side by side in one run: the tar scan in one process against a
pool of processes, and shard writing's random image reads one at a time against reads the kernel
prefetches, from a cold page cache and then warm.

The scale benchmark (``scale_images.py``) measures whole runs; this one isolates the two I/O
changes made for them, on the same inputs (``--tars``, e.g. the 1M-image tars that
``scale_images.py`` leaves under ``runs/scale-images``):

* ``scan``: ``open_tar_source``'s one pass (headers, offsets, every shard's SHA-256) with 1
  process and with the default pool, alternating, ``--rounds`` times;
* ``reads``: ``--samples`` image reads in the shards' write order (``shard_write_order``, the
  seeded permutation), serially (``source.read``, what the writer did first) and through
  ``read_byte_ranges`` (``posix_fadvise`` prefetch, what it does now), of the tars and, with
  ``--imagefolder``, of the same images as files. Each round reads new rows after dropping the
  page cache (``/proc/sys/vm/drop_caches``; needs root, else marked warm), then the same rows
  again from memory;
* ``loader``: the embedding DataLoader (``SourceImages``: read, decode, resize to 32 px, as
  ``embed`` runs it with the default workers and batch) over ``--loader-samples`` consecutive rows
  from a cold page cache, each batch's files announced to the kernel first
  (``announce_byte_ranges``, what it does now) and read one at a time (what it did before), on
  new rows each round, the order alternating.

    python benchmarks/stage_one_io.py --tars 'runs/scale-images/n1000000/tars/part-{000000..000099}.tar' \\
        --imagefolder runs/scale-images/n1000000/imagefolder --out benchmarks/results/stage-one-io-cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_throughput import device_name  # noqa: E402

from rela_pipeline.fileio import write_json_atomic  # noqa: E402


def drop_page_cache() -> bool:
    """Write back dirty pages and drop the page cache; False when not allowed (not root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def machine_record() -> dict:
    """The CPU model, its core count, its vector extensions (two CPUs named "AMD EPYC" here differ
    in them, and in speed) and the 1-minute load average at the start of a run."""
    import torch

    from rela_pipeline.runtime import cpu_has_native_bf16

    return {
        "cpu": device_name(torch.device("cpu")),
        "cpu_count": os.cpu_count(),
        "avx512": cpu_flag("avx512f"),
        "native_bf16": cpu_has_native_bf16(),
        "load_average_1min_start": round(os.getloadavg()[0], 2),
    }


def cpu_flag(flag: str) -> bool:
    """Whether ``/proc/cpuinfo`` lists ``flag`` (False where it does not exist)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return any(line.startswith("flags") and flag in line.split(":", 1)[1].split() for line in handle)
    except OSError:
        return False


def finish_record(record: dict, out: Path) -> dict:
    """Add the load average at the end, write ``record`` to ``out`` atomically and print its summary."""
    record["machine"]["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    write_json_atomic(out, record)
    print(record["summary"])
    return record


def time_reads(source, rows: list[int], prefetched: bool) -> tuple[float, int]:
    """Seconds to read ``rows`` of ``source`` and the bytes read."""
    from rela_pipeline.fileio import read_byte_ranges

    t = time.perf_counter()
    reads = read_byte_ranges(map(source.byte_range, rows)) if prefetched else map(source.read, rows)
    total = sum(len(b) for b in reads)
    return time.perf_counter() - t, total


def loader_images_per_second(source, start: int, stop: int, announced: bool, batch_size: int = 256) -> float:
    """Images per second through the embedding DataLoader over rows ``start .. stop - 1`` of
    ``source`` (default workers), with each batch's files announced first or not."""
    import torch

    from rela_pipeline.priors import Preprocessing
    from rela_pipeline.runtime import default_num_workers
    from rela_pipeline.stages.embed.images import SourceImages

    class OneAtATime(SourceImages):
        __getitems__ = None  # the DataLoader then fetches item by item, as before the announcement

    dataset = (SourceImages if announced else OneAtATime)(source, start, stop, Preprocessing(resize_size=32, crop_size=32))
    workers = default_num_workers()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, prefetch_factor=4 if workers else None)
    t = time.perf_counter()
    images = sum(len(batch[0]) for batch in loader)
    return images / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> dict:

    from rela_pipeline.imagefolder import scan_image_folder
    from rela_pipeline.runtime import default_num_workers
    from rela_pipeline.sources import _scan_tars, expand_pattern
    from rela_pipeline.stages.embed.writing import shard_write_order

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tars", required=True)
    parser.add_argument("--imagefolder", type=Path, help="the same images as an ImageFolder, to time its reads too")
    parser.add_argument("--samples", type=int, default=50_000, help="image reads per round of the reads measurement")
    parser.add_argument("--measure", nargs="+", choices=["scan", "reads", "loader"], default=["scan", "reads", "loader"], help="measurements to run")
    parser.add_argument("--loader-samples", type=int, default=20_000, help="images per round of the loader measurement (0: skip it)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache (tests; the reads then come from memory)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    drop = (lambda: False) if args.warm else drop_page_cache
    paths = expand_pattern(args.tars)
    record: dict = {
        "machine": machine_record(),
        "inputs": {"tars": args.tars, "shards": len(paths), "bytes": sum(os.path.getsize(p) for p in paths), "imagefolder": str(args.imagefolder or "")},
        "scan_s": {"one_process": [], "pool": []},
        "reads_us_per_image": {},
    }
    workers = default_num_workers() + 1
    tars = _scan_tars(args.tars, paths, None) if "scan" not in args.measure else None
    for _ in range(args.rounds if "scan" in args.measure else 0):
        for name, count in (("one_process", 1), ("pool", workers)):
            cold = drop()
            t = time.perf_counter()
            tars = _scan_tars(args.tars, paths, None, workers=count, min_parallel_bytes=0)
            record["scan_s"][name].append(round(time.perf_counter() - t, 2))
            record["scan_cold_cache"] = cold
            print(f"scan {name}: {record['scan_s'][name][-1]} s", flush=True)
            write_json_atomic(args.out, record)
    sources = {"tars": tars}
    if args.imagefolder:
        sources["imagefolder"] = scan_image_folder(args.imagefolder)
        if len(sources["imagefolder"].files) != len(tars.files):
            raise SystemExit(f"{args.imagefolder} holds {len(sources['imagefolder'].files)} images, the tars {len(tars.files)}")
    order = shard_write_order(len(tars.files), 0)
    for input_name, source in sources.items() if "reads" in args.measure else ():
        for round_ in range(args.rounds):
            rows = order[round_ * args.samples : (round_ + 1) * args.samples].tolist()  # other rows each round: nothing cached by the last
            for name in ("serial", "prefetched"):
                half = rows[: len(rows) // 2] if name == "serial" else rows[len(rows) // 2 :]
                for cache in ("cold", "warm"):  # warm: the same rows again, now in the page cache
                    cold = drop() if cache == "cold" else False
                    seconds, total = time_reads(source, half, prefetched=name == "prefetched")
                    series = record["reads_us_per_image"].setdefault(f"{input_name}_{name}_{cache}", [])
                    series.append(round(seconds / len(half) * 1e6, 3))
                    if cache == "cold":
                        record["reads_cold_cache"] = cold
                    record["read_bytes_per_image"] = round(total / len(half))
                    print(f"reads {input_name} {name} {cache}: {series[-1]} us/image", flush=True)
                    write_json_atomic(args.out, record)
    record["loader_images_per_second"] = {}
    for input_name, source in sources.items() if "loader" in args.measure and args.loader_samples else ():
        for round_ in range(args.rounds):
            names = ("one_at_a_time", "announced") if round_ % 2 == 0 else ("announced", "one_at_a_time")
            for j, name in enumerate(names):
                start = (2 * round_ + j) * args.loader_samples
                if start + args.loader_samples > len(source.files):
                    raise SystemExit(f"--loader-samples {args.loader_samples} x {2 * args.rounds} rounds exceeds the {len(source.files)} images")
                record["loader_cold_cache"] = drop()
                rate = loader_images_per_second(source, start, start + args.loader_samples, announced=name == "announced")
                record["loader_images_per_second"].setdefault(f"{input_name}_{name}", []).append(round(rate, 1))
                print(f"loader {input_name} {name}: {rate:.0f} images/s", flush=True)
                write_json_atomic(args.out, record)
    reads = record["reads_us_per_image"]
    loader = record["loader_images_per_second"]
    scans = record["scan_s"]
    record["summary"] = {
        **({"scan_pool_speedup": round(statistics.median(scans["one_process"]) / statistics.median(scans["pool"]), 2)} if scans["pool"] else {}),
        "scan_pool_workers": workers,
        **{
            f"prefetch_speedup_{input_name}_{cache}": round(
                statistics.median(reads[f"{input_name}_serial_{cache}"]) / statistics.median(reads[f"{input_name}_prefetched_{cache}"]), 2
            )
            for input_name in sources
            for cache in ("cold", "warm")
            if reads
        },
        **{
            f"announce_speedup_{input_name}": round(
                statistics.median(loader[f"{input_name}_announced"]) / statistics.median(loader[f"{input_name}_one_at_a_time"]), 2
            )
            for input_name in sources
            if loader
        },
    }
    return finish_record(record, args.out)


if __name__ == "__main__":
    main()
