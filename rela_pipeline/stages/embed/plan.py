"""Which part of each phase of ``embed`` a rank of a torchrun job does.

Every phase is cut into units on a grid that does not depend on the world size W, and rank r
takes the r-th of W consecutive runs of units (:func:`rank_share`):

=============  ==================================================  =================================
phase          unit                                                why this grid
=============  ==================================================  =================================
embed          a batch of ``batch_size`` rows, ``[j B, (j+1) B)``  each batch holds the rows one
               of the batches not yet embedded                     process would put in it
targets        ``TRANSPORT_CHUNK_ROWS`` rows                        the chunks one process transports
scores         :attr:`ScoreSearch.rows_per_call` query rows        the blocks one process searches
shards         ``shard_size`` samples of the write order           a shard holds what it would hold
=============  ==================================================  =================================

So a W-process run computes each unit exactly as one process would: a row's embedding, target
and scores come from the same batch or chunk (byte-identical when the kernels are deterministic
for the same batch on the same device and thread count; otherwise within their float32
rounding, and the float16 targets within one float16 step).
"""

from __future__ import annotations

import numpy as np


def rank_share(count: int, rank: int, world_size: int) -> range:
    """Units ``[rank * count // W, (rank + 1) * count // W)``: W consecutive runs whose lengths
    differ by at most one, in rank order, covering ``range(count)``.

    Raises:
        ValueError: ``rank`` outside ``[0, world_size)``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return range(rank * count // world_size, (rank + 1) * count // world_size)


def missing_batches(num_rows: int, batch_size: int, done: list[tuple[int, int]]) -> np.ndarray:
    """Indices (int64, ascending) of the batches ``[j B, min((j+1) B, N))`` that no finished row
    range ``[start, stop)`` of ``done`` covers whole.

    Raises:
        ValueError: ``batch_size < 1`` or a range outside ``[0, N]``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    covered = np.zeros(num_rows + 1, dtype=np.int64)  # +1/-1 at range ends; prefix sum = coverage
    for start, stop in done:
        if not 0 <= start <= stop <= num_rows:
            raise ValueError(f"row range [{start}, {stop}) outside [0, {num_rows})")
        covered[start] += 1
        covered[stop] -= 1
    embedded = np.cumsum(covered[:-1]) > 0
    batches = -(-num_rows // batch_size)
    padded = np.ones(batches * batch_size, dtype=bool)
    padded[:num_rows] = embedded
    return np.flatnonzero(~padded.reshape(batches, batch_size).all(axis=1)).astype(np.int64)


def batch_row_ranges(batches: np.ndarray, num_rows: int, batch_size: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of ``batches`` (ascending batch indices), consecutive batches
    merged into one range."""
    ranges: list[tuple[int, int]] = []
    for j in np.asarray(batches).tolist():
        start, stop = j * batch_size, min((j + 1) * batch_size, num_rows)
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop)
        else:
            ranges.append((start, stop))
    return ranges


def rank_rows_to_embed(num_rows: int, batch_size: int, done: list[tuple[int, int]], rank: int, world_size: int) -> list[tuple[int, int]]:
    """The row ranges rank ``rank`` embeds: its :func:`rank_share` of the missing batches."""
    missing = missing_batches(num_rows, batch_size, done)
    share = rank_share(len(missing), rank, world_size)
    return batch_row_ranges(missing[share.start : share.stop], num_rows, batch_size)


def rank_row_range(num_rows: int, unit_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``rank`` when rows are cut into units of ``unit_rows``
    (the last one shorter) and shared by :func:`rank_share`; empty ranges have ``start == stop``."""
    units = -(-num_rows // unit_rows)
    share = rank_share(units, rank, world_size)
    return min(share.start * unit_rows, num_rows), min(share.stop * unit_rows, num_rows)
