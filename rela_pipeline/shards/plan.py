"""The order in which an epoch visits its samples: one definition for every data path.

Both data paths of stage two (``memory``: indexing a decoded copy of the shard set; ``stream``:
reading the tar shards with webdataset) follow the same order, so a run gives the same batches,
and with the same view seeds the same views, whichever path it takes and however many reader
processes it uses::

    shards in a seeded order (a function of (seed, epoch))
      -> in each shard, its samples in the epoch's subset, in the shard's stored order
      -> a bounded buffer shuffle per shard (seeded by (seed, epoch, shard))
      -> concatenated across shards, cut into batches of B (the last incomplete batch is dropped)

Stage one writes samples into shards in a seeded random permutation (``shard_order`` in the
manifest), so a shard already mixes all classes; the per-shard buffer shuffle then makes each
epoch's batch composition new. The buffer bounds what a stream reader holds: at most
``buffer_size`` encoded samples per reader.

Sources: the buffer shuffle is webdataset's ``shuffle`` stage (reservoir-style, as in
``webdataset.filters.shuffle``), written here as one function applied to index arrays and to
sample streams alike so that both give the same permutation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from ..errors import RelaError

T = TypeVar("T")

#: Draws taken from the generator at a time by :func:`buffer_shuffle` (any value gives the same
#: permutation only if it is kept fixed: it is part of the order's definition).
_DRAW_BLOCK = 1024


def shard_visit_order(shard_ids: Sequence[int], seed: int, epoch: int) -> list[int]:
    """The shards of an epoch in visiting order.

    Args:
        shard_ids: the ids of the shards to read (their positions in the manifest's shard list).
        seed, epoch: the run seed and the 0-based epoch.

    Returns:
        ``shard_ids`` permuted by ``numpy.random.default_rng([seed, epoch, 0x5A4D])``.
    """
    rng = np.random.default_rng([seed, epoch, 0x5A4D])
    return [int(shard_ids[i]) for i in rng.permutation(len(shard_ids))]


def shard_rng(seed: int, epoch: int, shard_id: int) -> np.random.Generator:
    """The generator of one shard's buffer shuffle in one epoch."""
    return np.random.default_rng([seed, epoch, shard_id, 0xB0F])


def buffer_shuffle(items: Iterable[T], buffer_size: int, rng: np.random.Generator) -> Iterator[T]:
    """Shuffle a stream with a bounded buffer (webdataset's ``shuffle`` stage).

    The first ``buffer_size`` items fill the buffer; each later item replaces a uniformly chosen
    buffered item, which is yielded; at the end the buffer is yielded in a random order. With
    ``buffer_size`` at least the stream's length this is a uniform random permutation. The
    permutation depends only on the number of items and the generator's state, so an index array
    and the stream of the samples it names are shuffled identically.

    Args:
        items: any iterable.
        buffer_size: items held at most (>= 1).
        rng: the generator (consumed).

    Yields:
        The items, permuted.
    """
    size = max(int(buffer_size), 1)
    buffer: list[T] = []
    draws = np.empty(0, dtype=np.int64)
    used = 0
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        if used == len(draws):
            draws, used = rng.integers(0, size, size=_DRAW_BLOCK), 0
        slot = int(draws[used])
        used += 1
        yield buffer[slot]
        buffer[slot] = item
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


def epoch_order(
    shard_contents: dict[int, np.ndarray],
    subset_mask: np.ndarray,
    seed: int,
    epoch: int,
    buffer_size: int,
) -> np.ndarray:
    """Every sample of an epoch in training order (the module docstring's definition).

    Args:
        shard_contents: shard id -> the sample indices it holds, in stored order (int64 arrays);
            only the shards that are read.
        subset_mask: ``(N,)`` bool, the epoch's subset.
        seed, epoch: the run seed and the 0-based epoch.
        buffer_size: the per-shard shuffle buffer, in samples.

    Returns:
        int64 ``(M,)``: the indices of the subset's samples found in the shards, in order.
    """
    parts = []
    for shard_id in shard_visit_order(sorted(shard_contents), seed, epoch):
        stored = shard_contents[shard_id]
        selected = stored[subset_mask[stored]]
        parts.append(np.fromiter(buffer_shuffle(selected.tolist(), buffer_size, shard_rng(seed, epoch, shard_id)), dtype=np.int64, count=len(selected)))
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def epoch_batches(order: np.ndarray, batch_size: int) -> np.ndarray:
    """Cut an epoch's order into full batches: int64 ``(len(order) // B, B)`` (the remainder of
    fewer than B samples is dropped, as in the stream)."""
    steps = len(order) // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size)


# ----------------------------------------------------------------------------------------------
# Splitting an epoch across the ranks of a distributed run (torchrun)
#
# The global order above is the same for every world size; each of W ranks takes B / W rows of
# every global batch of B, so every rank runs the same number of steps, the ranks' samples are
# disjoint, together they are the one-process epoch, and the remainder of fewer than B samples is
# dropped exactly as in one process. Two layouts:
#
# ``interleaved``  rank r takes columns r*b .. (r+1)*b - 1 of every global batch (b = B / W): the
#                  global batches are the one-process run's, so a distributed run computes what
#                  one process computes (up to the order of float reductions). For the memory path,
#                  where every rank holds the whole decoded set.
# ``contiguous``   rank r takes the r-th of W equal consecutive runs of the epoch's first
#                  ``steps * B`` samples and cuts it into batches of b: a rank reads only the
#                  shards its run covers (whole shards, except at most two it shares with its
#                  neighbours, of which it decodes only its part). For the stream path.
# ----------------------------------------------------------------------------------------------

#: Accepted layouts of :func:`rank_batches`.
RANK_LAYOUTS = ("interleaved", "contiguous")


def local_batch_size(batch_size: int, world_size: int) -> int:
    """Each rank's share ``B / W`` of the global batch B.

    Raises:
        RelaError: B is not a multiple of W.
    """
    if batch_size % world_size:
        raise RelaError(f"--batch-size {batch_size} (the global batch) does not split evenly over {world_size} processes")
    return batch_size // world_size


def rank_batches(order: np.ndarray, batch_size: int, rank: int, world_size: int, layout: str) -> np.ndarray:
    """The rows of one rank in an epoch: int64 ``(steps, B / W)``, ``steps = len(order) // B``.

    Args:
        order: int64 ``(M,)``, the epoch's global order (:func:`epoch_order`).
        batch_size: B, the global batch (a multiple of ``world_size``).
        rank, world_size: this rank and W.
        layout: one of :data:`RANK_LAYOUTS` (the section comment above).

    Raises:
        ValueError: B not a multiple of W, a rank outside ``[0, W)`` or an unknown layout.
    """
    if world_size < 1 or not 0 <= rank < world_size or batch_size % world_size:
        raise ValueError(f"cannot split batches of {batch_size} over rank {rank} of {world_size}")
    local = batch_size // world_size
    steps = len(order) // batch_size
    if layout == "interleaved":
        return epoch_batches(order, batch_size)[:, rank * local : (rank + 1) * local]
    if layout == "contiguous":
        span = steps * local
        return order[rank * span : (rank + 1) * span].reshape(steps, local)
    raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(RANK_LAYOUTS)}")


def written_shard_contents(num_samples: int, seed: int, shard_samples: Sequence[int]) -> list[np.ndarray]:
    """What each shard of a set written by ``rela-pipeline embed`` holds, from its manifest alone.

    Stage one writes the sample indices in the order ``numpy.random.default_rng(seed)
    .permutation(N)`` (manifest ``shard_order: {kind: permutation, seed}``) into consecutive shards
    of the manifest's sample counts.

    Args:
        num_samples: N (``samples.written``).
        seed: the manifest's ``shard_order.seed``.
        shard_samples: samples per shard, in the manifest's shard order (they sum to N).

    Returns:
        One int64 array of sample indices per shard, in stored order.

    Raises:
        ValueError: the counts do not sum to N.
    """
    if sum(shard_samples) != num_samples:
        raise ValueError(f"shard counts sum to {sum(shard_samples)}, not {num_samples}")
    permutation = np.random.default_rng(seed).permutation(num_samples)
    bounds = np.cumsum([0, *shard_samples])
    return [permutation[bounds[i] : bounds[i + 1]].astype(np.int64) for i in range(len(shard_samples))]


def shard_spans(visit: Sequence[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int, int]]:
    """The shards that positions ``[start, stop)`` of an epoch's order come from.

    Args:
        visit: ``[(shard id, samples of the epoch's subset in it), ...]`` in visiting order.
        start, stop: a range of positions in the concatenated order.

    Returns:
        ``[(shard id, first, end), ...]``: for each overlapping shard, the range of positions
        within that shard's part of the order (after its buffer shuffle), in visiting order.
    """
    spans = []
    offset = 0
    for shard_id, count in visit:
        lo, hi = max(start - offset, 0), min(stop - offset, count)
        if lo < hi:
            spans.append((shard_id, lo, hi))
        offset += count
        if offset >= stop:
            break
    return spans
