"""Prepare stage: write Fashion-MNIST as an ImageFolder tree of PNG files.

Data source: Fashion-MNIST, Han Xiao, Kashif Rasul and Roland Vollgraf, "Fashion-MNIST: a Novel
Image Dataset for Benchmarking Machine Learning Algorithms", arXiv:1708.07747 (2017),
https://github.com/zalandoresearch/fashion-mnist. Copyright (c) 2017 Zalando SE, MIT licence.
It holds 60,000 training and 10,000 test images, 28x28 pixels, 8-bit grayscale, in 10 classes,
distributed as four IDX files (Debian/Ubuntu package ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from rela_pipeline.errors import RelaError
from rela_pipeline.fileio import PARTIAL_SUFFIX

#: ImageFolder class directory names, in label order (label ``i`` -> ``FASHION_MNIST_CLASSES[i]``).
#: The digit prefix keeps the alphabetical order that ImageFolder uses equal to the label order.
FASHION_MNIST_CLASSES = (
    "0_tshirt-top",
    "1_trouser",
    "2_pullover",
    "3_dress",
    "4_coat",
    "5_sandal",
    "6_shirt",
    "7_sneaker",
    "8_bag",
    "9_ankle-boot",
)

#: Directory where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs the IDX files.
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: IDX file base names (without ``.gz``) of each split: (images, labels).
IDX_FILE_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: Magic numbers of unsigned-byte IDX files: 3-D image tensors and 1-D label vectors.
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049

#: Image side length in pixels.
IMAGE_SIZE = 28

#: Width of the zero-padded image index used as the PNG file name (``00042.png``).
INDEX_DIGITS = 5

_GZIP_SIGNATURE = b"\x1f\x8b"
_INSTALL_HINT = "install it with 'apt-get install dataset-fashion-mnist' or pass --source DIR"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an unsigned-byte IDX file (raw or gzip-compressed) into a NumPy array.

    The format is a big-endian header ``magic (int32), dim_0 .. dim_{k-1} (uint32 each)``
    followed by ``prod(dims)`` bytes. Compression is detected from the gzip signature, not from
    the file name.

    Args:
        path: an IDX file such as ``train-images-idx3-ubyte.gz``.

    Returns:
        ``uint8`` array: shape ``(N, rows, cols)`` for an image file (magic 2051; ``(N, 28, 28)``
        for Fashion-MNIST, pixel values 0..255 with 0 the background), shape ``(N,)`` for a
        label file (magic 2049).

    Raises:
        RelaError: naming the file, if it cannot be read, is not valid gzip, has a magic number
            other than 2051/2049, or its data length differs from the header dimensions
            (truncated or trailing bytes).
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        if data[:2] == _GZIP_SIGNATURE:
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise RelaError(f"cannot read IDX file {path}: {exc}") from exc

    if len(data) < 4:
        raise RelaError(f"malformed IDX file {path}: only {len(data)} bytes, no header")
    magic = int.from_bytes(data[:4], "big")
    if magic == IDX_IMAGES_MAGIC:
        ndim = 3
    elif magic == IDX_LABELS_MAGIC:
        ndim = 1
    else:
        raise RelaError(f"malformed IDX file {path}: magic number {magic}, expected {IDX_IMAGES_MAGIC} (images) or {IDX_LABELS_MAGIC} (labels)")
    header_bytes = 4 + 4 * ndim
    if len(data) < header_bytes:
        raise RelaError(f"malformed IDX file {path}: truncated header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected_bytes = header_bytes + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected_bytes:
        raise RelaError(f"malformed IDX file {path}: {len(data)} bytes, header {dims} implies {expected_bytes}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(dims).copy()


def prepare_fashion_mnist(
    out_dir: str | os.PathLike,
    source: str | os.PathLike | None = None,
    splits: tuple[str, ...] = ("train", "test"),
    limit_per_class: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Write Fashion-MNIST splits as ImageFolder trees of 28x28 grayscale PNG files.

    Layout: ``out_dir/<split>/<class>/<index>.png`` where ``<class>`` is an entry of
    :data:`FASHION_MNIST_CLASSES` (``0_tshirt-top`` .. ``9_ankle-boot``) and ``<index>`` is the
    5-digit zero-padded position of the image in its IDX file (``00042.png``), so a file can
    always be traced back to the original data. Each PNG is mode ``"L"`` (8-bit grayscale,
    28x28 pixels, values 0..255 exactly as in the IDX file) and written by PIL without metadata,
    so the same input always gives the same bytes. Only classes with at least one selected
    image get a folder.

    Source resolution, first match wins:

    1. ``source``, if given: a directory holding the four IDX files
       (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
       ``t10k-labels-idx1-ubyte``), each gzipped (``.gz``) or raw. Only the files of the
       requested splits must be present.
    2. :data:`SYSTEM_FASHION_MNIST_DIR` (``/usr/share/datasets/fashion-mnist``), if it holds them.
    3. ``torchvision.datasets.FashionMNIST(download=True)`` into ``<out_dir parent>/
       .fashion-mnist-download``; its raw IDX files are then read like any other source.

    Atomicity: each split is written into ``out_dir/.<split>.partial`` and renamed into place
    with ``os.replace`` only once complete, so an interrupted run never leaves a split that looks
    complete (a stale ``.partial`` directory is removed by the next run). Existing splits are
    checked before anything is written.

    Args:
        out_dir: output directory, created if missing.
        source: directory with the IDX files; ``None`` to use the fallbacks above.
        splits: non-empty subset of ``("train", "test")``; ``"test"`` is read from the ``t10k``
            files.
        limit_per_class: keep only the first ``n`` images (in IDX order) of each class in each
            split, for small fixtures; ``None`` keeps all (6,000 train / 1,000 test per class).
        overwrite: replace an existing non-empty ``out_dir/<split>``; otherwise it is an error.

    Returns:
        ``{"source": str, "splits": {split: {"images": int, "classes": int}}, "out_dir": str}``:
        the directory the IDX files were read from, the number of PNG files and class folders
        written per split, and ``out_dir``.

    Raises:
        RelaError: if ``splits`` or ``limit_per_class`` is invalid; if ``source`` is not a
            directory or lacks a needed IDX file; if no source is given and neither the system
            directory nor a torchvision download provides the data; if an IDX file is malformed
            (the message names the file) or the images and labels disagree (count, 28x28 shape,
            label outside 0..9); if ``out_dir/<split>`` exists, is non-empty and ``overwrite`` is
            false; or if the output cannot be written.
    """
    splits = _validate_splits(splits)
    if limit_per_class is not None and (isinstance(limit_per_class, bool) or not isinstance(limit_per_class, int) or limit_per_class < 1):
        raise RelaError(f"limit_per_class must be a positive integer or None, got {limit_per_class!r}")

    out_dir = Path(out_dir)
    for split in splits:
        target = out_dir / split
        if _is_non_empty(target) and not overwrite:
            raise RelaError(f"{target} already exists and is not empty; pass --overwrite to replace it")

    source_dir = _resolve_source(source, splits, out_dir)
    summary = {"source": str(source_dir), "splits": {}, "out_dir": str(out_dir)}
    for split in splits:
        images_name, labels_name = IDX_FILE_NAMES[split]
        images_path = _find_idx_file(source_dir, images_name)
        labels_path = _find_idx_file(source_dir, labels_name)
        images = read_idx(images_path)
        labels = read_idx(labels_path)
        _check_pair(images, labels, images_path, labels_path)
        indices = _select_indices(labels, limit_per_class)
        _write_split(out_dir, split, images, labels, indices)
        summary["splits"][split] = {
            "images": int(indices.size),
            "classes": int(np.unique(labels[indices]).size),
        }
    return summary


def _validate_splits(splits: tuple[str, ...]) -> tuple[str, ...]:
    """Return ``splits`` as a tuple after checking it is a non-empty, duplicate-free subset."""
    if isinstance(splits, str):
        splits = (splits,)
    splits = tuple(splits)
    unknown = [s for s in splits if s not in IDX_FILE_NAMES]
    if not splits or unknown or len(set(splits)) != len(splits):
        raise RelaError(f"splits must be a non-empty subset of ('train', 'test'), got {splits!r}")
    return splits


def _is_non_empty(path: Path) -> bool:
    """True if ``path`` is a file, or a directory with at least one entry."""
    if path.is_dir():
        return any(path.iterdir())
    return path.exists()


def _find_idx_file(directory: Path, base_name: str) -> Path | None:
    """Return ``directory/base_name.gz``, else ``directory/base_name``, else ``None``."""
    for candidate in (directory / f"{base_name}.gz", directory / base_name):
        if candidate.is_file():
            return candidate
    return None


def _has_idx_files(directory: Path, splits: tuple[str, ...]) -> bool:
    """True if ``directory`` holds the images and labels IDX files of every split."""
    return all(_find_idx_file(directory, name) is not None for split in splits for name in IDX_FILE_NAMES[split])


def _resolve_source(source: str | os.PathLike | None, splits: tuple[str, ...], out_dir: Path) -> Path:
    """Return the directory to read the IDX files of ``splits`` from (see prepare_fashion_mnist)."""
    if source is not None:
        source_dir = Path(source)
        if not source_dir.is_dir():
            raise RelaError(f"Fashion-MNIST source directory {source_dir} does not exist")
        for split in splits:
            for name in IDX_FILE_NAMES[split]:
                if _find_idx_file(source_dir, name) is None:
                    raise RelaError(f"{source_dir} has neither {name}.gz nor {name}")
        return source_dir

    if _has_idx_files(SYSTEM_FASHION_MNIST_DIR, splits):
        return SYSTEM_FASHION_MNIST_DIR

    download_root = out_dir.resolve().parent / ".fashion-mnist-download"
    try:
        from torchvision.datasets import FashionMNIST

        dataset = FashionMNIST(str(download_root), train=True, download=True)
        raw_dir = Path(dataset.raw_folder)
    except Exception as exc:  # no torchvision, no network, bad download: all mean "not available"
        raise RelaError(f"Fashion-MNIST not found in {SYSTEM_FASHION_MNIST_DIR} and download failed ({type(exc).__name__}); {_INSTALL_HINT}") from exc
    if not _has_idx_files(raw_dir, splits):
        raise RelaError(f"torchvision download left no IDX files in {raw_dir}; {_INSTALL_HINT}")
    return raw_dir


def _check_pair(images: np.ndarray, labels: np.ndarray, images_path: Path, labels_path: Path) -> None:
    """Check an images/labels pair: (N, 28, 28) images, (N,) labels in 0..9."""
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise RelaError(f"{images_path} holds images of shape {images.shape}, expected (N, 28, 28)")
    if labels.ndim != 1:
        raise RelaError(f"{labels_path} is not a label file (shape {labels.shape})")
    if labels.shape[0] != images.shape[0]:
        raise RelaError(f"{labels_path} has {labels.shape[0]} labels but {images_path} has {images.shape[0]} images")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise RelaError(f"{labels_path} has label {int(labels.max())}, expected 0..9")


def _select_indices(labels: np.ndarray, limit_per_class: int | None) -> np.ndarray:
    """Return the sorted IDX positions to write: all, or the first ``limit_per_class`` per class."""
    if limit_per_class is None:
        return np.arange(labels.size)
    per_class = [np.flatnonzero(labels == label)[:limit_per_class] for label in range(len(FASHION_MNIST_CLASSES))]
    return np.sort(np.concatenate(per_class))


def _remove(path: Path) -> None:
    """Delete a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _write_split(out_dir: Path, split: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    """Write the selected images of one split as PNGs, then move the tree to ``out_dir/split``.

    Args:
        images: ``uint8`` array of shape (N, 28, 28).
        labels: ``uint8`` array of shape (N,), values 0..9.
        indices: positions into ``images``/``labels`` to write.
    """
    target = out_dir / split
    partial = out_dir / f".{split}{PARTIAL_SUFFIX}"
    replaced = out_dir / f".{split}.replaced"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _remove(partial)
        _remove(replaced)
        for label in np.unique(labels[indices]):
            (partial / FASHION_MNIST_CLASSES[label]).mkdir(parents=True)
        for index in indices:
            class_dir = partial / FASHION_MNIST_CLASSES[labels[index]]
            png_path = class_dir / f"{index:0{INDEX_DIGITS}d}.png"
            Image.fromarray(images[index]).save(png_path, format="PNG")
        if target.exists() or target.is_symlink():
            os.replace(target, replaced)
        os.replace(partial, target)
        _remove(replaced)
    except OSError as exc:
        raise RelaError(f"cannot write {target}: {exc}") from exc
    finally:
        _remove(partial)
