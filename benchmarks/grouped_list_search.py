"""The grouped IVF pass of the k-NN scores: per inverted list, faiss's ``knn`` against one BLAS
product fed straight into the running top-k heaps.

The scores' full pass on the CPU (:func:`rela_pipeline.scores._grouped_search`) groups the queries
by the inverted lists they probe (``faiss.contrib.big_batch_search``) and, for each list, searches
its group of queries against the list's members. This benchmark times that pass two ways on the
same index and queries, alternating rounds, and checks that they return the same neighbours:

``knn``        method ``knn_function`` with ``faiss.knn``: the top k of each list from scratch
               (faiss's BLAS product, then a fresh heap per query), merged into the running heaps
``products``   method ``pairwise_distances`` with :func:`rela_pipeline.scores._inner_products`
               (numpy's sgemm) and every product entry offered to the query's running heap,
               where after its first list almost every candidate loses one comparison (the
               pipeline's pass)

The default shapes are those of the 10M-sample scale run (``scale_stage_one.py``): 16,384 lists of
about 610 members at 64 dims, 2M queries per call at nprobe 64, so about 7,800 queries per list.
Here 1,024 such lists (625k members, 125k queries) keep it to a minute. The data are unit vectors
of Gaussian clusters in 64 dims, as the scale run's leading components are.

    python benchmarks/grouped_list_search.py --out benchmarks/results/grouped-list-search-cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import time

import faiss
import numpy as np
from faiss.contrib.big_batch_search import big_batch_search

from rela_pipeline.fileio import write_json_atomic
from rela_pipeline.scores import _grouped_search

METHODS = ("knn", "products")


def unit_clusters(rows: int, dims: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """``(rows, dims)`` float32 unit vectors around ``clusters`` Gaussian centres (std 0.5 each)."""
    centres = rng.standard_normal((clusters, dims)).astype(np.float32)
    points = centres[rng.integers(0, clusters, rows)] + 0.5 * rng.standard_normal((rows, dims), dtype=np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def knn_pass(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The grouped pass with faiss's ``knn`` per list (the pipeline's pass before this benchmark)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return big_batch_search(index, queries, k, method="knn_function", verbose=1, threaded=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lists", type=int, default=1024)
    parser.add_argument("--members-per-list", type=int, default=610)
    parser.add_argument("--queries-per-list", type=int, default=7812, help="queries x nprobe / lists")
    parser.add_argument("--nprobe", type=int, default=64)
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--k", type=int, default=11, help="neighbours per query (the scores search k + 1: the sample itself)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    members = unit_clusters(args.lists * args.members_per_list, args.dims, 100, rng)
    queries = members[rng.choice(len(members), size=args.lists * args.queries_per_list // args.nprobe, replace=False)]
    quantiser = faiss.IndexFlatIP(args.dims)
    index = faiss.IndexIVFFlat(quantiser, args.dims, args.lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True
    index.train(members[rng.choice(len(members), size=min(len(members), 39 * args.lists), replace=False)])
    index.add(members)
    index.nprobe = args.nprobe
    passes = {"knn": lambda: knn_pass(index, queries, args.k), "products": lambda: _grouped_search(index, queries, args.k)}

    seconds: dict[str, list[float]] = {method: [] for method in METHODS}
    results = {}
    for _ in range(args.rounds):
        for method in METHODS:  # alternating: both see the same machine load
            start = time.perf_counter()
            results[method] = passes[method]()
            seconds[method].append(time.perf_counter() - start)

    (knn_s, knn_i), (products_s, products_i) = results["knn"], results["products"]
    same_ids = float(np.mean(np.sort(knn_i, axis=1) == np.sort(products_i, axis=1)))
    expected = len(queries) * args.nprobe * args.members_per_list * args.dims * 2
    best = {method: min(values) for method, values in seconds.items()}
    report = {
        "command": [sys.executable, *sys.argv],
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "faiss": faiss.__version__, "numpy": np.__version__},
        "settings": vars(args),
        "shapes": {"members": len(members), "queries": len(queries), "mean_queries_per_list": len(queries) * args.nprobe / args.lists},
        "seconds": seconds,
        "lists_per_s": {method: round(args.lists / value, 1) for method, value in best.items()},
        "nominal_gflops_per_s": {method: round(expected / value / 1e9, 1) for method, value in best.items()},
        "speedup": round(best["knn"] / best["products"], 2),
        "same_neighbour_ids": round(same_ids, 6),
        "max_abs_similarity_difference": float(np.abs(knn_s - products_s).max()),
    }
    write_json_atomic(args.out, report)
    print(
        f"lists/s: knn {report['lists_per_s']['knn']}, products {report['lists_per_s']['products']} ({report['speedup']}x); same neighbour ids {same_ids:.6f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
