"""ReLA in a PyTorch Lightning module, on a shard set, with a lightly method.

lightly's users write their SSL method as a LightningModule (lightly's BYOL example: backbone,
projection and prediction heads, a momentum copy, ``NegativeCosineSimilarity``,
``update_momentum`` with ``cosine_schedule``). Two changes give it ReLA:

1. the method's loss moves into an ``nn.Module`` whose ``forward(views)`` returns it (below:
   :class:`LightlyBYOL`, written with lightly's parts exactly as in its example), so that
   :class:`rela_pipeline.ReLA` can wrap it;
2. the data comes from :class:`rela_pipeline.ShardBatches` (the shard set's images and
   representation targets on the device), and the views are made per batch with the recipe of
   the current phase.

Run::

    python examples/lightning_rela.py --shards runs/demo/shards --epochs 2
"""

from __future__ import annotations

import argparse
import copy

import pytorch_lightning as pl
import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from rela_pipeline import ReLA, ShardBatches, build_backbone
from rela_pipeline.batched_views import batched_byol_views, batched_rela_views


class LightlyBYOL(nn.Module):
    """lightly's BYOL example as an ``nn.Module`` with ``forward(views) -> loss``.

    Args:
        backbone: images ``(B, 3, H, W)`` -> features ``(B, F)``, with ``feature_dim``.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        dim = backbone.feature_dim
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(dim, 2 * dim, 256)
        self.prediction_head = BYOLPredictionHead(256, 2 * dim, 256)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The symmetric BYOL loss of two views ``(B, 3, H, W)``; a scalar."""
        x0, x1 = views[0], views[1]
        p0 = self.prediction_head(self.projection_head(self.backbone(x0)))
        p1 = self.prediction_head(self.projection_head(self.backbone(x1)))
        with torch.no_grad():
            z0 = self.projection_head_momentum(self.backbone_momentum(x0))
            z1 = self.projection_head_momentum(self.backbone_momentum(x1))
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

    @torch.no_grad()
    def update_momentum(self, step: int, total_steps: int) -> None:
        """EMA teacher update, momentum cosine from 0.99 to 1 (lightly's example)."""
        m = cosine_schedule(step, total_steps, 0.99, 1.0)
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)


class ReLABYOLModule(pl.LightningModule):
    """BYOL + ReLA as a LightningModule that trains on :class:`ShardBatch` batches.

    Args:
        target_dim: K of the shard set's targets (the transfer layer maps F to ``min(F, K)``).
        image_size: S of the views.
        schedule: ReLA schedule spec (``adaptive``, ``constant:<fraction>``, ``none``).
        lr: AdamW learning rate (weight decay 0.01, the paper's).
    """

    def __init__(self, target_dim: int, image_size: int = 32, schedule: str = "adaptive", lr: float = 1e-3) -> None:
        super().__init__()
        backbone = build_backbone("convnet")
        self.rela = ReLA(LightlyBYOL(backbone), target_dim=min(backbone.feature_dim, target_dim), schedule=schedule)
        self.views = {"rela": batched_rela_views(image_size), "ssl": batched_byol_views(image_size)}
        self.lr = lr
        self.steps_done = 0
        self._output = None

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        out = self.rela(batch.views(self.views[self.rela.phase]), batch.target)
        self._output = out
        self.log("loss", out.loss, prog_bar=True)
        if out.rela_loss is not None:
            self.log("rela_loss", out.rela_loss)
        return out.loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # After the optimiser step: the ReLA schedule and the method's momentum update.
        self.rela.step_end(self._output, self.steps_done, self.trainer.estimated_stepping_batches)
        self.steps_done += 1

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.rela.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.01)


def train(
    shards: str, epochs: int, batch_size: int = 128, data_ratio: float = 0.5, schedule: str = "adaptive", device: str = "cpu", seed: int = 0
) -> ReLABYOLModule:
    """Train BYOL + ReLA with Lightning on ``shards``; returns the trained module."""
    pl.seed_everything(seed, verbose=False)
    batches = ShardBatches(shards, batch_size=batch_size, image_size=32, data_ratio=data_ratio, seed=seed, device=device)
    module = ReLABYOLModule(batches.target_dim, schedule=schedule)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator=device, devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False
    )
    trainer.fit(module, train_dataloaders=batches)
    return module


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    trained = train(args.shards, args.epochs, device=args.device)
    print(f"trained {trained.steps_done} steps; ReLA phase: {trained.rela.phase == 'rela'}")
