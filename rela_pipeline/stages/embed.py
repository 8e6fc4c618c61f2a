"""Stage one: embed an ImageFolder with a prior model and write a shard set.

Steps (ReLA section 3 / MISSION.md "The method", items 1-2, plus subset scores):

1. scan the ImageFolder (sorted relative paths; labels from class folders);
2. embed every image with the prior in eval mode, deterministic preprocessing, batched through a
   DataLoader, under ``torch.inference_mode`` and autocast on CUDA; embeddings go to a float32
   memory-map on disk (host memory does not grow with N); undecodable images are skipped and
   recorded;
3. fit the linear transport (PCA + standardisation; float64 moments read back from the map in
   fixed chunks) and transport every embedding into a target memory-map;
4. score every sample with faiss k-NN in the transported space (``scores.npz``);
5. write WebDataset shards (original image bytes, ``cls``, ``target.npy``, ``json``) and finally
   ``manifest.json`` (atomically), then remove the work directory.

Every finished piece is recorded with its SHA-256 in a journal in ``OUT/.work`` (see
:mod:`rela_pipeline.stages.embed_journal`), so after an error, Ctrl-C or ``kill -9`` the run
continues with ``--resume`` and gives the same bytes as an uninterrupted run. Every file is
written under a temporary name or into ``.work`` and renamed when complete; OUT holds a manifest
only once the shard set is complete. One run at a time writes into OUT (a POSIX lock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import json
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
from ..fileio import (
    PARTIAL_SUFFIX, create_npy_memmap, exclusive_lock, load_npz, open_npy_memmap, sha256_file, write_json_atomic,
    write_npz_atomic,
)
from ..imagefolder import ImageFolderIndex, scan_image_folder
from ..priors import PreprocessedImages, Prior, load_prior
from ..runtime import autocast_for, resolve_device
from ..scores import DEFAULT_K, DEFAULT_SCORE_DIMS, SCORE_INDEXES, knn_scores
from ..shards.format import (
    EMBEDDINGS_NAME, MANIFEST_NAME, SCHEMA, SCHEMA_VERSION, SCORES_NAME, SHARD_GLOB,
    TARGET_DTYPES, TARGET_FIELD, TRANSPORT_NAME, encode_sample,
)
from ..shards.manifest import read_manifest
from ..shards.writer import ShardInfo, ShardSetWriter
from ..transport import LinearTransport, fit_linear_transport
from .embed_journal import EmbedJournal, first_difference, journal_path

logger = logging.getLogger(__name__)

WORK_DIR_NAME = ".work"
_OWNED_NAMES = {MANIFEST_NAME, TRANSPORT_NAME, SCORES_NAME, EMBEDDINGS_NAME, WORK_DIR_NAME}

#: Lock file held in OUT while a run writes there (see :func:`rela_pipeline.fileio.exclusive_lock`).
LOCK_NAME = ".rela-embed.lock"

#: :class:`EmbedConfig` fields that control how a run goes, not what it writes: left out of the
#: manifest's ``settings`` and of the identity a resumed run must match.
RUN_CONTROL_FIELDS = ("out_dir", "num_workers", "overwrite", "resume", "progress", "checkpoint_seconds")


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
        score_index: how neighbours are searched, one of :data:`rela_pipeline.scores.SCORE_INDEXES`
            (``auto``: exact up to 200,000 samples on CPU, 2M on GPU, else IVF tuned to recall@k
            >= 0.95; the search and its measured recall go into the manifest).
        overwrite: replace a previous shard set (or interrupted run) in ``out_dir``.
        resume: continue the interrupted run in ``out_dir`` (see :func:`run_embed`); on an empty
            ``out_dir`` a new run starts; on a complete set with the same identity nothing is done.
        keep_embeddings: also write the raw prior embeddings (``embeddings.npy``, float32 (N, D)).
        progress: show tqdm progress bars.
        checkpoint_seconds: wall-clock seconds between journal records of embedded rows (the most
            embedding work a crash loses).
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
    score_index: str = "auto"
    overwrite: bool = False
    resume: bool = False
    keep_embeddings: bool = False
    progress: bool = True
    checkpoint_seconds: float = 60.0

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
        if self.score_index not in SCORE_INDEXES:
            raise RelaError(f"--score-index must be one of {', '.join(SCORE_INDEXES)}, got {self.score_index!r}")
        if self.resume and self.overwrite:
            raise RelaError("--resume and --overwrite exclude each other: continue the run in OUT, or replace it")
        if not self.checkpoint_seconds > 0:
            raise RelaError(f"--checkpoint-seconds must be > 0, got {self.checkpoint_seconds}")


@dataclass
class EmbeddingResult:
    """Outcome of :func:`embed_images` (the rows it embedded; the embeddings are in the memory-map).

    Attributes:
        failures: ``{row: reason}`` for rows whose image did not decode or whose embedding is not
            finite (their rows in the memory-map are zero).
        images: rows embedded by this call (``N - start_row``).
        seconds: wall-clock of the embedding loop.
    """

    failures: dict[int, str]
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def default_batch_size(device: torch.device) -> int:
    """Images per forward pass when none is given: 256 on CUDA, 32 on CPU (larger batches are
    memory-bound and slower on CPU; see the README's benchmarks)."""
    return 256 if device.type == "cuda" else 32


def embedding_dim(prior: Prior, device: torch.device) -> int:
    """Output dimension D of the prior (one forward pass on two blank images on ``device``; the
    model must already be there).

    Raises:
        RelaError: the prior does not return a ``(B, D)`` tensor.
    """
    size = prior.preprocessing.crop_size
    with torch.inference_mode():
        out = prior.model(prior.preprocessing.normalise(torch.zeros(2, 3, size, size, dtype=torch.uint8, device=device)))
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise RelaError(f"prior {prior.spec} returns {getattr(out, 'shape', type(out))}, expected (batch, dim) embeddings")
    return int(out.shape[1])


@contextlib.contextmanager
def _deterministic_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def embed_images(
    index: ImageFolderIndex,
    prior: Prior,
    embeddings: np.ndarray,
    *,
    start_row: int = 0,
    batch_size: int = 256,
    num_workers: int = 2,
    device: torch.device = torch.device("cpu"),
    amp: bool = True,
    progress: bool = True,
    on_checkpoint: Callable[[int, int, dict[int, str]], None] | None = None,
    checkpoint_seconds: float = 60.0,
) -> EmbeddingResult:
    """Embed images ``start_row ..`` of ``index`` with ``prior`` into rows of ``embeddings``.

    Decoding, resizing and cropping run in DataLoader workers on uint8 tensors; normalisation and
    the forward pass (under autocast on CUDA) run on ``device``. Results are copied back
    asynchronously into pinned memory and written one batch later, so the device does not wait for
    the host. Batches are ``[start_row + j * batch_size, ...)``: a run resumed at a batch boundary
    embeds exactly the batches an uninterrupted run would.

    Args:
        embeddings: float32 ``(N, D)`` writable array, typically a memory-map (see
            :func:`rela_pipeline.fileio.create_npy_memmap`); host memory stays O(batch).
        start_row: first row to embed (rows before it are left as they are).
        on_checkpoint: called as ``on_checkpoint(start, stop, failures)`` once rows
            ``[start, stop)`` are written (and msync-ed), every ``checkpoint_seconds`` of
            wall-clock and at the end; ``failures`` are those rows' entries of the result's.
        checkpoint_seconds: seconds between checkpoints.

    Returns:
        :class:`EmbeddingResult` for rows ``[start_row, N)``.

    Raises:
        RelaError: the prior does not return ``(B, D)`` embeddings (D from ``embeddings``; size the
            array with :func:`embedding_dim`).
        ValueError: ``embeddings`` is not ``(N, D)``.
    """
    n = len(index.files)
    if embeddings.ndim != 2 or embeddings.shape[0] != n:
        raise ValueError(f"expected an ({n}, D) embeddings array, got {embeddings.shape}")
    dim = embeddings.shape[1]
    model = prior.model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    failures: dict[int, str] = {}
    loader = DataLoader(
        PreprocessedImages(index.root, index.files[start_row:], prior.preprocessing),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
    )
    pending: tuple[int, torch.Tensor, torch.Tensor, Any, list[str]] | None = None
    checkpoint_start, flushed, last_checkpoint = start_row, start_row, time.monotonic()

    def flush(item) -> None:
        nonlocal flushed
        first, host_out, host_valid, event, reasons = item
        if event is not None:
            event.synchronize()
        embeddings[first : first + len(host_out)] = host_out.numpy()
        for offset in np.flatnonzero(~host_valid.numpy()).tolist():
            failures[first + offset] = reasons[offset] or "prior output is not finite (NaN or Inf)"
        flushed = first + len(host_out)

    def checkpoint() -> None:
        nonlocal checkpoint_start, last_checkpoint
        if on_checkpoint is not None and flushed > checkpoint_start:
            if isinstance(embeddings, np.memmap):
                embeddings.flush()
            on_checkpoint(checkpoint_start, flushed, {r: why for r, why in failures.items() if r >= checkpoint_start})
        checkpoint_start, last_checkpoint = flushed, time.monotonic()

    start = time.perf_counter()
    # Deterministic cuDNN kernels, so a rerun or a resumed run computes the same embeddings.
    with _deterministic_cudnn(), torch.inference_mode(), tqdm(total=n, initial=start_row, unit="img", desc="embed", disable=not progress, dynamic_ncols=True) as bar:
        for rows, images, decoded, reasons in loader:
            images = images.to(device, non_blocking=True)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_for(device, amp):
                out = model(prior.preprocessing.normalise(images))
            if out.ndim != 2 or out.shape[1] != dim:  # shapes only: no host-device synchronisation
                raise RelaError(f"prior {prior.spec} returns {tuple(out.shape)} for a batch, expected (batch, {dim}) embeddings")
            out = out.float()
            valid = decoded.to(device, non_blocking=True) & torch.isfinite(out).all(dim=1)
            out = torch.where(valid[:, None], out, torch.zeros_like(out))
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
                if time.monotonic() - last_checkpoint >= checkpoint_seconds:
                    checkpoint()
            pending = (start_row + int(rows[0]), host_out, host_valid, event, list(reasons))
            bar.update(len(rows))
        if pending is not None:
            flush(pending)
    seconds = time.perf_counter() - start
    checkpoint()
    return EmbeddingResult(failures, n - start_row, seconds)


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

    Computed in float32 on ``device`` in chunks of ``chunk_rows`` rows (host memory
    O(chunk_rows * D) beyond the maps' page cache).

    Raises:
        OSError: the file cannot be created (``ENOSPC`` when the disk is full).
    """
    targets = create_npy_memmap(out_path, dtype, (len(rows), transport.output_dim))
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


def _is_owned(name: str) -> bool:
    return name in _OWNED_NAMES or Path(name).match(SHARD_GLOB) or name.endswith(PARTIAL_SUFFIX)


def prepare_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Check that the existing directory ``out_dir`` is empty, or clear a previous shard set (or
    interrupted run) from it.

    The run's lock file (:data:`LOCK_NAME`) does not count and is never removed.

    Raises:
        RelaError: it is non-empty and ``overwrite`` is False (the message says whether it holds an
            interrupted run, which ``--resume`` continues); or, with ``overwrite``, it holds files
            rela-pipeline did not write (never deleted).
    """
    entries = sorted(e for e in os.listdir(out_dir) if e != LOCK_NAME)
    if not entries:
        return
    if not overwrite:
        if WORK_DIR_NAME in entries and MANIFEST_NAME not in entries:
            raise RelaError(f"output directory {out_dir} holds an interrupted embed run; pass --resume to continue it, or --overwrite to start over")
        raise RelaError(f"output directory {out_dir} is not empty; pass --overwrite to replace the shard set in it")
    foreign = [e for e in entries if not _is_owned(e)]
    if foreign:
        raise RelaError(f"--overwrite refused: {out_dir} holds files rela-pipeline did not write (e.g. {foreign[0]})")
    # The manifest goes first: from here on the directory no longer claims to be complete.
    for name in [MANIFEST_NAME] + [e for e in entries if e != MANIFEST_NAME]:
        _remove(out_dir / name)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def identity_settings(config: EmbedConfig) -> dict[str, Any]:
    """The settings that decide a shard set's bytes, JSON-ready: every :class:`EmbedConfig` field
    except the run-control ones (:data:`RUN_CONTROL_FIELDS`). Recorded as the manifest's ``settings``."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k not in RUN_CONTROL_FIELDS}


def run_identity(config: EmbedConfig, index: ImageFolderIndex, prior: Prior) -> dict[str, Any]:
    """What must match for ``--resume`` to continue a run, or for two runs to give the same bytes:
    identity settings, dataset fingerprint, prior spec and weights provenance, software versions."""
    identity = {
        "settings": identity_settings(config),
        "dataset": index.fingerprint(),
        "prior": {"spec": prior.spec, "weights": prior.weights},
        "software": _package_versions(),
    }
    return json.loads(json.dumps(identity))  # tuples -> lists, as read back from JSON


def manifest_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """The :func:`run_identity` of the run that wrote ``manifest``."""
    return {
        "settings": manifest.get("settings"),
        "dataset": manifest["dataset"]["fingerprint"],
        "prior": {"spec": manifest["prior"]["spec"], "weights": manifest["prior"]["weights"]},
        "software": manifest["software"],
    }


def _open_run(config: EmbedConfig, out_dir: Path, identity: dict[str, Any], say: Callable[[str], None]) -> EmbedJournal | dict[str, Any]:
    """Decide how the run starts in ``out_dir`` (locked): a new journal, the interrupted run's
    journal (``--resume``), or, for ``--resume`` on a complete set with this identity, its manifest.

    Raises:
        RelaError: see :func:`prepare_output_dir`; a resume whose identity differs (naming the first
            difference); an unreadable journal.
    """
    work = out_dir / WORK_DIR_NAME
    if config.resume:
        if (out_dir / MANIFEST_NAME).is_file():
            manifest = read_manifest(out_dir)
            difference = first_difference(manifest_identity(manifest), identity)
            if difference:
                raise RelaError(f"--resume refused: {out_dir} holds a complete shard set made differently ({difference}); use --overwrite to replace it")
            _remove(work)  # left by a run killed between writing its manifest and cleaning up
            return manifest
        journal = EmbedJournal.load(journal_path(work))
        if journal is not None:
            difference = first_difference(journal.identity, identity)
            if difference:
                raise RelaError(f"--resume refused: the interrupted run in {out_dir} was started differently ({difference}); rerun it as it was, or use --overwrite")
            for partial in out_dir.glob("*" + PARTIAL_SUFFIX):
                partial.unlink()
            return journal
        if any(e != LOCK_NAME for e in os.listdir(out_dir)):
            say(f"no progress journal in {out_dir}: nothing can be resumed, starting over")
        prepare_output_dir(out_dir, overwrite=True)
    else:
        prepare_output_dir(out_dir, config.overwrite)
    work.mkdir()
    journal = EmbedJournal(journal_path(work), identity)
    journal.save()
    return journal


def run_embed(config: EmbedConfig, on_phase: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run stage one end to end (or continue an interrupted run) and return the manifest.

    Progress is journalled in ``OUT/.work`` (see :mod:`rela_pipeline.stages.embed_journal`); with
    ``config.resume`` every finished piece that still matches its checksum is kept and the rest is
    redone, giving the same bytes as an uninterrupted run.

    Args:
        config: the run's settings.
        on_phase: optional callback receiving a one-line status for each phase.

    Returns:
        The manifest dict (also written to ``OUT/manifest.json``, last and atomically).

    Raises:
        RelaError: any bad input (see :class:`EmbedConfig`, :func:`scan_image_folder`,
            :func:`rela_pipeline.priors.load_prior`, :func:`make_output_dir`,
            :func:`prepare_output_dir`, :func:`_open_run`); no decodable image; another ``embed``
            writing into the same OUT (it holds ``OUT/.rela-embed.lock``; the refused run touches
            nothing); an I/O error such as a full disk (the message names the file). On these, on
            ``KeyboardInterrupt`` and on any other error no manifest is written, partial files are
            removed, and the finished work stays in OUT for ``--resume``.
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
    identity = run_identity(config, index, prior)
    with exclusive_lock(out_dir / LOCK_NAME, f"embed into {out_dir}"):
        opened = _open_run(config, out_dir, identity, say)
        if not isinstance(opened, EmbedJournal):
            say(f"{out_dir} already holds this shard set, complete; nothing to resume")
            return opened
        try:
            manifest = _run_stages(config, index, prior, device, out_dir, opened, timings, say)
            timings["total"] = time.perf_counter() - t0
            manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
            write_json_atomic(out_dir / MANIFEST_NAME, manifest)
        except OSError as error:
            where = f": {error.filename}" if error.filename else ""
            raise RelaError(
                f"I/O error ({error.strerror or error}{where}); no manifest written, finished work kept in {out_dir}: "
                "fix the cause (e.g. free disk space) and rerun with --resume"
            ) from None
        _remove(out_dir / WORK_DIR_NAME)
        return manifest


def _reuse_or_redo(journal: EmbedJournal, phase: str, path: Path, redo: Callable[[], dict[str, Any] | None]) -> bool:
    """Keep a finished ``phase`` whose file still has the journal's SHA-256, or run ``redo`` (which
    writes ``path`` and may return JSON-ready info on how), drop every later phase and record this
    one. Returns True when kept."""
    expected = journal.phase_sha256(phase)
    if expected is not None and path.is_file() and sha256_file(path) == expected:
        return True
    journal.invalidate_after(phase)
    info = redo()
    journal.record_phase(phase, sha256_file(path), info)
    return False


def _rows_sha256(array: np.ndarray, start: int, stop: int) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array[start:stop])).cast("B")).hexdigest()


def _embed_phase(config, index, prior, device, work: Path, journal: EmbedJournal, timings, say) -> tuple[np.ndarray, dict[int, str], EmbeddingResult | None]:
    """Embed every image not yet embedded (checking the finished chunks' checksums first)."""
    prior.model.to(device)
    shape = (len(index.files), embedding_dim(prior, device))
    path = work / EMBEDDINGS_NAME
    chunks = journal.embedded_chunks
    embeddings = open_npy_memmap(path, np.float32, shape) if chunks else None
    if embeddings is None:
        if chunks:
            say(f"{path} is missing or malformed: embedding every image again")
            journal.truncate_embedded(0)
        embeddings = create_npy_memmap(path, np.float32, shape)
        start = 0
    else:
        good = next((i for i, (a, b, sha) in enumerate(chunks) if _rows_sha256(embeddings, a, b) != sha), len(chunks))
        start = chunks[good - 1][1] if good else 0
        if good < len(chunks):
            say(f"embeddings from row {start} on do not match their checksums: embedding them again")
            journal.truncate_embedded(good)
            journal.save()
        say(f"resuming: {start} of {shape[0]} images already embedded (checksums match)")
    result = None
    if start < shape[0]:
        journal.invalidate_after("embed")
        result = embed_images(
            index, prior, embeddings, start_row=start, batch_size=config.batch_size, num_workers=config.num_workers,
            device=device, amp=config.amp, progress=config.progress, checkpoint_seconds=config.checkpoint_seconds,
            on_checkpoint=lambda a, b, failed: journal.record_embedded(a, b, _rows_sha256(embeddings, a, b), failed),
        )
        timings["embed"] = result.seconds
        say(f"embedded {result.images} images in {result.seconds:.1f}s ({result.images_per_second:.0f} img/s)")
    return embeddings, journal.embed_failures, result


def _run_stages(
    config: EmbedConfig,
    index: ImageFolderIndex,
    prior: Prior,
    device: torch.device,
    out_dir: Path,
    journal: EmbedJournal,
    timings: dict[str, float],
    say: Callable[[str], None],
) -> dict[str, Any]:
    work = journal.path.parent
    resumed = bool(journal.embedded_chunks)
    embeddings, failures, result = _embed_phase(config, index, prior, device, work, journal, timings, say)
    ok = np.ones(len(index.files), dtype=bool)
    ok[list(failures)] = False
    kept = np.flatnonzero(ok)
    if len(kept) < 2:
        raise RelaError(f"only {len(kept)} of {len(index.files)} images could be decoded; nothing to transport (first failure: {next(iter(failures.values()), '-')})")

    t = time.perf_counter()
    transport_path, targets_path = out_dir / TRANSPORT_NAME, work / "targets.npy"
    reference = reference_sample_indices(len(kept))

    def fit_transport() -> None:
        fitted = fit_linear_transport(embeddings, ok, device)
        fitted.save(transport_path, reference=(reference, np.asarray(embeddings[kept[reference]])))

    _reuse_or_redo(journal, "transport", transport_path, fit_transport)
    transport = LinearTransport.load(transport_path)
    targets_shape = (len(kept), transport.output_dim)
    def write_targets() -> None:
        transport_targets(embeddings, kept, transport, targets_path, config.target_dtype, device)

    _reuse_or_redo(journal, "targets", targets_path, write_targets)
    targets = open_npy_memmap(targets_path, config.target_dtype, targets_shape, mode="r")
    if targets is None:
        raise RelaError(f"{targets_path} does not hold ({targets_shape[0]}, {targets_shape[1]}) {config.target_dtype} targets; start over with --overwrite")
    timings["transport"] = time.perf_counter() - t

    t = time.perf_counter()
    scores_path = out_dir / SCORES_NAME
    labels = index.labels[kept] if index.labels is not None else None

    def compute_scores() -> dict[str, Any]:
        scores = knn_scores(targets, k=config.score_k, dims=config.score_dims, use_gpu=device.type == "cuda", index=config.score_index, seed=config.seed)
        write_npz_atomic(scores_path, {
            "knn_density": scores.knn_density,
            "nn_similarity": scores.nn_similarity,
            "nn_index": scores.nn_index,
            "label": labels if labels is not None else np.full(len(kept), -1, dtype=np.int64),
        })
        return {"search": scores.index, "device": scores.device}

    _reuse_or_redo(journal, "scores", scores_path, compute_scores)
    scores = load_npz(scores_path)
    timings["scores"] = time.perf_counter() - t
    score_dims = min(config.score_dims, transport.output_dim) if config.score_dims else transport.output_dim
    score_k = min(config.score_k, len(kept) - 1)
    scores_info = journal.phase_info("scores") or {}  # the search (index, recall) and where it ran
    search = scores_info.get("search", {"kind": "exact"})
    recall = f", recall@{score_k} {search['recall_at_k']:.3f}" if "recall_at_k" in search else ""
    say(f"transport: {transport.input_dim} -> {transport.output_dim} dims; scores with k={score_k} on {score_dims} dims ({search['kind']} search{recall})")

    t = time.perf_counter()
    reused = _shards_to_keep(journal, out_dir)
    shards_reused = len(reused)
    shards = _write_shards(config, index, kept, targets, scores, labels, out_dir, journal, reused)
    if config.keep_embeddings:
        _write_rows_npy(embeddings, kept, out_dir / EMBEDDINGS_NAME)
    timings["write_shards"] = time.perf_counter() - t
    say(f"wrote {len(shards)} shards ({sum(s.bytes for s in shards) / 1e6:.1f} MB) to {out_dir}")
    run = {"resumed": resumed, "images_embedded": result.images if result else 0, "shards_reused": shards_reused}
    file_sha256 = {TRANSPORT_NAME: journal.phase_sha256("transport"), SCORES_NAME: journal.phase_sha256("scores")}
    manifest = _build_manifest(config, index, prior, device, result, failures, kept, transport, len(reference), score_k, score_dims, labels, shards, out_dir, file_sha256, run)
    manifest["scores"].update(scores_info)
    return manifest


def _shards_to_keep(journal: EmbedJournal, out_dir: Path) -> list[ShardInfo]:
    """The journal's finished shards up to the first one missing or altered; every other shard
    file (and partial file) in OUT is removed."""
    kept: list[ShardInfo] = []
    for record in journal.shards:
        path = out_dir / record["name"]
        if not path.is_file() or sha256_file(path) != record["sha256"]:
            break
        kept.append(ShardInfo(**record))
    names = {s.name for s in kept}
    for path in list(out_dir.glob(SHARD_GLOB)) + list(out_dir.glob("*" + PARTIAL_SUFFIX)):
        if path.name not in names:
            path.unlink()
    if len(kept) != len(journal.shards):
        journal.record_shards([s.to_dict() for s in kept])
    return kept


def _write_shards(config, index, kept, targets, scores: dict[str, np.ndarray], labels, out_dir: Path, journal: EmbedJournal, done: list[ShardInfo]) -> list[ShardInfo]:
    position = sum(s.samples for s in done)
    order = shard_write_order(len(kept), config.seed)
    on_shard = lambda shards: journal.record_shards([s.to_dict() for s in shards])  # noqa: E731
    with ShardSetWriter(out_dir, config.shard_size, config.max_shard_bytes, finished=done, on_shard=on_shard) as writer, tqdm(
        total=len(kept), initial=position, unit="img", desc="shards", disable=not config.progress, dynamic_ncols=True
    ) as bar:
        # Shards hold samples in a seeded random order: an ImageFolder scan is sorted by class, and
        # a streaming reader (shard shuffle + a bounded sample buffer) would otherwise see batches
        # of one or two classes. Keys stay the sample indices, so nothing else depends on the order.
        for i in order[position:].tolist():
            row = kept[i]
            relative = index.files[row]
            label = int(labels[i]) if labels is not None else None
            metadata = {
                "label": label,
                "class_name": index.class_names[label] if label is not None else None,
                "knn_density": float(scores["knn_density"][i]),
                "nn_similarity": float(scores["nn_similarity"][i]),
                "nn_index": int(scores["nn_index"][i]),
            }
            image_bytes = (index.root / relative).read_bytes()
            writer.write(encode_sample(i, relative, image_bytes, np.asarray(targets[i]), metadata, label))
            bar.update(1)
    return writer.shards


#: Samples whose raw embeddings are stored in ``transport.npz`` for ``verify`` to recompute.
REFERENCE_SAMPLES = 256


def reference_sample_indices(num_samples: int, count: int = REFERENCE_SAMPLES) -> np.ndarray:
    """Sample indices (int64, sorted, unique) whose embeddings go into ``transport.npz`` as the
    reference sample: ``count`` evenly spaced indices, or all of them when there are fewer."""
    return np.unique(np.linspace(0, num_samples - 1, min(count, num_samples)).round().astype(np.int64))


def shard_write_order(num_samples: int, seed: int) -> np.ndarray:
    """The order in which sample indices are written into shards: a permutation of
    ``range(num_samples)`` (int64, ``(num_samples,)``) from ``numpy.random.default_rng(seed)``."""
    return np.random.default_rng(seed).permutation(num_samples)


def _write_rows_npy(source: np.ndarray, rows: np.ndarray, path: Path, chunk_rows: int = 65536) -> None:
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    out = create_npy_memmap(partial, source.dtype, (len(rows), source.shape[1]))
    for start in range(0, len(rows), chunk_rows):
        out[start : start + chunk_rows] = source[rows[start : start + chunk_rows]]
    out.flush()
    del out
    os.replace(partial, path)


def _build_manifest(config, index, prior, device, result, failures, kept, transport, reference_samples, score_k, score_dims, labels, shards, out_dir, files, run) -> dict[str, Any]:
    class_counts = np.bincount(labels, minlength=len(index.class_names)) if labels is not None else []
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
            "reference_samples": int(reference_samples),
        },
        "targets": {"field": TARGET_FIELD, "dtype": config.target_dtype, "dim": transport.output_dim},
        "scores": {
            "file": SCORES_NAME,
            "sha256": files[SCORES_NAME],
            "fields": ["knn_density", "nn_similarity", "nn_index", "label"],
            "k": score_k,
            "dims": score_dims,
            "metric": "cosine",
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
            "skipped": len(failures),
            "per_class": {name: int(c) for name, c in zip(index.class_names, class_counts)},
        },
        "skipped": [{"path": index.files[row], "reason": reason} for row, reason in sorted(failures.items())],
        "ignored": [{"path": path, "reason": reason} for path, reason in sorted(index.ignored.items())],
        "shards": [s.to_dict() for s in shards],
        "shard_order": {"kind": "permutation", "seed": config.seed},
        "settings": identity_settings(config),
        "software": _package_versions(),
        "run": {
            "out_dir": str(config.out_dir),
            "num_workers": config.num_workers,
            "checkpoint_seconds": config.checkpoint_seconds,
            **run,
        },
        "host": {
            "hostname": platform.node(),
            "platform": platform.platform(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_count": os.cpu_count(),
        },
        "throughput": {"embed_images_per_s": round(result.images_per_second, 2) if result is not None else None},
        "timings_s": {},
    }
    if config.keep_embeddings:
        manifest["embeddings"] = {"file": EMBEDDINGS_NAME, "sha256": sha256_file(out_dir / EMBEDDINGS_NAME), "dtype": "float32", "shape": [int(len(kept)), transport.input_dim]}
    return manifest
