"""The built-in methods: self-supervised methods built from lightly's heads, losses and momentum
utilities, and supervised training.

Each method is an ``nn.Module`` with the interface :class:`rela_pipeline.rela.ReLA` expects:
``backbone`` (images ``(B, 3, H, W)`` -> features ``(B, F)``), ``forward(views) -> scalar loss``
(``forward(views, labels)`` for a method with ``needs_labels = True``: :class:`Supervised`) and,
for methods with an EMA network, ``update_momentum(step, total_steps)``. Views are lists of float
``(B, 3, s, s)`` tensors (:func:`rela_pipeline.recipes.method_recipes`: the first two at the
training size); losses are fp32 scalars whatever autocast is active (:func:`full_precision`).
The recipes follow lightly's reference examples (docs.lightly.ai, "Models"; lightly's
``examples/pytorch``) and the ReLA authors' code (github.com/LINs-lab/ReLA) for BYOL's head sizes.

Under torch.distributed (torchrun, one process per rank with ``B / W`` rows of every batch), the
methods whose loss couples samples compute it over the global batch: SimCLR's negatives, Barlow
Twins' batch normalisation and cross-correlation, VICReg's variance and covariance terms, MoCo's
memory bank updates and SwaV's Sinkhorn codes come from every rank (DINO's centre is all-reduced by
lightly's ``DINOLoss``). BYOL and supervised training have per-sample losses; DDP's gradient
average makes them the global batch's.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from lightly.loss import BarlowTwinsLoss, DINOLoss, NegativeCosineSimilarity, NTXentLoss, SwaVLoss, VICRegLoss
from lightly.models.modules import (
    BarlowTwinsProjectionHead,
    BYOLPredictionHead,
    BYOLProjectionHead,
    DINOProjectionHead,
    MoCoProjectionHead,
    SimCLRProjectionHead,
    SwaVProjectionHead,
    SwaVPrototypes,
)
from lightly.models.modules.heads import VICRegProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.dist import gather
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from .errors import RelaError

#: Method names accepted by :func:`build_method` and ``--method``.
METHODS = ("byol", "simclr", "dino", "barlowtwins", "vicreg", "moco", "swav", "supervised")

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


def dino_projection_head(feature_dim: int, output_dim: int) -> nn.Module:
    """lightly's ``DINOProjectionHead(feature_dim, 512, 64, output_dim)``, without the
    ``FutureWarning`` that every build prints: lightly 1.6 calls the deprecated
    ``torch.nn.utils.weight_norm`` in its last layer. The module and its state-dict keys
    (``weight_g``, ``weight_v``) are lightly's, unchanged; only that one warning is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.nn\.utils\.weight_norm` is deprecated", category=FutureWarning)
        return DINOProjectionHead(feature_dim, 512, 64, output_dim)


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
        self.head = dino_projection_head(feature_dim, output_dim)
        self.backbone_momentum = copy.deepcopy(backbone)
        # The head uses weight norm, which deepcopy refuses: build a twin and copy the weights.
        self.head_momentum = dino_projection_head(feature_dim, output_dim)
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


def _global_batch(z: torch.Tensor) -> torch.Tensor:
    """``z`` (``(b, D)``, this rank's rows) concatenated over every rank in rank order, ``(W b, D)``,
    with gradients flowing back to each rank's rows (lightly's ``gather``); ``z`` itself in one
    process. The ranks hold consecutive rows of the global batch, so this is the global batch."""
    if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        return torch.cat(gather(z), dim=0)
    return z


class BarlowTwins(nn.Module):
    """Barlow Twins (Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy
    Reduction") as in lightly's example: ``BarlowTwinsProjectionHead(F, 2048, 2048)`` and
    lightly's ``BarlowTwinsLoss`` (lambda 5e-3): each embedding dimension batch-normalised over the
    batch, the cross-correlation ``C`` (``D x D``) of the two views, loss
    ``sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2`` (>= 0). Views: BYOL's pair
    (:func:`rela_pipeline.recipes.barlowtwins_recipes`).

    Cross-rank term: under torch.distributed the loss is computed on the embeddings of the whole
    global batch (gathered from every rank with gradients, :func:`_global_batch`), so the batch
    normalisation and ``C`` are the global batch's and the gradient equals one process's.
    lightly's own ``gather_distributed=True`` would normalise each rank's rows by their own
    statistics and average the ranks' ``C``, which is not the global batch's loss.
    """

    def __init__(self, backbone: nn.Module, projection_dim: int = 2048, lambda_param: float = 5e-3) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = BarlowTwinsProjectionHead(backbone.feature_dim, projection_dim, projection_dim)
        self.criterion = BarlowTwinsLoss(lambda_param=lambda_param, gather_distributed=False)

    def forward(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """Loss for two views ``(B, 3, H, W)`` (B > 1 per rank); a scalar fp32 tensor."""
        z0 = self.projection_head(self.backbone(views[0]))
        z1 = self.projection_head(self.backbone(views[1]))
        with full_precision(z0):
            return self.criterion(_global_batch(z0.float()), _global_batch(z1.float()))


class VICReg(nn.Module):
    """VICReg (Bardes et al. 2022, "VICReg: Variance-Invariance-Covariance Regularization for
    Self-Supervised Learning") as in lightly's example: ``VICRegProjectionHead(F, 2048, 2048,
    num_layers=2)`` and lightly's ``VICRegLoss`` (invariance 25, variance 25, covariance 1):
    ``25 mse(z0, z1) + 25 * mean_views(mean_d relu(1 - std_d)) + sum_views(off-diagonal cov^2 / D)``
    (>= 0). Views: lightly's ``VICRegTransform`` (:func:`rela_pipeline.recipes.vicreg_recipe`).

    Cross-rank term: lightly's ``gather_distributed=True``: the variance and covariance terms are
    computed on the embeddings of every rank (gathered with gradients); the invariance term is
    per sample, averaged over the ranks by DDP. Together, the global batch's loss.
    """

    def __init__(self, backbone: nn.Module, projection_dim: int = 2048) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = VICRegProjectionHead(input_dim=backbone.feature_dim, hidden_dim=projection_dim, output_dim=projection_dim, num_layers=2)
        self.criterion = VICRegLoss(gather_distributed=True)

    def forward(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """Loss for two views ``(B, 3, H, W)`` (B > 1 per rank); a scalar fp32 tensor."""
        z0 = self.projection_head(self.backbone(views[0]))
        z1 = self.projection_head(self.backbone(views[1]))
        with full_precision(z0):
            return self.criterion(z0.float(), z1.float())


class MoCo(nn.Module):
    """MoCo v2 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation
    Learning"; Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning") as in
    lightly's example: query encoder (backbone + ``MoCoProjectionHead(F, F, 128)``, the v2 MLP
    head), an EMA key encoder (momentum 0.996, cosine to 1 or constant: :func:`teacher_momentum`),
    and lightly's ``NTXentLoss`` with a memory bank of 4096 keys of 128 dimensions: InfoNCE of each
    query ``q = f(views[0])`` against its key ``k = f_m(views[1])`` and the bank's keys as negatives
    (the batch's keys are enqueued after each step). Temperature 0.2, the MoCo v2 paper's (lightly's
    example keeps NTXentLoss's default 0.5). Views: lightly's ``MoCoV2Transform``
    (:func:`rela_pipeline.recipes.moco_recipe`). No shuffled BatchNorm (lightly's example has none).

    The bank (``criterion.memory_bank.bank``, float32 ``(4096, 128)``, and its write pointer) is
    part of the ``state_dict``, so checkpoints keep it and ``--resume`` continues with it (lightly
    registers them as non-persistent buffers; they are registered again as persistent here). It
    starts as random unit vectors (seeded like the model) and is not updated in the ReLA phase.

    Cross-rank term: lightly's ``gather_distributed=True``: every rank enqueues the keys of the whole
    global batch, so the banks of all ranks stay equal (DDP also broadcasts rank 0's buffers).
    """

    def __init__(
        self,
        backbone: nn.Module,
        projection_dim: int = 128,
        memory_bank_size: int = 4096,
        temperature: float = 0.2,
        momentum: float = 0.996,
        momentum_schedule: str = "cosine",
    ) -> None:
        super().__init__()
        feature_dim = backbone.feature_dim
        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(feature_dim, feature_dim, projection_dim)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(temperature=temperature, memory_bank_size=(memory_bank_size, projection_dim), gather_distributed=True)
        bank = self.criterion.memory_bank
        for name in ("bank", "bank_ptr"):  # persistent: saved in checkpoints
            bank.register_buffer(name, getattr(bank, name), persistent=True)
        self.momentum = momentum
        self.momentum_schedule = momentum_schedule

    def forward(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """Loss for the query and key views ``(B, 3, H, W)``; a scalar fp32 tensor. Enqueues the
        keys into the memory bank (when gradients are on)."""
        query = self.projection_head(self.backbone(views[0]))
        with torch.no_grad():
            key = self.projection_head_momentum(self.backbone_momentum(views[1])).detach()
        with full_precision(query):
            return self.criterion(query.float(), key.float())

    @torch.no_grad()
    def update_momentum(self, step: int, total_steps: int) -> None:
        """EMA update of the key encoder with ``m = teacher_momentum(schedule, momentum, step, total_steps)``."""
        m = teacher_momentum(self.momentum_schedule, self.momentum, step, total_steps)
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)


class SwaV(nn.Module):
    """SwaV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
    Assignments") as in lightly's example: ``SwaVProjectionHead(F, F, 128)``, L2-normalised
    embeddings, ``SwaVPrototypes(128, 512)`` (normalised to unit length before every step, as the
    example does), and lightly's ``SwaVLoss`` (temperature 0.1, 3 Sinkhorn iterations, epsilon
    0.05): the codes of each high-resolution view are predicted from every other view. No queue
    (lightly's basic example). Views: lightly's ``SwaVTransform`` multi-crop, 2 high-resolution
    crops of the training size then low-resolution ones
    (:func:`rela_pipeline.recipes.swav_recipes`); ``forward`` treats the first two views as the
    high-resolution ones.

    Cross-rank term: lightly's ``sinkhorn_gather_distributed=True``: the Sinkhorn normalisation runs
    over the prototype scores of every rank, so the codes are the global batch's.
    """

    def __init__(self, backbone: nn.Module, projection_dim: int = 128, n_prototypes: int = 512) -> None:
        super().__init__()
        feature_dim = backbone.feature_dim
        self.backbone = backbone
        self.projection_head = SwaVProjectionHead(feature_dim, feature_dim, projection_dim)
        self.prototypes = SwaVPrototypes(projection_dim, n_prototypes=n_prototypes)
        self.criterion = SwaVLoss(sinkhorn_gather_distributed=True)

    def _scores(self, view: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.projection_head(self.backbone(view)), dim=1, p=2)
        return self.prototypes(z)

    def forward(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """Loss for ``[high_1, high_2, low_1, ...]`` views ``(B, 3, s, s)``; a scalar fp32 tensor."""
        self.prototypes.normalize()
        scores = [self._scores(view) for view in views]
        with full_precision(scores[0]):
            scores = [s.float() for s in scores]
            return self.criterion(scores[:2], scores[2:]).reshape(())


class Supervised(nn.Module):
    """Supervised training: a linear classifier ``F -> classes`` on the backbone's features and
    the cross-entropy with the shard set's labels, averaged over the views (two independent crops
    of each image, torchvision's standard ``RandomResizedCrop`` + flip:
    :func:`rela_pipeline.recipes.supervised_recipe`; two because the data path gives every method
    at least two views, like repeated augmentation). With ReLA, the ReLA phase aligns the backbone
    as for the SSL methods and the classifier trains from the switch on.

    ``needs_labels = True``: :class:`rela_pipeline.rela.ReLA` calls ``forward(views, labels)``.
    The loss is per sample, so under torch.distributed DDP's gradient average makes it the global
    batch's.

    Args:
        backbone: module with ``feature_dim``.
        num_classes: the number of classes (>= 1).

    Raises:
        RelaError: ``num_classes`` below 1.
    """

    needs_labels = True

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise RelaError(f"supervised training needs at least one class, got {num_classes!r}")
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, views: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the views ``(B, 3, s, s)`` against ``labels`` (int64 ``(B,)``, in
        ``[0, classes)``); a scalar fp32 tensor.

        Raises:
            RelaError: no labels.
        """
        if labels is None:
            raise RelaError("supervised training needs the batch's labels: forward(views, labels)")
        logits = [self.classifier(self.backbone(view)) for view in views]
        with full_precision(logits[0]):
            return torch.stack([F.cross_entropy(z.float(), labels) for z in logits]).mean()


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "byol": BYOL,
    "simclr": SimCLR,
    "dino": DINO,
    "barlowtwins": BarlowTwins,
    "vicreg": VICReg,
    "moco": MoCo,
    "swav": SwaV,
    "supervised": Supervised,
}
_HAS_TEACHER = frozenset({"byol", "dino", "moco"})


def build_method(name: str, backbone: nn.Module, momentum_schedule: str = "cosine", num_classes: int | None = None) -> nn.Module:
    """Build a built-in method around ``backbone``.

    Args:
        name: one of :data:`METHODS`.
        backbone: the student (a module with ``feature_dim``).
        momentum_schedule: the EMA teacher's schedule (:data:`MOMENTUM_SCHEDULES`; used by BYOL,
            DINO and MoCo, ignored by the methods without an EMA network).
        num_classes: the number of classes of the shard set (``supervised`` only; None for an
            unlabelled set).

    Raises:
        RelaError: unknown name or schedule, or ``supervised`` without classes (an unlabelled set).
    """
    if name not in _BUILDERS:
        raise RelaError(f"unknown SSL method '{name}'; choose one of: {', '.join(METHODS)}")
    if momentum_schedule not in MOMENTUM_SCHEDULES:
        raise RelaError(f"unknown teacher momentum schedule '{momentum_schedule}'; choose one of: {', '.join(MOMENTUM_SCHEDULES)}")
    if name == "supervised":
        if not num_classes:
            raise RelaError("--method supervised needs a labelled shard set (embedded from class folders); this one has no labels")
        return Supervised(backbone, num_classes)
    if name in _HAS_TEACHER:
        return _BUILDERS[name](backbone, momentum_schedule=momentum_schedule)
    return _BUILDERS[name](backbone)
