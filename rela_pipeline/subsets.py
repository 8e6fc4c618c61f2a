"""Dynamic data subsets: which samples an epoch trains on.

ReLA (the paper's dynamic data subset; the authors' code) draws a fresh uniform random subset of ``round(ratio * N)`` samples every
epoch; the budget is the fraction of the full run's optimisation steps. Beyond the paper, the
stage-one scores (``scores.npz``, faiss k-NN in the prior's transported space) can steer the draw:

``random``   uniform without replacement (the paper).
``density``  weighted without replacement, favouring samples in sparse regions of the prior space:
             weight ``1 - q / 2`` where ``q`` in ``[0, 1]`` is the sample's percentile rank of
             ``knn_density`` (mean cosine to its k nearest neighbours), so the densest sample is drawn
             at half the rate of the sparsest. Redundant look-alikes are seen less often, rare ones
             more, and every sample keeps a chance every epoch.
``dedup``    uniform over a pool without near-duplicates: a sample whose nearest neighbour has cosine
             ``>= threshold`` (``nn_similarity``) and a smaller index is left out, so one member of
             each duplicate pair (or chain) stays. If the pool is smaller than the subset, the rest is
             drawn uniformly from the left-out samples.

Every draw is a pure function of ``(seed, epoch)``: a resumed run sees the same subsets.
"""

from __future__ import annotations

import numpy as np

from .errors import RelaError

#: Subset rules accepted by :class:`SubsetSampler` and ``--subset``.
SUBSET_RULES = ("random", "density", "dedup")


class SubsetSampler:
    """Draws each epoch's subset of sample indices.

    Args:
        num_samples: N, the shard set's sample count.
        ratio: fraction of N per epoch, in ``(0, 1]``.
        rule: one of :data:`SUBSET_RULES`.
        scores: for score-driven rules, the arrays of ``scores.npz`` (``knn_density``,
            ``nn_similarity``, ``nn_index``; each ``(N,)``).
        seed: base seed.
        dedup_threshold: cosine at or above which a nearest neighbour counts as a duplicate.
        min_size: the smallest allowed subset (one batch).

    Raises:
        RelaError: ratio outside ``(0, 1]``, unknown rule, missing or mis-sized scores, or a subset
            smaller than ``min_size`` samples ("empty subset").
    """

    def __init__(
        self,
        num_samples: int,
        ratio: float,
        rule: str = "random",
        scores: dict[str, np.ndarray] | None = None,
        seed: int = 0,
        dedup_threshold: float = 0.98,
        min_size: int = 1,
    ) -> None:
        if not 0.0 < ratio <= 1.0:
            raise RelaError(f"--data-ratio must be in (0, 1], got {ratio}")
        if rule not in SUBSET_RULES:
            raise RelaError(f"unknown subset rule '{rule}'; choose one of: {', '.join(SUBSET_RULES)}")
        self.num_samples = num_samples
        self.ratio = ratio
        self.rule = rule
        self.seed = seed
        self.size = min(num_samples, int(round(ratio * num_samples)))
        if self.size < max(min_size, 1):
            raise RelaError(f"empty subset: --data-ratio {ratio} of {num_samples} samples gives {self.size}, fewer than one batch of {min_size}")
        self.weights: np.ndarray | None = None
        self.pool: np.ndarray | None = None
        if rule != "random":
            needed = {"density": ("knn_density",), "dedup": ("nn_similarity", "nn_index")}[rule]
            for name in needed:
                values = None if scores is None else scores.get(name)
                if values is None or len(values) != num_samples:
                    raise RelaError(f"subset rule '{rule}' needs the stage-one score '{name}' for all {num_samples} samples")
        if rule == "density":
            ranks = np.argsort(np.argsort(np.asarray(scores["knn_density"]), kind="stable"), kind="stable")
            quantile = ranks / max(num_samples - 1, 1)
            weights = 1.0 - 0.5 * quantile
            self.weights = weights
        elif rule == "dedup":
            similarity = np.asarray(scores["nn_similarity"])
            neighbour = np.asarray(scores["nn_index"])
            duplicate = (similarity >= dedup_threshold) & (neighbour < np.arange(num_samples))
            self.pool = np.flatnonzero(~duplicate)
            self.left_out = np.flatnonzero(duplicate)

    def rng(self, epoch: int) -> np.random.Generator:
        """The generator of ``epoch``'s draw."""
        return np.random.default_rng([self.seed, epoch, 0x5E1A])

    def indices(self, epoch: int) -> np.ndarray:
        """The sorted sample indices (int64, ``(size,)``, distinct) of ``epoch``'s subset."""
        rng = self.rng(epoch)
        n, m = self.num_samples, self.size
        if m == n:
            return np.arange(n, dtype=np.int64)
        if self.rule == "random":
            chosen = rng.choice(n, size=m, replace=False)
        elif self.rule == "density":
            # Weighted sampling without replacement in O(N): keep the m largest u^(1/w)
            # (Efraimidis & Spirakis 2006), compared as log(u) / w.
            keys = np.log(rng.random(n)) / self.weights
            chosen = np.argpartition(keys, n - m)[n - m :]
        else:
            if len(self.pool) >= m:
                chosen = rng.choice(self.pool, size=m, replace=False)
            else:
                extra = rng.choice(self.left_out, size=m - len(self.pool), replace=False)
                chosen = np.concatenate([self.pool, extra])
        return np.sort(chosen.astype(np.int64))

    def mask(self, epoch: int) -> np.ndarray:
        """``epoch``'s subset as a boolean mask ``(N,)``."""
        mask = np.zeros(self.num_samples, dtype=bool)
        mask[self.indices(epoch)] = True
        return mask

    def describe(self) -> str:
        """One line for logs."""
        extra = f", {len(self.pool)} of {self.num_samples} samples after removing near-duplicates" if self.pool is not None else ""
        return f"{self.rule} subsets of {self.size} samples per epoch ({self.ratio:.0%} of {self.num_samples}){extra}"
