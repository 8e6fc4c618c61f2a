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
from ..distributed import Distribution, collective_failures, init_distribution, quiet_unless_main
from ..runtime import autocast_for
from ..scores import DEFAULT_K, DEFAULT_SCORE_DIMS, SCORE_INDEXES, RowScores, ScoreSearch, build_score_search, score_rows
from ..shards.format import (
    EMBEDDINGS_NAME, MANIFEST_NAME, SCHEMA, SCHEMA_VERSION, SCORES_NAME, SHARD_GLOB, SHARD_PATTERN,
    TARGET_DTYPES, TARGET_FIELD, TRANSPORT_NAME, encode_sample,
)
from ..shards.manifest import read_manifest
from ..shards.writer import ShardInfo, ShardSetWriter
from ..transport import LinearTransport, fit_linear_transport
from .embed_journal import EmbedJournal, RankProgress, first_difference, journal_path
from .embed_plan import missing_batches, rank_row_range, rank_rows_to_embed, rank_share

logger = logging.getLogger(__name__)

WORK_DIR_NAME = ".work"
_OWNED_NAMES = {MANIFEST_NAME, TRANSPORT_NAME, SCORES_NAME, EMBEDDINGS_NAME, WORK_DIR_NAME}

#: Lock file held in OUT while a run writes there (see :func:`rela_pipeline.fileio.exclusive_lock`).
LOCK_NAME = ".rela-embed.lock"

#: :class:`EmbedConfig` fields that control how a run goes, not what it writes: left out of the
#: manifest's ``settings`` and of the identity a resumed run must match.
RUN_CONTROL_FIELDS = ("out_dir", "num_workers", "overwrite", "resume", "progress", "checkpoint_seconds", "dist_timeout_s")


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
        dist_timeout_s: under torchrun, seconds a rank waits for the others before the job fails.
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
    dist_timeout_s: float = 600.0

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
        if not self.dist_timeout_s > 0:
            raise RelaError(f"--dist-timeout must be > 0, got {self.dist_timeout_s}")


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
    stop_row: int | None = None,
    batch_size: int = 256,
    num_workers: int = 2,
    device: torch.device = torch.device("cpu"),
    amp: bool = True,
    progress: bool = True,
    on_checkpoint: Callable[[int, int, dict[int, str]], None] | None = None,
    checkpoint_seconds: float = 60.0,
) -> EmbeddingResult:
    """Embed images ``start_row .. stop_row - 1`` of ``index`` with ``prior`` into rows of ``embeddings``.

    Decoding, resizing and cropping run in DataLoader workers on uint8 tensors; normalisation and
    the forward pass (under autocast on CUDA) run on ``device``. Results are copied back
    asynchronously into pinned memory and written one batch later, so the device does not wait for
    the host. Batches are ``[start_row + j * batch_size, ...)``: a run resumed at a batch boundary
    embeds exactly the batches an uninterrupted run would.

    Args:
        embeddings: float32 ``(N, D)`` writable array, typically a memory-map (see
            :func:`rela_pipeline.fileio.create_npy_memmap`); host memory stays O(batch).
        start_row: first row to embed (other rows are left as they are).
        stop_row: one past the last row to embed (None: N).
        on_checkpoint: called as ``on_checkpoint(start, stop, failures)`` once rows
            ``[start, stop)`` are written (and msync-ed), every ``checkpoint_seconds`` of
            wall-clock and at the end; ``failures`` are those rows' entries of the result's.
        checkpoint_seconds: seconds between checkpoints.

    Returns:
        :class:`EmbeddingResult` for rows ``[start_row, stop_row)``.

    Raises:
        RelaError: the prior does not return ``(B, D)`` embeddings (D from ``embeddings``; size the
            array with :func:`embedding_dim`).
        ValueError: ``embeddings`` is not ``(N, D)``.
    """
    n = len(index.files)
    if embeddings.ndim != 2 or embeddings.shape[0] != n:
        raise ValueError(f"expected an ({n}, D) embeddings array, got {embeddings.shape}")
    stop_row = n if stop_row is None else stop_row
    dim = embeddings.shape[1]
    model = prior.model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    failures: dict[int, str] = {}
    loader = DataLoader(
        PreprocessedImages(index.root, index.files[start_row:stop_row], prior.preprocessing),
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
    with _deterministic_cudnn(), torch.inference_mode(), tqdm(total=stop_row, initial=start_row, unit="img", desc="embed", disable=not progress, dynamic_ncols=True) as bar:
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
    return EmbeddingResult(failures, stop_row - start_row, seconds)


#: Rows transported per chunk (the unit ranks share: :mod:`rela_pipeline.stages.embed_plan`).
TRANSPORT_CHUNK_ROWS = 65536


def transport_targets(
    embeddings: np.ndarray,
    rows: np.ndarray,
    transport: LinearTransport,
    out_path: Path,
    dtype: str,
    device: torch.device,
    chunk_rows: int = TRANSPORT_CHUNK_ROWS,
) -> np.ndarray:
    """Transport ``embeddings[rows]`` into a ``(len(rows), K)`` memory-map of ``dtype`` at ``out_path``.

    Computed in float32 on ``device`` in chunks of ``chunk_rows`` rows (host memory
    O(chunk_rows * D) beyond the maps' page cache).

    Raises:
        OSError: the file cannot be created (``ENOSPC`` when the disk is full).
    """
    targets = create_npy_memmap(out_path, dtype, (len(rows), transport.output_dim))
    transport_rows(embeddings, rows, transport, targets, device, 0, len(rows), chunk_rows)
    targets.flush()
    return targets


def transport_rows(
    embeddings: np.ndarray,
    rows: np.ndarray,
    transport: LinearTransport,
    targets: np.ndarray,
    device: torch.device,
    start: int,
    stop: int,
    chunk_rows: int = TRANSPORT_CHUNK_ROWS,
) -> None:
    """Write ``targets[i] = transport(embeddings[rows[i]])`` for ``start <= i < stop`` in chunks of
    ``chunk_rows`` from ``start`` (float32 on ``device``, stored in ``targets``' dtype). A rank
    whose ``start`` is a multiple of ``chunk_rows`` transports the chunks one process would."""
    for first in range(start, stop, chunk_rows):
        last = min(stop, first + chunk_rows)
        block = torch.from_numpy(np.asarray(embeddings[rows[first:last]])).to(device)
        targets[first:last] = transport.apply(block).cpu().numpy().astype(targets.dtype)


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

    Under ``torchrun`` (several processes; see :mod:`rela_pipeline.distributed`) every rank runs
    this function: each embeds its share of the batches into the shared embeddings map, rank 0
    fits the transport, the ranks share the transport, the scoring and the shard writing
    (:mod:`rela_pipeline.stages.embed_plan`), and rank 0 alone holds the lock, writes the journal
    and writes the manifest, last. OUT must be on a filesystem every rank sees.

    Args:
        config: the run's settings.
        on_phase: optional callback receiving a one-line status for each phase (rank 0's).

    Returns:
        The manifest dict (also written to ``OUT/manifest.json``, last and atomically); every rank
        returns it.

    Raises:
        RelaError: any bad input (see :class:`EmbedConfig`, :func:`scan_image_folder`,
            :func:`rela_pipeline.priors.load_prior`, :func:`make_output_dir`,
            :func:`prepare_output_dir`, :func:`_open_run`); no decodable image; another ``embed``
            writing into the same OUT (it holds ``OUT/.rela-embed.lock``; the refused run touches
            nothing); an I/O error such as a full disk (the message names the file); under
            torchrun, ranks that disagree on the dataset or the prior, or a lost rank. On these, on
            ``KeyboardInterrupt`` and on any other error no manifest is written, partial files are
            removed, and the finished work stays in OUT for ``--resume``.
    """
    say = on_phase or logger.info
    config.validate()
    distribution, device = init_distribution(config.device, config.dist_timeout_s)
    try:
        with quiet_unless_main(distribution), collective_failures(distribution):
            return _run_embed(config, distribution, device, lambda message: say(message) if distribution.is_main else None)
    finally:
        distribution.close()


@dataclass
class _EmbedRun:
    """One rank's view of a run: settings, inputs, where it writes, and rank 0's journal."""

    config: EmbedConfig
    index: ImageFolderIndex
    prior: Prior
    device: torch.device
    distribution: Distribution
    out_dir: Path
    timings: dict[str, float]
    say: Callable[[str], None]
    journal: EmbedJournal | None = None  # rank 0's; None on the other ranks

    @property
    def work(self) -> Path:
        return self.out_dir / WORK_DIR_NAME

    @property
    def gpu_id(self) -> int | None:
        """The CUDA device faiss uses on this rank (None on the CPU)."""
        return (self.device.index or 0) if self.device.type == "cuda" else None

    def recorder(self) -> EmbedJournal | RankProgress:
        """Where this rank records finished work: the journal on rank 0, its own file elsewhere."""
        if self.distribution.is_main:
            return self.journal
        return RankProgress.at(self.work, self.distribution.rank, self.distribution.world_size)


def _run_embed(config: EmbedConfig, distribution: Distribution, device: torch.device, say: Callable[[str], None]) -> dict[str, Any]:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    out_dir = Path(config.out_dir)
    if distribution.enabled:
        config = dataclasses.replace(config, progress=config.progress and distribution.is_main)
    index = scan_image_folder(config.data_dir)
    timings["scan"] = time.perf_counter() - t0
    say(f"found {len(index.files)} images in {len(index.class_names) or 'no'} classes under {index.root}"
        + (f"; {distribution.world_size} ranks ({distribution.backend})" if distribution.enabled else ""))

    t = time.perf_counter()
    prior = load_prior(config.prior, seed=config.seed, image_size=config.image_size)
    if config.batch_size is None:  # resolved here so the manifest records the size used
        config = dataclasses.replace(config, batch_size=default_batch_size(device))
    timings["load_prior"] = time.perf_counter() - t
    say(f"prior {config.prior} on {device}, input {prior.preprocessing.crop_size} px")

    identity = run_identity(config, index, prior)
    if distribution.enabled:  # every rank must see the same images and build the same prior
        values = distribution.gather(json.dumps(identity, sort_keys=True))
        if any(v != values[0] for v in values):
            raise RelaError(f"the ranks disagree on the dataset, the prior or the settings ({first_difference(json.loads(values[0]), json.loads(next(v for v in values if v != values[0])))}): "
                            "every rank must see the same DATA and OUT")
    run = _EmbedRun(config, index, prior, device, distribution, out_dir, timings, say)
    with contextlib.ExitStack() as stack:

        def open_on_main() -> dict[str, Any] | None:
            make_output_dir(out_dir)
            stack.enter_context(exclusive_lock(out_dir / LOCK_NAME, f"embed into {out_dir}"))
            opened = _open_run(config, out_dir, identity, say)
            if isinstance(opened, EmbedJournal):
                run.journal = opened
                return None
            say(f"{out_dir} already holds this shard set, complete; nothing to resume")
            return opened

        complete = distribution.on_main(open_on_main)
        if complete is not None:
            return complete
        try:
            manifest = _run_stages(run)
            if distribution.is_main:
                timings["total"] = time.perf_counter() - t0
                manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
                write_json_atomic(out_dir / MANIFEST_NAME, manifest)
        except OSError as error:
            where = f": {error.filename}" if error.filename else ""
            raise RelaError(
                f"I/O error ({error.strerror or error}{where}); no manifest written, finished work kept in {out_dir}: "
                "fix the cause (e.g. free disk space) and rerun with --resume"
            ) from None
        distribution.barrier()  # no rank is still reading OUT/.work
        if distribution.is_main:
            _remove(run.work)
        return distribution.broadcast(manifest if distribution.is_main else None)


def _phase_done(journal: EmbedJournal, phase: str, path: Path) -> bool:
    """Whether a finished ``phase``'s file still has the journal's SHA-256."""
    expected = journal.phase_sha256(phase)
    return expected is not None and path.is_file() and sha256_file(path) == expected


def _shared_phase(
    run: _EmbedRun,
    phase: str,
    path: Path,
    *,
    prepare: Callable[[], None] = lambda: None,
    work: Callable[[], None] = lambda: None,
    finish: Callable[[], dict[str, Any] | None] = lambda: None,
) -> bool:
    """Keep a finished ``phase`` whose file ``path`` still has the journal's SHA-256, or redo it:
    rank 0 drops every later phase and runs ``prepare`` (e.g. creates the shared output), every
    rank runs ``work`` (its share), then rank 0 runs ``finish`` (which may return JSON-ready info
    on how the phase ran) and records the file's SHA-256. Returns True when kept."""

    def decide() -> bool:
        if _phase_done(run.journal, phase, path):
            return True
        run.journal.invalidate_after(phase)
        prepare()
        return False

    if run.distribution.on_main(decide):
        return True
    work()
    run.distribution.barrier()

    def record() -> None:
        info = finish()  # may write the file
        run.journal.record_phase(phase, sha256_file(path), info)

    run.distribution.on_main(record)
    return False


def _rows_sha256(array: np.ndarray, start: int, stop: int) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array[start:stop])).cast("B")).hexdigest()


def _embedding_to_do(run: _EmbedRun, path: Path, shape: tuple[int, int]) -> list[tuple[int, int]]:
    """On rank 0: fold in the ranks' records, check the finished row ranges against their checksums
    (dropping those that no longer match), create the embeddings map if there is none; return
    the finished ranges."""
    journal = run.journal
    journal.absorb_rank_progress()
    chunks = journal.embedded_chunks
    embeddings = open_npy_memmap(path, np.float32, shape) if chunks else None
    if embeddings is None:
        if chunks:
            run.say(f"{path} is missing or malformed: embedding every image again")
            journal.keep_embedded([])
            journal.save()
        create_npy_memmap(path, np.float32, shape)
        return []
    good = [chunk for chunk in chunks if _rows_sha256(embeddings, chunk[0], chunk[1]) == chunk[2]]
    if len(good) < len(chunks):
        run.say(f"{len(chunks) - len(good)} embedded row ranges do not match their checksums: embedding them again")
        journal.keep_embedded(good)
        journal.save()
    run.say(f"resuming: {sum(b - a for a, b, _ in good)} of {shape[0]} images already embedded (checksums match)")
    return [(a, b) for a, b, _ in good]


def _embed_phase(run: _EmbedRun) -> tuple[np.ndarray, dict[int, str], EmbeddingResult | None]:
    """Embed every image not yet embedded, each rank its share of the missing batches; return the
    embeddings map (read-only), the failed rows and the run's throughput (None when nothing was
    embedded)."""
    config, distribution = run.config, run.distribution
    run.prior.model.to(run.device)
    shape = (len(run.index.files), embedding_dim(run.prior, run.device))
    path = run.work / EMBEDDINGS_NAME
    done = distribution.on_main(lambda: _embedding_to_do(run, path, shape))
    if len(missing_batches(shape[0], config.batch_size, done)):
        distribution.on_main(lambda: (run.journal.invalidate_after("embed"), run.journal.save()))
    mine = rank_rows_to_embed(shape[0], config.batch_size, done, distribution.rank, distribution.world_size)
    images, seconds = 0, 0.0
    if mine:
        embeddings = open_npy_memmap(path, np.float32, shape, mode="r+")
        recorder = run.recorder()
        for start, stop in mine:
            result = embed_images(
                run.index, run.prior, embeddings, start_row=start, stop_row=stop, batch_size=config.batch_size, num_workers=config.num_workers,
                device=run.device, amp=config.amp, progress=config.progress, checkpoint_seconds=config.checkpoint_seconds,
                on_checkpoint=lambda a, b, failed: recorder.record_embedded(a, b, _rows_sha256(embeddings, a, b), failed),
            )
            images, seconds = images + result.images, seconds + result.seconds
        embeddings.flush()
        del embeddings  # closed before the barrier, so every rank's rows are on disk for the next phases
    counts = distribution.gather((images, seconds))
    images, seconds = sum(c[0] for c in counts), max(c[1] for c in counts)

    def finished() -> dict[int, str]:
        run.journal.absorb_rank_progress()
        missing = missing_batches(shape[0], config.batch_size, [(a, b) for a, b, _ in run.journal.embedded_chunks])
        if len(missing):  # every rank finished its share, so this is a bug, not bad input
            raise RelaError(f"{len(missing)} batches (first rows {int(missing[0]) * config.batch_size}..) were embedded by no rank; rerun with --resume")
        return run.journal.embed_failures

    failures = distribution.on_main(finished)
    result = None
    if images:
        result = EmbeddingResult({}, images, seconds)
        run.timings["embed"] = seconds
        run.say(f"embedded {images} images in {seconds:.1f}s ({result.images_per_second:.0f} img/s"
                + (f" over {distribution.world_size} ranks)" if distribution.enabled else ")"))
    return open_npy_memmap(path, np.float32, shape, mode="r"), failures, result


def _run_stages(run: _EmbedRun) -> dict[str, Any]:
    config, index, distribution = run.config, run.index, run.distribution
    resumed = distribution.on_main(lambda: bool(run.journal.embedded_chunks))
    embeddings, failures, result = _embed_phase(run)
    ok = np.ones(len(index.files), dtype=bool)
    ok[list(failures)] = False
    kept = np.flatnonzero(ok)
    if len(kept) < 2:
        raise RelaError(f"only {len(kept)} of {len(index.files)} images could be decoded; nothing to transport (first failure: {next(iter(failures.values()), '-')})")

    t = time.perf_counter()
    transport_path, targets_path = run.out_dir / TRANSPORT_NAME, run.work / "targets.npy"
    reference = reference_sample_indices(len(kept))

    def fit_transport() -> None:  # rank 0, from the map in its fixed chunk order: the same for any world size
        fitted = fit_linear_transport(embeddings, ok, run.device)
        fitted.save(transport_path, reference=(reference, np.asarray(embeddings[kept[reference]])))

    _shared_phase(run, "transport", transport_path, prepare=fit_transport)
    transport = LinearTransport.load(transport_path)
    targets_shape = (len(kept), transport.output_dim)

    def transport_share() -> None:
        targets = open_npy_memmap(targets_path, config.target_dtype, targets_shape, mode="r+")
        start, stop = rank_row_range(len(kept), TRANSPORT_CHUNK_ROWS, distribution.rank, distribution.world_size)
        transport_rows(embeddings, kept, transport, targets, run.device, start, stop)
        targets.flush()

    _shared_phase(run, "targets", targets_path, prepare=lambda: create_npy_memmap(targets_path, config.target_dtype, targets_shape).flush(), work=transport_share)
    targets = open_npy_memmap(targets_path, config.target_dtype, targets_shape, mode="r")
    if targets is None:
        raise RelaError(f"{targets_path} does not hold ({targets_shape[0]}, {targets_shape[1]}) {config.target_dtype} targets; start over with --overwrite")
    run.timings["transport"] = time.perf_counter() - t

    t = time.perf_counter()
    scores_path = run.out_dir / SCORES_NAME
    labels = index.labels[kept] if index.labels is not None else None
    _score_phase(run, targets, labels, scores_path)
    scores = load_npz(scores_path)
    run.timings["scores"] = time.perf_counter() - t
    score_dims = min(config.score_dims, transport.output_dim) if config.score_dims else transport.output_dim
    score_k = min(config.score_k, len(kept) - 1)
    scores_info = distribution.on_main(lambda: run.journal.phase_info("scores") or {})  # the search (index, recall) and where it ran
    search = scores_info.get("search", {"kind": "exact"})
    recall = f", recall@{score_k} {search['recall_at_k']:.3f}" if "recall_at_k" in search else ""
    run.say(f"transport: {transport.input_dim} -> {transport.output_dim} dims; scores with k={score_k} on {score_dims} dims ({search['kind']} search{recall})")

    t = time.perf_counter()
    shards, shards_reused = _write_shards(run, kept, targets, scores, labels)
    if config.keep_embeddings and distribution.is_main:
        _write_rows_npy(embeddings, kept, run.out_dir / EMBEDDINGS_NAME)
    run.timings["write_shards"] = time.perf_counter() - t
    run.say(f"wrote {len(shards)} shards ({sum(s.bytes for s in shards) / 1e6:.1f} MB) to {run.out_dir}")
    if not distribution.is_main:
        return {}
    run_record = {"resumed": resumed, "images_embedded": result.images if result else 0, "shards_reused": shards_reused, "world_size": distribution.world_size}
    files = {TRANSPORT_NAME: run.journal.phase_sha256("transport"), SCORES_NAME: run.journal.phase_sha256("scores")}
    manifest = _build_manifest(run, result=result, failures=failures, kept=kept, transport=transport, reference_samples=len(reference),
                               score_k=score_k, score_dims=score_dims, labels=labels, shards=shards, files=files, run_record=run_record)
    manifest["scores"].update(scores_info)
    return manifest


#: The score index rank 0 builds and the other ranks load (``OUT/.work``; with a ``.json`` description).
SCORE_INDEX_NAME = "score-index.faiss"


def _score_phase(run: _EmbedRun, targets: np.ndarray, labels: np.ndarray | None, scores_path: Path) -> None:
    """Score every sample: rank 0 builds (and tunes) the index, every rank searches its share of
    the query blocks, rank 0 assembles ``scores.npz``."""
    config, distribution = run.config, run.distribution
    index_path = run.work / SCORE_INDEX_NAME
    held: dict[str, Any] = {}

    def build() -> None:
        held["search"] = build_score_search(targets, k=config.score_k, dims=config.score_dims, gpu_id=run.gpu_id, index=config.score_index, seed=config.seed)
        if distribution.enabled:
            held["search"].save(index_path)

    def search_share() -> None:
        search = held.get("search") or ScoreSearch.load(index_path, run.gpu_id)
        start, stop = rank_row_range(len(targets), search.rows_per_call, distribution.rank, distribution.world_size)
        part = score_rows(search, targets, start, stop)
        held["kind"], held["device"] = search.kind, search.device
        if distribution.enabled:
            write_npz_atomic(run.work / f"scores-rank-{distribution.rank}.npz", {
                "rows": np.array([part.start, part.stop, part.searched_exactly], dtype=np.int64),
                "knn_density": part.knn_density, "nn_similarity": part.nn_similarity, "nn_index": part.nn_index,
            })
        else:
            held["parts"] = [part]

    def assemble() -> dict[str, Any]:
        search = held["search"]
        if distribution.enabled:
            parts = []
            for rank in range(distribution.world_size):
                saved = load_npz(run.work / f"scores-rank-{rank}.npz")
                start, stop, exact = (int(v) for v in saved["rows"])
                parts.append(RowScores(start, stop, saved["knn_density"], saved["nn_similarity"], saved["nn_index"], exact))
        else:
            parts = held["parts"]
        n = len(targets)
        if [(p.start, p.stop) for p in parts] != [rank_row_range(n, search.rows_per_call, r, distribution.world_size) for r in range(distribution.world_size)]:
            raise RelaError("the ranks' score parts do not cover every sample once; rerun with --resume")
        write_npz_atomic(scores_path, {
            "knn_density": np.concatenate([p.knn_density for p in parts]),
            "nn_similarity": np.concatenate([p.nn_similarity for p in parts]),
            "nn_index": np.concatenate([p.nn_index for p in parts]),
            "label": labels if labels is not None else np.full(n, -1, dtype=np.int64),
        })
        for stale in [index_path, index_path.with_name(index_path.name + ".json"), *run.work.glob("scores-rank-*.npz")]:
            stale.unlink(missing_ok=True)
        settings = dict(search.settings)
        if search.kind != "exact":
            settings["searched_exactly"] = sum(p.searched_exactly for p in parts)
        return {"search": settings, "device": search.device}

    _shared_phase(run, "scores", scores_path, prepare=build, work=search_share, finish=assemble)


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


def _write_shards(run: _EmbedRun, kept: np.ndarray, targets: np.ndarray, scores: dict[str, np.ndarray], labels: np.ndarray | None) -> tuple[list[ShardInfo], int]:
    """Write the shard set; return its shards (rank 0; ``[]`` elsewhere) and how many were reused.

    One process writes the samples in :func:`shard_write_order` straight into OUT. W ranks cut the
    order into blocks of ``shard_size`` samples and each writes its :func:`rank_share` of the
    blocks into ``.work/shards-W-R/``; rank 0 then moves them into OUT, numbered in order. A shard
    closed early by ``max_shard_bytes`` adds one shard, wherever it falls. Either way the shards
    hold the samples in the same order."""
    config, distribution = run.config, run.distribution
    order = shard_write_order(len(kept), config.seed)
    reused = distribution.on_main(lambda: _shards_to_keep(run.journal, run.out_dir))
    if sum(s.samples for s in reused) == len(kept):  # finished, by this world size or another
        return (reused if distribution.is_main else []), len(reused)
    if not distribution.enabled:
        shards = _write_samples(run, kept, targets, scores, labels, order, run.out_dir, reused, lambda shards: run.journal.record_shards([s.to_dict() for s in shards]))
        return shards, len(reused)

    world, rank = distribution.world_size, distribution.rank

    def parts_to_keep() -> dict[int, list[dict[str, Any]]]:
        if reused:  # a prefix of a one-process run's shards: W ranks write other shards
            _shards_to_keep(_EmptyShards(run.journal), run.out_dir)
            run.journal.record_shards([])
        for stale in run.work.glob("shards-*"):
            if stale.name.rsplit("-", 1)[0] != f"shards-{world}":
                _remove(stale)
        return run.journal.shard_parts(world)

    parts = distribution.on_main(parts_to_keep)
    part_dir = run.work / f"shards-{world}-{rank}"
    part_dir.mkdir(exist_ok=True)
    finished = _part_prefix(part_dir, parts.get(rank, []))
    share = rank_share(-(-len(kept) // config.shard_size), rank, world)
    first, last = share.start * config.shard_size, min(share.stop * config.shard_size, len(kept))
    recorder = run.recorder()
    _write_samples(run, kept, targets, scores, labels, order[first:last], part_dir, finished,
                   lambda shards: recorder.record_shard_part(rank, world, [s.to_dict() for s in shards]))
    distribution.barrier()
    reused_parts = distribution.gather(len(finished))
    shards = distribution.on_main(lambda: _publish_parts(run, world))
    return (shards if distribution.is_main else []), sum(reused_parts)


class _EmptyShards:
    """A journal view with no finished shards (for :func:`_shards_to_keep` to clear OUT)."""

    def __init__(self, journal: EmbedJournal) -> None:
        self.shards: list[dict[str, Any]] = []
        self._journal = journal

    def record_shards(self, shards: list[dict[str, Any]]) -> None:
        self._journal.record_shards(shards)


def _part_prefix(part_dir: Path, records: list[dict[str, Any]]) -> list[ShardInfo]:
    """The recorded shards of a rank's part up to the first missing or altered one; every other
    file in the part's directory is removed."""
    kept: list[ShardInfo] = []
    for record in records:
        path = part_dir / record["name"]
        if not path.is_file() or sha256_file(path) != record["sha256"]:
            break
        kept.append(ShardInfo(**record))
    names = {s.name for s in kept}
    for path in part_dir.iterdir():
        if path.name not in names:
            path.unlink()
    return kept


def _publish_parts(run: _EmbedRun, world: int) -> list[ShardInfo]:
    """On rank 0, once every rank has written its part: move the parts' shards into OUT as
    ``shard-NNNNNN.tar`` in rank order and record them as the finished shards."""
    journal = run.journal
    journal.absorb_rank_progress()
    parts = journal.shard_parts(world)
    shards: list[ShardInfo] = []
    for rank in range(world):
        for record in parts.get(rank, []):
            info = ShardInfo(**record)
            name = SHARD_PATTERN % len(shards)
            os.replace(run.work / f"shards-{world}-{rank}" / info.name, run.out_dir / name)
            shards.append(dataclasses.replace(info, name=name))
    journal.drop_shard_parts()
    journal.record_shards([s.to_dict() for s in shards])
    return shards


def _write_samples(run: _EmbedRun, kept, targets, scores: dict[str, np.ndarray], labels, order: np.ndarray, directory: Path,
                   done: list[ShardInfo], on_shard: Callable[[list[ShardInfo]], None]) -> list[ShardInfo]:
    """Write the samples ``order[len(done's samples):]`` (indices into ``kept``) into shards in
    ``directory``, after the finished shards ``done``."""
    config, index = run.config, run.index
    position = sum(s.samples for s in done)
    with ShardSetWriter(directory, config.shard_size, config.max_shard_bytes, finished=done, on_shard=on_shard) as writer, tqdm(
        total=len(order), initial=position, unit="img", desc="shards", disable=not config.progress, dynamic_ncols=True
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


def _build_manifest(run: _EmbedRun, *, result: EmbeddingResult | None, failures: dict[int, str], kept: np.ndarray, transport: LinearTransport,
                    reference_samples: int, score_k: int, score_dims: int, labels: np.ndarray | None, shards: list[ShardInfo],
                    files: dict[str, str], run_record: dict[str, Any]) -> dict[str, Any]:
    config, index, prior, device, out_dir = run.config, run.index, run.prior, run.device, run.out_dir
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
            **run_record,
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
