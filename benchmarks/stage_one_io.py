"""Stage one's input reads at scale, side by side in one run: the tar scan in one process against a
pool of processes, and shard writing's random image reads one at a time against read-ahead
threads, each from a cold page cache.

The scale benchmark (``scale_images.py``) measures whole runs; this one isolates the two I/O
changes made for them, on the same inputs (``--tars``, e.g. the 1M-image tars that
``scale_images.py`` leaves under ``runs/scale-images``):

* ``scan``: ``open_tar_source``'s one pass (headers, offsets, every shard's SHA-256) with 1
  process and with the default pool, alternating, ``--rounds`` times;
* ``reads``: ``--samples`` image reads in the shards' write order (``shard_write_order``, the
  seeded permutation), serially and through ``read_ahead`` (16 threads), each round after
  dropping the page cache (``/proc/sys/vm/drop_caches``; needs root, else marked warm).

    python benchmarks/stage_one_io.py --tars 'runs/scale-images/n1000000/tars/part-{000000..000099}.tar' \\
        --out benchmarks/results/stage-one-io-cpu.json
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


def main(argv: list[str] | None = None) -> dict:
    import torch

    from rela_pipeline.runtime import default_num_workers
    from rela_pipeline.sources import _scan_tars, expand_pattern
    from rela_pipeline.stages.embed.writing import read_ahead, shard_write_order

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tars", required=True)
    parser.add_argument("--samples", type=int, default=50_000, help="image reads per round of the reads measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache (tests; the reads then come from memory)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    drop = (lambda: False) if args.warm else drop_page_cache
    paths = expand_pattern(args.tars)
    record: dict = {
        "machine": {"cpu": device_name(torch.device("cpu")), "cpu_count": os.cpu_count(), "load_average_1min_start": round(os.getloadavg()[0], 2)},
        "inputs": {"tars": args.tars, "shards": len(paths), "bytes": sum(os.path.getsize(p) for p in paths)},
        "scan_s": {"one_process": [], "pool": []},
        "reads_us_per_image": {"serial": [], "read_ahead": []},
    }
    workers = default_num_workers() + 1
    source = None
    for _ in range(args.rounds):
        for name, count in (("one_process", 1), ("pool", workers)):
            cold = drop()
            t = time.perf_counter()
            source = _scan_tars(args.tars, paths, None, workers=count, min_parallel_bytes=0)
            record["scan_s"][name].append(round(time.perf_counter() - t, 2))
            record["scan_cold_cache"] = cold
            print(f"scan {name}: {record['scan_s'][name][-1]} s", flush=True)
            write_json_atomic(args.out, record)
    order = shard_write_order(len(source.files), 0)
    for round_ in range(args.rounds):
        rows = order[round_ * args.samples : (round_ + 1) * args.samples].tolist()  # other rows each round: nothing cached by the last
        for name in ("serial", "read_ahead"):
            half = rows[: len(rows) // 2] if name == "serial" else rows[len(rows) // 2 :]
            cold = drop()
            t = time.perf_counter()
            total = sum(len(b) for b in (map(source.read, half) if name == "serial" else read_ahead(source.read, half)))
            seconds = time.perf_counter() - t
            record["reads_us_per_image"][name].append(round(seconds / len(half) * 1e6, 3))
            record["reads_cold_cache"] = cold
            record["read_bytes_per_image"] = round(total / len(half))
            print(f"reads {name}: {record['reads_us_per_image'][name][-1]} us/image", flush=True)
            write_json_atomic(args.out, record)
    record["summary"] = {
        "scan_pool_speedup": round(statistics.median(record["scan_s"]["one_process"]) / statistics.median(record["scan_s"]["pool"]), 2),
        "scan_pool_workers": workers,
        "read_ahead_speedup": round(
            statistics.median(record["reads_us_per_image"]["serial"]) / statistics.median(record["reads_us_per_image"]["read_ahead"]), 2
        ),
    }
    record["machine"]["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    write_json_atomic(args.out, record)
    print(record["summary"])
    return record


if __name__ == "__main__":
    main()
