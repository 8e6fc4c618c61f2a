"""One rank's view of an ``embed`` run, passed to every phase."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ...distributed import Distribution
from ...priors import Prior
from ...runtime import Precision
from ...sources import ImageSource
from .config import EmbedConfig
from .journal import EmbedJournal, RankProgress
from .output import WORK_DIR_NAME


@dataclass
class EmbedRun:
    """One rank's view of a run: settings, inputs, where it writes, and rank 0's journal.

    Attributes:
        config: the run's settings (``batch_size`` resolved; ``progress`` off on ranks other than 0).
        index: the scanned image source (:mod:`rela_pipeline.sources`; every rank scans, and the
            ranks check they agree).
        prior: the prior model and its preprocessing.
        device: this rank's device (``cuda:LOCAL_RANK`` under torchrun on GPUs).
        precision: the prior's resolved forward-pass precision.
        decode: where images are decoded, resolved: ``cpu`` or ``gpu`` (:mod:`.decoding`).
        distribution: this rank's place in the job (one process: rank 0 of 1).
        out_dir: OUT, on a filesystem every rank sees.
        timings: wall-clock seconds per phase, for the manifest (rank 0's).
        say: one-line status messages (silent on ranks other than 0).
        journal: rank 0's progress journal; None on the other ranks.
    """

    config: EmbedConfig
    index: ImageSource
    prior: Prior
    device: torch.device
    precision: Precision
    decode: str
    distribution: Distribution
    out_dir: Path
    timings: dict[str, float]
    say: Callable[[str], None]
    journal: EmbedJournal | None = None  # rank 0's; None on the other ranks

    @property
    def resolved(self) -> dict[str, str]:
        """What ``auto`` resolved to, as the identity and the manifest record it."""
        return {"device": self.device.type, "precision": self.precision.name, "decode": self.decode}

    @property
    def work(self) -> Path:
        """``OUT/.work``: the journal, the embeddings and targets maps, the ranks' records and parts."""
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
