"""Small file helpers: checksums and atomic writes.

Output is never left half-written: every file is written under a temporary name in its final
directory and renamed (``os.replace``, atomic on POSIX) once complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import itertools
import json
import os
import socket
import time
import zipfile
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO

import numpy as np

from .errors import RelaError

#: Suffix of files that are still being written; a reader must ignore them.
PARTIAL_SUFFIX = ".partial"

#: ZIP timestamp used for every member of an ``.npz`` we write, so files are byte-reproducible.
_FIXED_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


#: A file's bytes to read: ``(path, offset, size)``; ``size`` None reads from ``offset`` to the
#: end of the file.
ByteRange = tuple[str, int, "int | None"]

#: Byte ranges :func:`read_byte_ranges` asks the kernel to fetch ahead of the one being read.
PREFETCH_RANGES = 256


def read_byte_ranges(ranges: Iterable[ByteRange], lookahead: int = PREFETCH_RANGES) -> Iterator[bytes]:
    """The bytes of each ``(path, offset, size)`` range, in order, with the next ``lookahead``
    ranges prefetched by the kernel.

    Each range's file is opened ``lookahead`` ranges early and its bytes are announced with
    ``posix_fadvise(POSIX_FADV_WILLNEED)`` (Linux), so the kernel reads them asynchronously and
    can merge and reorder the disk reads while this thread reads the earlier ones from the page
    cache (``os.pread``). No threads: in the shards' random order over 1M images in 100 tars,
    from a cold page cache, a read took 85-96 us serially and 14-15 us prefetched, and 13 against
    5-6 us from the cache (``benchmarks/stage_one_io.py``; thread pools were slower than both).
    Files shared by consecutive ranges (tar shards) are opened once while in the window. Where
    ``posix_fadvise`` is missing (macOS) the reads are the same, without the prefetch. Memory:
    at most ``lookahead`` open files, no buffered data.

    Raises:
        OSError: for the first range whose file cannot be opened or read, or that ends early
            (raised at that range's turn: every range before it is yielded first).
    """
    advise = getattr(os, "posix_fadvise", None)
    handles: dict[str, list[int]] = {}  # path -> [fd, ranges in the window]
    window: deque[tuple[str, int, int | None, OSError | None]] = deque()
    upcoming = iter(ranges)

    def enter(path: str, offset: int, size: int | None) -> None:
        error = None
        try:
            if path not in handles:
                handles[path] = [os.open(path, os.O_RDONLY), 0]
            handles[path][1] += 1
            if advise is not None:
                advise(handles[path][0], offset, size or 0, os.POSIX_FADV_WILLNEED)
        except OSError as failure:
            error = failure
        window.append((path, offset, size, error))

    def leave(path: str) -> None:
        handle = handles.get(path)
        if handle is not None:
            handle[1] -= 1
            if handle[1] == 0:
                os.close(handles.pop(path)[0])

    try:
        for path, offset, size in itertools.islice(upcoming, lookahead):
            enter(path, offset, size)
        while window:
            path, offset, size, error = window.popleft()
            for following in itertools.islice(upcoming, 1):
                enter(*following)
            try:
                if error is not None:
                    raise error
                fd = handles[path][0]
                wanted = os.fstat(fd).st_size - offset if size is None else size
                data = os.pread(fd, wanted, offset)
                while len(data) < wanted:  # pread may return less than asked
                    more = os.pread(fd, wanted - len(data), offset + len(data))
                    if not more:
                        raise OSError(errno.EIO, f"{path}: {wanted} bytes expected at offset {offset}, the file ends after {len(data)}")
                    data += more
            finally:
                leave(path)
            yield data
    finally:
        for fd, _ in handles.values():
            os.close(fd)


def announce_byte_ranges(ranges: Iterable[ByteRange]) -> int:
    """Ask the kernel to start reading every ``(path, offset, size)`` range into the page cache, and
    return at once: each file is opened, announced with ``posix_fadvise(POSIX_FADV_WILLNEED)`` and
    closed (the read-ahead it starts outlives the descriptor), so the reads that follow find their
    bytes cached. The embedding DataLoader announces each batch's files before it decodes them one
    by one: one worker then keeps a whole batch of disk reads in flight, where it read one file at
    a time (``benchmarks/stage_one_io.py``).

    Errors are ignored (a file that cannot be opened is reported by the read that follows, in its
    turn). Without ``posix_fadvise`` (macOS) nothing is announced. Returns the ranges announced.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return 0
    announced = 0
    for path, offset, size in ranges:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            advise(fd, offset, size or 0, os.POSIX_FADV_WILLNEED)
            announced += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return announced


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


def npy_from_bytes(data: bytes, max_items: int) -> np.ndarray:
    """Parse one ``.npy`` array from untrusted bytes: the header is read first, and an array of
    objects (pickle) or of more than ``max_items`` elements is refused before anything is allocated.

    Raises:
        ValueError: not ``.npy`` bytes, an object dtype, too many elements, or truncated data.
    """
    buffer = io.BytesIO(data)
    version = np.lib.format.read_magic(buffer)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(buffer)
    if dtype.hasobject:
        raise ValueError("object arrays (pickle) are not accepted")
    if int(np.prod(shape, dtype=np.float64)) > max_items:
        raise ValueError(f"array of shape {shape} is larger than {max_items} elements")
    return np.load(io.BytesIO(data), allow_pickle=False)


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


def create_npy_memmap(path: str | os.PathLike, dtype: np.dtype | str, shape: tuple[int, ...]) -> np.memmap:
    """Create a ``.npy`` file of ``shape`` and ``dtype`` at ``path`` and return it memory-mapped
    (``mode="w+"``, zero-filled).

    The file's blocks are reserved up front with ``posix_fallocate``: a memory-map written on a full
    disk kills the process with SIGBUS, so a full disk must be found here, as an ``OSError``.

    Raises:
        OSError: the file cannot be created or the space reserved (``ENOSPC`` on a full disk).
    """
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without it: sparse is all we get
            raise
    finally:
        os.close(fd)
    return array


def open_npy_memmap(path: str | os.PathLike, dtype: np.dtype | str, shape: tuple[int, ...], mode: str = "r+") -> np.memmap | None:
    """Memory-map an existing ``.npy`` file (no pickle) if it has exactly ``dtype`` and ``shape``.

    Returns:
        The memory-map, or None when the file is missing, unreadable or of another dtype or shape.
    """
    try:
        array = np.load(path, mmap_mode=mode, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if array.dtype != np.dtype(dtype) or array.shape != tuple(shape):
        return None
    return array


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` file into memory without allowing pickled objects.

    Raises:
        OSError, ValueError, zipfile.BadZipFile: if the file is missing or malformed.
    """
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking POSIX record lock (``fcntl.lockf``) on ``path`` for the block.

    A POSIX lock belongs to the process: the kernel drops it when the process exits for any reason
    (``kill -9`` included), and forked children (DataLoader workers that outlive a killed parent
    for a few seconds) do not inherit it. So a crashed run never leaves it stuck; the file itself
    stays behind then and the next holder reuses it. NFS forwards these locks to the server. Two
    holders inside one process are not told apart (POSIX semantics).

    The holder writes ``pid <n> on <host> since <time>`` into the file for the refusal message,
    and removes the file when the block exits, normally or by an exception. After locking it checks
    that the file it locked is still the one at ``path``, so a process that opened the file just
    before the previous holder removed it never runs on a lock of an unlinked file.

    Args:
        path: the lock file (created if missing).
        what: the refused operation, starting with a command name (e.g. ``"embed into OUT"``).

    Raises:
        RelaError: another process holds the lock (the message names it), or the lock file
            cannot be created.
    """
    path = Path(path)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise RelaError(f"cannot create lock file {path}: {error.strerror}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise RelaError(f"cannot lock {path}: {error.strerror}") from None
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise RelaError(f"another {what.split()[0]} is running ({holder}); refusing to {what} at the same time") from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
    try:
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)
