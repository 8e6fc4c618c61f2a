"""The shard-set format: file names, sample fields and their encoding.

A shard set is a directory::

    OUT/manifest.json        written last; a directory without it is an incomplete run
    OUT/transport.npz        linear transport parameters (mean, components, scale, variances)
    OUT/scores.npz           per-sample subset scores and labels, indexed by sample index
    OUT/shard-000000.tar     WebDataset shards (plain POSIX tar), ``--shard-size`` samples each
    OUT/...

Each sample is one basename (``__key__``, the zero-padded sample index: no dots) with fields:

==============  ===========================================================================
``<ext>``       the original encoded image bytes (``jpg``, ``png``, ...; never re-encoded)
``cls``         the class index as ASCII digits (labelled datasets only)
``target.npy``  the representation target, ``(K,)`` in the manifest's ``targets.dtype``
``json``        ``{"index", "label", "class_name", "image_field", "knn_density",
                "nn_similarity", "nn_index"}`` and where the sample came from: ``"path"``
                (ImageFolder and file-list input), or ``"source_shard"``, ``"source_key"`` and
                the input sample's own ``.json``/``.txt`` under ``"source"`` (tar input)
==============  ===========================================================================
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..fileio import npy_bytes

SCHEMA = "rela-pipeline/shard-set"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
TRANSPORT_NAME = "transport.npz"
SCORES_NAME = "scores.npz"
EMBEDDINGS_NAME = "embeddings.npy"
SHARD_PATTERN = "shard-%06d.tar"
SHARD_GLOB = "shard-*.tar"
TARGET_FIELD = "target.npy"
#: Target dtypes accepted by ``--target-dtype``.
TARGET_DTYPES = ("float16", "float32")
#: Image fields a reader should look for (the file suffix, lowercased).
IMAGE_FIELDS = ("jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp")
#: Fixed tar member mtime (seconds since the epoch) so shards are byte-reproducible.
TAR_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header per member


def sample_key(index: int) -> str:
    """The ``__key__`` of sample ``index``: 9 zero-padded digits (no dots)."""
    return f"{index:09d}"


def image_field(relative_path: str) -> str:
    """The field name of an image file: its lowercased suffix without the dot."""
    return relative_path.rsplit(".", 1)[-1].lower()


def encode_sample(
    index: int,
    origin: dict[str, Any],
    image_field: str,
    image_bytes: bytes,
    target: np.ndarray,
    metadata: dict[str, Any],
    label: int | None,
) -> dict[str, Any]:
    """Build the webdataset sample dict with every field already encoded as bytes.

    Args:
        index: sample index (the key).
        origin: where the sample came from, merged into the ``.json``: ``{"path": relative
            path}`` (ImageFolder, file list) or ``{"source_shard", "source_key"[, "source"]}``
            (tar input; :mod:`rela_pipeline.sources`).
        image_field: the image's field name (its suffix, lowercased).
        image_bytes: the file's bytes, unchanged.
        target: ``(K,)`` array already in the output dtype.
        metadata: JSON-ready per-sample fields (scores, label, ...); ``index`` is added.
        label: class index, or None for unlabelled data (no ``cls`` field then).
    """
    record = dict(metadata, index=index, image_field=image_field, **origin)
    sample = {
        "__key__": sample_key(index),
        image_field: image_bytes,
        TARGET_FIELD: npy_bytes(target),
        "json": json.dumps(record, sort_keys=True, allow_nan=False).encode("utf-8"),
    }
    if label is not None:
        sample["cls"] = str(int(label)).encode("ascii")
    return sample
