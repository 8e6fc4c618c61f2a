"""Dynamic data subsets: sizes, freshness per epoch, determinism and the score-driven rules."""

from __future__ import annotations

import numpy as np
import pytest

from rela_pipeline.errors import RelaError
from rela_pipeline.fileio import load_npz
from rela_pipeline.subsets import SubsetSampler


def test_random_subsets_have_the_right_size_and_change_every_epoch():
    sampler = SubsetSampler(1000, 0.2, "random", seed=3)
    subsets = [sampler.indices(epoch) for epoch in range(5)]
    for subset in subsets:
        assert len(subset) == 200 == len(np.unique(subset))
        assert subset.min() >= 0 and subset.max() < 1000
    assert all(not np.array_equal(subsets[0], other) for other in subsets[1:])
    np.testing.assert_array_equal(SubsetSampler(1000, 0.2, "random", seed=3).indices(2), subsets[2])  # resumable
    assert not np.array_equal(SubsetSampler(1000, 0.2, "random", seed=4).indices(2), subsets[2])
    assert sampler.mask(1).sum() == 200 and np.array_equal(np.flatnonzero(sampler.mask(1)), subsets[1])
    # Over many epochs every sample is drawn about ratio * epochs times.
    counts = np.bincount(np.concatenate([sampler.indices(e) for e in range(200)]), minlength=1000)
    assert abs(counts.mean() - 40) < 1e-9 and counts.min() > 15


def test_full_ratio_is_every_sample():
    np.testing.assert_array_equal(SubsetSampler(50, 1.0).indices(7), np.arange(50))


def test_density_rule_draws_sparse_samples_about_twice_as_often_as_dense_ones():
    density = np.linspace(0.0, 1.0, 2000)  # sample i has density rank i
    sampler = SubsetSampler(2000, 0.25, "density", {"knn_density": density}, seed=0)
    counts = np.bincount(np.concatenate([sampler.indices(e) for e in range(400)]), minlength=2000)
    sparse, dense = counts[:200].mean(), counts[-200:].mean()
    assert 1.6 < sparse / dense < 2.4
    assert len(sampler.indices(0)) == 500 == len(np.unique(sampler.indices(0)))


def test_dedup_rule_keeps_one_of_each_duplicate_pair(shard_set):
    out, _ = shard_set
    scores = load_npz(out / "scores.npz")
    n = len(scores["nn_index"])
    similarity = scores["nn_similarity"].copy()
    neighbour = scores["nn_index"].copy()
    # Make samples 0/1 and 5/9 exact duplicates of each other.
    similarity[[0, 1, 5, 9]] = 1.0
    neighbour[[0, 1, 5, 9]] = [1, 0, 9, 5]
    sampler = SubsetSampler(n, 0.5, "dedup", {"nn_similarity": similarity, "nn_index": neighbour}, dedup_threshold=0.999)
    assert 0 in sampler.pool and 1 not in sampler.pool and 5 in sampler.pool and 9 not in sampler.pool
    for epoch in range(10):
        chosen = sampler.indices(epoch)
        assert len(chosen) == round(0.5 * n) and not {1, 9} & set(chosen.tolist())
    everything = SubsetSampler(n, 0.995, "dedup", {"nn_similarity": similarity, "nn_index": neighbour}, dedup_threshold=0.999)
    assert len(everything.indices(0)) == round(0.995 * n)  # topped up from the left-out samples


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.01])
def test_ratio_outside_the_unit_interval_is_refused(ratio):
    with pytest.raises(RelaError, match="data-ratio"):
        SubsetSampler(100, ratio)


def test_empty_subsets_and_missing_scores_are_refused():
    with pytest.raises(RelaError, match="empty subset"):
        SubsetSampler(100, 0.1, min_size=32)
    with pytest.raises(RelaError, match="knn_density"):
        SubsetSampler(100, 0.5, "density", {})
    with pytest.raises(RelaError, match="unknown subset rule"):
        SubsetSampler(100, 0.5, "hardest")
