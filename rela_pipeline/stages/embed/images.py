"""Embedding images with the prior: batched, on the device, into a memory-map."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ...errors import RelaError
from ...imagefolder import UNDECODABLE_IMAGE_ERRORS
from ...priors import Preprocessing, Prior
from ...runtime import Precision
from ...sources import ImageSource
from .decoding import AnnouncedBatches, DecodeCounts, EncodedImages, collate_encoded, decode_on_device

#: The default device of :func:`embed_images`.
CPU = torch.device("cpu")


@dataclass
class EmbeddingResult:
    """Outcome of :func:`embed_images` (the rows it embedded; the embeddings are in the memory-map).

    Attributes:
        failures: ``{row: reason}`` for rows whose image did not decode or whose embedding is not
            finite (their rows in the memory-map are zero).
        images: rows embedded by this call (``N - start_row``).
        seconds: wall-clock of the embedding loop.
        decoded_by: on the ``gpu`` decode path, images per decoder (``{"device", "cpu",
            "failed"}``, :class:`.decoding.DecodeCounts`); None on the CPU path.
    """

    failures: dict[int, str]
    images: int
    seconds: float
    decoded_by: dict[str, int] | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


class SourceImages(AnnouncedBatches, torch.utils.data.Dataset):
    """Rows ``start .. stop - 1`` of an image source decoded and preprocessed to uint8 in a
    DataLoader worker (the ``cpu`` decode path).

    Items are ``(i, image uint8 (3, S, S), ok, reason)`` (``i`` counted from ``start``). An image
    that does not decode yields zeros, ``ok=False`` and a one-line reason instead of raising, so
    the main process skips and counts it. A batch's files are announced to the kernel before its
    first image is decoded (:func:`rela_pipeline.fileio.announce_byte_ranges`), so their disk
    reads run together rather than one at a time.
    """

    def __init__(self, source: ImageSource, start: int, stop: int, preprocessing: Preprocessing) -> None:
        self.source, self.start, self.stop = source, start, stop
        self.transform = preprocessing.to_uint8_transform()
        self.size = preprocessing.crop_size

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, bool, str]:
        try:
            return i, self.transform(self.source.open_image(self.start + i)), True, ""
        except UNDECODABLE_IMAGE_ERRORS as error:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'undecodable'}"
            return i, torch.zeros(3, self.size, self.size, dtype=torch.uint8), False, reason[:200]


def embedding_dim(prior: Prior, device: torch.device) -> int:
    """Output dimension D of the prior (one forward pass on two blank images on ``device``; the
    model must already be there).

    Raises:
        RelaError: the prior does not return a ``(B, D)`` tensor.
    """
    size = prior.preprocessing.crop_size
    with torch.inference_mode():
        out = prior.model(prior.preprocessing.normalise(torch.zeros(2, 3, size, size, dtype=torch.uint8, device=device)))
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise RelaError(f"prior {prior.spec} returns {getattr(out, 'shape', type(out))}, expected (batch, dim) embeddings")
    return int(out.shape[1])


@contextlib.contextmanager
def _deterministic_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def embed_images(
    index: ImageSource,
    prior: Prior,
    embeddings: np.ndarray,
    *,
    start_row: int = 0,
    stop_row: int | None = None,
    batch_size: int = 256,
    num_workers: int = 2,
    device: torch.device = CPU,
    precision: Precision | None = None,
    decode: str = "cpu",
    progress: bool = True,
    on_checkpoint: Callable[[int, int, dict[int, str]], None] | None = None,
    checkpoint_seconds: float = 60.0,
) -> EmbeddingResult:
    """Embed images ``start_row .. stop_row - 1`` of ``index`` with ``prior`` into rows of ``embeddings``.

    Decoding, resizing and cropping run in DataLoader workers on uint8 tensors; normalisation and
    the forward pass (under ``precision``'s autocast) run on ``device``. Results are copied back
    asynchronously into pinned memory and written one batch later, so the device does not wait for
    the host. Batches are ``[start_row + j * batch_size, ...)``: a run resumed at a batch boundary
    embeds exactly the batches an uninterrupted run would.

    Args:
        embeddings: float32 ``(N, D)`` writable array, typically a memory-map (see
            :func:`rela_pipeline.fileio.create_npy_memmap`); host memory stays O(batch).
        decode: ``cpu`` (decode, resize and crop in the workers) or ``gpu`` (JPEGs decoded,
            resized and cropped on ``device``; :mod:`rela_pipeline.stages.embed.decoding`).
        precision: the forward pass's numeric precision (:func:`rela_pipeline.runtime.resolve_precision`;
            None: fp32); the embeddings are stored as float32 either way.
        start_row: first row to embed (other rows are left as they are).
        stop_row: one past the last row to embed (None: N).
        on_checkpoint: called as ``on_checkpoint(start, stop, failures)`` once rows
            ``[start, stop)`` are written (and msync-ed), every ``checkpoint_seconds`` of
            wall-clock and at the end; ``failures`` are those rows' entries of the result's.
        checkpoint_seconds: seconds between checkpoints.

    Returns:
        :class:`EmbeddingResult` for rows ``[start_row, stop_row)``.

    Raises:
        RelaError: the prior does not return ``(B, D)`` embeddings (D from ``embeddings``; size the
            array with :func:`embedding_dim`).
        ValueError: ``embeddings`` is not ``(N, D)``.
    """
    n = len(index.files)
    precision = precision or Precision("fp32", device.type)
    if embeddings.ndim != 2 or embeddings.shape[0] != n:
        raise ValueError(f"expected an ({n}, D) embeddings array, got {embeddings.shape}")
    stop_row = n if stop_row is None else stop_row
    dim = embeddings.shape[1]
    model = prior.model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    failures: dict[int, str] = {}
    on_device = decode == "gpu"
    dataset = (EncodedImages if on_device else SourceImages)(index, start_row, stop_row, prior.preprocessing)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_encoded if on_device else None,
        pin_memory=device.type == "cuda" and not on_device,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    counts = DecodeCounts()

    def device_batches():
        """``(first row, uint8 (B, 3, S, S) on the device, bool (B,) on the device, reasons)``."""
        for batch in loader:
            if on_device:
                images, decoded, reasons = decode_on_device(batch, prior.preprocessing, device, counts)
                yield batch[0].row, images, decoded, reasons
            else:
                rows, images, decoded, reasons = batch
                yield int(rows[0]), images.to(device, non_blocking=True), decoded.to(device, non_blocking=True), list(reasons)

    pending: tuple[int, torch.Tensor, torch.Tensor, Any, list[str]] | None = None
    checkpoint_start, flushed, last_checkpoint = start_row, start_row, time.monotonic()

    def flush(item) -> None:
        nonlocal flushed
        first, host_out, host_valid, event, reasons = item
        if event is not None:
            event.synchronize()
        embeddings[first : first + len(host_out)] = host_out.numpy()
        for offset in np.flatnonzero(~host_valid.numpy()).tolist():
            failures[first + offset] = reasons[offset] or "prior output is not finite (NaN or Inf)"
        flushed = first + len(host_out)

    def checkpoint() -> None:
        nonlocal checkpoint_start, last_checkpoint
        if on_checkpoint is not None and flushed > checkpoint_start:
            if isinstance(embeddings, np.memmap):
                embeddings.flush()
            on_checkpoint(checkpoint_start, flushed, {r: why for r, why in failures.items() if r >= checkpoint_start})
        checkpoint_start, last_checkpoint = flushed, time.monotonic()

    start = time.perf_counter()
    # Deterministic cuDNN kernels, so a rerun or a resumed run computes the same embeddings.
    with (
        _deterministic_cudnn(),
        torch.inference_mode(),
        tqdm(total=stop_row, initial=start_row, unit="img", desc="embed", disable=not progress, dynamic_ncols=True) as bar,
    ):
        for first, images, decoded, reasons in device_batches():
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with precision.autocast():
                out = model(prior.preprocessing.normalise(images))
            if out.ndim != 2 or out.shape[1] != dim:  # shapes only: no host-device synchronisation
                raise RelaError(f"prior {prior.spec} returns {tuple(out.shape)} for a batch, expected (batch, {dim}) embeddings")
            out = out.float()
            valid = decoded & torch.isfinite(out).all(dim=1)
            out = torch.where(valid[:, None], out, torch.zeros_like(out))
            if device.type == "cuda":
                host_out = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
                host_valid = torch.empty(valid.shape, dtype=torch.bool, pin_memory=True)
                host_out.copy_(out, non_blocking=True)
                host_valid.copy_(valid, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host_out, host_valid, event = out, valid, None
            if pending is not None:
                flush(pending)
                if time.monotonic() - last_checkpoint >= checkpoint_seconds:
                    checkpoint()
            pending = (start_row + first, host_out, host_valid, event, reasons)
            bar.update(len(reasons))
        if pending is not None:
            flush(pending)
    seconds = time.perf_counter() - start
    checkpoint()
    return EmbeddingResult(failures, stop_row - start_row, seconds, counts.to_dict() if on_device else None)
