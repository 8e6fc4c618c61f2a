"""Linear transport: PCA of prior embeddings followed by per-component standardisation.

ReLA (Sun et al., NeurIPS 2024, section 3 and the released code) turns prior embeddings ``x``
into representation targets ``y`` by a linear map fitted on the whole dataset::

    y = ((x - mean) @ components.T) / scale

where ``components`` are the eigenvectors of the embedding covariance sorted by descending
eigenvalue and ``scale = sqrt(eigenvalue)``, i.e. every kept component has zero mean and unit
variance over the dataset (population statistics, ddof = 0). A student of feature dim ``k``
aligns to the first ``k`` components (the paper's k = min(student dim, prior dim)).

Moments are accumulated chunk by chunk in float64 (memory ``O(D^2)``, independent of N), shifted
by the first chunk's mean to avoid cancellation in ``E[xx^T] - mean mean^T``. The stage fits from
the embeddings' memory-map in fixed chunks of rows (:func:`fit_linear_transport`), so the result
depends on the embeddings only: not on the batch size, nor on where an interrupted run resumed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import RelaError
from .fileio import load_npz, write_npz_atomic

#: Components whose eigenvalue is below this fraction of the largest are numerically zero
#: (rank deficiency, e.g. fewer images than dimensions) and are not kept: standardising them
#: would blow rounding noise up to unit variance.
RELATIVE_EIGENVALUE_FLOOR = 1e-9


class MomentAccumulator:
    """Streaming first and second moments of ``(B, D)`` batches, in float64.

    Updates never synchronise the host with the device (no data-dependent shapes), so on CUDA
    the accumulation overlaps with the next batch.

    Args:
        dim: embedding dimension D.
        device: where the ``(D, D)`` float64 accumulator lives (the embedding device is cheapest).
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.dim = dim
        self.device = torch.device(device)
        self._count = torch.zeros((), dtype=torch.float64, device=self.device)
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)

    @property
    def count(self) -> int:
        """Rows added so far (reading it synchronises with the device)."""
        return int(self._count.item())

    def update(self, batch: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the rows of ``batch`` ``(B, D)`` (any float dtype) where ``mask`` ``(B,)`` bool is True.

        Masked-out rows (e.g. undecodable images, non-finite outputs) contribute nothing; they
        must still be finite (zero them first).

        Raises:
            ValueError: if the batch is not ``(B, D)`` or the mask not ``(B,)``.
        """
        if batch.ndim != 2 or batch.shape[1] != self.dim:
            raise ValueError(f"expected a (B, {self.dim}) batch, got {tuple(batch.shape)}")
        x = batch.to(self.device, torch.float64)
        weight = torch.ones(x.shape[0], dtype=torch.float64, device=self.device) if mask is None else mask.to(self.device, torch.float64)
        if weight.shape != (x.shape[0],):
            raise ValueError(f"expected a ({x.shape[0]},) mask, got {tuple(weight.shape)}")
        rows = weight.sum()
        if self.shift is None:  # the first batch's mean; any fixed shift keeps the result exact
            self.shift = (x * weight[:, None]).sum(0) / rows.clamp(min=1.0)
        x = (x - self.shift) * weight[:, None]
        self._count += rows
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(mean (D,), covariance (D, D))`` as float64 numpy, population (ddof = 0).

        Raises:
            RelaError: if fewer than two samples were added.
        """
        count = self.count
        if count < 2:
            raise RelaError(f"linear transport needs at least 2 embedded images, got {count}")
        centred_mean = self.sum / count
        covariance = self.outer / count - torch.outer(centred_mean, centred_mean)
        covariance = 0.5 * (covariance + covariance.T)
        mean = centred_mean + self.shift
        return mean.cpu().numpy(), covariance.cpu().numpy()


@dataclass
class LinearTransport:
    """Fitted linear transport (PCA + standardisation).

    Attributes:
        mean: float64 ``(D,)`` embedding mean.
        components: float64 ``(K, D)`` unit eigenvectors, rows sorted by descending variance; the
            sign of each row is fixed so its largest-magnitude entry is positive (deterministic).
        scale: float64 ``(K,)`` = sqrt(explained_variance), the standard deviation of each component.
        explained_variance: float64 ``(K,)`` eigenvalues (population variance of each component).
        explained_variance_ratio: float64 ``(K,)`` eigenvalue / total variance.
        num_samples: images the moments were computed over.
    """

    mean: np.ndarray
    components: np.ndarray
    scale: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    num_samples: int

    @property
    def input_dim(self) -> int:
        """Embedding dimension D."""
        return int(self.mean.shape[0])

    @property
    def output_dim(self) -> int:
        """Number of kept components K (<= D and <= N - 1)."""
        return int(self.components.shape[0])

    @classmethod
    def fit(cls, moments: MomentAccumulator) -> LinearTransport:
        """Eigendecompose the accumulated covariance (``numpy.linalg.eigh``, float64).

        Raises:
            RelaError: fewer than two samples, or a covariance that is zero or not finite.
        """
        mean, covariance = moments.mean_and_covariance()
        if not np.all(np.isfinite(covariance)):
            raise RelaError("embedding covariance is not finite (the prior produced NaN or Inf)")
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
        if eigenvalues[0] <= 0:
            raise RelaError("all embeddings are identical: the prior gives no variance to transport")
        keep = eigenvalues > eigenvalues[0] * RELATIVE_EIGENVALUE_FLOOR
        count = moments.count
        keep[count - 1 :] = False  # at most N - 1 directions carry variance
        eigenvalues, components = eigenvalues[keep], eigenvectors[:, keep].T.copy()
        signs = np.sign(components[np.arange(len(components)), np.argmax(np.abs(components), axis=1)])
        components *= signs[:, None]
        total = float(np.trace(covariance))
        return cls(
            mean=mean,
            components=components,
            scale=np.sqrt(eigenvalues),
            explained_variance=eigenvalues,
            explained_variance_ratio=eigenvalues / total,
            num_samples=count,
        )

    def apply(self, embeddings: torch.Tensor | np.ndarray, dims: int | None = None) -> torch.Tensor:
        """Transport embeddings ``(B, D)`` to targets ``(B, dims or K)`` float32.

        Computed in float32 on the input's device (torch) or on CPU (numpy input).
        """
        x = torch.as_tensor(embeddings)
        k = self.output_dim if dims is None else min(dims, self.output_dim)
        device = x.device
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=device)
        components = torch.as_tensor(self.components[:k], dtype=torch.float32, device=device)
        scale = torch.as_tensor(self.scale[:k], dtype=torch.float32, device=device)
        return ((x.float() - mean) @ components.T) / scale

    def save(self, path: str | os.PathLike, reference: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Write the parameters to an ``.npz`` (no pickle, byte-reproducible), atomically.

        Args:
            reference: optional ``(indices int64 (M,), embeddings float32 (M, D))``: a few samples'
                raw embeddings, stored as ``reference_indices`` / ``reference_embeddings`` so a
                receiving team can recompute those samples' targets (see ``verify``).
        """
        arrays = {
            "mean": self.mean,
            "components": self.components,
            "scale": self.scale,
            "explained_variance": self.explained_variance,
            "explained_variance_ratio": self.explained_variance_ratio,
            "num_samples": np.asarray(self.num_samples, dtype=np.int64),
        }
        if reference is not None:
            arrays["reference_indices"] = np.asarray(reference[0], dtype=np.int64)
            arrays["reference_embeddings"] = np.asarray(reference[1], dtype=np.float32)
        write_npz_atomic(path, arrays)

    def consistency_problems(self, tolerance: float = 1e-6) -> list[str]:
        """Checks that hold for every transport :meth:`fit` writes: finite parameters, orthonormal
        component rows, ``scale == sqrt(explained_variance)``, variances positive and sorted in
        descending order, ratios proportional to the variances. Returns one line per failed check."""
        problems = []
        arrays = [self.mean, self.components, self.scale, self.explained_variance, self.explained_variance_ratio]
        if not all(np.isfinite(a).all() for a in arrays):
            return ["transport parameters are not all finite"]
        gram = self.components @ self.components.T
        if np.abs(gram - np.eye(len(gram))).max() > tolerance:
            problems.append(f"transport components are not orthonormal (max |C C^T - I| = {np.abs(gram - np.eye(len(gram))).max():.2e})")
        if not np.allclose(self.scale, np.sqrt(np.clip(self.explained_variance, 0, None)), rtol=tolerance, atol=0):
            problems.append("transport scale is not the square root of the explained variance")
        if (self.explained_variance <= 0).any() or (np.diff(self.explained_variance) > 0).any():
            problems.append("transport variances are not positive and in descending order")
        ratio = self.explained_variance_ratio * (self.explained_variance[0] / self.explained_variance_ratio[0])
        if not np.allclose(ratio, self.explained_variance, rtol=1e-9, atol=0):
            problems.append("transport explained_variance_ratio is not proportional to explained_variance")
        return problems

    @classmethod
    def load(cls, path: str | os.PathLike) -> LinearTransport:
        """Read parameters written by :meth:`save`.

        Raises:
            RelaError: missing file, missing arrays, or inconsistent shapes.
        """
        try:
            arrays = load_npz(path)
            transport = cls(
                mean=arrays["mean"],
                components=arrays["components"],
                scale=arrays["scale"],
                explained_variance=arrays["explained_variance"],
                explained_variance_ratio=arrays["explained_variance_ratio"],
                num_samples=int(arrays["num_samples"]),
            )
        except (OSError, KeyError, ValueError) as error:
            raise RelaError(f"cannot read transport file {path}: {error}") from None
        k, d = transport.components.shape if transport.components.ndim == 2 else (-1, -1)
        if transport.mean.shape != (d,) or transport.scale.shape != (k,) or transport.explained_variance.shape != (k,):
            raise RelaError(f"transport file {path} has inconsistent shapes")
        return transport


#: Rows per chunk when moments are read from a memory-map; fixed, so the float64 sums (and the
#: transport's bytes) do not depend on anything but the embeddings.
MOMENT_CHUNK_ROWS = 16384


def fit_linear_transport(
    embeddings: np.ndarray,
    ok: np.ndarray,
    device: torch.device | str = "cpu",
    chunk_rows: int = MOMENT_CHUNK_ROWS,
) -> LinearTransport:
    """Fit the linear transport on the rows of ``embeddings`` where ``ok`` is True.

    Args:
        embeddings: float32 ``(N, D)``, typically a memory-map (read ``chunk_rows`` rows at a time,
            so host memory is ``O(chunk_rows * D + D^2)`` beyond the map's page cache).
        ok: bool ``(N,)``; rows with False (undecodable images) are left out (they must be finite).
        device: where the float64 ``(D, D)`` accumulator lives.
        chunk_rows: rows per moment update; keep the default for reproducible bytes.

    Returns:
        The fitted :class:`LinearTransport` (``LinearTransport.fit``).

    Raises:
        ValueError: ``ok`` is not ``(N,)``.
        RelaError: fewer than two ``ok`` rows, or a zero or non-finite covariance.
    """
    if ok.shape != (embeddings.shape[0],):
        raise ValueError(f"expected a ({embeddings.shape[0]},) mask, got {ok.shape}")
    moments = MomentAccumulator(embeddings.shape[1], device)
    for start in range(0, embeddings.shape[0], chunk_rows):
        block = torch.from_numpy(np.array(embeddings[start : start + chunk_rows], dtype=np.float32))  # a writable copy
        moments.update(block.to(moments.device), torch.from_numpy(ok[start : start + chunk_rows]).to(moments.device))
    return LinearTransport.fit(moments)
