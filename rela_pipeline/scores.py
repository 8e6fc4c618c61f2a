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

The search (``index=``, :data:`SCORE_INDEXES`). Exact search costs ``O(N^2 d)``: 1,042 s for 1M
samples on 2 CPU cores. Above :data:`EXACT_MAX_SAMPLES` (``auto``) an approximate index replaces
it, following faiss's guidelines ("Guidelines to choose an index", faiss wiki):

* ``ivf``: an inverted file with ``nlist = 4 sqrt(N)`` lists (a power of two in [64, 65536]; the
  guidelines give 4 to 16 sqrt(N); :func:`ivf_lists` says why not more), k-means trained on
  ``39 nlist`` sampled rows (faiss's two-level k-means above :data:`TWO_LEVEL_TRAINING_FROM`
  lists), a flat coarse quantiser up to 1M samples and an HNSW32 one above (``IVF..._HNSW32``); on
  the GPU when faiss sees one (flat quantiser there). On the CPU the full pass groups the queries
  by inverted list and searches each list's group with one BLAS product (:func:`_grouped_search`).
* ``hnsw``: a graph (``HNSW32``), CPU only.

Either is tuned, not guessed: the search breadth (``nprobe`` or ``efSearch``) starts small and
doubles until recall@k on :data:`RECALL_QUERIES` sampled queries, against exact search of the same
queries, reaches :data:`TARGET_RECALL` and no sampled query is lost (finds under half its
neighbours: a mean recall of 0.99 can hide 1% of queries whose scores are wrong by 0.6, as HNSW gave
at ``efSearch`` 16 on clustered data), or no fewer are lost than one step narrower (at 10M samples
12 of 1,000 queries stayed lost from ``nprobe`` 64 to 512); the measured recall and the lost count
are returned (and recorded in the manifest). In the full pass, a sample whose search does not return
the sample itself (its own vector, cosine 1) was trapped away from its neighbourhood, and is
searched exactly, as is one whose search returned fewer than k others (``searched_exactly`` counts
them). Recall@k is the fraction of each query's k exact nearest other samples found among its k
approximate ones. An exact duplicate of a sample is its nearest neighbour under any of these indexes
(it falls in the same list and the same graph neighbourhood), so the ``dedup`` rule keeps finding
true duplicate pairs (tested with planted duplicates).

Under torchrun (``embed``), rank 0 builds and tunes the search once and saves it
(:meth:`ScoreSearch.save`); every rank loads it and scores its block of query rows
(:func:`score_rows`), cut at multiples of :attr:`ScoreSearch.rows_per_call` so that each block is
the one a single process searches.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.clustering import two_level_clustering

from .errors import RelaError
from .settings import DEFAULT_K, DEFAULT_SCORE_DIMS  # noqa: F401  (re-exported)

logger = logging.getLogger("rela_pipeline")

#: Accepted ``--score-index`` values.
SCORE_INDEXES = ("auto", "exact", "ivf", "hnsw")
#: ``auto`` searches exactly up to this many samples (about 40 s on 2 CPU cores at 64 dims), on
#: the GPU up to :data:`EXACT_MAX_SAMPLES_GPU`; above, it uses ``ivf``.
EXACT_MAX_SAMPLES = 200_000
EXACT_MAX_SAMPLES_GPU = 2_000_000
#: Recall@k that the approximate indexes are tuned to reach.
TARGET_RECALL = 0.95
#: Sampled queries on which recall is measured and the search breadth tuned.
RECALL_QUERIES = 1000
#: A sampled query that finds fewer than this fraction of its k exact neighbours is "lost" (the
#: search was trapped far from them: HNSW's failure mode on clustered data at small efSearch); the
#: tuning widens the search until none is.
LOST_QUERY_RECALL = 0.5
#: The widest search the tuning tries: ``nprobe`` (IVF lists visited per query) and ``efSearch``
#: (HNSW candidates). Past them an approximate search costs about as much as exact search; the
#: recall reached is reported whatever it is, and trapped searches are still redone exactly.
MAX_NPROBE = 512
MAX_EF_SEARCH = 1024
#: Bound on ``rows x breadth`` per search call (the coarse quantiser returns ``breadth`` lists per
#: row: 12 bytes each), so a wide search does not take gigabytes at once.
SEARCH_BUFFER_ENTRIES = 1 << 24
#: Above this many samples the IVF index's coarse quantiser is an HNSW graph (faiss's
#: ``IVF..._HNSW32`` for 1M to 10M+), on CPU.
HNSW_QUANTISER_FROM = 1_000_000
#: Above this many lists the IVF quantiser is trained by faiss's two-level k-means
#: (``faiss.contrib.clustering.two_level_clustering``) instead of one k-means over all lists.
TWO_LEVEL_TRAINING_FROM = 4096


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
        index: how the neighbours were searched: ``{"kind": "exact"}``, or for ``ivf`` / ``hnsw``
            the settings (``nlist``, ``nprobe``, ``quantiser`` / ``M``, ``ef_search``) and the
            measured ``recall_at_k`` on ``recall_queries`` sampled queries.
    """

    knn_density: np.ndarray
    nn_similarity: np.ndarray
    nn_index: np.ndarray
    k: int
    dims: int
    device: str
    index: dict = field(default_factory=lambda: {"kind": "exact"})


def resolve_score_index(kind: str, num_samples: int, gpu: bool) -> str:
    """The index ``kind`` stands for: ``auto`` is ``exact`` up to :data:`EXACT_MAX_SAMPLES` samples
    (:data:`EXACT_MAX_SAMPLES_GPU` on the GPU), else ``ivf``; the others are themselves.

    Raises:
        RelaError: an unknown kind.
    """
    if kind not in SCORE_INDEXES:
        raise RelaError(f"--score-index must be one of {', '.join(SCORE_INDEXES)}, got {kind!r}")
    if kind != "auto":
        return kind
    return "exact" if num_samples <= (EXACT_MAX_SAMPLES_GPU if gpu else EXACT_MAX_SAMPLES) else "ivf"


def faiss_sees_gpu() -> bool:
    """Whether this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _on_gpu(index: faiss.Index, gpu_id: int = 0) -> faiss.Index:
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(resources, gpu_id, index)
    faiss.add_to_referenced_objects(gpu_index, resources)  # keep the resources alive with the index
    return gpu_index


def _normalised_rows(targets: np.ndarray, start: int, stop: int, dims: int) -> np.ndarray:
    return _normalised(targets[start:stop, :dims])


def _normalised(block: np.ndarray) -> np.ndarray:
    block = np.ascontiguousarray(block, dtype=np.float32)
    norms = np.linalg.norm(block, axis=1, keepdims=True)
    return block / np.maximum(norms, 1e-12)


def ivf_lists(num_samples: int) -> int:
    """Inverted lists of the ``ivf`` index: ``4 sqrt(N)`` rounded to a power of two, within
    [64, 65536] and at most ``N / 39`` (faiss wants 39 training points per centroid), at least 1.

    faiss's guidelines give 4 to 16 sqrt(N) below 1M samples and ``IVF65536_HNSW32`` from 1M to 10M.
    Measured at 10M on the scale benchmark's data, 65,536 lists needed nprobe 256 for recall@10
    0.985 (128: 0.919) where 16,384 lists need 64 (0.968): the same candidates per query, with 4x
    the quantiser work and lists too short for the grouped pass's BLAS products. So 4 sqrt(N)."""
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(num_samples), 1)))
    nlist = min(max(nlist, 64), 65536, max(num_samples // 39, 1))
    return 2 ** int(math.log2(nlist))


def _build_index(kind: str, targets: np.ndarray, dims: int, gpu_id: int | None, chunk_rows: int, seed: int) -> tuple[faiss.Index, dict]:
    """Build and fill the index (on GPU ``gpu_id`` when not None and faiss sees a GPU);
    return ``(index, settings)``."""
    n = targets.shape[0]
    gpu = gpu_id is not None and faiss_sees_gpu() and kind != "hnsw"  # faiss has no GPU HNSW
    if kind == "exact":
        index = faiss.IndexFlatIP(dims)
        settings: dict = {"kind": "exact"}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dims, 32, faiss.METRIC_INNER_PRODUCT)
        settings = {"kind": "hnsw", "M": 32, "ef_construction": index.hnsw.efConstruction}
    else:
        nlist = ivf_lists(n)
        hnsw_quantiser = n > HNSW_QUANTISER_FROM and not gpu
        quantiser = faiss.IndexHNSWFlat(dims, 32, faiss.METRIC_INNER_PRODUCT) if hnsw_quantiser else faiss.IndexFlatIP(dims)
        if hnsw_quantiser:  # a denser graph and wider search than faiss's defaults: a vector sent to a far list is lost to every query
            quantiser.hnsw.efConstruction = 128
            quantiser.hnsw.efSearch = 128
        index = faiss.IndexIVFFlat(quantiser, dims, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True  # unit-norm centroids: inner-product assignment = nearest centroid
        # (faiss's Python constructor of IndexIVFFlat keeps the quantiser alive with the index)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, 39 * nlist), replace=False))
        training = _normalised(targets[sample, :dims])
        if nlist > TWO_LEVEL_TRAINING_FROM:
            # k-means costs O(samples x nlist) = O(nlist^2) per iteration: 65,536 centroids would take
            # hours on a CPU. faiss's two-level clustering (sqrt(nlist) coarse clusters, each split
            # in proportion to its size) costs O(nlist^1.5); its centroids fill the quantiser.
            centroids, _ = two_level_clustering(training, int(math.sqrt(nlist)), nlist, spherical=True, seed=seed, min_points_per_centroid=10)
            quantiser.add(centroids)  # the IVF index sees a filled quantiser and skips its own k-means
        index.train(training)
        del training
        settings = {
            "kind": "ivf",
            "nlist": nlist,
            "quantiser": "hnsw32" if hnsw_quantiser else "flat",
            "training_samples": int(len(sample)),
            "training": "two-level k-means" if nlist > TWO_LEVEL_TRAINING_FROM else "k-means",
        }
    if gpu:
        index = _on_gpu(index, gpu_id)
    for start in range(0, n, chunk_rows):
        index.add(_normalised_rows(targets, start, min(n, start + chunk_rows), dims))
    return index, settings


def _breadth_range(kind: str, settings: dict) -> tuple[int, int]:
    """First and widest search breadth the tuning tries (``nprobe`` or ``efSearch``)."""
    return (16, MAX_EF_SEARCH) if kind == "hnsw" else (4, min(settings["nlist"], MAX_NPROBE))


def _set_breadth(index: faiss.Index, kind: str, value: int, gpu: bool) -> None:
    """Set ``efSearch`` (hnsw) or ``nprobe`` (ivf, on the CPU or a GPU) of a filled index."""
    if kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = value
    elif kind == "ivf" and gpu:
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", value)
    elif kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = value


def _without_self(similarities: np.ndarray, neighbours: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop each query's own row from its ``k + 1`` hits (if an exact duplicate outranked it, or
    it was not found, drop the last hit instead): ``(Q, k)`` similarities and indices."""
    is_self = neighbours == own[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(is_self)
    keep[np.arange(len(own)), drop] = False
    return similarities[keep].reshape(len(own), k), neighbours[keep].reshape(len(own), k)


def exact_neighbours(targets: np.ndarray, rows: np.ndarray, dims: int, k: int, chunk_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest other samples of the samples ``rows`` by exact cosine similarity, reading
    ``targets`` in chunks (``O(len(rows) x N)`` work, ``O(chunk)`` memory).

    Returns:
        ``(similarities, indices)``: float32 and int64 ``(len(rows), k)``, most similar first.
    """
    queries = _normalised(targets[rows, :dims])
    best_s = np.full((len(rows), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(rows), 0), dtype=np.int64)
    n = targets.shape[0]
    for start in range(0, n, chunk_rows):
        block = _normalised_rows(targets, start, min(n, start + chunk_rows), dims)
        s, i = faiss.knn(queries, block, min(k + 1, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        best_s = np.concatenate([best_s, s], axis=1)
        best_i = np.concatenate([best_i, i + start], axis=1)
        top = np.argsort(-best_s, axis=1, kind="stable")[:, : k + 1]
        best_s, best_i = np.take_along_axis(best_s, top, 1), np.take_along_axis(best_i, top, 1)
    return _without_self(best_s, best_i, np.asarray(rows), k)


def recall_per_query(found: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """``|found_q ∩ exact_q| / k`` for each query: float64 ``(Q,)`` from int ``(Q, k)`` neighbour
    lists (recall@k is its mean)."""
    k = exact.shape[1]
    return np.array([len(set(f.tolist()) & set(e.tolist())) / k for f, e in zip(found, exact)], dtype=np.float64)


@dataclass
class ScoreSearch:
    """A filled faiss index over the unit-normalised leading ``dims`` components of every target,
    set to the breadth the tuning chose: built once (:func:`build_score_search`), saved and loaded
    by every rank of a torchrun job (:meth:`save`, :meth:`load`), searched in row ranges
    (:func:`score_rows`).

    Attributes:
        index: the faiss index (N vectors of ``dims`` float32).
        kind: ``exact``, ``ivf`` or ``hnsw``.
        k: neighbours per sample.
        dims: components searched.
        device: ``gpu`` or ``cpu``.
        settings: the search as recorded in the manifest (``kind``, index settings, the chosen
            ``nprobe`` / ``ef_search`` and the measured ``recall_at_k`` for an approximate index).
    """

    index: faiss.Index
    kind: str
    k: int
    dims: int
    device: str
    settings: dict

    @property
    def grouped(self) -> bool:
        """Whether the full pass groups queries by inverted list (:func:`_grouped_search`): IVF on the CPU."""
        return self.kind == "ivf" and self.device == "cpu"

    @property
    def rows_per_call(self) -> int:
        """Queries per faiss search call: :data:`SEARCH_CHUNK_ROWS` for exact search; for an
        approximate one bounded by :data:`SEARCH_BUFFER_ENTRIES` / breadth (the grouped IVF pass:
        :data:`GROUPED_SEARCH_ENTRIES` / nprobe, at least :data:`SEARCH_CHUNK_ROWS`)."""
        if self.kind == "exact":
            return SEARCH_CHUNK_ROWS
        breadth = max(int(self.settings.get("nprobe", self.settings.get("ef_search", 1))), 1)
        if self.grouped:
            return max(SEARCH_CHUNK_ROWS, GROUPED_SEARCH_ENTRIES // breadth)
        return max(1024, min(SEARCH_CHUNK_ROWS, SEARCH_BUFFER_ENTRIES // breadth))

    def save(self, path: str | os.PathLike) -> None:
        """Write the index (moved to the CPU) to ``path`` with ``faiss.write_index``, and its
        description to ``path + ".json"`` (both under temporary names, renamed when complete).

        Raises:
            OSError: a write error.
        """
        from .fileio import write_json_atomic

        path = Path(path)
        cpu_index = faiss.index_gpu_to_cpu(self.index) if self.device == "gpu" else self.index
        partial = path.with_name(path.name + ".partial")
        faiss.write_index(cpu_index, str(partial))
        os.replace(partial, path)
        write_json_atomic(path.with_name(path.name + ".json"), {"kind": self.kind, "k": self.k, "dims": self.dims, "settings": self.settings})

    @classmethod
    def load(cls, path: str | os.PathLike, gpu_id: int | None = None) -> ScoreSearch:
        """Read a saved search (onto GPU ``gpu_id`` when given and faiss sees a GPU; not ``hnsw``).

        Raises:
            RelaError: the files are missing or unreadable.
        """
        path = Path(path)
        try:
            about = json.loads(path.with_name(path.name + ".json").read_text(encoding="utf-8"))
            index = faiss.read_index(str(path))
        except (OSError, ValueError, RuntimeError) as error:
            raise RelaError(f"cannot read the score index {path} ({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
        gpu = gpu_id is not None and faiss_sees_gpu() and about["kind"] != "hnsw"
        if gpu:
            index = _on_gpu(index, gpu_id)
        search = cls(index, about["kind"], int(about["k"]), int(about["dims"]), "gpu" if gpu else "cpu", about["settings"])
        breadth = search.settings.get("nprobe", search.settings.get("ef_search"))
        if breadth is not None:
            _set_breadth(index, search.kind, int(breadth), gpu)
        return search


#: Rows per add call and (exact search) per search call.
SEARCH_CHUNK_ROWS = 65536
#: Bound on ``queries x nprobe`` per grouped IVF call (its coarse assignment: 4 bytes each, 512 MiB).
GROUPED_SEARCH_ENTRIES = 1 << 27


def _inner_products(queries: np.ndarray, members: np.ndarray, metric: int = faiss.METRIC_INNER_PRODUCT) -> np.ndarray:
    """``(m, n)`` float32 inner products of ``(m, d)`` float32 queries with ``(n, d)`` float32
    list members: one BLAS product (numpy's sgemm: 3.2 ms at 7,812 x 610 x 64 on 2 cores, where
    faiss's own ``pairwise_distances`` took 16.9 ms)."""
    assert metric == faiss.METRIC_INNER_PRODUCT, "the score indexes are inner-product indexes"
    return queries @ members.T


def _grouped_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search(queries, k)`` for a CPU ``IndexIVFFlat`` and a large query batch, with the
    queries grouped by the inverted lists they probe (``faiss.contrib.big_batch_search``, the faiss
    wiki's advice for huge query batches): same lists probed, so the same candidates.

    Each list's group is one BLAS product (:func:`_inner_products`) whose rows go straight into the
    queries' running top-k heaps (method ``pairwise_distances``: a candidate is kept only when it
    beats the query's k-th best so far, so after a query's first list almost every candidate is
    one comparison). faiss's ``knn`` per list instead selects each list's top k from scratch: at the
    10M scale run's shapes on 2 cores this pass does 1.48x the lists per second of that one
    (``benchmarks/grouped_list_search.py``, the same neighbours), and the 10M run's scoring went
    from 36 to 22.6 minutes. Memory: one ``queries x members`` float32 product per list in flight,
    two with the prefetch thread (at 10M on average 7,800 x 610, 19 MB; the run's peak memory
    did not change).
    faiss's helper prints progress on stdout whatever its ``verbose``: kept quiet."""
    from faiss.contrib.big_batch_search import big_batch_search

    with contextlib.redirect_stdout(io.StringIO()):
        return big_batch_search(faiss.downcast_index(index), queries, k, method="pairwise_distances", pairwise_distances=_inner_products, verbose=1, threaded=1)


def build_score_search(
    targets: np.ndarray,
    *,
    k: int = DEFAULT_K,
    dims: int | None = DEFAULT_SCORE_DIMS,
    gpu_id: int | None = 0,
    index: str = "exact",
    target_recall: float = TARGET_RECALL,
    seed: int = 0,
) -> ScoreSearch:
    """Build the index over every target and, for an approximate one, tune its breadth to
    ``target_recall`` (module docstring).

    Args:
        targets: ``(N, K)`` transported targets, any float dtype; may be a ``np.memmap`` (read in
            chunks; host memory is ``O(N * dims)`` float32 for the index).
        k: neighbours per sample (clamped to N - 1).
        dims: leading components to use (None or 0: all K).
        gpu_id: put the index on this GPU when faiss sees one (not ``hnsw``); None: the CPU.
        index: one of :data:`SCORE_INDEXES` (:func:`resolve_score_index`).
        target_recall: recall@k to reach on :data:`RECALL_QUERIES` sampled queries.
        seed: seeds the IVF training sample, the k-means and the recall queries.

    Raises:
        RelaError: fewer than two samples, k < 1, an unknown index, or a target recall outside (0, 1].
    """
    n, total_dims = targets.shape
    if n < 2:
        raise RelaError(f"subset scores need at least 2 samples, got {n}")
    if k < 1:
        raise RelaError(f"--score-k must be at least 1, got {k}")
    if not 0.0 < target_recall <= 1.0:
        raise RelaError(f"the target recall must be in (0, 1], got {target_recall}")
    dims = total_dims if not dims else min(dims, total_dims)
    k = min(k, n - 1)
    gpu = gpu_id is not None and faiss_sees_gpu()
    kind = resolve_score_index(index, n, gpu)
    faiss_index, settings = _build_index(kind, targets, dims, gpu_id, SEARCH_CHUNK_ROWS, seed)
    device = "gpu" if gpu and kind != "hnsw" else "cpu"
    if kind != "exact":
        breadth, last = _breadth_range(kind, settings)
        rows = np.sort(np.random.default_rng([seed, 1]).choice(n, size=min(RECALL_QUERIES, n), replace=False))
        exact = exact_neighbours(targets, rows, dims, k, SEARCH_CHUNK_ROWS)[1]
        queries = _normalised(targets[rows, :dims])
        previous_lost = len(rows) + 1
        while True:  # widen the search until it finds target_recall of the exact neighbours and no more lost queries
            _set_breadth(faiss_index, kind, breadth, device == "gpu")
            per_query = recall_per_query(_without_self(*faiss_index.search(queries, k + 1), rows, k)[1], exact)
            recall, lost = float(per_query.mean()), int(np.sum(per_query < LOST_QUERY_RECALL))
            logger.info(
                "scores: %s search with %s %d: recall@%d %.4f on %d queries, %d lost",
                kind,
                "nprobe" if kind == "ivf" else "efSearch",
                breadth,
                k,
                recall,
                len(rows),
                lost,
            )
            # Stop at the target with no lost query, or with as many lost as one step narrower (widening
            # does not reach them: their neighbours sit in lists the quantiser does not return), or at the cap.
            if (recall >= target_recall and (lost == 0 or lost >= previous_lost)) or breadth >= last:
                break
            previous_lost = lost
            breadth = min(2 * breadth, last)
        settings.update(
            {
                "nprobe" if kind == "ivf" else "ef_search": breadth,
                "recall_at_k": round(recall, 4),
                "lost_queries": lost,
                "recall_k": k,
                "recall_queries": int(len(rows)),
                "target_recall": target_recall,
            }
        )
    return ScoreSearch(faiss_index, kind, k, dims, device, settings)


@dataclass
class RowScores:
    """Scores of rows ``[start, stop)`` (arrays of length ``stop - start``; formulas in the module
    docstring): float32 ``knn_density`` and ``nn_similarity``, int64 ``nn_index``, and how many of
    the rows were searched exactly after their approximate search missed (``searched_exactly``)."""

    start: int
    stop: int
    knn_density: np.ndarray
    nn_similarity: np.ndarray
    nn_index: np.ndarray
    searched_exactly: int = 0


def score_rows(search: ScoreSearch, targets: np.ndarray, start: int = 0, stop: int | None = None) -> RowScores:
    """Score samples ``[start, stop)`` against every target with ``search``.

    Queries go to faiss in blocks of :attr:`ScoreSearch.rows_per_call` rows from ``start``: a
    caller that splits the rows at multiples of it (as ranks do) searches the blocks one call over
    all rows would. A sample whose approximate search did not return the sample itself (cosine 1),
    or returned fewer than k others, is searched exactly at the end (one pass over the set per
    :data:`SEARCH_CHUNK_ROWS` such samples).

    Args:
        targets: the ``(N, K)`` targets the index was built from.

    Returns:
        :class:`RowScores` of the rows.
    """
    n, k, dims = targets.shape[0], search.k, search.dims
    stop = n if stop is None else stop
    size = stop - start
    density = np.empty(size, dtype=np.float32)
    nn_similarity = np.empty(size, dtype=np.float32)
    nn_index = np.empty(size, dtype=np.int64)
    lost_rows: list[np.ndarray] = []
    step = search.rows_per_call
    for first in range(start, stop, step):
        last = min(stop, first + step)
        own = np.arange(first, last)
        queries = _normalised_rows(targets, first, last, dims)
        found_s, found_i = _grouped_search(search.index, queries, k + 1) if search.grouped else search.index.search(queries, k + 1)
        similarities, neighbours = _without_self(found_s, found_i, own, k)
        if search.kind != "exact":
            # A search that did not find the sample itself (cosine 1) was trapped away from its
            # neighbourhood, and one that found fewer than k others ran short: searched exactly below.
            lost_rows.append(first + np.flatnonzero(~(found_i == own[:, None]).any(axis=1) | (neighbours < 0).any(axis=1)))
        density[first - start : last - start] = similarities.mean(axis=1)
        nn_similarity[first - start : last - start] = similarities[:, 0]
        nn_index[first - start : last - start] = neighbours[:, 0]
    lost = np.concatenate(lost_rows) if lost_rows else np.empty(0, dtype=np.int64)
    for first in range(0, len(lost), SEARCH_CHUNK_ROWS):
        rows = lost[first : first + SEARCH_CHUNK_ROWS]
        similarities, neighbours = exact_neighbours(targets, rows, dims, k, SEARCH_CHUNK_ROWS)
        local = rows - start
        density[local], nn_similarity[local], nn_index[local] = similarities.mean(axis=1), similarities[:, 0], neighbours[:, 0]
    if len(lost):
        logger.info("scores: %d samples whose approximate search missed them were searched exactly", len(lost))
    return RowScores(start, stop, density, nn_similarity, nn_index, int(len(lost)))


def knn_scores(
    targets: np.ndarray,
    *,
    k: int = DEFAULT_K,
    dims: int | None = DEFAULT_SCORE_DIMS,
    use_gpu: bool = True,
    index: str = "exact",
    target_recall: float = TARGET_RECALL,
    seed: int = 0,
) -> SubsetScores:
    """Score every sample by its neighbourhood in the transported space, in one process
    (:func:`build_score_search`, then :func:`score_rows` over all rows).

    Args:
        targets: ``(N, K)`` transported targets, any float dtype; may be a ``np.memmap``
            (host memory is ``O(N * dims)`` float32 for the index).
        k: neighbours per sample for ``knn_density`` (clamped to N - 1).
        dims: leading components to use (None or 0: all K).
        use_gpu: put the index on GPU 0 when faiss sees a GPU (not ``hnsw``).
        index: one of :data:`SCORE_INDEXES` (module docstring; :func:`resolve_score_index`).
        target_recall: recall@k the approximate indexes are tuned to reach on
            :data:`RECALL_QUERIES` sampled queries.
        seed: seeds the IVF training sample and the recall queries.

    Returns:
        :class:`SubsetScores`; ``index`` records the search, with the measured recall and the
        count of samples searched exactly for an approximate index.

    Raises:
        RelaError: fewer than two samples, k < 1, an unknown index, or a target recall outside (0, 1].
    """
    search = build_score_search(targets, k=k, dims=dims, gpu_id=0 if use_gpu else None, index=index, target_recall=target_recall, seed=seed)
    scored = score_rows(search, targets)
    settings = dict(search.settings)
    if search.kind != "exact":
        settings["searched_exactly"] = scored.searched_exactly
    return SubsetScores(scored.knn_density, scored.nn_similarity, scored.nn_index, k=search.k, dims=search.dims, device=search.device, index=settings)
