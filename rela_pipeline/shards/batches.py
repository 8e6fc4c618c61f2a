"""Training batches from a shard set, on the training device, for any training loop.

:class:`ShardBatches` is stage two's data path as a public object: the loop of ``rela-pipeline
train``, a user's own loop and a PyTorch Lightning module all read the same batches from it. Per
epoch it draws the dynamic subset (:class:`rela_pipeline.subsets.SubsetSampler`), orders it
(:mod:`rela_pipeline.shards.plan`) and yields :class:`ShardBatch` objects: uint8 images at the
training resolution, the first K target components, labels and sample indices, already on the
device, with a per-batch seed from which the views are made there
(:mod:`rela_pipeline.batched_views`).

Two data paths give the same batches (same subsets, order, images and view seeds):

``memory``  the whole shard set is decoded once (in parallel DataLoader workers, with a progress
            bar) into a uint8 tensor ``(N, 3, S, S)``, float32 targets ``(N, K)`` and int64
            labels ``(N,)`` on the training device (host RAM on CPU, device memory on CUDA);
            each batch is one index operation. No tar is read after the first pass.
``stream``  every epoch reads the shards with webdataset: DataLoader worker ``w`` reads the
            shards at positions ``w, w + W, ...`` of the epoch's shard order, keeps the subset
            by ``__key__`` before decoding, shuffles with the plan's per-shard buffer, decodes
            to uint8 ``(3, S, S)`` and sends chunks; the main process puts the chunks back in
            plan order and cuts batches. For sets larger than memory. With W workers the
            main process may hold up to about W - 1 decoded shards while it waits for the next
            one in order (the DataLoader returns the workers' chunks round-robin).
``auto``    ``memory`` when the decoded set fits the cache budget, else ``stream``.

In a distributed run (``rank``, ``world_size``) each rank gets its ``B / W`` rows of every global
batch of the same order (:func:`rela_pipeline.shards.plan.rank_batches`): on the memory path the
columns of the one-process batches (so W processes compute what one does), on the stream path a
contiguous 1/W of the epoch (so a rank reads about 1/W of the shards).

Images are decoded with PIL and resized to S x S (bilinear, the whole image: the same squash the
evaluation uses) once, when decoded; all augmentation happens later on the device.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from ..batched_views import BatchedViews, check_views
from ..errors import RelaError
from ..imagefolder import UNDECODABLE_IMAGE_ERRORS
from ..runtime import default_num_workers, resolve_device
from ..subsets import SubsetSampler
from .plan import buffer_shuffle, epoch_order, local_batch_size, rank_batches, shard_rng, shard_spans, shard_visit_order
from .reader import ShardSetSource, open_shard_set, verified
from .samples import ShardErrorLatch, bad_sample, decode_sample, in_subset

logger = logging.getLogger("rela_pipeline")

#: Accepted ``data_path`` values.
DATA_PATHS = ("auto", "memory", "stream")
#: Fraction of free memory (host RAM on CPU, device memory on CUDA) that the default cache budget allows.
DEFAULT_CACHE_FRACTION = 0.5
#: Samples per chunk a stream worker sends to the main process.
CHUNK_SAMPLES = 256


def decoded_bytes_per_sample(image_size: int, target_dim: int) -> int:
    """Bytes one sample takes in the in-memory store: uint8 image ``3 x S x S``, float32 target
    ``K``, int64 label and index."""
    return 3 * image_size * image_size + 4 * target_dim + 16


def default_cache_bytes(device: torch.device) -> int:
    """The default cache budget: :data:`DEFAULT_CACHE_FRACTION` of the free device memory on CUDA
    (``torch.cuda.mem_get_info``), of ``MemAvailable`` in ``/proc/meminfo`` on CPU (of the
    physical memory where that file does not exist)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(DEFAULT_CACHE_FRACTION * free)
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(DEFAULT_CACHE_FRACTION * available)


def view_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of the views of batch ``step`` (0-based, within ``epoch``): a function of the run
    seed and the batch's place only, so every data path and a resumed run make the same views."""
    return int(np.random.SeedSequence([seed, epoch, step, 0x7E5]).generate_state(1, dtype=np.uint64)[0] >> 1)


def part_seed(seed: int, offset: int) -> int:
    """The view seed of the rows from ``offset`` of a batch whose views are seeded with ``seed``,
    for view transforms that cannot draw one batch's parameters and keep some rows."""
    return int(np.random.SeedSequence([seed, offset, 0x9A7]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class ShardBatch:
    """One training batch on the training device.

    Attributes:
        images: uint8 ``(B, 3, S, S)``, RGB, the whole images resized to the training resolution.
        target: float32 ``(B, K)``, the first K components of the representation targets.
        label: int64 ``(B,)``, class indices, -1 for unlabelled data.
        index: int64 ``(B,)``, sample indices in the shard set.
        epoch: the 0-based epoch.
        step: the batch's 0-based place in its epoch.
        seed: the seed of this batch's views (:func:`view_seed`).
        offset: in a distributed run, where this rank's rows start in the global batch
            (``rank * B / W``); 0 in one process.
        global_batch_size: B, the global batch this batch is a part of (None: the whole batch).
    """

    images: torch.Tensor
    target: torch.Tensor
    label: torch.Tensor
    index: torch.Tensor
    epoch: int
    step: int
    seed: int
    offset: int = 0
    global_batch_size: int | None = None

    @property
    def is_part(self) -> bool:
        """Whether this is one rank's part of a larger global batch."""
        return self.global_batch_size is not None and self.global_batch_size != self.target.shape[0]

    def generator(self) -> torch.Generator:
        """A new generator on the batch's device seeded with :attr:`seed`; for one rank's part of
        a global batch, seeded with :func:`part_seed` (so the ranks' draws differ) unless the
        views are :class:`BatchedViews`, which draw the whole batch's parameters from :attr:`seed`
        and keep this part's rows (:meth:`BatchedViews.rows_of_batch`)."""
        seed = part_seed(self.seed, self.offset) if self.is_part else self.seed
        return torch.Generator(device=self.target.device).manual_seed(seed)

    def views(self, transform: Callable | None, name: str = "views", memory_format: torch.memory_format | None = None) -> list[torch.Tensor]:
        """The batch's augmented views.

        Args:
            transform: a batched view transform, ``(uint8 (B, 3, S, S), generator) -> list of
                float (B, 3, s, s)``: made on the device
                (:func:`rela_pipeline.batched_views.batched_rela_views`), or per image with PIL
                (:class:`rela_pipeline.views.PerImageViews` around a per-image transform).
            name: how to name the transform in errors (the method's name).
            memory_format: e.g. ``torch.channels_last`` for convolutional students.

        Returns:
            At least two float tensors ``(B, 3, s, s)`` on the batch's device.

        Raises:
            RelaError: the transform returns anything else (one line naming ``name`` and the shapes).
        """
        if transform is None:
            raise RelaError(f"{name}: no view transform given for a batch of images")
        try:
            if self.is_part and isinstance(transform, BatchedViews):
                whole = torch.Generator(device=self.target.device).manual_seed(self.seed)
                made = transform.rows_of_batch(self.images, whole, self.offset, self.global_batch_size)
            else:
                made = transform(self.images, self.generator())
        except TypeError as error:
            raise RelaError(
                f"{name}: the transform failed on a uint8 batch {tuple(self.images.shape)} with a generator ({error}); "
                "give a batched transform (rela_pipeline.batched_views), or wrap a per-image PIL transform in "
                "rela_pipeline.views.PerImageViews (--augment pil)"
            ) from None
        views = check_views(made, self.target.shape[0], name)
        if memory_format is not None:
            views = [v.contiguous(memory_format=memory_format) for v in views]
        return views


def _to_uint8_chw(image: Image.Image, image_size: int) -> np.ndarray:
    """A PIL RGB image as uint8 ``(3, S, S)``: bilinear resize of the whole image (antialiased
    when shrinking, PIL's ``Image.resize``), channels first."""
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


class _ShardDecoder(torch.utils.data.IterableDataset):
    """DataLoader dataset: decode shards into uint8 chunks, one shard per worker at a time.

    Worker ``w`` of ``W`` takes the shards at positions ``w, w + W, ...`` of ``shards``
    (``(shard id, url)``, or ``(shard id, url, first, end)`` to decode only positions
    ``first:end`` of the shard's shuffled subset, :func:`rela_pipeline.shards.plan.shard_spans`); for each it
    yields chunks ``{"position", "last", "images": uint8 (n, 3, S, S), "target": float32 (n, K),
    "label": int64 (n,), "index": int64 (n,)}`` (a last chunk may be empty), or ``{"error": line}``
    and stops.

    Args:
        shards: ``[(shard id, url), ...]`` in reading order.
        subset_mask: ``(N,)`` bool, or None for every sample.
        target_dim, image_size: K and S.
        seed, epoch: for the per-shard shuffle; ``shuffle_buffer`` None keeps the stored order.
        skip_bad_shards: warn and go on past unreadable shards and samples.
    """

    def __init__(
        self,
        shards: list[tuple[int, str]],
        subset_mask: np.ndarray | None,
        target_dim: int,
        image_size: int,
        seed: int,
        epoch: int,
        shuffle_buffer: int | None,
        skip_bad_shards: bool,
    ) -> None:
        super().__init__()
        self.shards = shards
        self.mask = subset_mask
        self.target_dim = target_dim
        self.image_size = image_size
        self.seed = seed
        self.epoch = epoch
        self.shuffle_buffer = shuffle_buffer
        self.skip = skip_bad_shards

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for position in range(worker, len(self.shards), workers):
            shard_id, url, *span = self.shards[position]
            error = yield from self._shard(position, shard_id, url, tuple(span) or None)
            if error is not None:
                yield {"error": error}
                return

    def _shard(self, position: int, shard_id: int, url: str, span: tuple[int, int] | None):
        latch = ShardErrorLatch(self.skip)
        samples = (s for s in wds.tarfile_to_samples(handler=latch.handle_shard)([{"url": url}]) if in_subset(s, self.mask))
        if self.shuffle_buffer is not None:
            samples = buffer_shuffle(samples, self.shuffle_buffer, shard_rng(self.seed, self.epoch, shard_id))
        if span is not None:
            samples = itertools.islice(samples, span[0], span[1])  # the others are read, never decoded
        rows: list[tuple[np.ndarray, np.ndarray, int, int]] = []
        for sample in samples:
            try:
                image, target, label, index = decode_sample(sample, self.target_dim)
                rows.append((_to_uint8_chw(image, self.image_size), target, label, index))
            except UNDECODABLE_IMAGE_ERRORS as error:  # ValueError covers the key and target checks
                message = bad_sample(url, error, self.skip)
                if message is None:
                    continue
                return message
            if len(rows) == CHUNK_SAMPLES:
                yield self._chunk(position, rows, last=False)
                rows = []
        if latch.message:
            return latch.message
        yield self._chunk(position, rows, last=True)
        return None

    def _chunk(self, position: int, rows: list, last: bool) -> dict[str, Any]:
        size = self.image_size
        return {
            "position": position,
            "last": last,
            "images": torch.from_numpy(np.stack([r[0] for r in rows])) if rows else torch.empty(0, 3, size, size, dtype=torch.uint8),
            "target": torch.from_numpy(np.stack([r[1] for r in rows])) if rows else torch.empty(0, self.target_dim),
            "label": torch.tensor([r[2] for r in rows], dtype=torch.int64),
            "index": torch.tensor([r[3] for r in rows], dtype=torch.int64),
        }


def _decode_shards(dataset: _ShardDecoder, workers: int, pin_memory: bool) -> Iterator[dict[str, Any]]:
    """Run a :class:`_ShardDecoder` in ``workers`` processes and yield its chunks in shard order.

    Raises:
        RelaError: a worker reported an error (its one line).
    """
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,
    )
    pending: dict[int, list[dict[str, Any]]] = {}
    expected = 0
    for chunk in loader:
        if "error" in chunk:
            raise RelaError(chunk["error"])
        pending.setdefault(chunk["position"], []).append(chunk)
        while expected in pending and pending[expected]:
            ready = pending[expected].pop(0)
            yield ready
            if ready["last"]:
                del pending[expected]
                expected += 1


class ShardMemoryStore:
    """A shard set decoded once into memory on the training device.

    Attributes:
        images: uint8 ``(N, 3, S, S)`` (rows of unread samples stay zero).
        targets: float32 ``(N, K)``.
        labels: int64 ``(N,)``, -1 for unlabelled or unread samples.
        contents: shard id -> int64 sample indices in stored order (the shards that were read).
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, contents: dict[int, np.ndarray]) -> None:
        self.images, self.targets, self.labels, self.contents = images, targets, labels, contents

    @classmethod
    def load(
        cls,
        source: ShardSetSource,
        target_dim: int,
        image_size: int,
        device: torch.device,
        num_workers: int,
        skip_bad_shards: bool = False,
        progress: bool = True,
    ) -> ShardMemoryStore:
        """Decode every readable sample of ``source`` (one pass over the shards, ``num_workers``
        processes) into tensors on ``device``.

        Raises:
            RelaError: an unreadable shard or sample (unless ``skip_bad_shards``).
        """
        n = source.num_samples
        images = torch.zeros(n, 3, image_size, image_size, dtype=torch.uint8, device=device)
        targets = torch.zeros(n, target_dim, dtype=torch.float32, device=device)
        labels = torch.full((n,), -1, dtype=torch.int64, device=device)
        contents: dict[int, list[np.ndarray]] = {}
        ids = source.shard_ids
        decoder = _ShardDecoder(list(zip(ids, source.shard_urls)), None, target_dim, image_size, 0, 0, None, skip_bad_shards)
        bar = tqdm(total=source.readable_samples, unit="img", desc="decode", disable=not progress, dynamic_ncols=True)
        with bar:
            for chunk in _decode_shards(decoder, num_workers, pin_memory=device.type == "cuda"):
                index = chunk["index"]
                if len(index) and int(index.max()) >= n:
                    raise RelaError(f"a sample index {int(index.max())} is outside the manifest's {n} samples")
                rows = index.to(device)
                images[rows] = chunk["images"].to(device, non_blocking=True)
                targets[rows] = chunk["target"].to(device, non_blocking=True)
                labels[rows] = chunk["label"].to(device, non_blocking=True)
                contents.setdefault(ids[chunk["position"]], []).append(index.numpy())
                bar.update(len(index))
        merged = {shard_id: np.concatenate(parts).astype(np.int64) for shard_id, parts in contents.items()}
        return cls(images, targets, labels, merged)

    @property
    def samples(self) -> int:
        """Samples held."""
        return int(sum(len(v) for v in self.contents.values()))


class ShardBatches:
    """Training batches from a shard set for any loop: the subsets, order, epochs and seeds of
    ``rela-pipeline train`` (module docstring).

    Use::

        batches = ShardBatches("runs/demo/shards", batch_size=128, image_size=32, data_ratio=0.2)
        views = batched_rela_views(32)
        for epoch in range(10):
            for batch in batches.epoch(epoch):
                v1, v2 = batch.views(views)           # float32 (B, 3, 32, 32) on batches.device
                ...                                   # batch.target (B, K), batch.label, batch.index

    Iterating the object itself (``for batch in batches``) runs :attr:`next_epoch` and advances
    it, so frameworks that call ``iter()`` once per epoch (PyTorch Lightning) get a new subset each
    time; :meth:`set_epoch` sets it (e.g. when resuming).

    Args:
        shards: a shard-set directory or manifest URL, or an opened :class:`ShardSetSource`.
        batch_size: B, images per batch.
        image_size: S, the training resolution in pixels (images are stored at S x S).
        target_dim: K, the leading target components to return (default: all).
        data_ratio, subset, dedup_threshold: the dynamic subset (:class:`SubsetSampler`).
        seed: seeds the subsets, the order and the views.
        device: "auto", "cpu", "cuda" or "cuda:N".
        data_path: one of :data:`DATA_PATHS`.
        cache_bytes: the memory budget of the ``memory`` path in bytes (default
            :func:`default_cache_bytes`).
        num_workers: decoding processes of the stream path; 0 decodes in this process; None =
            ``min(8, CPUs - 1)``. The memory path's one decoding pass uses at least one process
            per CPU core (up to one per shard).
        shuffle_buffer: the per-shard shuffle buffer in samples.
        skip_bad_shards: warn and skip unreadable shards and samples.
        verify: when ``shards`` is a location, verify the set first
            (:func:`rela_pipeline.shards.manifest.verify_shard_set`).
        progress: show the memory path's decoding progress bar.
        rank, world_size: in a distributed run (``torch.distributed.get_rank()`` and
            ``get_world_size()``), this process's share: each batch holds this rank's ``B / W``
            rows of the global batch of B (:func:`rela_pipeline.shards.plan.rank_batches`; memory
            path: ``interleaved``, the one-process run's global batches; stream path:
            ``contiguous``, so a rank reads about ``1 / W`` of the shards). Every rank gets
            :attr:`steps_per_epoch` batches per epoch; the ranks' samples are disjoint and together
            the one-process epoch. The stream path plans from the manifest's ``shard_order`` and
            checks every batch against the plan.

    Raises:
        RelaError: a bad setting (B not a multiple of W included), a set that does not open or
            verify, an empty subset, ``data_path="memory"`` when the set does not fit (naming
            the bytes needed and the budget), or a distributed stream of a set whose manifest has
            no ``shard_order``.
    """

    def __init__(
        self,
        shards: str | os.PathLike | ShardSetSource,
        *,
        batch_size: int,
        image_size: int = 32,
        target_dim: int | None = None,
        data_ratio: float = 1.0,
        subset: str = "random",
        dedup_threshold: float = 0.98,
        seed: int = 0,
        device: str | torch.device = "auto",
        data_path: str = "auto",
        cache_bytes: int | None = None,
        num_workers: int | None = None,
        shuffle_buffer: int = 2000,
        skip_bad_shards: bool = False,
        verify: bool = True,
        progress: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if data_path not in DATA_PATHS:
            raise RelaError(f"data_path must be one of {', '.join(DATA_PATHS)}, got {data_path!r}")
        if batch_size < 1 or image_size < 8 or shuffle_buffer < 1:
            raise RelaError(f"need batch_size >= 1, image_size >= 8 and shuffle_buffer >= 1, got {batch_size}, {image_size}, {shuffle_buffer}")
        if cache_bytes is not None and cache_bytes < 0:
            raise RelaError(f"cache_bytes must be >= 0, got {cache_bytes}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise RelaError(f"rank {rank} is outside a world of {world_size} processes")
        if isinstance(shards, ShardSetSource):
            source = shards
        else:
            source = open_shard_set(shards, skip_bad_shards=skip_bad_shards)
            if verify:
                source = verified(source, skip_bad_shards)
        self.source = source
        self.batch_size = batch_size
        self.image_size = image_size
        self.target_dim = min(target_dim, source.target_dim) if target_dim is not None else source.target_dim
        self.seed = seed
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.shuffle_buffer = shuffle_buffer
        self.skip_bad_shards = skip_bad_shards
        self.progress = progress
        if num_workers is not None and num_workers < 0:
            raise RelaError(f"num_workers must be >= 0, got {num_workers}")
        self.num_workers = num_workers if num_workers is not None else default_num_workers()
        scores = source.load_scores() if subset != "random" else None
        self.sampler = SubsetSampler(source.num_samples, data_ratio, subset, scores, seed=seed, dedup_threshold=dedup_threshold, min_size=batch_size)
        self.cache_bytes = cache_bytes if cache_bytes is not None else default_cache_bytes(self.device)
        self.bytes_needed = source.num_samples * decoded_bytes_per_sample(image_size, self.target_dim)
        fits = self.bytes_needed <= self.cache_bytes
        if data_path == "memory" and not fits:
            raise RelaError(
                f"data_path='memory' (--data-path memory): the decoded shard set needs {self.bytes_needed:,} bytes ({source.num_samples} samples at "
                f"{image_size} px, {self.target_dim} target dims) but the cache budget is {self.cache_bytes:,} bytes "
                f"(cache_bytes, --cache-bytes); use data_path='stream' (--data-path stream) or a larger budget"
            )
        self.data_path = "memory" if data_path == "memory" or (data_path == "auto" and fits) else "stream"
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = local_batch_size(batch_size, world_size)
        self._planned_contents = None
        if world_size > 1 and self.data_path == "stream":
            self._planned_contents = source.written_contents()
            if self._planned_contents is None:
                raise RelaError(
                    f"a distributed stream needs the manifest's shard_order to plan each rank's part, and {source.location} has none; use data_path='memory' (--data-path memory)"
                )
        self.next_epoch = 0
        self._store: ShardMemoryStore | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per epoch: ``subset size // B`` (fewer if shards were skipped)."""
        return self.sampler.size // self.batch_size

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def num_samples(self) -> int:
        """N, the samples in the shard set."""
        return self.source.num_samples

    @property
    def class_names(self) -> list[str]:
        """Class names ([] when unlabelled)."""
        return self.source.class_names

    def store(self) -> ShardMemoryStore:
        """The decoded set of the memory path, decoded on first use.

        Raises:
            RelaError: on the stream path, or an unreadable shard or sample.
        """
        if self.data_path != "memory":
            raise RelaError("the shard set is read by streaming, not held in memory")
        if self._store is None:
            logger.info("decoding %d samples into memory (%.1f MB on %s)", self.num_samples, self.bytes_needed / 1e6, self.device)
            # The loop has not started: the decoding pass may use every core (its share of them
            # when torchrun starts several ranks on this machine).
            cores = (os.cpu_count() or 1) // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
            workers = max(self.num_workers, min(len(self.source.shard_urls), cores))
            self._store = ShardMemoryStore.load(self.source, self.target_dim, self.image_size, self.device, workers, self.skip_bad_shards, self.progress)
        return self._store

    def prepare(self) -> None:
        """Do the one-off work before the first epoch: the memory path's decoding pass (a no-op on
        the stream path). ``epoch`` does it on first use; calling it first lets a loop time it apart.

        Raises:
            RelaError: an unreadable shard or sample (unless skipped).
        """
        if self.data_path == "memory":
            self.store()

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter(self)`` run ``epoch``."""
        self.next_epoch = int(epoch)

    def __iter__(self) -> Iterator[ShardBatch]:
        epoch = self.next_epoch
        self.next_epoch += 1
        return self.epoch(epoch)

    def epoch(self, epoch: int) -> Iterator[ShardBatch]:
        """The batches of ``epoch`` (0-based), in order.

        Raises:
            RelaError: an unreadable shard or sample met while reading (unless skipped).
        """
        mask = self.sampler.mask(epoch)
        if self.data_path == "memory":
            return self._memory_epoch(epoch, mask)
        return self._stream_epoch(epoch, mask)

    def _batch(self, epoch: int, step: int, images, target, label, index) -> ShardBatch:
        return ShardBatch(
            images,
            target,
            label,
            index,
            epoch,
            step,
            view_seed(self.seed, epoch, step),
            offset=self.rank * self.local_batch_size,
            global_batch_size=self.batch_size,
        )

    def _memory_epoch(self, epoch: int, mask: np.ndarray) -> Iterator[ShardBatch]:
        store = self.store()
        order = epoch_order(store.contents, mask, self.seed, epoch, self.shuffle_buffer)
        rows_of_rank = rank_batches(order, self.batch_size, self.rank, self.world_size, "interleaved")
        batches = torch.from_numpy(np.ascontiguousarray(rows_of_rank)).to(self.device)
        for step, rows in enumerate(batches):
            yield self._batch(epoch, step, store.images[rows], store.targets[rows], store.labels[rows], rows)

    def _stream_epoch(self, epoch: int, mask: np.ndarray) -> Iterator[ShardBatch]:
        if self.world_size > 1:
            return self._planned_stream_epoch(epoch, mask)
        return self._whole_stream_epoch(epoch, mask)

    def _planned_stream_epoch(self, epoch: int, mask: np.ndarray) -> Iterator[ShardBatch]:
        """One rank's ``contiguous`` part of a stream epoch (the class docstring): plan it from the
        manifest, read the shards it covers, check each batch against the plan.

        Raises:
            RelaError: a shard that does not hold what its manifest says, or a sample that does
                not decode (under torchrun a rank cannot skip it: every rank must run the same steps).
        """
        contents = self._planned_contents
        order = epoch_order(contents, mask, self.seed, epoch, self.shuffle_buffer)
        planned = rank_batches(order, self.batch_size, self.rank, self.world_size, "contiguous")
        steps, local = planned.shape
        visit = [(shard_id, int(mask[contents[shard_id]].sum())) for shard_id in shard_visit_order(sorted(contents), self.seed, epoch)]
        url_of = dict(zip(self.source.shard_ids, self.source.shard_urls))
        spans = shard_spans(visit, self.rank * steps * local, (self.rank + 1) * steps * local)
        decoder = _ShardDecoder(
            [(shard_id, url_of[shard_id], lo, hi) for shard_id, lo, hi in spans],
            mask,
            self.target_dim,
            self.image_size,
            self.seed,
            epoch,
            self.shuffle_buffer,
            skip_bad_shards=False,
        )

        def check(step: int, index: torch.Tensor) -> None:  # on the host copy: no device sync
            if step >= steps or not np.array_equal(index.numpy(), planned[step]):
                raise RelaError(
                    f"rank {self.rank}: epoch {epoch} batch {step} holds other samples than planned from the manifest's shard_order "
                    f"(the shards do not hold what the manifest says); verify the set"
                )

        step = 0
        for batch in self._cut(_decode_shards(decoder, self.num_workers, pin_memory=self.device.type == "cuda"), epoch, local, check):
            yield batch
            step += 1
        if step != steps:
            raise RelaError(f"rank {self.rank}: epoch {epoch} gave {step} batches, {steps} planned: a shard holds fewer samples than its manifest says")

    def _whole_stream_epoch(self, epoch: int, mask: np.ndarray) -> Iterator[ShardBatch]:
        ids = self.source.shard_ids
        url_of = dict(zip(ids, self.source.shard_urls))
        visit = [(shard_id, url_of[shard_id]) for shard_id in shard_visit_order(ids, self.seed, epoch)]
        decoder = _ShardDecoder(visit, mask, self.target_dim, self.image_size, self.seed, epoch, self.shuffle_buffer, self.skip_bad_shards)
        yield from self._cut(_decode_shards(decoder, self.num_workers, pin_memory=self.device.type == "cuda"), epoch, self.batch_size)

    def _cut(self, chunks: Iterator[dict[str, Any]], epoch: int, size: int, check: Callable[[int, torch.Tensor], None] | None = None) -> Iterator[ShardBatch]:
        """Cut decoded chunks (in order) into batches of ``size`` on the device; a last
        incomplete batch is dropped. ``check(step, host index tensor)`` sees each batch first."""
        cuda = self.device.type == "cuda"
        held: list[dict[str, torch.Tensor]] = []
        count, step = 0, 0
        for chunk in chunks:
            if not len(chunk["index"]):
                continue
            held.append(chunk)
            count += len(chunk["index"])
            while count >= size:
                parts = {k: torch.cat([c[k] for c in held]) for k in ("images", "target", "label", "index")}
                first = {k: v[:size] for k, v in parts.items()}
                rest = {k: v[size:] for k, v in parts.items()}
                held, count = ([rest] if len(rest["index"]) else []), len(rest["index"])
                if check is not None:
                    check(step, first["index"])
                moved = {k: (v.pin_memory() if cuda else v).to(self.device, non_blocking=True) for k, v in first.items()}
                yield self._batch(epoch, step, moved["images"], moved["target"], moved["label"], moved["index"])
                step += 1
