"""Prior models: parse a spec, load the model from local files, record its preprocessing.

Spec forms (ReLA section 4 uses CLIP, BYOL-trained and random priors):

==================================================  =============================================
``random:<torchvision arch>``                       randomly initialised, seeded (the paper's Rand.)
``torchvision:<arch>``                              torchvision's default weights (hub or cache)
``torchvision:<arch>:<weights file>``               local state_dict file (with or without the classifier)
``open_clip:<model>:<pretrained tag>``              open_clip weights by tag (hub or cache)
``open_clip:<model>:<weights file>``                local open_clip checkpoint
``open_clip:<model>:random``                        randomly initialised open_clip image tower
``timm:<name>``                                     timm's pretrained weights from the Hugging Face
                                                    cache (downloaded into it when the hub resolves)
``timm:<name>:<weights file>``                      local state_dict (``.safetensors`` or torch)
``timm:<name>:random``                              randomly initialised, seeded
``checkpoint:<file>``                               a backbone written by ``rela-pipeline train``
==================================================  =============================================

Every prior exposes a module mapping a normalised float batch ``(B, 3, S, S)`` to ``(B, D)``
embeddings. Torchvision classifiers lose their final linear layer (replaced by identity), so D is
the penultimate (pooled) feature size; timm models are built with ``num_classes=0`` (pooled
pre-logits features, ``D = model.num_features``) and, where they take it, ``dynamic_img_size=True``
(ViTs then take any ``--image-size``, their position embeddings interpolated). Files are loaded
with ``torch.load(weights_only=True)``, or ``safetensors.torch.load_file`` for ``.safetensors``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.transforms import v2 as T

from .errors import RelaError
from .fileio import sha256_file
from .imagefolder import UNDECODABLE_IMAGE_ERRORS, decode_rgb
from .models import check_backbone_name, check_input_size, create_timm_model, load_backbone_checkpoint, load_state_dict_strict, safe_torch_load

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SPEC_FORMS = (
    "random:<torchvision arch>",
    "torchvision:<arch>[:<weights file>]",
    "open_clip:<model>:<pretrained tag|weights file|random>",
    "timm:<name>[:<weights file>|random]",
    "checkpoint:<file>",
)


@dataclass(frozen=True)
class Preprocessing:
    """Deterministic evaluation preprocessing of a prior (no augmentation; ReLA step 1).

    Applied as: convert to RGB, resize (shorter side to ``resize_size`` for mode "shortest", both
    sides for "squash"), centre crop ``crop_size``, to uint8 tensor ``(3, crop, crop)``; then on the
    compute device ``(x / 255 - mean) / std`` in float32.

    Attributes:
        resize_size: pixels.
        crop_size: pixels; the model input is ``crop_size x crop_size``.
        interpolation: "bilinear" or "bicubic".
        mean, std: per-channel normalisation of [0, 1] pixel values.
        resize_mode: "shortest" (keep aspect ratio) or "squash".
    """

    resize_size: int
    crop_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_mode: str = "shortest"

    def to_uint8_transform(self) -> T.Compose:
        """Return the CPU part (PIL RGB image -> uint8 tensor ``(3, crop, crop)``), run in workers:
        ``PILToTensor`` then :meth:`tensor_transform`."""
        return T.Compose([T.PILToTensor(), self.tensor_transform()])

    def tensor_transform(self) -> T.Compose:
        """Resize and centre crop of uint8 ``(..., 3, H, W)`` tensors on any device, to
        ``(..., 3, crop, crop)`` (torchvision v2 ``Resize`` with antialiasing + ``CenterCrop``)."""
        interpolation = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[self.interpolation]
        size = self.resize_size if self.resize_mode == "shortest" else (self.resize_size, self.resize_size)
        return T.Compose([T.Resize(size, interpolation=interpolation, antialias=True), T.CenterCrop(self.crop_size)])

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Map uint8 ``(B, 3, H, W)`` to normalised float32 on the same device."""
        mean, std = _channel_stats(images.device, self.mean, self.std)
        return (images.float().div_(255.0) - mean) / std

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`.

        Raises:
            RelaError: on missing or malformed fields.
        """
        try:
            return cls(
                resize_size=int(data["resize_size"]),
                crop_size=int(data["crop_size"]),
                interpolation=str(data.get("interpolation", "bilinear")),
                mean=tuple(float(v) for v in data.get("mean", IMAGENET_MEAN)),
                std=tuple(float(v) for v in data.get("std", IMAGENET_STD)),
                resize_mode=str(data.get("resize_mode", "shortest")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise RelaError(f"malformed preprocessing record: {error}") from None


@functools.lru_cache(maxsize=16)
def _channel_stats(device: torch.device, mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as ``(1, 3, 1, 1)`` float32 tensors on ``device``, made once per device."""
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1).to(device)  # noqa: E731
    return as_tensor(mean), as_tensor(std)


class PreprocessedImages(torch.utils.data.Dataset):
    """Image ``i`` of an ImageFolder decoded and preprocessed to a uint8 tensor, for DataLoader
    workers (shared by embed and eval).

    Items are ``(i, image uint8 (3, S, S), ok, reason)``. A file PIL cannot decode yields zeros,
    ``ok=False`` and a one-line reason instead of raising, so the main process decides (embed skips
    it, eval stops naming the file).
    """

    def __init__(self, root: Path, files: list[str], preprocessing: Preprocessing) -> None:
        self.root, self.files = Path(root), files
        self.transform = preprocessing.to_uint8_transform()
        self.size = preprocessing.crop_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, bool, str]:
        try:
            return i, self.transform(decode_rgb(self.root / self.files[i])), True, ""
        except UNDECODABLE_IMAGE_ERRORS as error:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'undecodable'}"
            return i, torch.zeros(3, self.size, self.size, dtype=torch.uint8), False, reason[:200]


@dataclass
class Prior:
    """A loaded prior model.

    Attributes:
        spec: the spec string it was loaded from.
        model: eval-mode module, ``(B, 3, crop, crop)`` float32 normalised -> ``(B, D)``.
        preprocessing: how images are prepared for ``model``.
        weights: provenance record: ``{"source": str, "path": str|None, "sha256": str|None}``.
    """

    spec: str
    model: nn.Module
    preprocessing: Preprocessing
    weights: dict[str, Any] = field(default_factory=dict)


class _ImageEncoder(nn.Module):
    """Adapter exposing ``open_clip`` ``encode_image`` as ``forward``."""

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        self.clip_model = clip_model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip_model.encode_image(images)


def _final_linear_name(model: nn.Module) -> str | None:
    """The module name of the last ``nn.Linear`` (the classifier) of a torchvision model, or None."""
    last_name = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name = name
    return last_name


def _drop_final_linear(model: nn.Module) -> nn.Module:
    """Replace the last ``nn.Linear`` (the classifier) of a torchvision model with identity."""
    last_name = _final_linear_name(model)
    if last_name is None:
        return model
    parent_name, _, child = last_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return model


def _check_torchvision_arch(arch: str) -> None:
    available = torchvision.models.list_models(module=torchvision.models)
    if arch not in available:
        examples = ", ".join(a for a in ("resnet18", "resnet50", "vit_b_16", "convnext_tiny") if a in available)
        raise RelaError(f"unknown torchvision architecture '{arch}' (e.g. {examples}; {len(available)} classification models available)")


def _torchvision_preprocessing(arch: str) -> Preprocessing:
    """Preprocessing of the arch's default torchvision weights (ImageNet 256/224 when it has none)."""
    try:
        transforms = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        interpolation = "bicubic" if "BICUBIC" in str(transforms.interpolation) else "bilinear"
        return Preprocessing(
            resize_size=int(transforms.resize_size[0]),
            crop_size=int(transforms.crop_size[0]),
            interpolation=interpolation,
            mean=tuple(transforms.mean),
            std=tuple(transforms.std),
        )
    except (ValueError, AttributeError, KeyError):
        return Preprocessing(resize_size=256, crop_size=224)


def _file_record(path: str, source: str) -> dict[str, Any]:
    return {"source": source, "path": os.path.abspath(path), "sha256": sha256_file(path)}


def _hub_is_reachable(host: str, timeout_s: float = 3.0) -> bool:
    """True when ``host`` resolves (a cheap offline check before a model hub download)."""
    previous = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(timeout_s)
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(previous)


@contextlib.contextmanager
def _huggingface_offline_if_unreachable() -> Iterator[bool]:
    """Switch huggingface_hub to cache-only while the hub does not resolve (fail fast offline)."""
    try:
        import huggingface_hub.constants as hf_constants
    except ImportError:  # pragma: no cover - open_clip depends on it
        yield False
        return
    offline = bool(hf_constants.HF_HUB_OFFLINE) or not _hub_is_reachable("huggingface.co")
    previous = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = offline
    try:
        yield offline
    finally:
        hf_constants.HF_HUB_OFFLINE = previous


def _load_random(arch: str, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    _check_torchvision_arch(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(arch, weights=None)
    return _drop_final_linear(model), {"source": f"random init, seed {seed}", "path": None, "sha256": None}


def _load_torchvision(arch: str, weights_file: str | None) -> tuple[nn.Module, dict[str, Any]]:
    _check_torchvision_arch(arch)
    if weights_file:
        model = torchvision.models.get_model(arch, weights=None)
        state = safe_torch_load(weights_file, "prior weights file")
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        # A file without the classifier (``rela-pipeline export --format torchvision`` of a
        # student, a self-supervised checkpoint) loads into the headless model; one with it, into
        # the whole model. Either way every other key must fit.
        head = _final_linear_name(model)
        headless = head is not None and isinstance(state, dict) and not any(str(k).removeprefix("module.").startswith(head + ".") for k in state)
        if headless:
            model = _drop_final_linear(model)
        load_state_dict_strict(model, state, f"weights file {weights_file} for torchvision {arch}")
        return (model if headless else _drop_final_linear(model)), _file_record(weights_file, "local file")
    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, AttributeError):
        raise RelaError(f"torchvision {arch} has no published weights; use random:{arch} or give a weights file") from None
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        model = torchvision.models.get_model(arch, weights=weights)
    except (OSError, RuntimeError) as error:  # URLError is an OSError
        raise RelaError(
            f"cannot fetch torchvision weights {weights} ({type(error).__name__}; offline?): put the file at {cached} or pass torchvision:{arch}:<weights file>"
        ) from None
    record = {"source": f"torchvision {weights}", "path": cached, "sha256": sha256_file(cached) if os.path.isfile(cached) else None}
    return _drop_final_linear(model), record


def _load_open_clip_file(clip_model: nn.Module, model_name: str, path: str) -> None:
    """Load a local open_clip checkpoint into ``clip_model`` with the weights-only loader
    (:func:`rela_pipeline.models.safe_torch_load`), whatever open_clip's own loader does in the
    installed version (older ones unpickled files in full, which can run code).

    Accepts a state dict, or a training checkpoint holding one under ``state_dict`` (keys may
    carry DDP's ``module.`` prefix); the positional embedding is resized to the model's grid as
    open_clip's loader does (``open_clip.model.resize_pos_embed``).

    Raises:
        RelaError: the file is not a plain weights file, or its keys or shapes do not fit.
    """
    state = safe_torch_load(path, f"open_clip weights file for {model_name}")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RelaError(f"open_clip weights file {path} does not hold a state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = clip_model.state_dict()
    for key in [k for k in state if k.endswith("position_ids") and k not in expected]:
        del state[key]  # older text towers stored them
    if "logit_scale" in state and "logit_scale" in expected and isinstance(state["logit_scale"], torch.Tensor):
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"].shape)
    resize = getattr(importlib.import_module("open_clip.model"), "resize_pos_embed", None)
    if callable(resize):
        resize(state, clip_model)
    load_state_dict_strict(clip_model, state, f"weights file {path} for open_clip {model_name}")


def _load_open_clip(model_name: str, pretrained: str) -> tuple[nn.Module, Preprocessing, dict[str, Any]]:
    import open_clip

    if model_name not in open_clip.list_models():
        raise RelaError(f"unknown open_clip model '{model_name}' ({len(open_clip.list_models())} available, e.g. ViT-B-16, RN50)")
    is_file = os.path.sep in pretrained or os.path.isfile(pretrained)
    if is_file and not os.path.isfile(pretrained):
        raise RelaError(f"open_clip weights file not found: {pretrained}")
    if pretrained == "random":
        clip_model, record = open_clip.create_model(model_name, pretrained=None), {"source": "random init (open_clip)", "path": None, "sha256": None}
    elif is_file:
        clip_model = open_clip.create_model(model_name, pretrained=None)
        _load_open_clip_file(clip_model, model_name, pretrained)
        record = _file_record(pretrained, "local file")
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise RelaError(
                f"open_clip {model_name} has no pretrained tag '{pretrained}' (tags: {', '.join(tags) or 'none'}; or give a weights file, or 'random')"
            )
        with _huggingface_offline_if_unreachable() as offline:
            try:
                clip_model = open_clip.create_model(model_name, pretrained=pretrained)
            except Exception:  # open_clip wraps hub failures in RuntimeError
                how = "the model hub is unreachable and the weights are not in the local cache" if offline else "download failed"
                raise RelaError(f"cannot load open_clip {model_name}:{pretrained}: {how}; pass open_clip:{model_name}:<weights file>") from None
        record = {"source": f"open_clip pretrained tag {pretrained}", "path": None, "sha256": None}
    cfg = getattr(clip_model.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    resize_mode = cfg.get("resize_mode", "shortest")
    preprocessing = Preprocessing(
        resize_size=size,
        crop_size=size,
        interpolation=cfg.get("interpolation", "bicubic"),
        mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        resize_mode="squash" if resize_mode == "squash" else "shortest",
    )
    return _ImageEncoder(clip_model), preprocessing, record


def _load_weights_file(path: str, what: str) -> Any:
    """A state dict from ``path``: ``safetensors.torch.load_file`` for ``.safetensors`` (no code
    can run), else :func:`rela_pipeline.models.safe_torch_load` (weights-only unpickler).

    Raises:
        RelaError: missing, unreadable or unsafe file.
    """
    if not os.path.isfile(path):
        raise RelaError(f"{what} not found: {path}")
    if path.endswith(".safetensors"):
        import safetensors.torch

        try:
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as error:  # SafetensorError, OSError: a damaged or foreign file
            raise RelaError(f"cannot read {what} {path} as safetensors: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    return safe_torch_load(path, what)


def _without_unexpected_classifier(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """Drop the classifier's keys (timm's ``pretrained_cfg["classifier"]``, e.g. ``head`` or
    ``fc``) when the headless model has none: a file saved from a timm classifier then loads into
    the ``num_classes=0`` model, every other key still checked strictly."""
    classifiers = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    expected = model.state_dict()
    return {k: v for k, v in state.items() if k in expected or not any(k.removeprefix("module.").startswith(c + ".") for c in classifiers)}


def _timm_hub_cache() -> str:
    try:
        import huggingface_hub.constants as hf_constants

        return str(hf_constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return "the Hugging Face cache"


def _load_timm(name: str, source: str, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """A timm model without classifier (``num_classes=0``, ``dynamic_img_size=True`` where it
    takes it) from pretrained weights (``source`` empty), a local weights file, or ``random``.

    Raises:
        RelaError: unknown name (with close matches), no pretrained weights for it, weights not in
            the cache while the hub is unreachable, a missing/unsafe/mismatched weights file.
    """
    import timm

    check_backbone_name(f"timm:{name}")
    spec = f"timm:{name}" + (f":{source}" if source else "")
    if source == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, _ = create_timm_model(name, dynamic=True)
        return model, {"source": f"random init (timm), seed {seed}", "path": None, "sha256": None}
    if source:
        model, _ = create_timm_model(name, dynamic=True)
        state = _load_weights_file(source, f"timm weights file for {name}")
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if isinstance(state, dict):
            state = _without_unexpected_classifier(model, state)
        load_state_dict_strict(model, state, f"weights file {source} for timm {name}")
        return model, _file_record(source, "local file")
    pretrained = timm.list_pretrained()
    if name not in pretrained and not any(p.startswith(name + ".") for p in pretrained):
        raise RelaError(f"timm {name} has no pretrained weights; use timm:{name}:random or timm:{name}:<weights file>")
    with _huggingface_offline_if_unreachable() as offline:
        try:
            model, _ = create_timm_model(name, dynamic=True, pretrained=True)
        except Exception as error:  # hub errors (LocalEntryNotFoundError, HTTPError), URLError, RuntimeError
            how = "the model hub is unreachable and the weights are not in the local cache" if offline else f"download failed ({type(error).__name__})"
            raise RelaError(f"cannot load {spec}: {how} ({_timm_hub_cache()}); pass timm:{name}:<weights file> or timm:{name}:random") from None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    tag = cfg.get("hf_hub_id") or cfg.get("url") or name
    return model, {"source": f"timm pretrained {tag}", "path": None, "sha256": None}


def _timm_preprocessing(model: nn.Module) -> Preprocessing:
    """The prior's preprocessing from timm's own data config
    (``timm.data.resolve_model_data_config``): ``crop_size`` = its input size,
    ``resize_size = floor(crop / crop_pct)``, its interpolation (bilinear unless bicubic), mean and
    std; crop mode ``squash`` resizes both sides."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    crop = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    return Preprocessing(
        resize_size=int(math.floor(crop / crop_pct)),
        crop_size=crop,
        interpolation="bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear",
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
        resize_mode="squash" if cfg.get("crop_mode") == "squash" else "shortest",
    )


def load_prior(spec: str, *, seed: int = 0, image_size: int | None = None) -> Prior:
    """Load a prior model from its spec (see module docstring for the forms).

    Args:
        spec: prior spec string.
        seed: seed of the random initialisation for ``random:``, ``open_clip:<m>:random`` and
            ``timm:<name>:random``.
        image_size: if given, resize and crop to this size (pixels) instead of the prior's own
            preprocessing: the whole image is resized to image_size x image_size without a crop
            (e.g. 32 for CIFAR-scale data); mean/std stay the prior's.

    Returns:
        A :class:`Prior` in eval mode on CPU.

    Raises:
        RelaError: unknown spec form (the message lists the valid forms), unknown architecture,
            missing/unsafe/mismatched weights file, hub weights unavailable offline, or an
            ``image_size`` a fixed-size ``checkpoint:`` backbone (a torchvision ViT) cannot take.
    """
    kind, _, rest = spec.partition(":")
    if not rest:
        raise RelaError(f"unknown prior spec '{spec}'; valid forms: {' | '.join(SPEC_FORMS)}")
    if kind == "random":
        model, weights = _load_random(rest, seed)
        preprocessing = Preprocessing(resize_size=256, crop_size=224)
    elif kind == "torchvision":
        arch, _, weights_file = rest.partition(":")
        model, weights = _load_torchvision(arch, weights_file or None)
        preprocessing = _torchvision_preprocessing(arch)
    elif kind == "open_clip":
        model_name, _, pretrained = rest.partition(":")
        if not pretrained:
            raise RelaError(f"open_clip prior needs a pretrained tag, weights file or 'random': open_clip:{model_name}:<tag|file|random>")
        if pretrained == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model, preprocessing, weights = _load_open_clip(model_name, pretrained)
            weights["source"] += f", seed {seed}"
        else:
            model, preprocessing, weights = _load_open_clip(model_name, pretrained)
    elif kind == "timm":
        model_name, _, source = rest.partition(":")
        model, weights = _load_timm(model_name, source, seed)
        preprocessing = _timm_preprocessing(model)
    elif kind == "checkpoint":
        model, meta = load_backbone_checkpoint(rest)
        weights = _file_record(rest, f"rela-pipeline checkpoint ({meta['backbone']['name']}, step {meta.get('step', 0)})")
        saved = meta.get("preprocessing")
        preprocessing = Preprocessing.from_dict(saved) if saved else Preprocessing(resize_size=256, crop_size=224)
    else:
        raise RelaError(f"unknown prior spec '{spec}'; valid forms: {' | '.join(SPEC_FORMS)}")
    if image_size is not None:
        if image_size < 8:
            raise RelaError(f"--image-size must be at least 8 pixels, got {image_size}")
        preprocessing = Preprocessing(image_size, image_size, preprocessing.interpolation, preprocessing.mean, preprocessing.std, "squash")
    check_input_size(model, preprocessing.crop_size, f"prior {spec}")
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return Prior(spec=spec, model=model, preprocessing=preprocessing, weights=weights)
