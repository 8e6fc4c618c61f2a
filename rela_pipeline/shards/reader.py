"""Opening a shard set for training: locate it, check it against its manifest, verify it.

A shard set is named by its directory (``OUT``) or by the URL of its manifest: anything
webdataset's ``gopen`` opens, e.g. ``http://host/set/manifest.json``, ``s3://...`` via ``pipe:``,
or ``pipe:curl -s http://host/set/manifest.json``. The shards, ``scores.npz`` and
``transport.npz`` are the manifest's siblings: their URLs replace the last ``manifest.json`` in the
manifest's URL by the file's name.

Reading the samples of a shard is :mod:`rela_pipeline.shards.samples`; turning an epoch of them
into training batches is :mod:`rela_pipeline.shards.batches`.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RelaError
from .format import SCORES_NAME
from .location import read_url, resolve_location, sibling_url
from .manifest import parse_manifest, read_manifest, verify_shard_set
from .plan import written_shard_contents

logger = logging.getLogger("rela_pipeline")


@dataclass
class ShardSetSource:
    """A located and checked shard set.

    Attributes:
        location: as given (directory or manifest URL).
        manifest: the validated manifest dict.
        shard_urls: URL or path of every shard that will be read, in manifest order.
        shard_samples: samples in each of those shards (from the manifest).
        skipped_shards: names of shards left out under ``skip_bad_shards``.
        local_dir: the directory for a local shard set, else None.
        shard_ids: for each read shard, its position in the manifest's shard list (a stable id
            that seeds its shuffle; default ``0, 1, ...``).
    """

    location: str
    manifest: dict[str, Any]
    shard_urls: list[str]
    shard_samples: list[int]
    skipped_shards: list[str]
    local_dir: Path | None
    shard_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.shard_ids:
            self.shard_ids = list(range(len(self.shard_urls)))
        if len(self.shard_ids) != len(self.shard_urls):
            raise ValueError("one shard id per shard URL")

    @property
    def num_samples(self) -> int:
        """N: the sample count of the shard set (indices run over ``range(N)``)."""
        return int(self.manifest["samples"]["written"])

    @property
    def readable_samples(self) -> int:
        """Samples in the shards that will be read (N minus those in skipped shards)."""
        return int(sum(self.shard_samples))

    @property
    def target_dim(self) -> int:
        """Dimension of the stored representation targets."""
        return int(self.manifest["targets"]["dim"])

    @property
    def class_names(self) -> list[str]:
        """Class names ([] for unlabelled data)."""
        return list(self.manifest["dataset"].get("class_names") or [])

    def without(self, names: list[str]) -> ShardSetSource:
        """A copy that leaves out the shards ``names`` (recorded in ``skipped_shards``).

        Raises:
            RelaError: no shard would be left.
        """
        keep = [(url, count, i) for url, count, i in zip(self.shard_urls, self.shard_samples, self.shard_ids) if os.path.basename(url) not in names]
        if not keep:
            raise RelaError(f"no readable shard left in {self.location}")
        skipped = self.skipped_shards + [n for n in names if n not in self.skipped_shards]
        return ShardSetSource(self.location, self.manifest, [u for u, _, _ in keep], [c for _, c, _ in keep], skipped, self.local_dir, [i for _, _, i in keep])

    def sibling_url(self, name: str) -> str:
        """Path or URL of the file ``name`` next to the manifest."""
        if self.local_dir is not None:
            return str(self.local_dir / name)
        return sibling_url(self.location, name)

    def read_file(self, name: str) -> bytes:
        """Read a sibling file (``scores.npz``, ...) completely.

        Raises:
            RelaError: it cannot be opened or read.
        """
        return read_url(self.sibling_url(name))

    def written_contents(self) -> dict[int, np.ndarray] | None:
        """The sample indices each read shard holds, in stored order, as the manifest's
        ``shard_order`` says (:func:`rela_pipeline.shards.plan.written_shard_contents`): shard id
        -> int64 array; None when the manifest does not record a permutation order. Nothing is
        read: a distributed stream plans its epochs with it and checks every batch against it."""
        order = self.manifest.get("shard_order")
        if not isinstance(order, dict) or order.get("kind") != "permutation" or not isinstance(order.get("seed"), int):
            return None
        counts = [int(s["samples"]) for s in self.manifest["shards"]]
        contents = written_shard_contents(self.num_samples, order["seed"], counts)
        return {shard_id: contents[shard_id] for shard_id in self.shard_ids}

    def load_scores(self) -> dict[str, np.ndarray]:
        """The stage-one scores (``knn_density``, ``nn_similarity``, ``nn_index``, ``label``), checked
        against the manifest's SHA-256.

        Raises:
            RelaError: missing, altered or unreadable.
        """
        import hashlib

        data = self.read_file(SCORES_NAME)
        expected = self.manifest["scores"].get("sha256")
        if expected and hashlib.sha256(data).hexdigest() != expected:
            raise RelaError(f"{SCORES_NAME} of {self.location} does not match the manifest's sha256 (altered or truncated)")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        except (ValueError, OSError) as error:
            raise RelaError(f"cannot read {SCORES_NAME} of {self.location}: {error}") from None


def open_shard_set(location: str | os.PathLike, *, skip_bad_shards: bool = False) -> ShardSetSource:
    """Locate a shard set and check it before training starts.

    Checks: the manifest validates (schema, version, fields); shard counts add up to
    ``samples.written``; targets are a positive dimension. For a local set also: every shard file
    exists with the manifest's byte size (a truncated or replaced shard is caught here, by name).
    Remote shards are checked while streaming.

    Args:
        location: a shard-set directory, or the URL of its ``manifest.json``.
        skip_bad_shards: leave out missing or wrong-sized shards with a warning instead of failing.

    Raises:
        RelaError: any failed check (naming the shard), or no readable shard left.
    """
    location = str(location)
    local_dir = resolve_location(location)
    if local_dir is None:
        manifest = parse_manifest(read_url(location).decode("utf-8", errors="replace"), location)
    else:
        manifest = read_manifest(local_dir)
    shards = manifest["shards"]
    if not isinstance(shards, list) or not shards:
        raise RelaError(f"manifest of {location} lists no shards")
    try:
        counted = sum(int(s["samples"]) for s in shards)
        written = int(manifest["samples"]["written"])
        target_dim = int(manifest["targets"]["dim"])
    except (KeyError, TypeError, ValueError) as error:
        raise RelaError(f"manifest of {location} has malformed shard or sample records ({error})") from None
    if counted != written:
        raise RelaError(f"manifest of {location} is inconsistent: its shards hold {counted} samples but samples.written is {written}")
    if target_dim < 1:
        raise RelaError(f"manifest of {location} records target dim {target_dim}")
    urls, samples, skipped, ids = [], [], [], []
    for shard_id, shard in enumerate(shards):
        name = str(shard["name"])
        if "/" in name or name.startswith("."):
            raise RelaError(f"manifest of {location} names an unsafe shard path {name!r}")
        if local_dir is not None:
            file = local_dir / name
            problem = None
            if not file.is_file():
                problem = f"shard {name} is missing from {local_dir}"
            elif file.stat().st_size != int(shard["bytes"]):
                problem = f"shard {name} is {file.stat().st_size} bytes, the manifest says {shard['bytes']} (truncated or replaced)"
            if problem:
                if not skip_bad_shards:
                    raise RelaError(f"{problem}; rerun embed, or pass --skip-bad-shards to train without it")
                logger.warning("skipping: %s", problem)
                skipped.append(name)
                continue
            urls.append(str(file))
        else:
            urls.append(sibling_url(location, name))
        samples.append(int(shard["samples"]))
        ids.append(shard_id)
    if not urls:
        raise RelaError(f"no readable shard left in {location}")
    return ShardSetSource(location, manifest, urls, samples, skipped, local_dir, ids)


def verified(source: ShardSetSource, skip_bad_shards: bool) -> ShardSetSource:
    """Verify a shard set before training (every checksum, sample key, target and the transport:
    :func:`verify_shard_set`; a remote set is streamed once for it); with ``skip_bad_shards`` the
    shards that fail are left out with a warning as long as nothing outside them fails.

    Returns:
        ``source``, or a copy without the shards that failed.

    Raises:
        RelaError: the set does not verify (the message gives the first problem and the count).
    """
    report = verify_shard_set(source.local_dir if source.local_dir is not None else source.location)
    if report.ok:
        return source
    in_shards = {problem for problems in report.shard_problems.values() for problem in problems}
    outside = [p for p in report.problems if p not in in_shards]
    if skip_bad_shards and not outside:
        for name in report.bad_shards:
            logger.warning("skipping %s: it fails verification (%s)", name, report.shard_problems[name][0])
        return source.without(report.bad_shards)
    raise RelaError(
        f"shard set {source.location} does not verify ({len(report.problems)} problem(s); first: {report.problems[0]}); "
        f"see `rela-pipeline verify {source.location}`, or pass --no-verify to train on it anyway"
    )
