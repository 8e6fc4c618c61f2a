"""rela-pipeline: the ReLA method in two offline stages, prior representations in WebDataset
shards (embed) and self-supervised training on them (train, eval).

The public API is importable from the package root; heavy modules (torch, faiss) load on first
use, so ``import rela_pipeline`` and the CLI's ``--help`` stay fast::

    from rela_pipeline import EmbedConfig, TrainConfig, run_embed, run_train
    manifest = run_embed(EmbedConfig(data_dir="data/train", prior="random:resnet18", out_dir="shards"))
    summary = run_train(TrainConfig(shards="shards", out_dir="runs/byol-rela", data_ratio=0.2))
"""

from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

_API = {
    "RelaError": "rela_pipeline.errors",
    "EmbedConfig": "rela_pipeline.stages.embed.config",
    "run_embed": "rela_pipeline.stages.embed.run",
    "embed_images": "rela_pipeline.stages.embed.images",
    "prepare_fashion_mnist": "rela_pipeline.stages.prepare",
    "Prior": "rela_pipeline.priors",
    "Preprocessing": "rela_pipeline.priors",
    "load_prior": "rela_pipeline.priors",
    "LinearTransport": "rela_pipeline.transport",
    "MomentAccumulator": "rela_pipeline.transport",
    "fit_linear_transport": "rela_pipeline.transport",
    "SubsetScores": "rela_pipeline.scores",
    "knn_scores": "rela_pipeline.scores",
    "build_score_search": "rela_pipeline.scores",
    "score_rows": "rela_pipeline.scores",
    "ScoreSearch": "rela_pipeline.scores",
    "read_manifest": "rela_pipeline.shards.manifest",
    "verify_shard_set": "rela_pipeline.shards.manifest",
    "describe_shard_set": "rela_pipeline.shards.manifest",
    "reproducible_part": "rela_pipeline.shards.manifest",
    "scan_image_folder": "rela_pipeline.imagefolder",
    "build_backbone": "rela_pipeline.models",
    "save_backbone_checkpoint": "rela_pipeline.models",
    "load_backbone_checkpoint": "rela_pipeline.models",
    "TrainConfig": "rela_pipeline.stages.train.config",
    "run_train": "rela_pipeline.stages.train.loop",
    "EvalConfig": "rela_pipeline.stages.evaluate",
    "run_eval": "rela_pipeline.stages.evaluate",
    "export_backbone": "rela_pipeline.stages.export",
    "ReLA": "rela_pipeline.rela",
    "alignment_loss": "rela_pipeline.rela",
    "AdaptiveSchedule": "rela_pipeline.rela",
    "ConstantSchedule": "rela_pipeline.rela",
    "parse_schedule": "rela_pipeline.rela",
    "BYOL": "rela_pipeline.methods",
    "SimCLR": "rela_pipeline.methods",
    "DINO": "rela_pipeline.methods",
    "build_method": "rela_pipeline.methods",
    "SubsetSampler": "rela_pipeline.subsets",
    "open_shard_set": "rela_pipeline.shards.reader",
    "ShardBatches": "rela_pipeline.shards.batches",
    "ShardBatch": "rela_pipeline.shards.batches",
    "BatchedViews": "rela_pipeline.batched_views",
    "batched_rela_views": "rela_pipeline.batched_views",
    "batched_method_views": "rela_pipeline.batched_views",
    "rela_views": "rela_pipeline.views",
    "method_views": "rela_pipeline.views",
}

__all__ = ["__version__", *_API]


__getattr__ = lazy_exports(__name__, _API)
