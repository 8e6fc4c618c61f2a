"""Device selection and mixed precision shared by the stages."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from .errors import RelaError


def resolve_device(device: str) -> torch.device:
    """Map "auto" to CUDA when available, else CPU; check an explicit CUDA request.

    Raises:
        RelaError: CUDA requested but not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RelaError(f"--device {device} requested but CUDA is not available")
    return resolved


def autocast_for(device: torch.device, enabled: bool):
    """Autocast context for forward passes: bfloat16 on CUDA (float16 where bf16 is
    unsupported), a no-op on CPU or when ``enabled`` is False."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def autocast_and_scaler(device: torch.device, enabled: bool) -> tuple[Callable[[], Any], torch.amp.GradScaler]:
    """Mixed precision for training: a factory of autocast contexts and a gradient scaler.

    bfloat16 where the GPU supports it (no loss scaling needed); float16 with a dynamic loss
    scale otherwise; on CPU or when ``enabled`` is False, no autocast and a disabled scaler (its
    ``scale``/``step``/``update`` are then plain pass-throughs).
    """
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext, torch.amp.GradScaler("cuda", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return (lambda: torch.autocast("cuda", dtype=dtype)), torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
