"""Representation targets: the transport applied to the embeddings, chunk by chunk, and the
reference sample that ``verify`` recomputes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...fileio import create_npy_memmap
from ...transport import LinearTransport

#: Rows transported per chunk (the unit ranks share: :mod:`rela_pipeline.stages.embed.plan`).
TRANSPORT_CHUNK_ROWS = 65536


def transport_targets(
    embeddings: np.ndarray,
    rows: np.ndarray,
    transport: LinearTransport,
    out_path: Path,
    dtype: str,
    device: torch.device,
    chunk_rows: int = TRANSPORT_CHUNK_ROWS,
) -> np.ndarray:
    """Transport ``embeddings[rows]`` into a ``(len(rows), K)`` memory-map of ``dtype`` at ``out_path``.

    Computed in float32 on ``device`` in chunks of ``chunk_rows`` rows (host memory
    O(chunk_rows * D) beyond the maps' page cache).

    Raises:
        OSError: the file cannot be created (``ENOSPC`` when the disk is full).
    """
    targets = create_npy_memmap(out_path, dtype, (len(rows), transport.output_dim))
    transport_rows(embeddings, rows, transport, targets, device, 0, len(rows), chunk_rows)
    targets.flush()
    return targets


def transport_rows(
    embeddings: np.ndarray,
    rows: np.ndarray,
    transport: LinearTransport,
    targets: np.ndarray,
    device: torch.device,
    start: int,
    stop: int,
    chunk_rows: int = TRANSPORT_CHUNK_ROWS,
) -> None:
    """Write ``targets[i] = transport(embeddings[rows[i]])`` for ``start <= i < stop`` in chunks of
    ``chunk_rows`` from ``start`` (float32 on ``device``, stored in ``targets``' dtype). A rank
    whose ``start`` is a multiple of ``chunk_rows`` transports the chunks one process would."""
    for first in range(start, stop, chunk_rows):
        last = min(stop, first + chunk_rows)
        block = torch.from_numpy(np.asarray(embeddings[rows[first:last]])).to(device)
        targets[first:last] = transport.apply(block).cpu().numpy().astype(targets.dtype)


#: Samples whose raw embeddings are stored in ``transport.npz`` for ``verify`` to recompute.
REFERENCE_SAMPLES = 256


def reference_sample_indices(num_samples: int, count: int = REFERENCE_SAMPLES) -> np.ndarray:
    """Sample indices (int64, sorted, unique) whose embeddings go into ``transport.npz`` as the
    reference sample: ``count`` evenly spaced indices, or all of them when there are fewer."""
    return np.unique(np.linspace(0, num_samples - 1, min(count, num_samples)).round().astype(np.int64))
