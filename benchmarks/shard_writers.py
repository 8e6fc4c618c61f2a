"""Stage one's shard writing with 1 and with W writing processes, side by side in one run.

``write_shards`` (the phase ``embed`` ends with) writes ``--samples`` samples of an input
(``--data``: tars, an ImageFolder or a file list; e.g. the 1M-image tars that ``scale_images.py``
leaves under ``runs/scale-images``) into shards, with ``--writers`` processes each (default 1
and every core), alternating the counts for ``--rounds`` rounds, each after dropping the page
cache (root; else marked warm). The targets (float16, ``--target-dim``) and scores are seeded
random arrays: writing copies them, and their values do not change its cost. Every count must
write the same files (their SHA-256 are compared), and the run says so. ``--tar-formats pax
ustar`` also compares the member header formats (``rela_pipeline.shards.writer.MEMBER_FORMAT``:
USTAR, what it writes now, and tarfile's PAX default, what webdataset gave it before): the same
bytes, another cost.

    python benchmarks/shard_writers.py --data 'runs/scale-images/n1000000/tars/part-{000000..000099}.tar' \\
        --samples 200000 --out benchmarks/results/shard-writers-cpu.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_one_io import drop_page_cache, finish_record, machine_record  # noqa: E402

from rela_pipeline.fileio import write_json_atomic  # noqa: E402


def write_once(source, samples: int, target_dim: int, writers: int, shard_size: int, work: Path) -> tuple[float, list[str]]:
    """Seconds ``write_shards`` takes to write the first ``samples`` rows of ``source`` with
    ``writers`` processes, and the written shards' SHA-256."""
    import torch

    from rela_pipeline.distributed import Distribution
    from rela_pipeline.stages.embed.config import EmbedConfig
    from rela_pipeline.stages.embed.context import EmbedRun
    from rela_pipeline.stages.embed.journal import EmbedJournal
    from rela_pipeline.stages.embed.writing import write_shards

    out = Path(tempfile.mkdtemp(dir=work))
    (out / ".work").mkdir()
    config = EmbedConfig(data_dir=str(work), prior="random:resnet18", out_dir=out, shard_size=shard_size, shard_writers=writers, progress=False)
    run = EmbedRun(
        config=config,
        index=source,
        prior=None,
        device=torch.device("cpu"),
        precision=None,
        decode="cpu",
        distribution=Distribution(),
        out_dir=out,
        timings={},
        say=lambda line: None,
        journal=EmbedJournal(out / ".work" / "journal.json", identity={}),
    )
    rng = np.random.default_rng(0)
    targets = rng.standard_normal((samples, target_dim)).astype(np.float16)
    scores = {"knn_density": rng.random(samples), "nn_similarity": rng.random(samples), "nn_index": rng.integers(0, samples, samples)}
    labels = source.labels[:samples] if source.labels is not None else None
    t = time.perf_counter()
    shards, _ = write_shards(run, np.arange(samples), targets, scores, labels)
    seconds = time.perf_counter() - t
    shutil.rmtree(out)
    return seconds, [s.sha256 for s in shards]


def main(argv: list[str] | None = None) -> dict:

    from rela_pipeline.sources import open_image_source

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--writers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--target-dim", type=int, default=64)
    parser.add_argument("--tar-formats", nargs="+", choices=["ustar", "pax"], default=["ustar"], help="member header formats to compare")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warm", action="store_true", help="do not drop the page cache (tests)")
    parser.add_argument("--work", type=Path, default=Path("runs/shard-writers"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    import tarfile

    from rela_pipeline.shards import writer as shard_writer

    source = open_image_source(args.data)
    samples = min(args.samples, len(source.files))
    variants = {(str(w) if len(args.tar_formats) == 1 else f"{w}-{f}"): (w, f) for w in args.writers for f in args.tar_formats}
    record: dict = {
        "machine": machine_record(),
        "inputs": {"data": args.data, "kind": source.kind, "samples": samples, "shard_size": args.shard_size, "target_dim": args.target_dim},
        "seconds": {key: [] for key in variants},
    }
    digests: dict[str, list[str]] = {}
    chosen_format = shard_writer.MEMBER_FORMAT
    for _ in range(args.rounds):
        for key, (writers, tar_format) in variants.items():
            shard_writer.MEMBER_FORMAT = {"ustar": tarfile.USTAR_FORMAT, "pax": tarfile.PAX_FORMAT}[tar_format]
            record["cold_cache"] = False if args.warm else drop_page_cache()
            seconds, digests[key] = write_once(source, samples, args.target_dim, writers, args.shard_size, args.work)
            record["seconds"][key].append(round(seconds, 2))
            print(f"{writers} writers, {tar_format} headers: {seconds:.1f} s ({seconds / samples * 1e6:.0f} us/sample)", flush=True)
            write_json_atomic(args.out, record)
    shard_writer.MEMBER_FORMAT = chosen_format
    one = statistics.median(record["seconds"][next(iter(variants))])
    record["summary"] = {
        "us_per_sample": {w: round(statistics.median(v) / samples * 1e6, 1) for w, v in record["seconds"].items()},
        "speedup_over_first": {w: round(one / statistics.median(v), 2) for w, v in record["seconds"].items()},
        "same_shards_for_every_count": len({tuple(d) for d in digests.values()}) == 1,
    }
    return finish_record(record, args.out)


if __name__ == "__main__":
    main()
