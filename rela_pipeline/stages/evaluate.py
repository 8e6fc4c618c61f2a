"""The ``eval`` stage: measure a trained backbone with the usual self-supervised protocols.

Both protocols read frozen features of the backbone (eval mode, deterministic preprocessing, no
augmentation) extracted once from a labelled train and test ImageFolder:

* **Linear probe** (ReLA appendix and the authors' code, following the frozen-feature linear evaluation of
  self-supervised learning): one ``nn.Linear`` layer trained on the frozen train features with
  Adam (no weight decay), cross-entropy, 100 epochs; reported as test top-1. Two defaults differ
  from the paper's fixed learning rate of 3e-4 on raw features, because that probe stops far from
  convergence on features of small magnitude (measured: a BYOL ConvNet's features gain 5 points
  from the same probe trained longer or standardised; raw pixels do not), so it ranks
  representations by their scale rather than their content: features are standardised with the
  train split's per-dimension mean and std (a BatchNorm without affine parameters before the
  linear layer, as in MoCo v3 and MAE's linear probing), and the learning rate is chosen from
  :data:`PROBE_LR_GRID` on a stratified 10% of the train split held out (the usual sweep of linear
  evaluation, e.g. SimCLR appendix B.6), then the probe is retrained on the whole train split.
  ``probe_lr=3e-4, probe_standardise=False`` is the paper's protocol.
* **Weighted k-NN** (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination", section 3.4, as implemented by ``lightly.utils.benchmarking.knn_predict``):
  cosine similarity of L2-normalised features, the ``k = 200`` most similar train samples vote
  for their class with weight ``exp(similarity / 0.1)``; reported as test top-1.
* **Few-label** (optional, ``few_label``): both protocols again with only ``n`` labelled train
  images per class (a seeded draw, mean over several draws), the regime where a representation
  matters most (:func:`few_label_accuracies`).

The result is a JSON-ready dict (see :func:`run_eval`).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..errors import RelaError
from ..imagefolder import ImageFolderIndex, scan_image_folder
from ..models import check_input_size, load_backbone_checkpoint
from ..priors import PreprocessedImages, Preprocessing
from ..runtime import autocast_for, default_num_workers, resolve_device

#: Learning rates the linear probe chooses from when none is given (a half-decade grid).
PROBE_LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
#: Fraction of the train split held out (per class) to choose the probe's learning rate.
PROBE_HELD_OUT = 0.1

#: Preprocessing used when a checkpoint records none and no image size is given: whole image
#: squashed to 32 x 32 (the CIFAR / Fashion-MNIST scale the small backbones train at).
DEFAULT_PREPROCESSING = Preprocessing(resize_size=32, crop_size=32, resize_mode="squash")


@dataclass
class EvalConfig:
    """Settings of one ``eval`` run.

    Attributes:
        checkpoint: a backbone checkpoint (``rela-pipeline/backbone`` format, see
            :mod:`rela_pipeline.models`).
        train_dir: labelled ImageFolder the probe is trained on and the k-NN bank is built from.
        test_dir: labelled ImageFolder with the same class names; accuracies are measured on it.
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        batch_size: images per feature-extraction batch.
        num_workers: DataLoader worker processes decoding images; None:
            :func:`rela_pipeline.runtime.default_num_workers`;
            0: decode in the main process.
        image_size: if given, squash-resize whole images to ``image_size x image_size`` pixels
            instead of the checkpoint's recorded preprocessing (mean/std stay the recorded ones).
        probe_epochs: linear-probe epochs (paper protocol: 100).
        probe_lr: linear-probe Adam learning rate; None: chosen from :data:`PROBE_LR_GRID` on a
            held-out 10% of the train split (:func:`select_probe_lr`). The paper: 3e-4.
        probe_standardise: standardise features with the train split's per-dimension mean and
            std before the probe (the paper: no).
        probe_batch_size: linear-probe minibatch size (samples).
        knn_k: neighbours voting in the k-NN classifier (Wu et al. 2018: 200).
        knn_temperature: temperature of the vote weights ``exp(cos / t)`` (Wu et al. 2018: 0.1).
        few_label: labelled train images per class of the few-label protocols (e.g. ``(10, 100)``);
            empty: none.
        few_label_draws: random draws of the labelled images per ``few_label`` entry.
        seed: seed of the probe's initialisation and minibatch order, and of the few-label draws.
        progress: show a tqdm progress bar during feature extraction.
    """

    checkpoint: Path
    train_dir: Path
    test_dir: Path
    device: str = "auto"
    batch_size: int = 256
    num_workers: int | None = None
    image_size: int | None = None
    probe_epochs: int = 100
    probe_lr: float | None = None
    probe_standardise: bool = True
    probe_batch_size: int = 256
    knn_k: int = 200
    knn_temperature: float = 0.1
    few_label: tuple[int, ...] = ()
    few_label_draws: int = 3
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        """Raise :class:`RelaError` on out-of-range settings."""
        if self.batch_size < 1:
            raise RelaError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise RelaError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.image_size is not None and self.image_size < 8:
            raise RelaError(f"--image-size must be at least 8 pixels, got {self.image_size}")
        if self.probe_epochs < 1:
            raise RelaError(f"--probe-epochs must be >= 1, got {self.probe_epochs}")
        if self.probe_lr is not None and not (math.isfinite(self.probe_lr) and self.probe_lr > 0):
            raise RelaError(f"--probe-lr must be a positive number, got {self.probe_lr}")
        if self.probe_batch_size < 1:
            raise RelaError(f"--probe-batch-size must be >= 1, got {self.probe_batch_size}")
        if self.knn_k < 1:
            raise RelaError(f"--knn-k must be >= 1, got {self.knn_k}")
        if not (math.isfinite(self.knn_temperature) and self.knn_temperature > 0):
            raise RelaError(f"--knn-temperature must be a positive number, got {self.knn_temperature}")
        if any(n < 1 for n in self.few_label) or self.few_label_draws < 1:
            raise RelaError(f"--few-label entries and --few-label-draws must be >= 1, got {list(self.few_label)} and {self.few_label_draws}")

    def resolved_num_workers(self) -> int:
        """Worker processes to use: ``num_workers``, or :func:`rela_pipeline.runtime.default_num_workers` when None."""
        return self.num_workers if self.num_workers is not None else default_num_workers()


def eval_preprocessing(saved: dict[str, Any] | None, image_size: int | None = None) -> Preprocessing:
    """Preprocessing for evaluating a checkpoint.

    Args:
        saved: the checkpoint's ``preprocessing`` record, or None.
        image_size: if given, squash-resize to ``image_size x image_size`` and crop ``image_size``
            (interpolation, mean and std stay the recorded ones, or the defaults).

    Returns:
        The recorded preprocessing, else :data:`DEFAULT_PREPROCESSING`, with the override applied.

    Raises:
        RelaError: a malformed preprocessing record.
    """
    base = Preprocessing.from_dict(saved) if saved else DEFAULT_PREPROCESSING
    if image_size is None:
        return base
    return Preprocessing(image_size, image_size, base.interpolation, base.mean, base.std, "squash")


def extract_features(
    backbone: nn.Module,
    index: ImageFolderIndex,
    preprocessing: Preprocessing,
    *,
    device: torch.device | str,
    batch_size: int,
    num_workers: int,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features of every image of ``index`` (no augmentation, no gradients).

    The backbone is moved to ``device`` and put in eval mode (BatchNorm uses its running
    statistics). Decoding, resizing and cropping run in DataLoader workers on uint8 tensors;
    normalisation and the forward pass (under ``torch.inference_mode``, autocast on CUDA) run on
    ``device``. Images are read in index order, so the result is deterministic.

    Args:
        backbone: module mapping normalised float32 ``(B, 3, S, S)`` to ``(B, F)``.
        index: the scanned ImageFolder.
        preprocessing: deterministic preprocessing (``S = preprocessing.crop_size`` pixels).
        device: compute device (a ``torch.device`` or a string accepted by
            :func:`rela_pipeline.runtime.resolve_device`, e.g. "auto").
        batch_size: images per forward pass.
        num_workers: DataLoader worker processes (0: decode in the main process).
        progress: show a tqdm progress bar.

    Returns:
        ``(features, labels)``: float32 ``(N, F)`` on CPU, and int64 ``(N,)`` class indices
        (all -1 when ``index`` is unlabelled), row ``i`` for ``index.files[i]``.

    Raises:
        RelaError: an image fails to decode (the first such file is named), the backbone does
            not return ``(B, F)`` features, or it returns NaN/Inf features.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    model = backbone.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    n = len(index.files)
    labels = torch.from_numpy(index.labels.astype(np.int64)) if index.labels is not None else torch.full((n,), -1, dtype=torch.int64)
    loader = DataLoader(
        PreprocessedImages(index.root, index.files, preprocessing),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
    )
    features: torch.Tensor | None = None  # allocated outside inference mode: a normal tensor
    with tqdm(total=n, unit="img", desc="features", disable=not progress, dynamic_ncols=True) as bar:
        for rows, images, decoded, reasons in loader:
            if not bool(decoded.all()):
                bad = int(torch.nonzero(~decoded)[0, 0])
                raise RelaError(f"cannot decode image {index.root / index.files[int(rows[bad])]}: {reasons[bad]}")
            with torch.inference_mode():
                images = images.to(device, non_blocking=True)
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast_for(device, True):
                    out = model(preprocessing.normalise(images))
                if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(rows):
                    raise RelaError(f"backbone returns {tuple(getattr(out, 'shape', ()))} for a batch of {len(rows)} images, expected (batch, feature_dim)")
                out = out.float().cpu()
            if features is None:
                features = torch.empty(n, out.shape[1], dtype=torch.float32)
            finite = torch.isfinite(out).all(dim=1)
            if not bool(finite.all()):
                bad = int(rows[int(torch.nonzero(~finite)[0, 0])])
                raise RelaError(f"backbone returns NaN/Inf features (first for {index.root / index.files[bad]}); is the checkpoint diverged?")
            features[rows] = out
            bar.update(len(rows))
    assert features is not None  # index.files is never empty (scan_image_folder refuses that)
    return features, labels


def _check_splits(train_features, train_labels, test_features, test_labels, num_classes: int) -> None:
    """ValueError unless both splits are (N, F) features with (N,) labels in range and equal F."""
    _check_split(train_features, train_labels, num_classes, "train")
    _check_split(test_features, test_labels, num_classes, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train and test feature dimensions differ: {train_features.shape[1]} vs {test_features.shape[1]}")


def _check_split(features: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str) -> None:
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels) or len(features) == 0:
        raise ValueError(f"{name} features {tuple(features.shape)} and labels {tuple(labels.shape)} must be (N, F) and (N,) with N > 0")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"{name} labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    epochs: int = 100,
    lr: float = 3e-4,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> float:
    """Linear-probe top-1 accuracy on cached frozen features.

    Protocol (ReLA appendix and the authors' code): one ``nn.Linear(F, num_classes)`` (PyTorch's default
    initialisation, drawn with ``torch.manual_seed(seed)`` without disturbing the global RNG)
    trained with Adam (``lr``, no weight decay) on the mean cross-entropy of shuffled minibatches
    of ``batch_size`` train rows (the last one may be smaller) for ``epochs`` epochs; the epoch
    orders come from ``torch.randperm`` with a generator seeded by ``seed``. Features are used as
    given (no normalisation) and moved to ``device`` once; minibatches are indexed there, with
    no DataLoader.

    Training on cached frozen features with no augmentation is exactly the frozen-feature linear
    protocol when no augmentation is used during probe training (the backbone is frozen and in
    eval mode, so every epoch would recompute the same features): it gives the same number at a
    fraction of the cost (one backbone pass instead of ``epochs``).

    Args:
        train_features: float ``(N, F)``.
        train_labels: int64 ``(N,)`` in ``[0, num_classes)``.
        test_features: float ``(M, F)``.
        test_labels: int64 ``(M,)`` in ``[0, num_classes)``.
        num_classes: number of classes C.
        epochs: passes over the train features.
        lr: Adam learning rate.
        batch_size: rows per optimisation step.
        seed: seed of the initialisation and minibatch order (same seed, same device: same result).
        device: where the probe is trained ("cpu", "cuda", ... or a ``torch.device``).

    Returns:
        Test top-1 accuracy in [0, 1] (argmax of the logits; a tie goes to the lower class index).

    Raises:
        ValueError: malformed shapes, mismatched feature dimensions, labels out of range, or
            non-positive ``epochs``/``batch_size``/``lr``.
    """
    _check_splits(train_features, train_labels, test_features, test_labels, num_classes)
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"epochs, batch_size and lr must be positive, got {epochs}, {batch_size}, {lr}")
    device = torch.device(device)
    # clone(): a normal tensor even if the caller's features were made under inference_mode.
    x_train = train_features.detach().to(device=device, dtype=torch.float32).clone()
    y_train = train_labels.detach().to(device=device, dtype=torch.int64).clone()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Linear(x_train.shape[1], num_classes)
    probe = probe.to(device)
    optimiser = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    n = len(x_train)
    with torch.enable_grad():
        probe.train()
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(device, non_blocking=True)
            for start in range(0, n, batch_size):
                rows = order[start : start + batch_size]
                loss = F.cross_entropy(probe(x_train[rows]), y_train[rows])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
    probe.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test_features), 65536):
            x = test_features[start : start + 65536].to(device=device, dtype=torch.float32)
            y = test_labels[start : start + 65536].to(device=device, dtype=torch.int64)
            correct += int((probe(x).argmax(dim=1) == y).sum())
    return correct / len(test_features)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> float:
    """Weighted k-NN top-1 accuracy (Wu et al. 2018, InstDisc, section 3.4, as used by lightly).

    Features are L2-normalised (float32); for each test row the ``k`` train rows of highest cosine
    similarity ``s`` vote for their label with weight ``exp(s / temperature)``, and the class of
    largest total weight is the prediction (``lightly.utils.benchmarking.knn_predict`` with the
    bank as ``(F, N)``). Test rows are processed ``chunk_size`` at a time, so memory is
    O(``chunk_size`` x N). Runs on the device of ``train_features``.

    Args:
        train_features: float ``(N, F)``, the feature bank.
        train_labels: int64 ``(N,)`` in ``[0, num_classes)``.
        test_features: float ``(M, F)``.
        test_labels: int64 ``(M,)`` in ``[0, num_classes)``.
        num_classes: number of classes C.
        k: neighbours per vote; clipped to N.
        temperature: vote temperature (> 0).
        chunk_size: test rows per similarity block.

    Returns:
        Test top-1 accuracy in [0, 1].

    Raises:
        ValueError: malformed shapes, mismatched feature dimensions, labels out of range, or
            non-positive ``k``/``temperature``/``chunk_size``.
    """
    from lightly.utils.benchmarking import knn_predict

    _check_splits(train_features, train_labels, test_features, test_labels, num_classes)
    if k < 1 or not temperature > 0 or chunk_size < 1:
        raise ValueError(f"k, temperature and chunk_size must be positive, got {k}, {temperature}, {chunk_size}")
    device = train_features.device
    k = min(k, len(train_features))
    correct = 0
    with torch.no_grad():
        bank = F.normalize(train_features.detach().float(), dim=1).t().contiguous()  # (F, N)
        bank_labels = train_labels.detach().to(device=device, dtype=torch.int64)
        for start in range(0, len(test_features), chunk_size):
            query = F.normalize(test_features[start : start + chunk_size].to(device=device, dtype=torch.float32), dim=1)
            predicted = knn_predict(query, bank, bank_labels, num_classes, knn_k=k, knn_t=temperature)[:, 0]
            target = test_labels[start : start + chunk_size].to(device=device, dtype=torch.int64)
            correct += int((predicted == target).sum())
    return correct / len(test_features)


def standardise(train_features: torch.Tensor, test_features: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Both splits standardised with the train split's per-dimension statistics:
    ``(x - mean_train) / (std_train + eps)`` (a BatchNorm without affine parameters in eval mode).

    Args:
        train_features: float ``(N, F)``; its mean and (population) std per column are used.
        test_features: float ``(M, F)``.
        eps: added to the std so constant columns map to 0 instead of NaN.

    Returns:
        float32 ``(N, F)`` and ``(M, F)``.
    """
    train = train_features.float()
    mean, std = train.mean(0), train.std(0, unbiased=False) + eps
    return (train - mean) / std, (test_features.float() - mean) / std


def select_probe_lr(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    *,
    num_classes: int,
    grid: tuple[float, ...] = PROBE_LR_GRID,
    held_out: float = PROBE_HELD_OUT,
    epochs: int = 100,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[float, dict[str, float]]:
    """The linear probe's learning rate, chosen on a held-out part of the train split.

    ``ceil(held_out * n_c)`` rows of every class ``c`` (a seeded draw) are held out; a probe is
    trained on the rest with each learning rate of ``grid`` (:func:`linear_probe_accuracy`, same
    epochs, batch size and seed) and scored on them; the best wins (ties: the smaller rate). The
    test split is never read.

    Args:
        train_features: float ``(N, F)`` (already standardised if the probe standardises).
        train_labels: int64 ``(N,)`` in ``[0, num_classes)``.
        num_classes: C.
        grid: candidate Adam learning rates.
        held_out: fraction of each class held out, in (0, 1).
        epochs, batch_size, seed, device: as :func:`linear_probe_accuracy`.

    Returns:
        ``(learning rate, {str(lr): held-out top-1})``.

    Raises:
        ValueError: an empty grid, ``held_out`` outside (0, 1), or a class with fewer than 2 rows.
    """
    if not grid or not 0.0 < held_out < 1.0:
        raise ValueError(f"need a non-empty grid and held_out in (0, 1), got {grid} and {held_out}")
    counts = torch.bincount(train_labels, minlength=num_classes)
    if bool((counts == 1).any()):
        c = int(torch.nonzero(counts == 1)[0, 0])
        raise ValueError(f"class {c} has one train row: nothing to hold out for choosing the probe's learning rate")
    held = torch.zeros(len(train_labels), dtype=torch.bool)
    held[_draw_per_class(train_labels, num_classes, lambda n: math.ceil(held_out * n), seed)] = True
    scores = {}
    for lr in grid:
        scores[str(lr)] = linear_probe_accuracy(
            train_features[~held],
            train_labels[~held],
            train_features[held],
            train_labels[held],
            num_classes=num_classes,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            device=device,
        )
    best = max(grid, key=lambda lr: (scores[str(lr)], -lr))
    return best, scores


def few_label_rows(labels: torch.Tensor, per_class: int, num_classes: int, seed: int) -> torch.Tensor:
    """Rows of ``per_class`` randomly drawn samples of every class (all of a class that has fewer).

    Args:
        labels: int64 ``(N,)`` in ``[0, num_classes)``.
        per_class: samples per class.
        num_classes: C.
        seed: seed of the draw (a ``torch.Generator``; the global RNG is untouched).

    Returns:
        int64 ``(<= C * per_class,)`` row indices into ``labels``, sorted.
    """
    return _draw_per_class(labels, num_classes, lambda n: per_class, seed)


def _draw_per_class(labels: torch.Tensor, num_classes: int, take, seed: int) -> torch.Tensor:
    """Sorted int64 rows: ``take(n_c)`` rows of each class ``c`` drawn without replacement, classes
    in order, from one ``torch.Generator`` seeded with ``seed`` (the global RNG is untouched)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        rows = torch.nonzero(labels == c).flatten()
        chosen.append(rows[torch.randperm(len(rows), generator=generator)[: take(len(rows))]])
    return torch.sort(torch.cat(chosen)).values


def few_label_accuracies(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    per_class: tuple[int, ...] = (10, 100),
    draws: int = 3,
    probe_steps: int = 4000,
    probe_lr: float = 3e-4,
    probe_batch_size: int = 256,
    knn_k: int = 200,
    knn_temperature: float = 0.1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    knn_features: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Linear-probe and k-NN top-1 with only ``n`` labelled train images per class.

    For each ``n`` in ``per_class`` and each draw ``d`` in ``range(draws)``, the labelled rows are
    :func:`few_label_rows` with seed ``seed + 1000 * n + d``; :func:`linear_probe_accuracy` is
    trained on them for ``ceil(probe_steps / ceil(rows / probe_batch_size))`` epochs, so every
    probe takes about the same number of optimisation steps as the full one (with fewer rows per
    epoch an epoch count would under-train it), and :func:`knn_accuracy` uses them as the bank
    (``k`` clipped to the bank's size). Accuracies are on the whole test split. Features are used
    as given: :func:`run_eval` standardises them with the whole train split's statistics (no
    labels needed) and passes the learning rate chosen for the full probe (too few labels to
    hold any out).

    Args:
        train_features, train_labels, test_features, test_labels, num_classes: as
            :func:`linear_probe_accuracy`.
        per_class: labelled images per class, each >= 1.
        draws: draws per entry, >= 1.
        probe_steps: optimisation steps of each probe (the full probe's: epochs x batches).
        probe_lr, probe_batch_size, knn_k, knn_temperature, seed, device: as in :class:`EvalConfig`.
        knn_features: ``(train (N, F'), test (M, F'))`` for the k-NN if it should see other
            features than the probe (:func:`evaluate_features`: raw, where the probe's are
            standardised); default the same.

    Returns:
        ``{str(n): {"linear_probe": {"top1": mean, "std": sample std, "draws": [...]},
        "knn": {...same...}, "labelled": rows per draw}}`` (accuracies in [0, 1]).

    Raises:
        ValueError: malformed features or labels (see :func:`linear_probe_accuracy`), or a
            non-positive entry of ``per_class``, ``draws`` or ``probe_steps``.
    """
    if draws < 1 or probe_steps < 1 or any(n < 1 for n in per_class):
        raise ValueError(f"per_class entries, draws and probe_steps must be positive, got {per_class}, {draws}, {probe_steps}")
    results: dict[str, Any] = {}
    for n in per_class:
        probe, knn, labelled = [], [], 0
        for d in range(draws):
            rows = few_label_rows(train_labels, n, num_classes, seed + 1000 * n + d)
            labelled = len(rows)
            x, y = train_features[rows], train_labels[rows]
            epochs = math.ceil(probe_steps / math.ceil(len(rows) / probe_batch_size))
            probe.append(
                linear_probe_accuracy(
                    x,
                    y,
                    test_features,
                    test_labels,
                    num_classes=num_classes,
                    epochs=epochs,
                    lr=probe_lr,
                    batch_size=probe_batch_size,
                    seed=seed + d,
                    device=device,
                )
            )
            knn_train, knn_test = knn_features if knn_features is not None else (train_features, test_features)
            knn.append(
                knn_accuracy(
                    knn_train[rows].to(device), y, knn_test, test_labels, num_classes=num_classes, k=min(knn_k, len(rows)), temperature=knn_temperature
                )
            )
        results[str(n)] = {
            "linear_probe": _spread(probe),
            "knn": _spread(knn),
            "labelled": labelled,
        }
    return results


def _spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample std (0 for one value) and the values of a few-label protocol's draws."""
    return {"top1": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "draws": values}


def evaluate_features(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    config: EvalConfig,
    device: torch.device,
) -> dict[str, Any]:
    """Every protocol of ``config`` on cached features: the linear probe, k-NN and, when
    ``config.few_label`` is set, :func:`few_label_accuracies`.

    Args:
        train_features, test_features: float ``(N, F)`` and ``(M, F)``.
        train_labels, test_labels: int64 ``(N,)`` and ``(M,)`` in ``[0, num_classes)``.
        num_classes: C.
        config: the protocol settings (its paths are not read).
        device: where the probes and the k-NN run.

    Returns:
        ``{"linear_probe": {...}, "knn": {...}, "few_label": {...} (or absent),
        "timings_s": {"linear_probe", "knn", "few_label" (seconds)}}``, shaped as in
        :func:`run_eval`.

    Raises:
        ValueError: malformed features or labels.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    knn_train, knn_test = train_features, test_features  # k-NN is scale-free per row: raw features
    if config.probe_standardise:
        train_features, test_features = standardise(train_features, test_features)
    lr, lr_scores = config.probe_lr, None
    if lr is None:
        lr, lr_scores = select_probe_lr(
            train_features,
            train_labels,
            num_classes=num_classes,
            epochs=config.probe_epochs,
            batch_size=config.probe_batch_size,
            seed=config.seed,
            device=device,
        )
    probe_top1 = linear_probe_accuracy(
        train_features,
        train_labels,
        test_features,
        test_labels,
        num_classes=num_classes,
        epochs=config.probe_epochs,
        lr=lr,
        batch_size=config.probe_batch_size,
        seed=config.seed,
        device=device,
    )
    timings["linear_probe"] = time.perf_counter() - t
    t = time.perf_counter()
    k = min(config.knn_k, len(knn_train))
    knn_top1 = knn_accuracy(
        knn_train.to(device),
        train_labels,
        knn_test,
        test_labels,
        num_classes=num_classes,
        k=k,
        temperature=config.knn_temperature,
    )
    timings["knn"] = time.perf_counter() - t
    result: dict[str, Any] = {
        "linear_probe": {
            "top1": float(probe_top1),
            "epochs": config.probe_epochs,
            "lr": float(lr),
            "batch_size": config.probe_batch_size,
            "standardised": config.probe_standardise,
            "lr_held_out_top1": lr_scores,
        },
        "knn": {"top1": float(knn_top1), "k": int(k), "temperature": float(config.knn_temperature)},
    }
    if config.few_label:
        t = time.perf_counter()
        result["few_label"] = few_label_accuracies(
            train_features,
            train_labels,
            test_features,
            test_labels,
            num_classes=num_classes,
            per_class=tuple(config.few_label),
            draws=config.few_label_draws,
            probe_steps=config.probe_epochs * math.ceil(len(train_features) / config.probe_batch_size),
            probe_lr=lr,
            probe_batch_size=config.probe_batch_size,
            knn_k=config.knn_k,
            knn_temperature=config.knn_temperature,
            seed=config.seed,
            device=device,
            knn_features=(knn_train, knn_test),
        )
        timings["few_label"] = time.perf_counter() - t
    result["timings_s"] = timings
    return result


def scan_labelled_splits(train_dir: Path, test_dir: Path) -> tuple[ImageFolderIndex, ImageFolderIndex]:
    """Scan the two labelled ImageFolders of an evaluation and check they share class names.

    Raises:
        RelaError: a folder missing or without images; a folder without class sub-folders
            (unlabelled); class names that differ between the two.
    """
    train_index = scan_image_folder(train_dir)
    test_index = scan_image_folder(test_dir)
    for name, index in (("train", train_index), ("test", test_index)):
        if index.labels is None:
            raise RelaError(f"{name} folder {index.root} is unlabelled (images directly under it); eval needs {index.root}/<class>/<image> folders")
    if train_index.class_names != test_index.class_names:
        only_train = sorted(set(train_index.class_names) - set(test_index.class_names))
        only_test = sorted(set(test_index.class_names) - set(train_index.class_names))
        raise RelaError(
            f"class names differ between train ({len(train_index.class_names)} classes) and test "
            f"({len(test_index.class_names)} classes): only in train: {only_train or '-'}; only in test: {only_test or '-'}"
        )
    return train_index, test_index


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Evaluate a backbone checkpoint with a linear probe and weighted k-NN.

    Loads the checkpoint (eval mode), scans both folders, extracts frozen features of both once
    with the checkpoint's preprocessing (see :func:`eval_preprocessing`), then runs
    :func:`linear_probe_accuracy` and :func:`knn_accuracy` on ``config.device``.

    Returns:
        A JSON-ready dict::

            {"checkpoint": str, "step": int, "backbone": {...}, "feature_dim": int,
             "image_size": int (pixels), "train_samples": int, "test_samples": int,
             "num_classes": int,
             "linear_probe": {"top1": float, "epochs": int, "lr": float, "batch_size": int},
             "knn": {"top1": float, "k": int (after clipping), "temperature": float},
             "few_label": {"10": {"linear_probe": {"top1", "std", "draws"}, "knn": {...},
                                  "labelled": int}, ...}   # only with config.few_label
             "timings_s": {"features": float, "linear_probe": float, "knn": float,
                           "few_label": float (with few_label), "total": float}}   # seconds

    Raises:
        RelaError: bad settings; checkpoint missing, unsafe or not this project's format; an
            ``--image-size`` a fixed-size student (a torchvision ViT) cannot take; a folder
            missing or without images; a folder without class sub-folders (unlabelled);
            class names that differ between train and test; an image that fails to decode;
            CUDA requested but unavailable.
    """
    config.validate()
    t0 = time.perf_counter()
    backbone, meta = load_backbone_checkpoint(config.checkpoint)
    preprocessing = eval_preprocessing(meta.get("preprocessing"), config.image_size)
    check_input_size(backbone, preprocessing.crop_size, f"checkpoint {config.checkpoint} ({meta['backbone']['name']})")
    device = resolve_device(config.device)
    train_index, test_index = scan_labelled_splits(config.train_dir, config.test_dir)
    num_classes = len(train_index.class_names)

    t = time.perf_counter()
    workers = config.resolved_num_workers()
    common = dict(device=device, batch_size=config.batch_size, num_workers=workers, progress=config.progress)
    train_x, train_y = extract_features(backbone, train_index, preprocessing, **common)
    test_x, test_y = extract_features(backbone, test_index, preprocessing, **common)
    features_s = time.perf_counter() - t
    protocols = evaluate_features(train_x, train_y, test_x, test_y, num_classes=num_classes, config=config, device=device)
    timings = {"features": features_s, **protocols.pop("timings_s"), "total": time.perf_counter() - t0}

    return {
        "checkpoint": str(config.checkpoint),
        "step": int(meta.get("step", 0)),
        "backbone": dict(meta.get("backbone") or {}),
        "feature_dim": int(train_x.shape[1]),
        "image_size": int(preprocessing.crop_size),
        "train_samples": int(len(train_x)),
        "test_samples": int(len(test_x)),
        "num_classes": num_classes,
        **protocols,
        "timings_s": {name: round(seconds, 3) for name, seconds in timings.items()},
    }
