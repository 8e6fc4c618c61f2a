"""The ReLA method on the student side: transfer layer, alignment loss, schedules, and the wrapper
that adds them to any self-supervised method.

Source: Sun, Jiang, Lin, "Efficiency for Free: Ideal Data Are Transportable Representations",
NeurIPS 2024 (arXiv 2405.14669), and the authors' released code (github.com/LINs-lab/ReLA). The
representation targets come from stage one (``rela-pipeline embed``): prior embeddings linearly
transported (PCA + per-component standardisation).

Any SSL method works with :class:`ReLA` if it is an ``nn.Module`` that

* has an attribute ``backbone``: a module mapping images ``(B, 3, H, W)`` to pooled features
  ``(B, F)`` (``F`` from ``backbone.feature_dim`` or given to :class:`ReLA`);
* returns its own scalar loss from ``forward(views)``, ``views`` a list of ``(B, 3, H, W)`` tensors
  (``forward(views, labels)``, labels int64 ``(B,)``, if it has a true class attribute
  ``needs_labels``: supervised training, :class:`rela_pipeline.methods.Supervised`);
* optionally has ``update_momentum(step, total_steps)`` (EMA teachers), called after every step,
  in the ReLA phase too (as the authors' code does).

Nothing is subclassed or patched: :class:`ReLA` holds the method, owns the transfer layer, and
decides per step which loss to return.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .errors import RelaError
from .runtime import HostScalar

#: Accepted ``--rela-schedule`` forms.
SCHEDULE_FORMS = ("adaptive", "constant:<fraction of steps in (0, 1]>", "none")

#: Accepted ``--transfer`` values: the transfer layer ``F -> K`` is trained with the backbone
#: (ours), or stays at its random initialisation (the released code never gives it to the
#: optimiser, so the backbone aligns to a fixed random linear map of the targets).
TRANSFER_MODES = ("trained", "frozen")


def alignment_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ReLA alignment loss ``mean_b (1 - cos(predictions_b, targets_b))`` (paper eq. 4, released code).

    Args:
        predictions: ``(B, K)`` float, the transfer layer's output.
        targets: ``(B, K)`` float, the representation targets (any float dtype; cast to
            ``predictions.dtype``).

    Returns:
        Scalar tensor in ``[0, 2]``, differentiable w.r.t. ``predictions``.

    Raises:
        ValueError: shapes differ.
    """
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} differ in shape")
    with torch.autocast(predictions.device.type, enabled=False):  # fp32 under bf16/fp16 training
        cosine = F.cosine_similarity(predictions.float(), targets.float(), dim=1, eps=1e-8)
        return (1.0 - cosine).mean()


class RelaSchedule(Protocol):
    """When the ReLA loss replaces the SSL loss.

    ``start(step, total_steps)`` is called once before training (or resuming) at ``step``;
    ``active`` is read before each step; ``update(rela_loss, step, total_steps)`` is called after
    it with the step's ReLA loss: a detached scalar tensor on the training device (``float()`` of
    it waits for the device; :class:`AdaptiveSchedule` reads it one step late instead), or None
    when the ReLA loss was not computed.
    """

    active: bool
    switch_step: int | None

    def start(self, step: int, total_steps: int) -> None: ...

    def update(self, rela_loss: torch.Tensor | None, step: int, total_steps: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class AdaptiveSchedule:
    """The authors' plateau switch (paper section 4; the released code's default schedule).

    Per step, with ``cur`` the step's ReLA loss::

        rho    = exp(-max(L_slow - L_fast, 0))
        L_fast = 0.999 * L_fast + 0.001 * cur
        L_slow = 0.99  * L_slow + 0.01  * L_fast

    starting from ``L_slow = 2.0, L_fast = 1.0, rho = 0``. The ReLA loss alone is used while
    ``rho < 0.995``; from the step after ``rho`` reaches it, the method's own loss (a hard, permanent
    switch: once in the SSL phase the ReLA loss is no longer computed, so ``rho`` stays put).
    ``rho`` is computed from the averages *before* this step's update, as in the released code.

    No host sync per step: the decision after step ``j`` needs ``rho_j``, which depends on the
    losses of steps ``0 .. j-1`` only. So step ``j``'s loss starts its copy to the host
    (:class:`rela_pipeline.runtime.HostScalar`) and is folded into the averages one step later,
    when the device has long computed it; the averages see the same float64 operations in the same
    order as an immediate update, so ``rho`` and the switch step are exactly those of the rule
    above. The one blocking read is at the switch (to fold in the last ReLA loss) and whenever the
    averages are read (:attr:`l_fast`, :attr:`l_slow`, :meth:`state_dict`: checkpoints).

    Attributes:
        rho: the current value (float in ``[0, 1]``).
        l_fast, l_slow: the two running averages of the ReLA loss (reading them folds in the
            pending loss).
        switch_step: the first step (0-based) trained with the SSL loss, or None before the switch.
    """

    def __init__(
        self,
        threshold: float = 0.995,
        fast_momentum: float = 0.999,
        slow_momentum: float = 0.99,
        initial_slow: float = 2.0,
        initial_fast: float = 1.0,
    ) -> None:
        self.threshold = threshold
        self.fast_momentum = fast_momentum
        self.slow_momentum = slow_momentum
        self._l_fast = initial_fast
        self._l_slow = initial_slow
        self._pending: HostScalar | None = None  # the last ReLA loss, not yet folded into the averages
        self.rho = 0.0
        self.switch_step: int | None = None

    @property
    def active(self) -> bool:
        """True while training uses the ReLA loss."""
        return self.switch_step is None

    @property
    def l_fast(self) -> float:
        """The fast average (after every ReLA loss so far)."""
        self._fold_pending()
        return self._l_fast

    @property
    def l_slow(self) -> float:
        """The slow average (after every ReLA loss so far)."""
        self._fold_pending()
        return self._l_slow

    def start(self, step: int, total_steps: int) -> None:
        """Nothing to do: the state lives in the averages (restored by :meth:`load_state_dict`)."""

    def _fold(self, loss: float) -> None:
        self._l_fast = self.fast_momentum * self._l_fast + (1.0 - self.fast_momentum) * loss
        self._l_slow = self.slow_momentum * self._l_slow + (1.0 - self.slow_momentum) * self._l_fast

    def _fold_pending(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._fold(pending.value())

    def update(self, rela_loss: torch.Tensor | float | None, step: int, total_steps: int) -> None:
        """Advance the averages with step ``step``'s ReLA loss (a scalar tensor on any device, or a
        float); switch when ``rho >= threshold``."""
        if not self.active or rela_loss is None:
            return
        self._fold_pending()  # the previous step's loss: rho_j needs the losses before step j only
        self.rho = math.exp(-max(self._l_slow - self._l_fast, 0.0))
        self._pending = HostScalar(rela_loss)
        if self.rho >= self.threshold:
            self.switch_step = step + 1
            self._fold_pending()

    def state_dict(self) -> dict[str, Any]:
        """Plain floats/ints, for checkpoints."""
        return {"l_fast": self.l_fast, "l_slow": self.l_slow, "rho": self.rho, "switch_step": self.switch_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self._pending = None
        self._l_fast, self._l_slow, self.rho = float(state["l_fast"]), float(state["l_slow"]), float(state["rho"])
        self.switch_step = None if state["switch_step"] is None else int(state["switch_step"])

    def __repr__(self) -> str:
        return "adaptive"


class ConstantSchedule:
    """ReLA loss for the first ``fraction`` of the run's steps, then the SSL loss (the released
    code's alternative to the plateau switch; with a fixed number of steps per epoch this is the
    first ``fraction`` of epochs).

    Attributes:
        fraction: in ``(0, 1]``; 1 means ReLA for the whole run.
        switch_step: ``ceil(fraction * total_steps)`` once known (set by :meth:`update`), or None.
    """

    def __init__(self, fraction: float) -> None:
        if not 0.0 < fraction <= 1.0:
            raise RelaError(f"constant ReLA schedule fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.switch_step: int | None = None
        self._step = 0
        self._total = None

    @property
    def active(self) -> bool:
        """True while the next step is within the first ``fraction`` of the run."""
        return self._total is None or self._step < math.ceil(self.fraction * self._total)

    @property
    def rho(self) -> float:
        """Not defined for this schedule: NaN (logged as null)."""
        return float("nan")

    def update(self, rela_loss: float | None, step: int, total_steps: int) -> None:
        """Record that step ``step`` of ``total_steps`` is done."""
        self._step, self._total = step + 1, total_steps
        end = math.ceil(self.fraction * total_steps)
        if self.switch_step is None and self._step >= end and end < total_steps:
            self.switch_step = end

    def start(self, step: int, total_steps: int) -> None:
        """Tell the schedule where the run is before its first step (needed on resume)."""
        self._step, self._total = step, total_steps

    def state_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "switch_step": self.switch_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.switch_step = None if state["switch_step"] is None else int(state["switch_step"])

    def __repr__(self) -> str:
        return f"constant:{self.fraction:g}"


class NoRelaSchedule:
    """Never use the ReLA loss (the baselines, ``--no-rela``)."""

    active = False
    switch_step = None
    rho = float("nan")

    def start(self, step: int, total_steps: int) -> None:
        """Nothing to track."""

    def update(self, rela_loss: float | None, step: int, total_steps: int) -> None:
        """Nothing to track."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""

    def __repr__(self) -> str:
        return "none"


def parse_schedule(spec: str) -> RelaSchedule:
    """Build a schedule from ``adaptive``, ``constant:<fraction>`` or ``none``.

    Raises:
        RelaError: any other form, or a fraction outside ``(0, 1]``.
    """
    if spec == "adaptive":
        return AdaptiveSchedule()
    if spec == "none":
        return NoRelaSchedule()
    if spec.startswith("constant:"):
        try:
            fraction = float(spec.split(":", 1)[1])
        except ValueError:
            raise RelaError(f"bad ReLA schedule '{spec}': the fraction must be a number") from None
        return ConstantSchedule(fraction)
    raise RelaError(f"unknown ReLA schedule '{spec}'; use one of: {', '.join(SCHEDULE_FORMS)}")


@dataclass
class StepOutput:
    """What :meth:`ReLA.forward` returns for one batch.

    Attributes:
        loss: scalar tensor to back-propagate (the ReLA loss in the ReLA phase, else the method's).
        rela_loss: the ReLA loss as a detached scalar tensor, or None in the SSL phase.
        ssl_loss: the method's loss as a detached scalar tensor, or None in the ReLA phase.
        phase: "rela" or "ssl".
    """

    loss: torch.Tensor
    rela_loss: torch.Tensor | None
    ssl_loss: torch.Tensor | None
    phase: str


class ReLA(nn.Module):
    """Adds the ReLA alignment loss and its schedule to any SSL method (see the module docstring).

    In the ReLA phase the loss is ``0.5 * (L(v1) + L(v2))`` with
    ``L(v) = alignment_loss(transfer(backbone(v)), y)`` on the first two views (the authors' code);
    in the SSL phase it is ``method(views)`` (``method(views, labels)`` for a method with
    ``needs_labels``). :meth:`step_end` advances the schedule and the
    method's momentum update after every optimiser step, in both phases.

    Args:
        method: the SSL method (``nn.Module`` with ``backbone`` and ``forward(views) -> loss``).
        target_dim: K, the number of leading target components used
            (``min(F, stage-one target dim)`` in the paper).
        schedule: a :class:`RelaSchedule` or a spec for :func:`parse_schedule`.
        feature_dim: F; default ``method.backbone.feature_dim``.
        transfer: ``trained`` (the transfer layer is optimised with the backbone) or ``frozen``
            (its weights keep PyTorch's default ``nn.Linear`` initialisation and
            ``requires_grad=False``, as in the released code) (:data:`TRANSFER_MODES`).

    Raises:
        RelaError: the method has no ``backbone``, F is unknown, ``target_dim < 1`` or an
            unknown ``transfer``.
    """

    def __init__(
        self, method: nn.Module, target_dim: int, schedule: RelaSchedule | str = "adaptive", feature_dim: int | None = None, transfer: str = "trained"
    ) -> None:
        super().__init__()
        backbone = getattr(method, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise RelaError(f"{type(method).__name__} has no 'backbone' module; ReLA needs method.backbone (images -> features)")
        feature_dim = feature_dim if feature_dim is not None else getattr(backbone, "feature_dim", None)
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise RelaError(f"cannot tell the feature size of {type(backbone).__name__}; pass feature_dim=")
        if target_dim < 1:
            raise RelaError(f"target_dim must be at least 1, got {target_dim}")
        if transfer not in TRANSFER_MODES:
            raise RelaError(f"unknown transfer mode '{transfer}'; choose one of: {', '.join(TRANSFER_MODES)}")
        self.method = method
        self.feature_dim = feature_dim
        self.target_dim = target_dim
        self.transfer = nn.Linear(feature_dim, target_dim)
        self.transfer.requires_grad_(transfer == "trained")
        self.schedule = parse_schedule(schedule) if isinstance(schedule, str) else schedule

    @property
    def backbone(self) -> nn.Module:
        """The method's backbone (the network being pretrained)."""
        return self.method.backbone

    @property
    def phase(self) -> str:
        """ "rela" while the schedule is active, else "ssl"."""
        return "rela" if self.schedule.active else "ssl"

    def forward(self, views: Sequence[torch.Tensor], targets: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> StepOutput:
        """One training forward pass.

        Args:
            views: at least two ``(B, 3, H, W)`` float tensors (the ReLA views in the ReLA phase,
                the method's own views in the SSL phase).
            targets: ``(B, >= K)`` representation targets; the first K columns are used. Required
                in the ReLA phase.
            labels: int64 ``(B,)`` class labels, passed to a method with ``needs_labels`` (and
                required by it) in the SSL phase; ignored otherwise.

        Raises:
            RelaError: ReLA phase without targets, fewer than two views, or a method that needs
                labels called without them.
        """
        if not self.schedule.active:
            if getattr(self.method, "needs_labels", False):
                if labels is None:
                    raise RelaError(f"{type(self.method).__name__} needs the batch's labels: call ReLA(...)(views, targets, labels=...)")
                loss = self.method(views, labels)
            else:
                loss = self.method(views)
            return StepOutput(loss=loss, rela_loss=None, ssl_loss=loss.detach(), phase="ssl")
        if targets is None:
            raise RelaError("the ReLA phase needs representation targets for the batch")
        if len(views) < 2:
            raise RelaError(f"ReLA needs two views per sample, got {len(views)}")
        y = targets[:, : self.target_dim]
        losses = [alignment_loss(self.transfer(self.backbone(view)), y) for view in views[:2]]
        loss = 0.5 * (losses[0] + losses[1])
        return StepOutput(loss=loss, rela_loss=loss.detach(), ssl_loss=None, phase="rela")

    @torch.no_grad()
    def step_end(self, output: StepOutput, step: int, total_steps: int) -> None:
        """After the optimiser step ``step`` (0-based) of ``total_steps``: update the schedule with
        the step's ReLA loss (a device tensor: no host sync here) and run the method's momentum
        update if it has one."""
        self.schedule.update(output.rela_loss, step, total_steps)
        update = getattr(self.method, "update_momentum", None)
        if callable(update):
            update(step, total_steps)
