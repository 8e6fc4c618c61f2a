"""A user's own script calling the Python API, run alone or under torchrun by tests/test_torchrun.py.

``python tests/distributed_worker.py SHARDS OUT [METHOD]`` or ``torchrun --nproc-per-node 2
tests/distributed_worker.py SHARDS OUT [METHOD]``: by default BYOL + ReLA for the whole run
(``constant:1``) on a BatchNorm-free student (the ConvNet's BatchNorm layers replaced by
GroupNorm in the method factory; the ReLA phase never runs the heads), in fp32, so one process
and two processes at the same global batch compute the same thing up to the order of float
reductions. With METHOD (a built-in name, e.g. ``barlowtwins``), that method's own loss from the
first step (``--rela-schedule none``, one epoch), its heads' BatchNorm1d layers replaced by
GroupNorm too, so what couples the ranks is the method's cross-rank term alone.

Rank 0 also saves ``OUT/first-step-gradients.pt``: the gradient of every optimised parameter at
the first optimiser step (in the optimiser's parameter order), as the optimiser sees it. Under
DDP that is the gradient averaged over the ranks, which DDP guarantees equals the one-process
gradient of the same global batch up to float32 summation order.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from rela_pipeline.batched_views import batched_method_views
from rela_pipeline.methods import BYOL, build_method
from rela_pipeline.stages.train import TrainConfig, run_train

FIRST_STEP_GRADIENTS = "first-step-gradients.pt"


def without_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d and BatchNorm1d in ``module`` (in place) by a one-group GroupNorm."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm2d, nn.BatchNorm1d)):
            setattr(module, name, nn.GroupNorm(1, child.num_features))
        else:
            without_batchnorm(child)
    return module


def main(shards: str, out: str, method: str = "byol") -> None:
    config = TrainConfig(
        shards=shards,
        out_dir=Path(out),
        method=f"{method}-groupnorm",
        epochs=2 if method == "byol" else 1,
        batch_size=32,
        image_size=32,
        rela_schedule="constant:1" if method == "byol" else "none",
        precision="fp32",
        data_path="memory",
        device="cpu",
        num_workers=0,
        verify=False,
        progress=False,
        log_every=3,
    )
    first: list[torch.Tensor] = []

    def keep_first_gradients(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        if not first:
            first.extend(p.grad.detach().clone() for group in optimizer.param_groups for p in group["params"] if p.grad is not None)

    hook = register_optimizer_step_pre_hook(keep_first_gradients)
    try:
        if method == "byol":
            factory = lambda backbone: BYOL(without_batchnorm(backbone))  # noqa: E731
        else:
            factory = lambda backbone: without_batchnorm(build_method(method, without_batchnorm(backbone)))  # noqa: E731
        run_train(config, method_factory=factory, ssl_views=batched_method_views(method, 32))
    finally:
        hook.remove()
    if os.environ.get("RANK", "0") == "0":
        torch.save(first, Path(out) / FIRST_STEP_GRADIENTS)


if __name__ == "__main__":
    main(*sys.argv[1:4])
