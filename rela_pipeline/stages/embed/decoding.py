"""Where stage one decodes its images: in the CPU workers, or batched on the device.

At 224 px a CPU decodes and resizes JPEGs far slower than one GPU runs a ViT-B/16 (clip-retrieval
reports about 875-1,500 img/s per GPU, bound by decoding and resizing), so ``--decode gpu``
moves that work to the device:

* the DataLoader workers only read each file's bytes and check that a JPEG can go to the device
  (:class:`EncodedImages`: a complete baseline or progressive JPEG in RGB or grayscale, within
  PIL's decompression-bomb limit, ending with its end-of-image marker); every other file (PNG,
  CMYK JPEG, a truncated file) is decoded and preprocessed in the worker as on the CPU path;
* the main process decodes the batch's JPEGs with ``torchvision.io.decode_jpeg(list,
  device=...)`` (nvJPEG on CUDA), then resizes and crops them on the device with the very
  transforms of the CPU path (:meth:`rela_pipeline.priors.Preprocessing.tensor_transform`:
  torchvision's ``Resize`` + ``CenterCrop`` on uint8 tensors, grouped by image size);
* a JPEG the device decoder refuses falls back to the CPU decoder (PIL), and one PIL refuses too
  is skipped and counted as on the CPU path, never a CUDA error.

On a CPU device ``gpu`` runs this same path with torchvision's CPU decoder (libjpeg-turbo) in the
main process: slower than the workers, and the way the tests cover the code. ``auto`` is ``gpu``
on CUDA and ``cpu`` elsewhere.

Decoders differ in their IDCT and chroma upsampling, and torchvision resizes a uint8 image with
an integer kernel on the CPU and in float32 on CUDA, so pixels may differ by a few levels between
the paths; the resulting targets' agreement is measured on the docs' results page.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from ...errors import RelaError
from ...fileio import announce_byte_ranges
from ...imagefolder import UNDECODABLE_IMAGE_ERRORS
from ...priors import Preprocessing
from ...sources import ImageSource, decode_named

#: Accepted ``--decode`` values.
DECODE_MODES = ("auto", "cpu", "gpu")

#: The start of every JPEG file (SOI marker and the first byte of the next marker).
JPEG_MAGIC = b"\xff\xd8\xff"
#: The last two bytes of a complete JPEG (EOI marker).
JPEG_END = b"\xff\xd9"


def resolve_decode(mode: str, device: torch.device) -> str:
    """``cpu`` or ``gpu`` for ``--decode`` on ``device`` (``auto``: ``gpu`` on CUDA).

    Raises:
        RelaError: an unknown mode.
    """
    if mode not in DECODE_MODES:
        raise RelaError(f"--decode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    if mode == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return mode


def _reason(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else "undecodable"
    return f"{type(error).__name__}: {text}"[:200]


def device_decodable_jpeg(data: bytes) -> bool:
    """Whether ``data`` is a JPEG the device decoder should get: JPEG magic, end-of-image marker,
    a header PIL parses as RGB or grayscale (not CMYK/YCCK), within PIL's pixel limit.

    Raises:
        PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning: the header declares
            more pixels than ``Image.MAX_IMAGE_PIXELS`` (the same refusal as the CPU path).
    """
    if not (data.startswith(JPEG_MAGIC) and data.rstrip(b"\x00").endswith(JPEG_END)):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:  # the header only
                return image.format == "JPEG" and image.mode in ("RGB", "L")
        except (OSError, ValueError, SyntaxError):
            return False


@dataclass
class EncodedItem:
    """One image as a worker hands it to the main process on the ``gpu`` decode path.

    Attributes:
        row: index into the batch's rows (0 for the first row the dataset covers).
        name: the sample's key (errors of the CPU fallback name it).
        jpeg: the file's bytes as uint8 ``(L,)`` when the device decodes it, else None.
        pixels: uint8 ``(3, S, S)`` preprocessed on the CPU (non-JPEG files), else None.
        reason: why the image could not be read or decoded ("" when it could).
    """

    row: int
    name: str = ""
    jpeg: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    reason: str = ""


class AnnouncedBatches:
    """Mixin for a map-style dataset of rows ``start ..`` of an image source (``self.source``,
    ``self.start``): the DataLoader's batched fetch (``__getitems__``) announces the batch's files
    to the kernel (:func:`rela_pipeline.fileio.announce_byte_ranges`), then fetches item by item."""

    def __getitems__(self, indices: list[int]) -> list:
        announce_byte_ranges(self.source.byte_range(self.start + i) for i in indices)
        return [self[i] for i in indices]


class EncodedImages(AnnouncedBatches, torch.utils.data.Dataset):
    """Rows ``start .. stop - 1`` of an image source (:mod:`rela_pipeline.sources`) for the ``gpu``
    decode path, read in a DataLoader worker: each sample's JPEG bytes, or (for images the device
    does not decode) its preprocessed uint8 pixels.

    Items are :class:`EncodedItem`; batch them with :func:`collate_encoded`. A batch's files are
    announced to the kernel before its first is read (:func:`rela_pipeline.fileio.announce_byte_ranges`).
    """

    def __init__(self, source: ImageSource, start: int, stop: int, preprocessing: Preprocessing) -> None:
        self.source, self.start, self.stop = source, start, stop
        self.transform = preprocessing.to_uint8_transform()

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> EncodedItem:
        row = self.start + i
        name = self.source.files[row]
        try:
            data = self.source.read(row)
            if device_decodable_jpeg(data):
                return EncodedItem(i, name, jpeg=torch.frombuffer(bytearray(data), dtype=torch.uint8))
            return EncodedItem(i, name, pixels=self.transform(self.source.open_image(row)))
        except UNDECODABLE_IMAGE_ERRORS as error:
            return EncodedItem(i, name, reason=_reason(error))


def collate_encoded(items: list[EncodedItem]) -> list[EncodedItem]:
    """The DataLoader's ``collate_fn`` for :class:`EncodedImages`: the items as a list."""
    return items


@dataclass
class DecodeCounts:
    """Images per decoder on the ``gpu`` path (``cpu``: the workers' PIL for non-JPEG files and the
    device decoder's refusals)."""

    device: int = 0
    cpu: int = 0
    failed: int = 0

    def to_dict(self) -> dict[str, int]:
        """JSON-ready counts."""
        return {"device": self.device, "cpu": self.cpu, "failed": self.failed}


def decode_on_device(
    items: list[EncodedItem], preprocessing: Preprocessing, device: torch.device, counts: DecodeCounts | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode, resize and crop a batch on ``device``.

    Args:
        items: one batch from :class:`EncodedImages` (``B`` items, in row order).
        preprocessing: the prior's preprocessing (crop size ``S``).
        device: where the JPEGs are decoded and resized.
        counts: accumulates how many images each decoder took.

    Returns:
        ``(images, decoded, reasons)``: uint8 ``(B, 3, S, S)`` on ``device`` (zeros where an image
        could not be decoded), bool ``(B,)`` on ``device``, and ``B`` reasons ("" when decoded).
    """
    counts = counts if counts is not None else DecodeCounts()
    size = preprocessing.crop_size
    images = torch.zeros(len(items), 3, size, size, dtype=torch.uint8, device=device)
    decoded = torch.zeros(len(items), dtype=torch.bool)
    reasons = [item.reason for item in items]
    jpegs = [k for k, item in enumerate(items) if item.jpeg is not None]
    for k, item in enumerate(items):
        if item.pixels is not None:
            images[k] = item.pixels.to(device, non_blocking=True)
            decoded[k] = True
            counts.cpu += 1
    pictures: dict[int, torch.Tensor] = {}
    if jpegs:
        try:
            pictures = dict(zip(jpegs, decode_jpeg([items[k].jpeg for k in jpegs], mode=ImageReadMode.RGB, device=device)))
        except RuntimeError:  # one bad file fails the batch call: decode one by one to find it
            for k in jpegs:
                try:
                    pictures[k] = decode_jpeg(items[k].jpeg, mode=ImageReadMode.RGB, device=device)
                except RuntimeError:
                    pass
    transform = preprocessing.tensor_transform()
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for k, picture in pictures.items():
        by_shape.setdefault(tuple(picture.shape), []).append(k)
    for rows in by_shape.values():  # one resize per image size (a uniform data set: one call per batch)
        images[rows] = transform(torch.stack([pictures[k] for k in rows]))
        decoded[rows] = True
        counts.device += len(rows)
    fallback = preprocessing.to_uint8_transform()
    for k in jpegs:
        if k not in pictures:  # the device decoder refused it: the CPU decoder decides
            try:
                picture = decode_named(items[k].jpeg.numpy().tobytes(), items[k].name)
                images[k] = fallback(picture).to(device)
                decoded[k] = True
                counts.cpu += 1
            except UNDECODABLE_IMAGE_ERRORS as error:
                reasons[k] = _reason(error)
    counts.failed += int((~decoded).sum())
    return images, decoded.to(device, non_blocking=True), reasons
