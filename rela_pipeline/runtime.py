"""Device selection, numeric precision and worker counts shared by the stages."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from .errors import RelaError
from .settings import default_num_workers  # noqa: F401  (re-exported)


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


#: Accepted ``--precision`` values.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag in
    ``/proc/cpuinfo``; False where that file does not exist). Without it, bf16 autocast on CPU is
    emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


@dataclass(frozen=True)
class Precision:
    """How the training forward and backward passes compute.

    Attributes:
        name: "fp32", "bf16" or "fp16".
        device_type: "cpu" or "cuda".

    Under ``bf16``/``fp16`` the forward pass runs in ``torch.autocast``; parameters, optimiser
    state, losses (the callers compute them on ``.float()`` inputs outside autocast), the EMA
    teacher update and the ReLA schedule stay in fp32. ``fp16`` adds a dynamic loss scale
    (``torch.amp.GradScaler``).
    """

    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        """The autocast dtype (float32 for ``fp32``)."""
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    def autocast(self) -> Any:
        """A new autocast context (a no-op for ``fp32``)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def full_precision(self) -> Any:
        """A context that turns autocast off (for losses and the probe)."""
        return torch.autocast(self.device_type, enabled=False)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, enabled for ``fp16`` only (otherwise its calls pass through)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


def resolve_precision(spec: str, device: torch.device) -> Precision:
    """Resolve ``--precision`` for ``device``.

    ``auto``: bf16 on CUDA where supported (else fp16), bf16 on CPUs with native bf16
    (:func:`cpu_has_native_bf16`), else fp32.

    Raises:
        RelaError: an unknown value, or bf16 on a GPU without bf16 support.
    """
    if spec not in PRECISIONS:
        raise RelaError(f"--precision must be one of {', '.join(PRECISIONS)}, got {spec!r}")
    cuda = device.type == "cuda"
    if spec == "auto":
        if cuda:
            spec = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            spec = "bf16" if cpu_has_native_bf16() else "fp32"
    if spec == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise RelaError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; use fp16 or fp32")
    return Precision(spec, device.type)


def resolve_prior_precision(spec: str, device: torch.device) -> Precision:
    """Resolve stage one's ``--precision`` for the prior's forward pass on ``device``.

    ``auto`` is fp32 on every device: the transport standardises every kept component to unit
    variance, and in bf16 the trailing components of a prior's embeddings are rounding noise
    (measured per component against fp32 by ``benchmarks/prior_precision.py``; the docs' results
    page). ``bf16``/``fp16`` are honoured when asked for, for speed.

    Raises:
        RelaError: as :func:`resolve_precision`.
    """
    return resolve_precision("fp32" if spec == "auto" else spec, device)


def uses_channels_last(module: torch.nn.Module) -> bool:
    """Whether a student benefits from the channels-last memory format: it has a 2-D convolution
    other than a patch embedding (measured on the 2-core CPU: the ConvNet's BYOL step 1.6x faster
    in fp32, 2.7x with bf16; the usual advice for convolutions on GPUs with tensor cores).

    A patch embedding is a convolution whose kernel equals its stride and is larger than 1
    (non-overlapping patches: ViT's 16x16/16, Swin's 4x4/4). A model whose only convolutions are
    patch embeddings (ViT, DeiT, Swin) computes in its attention and MLP layers on token
    sequences, where the image memory format does not apply, so it stays contiguous; ResNets,
    MobileNets, ConvNeXts (patchify stem, then 7x7 depthwise convolutions) and hybrids return
    True.

    Args:
        module: the student (any ``nn.Module``).
    """
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            patchify = tuple(m.kernel_size) == tuple(m.stride) and max(m.kernel_size) > 1 and m.padding in ((0, 0), 0, "valid")
            if not patchify:
                return True
    return False


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on ``device`` has finished (a no-op on CPU), so that a clock read
    next measures finished work rather than queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HostScalar:
    """A scalar tensor's value on its way to the host, without stalling the device queue.

    On CUDA the value is copied into pinned host memory with ``non_blocking=True`` and a CUDA
    event is recorded behind the copy; :meth:`value` then waits for that event only, i.e. for the
    work queued *before* the copy, not for everything queued since. On CPU the tensor is kept as
    it is and read when asked.

    Args:
        tensor: a 0-dim (or one-element) tensor on any device, or a Python number.
    """

    def __init__(self, tensor: torch.Tensor | float) -> None:
        self._event = None
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "cuda":
            self._host = torch.empty((), dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor.detach().reshape(()), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor

    def value(self) -> float:
        """The value as a Python float (waits for the copy on CUDA: a partial sync)."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return float(self._host)
