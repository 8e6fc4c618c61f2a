"""faiss subset scores against brute-force k-NN in numpy."""

from __future__ import annotations

import numpy as np
import pytest

from rela_pipeline import scores as scores_module
from rela_pipeline.errors import RelaError
from rela_pipeline.fileio import load_npz
from rela_pipeline.scores import (
    EXACT_MAX_SAMPLES,
    TARGET_RECALL,
    ScoreSearch,
    build_score_search,
    exact_neighbours,
    knn_scores,
    resolve_score_index,
    score_rows,
)
from rela_pipeline.subsets import SubsetSampler
from rela_pipeline.transport import LinearTransport


def brute_force(targets: np.ndarray, k: int, dims: int):
    z = targets[:, :dims].astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    similarity = z @ z.T
    np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(similarity, order, axis=1)
    return top.mean(1), top[:, 0], order[:, 0]


def test_scores_match_brute_force_on_real_targets(shard_set):
    out, _ = shard_set
    transported = LinearTransport.load(out / "transport.npz").apply(np.load(out / "embeddings.npy")).numpy()
    scores = knn_scores(transported, k=7, dims=32, use_gpu=False)
    density, nn_similarity, nn_index = brute_force(transported, 7, 32)
    np.testing.assert_allclose(scores.knn_density, density, atol=1e-5)
    np.testing.assert_allclose(scores.nn_similarity, nn_similarity, atol=1e-5)
    assert np.mean(scores.nn_index == nn_index) > 0.99  # ties in float32 may reorder equal neighbours


def test_stored_scores_are_those_of_the_stored_targets(shard_set):
    out, manifest = shard_set
    transported = LinearTransport.load(out / "transport.npz").apply(np.load(out / "embeddings.npy")).numpy()
    stored = load_npz(out / "scores.npz")
    density, nn_similarity, _ = brute_force(transported.astype(np.float16).astype(np.float32), manifest["scores"]["k"], manifest["scores"]["dims"])
    np.testing.assert_allclose(stored["knn_density"], density, atol=2e-3)
    np.testing.assert_allclose(stored["nn_similarity"], nn_similarity, atol=2e-3)


def test_exact_duplicates_score_one_and_point_at_each_other():
    rng = np.random.default_rng(0)
    targets = rng.standard_normal((50, 16)).astype(np.float32)
    targets[7] = targets[3]
    scores = knn_scores(targets, k=3, dims=0, use_gpu=False)
    assert scores.nn_similarity[3] > 0.9999 and scores.nn_similarity[7] > 0.9999
    assert scores.nn_index[3] == 7 and scores.nn_index[7] == 3
    others = np.delete(np.arange(50), [3, 7])
    assert np.all(scores.nn_similarity[others] < 0.99)
    assert np.all(scores.nn_index != np.arange(50))  # never its own neighbour


def clustered(n: int, dims: int, clusters: int, seed: int) -> np.ndarray:
    """Gaussian clusters in ``dims`` dimensions (centres spread 1, within-cluster std 0.35): the
    structure of transported targets of a labelled set, at a size where exact search is cheap."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dims)).astype(np.float32)
    return (centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dims))).astype(np.float32)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_search_reaches_the_recall_it_reports(kind):
    targets = clustered(20_000, 32, 200, seed=1)
    scores = knn_scores(targets, k=10, dims=0, use_gpu=False, index=kind, seed=0)
    assert scores.index["kind"] == kind and scores.index["recall_at_k"] >= TARGET_RECALL
    # An independent check on other queries: the scores' own neighbour lists against exact search.
    rows = np.random.default_rng(7).choice(len(targets), 300, replace=False)
    exact_similarity, exact_index = exact_neighbours(targets, rows, 32, 10)
    assert np.mean(scores.nn_index[rows] == exact_index[:, 0]) >= 0.9
    np.testing.assert_allclose(scores.knn_density[rows], exact_similarity.mean(axis=1), atol=0.01)
    assert np.all(scores.nn_index != np.arange(len(targets)))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_planted_duplicates_are_found_by_approximate_search_and_deduplicated(kind):
    targets = clustered(20_000, 32, 200, seed=2)
    rng = np.random.default_rng(3)
    originals = rng.choice(20_000, 100, replace=False)
    copies = rng.choice(np.setdiff1d(np.arange(20_000), originals), 100, replace=False)
    targets[copies[:50]] = targets[originals[:50]]  # exact duplicates
    targets[copies[50:]] = targets[originals[50:]] + 0.01 * rng.standard_normal((50, 32)).astype(np.float32)  # near duplicates
    scores = knn_scores(targets, k=10, dims=0, use_gpu=False, index=kind, seed=0)
    assert np.all(scores.nn_index[copies[:50]] == originals[:50]) and np.all(scores.nn_index[originals[:50]] == copies[:50])
    assert np.all(scores.nn_similarity[copies] > 0.999)
    kept = np.zeros(len(targets), dtype=bool)
    kept[SubsetSampler(len(targets), 0.5, "dedup", {"nn_similarity": scores.nn_similarity, "nn_index": scores.nn_index}, dedup_threshold=0.999).pool] = True
    assert np.all(kept[originals] != kept[copies])  # exactly one of each planted pair stays in the dedup pool


def test_auto_searches_exactly_up_to_its_limit():
    assert resolve_score_index("auto", EXACT_MAX_SAMPLES, gpu=False) == "exact"
    assert resolve_score_index("auto", EXACT_MAX_SAMPLES + 1, gpu=False) == "ivf"
    assert resolve_score_index("auto", EXACT_MAX_SAMPLES + 1, gpu=True) == "exact"
    assert resolve_score_index("hnsw", 10, gpu=False) == "hnsw"
    with pytest.raises(RelaError, match="--score-index"):
        resolve_score_index("lsh", 10, gpu=False)


def test_embed_records_the_approximate_search_and_its_recall_in_the_manifest(tmp_path):
    from conftest import TRAIN_DIR, small_embed_config

    from rela_pipeline.shards.manifest import verify_shard_set
    from rela_pipeline.stages.embed import run_embed

    manifest = run_embed(small_embed_config(TRAIN_DIR, tmp_path / "out", score_index="ivf"))
    search = manifest["scores"]["search"]
    assert search["kind"] == "ivf" and search["recall_at_k"] >= TARGET_RECALL and search["recall_k"] == manifest["scores"]["k"]
    assert manifest["scores"]["device"] == "cpu" and manifest["settings"]["score_index"] == "ivf"
    assert verify_shard_set(tmp_path / "out").ok


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_a_saved_search_scores_row_ranges_as_one_search_of_every_row(kind, tmp_path, monkeypatch):
    """What ranks do: rank 0 builds and saves the search, each rank loads it and scores its rows,
    cut at multiples of ``rows_per_call``; the parts put together are the one-process scores, bit
    for bit (exact search cut elsewhere may differ in the last bit: BLAS blocks differently)."""
    monkeypatch.setattr(scores_module, "SEARCH_CHUNK_ROWS", 2048)  # three query blocks
    monkeypatch.setattr(scores_module, "GROUPED_SEARCH_ENTRIES", 1)  # (the grouped IVF pass's blocks too)
    targets = clustered(6000, 32, 40, seed=5)
    search = build_score_search(targets, k=10, dims=0, gpu_id=None, index=kind, seed=0)
    whole = score_rows(search, targets)
    search.save(tmp_path / "index.faiss")
    loaded = ScoreSearch.load(tmp_path / "index.faiss")
    assert (loaded.kind, loaded.k, loaded.dims, loaded.settings) == (search.kind, search.k, search.dims, search.settings)
    assert loaded.rows_per_call == 2048
    bounds = [0, 2048, 4096, len(targets)]
    parts = [score_rows(loaded, targets, a, b) for a, b in zip(bounds, bounds[1:])]
    for field in ("knn_density", "nn_similarity", "nn_index"):
        assert np.array_equal(np.concatenate([getattr(p, field) for p in parts]), getattr(whole, field)), field
    assert sum(p.searched_exactly for p in parts) == whole.searched_exactly


def test_the_grouped_pass_finds_what_faiss_search_finds():
    """The CPU full pass (queries grouped by list, one BLAS product per list into the running
    heaps) probes the same lists as ``index.search``, so it returns the same neighbours and
    similarities (up to the last bits of another BLAS, which may swap near-ties)."""
    targets = clustered(20_000, 32, 40, seed=7)
    search = build_score_search(targets, k=10, dims=0, gpu_id=None, index="ivf", seed=0)
    assert search.grouped and search.settings["nprobe"] > 1
    queries = scores_module._normalised(targets[:5000])
    plain_s, plain_i = search.index.search(queries, 11)
    grouped_s, grouped_i = scores_module._grouped_search(search.index, queries, 11)
    assert np.abs(grouped_s - plain_s).max() < 1e-5
    assert np.mean(grouped_i == plain_i) > 0.999 and np.array_equal(grouped_i[:, 0], np.arange(5000))


def test_many_lists_are_trained_by_two_level_k_means_and_keep_the_recall(monkeypatch):
    """Above TWO_LEVEL_TRAINING_FROM lists the quantiser comes from faiss's two-level clustering
    (the 10M-sample setting, here at 1,024 lists on 60,000 samples)."""
    monkeypatch.setattr(scores_module, "TWO_LEVEL_TRAINING_FROM", 256)
    targets = clustered(60_000, 32, 50, seed=6)
    scores = knn_scores(targets, k=10, dims=0, use_gpu=False, index="ivf", seed=0)
    assert scores.index["training"] == "two-level k-means" and scores.index["nlist"] == 1024
    assert scores.index["recall_at_k"] >= TARGET_RECALL and scores.index["lost_queries"] == 0
    rows = np.random.default_rng(1).choice(len(targets), 300, replace=False)
    exact_s, _ = exact_neighbours(targets, rows, 32, 10)
    assert np.abs(scores.knn_density[rows] - exact_s.mean(axis=1)).mean() < 0.01
