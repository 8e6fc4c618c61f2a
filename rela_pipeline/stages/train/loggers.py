"""Where a run's records go besides ``metrics.jsonl``: TensorBoard event files or Weights & Biases
(``--logger``), on rank 0 only.

Every record the loop writes to ``metrics.jsonl`` (:class:`.metrics.MetricsLog`) is passed on:

* interval records become scalars at their ``step``: :data:`SCALAR_TAGS` (losses, the ReLA loss
  and rho, the learning rate, images per second, the online probe, the budget), and
  ``rela/active`` (1 while the ReLA loss is on, 0 after the switch);
* the ReLA switch becomes an event: a text entry ``events/rela_switch`` at the switch step says
  when and at which rho (and ``rela/active`` is 0 from the next interval on);
* the run's settings are written once, as text (TensorBoard) or as the run's config (W&B).

On ``--resume`` TensorBoard drops what was logged after the checkpoint's step (``purge_step``,
TensorBoard's own rule), as ``metrics.jsonl`` does, and W&B continues the same run (its id is kept
in ``RUN/wandb-run-id``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

from ...errors import RelaError

#: The directory of TensorBoard event files in a run directory.
TENSORBOARD_DIR = "tensorboard"
#: The W&B files in a run directory, and the file keeping the W&B run id for ``--resume``.
WANDB_DIR = "wandb"
WANDB_RUN_ID = "wandb-run-id"
#: Interval-record fields logged as scalars, and their tags.
SCALAR_TAGS = {
    "loss": "train/loss",
    "ssl_loss": "train/ssl_loss",
    "rela_loss": "rela/loss",
    "rho": "rela/rho",
    "lr": "train/lr",
    "images_per_s": "throughput/images_per_s",
    "probe_loss": "probe/loss",
    "probe_acc": "probe/accuracy",
    "budget_fraction": "budget/fraction",
}


class RecordSink(Protocol):
    """Takes the records of ``metrics.jsonl`` (dicts with a ``step``), one at a time."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars_of(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of one record, by tag: the finite numbers of an interval record under
    :data:`SCALAR_TAGS`, plus ``rela/active`` (1 when the interval's last step had the ReLA loss);
    empty for events."""
    if record.get("event") is not None:
        return {}
    scalars = {tag: float(record[key]) for key, tag in SCALAR_TAGS.items() if isinstance(record.get(key), (int, float)) and math.isfinite(record[key])}
    if "phase" in record:
        scalars["rela/active"] = 1.0 if record["phase"] == "rela" else 0.0
    return scalars


def switch_text(record: dict[str, Any]) -> str:
    """The text of the ReLA switch event."""
    rho = record.get("rho")
    return f"ReLA phase ended at step {record['step']} (epoch {record.get('epoch')}" + (f", rho {rho:.4f})" if isinstance(rho, float) else ")")


class TensorBoardSink:
    """Writes scalars and events into ``log_dir`` with :class:`torch.utils.tensorboard.SummaryWriter`.

    Args:
        log_dir: the event files' directory (``RUN/tensorboard``).
        settings: the run's settings, written once as text when a run starts.
        purge_step: on resume, the checkpoint's step: what was logged after it is dropped.

    Raises:
        RelaError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: Path, settings: dict[str, Any], purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RelaError("--logger tensorboard needs the tensorboard package (pip install tensorboard), or pass --logger none") from None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        if purge_step is None:
            self.writer.add_text("settings", "```json\n" + json.dumps(settings, indent=1, sort_keys=True) + "\n```", 0)

    def write(self, record: dict[str, Any]) -> None:
        if not isinstance(record.get("step"), int):
            return
        step = record["step"]
        for tag, value in scalars_of(record).items():
            self.writer.add_scalar(tag, value, step)
        if record.get("event") == "rela_switch":
            self.writer.add_text("events/rela_switch", switch_text(record), step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Logs to Weights & Biases: offline (files in ``RUN/wandb``, for ``wandb sync``) unless
    ``WANDB_MODE`` says otherwise.

    Args:
        run_dir: the run directory.
        settings: the run's settings (W&B's run config).
        resuming: continue the W&B run whose id is in ``RUN/wandb-run-id``.

    Raises:
        RelaError: the ``wandb`` package is not installed.
    """

    def __init__(self, run_dir: Path, settings: dict[str, Any], resuming: bool = False) -> None:
        try:
            import wandb
        except ImportError:
            raise RelaError("--logger wandb needs the wandb package (pip install wandb), or pass --logger tensorboard") from None
        id_file = run_dir / WANDB_RUN_ID
        run_id = id_file.read_text().strip() if resuming and id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        (run_dir / WANDB_DIR).mkdir(exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(
            dir=str(run_dir / WANDB_DIR),
            id=run_id,
            resume="allow",
            name=run_dir.name,
            config=settings,
            mode=os.environ.get("WANDB_MODE", "offline"),
        )

    def write(self, record: dict[str, Any]) -> None:
        scalars = scalars_of(record)
        if record.get("event") == "rela_switch":
            scalars["events/rela_switch_step"] = float(record["step"])
        if scalars and isinstance(record.get("step"), int):
            self.run.log(scalars, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_sinks(kind: str, run_dir: Path, settings: dict[str, Any], resume_step: int | None) -> list[RecordSink]:
    """The sinks of ``--logger kind`` (``tensorboard``, ``wandb`` or ``none``) for rank 0's
    :class:`.metrics.MetricsLog`.

    Args:
        resume_step: the checkpoint's step when resuming, else None.

    Raises:
        RelaError: the logger's package is not installed.
    """
    if kind == "tensorboard":
        # TensorBoard purges from purge_step on; the checkpoint's own step stays, as in metrics.jsonl.
        return [TensorBoardSink(run_dir / TENSORBOARD_DIR, settings, purge_step=None if resume_step is None else resume_step + 1)]
    if kind == "wandb":
        return [WandbSink(run_dir, settings, resuming=resume_step is not None)]
    return []
