"""Tests of the eval stage (frozen-feature linear probe and weighted k-NN of a backbone checkpoint)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from rela_pipeline.errors import RelaError
from rela_pipeline.imagefolder import decode_rgb, scan_image_folder
from rela_pipeline.models import build_backbone, save_backbone_checkpoint
from rela_pipeline.priors import Preprocessing
from rela_pipeline.stages.evaluate import (
    EvalConfig,
    eval_preprocessing,
    extract_features,
    knn_accuracy,
    linear_probe_accuracy,
    run_eval,
)
from tests.conftest import TEST_DIR, TRAIN_DIR

PREPROCESSING = Preprocessing(32, 32, resize_mode="squash")


def make_checkpoint(path: Path, seed: int = 0, preprocessing: Preprocessing | None = PREPROCESSING) -> Path:
    """Save a randomly initialised (seeded) convnet as a backbone checkpoint at step 7."""
    torch.manual_seed(seed)
    backbone = build_backbone("convnet")
    save_backbone_checkpoint(path, backbone, {"name": "convnet"}, preprocessing=preprocessing.to_dict() if preprocessing else None, step=7)
    return path


def eval_config(checkpoint: Path, train_dir: Path = TRAIN_DIR, test_dir: Path = TEST_DIR, **overrides) -> EvalConfig:
    """A fast CPU configuration (no worker processes, short probe)."""
    settings = dict(device="cpu", num_workers=0, progress=False, probe_epochs=5)
    settings.update(overrides)
    return EvalConfig(checkpoint=checkpoint, train_dir=train_dir, test_dir=test_dir, **settings)


def copy_classes(src: Path, dst: Path, classes: dict[str, str], per_class: int) -> Path:
    """Copy the first ``per_class`` images of each ``src/<old>`` class to ``dst/<new>``."""
    for old, new in classes.items():
        (dst / new).mkdir(parents=True)
        for image in sorted((src / old).glob("*.png"))[:per_class]:
            shutil.copy(image, dst / new / image.name)
    return dst


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("eval") / "backbone.pt")


@pytest.fixture(scope="module")
def fixture_features(checkpoint) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen features of the real fixture: ``(train_x, train_y, test_x, test_y)``."""
    from rela_pipeline.models import load_backbone_checkpoint

    backbone, _ = load_backbone_checkpoint(checkpoint)
    common = dict(device="cpu", batch_size=128, num_workers=0)
    train = extract_features(backbone, scan_image_folder(TRAIN_DIR), PREPROCESSING, **common)
    test = extract_features(backbone, scan_image_folder(TEST_DIR), PREPROCESSING, **common)
    return (*train, *test)


def clustered(n_per_class: int, num_classes: int, dim: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around fixed random unit centres (same centres for every ``seed``)."""
    centres = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234)), dim=1)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    features = centres[labels] + noise * torch.randn(len(labels), dim, generator=generator)
    order = torch.randperm(len(labels), generator=generator)
    return features[order], labels[order]


def knn_reference(train_x, train_y, test_x, num_classes: int, k: int, t: float) -> np.ndarray:
    """Brute-force weighted k-NN predictions in float64 numpy (Wu et al. 2018 vote)."""
    a = train_x.numpy().astype(np.float64)
    b = test_x.numpy().astype(np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    k = min(k, len(a))
    predictions = []
    for row in b @ a.T:
        nearest = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(num_classes)
        np.add.at(votes, train_y.numpy()[nearest], np.exp(row[nearest] / t))
        predictions.append(int(np.argmax(votes)))
    return np.asarray(predictions)


# ---------------------------------------------------------------- k-NN


@pytest.mark.parametrize("k,temperature,chunk_size", [(1, 0.1, 1024), (7, 0.1, 13), (50, 0.5, 64), (1000, 0.07, 100)])
def test_knn_accuracy_matches_brute_force_reference(k, temperature, chunk_size):
    train_x, train_y = clustered(40, 5, 16, noise=0.9, seed=1)
    test_x, test_y = clustered(30, 5, 16, noise=0.9, seed=2)
    expected = float(np.mean(knn_reference(train_x, train_y, test_x, 5, k, temperature) == test_y.numpy()))
    got = knn_accuracy(train_x, train_y, test_x, test_y, num_classes=5, k=k, temperature=temperature, chunk_size=chunk_size)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.3 < expected < 0.99  # noisy enough that the vote details matter


def test_knn_accuracy_separable_clusters_is_perfect_and_k_is_clipped():
    train_x, train_y = clustered(30, 10, 64, noise=0.05, seed=3)
    test_x, test_y = clustered(20, 10, 64, noise=0.05, seed=4)
    assert knn_accuracy(train_x, train_y, test_x, test_y, num_classes=10) == 1.0  # k=200 of 300
    # k above N (300) is clipped to N rather than failing inside topk.
    assert knn_accuracy(train_x, train_y, test_x, test_y, num_classes=10, k=10_000) == 1.0
    # Scale invariance: the protocol L2-normalises features.
    assert knn_accuracy(train_x * 7.0, train_y, test_x * 0.01, test_y, num_classes=10) == 1.0


def test_knn_accuracy_rejects_bad_inputs():
    x, y = clustered(5, 2, 4, noise=0.1, seed=0)
    with pytest.raises(ValueError, match="feature dimensions"):
        knn_accuracy(x, y, x[:, :3], y, num_classes=2)
    with pytest.raises(ValueError, match="labels must lie"):
        knn_accuracy(x, y + 5, x, y, num_classes=2)


# ---------------------------------------------------------------- linear probe


def test_linear_probe_separable_features_reach_high_accuracy():
    train_x, train_y = clustered(100, 10, 32, noise=0.15, seed=5)
    test_x, test_y = clustered(50, 10, 32, noise=0.15, seed=6)
    rng_state = torch.random.get_rng_state()
    accuracy = linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes=10, epochs=30, lr=1e-2, batch_size=64)
    assert accuracy > 0.95
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # seeded without touching the global RNG
    again = linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes=10, epochs=30, lr=1e-2, batch_size=64)
    assert again == accuracy


def test_linear_probe_shuffled_labels_is_near_chance():
    train_x, train_y = clustered(100, 10, 32, noise=0.15, seed=5)
    test_x, test_y = clustered(100, 10, 32, noise=0.15, seed=6)
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))]
    accuracy = linear_probe_accuracy(train_x, shuffled, test_x, test_y, num_classes=10, epochs=30, lr=1e-2, batch_size=64)
    assert accuracy < 0.2  # chance is 0.1; 1000 test rows


def test_linear_probe_agrees_with_sklearn_logistic_regression_on_fixture_features(fixture_features):
    train_x, train_y, test_x, test_y = fixture_features
    # Standardise so both optimisers converge in few steps (raw random-init features are ~0.04).
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    probe = linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes=10, epochs=100, lr=1e-3, batch_size=32)
    reference = LogisticRegression(C=1.0, max_iter=5000).fit(train_x.numpy(), train_y.numpy())
    sklearn_accuracy = reference.score(test_x.numpy(), test_y.numpy())
    assert sklearn_accuracy > 0.5
    assert abs(probe - sklearn_accuracy) <= 0.04  # 4 of 100 test images


# ---------------------------------------------------------------- features


def test_extract_features_shape_labels_determinism_and_preprocessing(checkpoint, fixture_features):
    from rela_pipeline.models import load_backbone_checkpoint

    train_x, train_y, _, _ = fixture_features
    index = scan_image_folder(TRAIN_DIR)
    assert train_x.shape == (300, 256) and train_x.dtype == torch.float32 and train_x.device.type == "cpu"
    assert train_y.dtype == torch.int64 and np.array_equal(train_y.numpy(), index.labels)
    assert torch.isfinite(train_x).all() and train_x.std() > 0

    backbone, _ = load_backbone_checkpoint(checkpoint)
    again, labels = extract_features(backbone, index, PREPROCESSING, device="cpu", batch_size=64, num_workers=2)
    assert torch.equal(again, train_x)  # other batch size and worker processes: same features
    assert torch.equal(labels, train_y)

    # Row 123 is exactly the backbone on that file with the recorded preprocessing.
    image = PREPROCESSING.to_uint8_transform()(decode_rgb(index.root / index.files[123]))
    with torch.no_grad():
        single = backbone(PREPROCESSING.normalise(image[None]))[0]
    assert torch.allclose(train_x[123], single, atol=1e-5)


def test_eval_preprocessing_default_and_override():
    assert eval_preprocessing(None) == Preprocessing(32, 32, resize_mode="squash")
    recorded = Preprocessing(256, 224, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).to_dict()
    assert eval_preprocessing(recorded) == Preprocessing.from_dict(recorded)
    override = eval_preprocessing(recorded, image_size=48)
    assert (override.resize_size, override.crop_size, override.resize_mode) == (48, 48, "squash")
    assert override.mean == (0.5, 0.5, 0.5) and override.interpolation == "bicubic"


# ---------------------------------------------------------------- run_eval


def test_run_eval_on_fixture(checkpoint, fixture_features):
    result = run_eval(eval_config(checkpoint, knn_k=20, probe_lr=3e-4, probe_standardise=False))  # the paper's probe
    json.dumps(result)  # JSON-ready
    assert set(result) == {
        "checkpoint",
        "step",
        "backbone",
        "feature_dim",
        "image_size",
        "train_samples",
        "test_samples",
        "num_classes",
        "linear_probe",
        "knn",
        "timings_s",
    }
    assert result["checkpoint"] == str(checkpoint) and result["step"] == 7
    assert result["backbone"] == {"name": "convnet"} and result["feature_dim"] == 256 and result["image_size"] == 32
    assert (result["train_samples"], result["test_samples"], result["num_classes"]) == (300, 100, 10)
    assert result["linear_probe"] == {
        "top1": result["linear_probe"]["top1"],
        "epochs": 5,
        "lr": 3e-4,
        "batch_size": 256,
        "standardised": False,
        "lr_held_out_top1": None,
    }
    assert result["knn"] == {"top1": result["knn"]["top1"], "k": 20, "temperature": 0.1}
    assert set(result["timings_s"]) == {"features", "linear_probe", "knn", "total"}
    assert all(v >= 0 for v in result["timings_s"].values())
    # The same numbers as the functions on the cached features (wiring, labels, seed).
    train_x, train_y, test_x, test_y = fixture_features
    assert result["linear_probe"]["top1"] == linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes=10, epochs=5)
    assert result["knn"]["top1"] == knn_accuracy(train_x, train_y, test_x, test_y, num_classes=10, k=20)
    assert 0.0 <= result["linear_probe"]["top1"] <= 1.0
    # A random-init convnet already clusters Fashion-MNIST well above chance (0.1): seeds 0-4 give
    # 0.55-0.63 with k=20 on this fixture.
    assert result["knn"]["top1"] > 0.4


def test_run_eval_default_preprocessing_and_image_size(tmp_path):
    train = copy_classes(TRAIN_DIR, tmp_path / "train", {"1_trouser": "a", "7_sneaker": "b"}, 6)
    test = copy_classes(TEST_DIR, tmp_path / "test", {"1_trouser": "a", "7_sneaker": "b"}, 4)
    bare = make_checkpoint(tmp_path / "bare.pt", preprocessing=None)
    result = run_eval(eval_config(bare, train, test, knn_k=200))
    assert result["image_size"] == 32 and result["knn"]["k"] == 12  # k clipped to 12 train samples
    assert (result["train_samples"], result["test_samples"], result["num_classes"]) == (12, 8, 2)
    assert run_eval(eval_config(bare, train, test, image_size=16))["image_size"] == 16


# ---------------------------------------------------------------- errors


def test_run_eval_unlabelled_folder(tmp_path, checkpoint):
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in sorted((TEST_DIR / "0_tshirt-top").glob("*.png"))[:3]:
        shutil.copy(image, flat / image.name)
    with pytest.raises(RelaError, match=r"test folder .*flat is unlabelled"):
        run_eval(eval_config(checkpoint, test_dir=flat))


def test_run_eval_class_names_differ(tmp_path, checkpoint):
    test = copy_classes(TEST_DIR, tmp_path / "test", {"0_tshirt-top": "0_tshirt-top", "1_trouser": "9_other"}, 2)
    with pytest.raises(RelaError, match=r"class names differ .*only in test: \['9_other'\]"):
        run_eval(eval_config(checkpoint, test_dir=test))


def test_run_eval_missing_or_foreign_checkpoint(tmp_path):
    with pytest.raises(RelaError, match="checkpoint not found"):
        run_eval(eval_config(tmp_path / "nope.pt"))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(RelaError, match="not a rela-pipeline backbone checkpoint"):
        run_eval(eval_config(foreign))


def test_run_eval_missing_folder(tmp_path, checkpoint):
    with pytest.raises(RelaError, match="data directory not found"):
        run_eval(eval_config(checkpoint, train_dir=tmp_path / "missing"))


def test_run_eval_undecodable_image_is_named(tmp_path, checkpoint):
    classes = {"1_trouser": "a", "7_sneaker": "b"}
    train = copy_classes(TRAIN_DIR, tmp_path / "train", classes, 3)
    test = copy_classes(TEST_DIR, tmp_path / "test", classes, 3)
    (test / "b" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(RelaError, match=r"cannot decode image .*b/zz_broken\.png"):
        run_eval(eval_config(checkpoint, train, test))


@pytest.mark.parametrize(
    "field,value",
    [
        ("batch_size", 0),
        ("num_workers", -1),
        ("image_size", 4),
        ("probe_epochs", 0),
        ("probe_lr", 0.0),
        ("probe_batch_size", 0),
        ("knn_k", 0),
        ("knn_temperature", -0.1),
    ],
)
def test_eval_config_validate(field, value, checkpoint):
    config = eval_config(checkpoint, **{field: value})
    with pytest.raises(RelaError, match=field.replace("_", "-")):
        config.validate()


# ---------------------------------------------------------------- few labels


def test_few_label_rows_draw_per_class_without_the_global_rng():
    from rela_pipeline.stages.evaluate import few_label_rows

    labels = torch.arange(10).repeat_interleave(30)
    state = torch.random.get_rng_state()
    rows = few_label_rows(labels, 5, 10, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(torch.bincount(labels[rows], minlength=10), torch.full((10,), 5))
    assert len(set(rows.tolist())) == 50 and torch.equal(rows, torch.sort(rows).values)
    assert torch.equal(rows, few_label_rows(labels, 5, 10, seed=0))
    assert not torch.equal(rows, few_label_rows(labels, 5, 10, seed=1))
    assert len(few_label_rows(labels, 100, 10, seed=0)) == 300  # a class with fewer: all of it


def test_few_label_accuracies_are_means_over_draws_of_the_full_protocols():
    from rela_pipeline.stages.evaluate import few_label_accuracies, few_label_rows

    train_x, train_y = clustered(30, 10, 32, noise=0.6, seed=5)
    test_x, test_y = clustered(50, 10, 32, noise=0.6, seed=6)
    result = few_label_accuracies(train_x, train_y, test_x, test_y, num_classes=10, per_class=(1, 10), draws=3, probe_steps=60, seed=4)
    assert set(result) == {"1", "10"} and result["10"]["labelled"] == 100
    for n in (1, 10):
        for d in range(3):  # each draw is the plain protocol on the drawn rows
            rows = few_label_rows(train_y, n, 10, 4 + 1000 * n + d)
            knn = knn_accuracy(train_x[rows], train_y[rows], test_x, test_y, num_classes=10, k=min(200, len(rows)))
            assert result[str(n)]["knn"]["draws"][d] == knn
            epochs = 60 // -(-len(rows) // 256)
            probe = linear_probe_accuracy(train_x[rows], train_y[rows], test_x, test_y, num_classes=10, epochs=epochs, seed=4 + d)
            assert result[str(n)]["linear_probe"]["draws"][d] == probe
        assert result[str(n)]["knn"]["top1"] == pytest.approx(sum(result[str(n)]["knn"]["draws"]) / 3)
    # More labels, better k-NN on these noisy clusters.
    assert result["10"]["knn"]["top1"] > result["1"]["knn"]["top1"]
    with pytest.raises(ValueError, match="must be positive"):
        few_label_accuracies(train_x, train_y, test_x, test_y, num_classes=10, per_class=(0,))


def test_run_eval_few_label_and_its_cli_lines(checkpoint, tmp_path):
    from tests.conftest import run_cli

    result = run_eval(eval_config(checkpoint, knn_k=20, few_label=(2, 5), few_label_draws=2))
    assert set(result["few_label"]) == {"2", "5"} and "few_label" in result["timings_s"]
    assert len(result["few_label"]["5"]["linear_probe"]["draws"]) == 2 and result["few_label"]["5"]["labelled"] == 50
    code, stdout, _ = run_cli(
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--train",
        str(TRAIN_DIR),
        "--test",
        str(TEST_DIR),
        "--probe-epochs",
        "5",
        "--knn-k",
        "20",
        "--few-label",
        "2,5",
        "--few-label-draws",
        "2",
        "--num-workers",
        "0",
    )
    assert code == 0
    lines = [line for line in stdout.splitlines() if "labels per class" in line]
    assert [line.split()[0] for line in lines] == ["2", "5"]
    assert f"{result['few_label']['5']['knn']['top1']:.2%}" in lines[1]
    code, _, stderr = run_cli("eval", "--checkpoint", str(checkpoint), "--train", str(TRAIN_DIR), "--test", str(TEST_DIR), "--few-label", "ten")
    assert code != 0 and "not a comma-separated list" in stderr


def test_default_probe_standardises_and_picks_its_learning_rate_on_held_out_train_rows(checkpoint, fixture_features):
    from rela_pipeline.stages.evaluate import PROBE_LR_GRID, select_probe_lr, standardise

    result = run_eval(eval_config(checkpoint, knn_k=20))
    train_x, train_y, test_x, test_y = fixture_features
    z_train, z_test = standardise(train_x, test_x)
    spread = train_x.std(0, unbiased=False)
    assert z_train.mean(0).abs().max() < 1e-4
    assert (z_train.std(0, unbiased=False)[spread > 1e-3] - 1).abs().max() < 1e-2  # eps shrinks near-constant columns
    assert torch.allclose(z_test, (test_x - train_x.mean(0)) / (spread + 1e-6))
    lr, scores = select_probe_lr(z_train, train_y, num_classes=10, epochs=5)
    assert set(scores) == {str(v) for v in PROBE_LR_GRID} and scores[str(lr)] == max(scores.values())
    probe = result["linear_probe"]
    assert probe["standardised"] and probe["lr"] == lr and probe["lr_held_out_top1"] == scores
    assert probe["top1"] == linear_probe_accuracy(z_train, train_y, z_test, test_y, num_classes=10, epochs=5, lr=lr)
    # k-NN reads the raw features either way.
    assert result["knn"]["top1"] == knn_accuracy(train_x, train_y, test_x, test_y, num_classes=10, k=20)


def test_probe_learning_rate_is_chosen_without_the_test_split():
    from rela_pipeline.stages.evaluate import select_probe_lr

    # A probe given too few steps: the paper's fixed 3e-4 barely leaves its random initialisation;
    # the held-out choice moves to a larger rate and the probe then separates the clusters.
    train_x, train_y = clustered(60, 10, 32, noise=0.1, seed=5)
    test_x, test_y = clustered(50, 10, 32, noise=0.1, seed=6)
    lr, scores = select_probe_lr(train_x, train_y, num_classes=10, epochs=1, batch_size=64)
    assert lr > 3e-4 and scores[str(lr)] > scores["0.0003"]
    fixed = linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes=10, epochs=1, lr=3e-4, batch_size=64)
    chosen = linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes=10, epochs=1, lr=lr, batch_size=64)
    assert chosen > fixed + 0.2
    small = train_x
    with pytest.raises(ValueError, match="one train row"):
        select_probe_lr(small[:11], torch.arange(11) % 10, num_classes=10)
