"""Writing the shards: in one process straight into OUT, or in parts by the ranks and then moved
into OUT in order."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ...errors import RelaError
from ...fileio import PARTIAL_SUFFIX, create_npy_memmap, sha256_file
from ...shards.format import SHARD_GLOB, SHARD_PATTERN, encode_sample
from ...shards.writer import ShardInfo, ShardSetWriter
from .context import EmbedRun
from .journal import EmbedJournal
from .output import remove_path
from .plan import rank_share

#: Image reads in flight while the shards are written (:func:`read_ahead`), and their threads.
READ_AHEAD_SAMPLES = 256
READ_AHEAD_THREADS = 16


def shard_write_order(num_samples: int, seed: int) -> np.ndarray:
    """The order in which sample indices are written into shards: a permutation of
    ``range(num_samples)`` (int64, ``(num_samples,)``) from ``numpy.random.default_rng(seed)``."""
    return np.random.default_rng(seed).permutation(num_samples)


def shards_to_keep(journal: EmbedJournal, out_dir: Path) -> list[ShardInfo]:
    """The journal's finished shards up to the first one missing or altered; every other shard
    file (and partial file) in OUT is removed."""
    kept = _verified_prefix(out_dir, journal.shards)
    remove_shard_files(out_dir, keep={s.name for s in kept})
    if len(kept) != len(journal.shards):
        journal.record_shards([s.to_dict() for s in kept])
    return kept


def _verified_prefix(directory: Path, records: list[dict[str, Any]]) -> list[ShardInfo]:
    """The recorded shards up to the first one missing from ``directory`` or whose SHA-256 differs."""
    kept: list[ShardInfo] = []
    for record in records:
        path = directory / record["name"]
        if not path.is_file() or sha256_file(path) != record["sha256"]:
            break
        kept.append(ShardInfo(**record))
    return kept


def remove_shard_files(out_dir: Path, keep: set[str]) -> None:
    """Delete every shard file and partial file in ``out_dir`` whose name is not in ``keep``."""
    for path in list(out_dir.glob(SHARD_GLOB)) + list(out_dir.glob("*" + PARTIAL_SUFFIX)):
        if path.name not in keep:
            path.unlink()


def write_shards(run: EmbedRun, kept: np.ndarray, targets: np.ndarray, scores: dict[str, np.ndarray], labels: np.ndarray | None) -> tuple[list[ShardInfo], int]:
    """Write the shard set; return its shards (rank 0; ``[]`` elsewhere) and how many were reused.

    One process writes the samples in :func:`shard_write_order` straight into OUT. W ranks cut the
    order into blocks of ``shard_size`` samples and each writes its :func:`rank_share` of the
    blocks into ``.work/shards-W-R/``; rank 0 then moves them into OUT, numbered in order. A shard
    closed early by ``max_shard_bytes`` adds one shard, wherever it falls. Either way the shards
    hold the samples in the same order."""
    config, distribution = run.config, run.distribution
    order = shard_write_order(len(kept), config.seed)
    reused = distribution.on_main(lambda: shards_to_keep(run.journal, run.out_dir))
    if sum(s.samples for s in reused) == len(kept):  # finished, by this world size or another
        return (reused if distribution.is_main else []), len(reused)
    if not distribution.enabled:
        shards = _write_samples(
            run, kept, targets, scores, labels, order, run.out_dir, reused, lambda shards: run.journal.record_shards([s.to_dict() for s in shards])
        )
        return shards, len(reused)

    world, rank = distribution.world_size, distribution.rank

    def parts_to_keep() -> dict[int, list[dict[str, Any]]]:
        if reused:  # a prefix of a one-process run's shards: W ranks write other shards
            remove_shard_files(run.out_dir, keep=set())
            run.journal.record_shards([])
        for stale in run.work.glob("shards-*"):
            if stale.name.rsplit("-", 1)[0] != f"shards-{world}":
                remove_path(stale)
        return run.journal.shard_parts(world)

    parts = distribution.on_main(parts_to_keep)
    part_dir = run.work / f"shards-{world}-{rank}"
    part_dir.mkdir(exist_ok=True)
    finished = _part_prefix(part_dir, parts.get(rank, []))
    share = rank_share(-(-len(kept) // config.shard_size), rank, world)
    first, last = share.start * config.shard_size, min(share.stop * config.shard_size, len(kept))
    recorder = run.recorder()
    _write_samples(
        run,
        kept,
        targets,
        scores,
        labels,
        order[first:last],
        part_dir,
        finished,
        lambda shards: recorder.record_shard_part(rank, world, [s.to_dict() for s in shards]),
    )
    distribution.barrier()
    reused_parts = distribution.gather(len(finished))
    shards = distribution.on_main(lambda: _publish_parts(run, world, len(kept)))
    return (shards if distribution.is_main else []), sum(reused_parts)


def _part_prefix(part_dir: Path, records: list[dict[str, Any]]) -> list[ShardInfo]:
    """The recorded shards of a rank's part up to the first missing or altered one; every other
    file in the part's directory is removed."""
    kept = _verified_prefix(part_dir, records)
    names = {s.name for s in kept}
    for path in part_dir.iterdir():
        if path.name not in names:
            path.unlink()
    return kept


def _publish_parts(run: EmbedRun, world: int, num_samples: int) -> list[ShardInfo]:
    """On rank 0, once every rank has written its part: move the parts' shards into OUT as
    ``shard-NNNNNN.tar`` in rank order and record them as the finished shards.

    Raises:
        RelaError: the parts do not hold ``num_samples`` samples (nothing is moved).
    """
    journal = run.journal
    journal.absorb_rank_progress()
    parts = journal.shard_parts(world)
    recorded = sum(record["samples"] for shards in parts.values() for record in shards)
    if recorded != num_samples:
        raise RelaError(f"the ranks' shard parts hold {recorded} of {num_samples} samples; rerun with --resume")
    shards: list[ShardInfo] = []
    for rank in range(world):
        for record in parts.get(rank, []):
            info = ShardInfo(**record)
            name = SHARD_PATTERN % len(shards)
            os.replace(run.work / f"shards-{world}-{rank}" / info.name, run.out_dir / name)
            shards.append(dataclasses.replace(info, name=name))
    journal.drop_shard_parts()
    journal.record_shards([s.to_dict() for s in shards])
    return shards


def _write_samples(
    run: EmbedRun,
    kept,
    targets,
    scores: dict[str, np.ndarray],
    labels,
    order: np.ndarray,
    directory: Path,
    done: list[ShardInfo],
    on_shard: Callable[[list[ShardInfo]], None],
) -> list[ShardInfo]:
    """Write the samples ``order[len(done's samples):]`` (indices into ``kept``) into shards in
    ``directory``, after the finished shards ``done``."""
    config, index = run.config, run.index
    position = sum(s.samples for s in done)
    with (
        ShardSetWriter(directory, config.shard_size, config.max_shard_bytes, finished=done, on_shard=on_shard) as writer,
        tqdm(total=len(order), initial=position, unit="img", desc="shards", disable=not config.progress, dynamic_ncols=True) as bar,
    ):
        # Shards hold samples in a seeded random order: an ImageFolder scan is sorted by class, and
        # a streaming reader (shard shuffle + a bounded sample buffer) would otherwise see batches
        # of one or two classes. Keys stay the sample indices, so nothing else depends on the order.
        samples = order[position:].tolist()  # indices into kept
        rows = [int(kept[i]) for i in samples]  # the source's rows
        for i, row, image_bytes in zip(samples, rows, read_ahead(index.read, rows), strict=True):
            label = int(labels[i]) if labels is not None else None
            metadata = {
                "label": label,
                "class_name": index.class_names[label] if label is not None else None,
                "knn_density": float(scores["knn_density"][i]),
                "nn_similarity": float(scores["nn_similarity"][i]),
                "nn_index": int(scores["nn_index"][i]),
            }
            writer.write(encode_sample(i, index.origin(row), index.image_field(row), image_bytes, np.asarray(targets[i]), metadata, label))
            bar.update(1)
    return writer.shards


def read_ahead(read: Callable[[int], bytes], rows: Sequence[int], threads: int = READ_AHEAD_THREADS, lookahead: int = READ_AHEAD_SAMPLES) -> Iterator[bytes]:
    """``read(row)`` for each of ``rows``, in order, with up to ``lookahead`` reads in flight on
    ``threads`` threads.

    The shards take their samples in a random order, so at millions of images each read is a
    random read of the input, from disk once the input no longer fits in the page cache (about
    2 ms each on this machine's disk, against 10 us from the cache): reads in flight overlap that
    wait with each other and with the encoding. Memory: ``lookahead`` images at most.

    Raises:
        whatever ``read`` raises, for the first row whose read fails (the reads in flight are
        finished or cancelled first).
    """
    with ThreadPoolExecutor(threads, thread_name_prefix="read-ahead") as pool:
        pending: collections.deque[Future[bytes]] = collections.deque()
        upcoming = iter(rows)
        try:
            for row in itertools.islice(upcoming, lookahead):
                pending.append(pool.submit(read, row))
            while pending:
                data = pending.popleft().result()
                for row in itertools.islice(upcoming, 1):
                    pending.append(pool.submit(read, row))
                yield data
        finally:
            for future in pending:
                future.cancel()


def write_rows_npy(source: np.ndarray, rows: np.ndarray, path: Path, chunk_rows: int = 65536) -> None:
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    out = create_npy_memmap(partial, source.dtype, (len(rows), source.shape[1]))
    for start in range(0, len(rows), chunk_rows):
        out[start : start + chunk_rows] = source[rows[start : start + chunk_rows]]
    out.flush()
    del out
    os.replace(partial, path)
