"""Stage one at scale: 1,000,000 synthetic embeddings through the transport and the k-NN scores.

Runs the stage's own functions on a float32 ``(N, D)`` memory-map of synthetic prior embeddings,
in the order ``embed`` runs them, and reports each phase's wall-clock and the process's memory:

``fit``        :func:`rela_pipeline.transport.fit_linear_transport` (float64 moments read back from
               the map in fixed chunks, ``eigh``)
``transport``  :func:`rela_pipeline.stages.embed.transport_targets` into a float16 ``(N, K)`` map
``scores``     :func:`rela_pipeline.scores.knn_scores` (k = 10 on the leading 64 components;
               ``--score-index auto``: exact inner product up to 200,000 samples, else an IVF
               index tuned to recall@10 >= 0.95, its measured recall in the report)

Memory is sampled from ``/proc/self/status`` every 0.1 s: peak RSS (``VmHWM``), and the peaks of
its anonymous part (heap: arrays, the faiss index) and of its file-backed part (pages of the
memory-maps, which the kernel can drop and reread; shared libraries too). Each is reported above
its value before the first phase (torch, faiss and numpy loaded: the baseline). The claim checked is
the issue's bound: peak host memory within O(N x D) for the embeddings plus O(D^2); the report gives
the peak growth over the baseline against ``N * D * 4 + D * D * 8`` bytes.

The synthetic embeddings have the shape of a real prior's: 100 clusters on a low-rank subspace with
a decaying spectrum plus isotropic noise, so the transport keeps all D components and the scores
see real neighbourhoods. Generated chunk by chunk (seeded), never whole in memory.

    python benchmarks/scale_stage_one.py --samples 1000000 --dim 512 --work /tmp/scale --out scale.json
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from rela_pipeline.fileio import create_npy_memmap, write_json_atomic
from rela_pipeline.runtime import resolve_device
from rela_pipeline.scores import knn_scores
from rela_pipeline.stages.embed import transport_targets
from rela_pipeline.transport import fit_linear_transport


class MemorySampler:
    """Peaks of RSS and of its anonymous and file-backed parts, read from ``/proc/self/status``
    every ``interval`` seconds by a daemon thread (bytes)."""

    FIELDS = {"VmHWM": "peak_rss", "RssAnon": "anon", "RssFile": "file"}

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peaks = {"peak_rss": 0, "anon": 0, "file": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self) -> dict[str, int]:
        values = {}
        with open("/proc/self/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in self.FIELDS:
                    values[self.FIELDS[key]] = int(rest.split()[0]) * 1024
        return values

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self) -> None:
        for key, value in self.read().items():
            self.peaks[key] = max(self.peaks[key], value)

    def reset(self) -> None:
        """Start new peaks from the current values (``VmHWM`` cannot be reset: it stays a process peak)."""
        self.peaks = dict(self.read())

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def synthetic_embeddings(path: Path, samples: int, dim: int, seed: int, chunk_rows: int = 65536) -> np.ndarray:
    """A float32 ``(samples, dim)`` memory-map of clustered low-rank embeddings plus noise."""
    rng = np.random.default_rng(seed)
    rank = min(dim, 64)
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T * np.geomspace(3.0, 0.3, rank)[:, None]  # (rank, dim)
    centres = rng.standard_normal((100, rank)).astype(np.float32)
    embeddings = create_npy_memmap(path, np.float32, (samples, dim))
    for start in range(0, samples, chunk_rows):
        rows = min(chunk_rows, samples - start)
        latent = centres[rng.integers(0, len(centres), rows)] + 0.5 * rng.standard_normal((rows, rank), dtype=np.float32)
        embeddings[start : start + rows] = latent @ basis.astype(np.float32) + 0.05 * rng.standard_normal((rows, dim), dtype=np.float32)
    embeddings.flush()
    return embeddings


def generate_in_child(path: Path, samples: int, dim: int, seed: int) -> float:
    """Write the synthetic embeddings from a spawned process, so this process's memory peaks (which
    cannot be reset) start with the phases; returns the seconds it took."""
    start = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(target=synthetic_embeddings, args=(path, samples, dim, seed))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"generating the synthetic embeddings failed (exit {child.exitcode})")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    """Run the three phases, print a Markdown table, write the JSON report; return the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension D")
    parser.add_argument("--score-dims", type=int, default=64)
    parser.add_argument("--score-k", type=int, default=10)
    parser.add_argument("--score-index", default="auto", choices=["auto", "exact", "ivf", "hnsw"])
    parser.add_argument("--target-dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, required=True, help="directory for the memory-maps (removed at the end)")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    log = logging.getLogger("rela_pipeline")  # the scoring's tuning steps
    if not log.handlers:
        log.addHandler(logging.StreamHandler(sys.stderr))
        log.setLevel(logging.INFO)
    device = resolve_device(args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    n, d = args.samples, args.dim
    phases: dict[str, dict] = {}
    try:
        generate_s = generate_in_child(args.work / "embeddings.npy", n, d, args.seed)
        embeddings = np.load(args.work / "embeddings.npy", mmap_mode="r")
        ok = np.ones(n, dtype=bool)
        with MemorySampler() as memory:
            memory.reset()
            baseline = dict(memory.peaks)

            def phase(name: str, run):
                memory.reset()
                start = time.perf_counter()
                result = run()
                memory.sample()
                phases[name] = {
                    "seconds": round(time.perf_counter() - start, 2),
                    **{f"peak_{k}_over_baseline_bytes": memory.peaks[k] - baseline[k] for k in ("anon", "file")},
                }
                print(
                    f"{name}: {phases[name]['seconds']:.1f}s, peak anonymous +{phases[name]['peak_anon_over_baseline_bytes'] / 2**20:.0f} MiB, "
                    f"peak file-backed +{phases[name]['peak_file_over_baseline_bytes'] / 2**20:.0f} MiB",
                    flush=True,
                )
                return result

            transport = phase("fit", lambda: fit_linear_transport(embeddings, ok, device))
            targets = phase("transport", lambda: transport_targets(embeddings, np.arange(n), transport, args.work / "targets.npy", args.target_dtype, device))
            scores = phase(
                "scores",
                lambda: knn_scores(targets, k=args.score_k, dims=args.score_dims, use_gpu=device.type == "cuda", index=args.score_index, seed=args.seed),
            )
        peak_rss = memory.peaks["peak_rss"]
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    embeddings_bytes = n * d * 4
    report = {
        "command": [sys.executable, *sys.argv],
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "generate_seconds": round(generate_s, 2),
        "phases": phases,
        "total_seconds": round(sum(p["seconds"] for p in phases.values()), 2),
        "baseline_bytes": baseline,
        "peak_rss_bytes": peak_rss,
        "peak_rss_over_baseline_bytes": peak_rss - baseline["peak_rss"],
        "embeddings_bytes": embeddings_bytes,
        "targets_bytes": n * transport.output_dim * np.dtype(args.target_dtype).itemsize,
        "faiss_index_bytes": n * scores.dims * 4,
        "covariance_bytes": d * d * 8,
        "output_dim": transport.output_dim,
        "scores": {
            "k": scores.k,
            "dims": scores.dims,
            "device": scores.device,
            "search": scores.index,
            "knn_density_median": float(np.median(scores.knn_density)),
            "nn_similarity_median": float(np.median(scores.nn_similarity)),
            "finite": bool(np.isfinite(scores.knn_density).all() and np.isfinite(scores.nn_similarity).all()),
        },
    }
    bound = embeddings_bytes + d * d * 8
    report["growth_over_bound"] = round(report["peak_rss_over_baseline_bytes"] / bound, 3)
    mib = 2**20
    print("\n| phase | seconds | peak anonymous memory | peak file-backed memory (maps) |\n|---|---:|---:|---:|")
    for name, p in phases.items():
        print(f"| {name} | {p['seconds']:.1f} | +{p['peak_anon_over_baseline_bytes'] / mib:.0f} MiB | +{p['peak_file_over_baseline_bytes'] / mib:.0f} MiB |")
    print(
        f"\nN = {n:,}, D = {d}: N*D*4 + D*D*8 = {bound / mib:.0f} MiB; peak RSS {peak_rss / mib:.0f} MiB, "
        f"{report['peak_rss_over_baseline_bytes'] / mib:.0f} MiB above the baseline ({report['growth_over_bound']:.2f} x the bound's terms)"
    )
    if args.out is not None:
        write_json_atomic(args.out, report)
    return report


if __name__ == "__main__":
    main()
