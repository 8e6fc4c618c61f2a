"""The samples of one shard as the training data path reads them: keep the epoch's subset by key,
decode image, target and label, and turn every bad sample or shard into one line.

A sample is a webdataset dict (``__key__``: the nine-digit sample index; an image field of
:data:`rela_pipeline.shards.format.IMAGE_FIELDS`; ``target.npy``; ``cls`` when labelled). Keys are
checked before anything is decoded, so a foreign or hostile member name (a path-traversal name,
a duplicate) is refused by name, never opened as a path.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

import numpy as np
from PIL import Image

from ..fileio import npy_from_bytes
from ..imagefolder import decode_rgb
from .format import IMAGE_FIELDS, TARGET_FIELD

logger = logging.getLogger("rela_pipeline")


class ShardErrorLatch:
    """Collects the first error met while reading a shard inside a DataLoader worker, so it can be
    passed on to the main process as a message.

    Args:
        skip: warn and go on past the error (``--skip-bad-shards``) instead of latching it.

    Attributes:
        message: the first error as one line, or None.
    """

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.message: str | None = None

    def handle_shard(self, error: Exception) -> bool:
        """webdataset handler for shard-level errors: warn and continue, or latch and stop."""
        url = next((a for a in reversed(error.args) if isinstance(a, str) and (a.endswith(".tar") or "shard-" in a)), None)
        name = os.path.basename(url) if url else "a shard"
        first = next((str(a) for a in error.args if isinstance(a, str) and a != url), type(error).__name__)
        message = f"cannot read shard {name}: {type(error).__name__}: {first.splitlines()[0] if first else ''}".rstrip(": ")
        if self.skip:
            logger.warning("skipping the rest of %s (%s)", name, type(error).__name__)
            return True
        self.message = self.message or message + " (pass --skip-bad-shards to skip bad shards with a warning)"
        return False


def is_sample_key(key: object) -> bool:
    """Whether ``key`` is a sample index as stage one writes it: nine decimal digits."""
    return isinstance(key, str) and len(key) == 9 and key.isdigit()


def in_subset(sample: dict[str, Any], mask: np.ndarray | None) -> bool:
    """Whether a streamed sample is kept before decoding: its ``__key__`` index is in ``mask``
    (``(N,)`` bool; None keeps all). A key that is no sample index is kept, so that decoding
    refuses it by name (:func:`decode_sample`)."""
    key = sample.get("__key__")
    if mask is None or not is_sample_key(key):
        return True
    index = int(key)
    return index < len(mask) and bool(mask[index])


def bad_sample(url: str, error: BaseException, skip: bool) -> str | None:
    """Handle a sample that does not decode: with ``skip``, warn and return None; otherwise
    return the one-line error to raise."""
    message = f"bad sample in shard {os.path.basename(str(url))}: {error}"
    if skip:
        logger.warning("skipping %s", message)
        return None
    return message + " (pass --skip-bad-shards to skip bad samples with a warning)"


def decode_sample(sample: dict[str, Any], target_dim: int) -> tuple[Image.Image, np.ndarray, int, int]:
    """Decode one streamed sample: ``(RGB image, float32 (target_dim,) target, label or -1, index)``.

    Raises:
        ValueError: a key that is not a sample index (e.g. a path-traversal name), no image, a
            target that is missing, too large, of the wrong shape or dtype, or not finite.
        OSError, PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning: an image
            PIL cannot decode or with more than ``Image.MAX_IMAGE_PIXELS`` pixels.
    """
    key = sample["__key__"]
    if not is_sample_key(key):
        raise ValueError(f"key {str(key)[:80]!r} is not a sample index (a foreign or hostile member name)")
    index = int(key)
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is None:
        raise ValueError(f"sample {key} has no image field")
    image = decode_rgb(io.BytesIO(sample[field]))
    if TARGET_FIELD not in sample:
        raise ValueError(f"sample {key} has no {TARGET_FIELD}")
    target = npy_from_bytes(sample[TARGET_FIELD], max_items=1 << 20)
    if target.ndim != 1 or target.shape[0] < target_dim or target.dtype.kind != "f":
        raise ValueError(f"sample {key} target is {target.dtype}{list(target.shape)}, expected float[>={target_dim}]")
    target = target[:target_dim].astype(np.float32)
    if not np.isfinite(target).all():
        raise ValueError(f"sample {key} target has NaN or Inf")
    label = int(sample["cls"]) if "cls" in sample else -1
    return image, target, label, index
