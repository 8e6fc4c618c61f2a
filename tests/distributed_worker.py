"""A user's own script calling the Python API, run alone or under torchrun by tests/test_torchrun.py.

``python tests/distributed_worker.py SHARDS OUT`` or ``torchrun --nproc-per-node 2
tests/distributed_worker.py SHARDS OUT``: BYOL + ReLA for the whole run (``constant:1``) on a
BatchNorm-free student (the ConvNet's BatchNorm layers replaced by GroupNorm in the method
factory; the ReLA phase never runs the heads), in fp32, so one process and two processes at the
same global batch compute the same thing up to the order of float reductions.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

from rela_pipeline.batched_views import batched_method_views
from rela_pipeline.methods import BYOL
from rela_pipeline.stages.train import TrainConfig, run_train


def without_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` (in place) by a one-group GroupNorm."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features))
        else:
            without_batchnorm(child)
    return module


def main(shards: str, out: str) -> None:
    config = TrainConfig(
        shards=shards, out_dir=Path(out), method="byol-groupnorm", epochs=2, batch_size=32, image_size=32,
        rela_schedule="constant:1", precision="fp32", data_path="memory", device="cpu", num_workers=0,
        verify=False, progress=False, log_every=3,
    )
    run_train(config, method_factory=lambda backbone: BYOL(without_batchnorm(backbone)), ssl_views=batched_method_views("byol", 32))


if __name__ == "__main__":
    main(*sys.argv[1:3])
