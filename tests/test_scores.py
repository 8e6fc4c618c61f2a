"""faiss subset scores against brute-force k-NN in numpy."""

from __future__ import annotations

import numpy as np

from rela_pipeline.fileio import load_npz
from rela_pipeline.scores import knn_scores
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
