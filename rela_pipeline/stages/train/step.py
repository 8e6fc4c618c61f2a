"""One optimisation step of stage two: the model, its optimiser and its numeric precision."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...distributed import Distribution
from ...rela import ReLA, StepOutput
from ...runtime import Precision, uses_channels_last
from .distribution import parallel_modules


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int = 0) -> float:
    """Learning-rate multiplier of step ``step`` (0-based) of ``total_steps``.

    Linear warm-up ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps (Goyal et
    al. 2017, section 2.2), then ``1`` (``constant``) or the half-cosine
    ``0.5 * (1 + cos(pi * t / T))`` over the remaining ``T = total_steps - warmup_steps`` steps
    (``cosine``; Loshchilov & Hutter 2017, SGDR without restarts, as in BYOL section 3.2).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule != "cosine":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, span) / span))


class _FirstOutput:
    """Forward hook keeping the first output of a module per step (online-probe features)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.value is None and isinstance(output, torch.Tensor):
            self.value = output


@dataclass
class StepResult:
    """What one step returns (device tensors; no host sync).

    Attributes:
        output: the ReLA wrapper's :class:`StepOutput` (losses are detached where noted there).
        probe_loss: the online probe's cross-entropy (scalar float32), or None.
        probe_correct: correct probe predictions in the batch (scalar int64), or None.
    """

    output: StepOutput
    probe_loss: torch.Tensor | None
    probe_correct: torch.Tensor | None


class TrainStep:
    """The model side of training: ReLA-wrapped method, online probe, AdamW, learning-rate
    schedule, precision and memory format.

    The forward pass runs under ``precision.autocast()``; the method's and ReLA's losses are
    computed in fp32 (:func:`rela_pipeline.methods.full_precision`,
    :func:`rela_pipeline.rela.alignment_loss`); the online probe sees detached fp32 features outside
    autocast; the optimiser, the EMA teacher update and the schedule work on fp32 values.
    Convolutional students are put in channels_last (:func:`uses_channels_last`).

    Args:
        rela: the :class:`ReLA` wrapper around the method, on the training device.
        probe: a linear classifier ``F -> classes`` on the device, or None.
        lr, weight_decay: AdamW (the probe gets no weight decay).
        lr_schedule: "constant" or "cosine" (to 0 at ``total_steps``); see :func:`lr_factor`.
        total_steps: optimisation steps of the run.
        precision: from :func:`rela_pipeline.runtime.resolve_precision`.
        warmup_steps: steps of linear warm-up before the schedule (0: none).
        distribution: under torchrun, the job (:mod:`.distribution`: the model and the probe are
            wrapped in DistributedDataParallel); None or one process: no wrapping.
        sync_batchnorm: convert BatchNorm layers to SyncBatchNorm first.
    """

    def __init__(
        self,
        rela: ReLA,
        probe: nn.Module | None,
        lr: float,
        weight_decay: float,
        lr_schedule: str,
        total_steps: int,
        precision: Precision,
        warmup_steps: int = 0,
        *,
        distribution: Distribution | None = None,
        sync_batchnorm: bool = False,
    ) -> None:
        self.rela = rela
        self.probe = probe
        self.precision = precision
        self.memory_format = torch.channels_last if uses_channels_last(rela.backbone) else None
        if self.memory_format is not None:
            rela.to(memory_format=self.memory_format)
        self.model, self.probe_model = parallel_modules(rela, probe, distribution, sync_batchnorm)
        groups = [{"params": [p for p in rela.parameters() if p.requires_grad]}]
        if probe is not None:
            groups.append({"params": list(probe.parameters()), "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, total_steps, lr_schedule, warmup_steps))
        self.scaler = precision.grad_scaler()
        self._features = _FirstOutput()
        self._hook = rela.backbone.register_forward_hook(self._features)

    def __call__(self, views: list[torch.Tensor], targets: torch.Tensor, labels: torch.Tensor, labelled: bool) -> StepResult:
        """Forward, backward and optimiser step on one batch.

        Args:
            views: float ``(B, 3, s, s)`` tensors on the device (ReLA views in the ReLA phase).
            targets: float32 ``(B, K)`` representation targets.
            labels: int64 ``(B,)`` (the probe's, and a method's with ``needs_labels``).
            labelled: whether every label is real (decided on the host copy: no device sync).
        """
        self._features.value = None
        with self.precision.autocast():
            output = self.model(views, targets, labels=labels)
        loss = output.loss
        probe_loss = probe_correct = None
        features = self._features.value
        if self.probe is not None and labelled and features is not None and features.shape[0] >= labels.shape[0]:
            with self.precision.full_precision():
                logits = self.probe_model(features[: labels.shape[0]].detach().float())
                probe_loss = F.cross_entropy(logits, labels)
            probe_correct = (logits.argmax(1) == labels).sum().detach()
            loss = loss + probe_loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        return StepResult(output, probe_loss.detach() if probe_loss is not None else None, probe_correct)

    def close(self) -> None:
        """Remove the feature hook from the backbone."""
        self._hook.remove()

    def state_dict(self) -> dict[str, Any]:
        """Optimiser, LR schedule and loss-scale state (for checkpoints)."""
        return {"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
