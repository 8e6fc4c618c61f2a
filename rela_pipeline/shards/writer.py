"""Writing shards with webdataset's ``ShardWriter``, never leaving a shard that looks complete.

The shard being written is named ``shard-NNNNNN.tar.partial`` and hashed as its bytes are
written; when webdataset closes it the file is fsynced and renamed to ``shard-NNNNNN.tar``. On an error or Ctrl-C the partial
file is deleted, so a final-named shard is always a complete tar.
"""

from __future__ import annotations

import contextlib
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import webdataset as wds

from ..fileio import PARTIAL_SUFFIX, HashingFile
from .format import SHARD_PATTERN, TAR_MTIME

#: The tar header format of the members written. webdataset's ``TarWriter`` takes a ``format``
#: but does not pass it on to ``tarfile.open`` (webdataset 1.0), so tarfile's PAX default
#: applies; for our short ASCII member names PAX writes the very bytes USTAR does, but checks
#: every header for extended fields first, which made each member 20-40% slower
#: (``benchmarks/shard_writers.py --tar-formats``).
MEMBER_FORMAT = tarfile.USTAR_FORMAT


@dataclass
class ShardInfo:
    """One finished shard: file name, sample count, size in bytes, hex SHA-256."""

    name: str
    samples: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256}


class ShardSetWriter:
    """Write samples into ``out_dir/shard-%06d.tar`` with at most ``shard_size`` samples (and at
    most ``max_shard_bytes`` bytes, webdataset's ``maxsize``) per shard.

    Use as a context manager; :attr:`shards` lists the finished shards. Samples must be dicts
    of already-encoded bytes (see :func:`rela_pipeline.shards.format.encode_sample`).

    Args:
        out_dir: the shard set's directory.
        shard_size: samples per shard at most.
        max_shard_bytes: bytes per shard at most.
        finished: shards already written by an interrupted run; writing continues with the next
            shard number. The samples written next must be the ones that followed them.
        on_shard: called with the list of finished shards each time one is closed and renamed
            (after ``fsync``), e.g. to journal the progress.

    Raises:
        ValueError: shard_size < 1.
        OSError: on write errors (disk full, ...); the partial shard is removed first.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        shard_size: int,
        max_shard_bytes: float = 3e9,
        finished: Sequence[ShardInfo] = (),
        on_shard: Callable[[list[ShardInfo]], None] | None = None,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.shards: list[ShardInfo] = list(finished)
        self._on_shard = on_shard
        self._handle = None
        self._count = 0
        self._writer = wds.ShardWriter(
            SHARD_PATTERN,
            maxcount=shard_size,
            maxsize=max_shard_bytes,
            opener=self._open,
            post=self._finish,
            start_shard=len(self.shards),
            mtime=TAR_MTIME,
            encoder=False,
            verbose=0,
        )

    def _open(self, name: str):
        self._handle = HashingFile(open(self.out_dir / (name + PARTIAL_SUFFIX), "wb"))
        self._count = 0
        return self._handle

    def _finish(self, name: str) -> None:
        handle, self._handle = self._handle, None
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        partial = self.out_dir / (name + PARTIAL_SUFFIX)
        if self._count == 0:  # webdataset opens a stream eagerly; an empty one is not a shard
            partial.unlink()
            return
        final = self.out_dir / name
        os.replace(partial, final)
        self.shards.append(ShardInfo(name, self._count, final.stat().st_size, handle.hexdigest()))
        if self._on_shard is not None:
            self._on_shard(list(self.shards))

    def write(self, sample: dict[str, Any]) -> None:
        """Append one encoded sample (starts a new shard when the current one is full)."""
        self._writer.write(sample)  # webdataset rolls over to the next shard first when full
        # the new shard's tarfile exists only once its first sample is written: the others of
        # the shard are written with MEMBER_FORMAT's headers (the same bytes)
        self._writer.tarstream.tarstream.format = MEMBER_FORMAT
        self._count += 1

    def close(self) -> None:
        """Finish the last shard."""
        self._writer.close()

    def abort(self) -> None:
        """Drop the shard in progress (its partial file is deleted); finished shards stay."""
        self._writer.post = None
        with contextlib.suppress(Exception):
            self._writer.tarstream.close()
        if self._handle is not None:
            name = Path(self._handle.name)
            with contextlib.suppress(Exception):
                self._handle.close()
            with contextlib.suppress(FileNotFoundError):
                name.unlink()
            self._handle = None
        self._writer.tarstream = None

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
