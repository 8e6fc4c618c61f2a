"""The manifest of a finished shard set."""

from __future__ import annotations

import datetime as dt
import os
import platform
from typing import Any

import numpy as np
import torch

from ...fileio import sha256_file
from ...shards.format import EMBEDDINGS_NAME, SCHEMA, SCHEMA_VERSION, SCORES_NAME, TARGET_FIELD, TRANSPORT_NAME
from ...shards.writer import ShardInfo
from ...transport import LinearTransport
from .context import EmbedRun
from .images import EmbeddingResult
from .output import identity_settings, package_versions


def build_manifest(
    run: EmbedRun,
    *,
    result: EmbeddingResult | None,
    failures: dict[int, str],
    kept: np.ndarray,
    transport: LinearTransport,
    reference_samples: int,
    score_k: int,
    score_dims: int,
    labels: np.ndarray | None,
    shards: list[ShardInfo],
    files: dict[str, str],
    run_record: dict[str, Any],
) -> dict[str, Any]:
    config, index, prior, device, out_dir = run.config, run.index, run.prior, run.device, run.out_dir
    class_counts = np.bincount(labels, minlength=len(index.class_names)) if labels is not None else []
    manifest = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "prior": {
            "spec": prior.spec,
            "weights": prior.weights,
            "embedding_dim": transport.input_dim,
            "preprocessing": prior.preprocessing.to_dict(),
        },
        "transport": {
            "file": TRANSPORT_NAME,
            "sha256": files[TRANSPORT_NAME],
            "method": "pca+standardise (population statistics, float64)",
            "input_dim": transport.input_dim,
            "output_dim": transport.output_dim,
            "num_samples": transport.num_samples,
            "explained_variance_ratio": [round(float(r), 6) for r in transport.explained_variance_ratio[:16]],
            "reference_samples": int(reference_samples),
        },
        "targets": {"field": TARGET_FIELD, "dtype": config.target_dtype, "dim": transport.output_dim},
        "scores": {
            "file": SCORES_NAME,
            "sha256": files[SCORES_NAME],
            "fields": ["knn_density", "nn_similarity", "nn_index", "label"],
            "k": score_k,
            "dims": score_dims,
            "metric": "cosine",
        },
        "dataset": {
            "root": index.location,
            **({"kind": index.kind} if index.kind != "imagefolder" else {}),
            "fingerprint": index.fingerprint(),
            "class_names": index.class_names,
            "labelled": labels is not None,
        },
        "samples": {
            "scanned": len(index.files),
            "written": int(len(kept)),
            "skipped": len(failures),
            "per_class": {name: int(c) for name, c in zip(index.class_names, class_counts)},
        },
        "skipped": [{"path": index.files[row], "reason": reason} for row, reason in sorted(failures.items())],
        "ignored": [{"path": path, "reason": reason} for path, reason in sorted(index.ignored.items())],
        "shards": [s.to_dict() for s in shards],
        "shard_order": {"kind": "permutation", "seed": config.seed},
        "settings": identity_settings(config),
        "resolved": run.resolved,
        "software": package_versions(),
        "run": {
            "out_dir": str(config.out_dir),
            "num_workers": config.num_workers,
            "shard_writers": config.shard_writers,
            "checkpoint_seconds": config.checkpoint_seconds,
            **run_record,
        },
        "host": {
            "hostname": platform.node(),
            "platform": platform.platform(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_count": os.cpu_count(),
        },
        "throughput": {
            "embed_images_per_s": round(result.images_per_second, 2) if result is not None else None,
            **({"decoded_by": result.decoded_by} if result is not None and result.decoded_by else {}),
        },
        "timings_s": {},
    }
    if config.keep_embeddings:
        manifest["embeddings"] = {
            "file": EMBEDDINGS_NAME,
            "sha256": sha256_file(out_dir / EMBEDDINGS_NAME),
            "dtype": "float32",
            "shape": [int(len(kept)), transport.input_dim],
        }
    return manifest
