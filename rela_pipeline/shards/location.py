"""Naming a shard set: a local directory, or the URL of its ``manifest.json``.

A remote set is named by anything webdataset's ``gopen`` opens (``http(s)://...``, ``pipe:curl -s
http://host/set/manifest.json``, ``pipe:aws s3 cp s3://b/set/manifest.json -``). Its other files
are the manifest's siblings: their URLs replace the last ``manifest.json`` in the manifest's URL by
the file's name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

from ..errors import RelaError
from .format import MANIFEST_NAME


def is_remote(location: str) -> bool:
    """True for a URL or a ``pipe:`` command, False for a local path."""
    return "://" in location or location.startswith("pipe:")


def resolve_location(location: str | os.PathLike) -> Path | None:
    """The shard set's local directory (a path to its ``manifest.json`` names its directory), or
    None for a remote set.

    Raises:
        RelaError: a remote location that is not the URL of a ``manifest.json``.
    """
    location = str(location)
    if is_remote(location):
        if MANIFEST_NAME not in location:
            raise RelaError(f"a remote shard set is named by the URL of its {MANIFEST_NAME}; got {location}")
        return None
    path = Path(location)
    return path.parent if path.name == MANIFEST_NAME else path


def sibling_url(manifest_url: str, name: str) -> str:
    """The URL of the file ``name`` next to the manifest at ``manifest_url``."""
    head, _, tail = manifest_url.rpartition(MANIFEST_NAME)
    return head + name + tail


def open_url(url: str) -> IO[bytes]:
    """A binary stream of a local path or a URL (raises whatever opening raises)."""
    if not is_remote(url):
        return open(url, "rb")
    import webdataset as wds

    return wds.gopen(url, "rb")


def error_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


def read_url(url: str) -> bytes:
    """Read a local path or a URL completely.

    Raises:
        RelaError: it cannot be opened or read (gopen raises many types: OSError, pipe errors, ...).
    """
    try:
        with open_url(url) as stream:
            return stream.read()
    except Exception as error:
        raise RelaError(f"cannot read {url}: {error_line(error)}") from None
