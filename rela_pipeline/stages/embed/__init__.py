"""Stage one: embed an ImageFolder with a prior model and write a shard set.

Steps (ReLA section 3 and the authors' code, plus subset scores):

1. scan the ImageFolder (sorted relative paths; labels from class folders);
2. embed every image with the prior in eval mode, deterministic preprocessing, batched through a
   DataLoader, under ``torch.inference_mode`` and autocast on CUDA; embeddings go to a float32
   memory-map on disk (host memory does not grow with N); undecodable images are skipped and
   recorded;
3. fit the linear transport (PCA + standardisation; float64 moments read back from the map in
   fixed chunks) and transport every embedding into a target memory-map;
4. score every sample with faiss k-NN in the transported space (``scores.npz``);
5. write WebDataset shards (original image bytes, ``cls``, ``target.npy``, ``json``) and finally
   ``manifest.json`` (atomically), then remove the work directory.

Every finished piece is recorded with its SHA-256 in a journal in ``OUT/.work`` (see
:mod:`.journal`), so after an error, Ctrl-C or ``kill -9`` the run
continues with ``--resume`` and gives the same bytes as an uninterrupted run. Every file is
written under a temporary name or into ``.work`` and renamed when complete; OUT holds a manifest
only once the shard set is complete. One run at a time writes into OUT (a POSIX lock).

Under ``torchrun`` every rank runs :func:`run_embed`: the ranks share the embedding, the targets,
the scoring and the shard writing in units that do not depend on the world size
(:mod:`.plan`), rank 0 fits the transport, holds the lock, writes the
journal and writes the manifest last.

Modules, one concern each: :mod:`.config` (the settings), :mod:`.run` (the run top to bottom),
:mod:`.images` (embedding with the prior), :mod:`.targets` (transporting the embeddings),
:mod:`.writing` (the shards), :mod:`.manifest`, :mod:`.output` (OUT, its lock, the run's
identity), :mod:`.journal` (progress for ``--resume``), :mod:`.plan` (each rank's share),
:mod:`.context` (what every phase is given).
"""

from __future__ import annotations

from ..._lazy import lazy_exports

#: Where each public name lives (imported on first use: reading :class:`EmbedConfig` imports no torch).
_EXPORTS = {
    "EmbedConfig": ".config",
    "RUN_CONTROL_FIELDS": ".config",
    "default_batch_size": ".config",
    "EmbeddingResult": ".images",
    "embed_images": ".images",
    "embedding_dim": ".images",
    "LOCK_NAME": ".output",
    "WORK_DIR_NAME": ".output",
    "identity_settings": ".output",
    "make_output_dir": ".output",
    "manifest_identity": ".output",
    "prepare_output_dir": ".output",
    "run_identity": ".output",
    "run_embed": ".run",
    "REFERENCE_SAMPLES": ".targets",
    "TRANSPORT_CHUNK_ROWS": ".targets",
    "reference_sample_indices": ".targets",
    "transport_rows": ".targets",
    "transport_targets": ".targets",
    "shard_write_order": ".writing",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = [
    "EmbedConfig",
    "EmbeddingResult",
    "LOCK_NAME",
    "REFERENCE_SAMPLES",
    "RUN_CONTROL_FIELDS",
    "TRANSPORT_CHUNK_ROWS",
    "WORK_DIR_NAME",
    "default_batch_size",
    "embed_images",
    "embedding_dim",
    "identity_settings",
    "make_output_dir",
    "manifest_identity",
    "prepare_output_dir",
    "reference_sample_indices",
    "run_embed",
    "run_identity",
    "shard_write_order",
    "transport_rows",
    "transport_targets",
]
