"""Student backbones and the project's backbone checkpoint format.

A backbone maps a float image batch ``(B, 3, H, W)`` to pooled features ``(B, feature_dim)``.
Stage two trains them; stage one can use a saved one as a ``checkpoint:`` prior.

Checkpoint format (a plain dict, loadable with ``torch.load(path, weights_only=True)``)::

    {"format": "rela-pipeline/backbone", "format_version": 1,
     "backbone": {"name": "resnet18", "cifar_stem": True},
     "feature_dim": 512, "state_dict": {...}, "preprocessing": {...} | None,
     "step": int, "config": {...}, "training_state": {...}  (optional; see stages/train.py)}
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

import torch
import torchvision
from torch import nn

from .errors import RelaError

CHECKPOINT_FORMAT = "rela-pipeline/backbone"
CHECKPOINT_FORMAT_VERSION = 1

#: Backbone names accepted by :func:`build_backbone`.
BACKBONES = ("convnet", "resnet18", "resnet50")


class SmallConvNet(nn.Module):
    """A four-block ConvNet (conv3x3-BN-ReLU, 2x2 max-pool after blocks 1-3, global average pool).

    Sized to train usefully on a few CPU cores at 28-64 px. Input ``(B, 3, H, W)`` float32,
    output ``(B, feature_dim)`` float32 with ``feature_dim = 8 * width``.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        channels = [3, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for block, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            if block < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = channels[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(images)), 1)


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet without its classifier, optionally with the CIFAR stem.

    The CIFAR stem (3x3 conv, stride 1, no max-pool; He et al. 2016, section 4.2, as used by ReLA
    for 32 px data) keeps spatial resolution for images of 64 px and below.
    Input ``(B, 3, H, W)`` float, output ``(B, feature_dim)`` (512 for resnet18, 2048 for resnet50).
    """

    def __init__(self, arch: str, cifar_stem: bool = False) -> None:
        super().__init__()
        net = torchvision.models.get_model(arch, weights=None)
        if cifar_stem:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def build_backbone(name: str, cifar_stem: bool = False) -> nn.Module:
    """Build a randomly initialised student backbone by name.

    Args:
        name: one of :data:`BACKBONES`.
        cifar_stem: for ResNets, use the 3x3 stride-1 stem without max-pool (ignored by convnet).

    Returns:
        A module with attribute ``feature_dim`` mapping ``(B, 3, H, W)`` to ``(B, feature_dim)``.

    Raises:
        RelaError: for an unknown name.
    """
    if name == "convnet":
        return SmallConvNet()
    if name in ("resnet18", "resnet50"):
        return TorchvisionResNet(name, cifar_stem=cifar_stem)
    raise RelaError(f"unknown backbone '{name}'; choose one of: {', '.join(BACKBONES)}")


def save_backbone_checkpoint(
    path: str | os.PathLike,
    backbone: nn.Module,
    backbone_config: Mapping[str, Any],
    *,
    preprocessing: Mapping[str, Any] | None = None,
    step: int = 0,
    config: Mapping[str, Any] | None = None,
    training_state: Mapping[str, Any] | None = None,
) -> None:
    """Save a backbone in the project's checkpoint format, atomically.

    Args:
        path: destination file (written as ``path.partial`` then renamed).
        backbone: module built by :func:`build_backbone` (must have ``feature_dim``).
        backbone_config: keyword arguments of :func:`build_backbone`, e.g. ``{"name": "resnet18",
            "cifar_stem": True}``.
        preprocessing: the preprocessing a prior built from this checkpoint should use
            (:class:`rela_pipeline.priors.Preprocessing` as a dict), or None for the default.
        step: optimisation steps done when saved.
        config: free-form run configuration (JSON-like values only).
        training_state: optional state to resume training (tensors, numbers, strings, lists and
            dicts only, so the file stays loadable with ``weights_only=True``); stored under
            ``"training_state"`` and ignored by :func:`load_backbone_checkpoint`.
    """
    from .fileio import atomic_write

    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "backbone": dict(backbone_config),
        "feature_dim": int(backbone.feature_dim),
        "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
        "preprocessing": dict(preprocessing) if preprocessing is not None else None,
        "step": int(step),
        "config": dict(config or {}),
    }
    if training_state is not None:
        payload["training_state"] = dict(training_state)
    with atomic_write(path, "wb") as handle:
        torch.save(payload, handle)


def safe_torch_load(path: str | os.PathLike, what: str) -> Any:
    """Load a torch file with ``weights_only=True`` (no arbitrary code), mapped to CPU.

    Args:
        path: the file.
        what: how to name the file in error messages (e.g. "prior weights file").

    Raises:
        RelaError: the file is missing, unreadable, or not a plain weights file (a pickle that
            would execute code is refused by torch's weights-only unpickler and reported here).
    """
    if not os.path.isfile(path):
        raise RelaError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RelaError(f"{what} {path} is not a plain weights file (refused by the weights-only loader: {first_line})") from None
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise RelaError(f"cannot read {what} {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Load ``state_dict`` into ``module`` requiring the same keys and shapes.

    A leading ``module.`` (DataParallel/DDP) is stripped from keys first.

    Raises:
        RelaError: naming how many keys are missing, unexpected, or of the wrong shape.
    """
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise RelaError(f"{what} does not hold a state_dict of tensors")
    cleaned = {k.removeprefix("module."): v for k, v in state_dict.items()}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(cleaned))
    unexpected = sorted(set(cleaned) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(cleaned) if expected[k].shape != cleaned[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong_shape:
            k = wrong_shape[0]
            parts.append(f"{len(wrong_shape)} shape mismatches (e.g. {k}: file {tuple(cleaned[k].shape)} vs model {tuple(expected[k].shape)})")
        raise RelaError(f"{what} does not fit the architecture: {'; '.join(parts)}")
    module.load_state_dict(cleaned, strict=True)


def load_backbone_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Load a backbone saved by :func:`save_backbone_checkpoint` (weights-only, CPU, eval mode).

    Returns:
        ``(backbone, checkpoint)`` where ``checkpoint`` is the saved dict without ``state_dict``
        and ``training_state``.

    Raises:
        RelaError: missing or unsafe file, not this project's format, or weights that do not fit
            the recorded architecture.
    """
    payload = safe_torch_load(path, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise RelaError(f"{path} is not a rela-pipeline backbone checkpoint (no format '{CHECKPOINT_FORMAT}')")
    if payload.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise RelaError(f"{path} has checkpoint format_version {payload.get('format_version')}; this version reads {CHECKPOINT_FORMAT_VERSION}")
    config = payload.get("backbone")
    if not isinstance(config, dict) or "name" not in config:
        raise RelaError(f"{path} does not record its backbone architecture")
    backbone = build_backbone(str(config["name"]), cifar_stem=bool(config.get("cifar_stem", False)))
    load_state_dict_strict(backbone, payload["state_dict"], f"checkpoint {path}")
    backbone.eval()
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "training_state")}
    return backbone, meta
