"""Small file helpers: checksums and atomic writes.

Output is never left half-written: every file is written under a temporary name in its final
directory and renamed (``os.replace``, atomic on POSIX) once complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import IO, Iterator, Mapping

import numpy as np

#: Suffix of files that are still being written; a reader must ignore them.
PARTIAL_SUFFIX = ".partial"

#: ZIP timestamp used for every member of an ``.npz`` we write, so files are byte-reproducible.
_FIXED_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file, read in ``chunk_bytes`` chunks (constant memory).

    Raises:
        OSError: if the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


class HashingFile:
    """Wrap a binary file so that every byte written or read through it is SHA-256 hashed.

    Lets a stream be checksummed in the same pass that writes or parses it (e.g. a tar shard),
    instead of reading the file a second time. Only ``write``/``read``/``flush``/``close`` and
    ``fileno`` are forwarded.
    """

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.name = getattr(handle, "name", None)
        self._digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        return self.handle.write(data)

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self._digest.update(data)
        return data

    def drain(self, chunk_bytes: int = 1 << 20) -> None:
        """Read (and hash) whatever the consumer left unread, up to the end of the file."""
        while self.read(chunk_bytes):
            pass

    def hexdigest(self) -> str:
        """Hex SHA-256 of the bytes passed through so far."""
        return self._digest.hexdigest()

    def flush(self) -> None:
        self.handle.flush()

    def fileno(self) -> int:
        return self.handle.fileno()

    def close(self) -> None:
        self.handle.close()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open ``path + '.partial'`` for writing and rename it to ``path`` on success.

    On any exception (``KeyboardInterrupt`` included) the partial file is removed and the
    exception propagates; ``path`` is then either absent or still holds its previous content.
    """
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_json_atomic(path: str | os.PathLike, payload: Mapping) -> None:
    """Write ``payload`` as indented, key-sorted UTF-8 JSON, atomically (see :func:`atomic_write`)."""
    text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n"
    with atomic_write(path, "w") as handle:
        handle.write(text)


def npy_bytes(array: np.ndarray) -> bytes:
    """Serialise one array in ``.npy`` format (no pickle) and return the bytes."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def write_npz_atomic(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write arrays to an uncompressed ``.npz`` readable by ``np.load(path, allow_pickle=False)``.

    Unlike ``np.savez`` the ZIP members carry a fixed timestamp and are written in sorted name
    order, so the same arrays always give the same bytes (and the same SHA-256).
    """
    with atomic_write(path, "wb") as handle:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
            for name in sorted(arrays):
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_ZIP_DATE)
                info.external_attr = 0o644 << 16
                archive.writestr(info, npy_bytes(np.asarray(arrays[name])))


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` file into memory without allowing pickled objects.

    Raises:
        OSError, ValueError, zipfile.BadZipFile: if the file is missing or malformed.
    """
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}
