"""Settings and compute accounting of a stage-two run (imports no torch: the command line reads
its defaults from :class:`TrainConfig`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...errors import RelaError
from ...settings import DEFAULT_TIMEOUT_S, DEFAULT_WAIT_TIMEOUT_S

#: Accepted ``--augment`` values: views made batched on the training device, or per image with
#: PIL (the reference path, and the one for per-image transforms).
AUGMENT_PATHS = ("device", "pil")

#: Accepted ``--logger`` values (:mod:`rela_pipeline.stages.train.loggers`).
LOGGERS = ("tensorboard", "wandb", "none")

#: Settings that may differ when resuming: they do not change what is computed (the memory and
#: stream data paths give the same batches and views).
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "overwrite",
        "progress",
        "num_workers",
        "device",
        "log_every",
        "logger",
        "skip_bad_shards",
        "verify",
        "data_path",
        "cache_bytes",
        "sync_batchnorm",
        "dist_timeout_s",
        "dist_wait_timeout_s",
    }
)


@dataclass
class TrainConfig:
    """Settings of a stage-two run (the CLI's ``train`` options).

    Attributes:
        shards: shard-set directory or manifest URL (see :func:`open_shard_set`).
        out_dir: the run directory.
        method: a name in :data:`METHODS`, or a label for a caller-provided method.
        backbone: a short name of :data:`rela_pipeline.models.BACKBONES`, ``torchvision:<arch>`` or
            ``timm:<name>`` (:func:`rela_pipeline.models.build_backbone`).
        cifar_stem: ResNet 3x3 stride-1 stem without max-pool; None means on for ``image_size <= 64``.
        image_size: S, pixels of the square training views.
        epochs: passes over the (sub-sampled) data.
        batch_size: B, images per optimisation step.
        data_ratio: r in ``(0, 1]``: each epoch trains on a fresh subset of ``round(r * N)`` samples.
        subset: subset rule, one of :data:`SUBSET_RULES`.
        dedup_threshold: cosine for the ``dedup`` rule.
        rela_schedule: ``adaptive``, ``constant:<fraction>`` or ``none`` (no ReLA: the baselines).
        transfer: ``trained`` or ``frozen`` transfer layer (:data:`rela_pipeline.rela.TRANSFER_MODES`).
        lr, weight_decay: AdamW (the paper's 1e-3 and 0.01).
        lr_schedule: ``cosine`` (to 0 at the last step; the usual SSL choice, and measured better
            than the paper's ``constant`` for BYOL, README "Evidence") or ``constant``.
        warmup_epochs: epochs (a float; converted to steps) of linear learning-rate warm-up from 0
            before the schedule (0: none). The cosine then runs over the remaining steps.
        teacher_momentum: the EMA teacher's momentum schedule, ``cosine`` (to 1) or ``constant``
            (:data:`rela_pipeline.methods.MOMENTUM_SCHEDULES`); built-in methods only.
        crop_min_scale: lower bound of the SSL views' crop scale (None: the method's; the ReLA
            views keep their 0.5).
        local_views: DINO's and SwaV's number of local (low-resolution) views, None for lightly's
            6 (:func:`rela_pipeline.recipes.method_recipes`); other built-in methods refuse it.
        device: "auto", "cpu", "cuda" or "cuda:N".
        precision: ``auto`` | ``fp32`` | ``bf16`` | ``fp16``
            (:func:`rela_pipeline.runtime.resolve_precision`; auto = bf16 on CUDA and on CPUs
            with native bf16, else fp32). Convolutional students use channels_last on every device.
        augment: ``device`` (batched views on the training device,
            :mod:`rela_pipeline.batched_views`) or ``pil`` (per-image PIL views,
            :class:`rela_pipeline.views.PerImageViews`).
        data_path: ``auto`` | ``memory`` | ``stream`` (:class:`rela_pipeline.shards.batches.ShardBatches`).
        cache_bytes: the memory path's budget in bytes; None = half the free memory of the device.
        num_workers: DataLoader workers decoding shards; None =
            ``min(8, CPUs - 1)``; 0 = in the main process (no prefetch).
        seed: seeds the backbone, heads, subsets, shuffles and augmentations.
        shuffle_buffer: samples in each shard's shuffle buffer (:mod:`rela_pipeline.shards.plan`).
        log_every: steps per ``metrics.jsonl`` interval record (and logger record).
        logger: where the records also go, one of :data:`LOGGERS`: ``tensorboard`` (event files
            in ``RUN/tensorboard``), ``wandb`` (Weights & Biases, if installed; offline unless
            ``WANDB_MODE`` says otherwise) or ``none``; ``metrics.jsonl`` is always written
            (:mod:`rela_pipeline.stages.train.loggers`).
        online_probe: train a linear classifier on detached features when labels exist.
        skip_bad_shards: warn and skip unreadable shards and samples instead of failing (with
            ``verify``: also the shards that fail verification).
        verify: check the shard set with :func:`rela_pipeline.shards.manifest.verify_shard_set`
            before training and refuse it on any problem (a remote set is downloaded once for it,
            streaming; ``verify=False`` skips that when it was verified where its files are).
        resume: continue from ``RUN/checkpoints/last.pt``.
        overwrite: replace an existing run directory.
        progress: show progress bars.
        sync_batchnorm: under torchrun on GPUs, BatchNorm statistics over the global batch
            (:class:`torch.nn.SyncBatchNorm`); a no-op in one process.
        dist_timeout_s: under torchrun, seconds a collective waits for the other ranks before the
            job fails (a rank that hangs without dying).
        dist_wait_timeout_s: under torchrun, seconds the other ranks wait while rank 0 works
            alone (verifying the shard set, preparing the run directory).
    """

    shards: str
    out_dir: Path
    method: str = "byol"
    backbone: str = "convnet"
    cifar_stem: bool | None = None
    image_size: int = 32
    epochs: int = 10
    batch_size: int = 128
    data_ratio: float = 1.0
    subset: str = "random"
    dedup_threshold: float = 0.98
    rela_schedule: str = "adaptive"
    transfer: str = "trained"
    lr: float = 1e-3
    weight_decay: float = 0.01
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    teacher_momentum: str = "cosine"
    crop_min_scale: float | None = None
    local_views: int | None = None
    device: str = "auto"
    precision: str = "auto"
    augment: str = "device"
    data_path: str = "auto"
    cache_bytes: int | None = None
    num_workers: int | None = None
    seed: int = 0
    shuffle_buffer: int = 2000
    log_every: int = 20
    logger: str = "tensorboard"
    online_probe: bool = True
    skip_bad_shards: bool = False
    verify: bool = True
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    sync_batchnorm: bool = False
    dist_timeout_s: float = DEFAULT_TIMEOUT_S
    dist_wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S

    def validate(self, custom_method: bool = False) -> None:
        """Check values before anything is read or written.

        Raises:
            RelaError: naming the first bad setting.
        """
        from ...methods import METHODS, MOMENTUM_SCHEDULES
        from ...models import check_backbone_name
        from ...recipes import MULTI_CROP_METHODS
        from ...rela import TRANSFER_MODES, parse_schedule
        from ...runtime import PRECISIONS
        from ...shards.batches import DATA_PATHS
        from ...subsets import SUBSET_RULES

        if not custom_method and self.method not in METHODS:
            raise RelaError(f"unknown SSL method '{self.method}'; choose one of: {', '.join(METHODS)}")
        check_backbone_name(self.backbone)
        if not 0.0 < self.data_ratio <= 1.0:
            raise RelaError(f"--data-ratio must be in (0, 1], got {self.data_ratio}")
        if self.subset not in SUBSET_RULES:
            raise RelaError(f"unknown subset rule '{self.subset}'; choose one of: {', '.join(SUBSET_RULES)}")
        parse_schedule(self.rela_schedule)
        for name in ("epochs", "batch_size", "image_size", "log_every", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise RelaError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.image_size < 8:
            raise RelaError(f"--image-size must be at least 8 pixels, got {self.image_size}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise RelaError(f"need lr > 0 and weight decay >= 0, got {self.lr} and {self.weight_decay}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise RelaError(f"--lr-schedule must be constant or cosine, got {self.lr_schedule}")
        if not 0.0 <= self.warmup_epochs < self.epochs:
            raise RelaError(f"--warmup-epochs must be in [0, --epochs), got {self.warmup_epochs}")
        if self.transfer not in TRANSFER_MODES:
            raise RelaError(f"--transfer must be one of {', '.join(TRANSFER_MODES)}, got {self.transfer!r}")
        if self.teacher_momentum not in MOMENTUM_SCHEDULES:
            raise RelaError(f"--teacher-momentum must be one of {', '.join(MOMENTUM_SCHEDULES)}, got {self.teacher_momentum!r}")
        if self.crop_min_scale is not None and not 0.0 < self.crop_min_scale <= 1.0:
            raise RelaError(f"--crop-min-scale must be in (0, 1], got {self.crop_min_scale}")
        if self.local_views is not None:
            if self.local_views < 0:
                raise RelaError(f"--local-views must be >= 0, got {self.local_views}")
            if not custom_method and self.method not in MULTI_CROP_METHODS:
                raise RelaError(f"--local-views sets the multi-crop views of {' and '.join(MULTI_CROP_METHODS)}; method '{self.method}' has none")
        if self.precision not in PRECISIONS:
            raise RelaError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.augment not in AUGMENT_PATHS:
            raise RelaError(f"--augment must be one of {', '.join(AUGMENT_PATHS)}, got {self.augment!r}")
        if self.data_path not in DATA_PATHS:
            raise RelaError(f"--data-path must be one of {', '.join(DATA_PATHS)}, got {self.data_path!r}")
        if self.cache_bytes is not None and self.cache_bytes < 0:
            raise RelaError(f"--cache-bytes must be >= 0, got {self.cache_bytes}")
        if self.num_workers is not None and self.num_workers < 0:
            raise RelaError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.dist_timeout_s <= 0:
            raise RelaError(f"--dist-timeout must be positive, got {self.dist_timeout_s}")
        if self.dist_wait_timeout_s <= 0:
            raise RelaError(f"--dist-wait-timeout must be positive, got {self.dist_wait_timeout_s}")
        if self.logger not in LOGGERS:
            raise RelaError(f"--logger must be one of {', '.join(LOGGERS)}, got {self.logger!r}")
        if self.resume and self.overwrite:
            raise RelaError("--resume and --overwrite exclude each other")

    @property
    def use_cifar_stem(self) -> bool:
        """Whether the ResNet stem is the CIFAR one (explicit, or automatic at 64 px and below)."""
        return self.cifar_stem if self.cifar_stem is not None else self.image_size <= 64

    def to_json(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class Budget:
    """Compute accounting of a run (the paper's budget: the fraction of the full run's steps).

    Attributes:
        steps: optimisation steps done.
        images_seen: images trained on (steps x B; each image gives two or more views).
        full_run_steps: steps of the full run: ``epochs * (N // B)``.
    """

    steps: int = 0
    images_seen: int = 0
    full_run_steps: int = 1

    @property
    def fraction(self) -> float:
        """Steps done as a fraction of the full run's steps."""
        return self.steps / max(self.full_run_steps, 1)
