"""Settings of an ``embed`` run (imports no torch: the command line reads its defaults from
:class:`EmbedConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import RelaError
from ...settings import DEFAULT_K, DEFAULT_SCORE_DIMS, DEFAULT_TIMEOUT_S, DEFAULT_WAIT_TIMEOUT_S, default_num_workers, default_shard_writers

if TYPE_CHECKING:
    import torch

#: :class:`EmbedConfig` fields that control how a run goes, not what it writes: left out of the
#: manifest's ``settings`` and of the identity a resumed run must match.
#: ``device``, ``precision`` and ``decode`` are here as given (``auto``): what they resolved to is recorded
#: instead (the manifest's and the identity's ``resolved``).
RUN_CONTROL_FIELDS = (
    "out_dir",
    "num_workers",
    "shard_writers",
    "overwrite",
    "resume",
    "progress",
    "checkpoint_seconds",
    "dist_timeout_s",
    "dist_wait_timeout_s",
    "device",
    "precision",
    "decode",
)


@dataclass
class EmbedConfig:
    """Settings of one ``embed`` run (the CLI options, one to one).

    Attributes:
        data_dir: the input (:func:`rela_pipeline.sources.open_image_source`): an ImageFolder
            directory, a ``.txt``/``.csv`` file list, or a brace pattern or glob of local
            WebDataset ``.tar`` shards.
        label_field: where tar or list input keeps labels: ``cls`` or ``json:<key>`` (tars), a
            column name (``.csv`` lists); None: ``.cls`` / the ``label`` column when every
            sample has one, else unlabelled.
        prior: prior spec (see :mod:`rela_pipeline.priors`).
        out_dir: output directory of the shard set.
        batch_size: images per forward pass; None: 256 on CUDA, 32 on CPU (large batches are
            slower on CPU: memory traffic, see the README's benchmarks).
        num_workers: DataLoader worker processes decoding images (0: decode in the main process);
            default :func:`rela_pipeline.runtime.default_num_workers`.
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        precision: ``auto`` | ``fp32`` | ``bf16`` | ``fp16``: the prior's forward pass
            (:func:`rela_pipeline.runtime.resolve_prior_precision`; the resolved value is part of
            the run's identity, so a resume on another device or precision is refused).
        decode: ``auto`` | ``cpu`` | ``gpu``: where JPEGs are decoded, resized and cropped
            (:mod:`rela_pipeline.stages.embed.decoding`; ``auto``: on the device on CUDA).
        image_size: resize whole images to this many pixels instead of the prior's preprocessing.
        seed: seed of random priors and of the order samples are written into shards.
        shard_size: samples per shard.
        shard_writers: processes writing shards in a one-process run (each writes whole shards;
            the bytes do not depend on it); default
            :func:`rela_pipeline.settings.default_shard_writers`. Under torchrun each rank is
            one writer.
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
        dist_wait_timeout_s: under torchrun, seconds the other ranks wait while rank 0 works alone
            (fitting the transport, building the score index; :mod:`rela_pipeline.distributed`).
    """

    data_dir: str | Path
    prior: str
    out_dir: Path
    label_field: str | None = None
    batch_size: int | None = None
    num_workers: int = field(default_factory=default_num_workers)
    device: str = "auto"
    precision: str = "auto"
    decode: str = "auto"
    image_size: int | None = None
    seed: int = 0
    shard_size: int = 10_000
    shard_writers: int = field(default_factory=default_shard_writers)
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
    dist_timeout_s: float = DEFAULT_TIMEOUT_S
    dist_wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S

    def validate(self) -> None:
        """Raise :class:`RelaError` on out-of-range settings."""
        from ...runtime import PRECISIONS
        from ...scores import SCORE_INDEXES
        from ...shards.format import TARGET_DTYPES
        from .decoding import DECODE_MODES

        if self.batch_size is not None and self.batch_size < 1:
            raise RelaError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise RelaError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.shard_writers < 1:
            raise RelaError(f"--shard-writers must be >= 1, got {self.shard_writers}")
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
        if not self.dist_wait_timeout_s > 0:
            raise RelaError(f"--dist-wait-timeout must be > 0, got {self.dist_wait_timeout_s}")
        if self.decode not in DECODE_MODES:
            raise RelaError(f"--decode must be one of {', '.join(DECODE_MODES)}, got {self.decode!r}")
        if self.precision not in PRECISIONS:
            raise RelaError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def default_batch_size(device: torch.device) -> int:
    """Images per forward pass when none is given: 256 on CUDA, 32 on CPU (larger batches are
    memory-bound and slower on CPU; see the README's benchmarks)."""
    return 256 if device.type == "cuda" else 32
