"""Subset scores from the prior space, with faiss k-nearest-neighbour search.

For every sample ``i`` with transported target ``y_i`` (its first ``score_dims`` components),
let ``z_i = y_i / ||y_i||`` and ``s_ij = z_i . z_j`` (cosine similarity), and let ``N_k(i)`` be
the ``k`` most similar *other* samples (exact inner-product search, ``faiss.IndexFlatIP``):

* ``knn_density_i = mean_{j in N_k(i)} s_ij`` -- high in dense, redundant regions, low for
  rare or atypical samples (the k-NN density proxy of SemDeDup/"prototypicality" scoring).
* ``nn_similarity_i = max_{j != i} s_ij`` -- near 1 for (near-)duplicates.
* ``nn_index_i = argmax_{j != i} s_ij`` -- which sample it duplicates.

Only the leading components are used by default: after standardisation every component has unit
variance, so the many low-variance (mostly noise) directions would otherwise dominate cosine
similarity.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from .errors import RelaError

#: Default neighbourhood size for ``knn_density``.
DEFAULT_K = 10
#: Default number of leading transported components used for scoring.
DEFAULT_SCORE_DIMS = 64


@dataclass
class SubsetScores:
    """Per-sample scores (arrays of length N, aligned with sample indices).

    Attributes:
        knn_density: float32, mean cosine similarity to the k nearest other samples.
        nn_similarity: float32, cosine similarity to the nearest other sample.
        nn_index: int64, index of the nearest other sample.
        k: neighbourhood size used.
        dims: components used.
        device: "gpu" or "cpu" (where faiss ran).
    """

    knn_density: np.ndarray
    nn_similarity: np.ndarray
    nn_index: np.ndarray
    k: int
    dims: int
    device: str


def _make_index(dims: int, use_gpu: bool) -> tuple[faiss.Index, str]:
    index = faiss.IndexFlatIP(dims)
    if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        resources = faiss.StandardGpuResources()
        gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
        gpu_index.referenced_resources = resources  # keep alive with the index
        return gpu_index, "gpu"
    return index, "cpu"


def _normalised_rows(targets: np.ndarray, start: int, stop: int, dims: int) -> np.ndarray:
    block = np.ascontiguousarray(targets[start:stop, :dims], dtype=np.float32)
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return block / np.maximum(norms, 1e-12)


def knn_scores(
    targets: np.ndarray,
    *,
    k: int = DEFAULT_K,
    dims: int | None = DEFAULT_SCORE_DIMS,
    use_gpu: bool = True,
    chunk_rows: int = 65536,
) -> SubsetScores:
    """Score every sample by its neighbourhood in the transported space.

    Args:
        targets: ``(N, K)`` transported targets, any float dtype; may be a ``np.memmap``
            (read in chunks of ``chunk_rows``; host memory is ``O(N * dims)`` float32 for the index).
        k: neighbours per sample for ``knn_density`` (clamped to N - 1).
        dims: leading components to use (None or 0: all K).
        use_gpu: put the index on GPU 0 when faiss sees a GPU.
        chunk_rows: rows per add/search call.

    Returns:
        :class:`SubsetScores`; formulas in the module docstring.

    Raises:
        RelaError: fewer than two samples, or k < 1.
    """
    n, total_dims = targets.shape
    if n < 2:
        raise RelaError(f"subset scores need at least 2 samples, got {n}")
    if k < 1:
        raise RelaError(f"--score-k must be at least 1, got {k}")
    dims = total_dims if not dims else min(dims, total_dims)
    k = min(k, n - 1)
    index, device = _make_index(dims, use_gpu)
    for start in range(0, n, chunk_rows):
        index.add(_normalised_rows(targets, start, min(n, start + chunk_rows), dims))
    density = np.empty(n, dtype=np.float32)
    nn_similarity = np.empty(n, dtype=np.float32)
    nn_index = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        similarities, neighbours = index.search(_normalised_rows(targets, start, stop, dims), k + 1)
        own = np.arange(start, stop)[:, None]
        is_self = neighbours == own
        # Drop the sample itself; if an exact duplicate outranked it, drop the last hit instead.
        drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
        keep = np.ones_like(is_self)
        keep[np.arange(stop - start), drop] = False
        similarities = similarities[keep].reshape(stop - start, k)
        neighbours = neighbours[keep].reshape(stop - start, k)
        density[start:stop] = similarities.mean(axis=1)
        nn_similarity[start:stop] = similarities[:, 0]
        nn_index[start:stop] = neighbours[:, 0]
    return SubsetScores(density, nn_similarity, nn_index, k=k, dims=dims, device=device)
