"""``metrics.jsonl`` of a stage-two run: interval records accumulated on the device."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...distributed import Distribution
from ...fileio import atomic_write
from ...runtime import synchronize
from .config import Budget
from .loggers import RecordSink
from .step import StepResult


class MetricsLog:
    """Appends JSON records to ``metrics.jsonl`` and passes them to the logger's sinks; on resume
    keeps only records up to the checkpoint.

    Args:
        path: the file; None discards every record (the ranks other than 0 of a distributed run).
        keep_until_step: on resume, the checkpoint's step (later records are dropped); None
            starts a new file.
        sinks: where each record also goes (:func:`.loggers.open_sinks`: TensorBoard, W&B).
    """

    def __init__(self, path: Path | None, keep_until_step: int | None, sinks: Sequence[RecordSink] = ()) -> None:
        self.path = path
        self.handle = None
        self.sinks = list(sinks)
        if path is None:
            return
        if keep_until_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= keep_until_step]
            with atomic_write(path, "w") as handle:
                handle.write("".join(line + "\n" for line in kept))
        elif keep_until_step is None and path.exists():
            path.unlink()
        self.handle = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (non-finite floats become null)."""
        if self.handle is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.handle.write(json.dumps(clean, sort_keys=True) + "\n")
        self.handle.flush()
        for sink in self.sinks:
            sink.write(clean)

    def close(self) -> None:
        """Close the file and the sinks."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        if self.handle is not None:
            self.handle.close()


def finite_or_none(value: Any) -> float | None:
    """``float(value)`` when it is a finite number, else None."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class Interval:
    """Accumulates one logging interval on the device (no host sync until the record is made).

    Args:
        device: the training device; the clock is read after its queue has drained, so
            ``images_per_s`` counts finished steps (on CUDA the host runs ahead of the GPU).

    Attributes:
        last_record: the last record made.
        first_rela_loss, last_rela_loss: the ReLA loss of the first and last intervals that had one.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device if device is not None else torch.device("cpu")
        self.last_record: dict[str, Any] = {}
        self.first_rela_loss: float | None = None
        self.last_rela_loss: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}
        self.images = 0
        self.probe_images = 0
        self.phase = "rela"
        self.started = time.perf_counter()

    def _add(self, name: str, value: torch.Tensor | None) -> None:
        if value is not None:
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
            self.counts[name] = self.counts.get(name, 0) + 1

    def add(self, result: StepResult, batch_size: int) -> None:
        """Add one step of ``batch_size`` images."""
        output = result.output
        self.phase = output.phase
        self._add("loss", output.loss)
        self._add("rela_loss", output.rela_loss)
        self._add("ssl_loss", output.ssl_loss)
        self._add("probe_loss", result.probe_loss)
        if result.probe_correct is not None:
            self.sums["probe_correct"] = self.sums.get("probe_correct", 0.0) + result.probe_correct.float()
            self.probe_images += batch_size
        self.images += batch_size

    def record(self, budget: Budget, epoch: int, rho: float | None, lr: float, distribution: Distribution | None = None) -> dict[str, Any]:
        """Close the interval: its record (means over its steps and, in a distributed run, over the
        ranks; probe accuracy over every rank's images; images per second of the whole job) and a
        new interval. In a distributed run every rank must call it at the same step (one
        all-reduce)."""
        synchronize(self.device)  # the interval's steps have finished, not just been queued
        seconds = time.perf_counter() - self.started
        if distribution is not None and distribution.enabled and self.sums:
            names = sorted(self.sums)
            totals = distribution.sum(torch.stack([torch.as_tensor(self.sums[n], dtype=torch.float32) for n in names]))
            self.sums = {n: (totals[i] if n == "probe_correct" else totals[i] / distribution.world_size) for i, n in enumerate(names)}
        record: dict[str, Any] = {
            "step": budget.steps,
            "epoch": epoch,
            "phase": self.phase,
            "rho": finite_or_none(rho),
            "lr": lr,
            "images_per_s": self.images / max(seconds, 1e-9),
            "images_seen": budget.images_seen,
            "budget_fraction": round(budget.fraction, 6),
        }
        for name in ("loss", "rela_loss", "ssl_loss", "probe_loss"):
            record[name] = float(self.sums[name]) / self.counts[name] if name in self.counts else None
        record["probe_acc"] = float(self.sums["probe_correct"]) / self.probe_images if self.probe_images else None
        if record["rela_loss"] is not None:
            self.last_rela_loss = record["rela_loss"]
            if self.first_rela_loss is None:
                self.first_rela_loss = record["rela_loss"]
        self.last_record = record
        self._reset()
        return record
