"""The ``export`` stage: a trained backbone's weights under the keys of its library's own model.

``rela-pipeline train`` saves students in the project's checkpoint format
(:mod:`rela_pipeline.models`: the weights under a wrapper's ``net.`` prefix, inside a dict with
the run's metadata). Teams load weights into their own code, so :func:`export_backbone` writes:

=================  ==================================================================================
``torchvision``    the keys of ``torchvision.models.get_model(arch, weights=None, **kwargs)``:
                   ``model.load_state_dict(sd, strict=False)`` reports only the head's keys missing
                   (the classifier the student never had, e.g. ``fc.weight``, ``fc.bias``)
``timm``           the keys of ``timm.create_model(name, num_classes=0, **kwargs)``, which loads it
                   with ``strict=True``
``state_dict``     the project's backbone keys as they are (``build_backbone(**config)`` loads them)
=================  ==================================================================================

A student trained with the CIFAR stem (3x3 stride-1 ``conv1``, no max-pool) has a ``conv1`` of
another shape than the library's model: the user swaps ``conv1`` and ``maxpool`` before loading
(the printed lines and the sidecar say so). Every export also writes ``FILE.json`` (the sidecar):
library, architecture, constructor keywords, CIFAR stem, feature width, step, the checkpoint and
run it came from, the checkpoint's preprocessing, and the lines that load it.

Short names: ``convnet`` exports only as ``state_dict``; ``resnet18``/``resnet50`` are torchvision
ResNets and export as ``torchvision``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RelaError
from ..fileio import atomic_write, write_json_atomic
from ..models import load_backbone_checkpoint

#: Accepted ``--format`` values.
EXPORT_FORMATS = ("torchvision", "timm", "state_dict")

#: The run directory's final backbone (what ``export RUN`` reads).
BACKBONE_FILE = "backbone.pt"


def resolve_checkpoint(run_or_checkpoint: str | os.PathLike) -> tuple[Path, Path | None]:
    """``(checkpoint file, run directory or None)`` for a run directory (its ``backbone.pt``) or
    a checkpoint file.

    Raises:
        RelaError: nothing at the path, or a directory without ``backbone.pt`` (naming
            ``checkpoints/last.pt`` when the run has one).
    """
    path = Path(run_or_checkpoint)
    if path.is_dir():
        checkpoint = path / BACKBONE_FILE
        if checkpoint.is_file():
            return checkpoint, path
        last = path / "checkpoints" / "last.pt"
        hint = f"; export {last} (the last epoch's checkpoint) instead" if last.is_file() else ""
        raise RelaError(f"{path} is not a finished run directory (no {BACKBONE_FILE}){hint}")
    if path.is_file():
        run = path.parent if path.name == BACKBONE_FILE else path.parent.parent if path.parent.name == "checkpoints" else None
        return path, run
    raise RelaError(f"no run directory or checkpoint at {path}")


def formats_for(name: str) -> tuple[str, ...]:
    """The export formats that fit a backbone name: ``state_dict`` always, plus ``torchvision``
    for ``resnet18``/``resnet50``/``torchvision:<arch>`` and ``timm`` for ``timm:<name>``."""
    if name in ("resnet18", "resnet50") or name.startswith("torchvision:"):
        return ("torchvision", "state_dict")
    if name.startswith("timm:"):
        return ("timm", "state_dict")
    return ("state_dict",)


def _module_expression(dotted: str) -> str:
    """``classifier.3`` -> ``model.classifier[3]``: the Python that names a submodule."""
    out = "model"
    for part in dotted.split("."):
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


def _kwargs_source(kwargs: dict[str, Any]) -> str:
    return "".join(f", {k}={v!r}" for k, v in kwargs.items())


def _library_weights(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights under its library model's keys (the wrapper's ``net.`` dropped)."""
    return {k.removeprefix("net."): v for k, v in backbone.state_dict().items() if k.startswith("net.")}


def load_lines(info: dict[str, Any], path: str) -> list[str]:
    """The Python lines that load an export described by ``info`` (the sidecar) from ``path``.

    Returns:
        Lines: the imports, the constructor, the CIFAR stem swap when the student had it, the
        ``load_state_dict`` call, and for torchvision the head replaced by identity (so the model
        returns the ``(B, feature_dim)`` features the student was trained to give).
    """
    reader = f"safetensors.torch.load_file({path!r})" if info["file_format"] == "safetensors" else f"torch.load({path!r}, weights_only=True)"
    imports = "import safetensors.torch, torch" if info["file_format"] == "safetensors" else "import torch"
    stem = []
    if info.get("cifar_stem"):
        channels = info["stem_channels"]
        stem = [f"model.conv1, model.maxpool = torch.nn.Conv2d(3, {channels}, 3, 1, 1, bias=False), torch.nn.Identity()  # the CIFAR stem"]
    if info["format"] == "torchvision":
        missing = ", ".join(info["missing_keys"])
        return [
            f"{imports}, torchvision",
            f"model = torchvision.models.get_model({info['arch']!r}, weights=None{_kwargs_source(info['kwargs'])})",
            *stem,
            f"model.load_state_dict({reader}, strict=False)  # missing: {missing} (the classifier)",
            f"{_module_expression(info['head'])} = torch.nn.Identity()  # (B, 3, H, W) -> (B, {info['feature_dim']}) features",
        ]
    if info["format"] == "timm":
        return [
            f"{imports}, timm",
            f"model = timm.create_model({info['name']!r}, num_classes=0{_kwargs_source(info['kwargs'])})  # (B, 3, H, W) -> (B, {info['feature_dim']})",
            *stem,
            f"model.load_state_dict({reader}, strict=True)",
        ]
    config = info["backbone"]
    args = ", ".join(f"{k}={v!r}" for k, v in config.items() if k != "name")
    return [
        f"{imports}; from rela_pipeline.models import build_backbone",
        f"model = build_backbone({config['name']!r}{', ' + args if args else ''})  # (B, 3, H, W) -> (B, {info['feature_dim']})",
        f"model.load_state_dict({reader}, strict=True)",
    ]


def export_backbone(run_or_checkpoint: str | os.PathLike, format: str, out: str | os.PathLike, safetensors: bool = False) -> dict[str, Any]:
    """Write a trained backbone's weights for its library's own model (see the module docstring).

    Args:
        run_or_checkpoint: a run directory (its ``backbone.pt`` is read) or a checkpoint file in
            the project's format (``RUN/backbone.pt``, ``RUN/checkpoints/last.pt``).
        format: one of :data:`EXPORT_FORMATS`; it must fit the backbone (:func:`formats_for`).
        out: the weights file to write (parent folders are created). Written atomically (a
            temporary name, then renamed: :func:`rela_pipeline.fileio.atomic_write`), as is the
            sidecar ``out + ".json"``.
        safetensors: write safetensors (``safetensors.torch.save_file``'s format, with the
            library and architecture in its metadata) instead of ``torch.save`` of a plain dict
            of tensors (loadable with ``torch.load(weights_only=True)``).

    Returns:
        The sidecar's content plus ``"path"`` and ``"sidecar"``: ``{"format", "file_format"
        ("safetensors" | "torch"), "library", "arch" (torchvision) | "name" (timm), "kwargs"
        (constructor keywords besides ``weights=None`` / ``num_classes=0``), "cifar_stem",
        "stem_channels", "head" and "missing_keys" (torchvision), "feature_dim", "tensors",
        "step", "backbone" (the project's config), "preprocessing", "checkpoint", "run",
        "load" (lines of Python)}``. Tensors are float32 (BatchNorm counters int64), on CPU.

    Raises:
        RelaError: an unknown format, a format that does not fit the backbone (the message names
            those that do), a missing run or checkpoint, a checkpoint that does not load (see
            :func:`rela_pipeline.models.load_backbone_checkpoint`), or an ``out`` ending in
            ``.safetensors`` without ``safetensors=True``.
    """
    if format not in EXPORT_FORMATS:
        raise RelaError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    out = Path(out)
    if out.suffix == ".safetensors" and not safetensors:
        raise RelaError(f"{out} ends in .safetensors but would be written with torch.save: add --safetensors (or name it .pt)")
    if out.is_dir():
        raise RelaError(f"--out {out} is a directory; give the file to write")
    checkpoint, run = resolve_checkpoint(run_or_checkpoint)
    backbone, meta = load_backbone_checkpoint(checkpoint)
    config = dict(meta["backbone"])
    name = str(config["name"])
    fitting = formats_for(name)
    if format not in fitting:
        raise RelaError(f"{name} exports as --format {' or '.join(fitting)}, not {format}")

    info: dict[str, Any] = {
        "format": format,
        "file_format": "safetensors" if safetensors else "torch",
        "feature_dim": int(backbone.feature_dim),
        "step": int(meta.get("step", 0)),
        "backbone": config,
        "preprocessing": meta.get("preprocessing"),
        "checkpoint": str(checkpoint.resolve()),
        "run": str(run.resolve()) if run is not None else None,
    }
    if format == "state_dict":
        weights = backbone.state_dict()
        info["library"] = "rela-pipeline"
    else:
        weights = _library_weights(backbone)
        net = backbone.net
        cifar_stem = bool(getattr(backbone, "cifar_stem", config.get("cifar_stem", False)))
        info.update(library=format, kwargs=dict(getattr(backbone, "kwargs", {})), cifar_stem=cifar_stem)
        if cifar_stem:
            info["stem_channels"] = int(net.conv1.out_channels)
        if format == "torchvision":
            head = getattr(backbone, "head", "fc")
            info.update(arch=getattr(backbone, "arch", name.removeprefix("torchvision:")), head=head)
            info["missing_keys"] = list(getattr(backbone, "head_keys", [f"{head}.weight", f"{head}.bias"]))
        else:
            info["name"] = backbone.name
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    info["tensors"] = len(tensors)
    info["load"] = load_lines(info, str(out))

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as handle:
        if safetensors:
            import safetensors.torch

            keys = ("format", "library", "arch", "name", "feature_dim", "step", "cifar_stem")
            metadata = {k: str(info[k]) for k in keys if k in info} | {"kwargs": json.dumps(info.get("kwargs", {})), "exported_by": "rela-pipeline export"}
            handle.write(safetensors.torch.save(tensors, metadata=metadata))
        else:
            torch.save(tensors, handle)
    sidecar = out.with_name(out.name + ".json")
    write_json_atomic(sidecar, info)
    return {**info, "path": str(out), "sidecar": str(sidecar)}
