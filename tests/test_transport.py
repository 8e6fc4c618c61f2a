"""Linear transport against an independent PCA (scikit-learn) on real prior embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from rela_pipeline.fileio import sha256_file
from rela_pipeline.transport import LinearTransport, MomentAccumulator


@pytest.fixture(scope="module")
def embeddings(shard_set) -> np.ndarray:
    out, _ = shard_set
    return np.load(out / "embeddings.npy").astype(np.float64)


def fit(x: np.ndarray, batch: int = 37) -> LinearTransport:
    moments = MomentAccumulator(x.shape[1])
    for start in range(0, len(x), batch):
        moments.update(torch.from_numpy(x[start : start + batch]))
    return LinearTransport.fit(moments)


def test_streamed_moments_equal_whole_matrix_statistics(embeddings):
    moments = MomentAccumulator(embeddings.shape[1])
    for start in range(0, len(embeddings), 50):
        moments.update(torch.from_numpy(embeddings[start : start + 50]))
    mean, covariance = moments.mean_and_covariance()
    np.testing.assert_allclose(mean, embeddings.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(covariance, np.cov(embeddings, rowvar=False, ddof=0), rtol=1e-8, atol=1e-12)


def test_components_and_variances_match_sklearn_pca(embeddings):
    n = len(embeddings)
    transport = fit(embeddings)
    reference = PCA(n_components=transport.output_dim, svd_solver="full").fit(embeddings)
    # sklearn reports unbiased (ddof=1) variances; ours are population (ddof=0) variances.
    np.testing.assert_allclose(transport.explained_variance * n / (n - 1), reference.explained_variance_, rtol=1e-6)
    top = 50  # leading components have well-separated eigenvalues, so directions are unique up to sign
    alignment = np.abs(np.sum(transport.components[:top] * reference.components_[:top], axis=1))
    np.testing.assert_allclose(alignment, 1.0, atol=1e-6)


def test_targets_are_whitened_pca_up_to_sign(embeddings):
    n = len(embeddings)
    transport = fit(embeddings)
    targets = transport.apply(torch.from_numpy(embeddings)).double().numpy()
    np.testing.assert_allclose(targets.mean(0), 0.0, atol=1e-3)
    np.testing.assert_allclose(targets.std(0), 1.0, rtol=1e-3)
    reference = PCA(n_components=20, whiten=True, svd_solver="full").fit_transform(embeddings) * np.sqrt(n / (n - 1))
    signs = np.sign(np.sum(targets[:, :20] * reference, axis=0))
    np.testing.assert_allclose(targets[:, :20], reference * signs, atol=2e-3)


def test_rank_deficient_data_keeps_at_most_n_minus_one_components(embeddings):
    transport = fit(embeddings[:40])
    assert transport.output_dim <= 39
    assert np.all(transport.scale > 0)


def test_component_signs_are_deterministic_and_saved_file_is_reproducible(embeddings, tmp_path):
    first, second = fit(embeddings, batch=64), fit(embeddings, batch=17)
    np.testing.assert_allclose(first.components, second.components, atol=1e-8)
    largest = np.abs(first.components).argmax(axis=1)
    assert np.all(first.components[np.arange(first.output_dim), largest] > 0)
    first.save(tmp_path / "a.npz")
    first.save(tmp_path / "b.npz")
    assert sha256_file(tmp_path / "a.npz") == sha256_file(tmp_path / "b.npz")
    loaded = LinearTransport.load(tmp_path / "a.npz")
    np.testing.assert_array_equal(loaded.components, first.components)
    assert loaded.num_samples == len(embeddings)


def test_masked_rows_contribute_nothing(embeddings):
    mask = np.zeros(len(embeddings), dtype=bool)
    mask[::3] = True
    masked = MomentAccumulator(embeddings.shape[1])
    for start in range(0, len(embeddings), 40):
        block = torch.from_numpy(embeddings[start : start + 40])
        masked.update(block, torch.from_numpy(mask[start : start + 40]))
    selected = MomentAccumulator(embeddings.shape[1])
    selected.update(torch.from_numpy(embeddings[mask]))
    assert masked.count == selected.count == mask.sum()
    for a, b in zip(masked.mean_and_covariance(), selected.mean_and_covariance()):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
