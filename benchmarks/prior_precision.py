"""Representation targets from a prior run in bf16 or fp16 against the same prior in fp32.

Stage one's transport standardises every kept principal component to unit variance, the trailing
ones included, so a reduced-precision forward pass of the prior (bfloat16 keeps 8 significant
bits, float16 11) can turn the trailing components into rounding noise at full scale. This
measures it: for each prior, the fixture's images are embedded once per precision (the stage's
own preprocessing and :func:`embed_images`; autocast on the CPU, the same dtype rules as on
CUDA), each run gets its own transport (:func:`fit_linear_transport`, as a stage-one run would),
and the targets are compared component by component: ``|Pearson r|`` between the fp32 run's
component ``i`` and the reduced-precision run's (the absolute value because an eigenvector's sign
is arbitrary; the transfer layer absorbs it).

    python benchmarks/prior_precision.py --out benchmarks/results/prior-precision-cpu.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_throughput import device_name  # noqa: E402

from rela_pipeline.fileio import create_npy_memmap, write_json_atomic  # noqa: E402
from rela_pipeline.imagefolder import scan_image_folder  # noqa: E402
from rela_pipeline.priors import load_prior  # noqa: E402
from rela_pipeline.runtime import resolve_precision  # noqa: E402
from rela_pipeline.stages.embed import embed_images  # noqa: E402
from rela_pipeline.transport import fit_linear_transport  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fashion_mnist_mini" / "train"

#: Components reported one by one (1-based; the last kept one is added).
REPORTED = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def component_correlations(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``|Pearson r|`` of each column of two ``(N, K)`` target matrices (K the smaller width).

    Returns:
        float64 ``(K,)``.
    """
    k = min(reference.shape[1], other.shape[1])
    a = reference[:, :k] - reference[:, :k].mean(0)
    b = other[:, :k] - other[:, :k].mean(0)
    return np.abs((a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0)))


def embed(prior_spec: str, data: Path, precision: str, work: Path, batch_size: int) -> tuple[np.ndarray, float]:
    """``(float32 (N, D) embeddings, seconds)`` of ``prior_spec`` at ``precision`` on the CPU."""
    index = scan_image_folder(data)
    prior = load_prior(prior_spec, seed=0)
    with torch.inference_mode():
        dim = prior.model(
            prior.preprocessing.normalise(torch.zeros(1, 3, prior.preprocessing.crop_size, prior.preprocessing.crop_size, dtype=torch.uint8))
        ).shape[1]
    embeddings = create_npy_memmap(work / f"{prior_spec.replace(':', '_')}-{precision}.npy", np.float32, (len(index.files), dim))
    result = embed_images(
        index,
        prior,
        embeddings,
        batch_size=batch_size,
        num_workers=0,
        device=torch.device("cpu"),
        precision=resolve_precision(precision, torch.device("cpu")),
        progress=False,
    )
    if result.failures:
        raise SystemExit(f"{prior_spec} {precision}: {len(result.failures)} rows failed ({next(iter(result.failures.values()))})")
    return np.array(embeddings), result.seconds


def main(argv: list[str] | None = None) -> dict:
    """Measure every prior at every precision; print the table; write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=FIXTURE, help="ImageFolder (default: the 300-image fixture)")
    parser.add_argument("--priors", nargs="+", default=["random:resnet50", "open_clip:ViT-B-16:random"])
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    record: dict = {
        "command": [sys.executable, *sys.argv],
        "machine": {
            "cpu": device_name(torch.device("cpu")),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "priors": {},
    }
    print(f"# prior precision: {record['machine']['cpu']}, torch {torch.__version__}, {args.data}")
    with tempfile.TemporaryDirectory(prefix="rela-precision-") as tmp:
        for spec in args.priors:
            t = time.perf_counter()
            reference, seconds = embed(spec, args.data, "fp32", Path(tmp), args.batch_size)
            ok = np.ones(len(reference), dtype=bool)
            reference_targets = fit_linear_transport(reference, ok).apply(reference).numpy()
            entry = {
                "embedding_dim": int(reference.shape[1]),
                "kept_components": int(reference_targets.shape[1]),
                "images": int(len(reference)),
                "seconds": {"fp32": round(seconds, 2)},
                "precisions": {},
            }
            for precision in args.precisions:
                other, seconds = embed(spec, args.data, precision, Path(tmp), args.batch_size)
                targets = fit_linear_transport(other, ok).apply(other).numpy()
                r = component_correlations(reference_targets, targets)
                picked = sorted({i for i in REPORTED if i <= len(r)} | {len(r)})
                entry["seconds"][precision] = round(seconds, 2)
                entry["precisions"][precision] = {
                    "embedding_relative_error": float(np.linalg.norm(other - reference) / np.linalg.norm(reference)),
                    "kept_components": int(targets.shape[1]),
                    "abs_r_at_component": {str(i): round(float(r[i - 1]), 4) for i in picked},
                    "first_component_below": {str(level): next((int(i) + 1 for i in np.flatnonzero(r < level)), None) for level in (0.99, 0.9, 0.5)},
                    "median_abs_r": round(float(np.median(r)), 4),
                }
            record["priors"][spec] = entry
            print(
                f"\n## {spec}: D = {entry['embedding_dim']}, {entry['kept_components']} components kept from {entry['images']} images ({time.perf_counter() - t:.0f} s)"
            )
            print(
                "| precision | embedding rel. error | "
                + " | ".join(f"r@{i}" for i in entry["precisions"][args.precisions[0]]["abs_r_at_component"])
                + " | first r<0.99 | first r<0.9 |"
            )
            print("|---|---:|" + "---:|" * (len(entry["precisions"][args.precisions[0]]["abs_r_at_component"]) + 2))
            for precision, m in entry["precisions"].items():
                print(
                    f"| {precision} | {m['embedding_relative_error']:.2e} | "
                    + " | ".join(f"{v:.3f}" for v in m["abs_r_at_component"].values())
                    + f" | {m['first_component_below']['0.99']} | {m['first_component_below']['0.9']} |"
                )
    if args.out is not None:
        write_json_atomic(args.out, record)
    return record


if __name__ == "__main__":
    main()
