"""Stage one: embed an ImageFolder with a prior model and write a shard set.

Steps (ReLA section 3 / MISSION.md "The method", items 1-2, plus subset scores):

1. scan the ImageFolder (sorted relative paths; labels from class folders);
2. embed every image with the prior in eval mode, deterministic preprocessing, batched through a
   DataLoader, under ``torch.inference_mode`` and autocast on CUDA; embeddings go to a float32
   memory-map on disk (host memory does not grow with N) while float64 moments accumulate on the
   compute device; undecodable images are skipped and recorded;
3. fit the linear transport (PCA + standardisation) and transport every embedding;
4. score every sample with faiss k-NN in the transported space;
5. write WebDataset shards (original image bytes, ``cls``, ``target.npy``, ``json``), the
   transport and score files, and finally ``manifest.json`` (atomically).

On any error or interrupt the files of the run are removed, so OUT never holds a manifest for
an incomplete run nor a partial file under a final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import __version__
from ..errors import RelaError
from ..fileio import PARTIAL_SUFFIX, exclusive_lock, sha256_file, write_json_atomic, write_npz_atomic
from ..imagefolder import ImageFolderIndex, scan_image_folder
from ..priors import PreprocessedImages, Prior, Preprocessing, load_prior
from ..runtime import autocast_for, resolve_device
from ..scores import DEFAULT_K, DEFAULT_SCORE_DIMS, SubsetScores, knn_scores
from ..shards.format import (
    EMBEDDINGS_NAME, MANIFEST_NAME, SCHEMA, SCHEMA_VERSION, SCORES_NAME, SHARD_GLOB,
    TARGET_DTYPES, TARGET_FIELD, TRANSPORT_NAME, encode_sample,
)
from ..shards.writer import ShardSetWriter
from ..transport import LinearTransport, MomentAccumulator

logger = logging.getLogger(__name__)

WORK_DIR_NAME = ".work"
_OWNED_NAMES = {MANIFEST_NAME, TRANSPORT_NAME, SCORES_NAME, EMBEDDINGS_NAME, WORK_DIR_NAME}

#: Lock file held in OUT while a run writes there (see :func:`rela_pipeline.fileio.exclusive_lock`).
LOCK_NAME = ".rela-embed.lock"


@dataclass
class EmbedConfig:
    """Settings of one ``embed`` run (the CLI options, one to one).

    Attributes:
        data_dir: ImageFolder root.
        prior: prior spec (see :mod:`rela_pipeline.priors`).
        out_dir: output directory of the shard set.
        batch_size: images per forward pass; None: 256 on CUDA, 32 on CPU (large batches are
            slower on CPU: memory traffic, see the README's benchmarks).
        num_workers: DataLoader worker processes decoding images (0: decode in the main process).
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        amp: autocast (bfloat16, float16 where bf16 is unsupported) on CUDA; ignored on CPU.
        image_size: resize whole images to this many pixels instead of the prior's preprocessing.
        seed: seed of random priors and of the order samples are written into shards.
        shard_size: samples per shard.
        max_shard_bytes: bytes per shard at most (a shard closes once it passes this size).
        target_dtype: "float16" or "float32".
        score_k: neighbours for ``knn_density``.
        score_dims: leading transported components used for scores (0: all).
        overwrite: replace a previous shard set in ``out_dir``.
        keep_embeddings: also write the raw prior embeddings (``embeddings.npy``, float32 (N, D)).
        progress: show tqdm progress bars.
    """

    data_dir: Path
    prior: str
    out_dir: Path
    batch_size: int | None = None
    num_workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    device: str = "auto"
    amp: bool = True
    image_size: int | None = None
    seed: int = 0
    shard_size: int = 10_000
    max_shard_bytes: float = 3e9
    target_dtype: str = "float16"
    score_k: int = DEFAULT_K
    score_dims: int = DEFAULT_SCORE_DIMS
    overwrite: bool = False
    keep_embeddings: bool = False
    progress: bool = True

    def validate(self) -> None:
        """Raise :class:`RelaError` on out-of-range settings."""
        if self.batch_size is not None and self.batch_size < 1:
            raise RelaError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise RelaError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.shard_size < 1:
            raise RelaError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.target_dtype not in TARGET_DTYPES:
            raise RelaError(f"--target-dtype must be one of {', '.join(TARGET_DTYPES)}, got {self.target_dtype}")
        if self.score_dims < 0:
            raise RelaError(f"--score-dims must be >= 0, got {self.score_dims}")


@dataclass
class EmbeddingResult:
    """Prior embeddings of a scanned dataset.

    Attributes:
        embeddings: float32 ``(N, D)`` memory-map; rows of failed images are zero.
        ok: bool ``(N,)``, True where the image decoded and the embedding is finite.
        failures: ``{row: reason}`` for rows with ``ok == False``.
        moments: float64 moments of the ``ok`` rows (for the linear transport).
        seconds: wall-clock of the embedding loop.
    """

    embeddings: np.ndarray
    ok: np.ndarray
    failures: dict[int, str]
    moments: MomentAccumulator
    seconds: float

    @property
    def images_per_second(self) -> float:
        return len(self.ok) / max(self.seconds, 1e-9)


def default_batch_size(device: torch.device) -> int:
    """Images per forward pass when none is given: 256 on CUDA, 32 on CPU (larger batches are
    memory-bound and slower on CPU; see the README's benchmarks)."""
    return 256 if device.type == "cuda" else 32


def embedding_dim(prior: Prior, device: torch.device) -> int:
    """Output dimension D of the prior (one forward pass on two blank images).

    Raises:
        RelaError: the prior does not return a ``(B, D)`` tensor.
    """
    size = prior.preprocessing.crop_size
    with torch.inference_mode():
        out = prior.model(prior.preprocessing.normalise(torch.zeros(2, 3, size, size, dtype=torch.uint8, device=device)))
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise RelaError(f"prior {prior.spec} returns {getattr(out, 'shape', type(out))}, expected (batch, dim) embeddings")
    return int(out.shape[1])


def embed_images(
    index: ImageFolderIndex,
    prior: Prior,
    memmap_path: Path,
    *,
    batch_size: int = 256,
    num_workers: int = 2,
    device: torch.device = torch.device("cpu"),
    amp: bool = True,
    progress: bool = True,
) -> EmbeddingResult:
    """Embed every image of ``index`` with ``prior`` into a float32 memory-map at ``memmap_path``.

    Decoding, resizing and cropping run in DataLoader workers on uint8 tensors; normalisation,
    the forward pass (under autocast on CUDA) and the float64 moment accumulation run on
    ``device``. Results are copied back asynchronously into pinned memory and written to the
    memory-map one batch later, so the device does not wait for the host.

    Returns:
        :class:`EmbeddingResult`; host memory is O(batch) apart from the memory-map's page cache.

    Raises:
        RelaError: the prior's output is malformed.
    """
    model = prior.model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    dim = embedding_dim(prior, device)
    n = len(index.files)
    embeddings = np.lib.format.open_memmap(memmap_path, mode="w+", dtype=np.float32, shape=(n, dim))
    ok = np.zeros(n, dtype=bool)
    failures: dict[int, str] = {}
    moments = MomentAccumulator(dim, device)
    loader = DataLoader(
        PreprocessedImages(index.root, index.files, prior.preprocessing),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
    )
    pending: tuple[np.ndarray, torch.Tensor, torch.Tensor, Any] | None = None

    def flush(item) -> None:
        rows, host_out, host_valid, event = item
        if event is not None:
            event.synchronize()
        embeddings[rows] = host_out.numpy()
        ok[rows] = host_valid.numpy()

    start = time.perf_counter()
    with torch.inference_mode(), tqdm(total=n, unit="img", desc="embed", disable=not progress, dynamic_ncols=True) as bar:
        for rows, images, decoded, reasons in loader:
            images = images.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_for(device, amp):
                out = model(prior.preprocessing.normalise(images))
            out = out.float()
            valid = decoded.to(device, non_blocking=True) & torch.isfinite(out).all(dim=1)
            out = torch.where(valid[:, None], out, torch.zeros_like(out))
            moments.update(out, valid)
            if device.type == "cuda":
                host_out = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
                host_valid = torch.empty(valid.shape, dtype=torch.bool, pin_memory=True)
                host_out.copy_(out, non_blocking=True)
                host_valid.copy_(valid, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host_out, host_valid, event = out, valid, None
            if pending is not None:
                flush(pending)
            pending = (rows.numpy(), host_out, host_valid, event)
            for row, is_decoded, reason in zip(rows.tolist(), decoded.tolist(), reasons):
                if not is_decoded:
                    failures[row] = reason
            bar.update(len(rows))
        if pending is not None:
            flush(pending)
    seconds = time.perf_counter() - start
    for row in np.flatnonzero(~ok):
        failures.setdefault(int(row), "prior output is not finite (NaN or Inf)")
    embeddings.flush()
    return EmbeddingResult(embeddings, ok, failures, moments, seconds)


def transport_targets(
    embeddings: np.ndarray,
    rows: np.ndarray,
    transport: LinearTransport,
    out_path: Path,
    dtype: str,
    device: torch.device,
    chunk_rows: int = 65536,
) -> np.ndarray:
    """Transport ``embeddings[rows]`` into a ``(len(rows), K)`` memory-map of ``dtype`` at ``out_path``.

    Computed in float32 on ``device`` in chunks of ``chunk_rows`` rows.
    """
    targets = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.dtype(dtype), shape=(len(rows), transport.output_dim))
    for start in range(0, len(rows), chunk_rows):
        block = torch.from_numpy(np.asarray(embeddings[rows[start : start + chunk_rows]])).to(device)
        targets[start : start + len(block)] = transport.apply(block).cpu().numpy().astype(dtype)
    targets.flush()
    return targets


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0], "rela-pipeline": __version__}
    for name in ("torch", "torchvision", "open_clip_torch", "webdataset", "numpy", "pillow", "faiss-gpu", "faiss-cpu"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def make_output_dir(out_dir: Path) -> None:
    """Create ``out_dir`` (and its parents) if missing.

    Raises:
        RelaError: ``out_dir`` exists and is not a directory.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise RelaError(f"output path exists and is not a directory: {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)


def prepare_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Check that the existing directory ``out_dir`` is empty, or clear a previous shard set from it.

    The run's lock file (:data:`LOCK_NAME`) does not count and is never removed.

    Raises:
        RelaError: it is non-empty and ``overwrite`` is False; or, with ``overwrite``, it holds
            files rela-pipeline did not write (never deleted).
    """
    entries = sorted(e for e in os.listdir(out_dir) if e != LOCK_NAME)
    if not entries:
        return
    if not overwrite:
        raise RelaError(f"output directory {out_dir} is not empty; pass --overwrite to replace the shard set in it")
    owned = lambda name: name in _OWNED_NAMES or Path(name).match(SHARD_GLOB) or name.endswith(PARTIAL_SUFFIX)  # noqa: E731
    foreign = [e for e in entries if not owned(e)]
    if foreign:
        raise RelaError(f"--overwrite refused: {out_dir} holds files rela-pipeline did not write (e.g. {foreign[0]})")
    # The manifest goes first: from here on the directory no longer claims to be complete.
    for name in [MANIFEST_NAME] + [e for e in entries if e != MANIFEST_NAME]:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _remove_run_files(out_dir: Path) -> None:
    """Remove every file a run writes (OUT held none of them when the run started)."""
    paths = [out_dir / name for name in sorted(_OWNED_NAMES)]
    paths += sorted(out_dir.glob(SHARD_GLOB)) + sorted(out_dir.glob("*" + PARTIAL_SUFFIX))
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def run_embed(config: EmbedConfig, on_phase: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run stage one end to end and return the manifest that was written.

    Args:
        config: the run's settings.
        on_phase: optional callback receiving a one-line status for each phase.

    Returns:
        The manifest dict (also written to ``OUT/manifest.json``).

    Raises:
        RelaError: any bad input (see :class:`EmbedConfig`, :func:`scan_image_folder`,
            :func:`rela_pipeline.priors.load_prior`, :func:`make_output_dir`,
            :func:`prepare_output_dir`), no decodable image, or another ``embed`` writing into the
            same OUT (it holds ``OUT/.rela-embed.lock``; the refused run touches nothing in OUT).
            On this, on ``KeyboardInterrupt`` and on any other error, no manifest is written and
            the run's files are removed.
    """
    say = on_phase or logger.info
    config.validate()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    out_dir = Path(config.out_dir)
    index = scan_image_folder(config.data_dir)
    timings["scan"] = time.perf_counter() - t0
    say(f"found {len(index.files)} images in {len(index.class_names) or 'no'} classes under {index.root}")

    t = time.perf_counter()
    prior = load_prior(config.prior, seed=config.seed, image_size=config.image_size)
    device = resolve_device(config.device)
    if config.batch_size is None:  # resolved here so the manifest records the size used
        config = dataclasses.replace(config, batch_size=default_batch_size(device))
    timings["load_prior"] = time.perf_counter() - t
    say(f"prior {config.prior} on {device}, input {prior.preprocessing.crop_size} px")

    make_output_dir(out_dir)
    with exclusive_lock(out_dir / LOCK_NAME, f"embed into {out_dir}"):
        prepare_output_dir(out_dir, config.overwrite)
        work = out_dir / WORK_DIR_NAME
        try:
            work.mkdir()
            manifest = _run_stages(config, index, prior, device, out_dir, work, timings, say)
            shutil.rmtree(work)
            timings["total"] = time.perf_counter() - t0
            manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
            write_json_atomic(out_dir / MANIFEST_NAME, manifest)
            return manifest
        except BaseException:
            _remove_run_files(out_dir)
            raise


def _run_stages(
    config: EmbedConfig,
    index: ImageFolderIndex,
    prior: Prior,
    device: torch.device,
    out_dir: Path,
    work: Path,
    timings: dict[str, float],
    say: Callable[[str], None],
) -> dict[str, Any]:
    result = embed_images(
        index, prior, work / "embeddings.npy", batch_size=config.batch_size, num_workers=config.num_workers,
        device=device, amp=config.amp, progress=config.progress,
    )
    timings["embed"] = result.seconds
    say(f"embedded {len(index.files)} images in {result.seconds:.1f}s ({result.images_per_second:.0f} img/s), {len(result.failures)} skipped")
    kept = np.flatnonzero(result.ok)
    if len(kept) < 2:
        raise RelaError(f"only {len(kept)} of {len(index.files)} images could be decoded; nothing to transport (first failure: {next(iter(result.failures.values()), '-')})")

    t = time.perf_counter()
    transport = LinearTransport.fit(result.moments)
    targets = transport_targets(result.embeddings, kept, transport, work / "targets.npy", config.target_dtype, device)
    timings["transport"] = time.perf_counter() - t

    t = time.perf_counter()
    scores = knn_scores(targets, k=config.score_k, dims=config.score_dims, use_gpu=device.type == "cuda")
    timings["scores"] = time.perf_counter() - t
    say(f"transport: {transport.input_dim} -> {transport.output_dim} dims; scores with k={scores.k} on {scores.dims} dims ({scores.device})")

    t = time.perf_counter()
    labels = index.labels[kept] if index.labels is not None else None
    shards = _write_shards(config, index, kept, targets, scores, labels, out_dir)
    transport.save(out_dir / TRANSPORT_NAME)
    write_npz_atomic(
        out_dir / SCORES_NAME,
        {
            "knn_density": scores.knn_density,
            "nn_similarity": scores.nn_similarity,
            "nn_index": scores.nn_index,
            "label": labels if labels is not None else np.full(len(kept), -1, dtype=np.int64),
        },
    )
    if config.keep_embeddings:
        _write_rows_npy(result.embeddings, kept, out_dir / EMBEDDINGS_NAME)
    timings["write_shards"] = time.perf_counter() - t
    say(f"wrote {len(shards)} shards ({sum(s.bytes for s in shards) / 1e6:.1f} MB) to {out_dir}")
    return _build_manifest(config, index, prior, device, result, kept, transport, scores, labels, shards, out_dir)


def _write_shards(config, index, kept, targets, scores: SubsetScores, labels, out_dir: Path):
    with ShardSetWriter(out_dir, config.shard_size, config.max_shard_bytes) as writer, tqdm(
        total=len(kept), unit="img", desc="shards", disable=not config.progress, dynamic_ncols=True
    ) as bar:
        # Shards hold samples in a seeded random order: an ImageFolder scan is sorted by class, and
        # a streaming reader (shard shuffle + a bounded sample buffer) would otherwise see batches
        # of one or two classes. Keys stay the sample indices, so nothing else depends on the order.
        for i in shard_write_order(len(kept), config.seed).tolist():
            row = kept[i]
            relative = index.files[row]
            label = int(labels[i]) if labels is not None else None
            metadata = {
                "label": label,
                "class_name": index.class_names[label] if label is not None else None,
                "knn_density": float(scores.knn_density[i]),
                "nn_similarity": float(scores.nn_similarity[i]),
                "nn_index": int(scores.nn_index[i]),
            }
            image_bytes = (index.root / relative).read_bytes()
            writer.write(encode_sample(i, relative, image_bytes, np.asarray(targets[i]), metadata, label))
            bar.update(1)
    return writer.shards


def shard_write_order(num_samples: int, seed: int) -> np.ndarray:
    """The order in which sample indices are written into shards: a permutation of
    ``range(num_samples)`` (int64, ``(num_samples,)``) from ``numpy.random.default_rng(seed)``."""
    return np.random.default_rng(seed).permutation(num_samples)


def _write_rows_npy(source: np.ndarray, rows: np.ndarray, path: Path, chunk_rows: int = 65536) -> None:
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=source.dtype, shape=(len(rows), source.shape[1]))
    for start in range(0, len(rows), chunk_rows):
        out[start : start + chunk_rows] = source[rows[start : start + chunk_rows]]
    out.flush()
    del out
    os.replace(partial, path)


def _build_manifest(config, index, prior, device, result, kept, transport, scores, labels, shards, out_dir) -> dict[str, Any]:
    class_counts = np.bincount(labels, minlength=len(index.class_names)) if labels is not None else []
    files = {name: sha256_file(out_dir / name) for name in (TRANSPORT_NAME, SCORES_NAME)}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    manifest = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "prior": {
            "spec": prior.spec,
            "weights": prior.weights,
            "embedding_dim": transport.input_dim,
            "preprocessing": prior.preprocessing.to_dict(),
        },
        "transport": {
            "file": TRANSPORT_NAME,
            "sha256": files[TRANSPORT_NAME],
            "method": "pca+standardise (population statistics, float64)",
            "input_dim": transport.input_dim,
            "output_dim": transport.output_dim,
            "num_samples": transport.num_samples,
            "explained_variance_ratio": [round(float(r), 6) for r in transport.explained_variance_ratio[:16]],
        },
        "targets": {"field": TARGET_FIELD, "dtype": config.target_dtype, "dim": transport.output_dim},
        "scores": {
            "file": SCORES_NAME,
            "sha256": files[SCORES_NAME],
            "fields": ["knn_density", "nn_similarity", "nn_index", "label"],
            "k": scores.k,
            "dims": scores.dims,
            "metric": "cosine",
            "device": scores.device,
        },
        "dataset": {
            "root": str(index.root),
            "fingerprint": index.fingerprint(),
            "class_names": index.class_names,
            "labelled": labels is not None,
        },
        "samples": {
            "scanned": len(index.files),
            "written": int(len(kept)),
            "skipped": len(result.failures),
            "per_class": {name: int(c) for name, c in zip(index.class_names, class_counts)},
        },
        "skipped": [{"path": index.files[row], "reason": reason} for row, reason in sorted(result.failures.items())],
        "ignored": [{"path": path, "reason": reason} for path, reason in sorted(index.ignored.items())],
        "shards": [s.to_dict() for s in shards],
        "shard_order": {"kind": "permutation", "seed": config.seed},
        "settings": settings,
        "software": _package_versions(),
        "host": {
            "hostname": platform.node(),
            "platform": platform.platform(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_count": os.cpu_count(),
        },
        "throughput": {"embed_images_per_s": round(result.images_per_second, 2)},
        "timings_s": {},
    }
    if config.keep_embeddings:
        manifest["embeddings"] = {"file": EMBEDDINGS_NAME, "sha256": sha256_file(out_dir / EMBEDDINGS_NAME), "dtype": "float32", "shape": [int(len(kept)), transport.input_dim]}
    return manifest
