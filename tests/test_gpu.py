"""The CUDA paths, on a machine with a CUDA device (marked ``gpu``: skipped without one).

Each compares with the same computation on the CPU, on the real fixture."""

from __future__ import annotations

import numpy as np
import pytest

from rela_pipeline.scores import ScoreSearch, build_score_search, faiss_sees_gpu, score_rows
from rela_pipeline.shards.manifest import verify_shard_set
from rela_pipeline.stages.embed import run_embed
from rela_pipeline.stages.evaluate import EvalConfig, run_eval
from rela_pipeline.stages.train import TrainConfig, run_train
from tests.conftest import TEST_DIR, TRAIN_DIR, small_embed_config

pytestmark = pytest.mark.gpu


def test_embed_on_cuda_verifies_and_matches_the_cpu_targets(shard_set, tmp_path):
    _, cpu_manifest = shard_set
    manifest = run_embed(small_embed_config(TRAIN_DIR, tmp_path / "out", device="cuda", keep_embeddings=True))
    assert manifest["resolved"] == {"device": "cuda", "precision": "fp32"}
    assert verify_shard_set(tmp_path / "out").ok
    cpu = np.load(shard_set[0] / "embeddings.npy")
    gpu = np.load(tmp_path / "out" / "embeddings.npy")
    assert gpu.shape == cpu.shape
    # fp32 on both; cuDNN (TF32 convolutions by default on Ampere and later) and the CPU's kernels round differently.
    assert np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu) < 1e-2
    assert manifest["samples"] == cpu_manifest["samples"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_memory_path_training_run_on_cuda(shard_set, tmp_path, precision):
    shards, _ = shard_set
    summary = run_train(
        TrainConfig(
            shards=str(shards),
            out_dir=tmp_path / "run",
            epochs=2,
            batch_size=32,
            image_size=32,
            data_ratio=0.8,
            device="cuda",
            precision=precision,
            data_path="memory",
            num_workers=0,
            progress=False,
            log_every=2,
        )
    )
    assert summary["resolved"]["device"].startswith("cuda") and summary["resolved"]["precision"] == precision
    assert summary["resolved"]["data_path"] == "memory"
    assert summary["budget"]["steps"] == 2 * (240 // 32)
    first, last = summary["rela_loss"]["first_interval"], summary["rela_loss"]["last_interval"]
    assert np.isfinite([first, last]).all() and last < first
    assert summary["final"]["images_per_s"] > 0


def test_eval_on_cuda_agrees_with_the_cpu(tmp_path, shard_set):
    shards, _ = shard_set
    run_train(TrainConfig(shards=str(shards), out_dir=tmp_path / "run", epochs=1, batch_size=32, device="cpu", num_workers=0, progress=False))
    results = {
        device: run_eval(
            EvalConfig(
                checkpoint=tmp_path / "run" / "backbone.pt",
                train_dir=TRAIN_DIR,
                test_dir=TEST_DIR,
                device=device,
                num_workers=0,
                progress=False,
                probe_epochs=5,
                knn_k=20,
            )
        )
        for device in ("cpu", "cuda")
    }
    # Same features up to kernel rounding: the k-NN votes agree on nearly every test image.
    assert abs(results["cuda"]["knn"]["top1"] - results["cpu"]["knn"]["top1"]) <= 0.02


@pytest.mark.skipif(not faiss_sees_gpu(), reason="this faiss build sees no GPU")
@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_a_faiss_gpu_index_is_built_saved_and_loaded(tmp_path, kind):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((20, 16)).astype(np.float32)
    targets = (centres[rng.integers(0, 20, 5000)] + 0.1 * rng.standard_normal((5000, 16))).astype(np.float32)
    search = build_score_search(targets, k=10, dims=16, gpu_id=0, index=kind)
    assert search.device == "gpu"
    search.save(tmp_path / "index.faiss")
    loaded = ScoreSearch.load(tmp_path / "index.faiss", gpu_id=0)
    before, after = score_rows(search, targets), score_rows(loaded, targets)
    assert np.array_equal(before.nn_index, after.nn_index)
    assert np.allclose(before.knn_density, after.knn_density, atol=1e-6)
    cpu = score_rows(build_score_search(targets, k=10, dims=16, gpu_id=None, index="exact"), targets)
    assert np.mean(before.nn_index == cpu.nn_index) > 0.95
