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

from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np

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
