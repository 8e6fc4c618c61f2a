"""Writing the shards: by one writer straight into OUT, or in parts by several (the ranks, or
forked processes of one process) and then moved into OUT in order."""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ...errors import RelaError
from ...fileio import PARTIAL_SUFFIX, create_npy_memmap, read_byte_ranges, sha256_file
from ...shards.format import SHARD_GLOB, SHARD_PATTERN, encode_sample
from ...shards.writer import ShardInfo, ShardSetWriter
from .context import EmbedRun
from .journal import EmbedJournal, RankProgress
from .output import remove_path
from .plan import rank_share

#: Whether a one-process run may write shards in forked processes (Linux: ``fork`` is the start
#: method there, as for DataLoader workers; elsewhere one writer).
FORK_WRITERS = sys.platform.startswith("linux")


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

    The samples go into shards in :func:`shard_write_order`. One writer writes them straight into
    OUT. W writers (W ranks under torchrun, or ``shard_writers`` processes of one process) cut
    the order into blocks of ``shard_size`` samples and each writes its :func:`rank_share` of the
    blocks into ``.work/shards-W-R/``; rank 0 then moves them into OUT, numbered in order. A shard
    closed early by ``max_shard_bytes`` adds one shard, wherever it falls. Either way the shards
    hold the samples in the same order, and without such a shard they are the same files.

    Raises:
        RelaError: a writing process failed (its message), or the parts do not add up.
        OSError: an image cannot be read any more (one writer).
    """
    config, distribution = run.config, run.distribution
    order = shard_write_order(len(kept), config.seed)
    reused = distribution.on_main(lambda: shards_to_keep(run.journal, run.out_dir))
    if sum(s.samples for s in reused) == len(kept):  # finished, by this world size or another
        return (reused if distribution.is_main else []), len(reused)
    contents = ShardContents(run, kept, targets, scores, labels, order)
    blocks = -(-len(kept) // config.shard_size)
    writers = distribution.world_size if distribution.enabled else min(config.shard_writers, blocks) if FORK_WRITERS else 1
    if writers == 1:
        with _progress(run, len(order), sum(s.samples for s in reused)) as bar:
            shards = contents.write(order, run.out_dir, reused, lambda shards: run.journal.record_shards([s.to_dict() for s in shards]), bar.update)
        return shards, len(reused)

    def parts_to_keep() -> dict[int, list[dict[str, Any]]]:
        run.journal.absorb_rank_progress()  # the parts of writers killed before rank 0 folded them in
        if reused:  # a prefix of one writer's shards: W writers write other shards
            remove_shard_files(run.out_dir, keep=set())
            run.journal.record_shards([])
        for stale in run.work.glob("shards-*"):
            if stale.name.rsplit("-", 1)[0] != f"shards-{writers}":
                remove_path(stale)
        return run.journal.shard_parts(writers)

    parts = distribution.on_main(parts_to_keep)
    mine = [distribution.rank] if distribution.enabled else range(writers)
    finished = {rank: _part_prefix(contents.part_dir(rank, writers), parts.get(rank, [])) for rank in mine}
    if distribution.enabled:
        rank = distribution.rank
        first, last = contents.part_range(rank, writers)
        with _progress(run, last - first, sum(s.samples for s in finished[rank])) as bar:
            contents.write_part(rank, writers, finished[rank], run.recorder(), bar.update)
        distribution.barrier()
        reused_parts = sum(distribution.gather(len(finished[rank])))
    else:
        _write_parts_in_processes(run, contents, writers, finished)
        reused_parts = sum(len(done) for done in finished.values())
    shards = distribution.on_main(lambda: _publish_parts(run, writers, len(kept)))
    return (shards if distribution.is_main else []), reused_parts


def _progress(run: EmbedRun, total: int, initial: int) -> tqdm:
    return tqdm(total=total, initial=initial, unit="img", desc="shards", disable=not run.config.progress, dynamic_ncols=True)


@dataclasses.dataclass
class ShardContents:
    """What the shards hold, for any writer: the samples ``kept`` (indices into the source's
    rows), their ``targets`` (``(len(kept), K)``), ``scores`` and ``labels`` (by sample index),
    and the write ``order`` (a permutation of the sample indices)."""

    run: EmbedRun
    kept: np.ndarray
    targets: np.ndarray
    scores: dict[str, np.ndarray]
    labels: np.ndarray | None
    order: np.ndarray

    def part_dir(self, rank: int, writers: int) -> Path:
        """``.work/shards-W-R``: where writer ``rank`` of ``writers`` writes its part (created)."""
        path = self.run.work / f"shards-{writers}-{rank}"
        path.mkdir(exist_ok=True)
        return path

    def part_range(self, rank: int, writers: int) -> tuple[int, int]:
        """Writer ``rank``'s positions ``[first, last)`` in :attr:`order`: its
        :func:`rank_share` of the blocks of ``shard_size`` samples."""
        size = self.run.config.shard_size
        share = rank_share(-(-len(self.order) // size), rank, writers)
        return share.start * size, min(share.stop * size, len(self.order))

    def write_part(self, rank: int, writers: int, done: list[ShardInfo], recorder, on_samples: Callable[[int], Any]) -> list[ShardInfo]:
        """Write writer ``rank``'s part (:meth:`part_range`) into its part directory, after its
        finished shards ``done``, recording each shard with ``recorder.record_shard_part``."""
        first, last = self.part_range(rank, writers)
        return self.write(
            self.order[first:last],
            self.part_dir(rank, writers),
            done,
            lambda shards: recorder.record_shard_part(rank, writers, [s.to_dict() for s in shards]),
            on_samples,
        )

    def write(
        self, order: np.ndarray, directory: Path, done: list[ShardInfo], on_shard: Callable[[list[ShardInfo]], None], on_samples: Callable[[int], Any]
    ) -> list[ShardInfo]:
        """Write the samples ``order[len(done's samples):]`` (sample indices) into shards in
        ``directory``, after the finished shards ``done``; call ``on_shard`` with the finished
        shards as each closes and ``on_samples(1)`` per sample."""
        config, index, scores, labels = self.run.config, self.run.index, self.scores, self.labels
        position = sum(s.samples for s in done)
        with ShardSetWriter(directory, config.shard_size, config.max_shard_bytes, finished=done, on_shard=on_shard) as writer:
            # Shards hold samples in a seeded random order: an ImageFolder scan is sorted by class, and
            # a streaming reader (shard shuffle + a bounded sample buffer) would otherwise see batches
            # of one or two classes. Keys stay the sample indices, so nothing else depends on the order.
            # At millions of images each copy is then a random read of the input: the kernel
            # prefetches the next ones (read_byte_ranges).
            samples = order[position:].tolist()
            rows = [int(self.kept[i]) for i in samples]  # the source's rows
            for i, row, image_bytes in zip(samples, rows, read_byte_ranges(map(index.byte_range, rows)), strict=True):
                label = int(labels[i]) if labels is not None else None
                metadata = {
                    "label": label,
                    "class_name": index.class_names[label] if label is not None else None,
                    "knn_density": float(scores["knn_density"][i]),
                    "nn_similarity": float(scores["nn_similarity"][i]),
                    "nn_index": int(scores["nn_index"][i]),
                }
                writer.write(encode_sample(i, index.origin(row), index.image_field(row), image_bytes, np.asarray(self.targets[i]), metadata, label))
                on_samples(1)
        return writer.shards


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


#: Samples a writing process writes between updates of the shared progress count.
_PROGRESS_EVERY = 256


def _write_parts_in_processes(run: EmbedRun, contents: ShardContents, writers: int, finished: dict[int, list[ShardInfo]]) -> None:
    """Write every writer's part in its own forked process (each records its shards in its
    ``rank-R.json``, which :func:`_publish_parts` folds into the journal) and wait for them all.

    Forked, like DataLoader workers: the processes share the source's index, the targets' memory
    map and the scores without copying them; they run no torch or faiss code. Ctrl-C or one
    process failing stops them all; finished shards stay for ``--resume``.

    Raises:
        RelaError: a process failed (its error, as one line) or died (its exit code).
        KeyboardInterrupt: a process was interrupted (Ctrl-C), or this one.
    """
    context = multiprocessing.get_context("fork")
    errors = context.SimpleQueue()
    written = context.Value("q", 0)

    parent = os.getpid()

    def work(rank: int) -> None:
        _die_with(parent)
        stopping = False

        def stop(signum: int, frame: Any) -> None:  # the parent stops the others when one fails
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the writers with SIGTERM
        pending = 0

        def count(n: int) -> None:  # after each sample: stop between samples, never inside a clean-up
            nonlocal pending
            if stopping:
                raise KeyboardInterrupt
            pending += n
            if pending >= _PROGRESS_EVERY:
                with written.get_lock():
                    written.value += pending
                pending = 0

        try:
            contents.write_part(rank, writers, finished[rank], RankProgress.at(run.work, rank, writers), count)
        except BaseException as error:  # noqa: BLE001 - passed to the parent as one line, Ctrl-C included
            errors.put((type(error).__name__, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")))
            os._exit(1)

    processes = [context.Process(target=work, args=(rank,), name=f"shard-writer-{rank}", daemon=True) for rank in range(writers)]
    initial = sum(s.samples for done in finished.values() for s in done)
    try:
        for process in processes:
            process.start()
        with _progress(run, len(contents.order), initial) as bar:
            while any(p.is_alive() for p in processes) and not any(p.exitcode for p in processes):
                time.sleep(0.2)
                bar.update(initial + written.value - bar.n)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()  # it stops after its current sample, dropping its partial shard
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():  # stuck in a read
                process.kill()
                process.join()
    failed = [p for p in processes if p.exitcode != 0]
    if failed:
        kind, message = errors.get() if not errors.empty() else ("", f"exit code {failed[0].exitcode}")
        if kind == "KeyboardInterrupt":  # Ctrl-C reached the writers first: the run was interrupted, not broken
            raise KeyboardInterrupt
        raise RelaError(f"a shard-writing process failed ({message}); rerun with --resume to keep the finished shards")


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux ``PR_SET_PDEATHSIG``), so
    that no writer outlives a killed run and races the run that resumes it."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


def write_rows_npy(source: np.ndarray, rows: np.ndarray, path: Path, chunk_rows: int = 65536) -> None:
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    out = create_npy_memmap(partial, source.dtype, (len(rows), source.shape[1]))
    for start in range(0, len(rows), chunk_rows):
        out[start : start + chunk_rows] = source[rows[start : start + chunk_rows]]
    out.flush()
    del out
    os.replace(partial, path)
