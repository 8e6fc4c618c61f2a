"""Student backbones and the project's backbone checkpoint format.

A backbone maps a float image batch ``(B, 3, H, W)`` to pooled features ``(B, feature_dim)``.
Stage two trains them; stage one can use a saved one as a ``checkpoint:`` prior.

Backbone names (:func:`build_backbone`):

=========================  ===========================================================================
``convnet``                :class:`SmallConvNet` (4 conv blocks, 256-d)
``resnet18``, ``resnet50``  :class:`TorchvisionResNet` (torchvision's, without ``fc``)
``torchvision:<arch>``     :class:`TorchvisionBackbone`: any classification model of
                           ``torchvision.models.list_models(module=torchvision.models)``, its last
                           classifier ``nn.Linear`` replaced by identity
``timm:<name>``            :class:`TimmBackbone`: ``timm.create_model(name, num_classes=0, ...)``
=========================  ===========================================================================

Checkpoint format (a plain dict, loadable with ``torch.load(path, weights_only=True)``)::

    {"format": "rela-pipeline/backbone", "format_version": 1,
     "backbone": {"name": "resnet18", "cifar_stem": True}            # short names
              or {"name": "timm:vit_tiny_patch16_224", "cifar_stem": True, "image_size": 32},
     "feature_dim": 512, "state_dict": {...}, "preprocessing": {...} | None,
     "step": int, "config": {...}, "training_state": {...}  (optional; see stages/train.py)}

``image_size`` is recorded for library backbones only (it sets the input size of ViTs); a
checkpoint without it loads as before.
"""

from __future__ import annotations

import difflib
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

#: Short backbone names accepted by :func:`build_backbone` (besides ``torchvision:`` and ``timm:``).
BACKBONES = ("convnet", "resnet18", "resnet50")

#: Prefixes of the backbones taken from a model library.
LIBRARY_PREFIXES = ("torchvision:", "timm:")

#: Attributes of a torchvision classifier that hold its classification head.
TORCHVISION_HEADS = ("fc", "classifier", "head", "heads")

#: torchvision classification models whose head ends in a convolution, not an ``nn.Linear``
#: (SqueezeNet: ``Conv2d -> ReLU -> AdaptiveAvgPool2d``): no pooled-feature output to keep.
#: A test builds every classification model on the meta device and checks this set.
TORCHVISION_WITHOUT_LINEAR_HEAD = frozenset({"squeezenet1_0", "squeezenet1_1"})

#: Constructor arguments some torchvision classifiers need to train as a student: no auxiliary
#: classifiers (they change the training-mode output to a tuple), and the current initialisation
#: (silences torchvision's warning about a future default).
TORCHVISION_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


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
    """A torchvision ResNet without its classifier, optionally with the CIFAR stem (the short
    names ``resnet18`` and ``resnet50``).

    The CIFAR stem (3x3 conv, stride 1, no max-pool; He et al. 2016, section 4.2, as used by ReLA
    for 32 px data) keeps spatial resolution for images of 64 px and below.
    Input ``(B, 3, H, W)`` float, output ``(B, feature_dim)`` (512 for resnet18, 2048 for resnet50).
    State-dict keys are torchvision's with the prefix ``net.``.
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


def _apply_cifar_stem(net: nn.Module) -> bool:
    """Replace a ResNet's stem (``conv1``, ``maxpool``) by a 3x3 stride-1 convolution with the
    same output channels (``bn1.num_features``) and no max-pool (He et al. 2016, section 4.2).

    Applies to torchvision's ``ResNet`` (ResNet, ResNeXt, Wide ResNet) and timm's ``ResNet``
    (its ResNet, ResNeXt, SE/ECA variants, deep stems included); returns False, changing nothing,
    for every other model.
    """
    resnet_classes: tuple[type, ...] = (torchvision.models.ResNet,)
    try:
        from timm.models.resnet import ResNet as TimmResNet

        resnet_classes += (TimmResNet,)
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    if not isinstance(net, resnet_classes) or not all(isinstance(getattr(net, a, None), nn.Module) for a in ("conv1", "bn1", "maxpool")):
        return False
    net.conv1 = nn.Conv2d(3, net.bn1.num_features, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return True


def _last_linear(module: nn.Module) -> tuple[str, nn.Linear] | None:
    """``(dotted name, layer)`` of the last ``nn.Linear`` inside ``module`` (itself included), or None."""
    found = None
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear):
            found = (name, child)
    return found


class TorchvisionBackbone(nn.Module):
    """Any torchvision classification model as a student (``torchvision:<arch>``), randomly
    initialised (``weights=None``), without its classifier.

    The last ``nn.Linear`` of the model's head attribute (the first of :data:`TORCHVISION_HEADS`
    it has: ``fc``, ``classifier``, ``head``, ``heads``) is replaced by ``nn.Identity``, so the
    output is the input of that layer: the pooled penultimate features (e.g. 512 for resnet18,
    1024 for mobilenet_v3_small, 768 for vit_b_16).

    Args:
        arch: a name of ``torchvision.models.list_models(module=torchvision.models)``.
        cifar_stem: for ResNets (ResNet, ResNeXt, Wide ResNet), the 3x3 stride-1 stem without
            max-pool; ignored by every other model (:attr:`cifar_stem` records whether it applied).
        image_size: input pixels S of the square training views; sets ``image_size`` of the ViTs
            (``vit_*``, which then take only S x S inputs, S divisible by the patch size) and
            ``input_size`` of MaxViT; ignored by the others (they pool any size).

    Attributes:
        net: the torchvision model (state-dict keys are torchvision's with the prefix ``net.``).
        feature_dim: F, the output width.
        kwargs: constructor arguments given to ``torchvision.models.get_model`` besides
            ``weights=None`` (what rebuilds the same architecture).
        head: dotted name of the replaced classifier inside :attr:`net` (e.g. ``fc``, ``classifier.3``).
        head_keys: that classifier's state-dict keys in torchvision's model (``fc.weight``, ``fc.bias``).
        cifar_stem: whether the CIFAR stem was applied.
        fixed_image_size: S when the model takes only S x S inputs (torchvision ViTs), else None.

    Input ``(B, 3, H, W)`` float, output ``(B, F)``.

    Raises:
        RelaError: an unknown arch, a model without a pooled-feature output, or one that cannot
            be built at ``image_size``.
    """

    def __init__(self, arch: str, cifar_stem: bool = False, image_size: int | None = None) -> None:
        super().__init__()
        check_backbone_name(f"torchvision:{arch}")
        kwargs: dict[str, Any] = dict(TORCHVISION_KWARGS.get(arch, {}))
        self.fixed_image_size = None
        if image_size is not None and arch.startswith("vit_"):
            kwargs["image_size"] = self.fixed_image_size = int(image_size)
        elif image_size is not None and arch.startswith("maxvit_"):
            kwargs["input_size"] = [int(image_size), int(image_size)]
        try:
            net = torchvision.models.get_model(arch, weights=None, **kwargs)
        except (AssertionError, ValueError, RuntimeError) as error:
            raise RelaError(f"cannot build torchvision:{arch} with {kwargs or 'its defaults'}: {_first_line(error)}") from None
        self.cifar_stem = _apply_cifar_stem(net) if cifar_stem else False
        head_attr = next((a for a in TORCHVISION_HEADS if isinstance(getattr(net, a, None), nn.Module)), None)
        found = _last_linear(getattr(net, head_attr)) if head_attr else None
        if found is None:
            raise RelaError(f"torchvision:{arch} has no pooled-feature output (no nn.Linear in its head); choose another model")
        inner, linear = found
        self.head = f"{head_attr}.{inner}" if inner else head_attr
        self.feature_dim = int(linear.in_features)
        self.head_keys = [f"{self.head}.{key}" for key, _ in linear.named_parameters()]
        parent_name, _, child = self.head.rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, child, nn.Identity())
        self.arch, self.kwargs, self.net = arch, kwargs, net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class TimmBackbone(nn.Module):
    """Any timm model as a student (``timm:<name>``): ``timm.create_model(name,
    pretrained=False, num_classes=0, **kwargs)``, whose output is the pooled pre-logits features
    (``feature_dim = model.num_features``).

    Args:
        name: a timm model name (``timm.list_models()``; a pretrained tag such as
            ``resnet18.a1_in1k`` is accepted and does not change the architecture).
        cifar_stem: for timm ResNets (``timm.models.resnet.ResNet``: ``conv1``, ``bn1``,
            ``maxpool``), the 3x3 stride-1 stem without max-pool; ignored by every other model.
        image_size: input pixels S of the training views; models whose constructor takes
            ``img_size`` (ViT, DeiT, BEiT, EVA, Swin, ...) get ``img_size=S``, and
            ``dynamic_img_size=True`` where they take it too (then other input sizes still work,
            the position embeddings interpolated: DINO's local crops, eval at another size).
            Detected by trying the keyword (a ``TypeError`` naming it means "not taken").

    Attributes:
        net: the timm model (state-dict keys are timm's with the prefix ``net.``).
        feature_dim: F.
        kwargs: the constructor arguments besides ``pretrained=False, num_classes=0``.
        cifar_stem: whether the CIFAR stem was applied.
        fixed_image_size: S when the model takes only S x S inputs (``img_size`` without dynamic
            sizes), else None.

    Input ``(B, 3, H, W)`` float, output ``(B, F)``.

    Raises:
        RelaError: an unknown name, or a model that cannot be built at ``image_size``.
    """

    def __init__(self, name: str, cifar_stem: bool = False, image_size: int | None = None) -> None:
        super().__init__()
        check_backbone_name(f"timm:{name}")
        try:
            net, kwargs = create_timm_model(name, image_size=image_size)
        except (AssertionError, ValueError, RuntimeError, TypeError) as error:
            raise RelaError(f"cannot build timm:{name} at image size {image_size}: {_first_line(error)}") from None
        self.fixed_image_size = int(image_size) if "img_size" in kwargs and not kwargs.get("dynamic_img_size") else None
        self.cifar_stem = _apply_cifar_stem(net) if cifar_stem else False
        self.feature_dim = int(net.num_features)
        self.name, self.kwargs, self.net = name, kwargs, net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def create_timm_model(name: str, *, image_size: int | None = None, dynamic: bool = False, **extra: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model(name, num_classes=0, **extra, **size_kwargs)`` with the size keywords
    the model takes: ``img_size=image_size`` (when given) and ``dynamic_img_size=True`` (when
    ``image_size`` or ``dynamic`` is given), each tried and dropped on a ``TypeError`` naming it
    ("unexpected keyword argument"). The random state is restored before every try, so the
    initialisation does not depend on the tries.

    Args:
        name: a timm model name.
        image_size: S, the input size to build for (pixels), or None for the model's default.
        dynamic: ask for ``dynamic_img_size=True`` even without ``image_size`` (priors, which
            then take any input size with their pretrained position embeddings).
        extra: more keywords of ``timm.create_model`` (e.g. ``pretrained=True``).

    Returns:
        ``(model, size_kwargs)``: the model and the size keywords it took.

    Raises:
        Exception: whatever ``timm.create_model`` raises, other than the ``TypeError`` of a
            refused size keyword (callers turn it into a :class:`RelaError` naming the model).
    """
    import timm

    wanted: dict[str, Any] = {}
    if image_size is not None:
        wanted["img_size"] = int(image_size)
    if image_size is not None or dynamic:
        wanted["dynamic_img_size"] = True
    state = torch.get_rng_state()
    while True:
        torch.set_rng_state(state)
        try:
            return timm.create_model(name, num_classes=0, **extra, **wanted), wanted
        except TypeError as error:
            refused = next((k for k in wanted if f"unexpected keyword argument '{k}'" in str(error)), None)
            if refused is None:
                raise
            del wanted[refused]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_backbone_name(name: str) -> None:
    """Check a backbone name without building a model.

    Accepts the :data:`BACKBONES`, ``torchvision:<arch>`` for the classification models of
    ``torchvision.models.list_models(module=torchvision.models)`` with a linear classifier, and
    ``timm:<name>`` for the names of ``timm.list_models()`` (a pretrained tag after a dot allowed).

    Raises:
        RelaError: one line: an unknown name (with close matches from ``difflib``), a torchvision
            detection, segmentation, video, optical-flow or quantized model, or a classifier
            without a pooled-feature output (:data:`TORCHVISION_WITHOUT_LINEAR_HEAD`).
    """
    if name in BACKBONES:
        return
    library, _, model = name.partition(":")
    if library == "torchvision" and model:
        classification = torchvision.models.list_models(module=torchvision.models)
        if model in TORCHVISION_WITHOUT_LINEAR_HEAD:
            raise RelaError(f"torchvision:{model} has no pooled-feature output (its classifier ends in a Conv2d, not an nn.Linear); choose another model")
        if model in classification:
            return
        if model in torchvision.models.list_models():
            kind = next(
                (
                    label
                    for label, sub in (
                        ("a detection", "detection"),
                        ("a segmentation", "segmentation"),
                        ("a video", "video"),
                        ("an optical-flow", "optical_flow"),
                        ("a quantized", "quantization"),
                    )
                    if model in torchvision.models.list_models(module=getattr(torchvision.models, sub))
                ),
                "not a classification",
            )
            raise RelaError(
                f"torchvision:{model} is {kind} model, not an image classifier with pooled features; choose one of torchvision.models.list_models(module=torchvision.models)"
            )
        raise RelaError(
            f"unknown torchvision model '{model}'{_close_matches(model, classification, 'torchvision:')} ({len(classification)} classification models)"
        )
    if library == "timm" and model:
        import timm

        if timm.is_model(model):
            return
        names = timm.list_models()
        raise RelaError(f"unknown timm model '{model}'{_close_matches(model, names, 'timm:')} ({len(names)} models in timm.list_models())")
    forms = ", ".join((*BACKBONES, "torchvision:<arch>", "timm:<name>"))
    raise RelaError(f"unknown backbone '{name}'; choose one of: {forms}")


def _close_matches(name: str, names: list[str], prefix: str) -> str:
    matches = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(prefix + m for m in matches)}?" if matches else ""


def backbone_config(name: str, cifar_stem: bool = False, image_size: int | None = None) -> dict[str, Any]:
    """The keyword arguments of :func:`build_backbone` that rebuild a student, as checkpoints
    record them: ``{"name", "cifar_stem"}`` for the short names (as before), plus
    ``"image_size"`` for ``torchvision:`` and ``timm:`` backbones.
    """
    config: dict[str, Any] = {"name": name, "cifar_stem": bool(cifar_stem)}
    if name.startswith(LIBRARY_PREFIXES):
        config["image_size"] = int(image_size) if image_size is not None else None
    return config


def build_backbone(name: str, cifar_stem: bool = False, image_size: int | None = None) -> nn.Module:
    """Build a randomly initialised student backbone by name.

    Args:
        name: one of :data:`BACKBONES`, ``torchvision:<arch>`` (:class:`TorchvisionBackbone`) or
            ``timm:<name>`` (:class:`TimmBackbone`).
        cifar_stem: for ResNets (the short names, torchvision's and timm's), use the 3x3
            stride-1 stem without max-pool; ignored by the ConvNet and by non-ResNet models.
        image_size: S, pixels of the square training views: the input size of ViTs
            (``torchvision:vit_*``, timm models taking ``img_size``); ignored by the short names
            and by models that pool any input size. Library backbones are checked with one
            forward pass of a ``(1, 3, S, S)`` batch in eval mode (no gradients, no running
            statistics touched), so a size the model cannot take fails here.

    Returns:
        A module with attribute ``feature_dim`` mapping float ``(B, 3, H, W)`` to
        ``(B, feature_dim)``.

    Raises:
        RelaError: an unknown name (see :func:`check_backbone_name`), a model without a
            pooled-feature output, or one that cannot run at ``image_size``.
    """
    if name == "convnet":
        return SmallConvNet()
    if name in ("resnet18", "resnet50"):
        return TorchvisionResNet(name, cifar_stem=cifar_stem)
    check_backbone_name(name)
    library, _, model = name.partition(":")
    backbone = (TorchvisionBackbone if library == "torchvision" else TimmBackbone)(model, cifar_stem=cifar_stem, image_size=image_size)
    if image_size is not None:
        _check_forward(backbone, name, int(image_size))
    return backbone


def check_input_size(backbone: nn.Module, image_size: int, what: str) -> None:
    """Refuse an input size a fixed-size backbone cannot take (``fixed_image_size`` of
    :class:`TorchvisionBackbone` and :class:`TimmBackbone`: torchvision ViTs, timm models built
    with ``img_size`` but no dynamic sizes); every other backbone takes any size.

    Args:
        backbone: a module from :func:`build_backbone` or :func:`load_backbone_checkpoint`.
        image_size: pixels S of the square inputs it is about to get.
        what: how to name the backbone in the message (e.g. the checkpoint path).

    Raises:
        RelaError: ``image_size`` differs from the size the backbone was built for.
    """
    fixed = getattr(backbone, "fixed_image_size", None)
    if fixed is not None and int(image_size) != int(fixed):
        raise RelaError(f"{what} takes only {fixed} x {fixed} px inputs (built for that size), not {image_size}; drop --image-size or pass {fixed}")


def _check_forward(backbone: nn.Module, name: str, image_size: int) -> None:
    """One eval-mode forward of a ``(1, 3, S, S)`` batch: the output must be ``(1, feature_dim)``.

    Raises:
        RelaError: the model fails at that size or returns another shape.
    """
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError, IndexError) as error:
        raise RelaError(f"{name} cannot take {image_size} x {image_size} px images: {_first_line(error)}") from None
    finally:
        backbone.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, backbone.feature_dim):
        raise RelaError(f"{name} returns {tuple(getattr(out, 'shape', ()))} for one image, not pooled features (1, {backbone.feature_dim})")


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
            "cifar_stem": True}`` (:func:`backbone_config` makes them).
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
        RelaError: missing or unsafe file, not this project's format, an architecture this
            installation cannot build (e.g. a timm model of a newer timm), or weights that do not
            fit the recorded architecture.
    """
    payload = safe_torch_load(path, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise RelaError(f"{path} is not a rela-pipeline backbone checkpoint (no format '{CHECKPOINT_FORMAT}')")
    if payload.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise RelaError(f"{path} has checkpoint format_version {payload.get('format_version')}; this version reads {CHECKPOINT_FORMAT_VERSION}")
    config = payload.get("backbone")
    if not isinstance(config, dict) or "name" not in config:
        raise RelaError(f"{path} does not record its backbone architecture")
    image_size = config.get("image_size")
    backbone = build_backbone(str(config["name"]), cifar_stem=bool(config.get("cifar_stem", False)), image_size=int(image_size) if image_size else None)
    load_state_dict_strict(backbone, payload["state_dict"], f"checkpoint {path}")
    backbone.eval()
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "training_state")}
    return backbone, meta
