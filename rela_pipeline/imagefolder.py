"""Scanning an ImageFolder tree and decoding its images safely.

Layout (torchvision's ImageFolder convention): ``ROOT/<class>/**/<image>`` gives labelled data
with classes sorted by name; a ROOT holding image files and no sub-folders gives unlabelled data.
Hidden files and folders (leading ``.``) are ignored.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from .errors import RelaError

#: File name suffixes read as images (torchvision's IMG_EXTENSIONS).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageFolderIndex:
    """The sorted file list of an ImageFolder tree.

    Attributes:
        root: absolute root directory.
        files: relative POSIX paths of image files, sorted; sample ``i`` is ``files[i]``.
        labels: int64 array ``(len(files),)`` of class indices, or None when unlabelled.
        class_names: sorted class folder names (empty when unlabelled).
        file_bytes: int64 array ``(len(files),)`` of file sizes in bytes.
        ignored: ``{relative path: reason}`` for files that are not read (no image suffix,
            outside any class folder).
    """

    root: Path
    files: list[str]
    labels: np.ndarray | None
    class_names: list[str]
    file_bytes: np.ndarray
    ignored: dict[str, str] = field(default_factory=dict)

    #: The source kind (:mod:`rela_pipeline.sources`).
    kind = "imagefolder"

    @property
    def location(self) -> str:
        """The root, as the manifest's ``dataset.root`` records it."""
        return str(self.root)

    def fingerprint(self) -> dict:
        """Dataset root fingerprint: image count, total bytes, SHA-256 of the sorted relative paths
        joined by newlines (identifies the file list without reading the images)."""
        digest = hashlib.sha256("\n".join(self.files).encode("utf-8")).hexdigest()
        return {"file_count": len(self.files), "total_bytes": int(self.file_bytes.sum()), "paths_sha256": digest}

    def read(self, row: int) -> bytes:
        """The image file of sample ``row``, unchanged."""
        return (self.root / self.files[row]).read_bytes()

    def byte_range(self, row: int) -> tuple[str, int, None]:
        """Where :meth:`read` reads sample ``row``: the whole file, ``(path, 0, None)``."""
        return str(self.root / self.files[row]), 0, None

    def open_image(self, row: int) -> Image.Image:
        """Sample ``row`` decoded as RGB (:func:`decode_rgb`)."""
        return decode_rgb(self.root / self.files[row])

    def image_field(self, row: int) -> str:
        """The shard field of sample ``row``'s image: its file suffix, lowercased."""
        return self.files[row].rsplit(".", 1)[-1].lower()

    def origin(self, row: int) -> dict:
        """Provenance for the output ``.json``: ``{"path": relative path}``."""
        return {"path": self.files[row]}


def _walk_images(directory: Path, root: Path, ignored: dict[str, str]) -> list[str]:
    found = []
    for current, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.startswith("."):
                continue
            relative = (Path(current) / name).relative_to(root).as_posix()
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(relative)
            else:
                ignored[relative] = "not an image file suffix"
    return found


def scan_image_folder(root: str | os.PathLike) -> ImageFolderIndex:
    """List the images of an ImageFolder tree, sorted by relative path.

    Raises:
        RelaError: ROOT missing, not a directory, or holding no image files.
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise RelaError(f"data directory not found: {root}")
    if not root_path.is_dir():
        raise RelaError(f"data path is not a directory: {root}")
    root_path = root_path.resolve()
    ignored: dict[str, str] = {}
    entries = sorted(e for e in os.listdir(root_path) if not e.startswith("."))
    class_names = [e for e in entries if (root_path / e).is_dir()]
    files: list[str] = []
    labels: list[int] = []
    if class_names:
        for label, name in enumerate(class_names):
            found = _walk_images(root_path / name, root_path, ignored)
            files += found
            labels += [label] * len(found)
        for entry in entries:
            if (root_path / entry).is_file():
                ignored[entry] = "outside any class folder"
        # Drop class folders without images so label indices stay contiguous.
        used = sorted(set(labels))
        if len(used) != len(class_names):
            remap = {old: new for new, old in enumerate(used)}
            class_names = [class_names[i] for i in used]
            labels = [remap[label] for label in labels]
    else:
        files = _walk_images(root_path, root_path, ignored)
    if not files:
        if not entries:
            raise RelaError(f"data directory is empty: {root}")
        raise RelaError(f"no images found in {root} (expected {root}/<class>/*.jpg|png or {root}/*.jpg|png)")
    order = sorted(range(len(files)), key=files.__getitem__)
    files = [files[i] for i in order]
    label_array = np.asarray([labels[i] for i in order], dtype=np.int64) if class_names else None
    sizes = np.fromiter((os.path.getsize(root_path / f) for f in files), dtype=np.int64, count=len(files))
    return ImageFolderIndex(root_path, files, label_array, class_names if class_names else [], sizes, ignored)


#: Everything :func:`decode_rgb` raises for a file that is not a complete, decodable image of
#: acceptable size (PIL's decompression-bomb error derives from ``Exception`` only).
UNDECODABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def decode_rgb(path: str | os.PathLike | IO[bytes]) -> Image.Image:
    """Open and fully decode an image (a file path, or a binary file object) as RGB.

    PIL's decompression-bomb warning (more than ``Image.MAX_IMAGE_PIXELS`` pixels) is raised as an
    error, and truncated files are refused (PIL's default ``LOAD_TRUNCATED_IMAGES = False``).

    Raises:
        Any of :data:`UNDECODABLE_IMAGE_ERRORS` (OSError, ValueError, SyntaxError,
            PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning): when the file is
            not a complete, decodable image of acceptable size.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
