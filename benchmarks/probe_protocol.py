"""Which linear probe ranks representations by content: the paper's fixed probe against ``eval``'s.

For each feature set (raw pixels, an untrained student, trained checkpoints given on the command
line) on a train / evaluation split pair, this runs the linear probe with

* the paper's protocol: raw features, Adam 3e-4, 100 epochs;
* the same probe trained 3 times longer (300 epochs): does the number still move?
* standardised features with the paper's 3e-4;
* ``eval``'s default: standardised features, learning rate chosen on 10% of the train split held out;

and k-NN (unchanged by either). A protocol whose number moves by points when the probe is only
trained longer has not converged, and then ranks features by their scale. Results as JSON and a
Markdown table::

    python benchmarks/probe_protocol.py --train runs/ssl-settings-cpu/table/data/train \\
        --eval runs/ssl-settings-cpu/table/data/val --checkpoint paper=RUN/backbone.pt --out probe.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rela_pipeline.errors import RelaError
from rela_pipeline.fileio import write_json_atomic
from rela_pipeline.models import build_backbone, load_backbone_checkpoint
from rela_pipeline.stages.evaluate import (
    EvalConfig,
    eval_preprocessing,
    evaluate_features,
    extract_features,
    knn_accuracy,
    linear_probe_accuracy,
    scan_labelled_splits,
    standardise,
)
from rela_pipeline.stages.train.checkpoints import eval_preprocessing as student_preprocessing

PROTOCOLS = ("paper (raw, 3e-4, 100 ep)", "raw, 3e-4, 300 ep", "standardised, 3e-4, 100 ep", "eval default (standardised, lr chosen)")


def probe_protocols(model: nn.Module, preprocessing, train_dir: Path, eval_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Top-1 of every protocol in :data:`PROTOCOLS` and k-NN for one feature extractor."""
    train_index, eval_index = scan_labelled_splits(train_dir, eval_dir)
    x, y = extract_features(model, train_index, preprocessing, device="cpu", batch_size=256, num_workers=0)
    xe, ye = extract_features(model, eval_index, preprocessing, device="cpu", batch_size=256, num_workers=0)
    classes = len(train_index.class_names)
    zs, ze = standardise(x, xe)
    default = evaluate_features(x, y, xe, ye, num_classes=classes, config=EvalConfig(Path("-"), train_dir, eval_dir, seed=seed), device=torch.device("cpu"))
    top1 = {
        PROTOCOLS[0]: linear_probe_accuracy(x, y, xe, ye, num_classes=classes, lr=3e-4, epochs=100, seed=seed),
        PROTOCOLS[1]: linear_probe_accuracy(x, y, xe, ye, num_classes=classes, lr=3e-4, epochs=300, seed=seed),
        PROTOCOLS[2]: linear_probe_accuracy(zs, y, ze, ye, num_classes=classes, lr=3e-4, epochs=100, seed=seed),
        PROTOCOLS[3]: default["linear_probe"]["top1"],
    }
    return {
        "linear_probe": top1,
        "chosen_lr": default["linear_probe"]["lr"],
        "knn": knn_accuracy(x, y, xe, ye, num_classes=classes),
        "feature_dim": int(x.shape[1]),
        "mean_abs_feature": float(x.abs().mean()),
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 ok, 2 bad input)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, required=True, help="labelled ImageFolder the probes are trained on")
    parser.add_argument("--eval", type=Path, required=True, help="labelled ImageFolder they are scored on (a validation split)")
    parser.add_argument("--checkpoint", action="append", default=[], help="NAME=path of a backbone checkpoint (repeatable)")
    parser.add_argument("--student", default="convnet", help="architecture of the untrained student row")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True, help="JSON output")
    args = parser.parse_args(argv)
    try:
        rows: dict[str, Any] = {}
        preprocessing = student_preprocessing(args.image_size)
        rows["raw pixels"] = probe_protocols(nn.Flatten(), preprocessing, args.train, args.eval)
        torch.manual_seed(0)
        rows[f"untrained {args.student} (seed 0)"] = probe_protocols(build_backbone(args.student), preprocessing, args.train, args.eval)
        for item in args.checkpoint:
            name, _, path = item.partition("=")
            model, meta = load_backbone_checkpoint(Path(path))
            rows[name] = probe_protocols(model, eval_preprocessing(meta.get("preprocessing")), args.train, args.eval)
            print(f"{name}: {rows[name]}", flush=True)
    except RelaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json_atomic(args.out, {"train": str(args.train), "eval": str(args.eval), "rows": rows})
    print("| features | " + " | ".join(PROTOCOLS) + " | k-NN |")
    print("| --- |" + " ---: |" * (len(PROTOCOLS) + 1))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * row['linear_probe'][p]:.2f}" for p in PROTOCOLS) + f" | {100 * row['knn']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
