"""Device selection and mixed precision shared by the stages."""

from __future__ import annotations

import contextlib

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
