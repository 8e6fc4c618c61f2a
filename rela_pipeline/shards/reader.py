"""Reading a shard set for training: locate and check it, then stream batches of views.

A shard set is named by its directory (``OUT``) or by the URL of its manifest: anything
webdataset's ``gopen`` opens, e.g. ``http://host/set/manifest.json``, ``s3://...`` via ``pipe:``,
or ``pipe:curl -s http://host/set/manifest.json``. The shards, ``scores.npz`` and
``transport.npz`` are the manifest's siblings: their URLs replace the last ``manifest.json`` in the
manifest's URL by the file's name.

Streaming (one epoch, built per epoch so the subset and the shuffles are a function of
``(seed, epoch)``)::

    shard URLs, shuffled  ->  split by DataLoader worker  ->  tar samples (webdataset)
      ->  keep the epoch's subset (by key, before any decoding)  ->  shuffle buffer
      ->  decode image, target (first K components), label  ->  batches of B with their views

A batch is a dict ``{"views": [(B, 3, S, S) float32, ...], "target": (B, K) float32,
"label": (B,) int64 (-1 when unlabelled), "index": (B,) int64, "phase": "rela" | "ssl"}``. The views
come from the ReLA or the method's transform according to a flag shared with the workers, read
once per batch, so a batch never mixes the two. Errors inside workers travel as
``{"error": "<one line>"}`` batches and are raised as :class:`RelaError` by the consumer.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from ..errors import RelaError
from ..fileio import npy_from_bytes
from ..imagefolder import UNDECODABLE_IMAGE_ERRORS, decode_rgb
from .format import IMAGE_FIELDS, SCORES_NAME, TARGET_FIELD
from .location import read_url, resolve_location, sibling_url
from .manifest import parse_manifest, read_manifest, verify_shard_set
from .plan import written_shard_contents

logger = logging.getLogger("rela_pipeline")

#: Values of the shared phase flag.
PHASE_RELA, PHASE_SSL = 1, 0


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

    def without(self, names: list[str]) -> "ShardSetSource":
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


class _ErrorLatch:
    """Collects the first stream error inside a worker so it can be passed on as a batch."""

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


def _is_sample_key(key: object) -> bool:
    return isinstance(key, str) and len(key) == 9 and key.isdigit()


def in_subset(sample: dict[str, Any], mask: np.ndarray | None) -> bool:
    """Whether a streamed sample is kept before decoding: its ``__key__`` index is in ``mask``
    (``(N,)`` bool; None keeps all). A key that is no sample index is kept, so that decoding
    refuses it by name (:func:`_decode_sample`)."""
    key = sample.get("__key__")
    if mask is None or not _is_sample_key(key):
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


def _decode_sample(sample: dict[str, Any], target_dim: int) -> tuple[Image.Image, np.ndarray, int, int]:
    """Decode one streamed sample: ``(RGB image, float32 (target_dim,) target, label or -1, index)``.

    Raises:
        ValueError: a key that is not a sample index (e.g. a path-traversal name), no image, a
            target that is missing, too large, of the wrong shape or dtype, or not finite.
        OSError, PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning: an image
            PIL cannot decode or with more than ``Image.MAX_IMAGE_PIXELS`` pixels.
    """
    key = sample["__key__"]
    if not _is_sample_key(key):
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


class TrainingStream(torch.utils.data.IterableDataset):
    """One epoch of training batches from a shard set (see the module docstring).

    Args:
        source: from :func:`open_shard_set`.
        subset_mask: ``(N,)`` bool, the epoch's subset.
        target_dim: K, leading target components to return.
        rela_views, ssl_views: PIL image -> list of ``(3, S, S)`` float tensors.
        phase: shared flag (``multiprocessing.Value``) holding :data:`PHASE_RELA` or
            :data:`PHASE_SSL`; read once per batch.
        batch_size: B; the last incomplete batch of each worker is dropped.
        seed, epoch: seed the shard order and the shuffle buffer.
        shuffle_buffer: samples held for shuffling (per worker).
        skip_bad_shards: warn and continue on unreadable shards and undecodable samples.
    """

    def __init__(
        self,
        source: ShardSetSource,
        subset_mask: np.ndarray,
        target_dim: int,
        rela_views: Callable,
        ssl_views: Callable,
        phase: Any,
        batch_size: int,
        seed: int,
        epoch: int,
        shuffle_buffer: int = 2000,
        skip_bad_shards: bool = False,
    ) -> None:
        super().__init__()
        self.urls = list(source.shard_urls)
        self.mask = subset_mask
        self.target_dim = target_dim
        self.rela_views = rela_views
        self.ssl_views = ssl_views
        self.phase = phase
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.shuffle_buffer = shuffle_buffer
        self.skip = skip_bad_shards

    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, workers = self._worker()
        order = list(self.urls)
        random.Random(f"{self.seed}:{self.epoch}:shards").shuffle(order)
        mine = order[worker::workers]
        latch = _ErrorLatch(self.skip)
        samples = wds.tarfile_to_samples(handler=latch.handle_shard)({"url": url} for url in mine)
        # Samples with a key that is no sample index go on to be refused by name in _decode_sample.
        selected = (s for s in samples if in_subset(s, self.mask))
        rng = random.Random(f"{self.seed}:{self.epoch}:{worker}:buffer")
        shuffled = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 500), rng=rng)(selected)
        batch: list[tuple] = []
        for sample in shuffled:
            try:
                batch.append(_decode_sample(sample, self.target_dim))
            except UNDECODABLE_IMAGE_ERRORS as error:  # ValueError covers the key and target checks
                message = bad_sample(sample.get("__url__", "?"), error, self.skip)
                if message is None:
                    continue
                yield {"error": message}
                return
            if len(batch) == self.batch_size:
                yield self._make_batch(batch)
                batch = []
        if latch.message:
            yield {"error": latch.message}

    def _make_batch(self, batch: list[tuple]) -> dict[str, Any]:
        rela = self.phase.value == PHASE_RELA
        transform = self.rela_views if rela else self.ssl_views
        per_sample = [transform(image) for image, _, _, _ in batch]
        views = [torch.stack([views[v] for views in per_sample]) for v in range(len(per_sample[0]))]
        return {
            "views": views,
            "target": torch.from_numpy(np.stack([t for _, t, _, _ in batch])),
            "label": torch.tensor([label for _, _, label, _ in batch], dtype=torch.int64),
            "index": torch.tensor([index for _, _, _, index in batch], dtype=torch.int64),
            "phase": "rela" if rela else "ssl",
        }


def new_phase_flag(rela: bool) -> Any:
    """A flag shared with DataLoader workers (fork or spawn) telling which views to make."""
    return multiprocessing.get_context().Value("b", PHASE_RELA if rela else PHASE_SSL, lock=False)


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
