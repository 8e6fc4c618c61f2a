"""Each rank's share of an epoch (no process group needed: the split is a pure function of the
rank, the world size and the run's seeds)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from rela_pipeline.batched_views import batched_byol_views
from rela_pipeline.errors import RelaError
from rela_pipeline.shards.batches import ShardBatches
from rela_pipeline.shards.plan import rank_batches, shard_spans, written_shard_contents
from rela_pipeline.shards.reader import open_shard_set


def _batches(shards, world_size: int, rank: int, data_path: str, **options) -> ShardBatches:
    settings = dict(
        batch_size=32, image_size=16, data_ratio=0.8, seed=3, device="cpu", data_path=data_path, num_workers=0, shuffle_buffer=20, verify=False, progress=False
    )
    settings.update(options)
    return ShardBatches(shards, rank=rank, world_size=world_size, **settings)


@pytest.mark.parametrize("layout", ["interleaved", "contiguous"])
def test_rank_batches_are_disjoint_equal_and_cover_the_one_process_epoch(layout):
    order = np.random.default_rng(0).permutation(1000)[:203]  # 203 = 6 batches of 32 + 11 dropped
    parts = [rank_batches(order, 32, rank, 4, layout) for rank in range(4)]
    assert all(p.shape == (6, 8) for p in parts)
    together = np.concatenate([p.ravel() for p in parts])
    assert len(np.unique(together)) == 192
    assert set(together) == set(order[:192])  # the one-process epoch less its remainder of 11
    if layout == "interleaved":  # the global batches are the one-process run's, row for row
        assert np.array_equal(np.concatenate(parts, axis=1), order[:192].reshape(6, 32))
    with pytest.raises(ValueError):
        rank_batches(order, 30, 0, 4, layout)


def test_shard_spans_cut_an_order_at_shard_boundaries():
    visit = [(7, 5), (2, 0), (4, 6), (9, 3)]  # (shard id, samples of the subset in it)
    assert shard_spans(visit, 0, 14) == [(7, 0, 5), (4, 0, 6), (9, 0, 3)]
    assert shard_spans(visit, 3, 9) == [(7, 3, 5), (4, 0, 4)]
    assert shard_spans(visit, 9, 14) == [(4, 4, 6), (9, 0, 3)]


def test_manifest_shard_order_predicts_what_each_shard_holds(shard_set):
    out, manifest = shard_set
    source = open_shard_set(out)
    contents = source.written_contents()
    import webdataset as wds

    for shard_id, url in zip(source.shard_ids, source.shard_urls):
        keys = [int(s["__key__"]) for s in wds.tarfile_to_samples()([{"url": url}])]
        assert keys == contents[shard_id].tolist()
    with pytest.raises(ValueError):
        written_shard_contents(10, 0, [4, 4])


@pytest.mark.parametrize("data_path", ["memory", "stream"])
def test_ranks_split_every_epoch_with_equal_steps(shard_set, data_path):
    out, _ = shard_set
    whole = _batches(out, 1, 0, data_path)
    ranks = [_batches(out, 2, r, data_path) for r in range(2)]
    for epoch in range(2):
        one = [b.index.tolist() for b in whole.epoch(epoch)]
        parts = [[b for b in r.epoch(epoch)] for r in ranks]
        assert len(parts[0]) == len(parts[1]) == len(one) == whole.steps_per_epoch
        assert all(b.index.shape == (16,) and b.images.shape == (16, 3, 16, 16) for p in parts for b in p)
        seen = [set(i for b in p for i in b.index.tolist()) for p in parts]
        assert not seen[0] & seen[1]
        assert seen[0] | seen[1] == set(i for batch in one for i in batch)
        if data_path == "memory":  # interleaved: rank 0 holds the first half of every global batch
            for k, batch in enumerate(one):
                assert parts[0][k].index.tolist() + parts[1][k].index.tolist() == batch


def test_a_ranks_views_are_its_rows_of_the_global_batchs_views(shard_set):
    out, _ = shard_set
    views = batched_byol_views(16)
    whole = next(iter(_batches(out, 1, 0, "memory").epoch(0)))
    parts = [next(iter(_batches(out, 2, r, "memory").epoch(0))) for r in range(2)]
    full = whole.views(views)
    for rank, part in enumerate(parts):
        assert part.is_part and part.offset == 16 * rank
        for made, reference in zip(part.views(views), full):
            assert torch.equal(made, reference[16 * rank : 16 * (rank + 1)])


def test_a_custom_transform_gets_a_different_seed_on_each_rank(shard_set):
    out, _ = shard_set
    draws = []
    for rank in range(2):
        part = next(iter(_batches(out, 2, rank, "memory").epoch(0)))
        draws.append(part.views(lambda images, g: [torch.rand(images.shape, generator=g)] * 2)[0])
    assert not torch.equal(draws[0], draws[1])


def test_bad_splits_are_refused(shard_set, tmp_path):
    out, _ = shard_set
    with pytest.raises(RelaError, match="does not split evenly over 3"):
        _batches(out, 3, 0, "memory")
    with pytest.raises(RelaError, match="outside a world"):
        _batches(out, 2, 2, "memory")
    copy = tmp_path / "no-order"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["shard_order"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RelaError, match="shard_order"):
        _batches(copy, 2, 0, "stream")


def test_a_shard_that_does_not_hold_what_the_manifest_says_is_caught(shard_set, tmp_path):
    out, _ = shard_set
    copy = tmp_path / "reordered"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shard_order"]["seed"] += 1  # the plan no longer matches the shards
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RelaError, match="other samples than planned"):
        list(_batches(copy, 2, 1, "stream").epoch(0))
