"""Self-supervised methods built from lightly's heads, losses and momentum utilities.

Each method is an ``nn.Module`` with the interface :class:`rela_pipeline.rela.ReLA` expects:
``backbone`` (images ``(B, 3, H, W)`` -> features ``(B, F)``), ``forward(views) -> scalar loss``
and ``update_momentum(step, total_steps)``. The recipes follow lightly's reference examples
(docs.lightly.ai, "Models") and the ReLA authors' code (github.com/LINs-lab/ReLA) for BYOL's head sizes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from lightly.loss import DINOLoss, NegativeCosineSimilarity, NTXentLoss
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, DINOProjectionHead, SimCLRProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from .errors import RelaError

#: Method names accepted by :func:`build_method` and ``--method``.
METHODS = ("byol", "simclr", "dino")

#: Teacher momentum schedules (``--teacher-momentum``): ``cosine`` from the method's base value to
#: 1 over the run (lightly's examples, BYOL paper section 3.2), or ``constant`` at the base value
#: (ReLA's released code: 0.99 for BYOL).
MOMENTUM_SCHEDULES = ("cosine", "constant")


def teacher_momentum(schedule: str, base: float, step: int, total_steps: int) -> float:
    """The EMA momentum ``m`` of step ``step`` of ``total_steps``: ``base`` for ``constant``, else
    ``lightly.utils.scheduler.cosine_schedule(step, total_steps, base, 1.0)``.

    Raises:
        RelaError: an unknown schedule.
    """
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return cosine_schedule(step, max(total_steps, 1), base, 1.0)
    raise RelaError(f"unknown teacher momentum schedule '{schedule}'; choose one of: {', '.join(MOMENTUM_SCHEDULES)}")


def full_precision(reference: torch.Tensor):
    """A context that turns autocast off on ``reference``'s device: the methods compute their
    losses there, on ``.float()`` inputs, so losses stay fp32 under bf16/fp16 training."""
    return torch.autocast(reference.device.type, enabled=False)


class BYOL(nn.Module):
    """BYOL (Grill et al. 2020) as in lightly's example and ReLA's setup.

    Projection ``F -> 2F -> 256``, prediction ``256 -> 2F -> 256`` (the ReLA authors' code); an EMA
    teacher (backbone + projection) with momentum 0.99, constant or following a cosine schedule to
    1 over the run (:func:`teacher_momentum`); symmetric negative-cosine loss
    ``0.5 * (-cos(p1, z2) - cos(p2, z1))`` in ``[-1, 1]``.

    Args:
        backbone: module with ``feature_dim``.
        projection_dim: output size of the projection and prediction heads.
        momentum: the teacher momentum at step 0.
        momentum_schedule: ``cosine`` (to 1.0 at the last step) or ``constant``.
    """

    def __init__(self, backbone: nn.Module, projection_dim: int = 256, momentum: float = 0.99, momentum_schedule: str = "cosine") -> None:
        super().__init__()
        feature_dim = backbone.feature_dim
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(feature_dim, 2 * feature_dim, projection_dim)
        self.prediction_head = BYOLPredictionHead(projection_dim, 2 * feature_dim, projection_dim)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()
        self.momentum = momentum
        self.momentum_schedule = momentum_schedule

    def _online(self, images: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(self.projection_head(self.backbone(images)))

    @torch.no_grad()
    def _teacher(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(images)).detach()

    def forward(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """Loss for two views ``(B, 3, H, W)``; a scalar tensor."""
        x0, x1 = views[0], views[1]
        p0, p1 = self._online(x0), self._online(x1)
        z0, z1 = self._teacher(x0), self._teacher(x1)
        with full_precision(p0):
            return 0.5 * (self.criterion(p0.float(), z1.float()) + self.criterion(p1.float(), z0.float()))

    @torch.no_grad()
    def update_momentum(self, step: int, total_steps: int) -> None:
        """EMA update of the teacher with ``m = teacher_momentum(schedule, momentum, step, total_steps)``."""
        m = teacher_momentum(self.momentum_schedule, self.momentum, step, total_steps)
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)


class SimCLR(nn.Module):
    """SimCLR (Chen et al. 2020): projection ``F -> F -> 128`` and NT-Xent (lightly's default
    temperature 0.5) over two views; no momentum network. Under torch.distributed the negatives
    are every rank's (lightly's ``gather_distributed``, a no-op in one process), so the loss is
    the global batch's.
    """

    def __init__(self, backbone: nn.Module, projection_dim: int = 128, temperature: float = 0.5) -> None:
        super().__init__()
        feature_dim = backbone.feature_dim
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(feature_dim, feature_dim, projection_dim)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)

    def forward(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """Loss for two views ``(B, 3, H, W)``; a scalar tensor."""
        z0 = self.projection_head(self.backbone(views[0]))
        z1 = self.projection_head(self.backbone(views[1]))
        with full_precision(z0):
            return self.criterion(z0.float(), z1.float())


class DINO(nn.Module):
    """DINO (Caron et al. 2021) as in lightly's example: student and EMA teacher with
    ``DINOProjectionHead(F, 512, 64, output_dim)``; the teacher sees the two global views, the
    student all views (2 global + local crops); teacher momentum 0.996, cosine to 1 (or constant,
    :func:`teacher_momentum`); lightly's ``DINOLoss`` with teacher temperature 0.04 and centring.
    """

    def __init__(self, backbone: nn.Module, output_dim: int = 2048, momentum: float = 0.996, momentum_schedule: str = "cosine") -> None:
        super().__init__()
        feature_dim = backbone.feature_dim
        self.backbone = backbone
        self.head = DINOProjectionHead(feature_dim, 512, 64, output_dim)
        self.backbone_momentum = copy.deepcopy(backbone)
        # The head uses weight norm, which deepcopy refuses: build a twin and copy the weights.
        self.head_momentum = DINOProjectionHead(feature_dim, 512, 64, output_dim)
        self.head_momentum.load_state_dict(self.head.state_dict())
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.head_momentum)
        self.criterion = DINOLoss(output_dim=output_dim, warmup_teacher_temp=0.04, teacher_temp=0.04)
        self.momentum = momentum
        self.momentum_schedule = momentum_schedule

    def forward(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """Loss for ``[global_1, global_2, local_1, ...]`` views; a scalar tensor."""
        student_out = [self.head(self.backbone(view)) for view in views]
        with torch.no_grad():
            teacher_out = [self.head_momentum(self.backbone_momentum(view)).detach() for view in views[:2]]
        with full_precision(student_out[0]):
            return self.criterion([t.float() for t in teacher_out], [s.float() for s in student_out])

    @torch.no_grad()
    def update_momentum(self, step: int, total_steps: int) -> None:
        """EMA update of the teacher with ``m = teacher_momentum(schedule, momentum, step, total_steps)``."""
        m = teacher_momentum(self.momentum_schedule, self.momentum, step, total_steps)
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.head, self.head_momentum, m=m)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"byol": BYOL, "simclr": SimCLR, "dino": DINO}
_HAS_TEACHER = frozenset({"byol", "dino"})


def build_method(name: str, backbone: nn.Module, momentum_schedule: str = "cosine") -> nn.Module:
    """Build a built-in SSL method around ``backbone``.

    Args:
        name: one of :data:`METHODS`.
        backbone: the student (a module with ``feature_dim``).
        momentum_schedule: the EMA teacher's schedule (:data:`MOMENTUM_SCHEDULES`; SimCLR has no
            teacher and ignores it).

    Raises:
        RelaError: unknown name or schedule.
    """
    if name not in _BUILDERS:
        raise RelaError(f"unknown SSL method '{name}'; choose one of: {', '.join(METHODS)}")
    if momentum_schedule not in MOMENTUM_SCHEDULES:
        raise RelaError(f"unknown teacher momentum schedule '{momentum_schedule}'; choose one of: {', '.join(MOMENTUM_SCHEDULES)}")
    if name in _HAS_TEACHER:
        return _BUILDERS[name](backbone, momentum_schedule=momentum_schedule)
    return _BUILDERS[name](backbone)
