"""Where stage one reads its images: an ImageFolder, local WebDataset tars, or a file list.

:func:`open_image_source` picks the kind from ``--data``:

``imagefolder``  a directory (:func:`rela_pipeline.imagefolder.scan_image_folder`): sorted relative
                 paths, labels from the class folders.
``webdataset``   a brace pattern or glob of local ``.tar`` files, or remote ones (an ``http(s)://``
                 URL pattern, a ``pipe:`` command: each copied once into a temporary folder), in
                 img2dataset's layout (per
                 sample ``{key}.jpg|jpeg|png|webp|...``, optional ``{key}.cls``, ``{key}.json``,
                 ``{key}.txt``; webdataset's rule: a sample is the consecutive members sharing the
                 name before the basename's first dot). Order: the shards in the pattern's order
                 (brace expansion, then each glob sorted), the samples in member order.
``filelist``     a ``.txt`` (one path per line), ``.csv`` or ``.parquet`` (a ``path`` column and an
                 optional ``label`` column) file; paths relative to the list's folder or absolute. Order:
                 the list's rows.

Every source has the same interface (:class:`ImageSource`): one key per sample in a fixed order,
labels and class names, a fingerprint (for ``--resume`` and the manifest; for tars each shard's
name, size and SHA-256, hashed in the one scanning pass), random access to each sample's image
bytes (tars: the member's offset, found in that pass), and the sample's provenance for the
output ``.json`` (``path``, or ``source_shard``, ``source_key`` and the input's own ``.json`` /
``.txt`` under ``source``).

Bad input is never fatal per sample: a tar member that is no ``key.ext`` name, a sample without
an image, a duplicate key in a shard, a shard that ends early (truncated), or a listed file that
is missing is left out, named with its reason in ``ignored`` (the manifest's ``ignored``) and
warned about; images that do not decode are skipped later, when embedded, as for an ImageFolder.
Nothing is ever written from a member's name: a name that climbs out of its folder
(``../../x.png``) is only a string in ``source_key``.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
import re
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import RelaError
from .fileio import ByteRange, HashingFile
from .imagefolder import IMAGE_EXTENSIONS, ImageFolderIndex, decode_rgb, scan_image_folder

logger = logging.getLogger("rela_pipeline")

#: Accepted source kinds.
SOURCE_KINDS = ("imagefolder", "webdataset", "filelist")
#: Tars holding fewer bytes than this together are scanned in one process (a pool of processes
#: takes about a second to start).
PARALLEL_SCAN_MIN_BYTES = 256 * 2**20
#: Suffixes read as file lists (``.parquet`` needs pyarrow: the ``parquet`` extra).
LIST_SUFFIXES = (".txt", ".csv", ".parquet")
#: A tar member's sample key and extension (webdataset's ``base_plus_ext``).
MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
#: Image extensions of a tar sample (the member name's extension, lowercased).
TAR_IMAGE_FIELDS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
#: Side fields kept from a tar sample for labels and provenance (at most this many bytes each).
SIDE_FIELDS = ("cls", "json", "txt")
SIDE_FIELD_MAX_BYTES = 1 << 20


class ImageSource(Protocol):
    """What stage one reads its images from (module docstring).

    Attributes:
        kind: one of :data:`SOURCE_KINDS`.
        location: the ``--data`` given, as a string (the manifest's ``dataset.root``).
        files: one key per sample, in the source's order (the manifest's ``skipped`` names them).
        labels: int64 ``(N,)`` class indices, or None when unlabelled.
        class_names: the classes (empty when unlabelled).
        ignored: ``{name: reason}`` of what was left out when scanning.
    """

    kind: str
    files: list[str]
    labels: np.ndarray | None
    class_names: list[str]
    ignored: dict[str, str]

    @property
    def location(self) -> str: ...

    def fingerprint(self) -> dict[str, Any]: ...

    def read(self, row: int) -> bytes: ...

    def byte_range(self, row: int) -> ByteRange: ...

    def open_image(self, row: int) -> Image.Image: ...

    def image_field(self, row: int) -> str: ...

    def origin(self, row: int) -> dict[str, Any]: ...


def decode_named(data: bytes, name: str) -> Image.Image:
    """:func:`rela_pipeline.imagefolder.decode_rgb` of in-memory bytes, with errors naming
    ``name`` instead of a buffer object (so a manifest's reasons are reproducible).

    Raises:
        as :func:`rela_pipeline.imagefolder.decode_rgb`.
    """
    try:
        return decode_rgb(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"cannot identify image file {name!r}") from None


def _class_labels(values: list[str]) -> tuple[np.ndarray, list[str]]:
    """Class indices and names from label strings: names sorted numerically when every label is an
    integer, else lexicographically."""
    unique = sorted(set(values), key=lambda v: (0, int(v), "") if v.lstrip("-").isdigit() else (1, 0, v))
    index = {name: i for i, name in enumerate(unique)}
    return np.asarray([index[v] for v in values], dtype=np.int64), unique


@dataclass
class _TarSample:
    shard: int
    key: str
    extension: str = ""
    offset: int = -1
    size: int = 0
    side: dict[str, bytes] = field(default_factory=dict)


@dataclass
class TarSource:
    """Local WebDataset tars in img2dataset's layout (module docstring)."""

    pattern: str
    shard_paths: list[str]
    shard_records: list[dict[str, Any]]
    files: list[str]
    fields: list[str]
    shard_of: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    labels: np.ndarray | None
    class_names: list[str]
    provenance: list[dict[str, Any]]
    ignored: dict[str, str]
    kind: str = "webdataset"

    @property
    def location(self) -> str:
        return self.pattern

    def fingerprint(self) -> dict[str, Any]:
        """Each shard's name, bytes and SHA-256 (read in the scanning pass), the sample count and
        the SHA-256 of the sample keys."""
        return {
            "kind": self.kind,
            "file_count": len(self.files),
            "total_bytes": int(sum(r["bytes"] for r in self.shard_records)),
            "paths_sha256": hashlib.sha256("\n".join(self.files).encode("utf-8")).hexdigest(),
            "shards": self.shard_records,
        }

    def read(self, row: int) -> bytes:
        """The image member's bytes of sample ``row``, unchanged.

        Raises:
            OSError: the shard cannot be read there any more.
        """
        with open(self.shard_paths[int(self.shard_of[row])], "rb") as handle:
            handle.seek(int(self.offsets[row]))
            data = handle.read(int(self.sizes[row]))
        if len(data) != int(self.sizes[row]):
            raise OSError(f"{self.files[row]}: the shard ends inside the image")
        return data

    def byte_range(self, row: int) -> ByteRange:
        """Where :meth:`read` reads sample ``row``: ``(shard path, offset, size)``."""
        return self.shard_paths[int(self.shard_of[row])], int(self.offsets[row]), int(self.sizes[row])

    def open_image(self, row: int) -> Image.Image:
        """Sample ``row`` decoded as RGB (errors as :func:`decode_named`)."""
        return decode_named(self.read(row), self.files[row])

    def image_field(self, row: int) -> str:
        return self.fields[row]

    def origin(self, row: int) -> dict[str, Any]:
        return self.provenance[row]


def _scan_tar(path: str, shard: int) -> tuple[list[_TarSample], dict[str, Any], dict[str, str]]:
    """One pass over a tar: its samples (image offsets, side fields), its record (name, bytes,
    SHA-256), and what was left out: members that do not form a sample, and the rest of a shard
    that ends early, each with its reason."""
    name = os.path.basename(path)
    ignored: dict[str, str] = {}
    samples: list[_TarSample] = []
    finished: set[str] = set()
    current: _TarSample | None = None

    def finish(sample: _TarSample | None) -> None:
        if sample is None:
            return
        where = f"{name}/{sample.key}"
        if sample.key in finished:
            ignored[where] = "duplicate key in the shard"
        elif not sample.extension:
            ignored[where] = "no image field"
        else:
            samples.append(sample)
        finished.add(sample.key)

    size = os.path.getsize(path)
    end = 0  # where the last member's padded data ends
    with open(path, "rb") as raw:
        hashing = HashingFile(raw)
        try:
            with tarfile.open(fileobj=hashing, mode="r|") as archive:
                for member in archive:
                    end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    if not member.isfile():
                        continue
                    match = MEMBER_NAME.match(member.name)
                    if match is None:
                        ignored[f"{name}/{member.name}"] = "not a key.extension member name"
                        continue
                    key, extension = match.group(1), match.group(2).lower()
                    if current is None or key != current.key:
                        finish(current)
                        current = _TarSample(shard, key)
                    if member.offset_data + member.size > size:  # tarfile's stream mode stops quietly at the end
                        raise tarfile.ReadError(f"{member.name} is cut off")
                    if extension in TAR_IMAGE_FIELDS:
                        if current.extension:
                            ignored[f"{name}/{member.name}"] = "a second image in one sample"
                            continue
                        current.extension, current.offset, current.size = extension, member.offset_data, member.size
                    elif extension in SIDE_FIELDS and member.size <= SIDE_FIELD_MAX_BYTES:
                        current.side[extension] = archive.extractfile(member).read()
            if size < end + 2 * tarfile.BLOCKSIZE:  # no end-of-archive blocks: cut inside a header
                raise tarfile.ReadError("no end-of-archive marker")
        except (tarfile.TarError, EOFError, OSError) as error:
            ignored[name] = f"the shard ends early or is not a tar ({type(error).__name__}); kept its first samples"
            current = None  # its last sample may be cut off: left out
        finish(current)
        hashing.drain()
    record = {"name": name, "bytes": size, "sha256": hashing.hexdigest()}
    return samples, record, ignored


def _label_of(sample: _TarSample, label_field: str) -> str | None:
    """The label text of a sample from ``cls`` or ``json:<key>``; None when it has none."""
    if label_field == "cls":
        return sample.side["cls"].decode("utf-8", "replace").strip() if "cls" in sample.side else None
    key = label_field.split(":", 1)[1]
    try:
        value = json.loads(sample.side["json"]).get(key) if "json" in sample.side else None
    except (ValueError, AttributeError):
        return None
    return None if value is None else str(value)


def expand_pattern(pattern: str) -> list[str]:
    """The files of a brace pattern and/or glob, in the pattern's order (brace expansion, then
    each glob sorted), each once.

    Raises:
        RelaError: it matches no file.
    """
    import braceexpand

    found: list[str] = []
    for part in braceexpand.braceexpand(pattern):
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else ([part] if os.path.isfile(part) else [])
        found += [m for m in matches if m not in found]
    if not found:
        raise RelaError(f"--data {pattern}: the pattern matches no file")
    return found


def is_remote_pattern(pattern: str) -> bool:
    """Whether ``--data`` names remote tars: an ``http(s)://`` URL (pattern) or a ``pipe:`` command."""
    return pattern.startswith(("http://", "https://", "pipe:"))


def _download(url: str, target: Path) -> None:
    """Copy one remote tar to ``target`` (``http(s)://`` with the standard library, checking the
    length the server announced; ``pipe:`` through webdataset's ``gopen``).

    Raises:
        RelaError: one line naming the URL (an HTTP error such as 404, a refused or dropped
            connection, a failing command).
    """
    import http.client
    import shutil
    import urllib.error
    import urllib.request

    try:
        if url.startswith(("http://", "https://")):
            with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
                expected = response.headers.get("Content-Length")
                shutil.copyfileobj(response, out, 1 << 20)
                copied = out.tell()
            if expected is not None and copied != int(expected):
                raise RelaError(f"cannot read {url}: the connection closed after {copied} of {expected} bytes")
        else:
            from .shards.location import open_url

            with open_url(url) as stream, open(target, "wb") as out:
                shutil.copyfileobj(stream, out, 1 << 20)
    except RelaError:
        raise
    except urllib.error.HTTPError as error:
        raise RelaError(f"cannot read {url}: HTTP {error.code} {error.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as error:
        text = str(getattr(error, "reason", None) or error)
        raise RelaError(f"cannot read {url}: {type(error).__name__}: {text.splitlines()[0] if text else 'no detail'}") from None


def _spool(pattern: str) -> tuple[list[str], str]:
    """Download the remote tars of ``pattern`` (brace-expanded) into a new temporary folder, each
    read once; returns their local paths (named by the URL's file name) and the folder."""
    import tempfile

    import braceexpand

    urls = list(braceexpand.braceexpand(pattern))
    folder = tempfile.mkdtemp(prefix="rela-embed-input-")
    paths = []
    try:
        for position, url in enumerate(urls):
            name = os.path.basename(url.split("?", 1)[0].rstrip("/")) or f"shard-{position:06d}.tar"
            target = Path(folder) / (name if not any(os.path.basename(p) == name for p in paths) else f"{position:06d}-{name}")
            _download(url, target)
            paths.append(str(target))
    except BaseException:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        raise
    return paths, folder


def open_tar_source(pattern: str, label_field: str | None = None) -> TarSource:
    """Scan tars (module docstring): local files, or remote ones (``http(s)://`` URLs with brace
    patterns, ``pipe:`` commands), which are first copied into a temporary folder (``TMPDIR``;
    removed when the source is) in the same single read.

    Args:
        pattern: a brace pattern or glob of ``.tar`` files, or of tar URLs.
        label_field: ``cls`` or ``json:<key>``: every sample must have it; None: labels from
            ``.cls`` when every sample has one, else unlabelled.

    Raises:
        RelaError: no file matches, a file is not a ``.tar``, a remote tar cannot be read (naming
            its URL), no sample has an image, or ``label_field`` is malformed or missing from a
            sample (naming the first such key).
    """
    if label_field is not None and label_field != "cls" and not label_field.startswith("json:"):
        raise RelaError(f"--label-field must be cls or json:<key>, got {label_field!r}")
    spool = None
    if is_remote_pattern(pattern):
        paths, spool = _spool(pattern)
    else:
        paths = expand_pattern(pattern)
        wrong = next((p for p in paths if not p.endswith(".tar")), None)
        if wrong is not None:
            raise RelaError(f"--data {pattern}: {wrong} is not a .tar shard")
    try:
        source = _scan_tars(pattern, paths, label_field)
    except BaseException:
        if spool is not None:
            import shutil

            shutil.rmtree(spool, ignore_errors=True)
        raise
    if spool is not None:
        import shutil
        import weakref

        weakref.finalize(source, shutil.rmtree, spool, True)
    return source


def _scan_each(paths: list[str], workers: int | None, min_parallel_bytes: int):
    """:func:`_scan_tar` of every path, in order: in a pool of processes (the scan is Python's
    tarfile parsing and SHA-256, one core per shard) or, for few or small shards, here."""
    from .runtime import default_num_workers

    workers = min(len(paths), workers or default_num_workers() + 1)
    if workers < 2 or sum(os.path.getsize(p) for p in paths) < min_parallel_bytes:
        return (_scan_tar(path, shard) for shard, path in enumerate(paths))
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # Forked on Linux: a spawned worker imports the caller's __main__ again, which in a script
    # without an ``if __name__ == "__main__"`` guard starts the scan again and fails loudly.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    try:
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            return list(pool.map(_scan_tar, paths, range(len(paths))))
    except BrokenProcessPool:  # the workers cannot start (e.g. a spawned __main__ read from stdin): scan here
        logger.debug("the scanning processes did not start; scanning %d shards in this process", len(paths))
        return (_scan_tar(path, shard) for shard, path in enumerate(paths))


def _scan_tars(
    pattern: str, paths: list[str], label_field: str | None, workers: int | None = None, min_parallel_bytes: int = PARALLEL_SCAN_MIN_BYTES
) -> TarSource:
    """:func:`open_tar_source` on local ``paths``: the shards are scanned in ``workers`` processes
    (default :func:`rela_pipeline.runtime.default_num_workers` + 1) when there are several and they
    hold at least ``min_parallel_bytes`` together, else in this process; the result is the same."""
    ignored: dict[str, str] = {}
    samples: list[_TarSample] = []
    records = []
    for found, record, left_out in _scan_each(paths, workers, min_parallel_bytes):
        samples += found
        records.append(record)
        ignored.update(left_out)
    if not samples:
        raise RelaError(f"--data {pattern}: no sample with an image in {len(paths)} shard(s)")
    names = [r["name"] for r in records]
    texts = [_label_of(s, label_field or "cls") for s in samples]
    labels, class_names = None, []
    if label_field is not None:
        missing = next((i for i, t in enumerate(texts) if t is None), None)
        if missing is not None:
            raise RelaError(f"--label-field {label_field}: sample {names[samples[missing].shard]}/{samples[missing].key} has none")
    if all(t is not None for t in texts):
        labels, class_names = _class_labels(texts)
    provenance = []
    for s in samples:
        record: dict[str, Any] = {"source_shard": names[s.shard], "source_key": s.key}
        extra = {}
        if "json" in s.side:
            try:
                extra["json"] = json.loads(s.side["json"])
            except ValueError:
                extra["json"] = None
        if "txt" in s.side:
            extra["txt"] = s.side["txt"].decode("utf-8", "replace")
        if extra:
            record["source"] = extra
        provenance.append(record)
    for name, reason in ignored.items():  # once the input is known to hold images: a useless one is one error line
        logger.warning("left out %s: %s", name, reason)
    return TarSource(
        pattern=pattern,
        shard_paths=paths,
        shard_records=records,
        files=[f"{names[s.shard]}/{s.key}" for s in samples],
        fields=[s.extension for s in samples],
        shard_of=np.asarray([s.shard for s in samples], dtype=np.int64),
        offsets=np.asarray([s.offset for s in samples], dtype=np.int64),
        sizes=np.asarray([s.size for s in samples], dtype=np.int64),
        labels=labels,
        class_names=class_names,
        provenance=provenance,
        ignored=ignored,
    )


@dataclass
class FileListSource:
    """A ``.txt`` or ``.csv`` list of image paths (module docstring)."""

    list_path: Path
    files: list[str]
    paths: list[str]
    file_bytes: np.ndarray
    labels: np.ndarray | None
    class_names: list[str]
    ignored: dict[str, str]
    kind: str = "filelist"

    @property
    def location(self) -> str:
        return str(self.list_path)

    def fingerprint(self) -> dict[str, Any]:
        """The list's SHA-256, the image count, their total bytes and the SHA-256 of the paths."""
        return {
            "kind": self.kind,
            "file_count": len(self.files),
            "total_bytes": int(self.file_bytes.sum()),
            "paths_sha256": hashlib.sha256("\n".join(self.files).encode("utf-8")).hexdigest(),
            "list_sha256": hashlib.sha256(self.list_path.read_bytes()).hexdigest(),
        }

    def read(self, row: int) -> bytes:
        return Path(self.paths[row]).read_bytes()

    def byte_range(self, row: int) -> ByteRange:
        """Where :meth:`read` reads sample ``row``: the whole file, ``(path, 0, None)``."""
        return self.paths[row], 0, None

    def open_image(self, row: int) -> Image.Image:
        return decode_rgb(self.paths[row])

    def image_field(self, row: int) -> str:
        return self.files[row].rsplit(".", 1)[-1].lower() if "." in os.path.basename(self.files[row]) else "jpg"

    def origin(self, row: int) -> dict[str, Any]:
        return {"path": self.files[row]}


def _list_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RelaError(f"cannot read the file list {path}: {error}") from None


def _parquet_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a ``.parquet`` list as dicts of strings (pyarrow).

    Raises:
        RelaError: pyarrow is not installed, or the file does not read.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RelaError(f"reading the .parquet list {path} needs pyarrow: pip install 'rela-pipeline[parquet]'") from None
    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises its own ArrowInvalid / OSError family
        raise RelaError(f"cannot read the file list {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    columns = {name: [("" if v is None else str(v)) for v in table.column(name).to_pylist()] for name in table.column_names}
    return [{name: values[i] for name, values in columns.items()} for i in range(table.num_rows)]


def open_file_list(path: Path, label_field: str | None = None) -> FileListSource:
    """Read a ``.txt``, ``.csv`` or ``.parquet`` list (module docstring); listed files that are
    missing are left out (``ignored``).

    Raises:
        RelaError: an unreadable list, a ``.csv``/``.parquet`` without a ``path`` column, a ``label_field``
            column it lacks, or no listed file that exists.
    """
    if path.suffix == ".parquet":
        rows = _parquet_rows(path)
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(_list_text(path))))
    else:
        rows = None
    if rows is not None:
        columns = set(rows[0]) if rows else set()
        if "path" not in columns:
            raise RelaError(f"file list {path} has no 'path' column (columns: {', '.join(sorted(columns)) or 'none'})")
        label_column = label_field or ("label" if "label" in columns else None)
        if label_column is not None and label_column not in columns:
            raise RelaError(f"--label-field {label_column}: file list {path} has no such column")
        entries = [(row["path"].strip(), (row.get(label_column) or "").strip() if label_column else None) for row in rows]
    else:
        if label_field is not None:
            raise RelaError("--label-field needs a .csv or .parquet file list (a .txt list holds paths only)")
        entries = [(line.strip(), None) for line in _list_text(path).splitlines() if line.strip() and not line.startswith("#")]
    files, paths, sizes, texts, ignored = [], [], [], [], {}
    for listed, label in entries:
        full = listed if os.path.isabs(listed) else str(path.parent / listed)
        if not os.path.isfile(full):
            ignored[listed] = "listed file is missing"
            continue
        files.append(listed)
        paths.append(full)
        sizes.append(os.path.getsize(full))
        texts.append(label)
    if not files:
        raise RelaError(f"file list {path} names no existing image ({len(entries)} entries)")
    for name, reason in ignored.items():
        logger.warning("left out %s: %s", name, reason)
    labels, class_names = None, []
    if texts and all(t for t in texts):
        labels, class_names = _class_labels(texts)
    elif label_field is not None:
        first = next(f for f, t in zip(files, texts) if not t)
        raise RelaError(f"--label-field {label_field}: {first} has no label")
    return FileListSource(path, files, paths, np.asarray(sizes, dtype=np.int64), labels, class_names, ignored)


def open_image_source(data: str | os.PathLike, label_field: str | None = None) -> ImageSource:
    """The source ``--data`` names: a directory (ImageFolder), a ``.txt``/``.csv`` file list, or a
    pattern of local ``.tar`` shards (module docstring).

    Raises:
        RelaError: one line naming what was tried when ``data`` is none of these, or any error of
            the source's own opening.
    """
    text = str(data)
    if is_remote_pattern(text):
        return open_tar_source(text, label_field)
    if "://" in text:
        raise RelaError(f"--data {text}: only http(s):// URLs and pipe: commands are read (e.g. pipe:aws s3 cp s3://bucket/part-000000.tar -)")
    path = Path(text).expanduser()
    if path.is_dir():
        if label_field is not None:
            raise RelaError("--label-field applies to tar and file-list input (an ImageFolder's labels are its class folders)")
        return scan_image_folder(path)
    if path.is_file() and path.suffix in LIST_SUFFIXES:
        return open_file_list(path, label_field)
    if path.is_file() and path.suffix == ".tar" or any(c in text for c in "{*?["):
        return open_tar_source(text, label_field)
    if path.exists():
        raise RelaError(f"--data {text}: neither a directory, a .txt/.csv file list nor .tar shards")
    raise RelaError(f"--data {text}: not found (tried an ImageFolder directory, a file list, and a tar pattern)")


__all__ = ["ImageSource", "ImageFolderIndex", "TarSource", "FileListSource", "open_image_source", "open_tar_source", "open_file_list", "SOURCE_KINDS"]
