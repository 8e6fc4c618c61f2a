"""The device data path: the epoch plan, the memory and stream paths, ShardBatches."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from rela_pipeline.errors import RelaError
from rela_pipeline.shards.batches import ShardBatches, decoded_bytes_per_sample
from rela_pipeline.shards.plan import buffer_shuffle, epoch_order
from rela_pipeline.subsets import SubsetSampler
from tests.conftest import assert_one_line_error, run_cli


def batches_of(shards, **overrides) -> ShardBatches:
    settings = dict(batch_size=32, image_size=32, data_ratio=0.5, seed=3, device="cpu", num_workers=0, progress=False, verify=False)
    settings.update(overrides)
    return ShardBatches(str(shards), **settings)


def test_buffer_shuffle_permutes_index_arrays_and_sample_streams_identically():
    items = list(range(1000))
    for size in (1, 7, 100, 5000):
        a = list(buffer_shuffle(items, size, np.random.default_rng(5)))
        b = [s["i"] for s in buffer_shuffle(({"i": i} for i in items), size, np.random.default_rng(5))]
        assert sorted(a) == items and a == b
        if size > 1:
            assert a != items  # it does shuffle
    assert list(buffer_shuffle(items, 1, np.random.default_rng(0))) == items  # a buffer of one keeps the order
    # A small buffer only moves items forward by a bounded amount of delay: item i leaves after
    # at least i - size items were read, so it can appear no earlier than position i - size.
    positions = {v: p for p, v in enumerate(buffer_shuffle(items, 10, np.random.default_rng(1)))}
    assert all(positions[i] >= i - 10 for i in items)


def test_epoch_order_is_the_subset_in_shards_visited_in_a_seeded_order():
    contents = {0: np.arange(0, 50), 1: np.arange(50, 100), 2: np.arange(100, 130)}
    mask = np.zeros(130, dtype=bool)
    mask[::3] = True
    order = epoch_order(contents, mask, seed=1, epoch=0, buffer_size=8)
    assert sorted(order.tolist()) == np.flatnonzero(mask).tolist()
    # Samples of one shard stay together: the order is three runs, one per shard.
    shard_of = np.searchsorted([50, 100, 130], order, side="right")
    assert (np.diff(shard_of) != 0).sum() == 2
    assert not np.array_equal(order, epoch_order(contents, mask, seed=1, epoch=1, buffer_size=8))
    np.testing.assert_array_equal(order, epoch_order(contents, mask, seed=1, epoch=0, buffer_size=8))


@pytest.mark.parametrize("workers", [0, 2])
def test_memory_and_stream_paths_give_the_same_batches_for_any_worker_count(shard_set, workers):
    shards, _ = shard_set
    memory = batches_of(shards, data_path="memory", num_workers=workers)
    stream = batches_of(shards, data_path="stream", num_workers=workers)
    single_reader = batches_of(shards, data_path="stream", num_workers=0)
    assert memory.data_path == "memory" and stream.data_path == "stream"
    sampler = SubsetSampler(300, 0.5, seed=3, min_size=32)
    seen = []
    for epoch in (0, 1):
        a, b, c = list(memory.epoch(epoch)), list(stream.epoch(epoch)), list(single_reader.epoch(epoch))
        assert len(a) == len(b) == len(c) == memory.steps_per_epoch == 150 // 32
        for x, y, z in zip(a, b, c):
            for field in ("index", "images", "target", "label"):
                assert torch.equal(getattr(x, field), getattr(y, field)) and torch.equal(getattr(x, field), getattr(z, field)), field
            assert x.seed == y.seed == z.seed and (x.epoch, x.step) == (y.epoch, y.step)
        indices = torch.cat([x.index for x in a]).tolist()
        assert len(set(indices)) == len(indices) == 128  # 4 full batches of 32, no sample twice
        assert set(indices) <= set(sampler.indices(epoch).tolist())
        assert a[0].images.dtype == torch.uint8 and a[0].images.shape == (32, 3, 32, 32)
        assert a[0].target.dtype == torch.float32 and a[0].target.shape == (32, memory.target_dim)
        seen.append(indices)
    assert seen[0] != seen[1]
    assert len({x.seed for x in a}) == len(a)  # every batch has its own view seed


def test_the_store_holds_each_image_resized_from_its_shard_bytes(shard_set):
    shards, manifest = shard_set
    batches = batches_of(shards, data_path="memory", target_dim=16)
    store = batches.store()
    assert store.samples == 300 and store.targets.shape == (300, 16)
    with tarfile.open(shards / manifest["shards"][1]["name"]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        index = int(member.name.split(".")[0])
        image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB").resize((32, 32), Image.BILINEAR)
        target = np.load(io.BytesIO(tar.extractfile(member.name.replace(".png", ".target.npy")).read()))
    expected = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())
    assert torch.equal(store.images[index], expected)
    torch.testing.assert_close(store.targets[index], torch.from_numpy(target[:16].astype(np.float32)))


def test_iterating_the_object_advances_the_epoch_like_a_framework_would(shard_set):
    shards, _ = shard_set
    batches = batches_of(shards, data_path="memory")
    first = [b.index for b in batches]
    second = [b.index for b in batches]
    assert [b.epoch for b in batches] == [2] * len(batches)
    batches.set_epoch(1)
    again = [b.index for b in batches]
    assert all(torch.equal(x, y) for x, y in zip(second, again)) and not torch.equal(first[0], second[0])


def test_auto_picks_memory_when_the_set_fits_the_budget_else_stream(shard_set):
    shards, _ = shard_set
    needed = 300 * decoded_bytes_per_sample(32, 64)
    assert batches_of(shards, target_dim=64, cache_bytes=needed).data_path == "memory"
    assert batches_of(shards, target_dim=64, cache_bytes=needed - 1).data_path == "stream"
    with pytest.raises(RelaError, match=f"needs {needed:,} bytes .* budget is {needed - 1:,} bytes"):
        batches_of(shards, target_dim=64, cache_bytes=needed - 1, data_path="memory")


def test_memory_path_that_does_not_fit_is_one_line_naming_bytes_and_budget(shard_set, tmp_path):
    shards, _ = shard_set
    code, _, err = run_cli("train", "--shards", str(shards), "--out", str(tmp_path / "run"), "--data-path", "memory", "--cache-bytes", "1M", "--device", "cpu")
    assert_one_line_error(code, err, "bytes")
    assert "1,048,576 bytes" in err and not (tmp_path / "run").exists()


def test_the_python_api_names_its_own_parameters_in_errors(shard_set):
    """``ShardBatches`` is called from Python: its errors name ``data_path``, ``cache_bytes`` and
    ``num_workers``, not only the CLI's flags."""
    shards, _ = shard_set
    for settings, name in (
        ({"data_path": "disk"}, "data_path must be one of"),
        ({"cache_bytes": -1}, "cache_bytes must be >= 0"),
        ({"num_workers": -2}, "num_workers must be >= 0"),
        ({"data_path": "memory", "cache_bytes": 10}, "data_path='memory'"),
    ):
        with pytest.raises(RelaError, match=name):
            ShardBatches(str(shards), batch_size=8, device="cpu", verify=False, **settings)
