"""The run, top to bottom: open OUT, then embed, transport, targets, scores, shards, manifest;
under torchrun each phase shared by the ranks (:mod:`.plan`)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...distributed import Distribution, collective_failures, init_distribution, quiet_unless_main
from ...errors import RelaError
from ...fileio import create_npy_memmap, exclusive_lock, load_npz, open_npy_memmap, sha256_file, write_json_atomic, write_npz_atomic
from ...priors import load_prior
from ...runtime import resolve_prior_precision
from ...scores import RowScores, ScoreSearch, build_score_search, score_rows
from ...shards.format import EMBEDDINGS_NAME, MANIFEST_NAME, SCORES_NAME, TRANSPORT_NAME
from ...sources import open_image_source
from ...transport import LinearTransport, fit_linear_transport
from .config import EmbedConfig, default_batch_size
from .context import EmbedRun
from .decoding import resolve_decode
from .images import EmbeddingResult, embed_images, embedding_dim
from .journal import EmbedJournal, first_difference
from .manifest import build_manifest
from .output import LOCK_NAME, make_output_dir, open_run, remove_path, run_identity
from .plan import missing_batches, rank_row_range, rank_rows_to_embed
from .targets import TRANSPORT_CHUNK_ROWS, reference_sample_indices, transport_rows
from .writing import write_rows_npy, write_shards

logger = logging.getLogger(__name__)


def run_embed(config: EmbedConfig, on_phase: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run stage one end to end (or continue an interrupted run) and return the manifest.

    Progress is journalled in ``OUT/.work`` (see :mod:`rela_pipeline.stages.embed.journal`); with
    ``config.resume`` every finished piece that still matches its checksum is kept and the rest is
    redone, giving the same bytes as an uninterrupted run.

    Under ``torchrun`` (several processes; see :mod:`rela_pipeline.distributed`) every rank runs
    this function: each embeds its share of the batches into the shared embeddings map, rank 0
    fits the transport, the ranks share the transport, the scoring and the shard writing
    (:mod:`rela_pipeline.stages.embed.plan`), and rank 0 alone holds the lock, writes the journal
    and writes the manifest, last. OUT must be on a filesystem every rank sees.

    Args:
        config: the run's settings.
        on_phase: optional callback receiving a one-line status for each phase (rank 0's).

    Returns:
        The manifest dict (also written to ``OUT/manifest.json``, last and atomically); every rank
        returns it.

    Raises:
        RelaError: any bad input (see :class:`EmbedConfig`, :func:`rela_pipeline.sources.open_image_source`,
            :func:`rela_pipeline.priors.load_prior`, :func:`make_output_dir`,
            :func:`prepare_output_dir`, :func:`open_run`); no decodable image; another ``embed``
            writing into the same OUT (it holds ``OUT/.rela-embed.lock``; the refused run touches
            nothing); an I/O error such as a full disk (the message names the file); under
            torchrun, ranks that disagree on the dataset or the prior, or a lost rank. On these, on
            ``KeyboardInterrupt`` and on any other error no manifest is written, partial files are
            removed, and the finished work stays in OUT for ``--resume``.
    """
    say = on_phase or logger.info
    config.validate()
    distribution, device = init_distribution(config.device, config.dist_timeout_s, config.dist_wait_timeout_s)
    try:
        with quiet_unless_main(distribution), collective_failures(distribution):
            return _run_embed(config, distribution, device, lambda message: say(message) if distribution.is_main else None)
    finally:
        distribution.close()


def _run_embed(config: EmbedConfig, distribution: Distribution, device: torch.device, say: Callable[[str], None]) -> dict[str, Any]:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    out_dir = Path(config.out_dir)
    if distribution.enabled:
        config = dataclasses.replace(config, progress=config.progress and distribution.is_main)
    index = open_image_source(config.data_dir, config.label_field)
    timings["scan"] = time.perf_counter() - t0
    say(
        f"found {len(index.files)} images in {len(index.class_names) or 'no'} classes in {index.location}"
        + (f"; {distribution.world_size} ranks ({distribution.backend})" if distribution.enabled else "")
    )

    t = time.perf_counter()
    prior = load_prior(config.prior, seed=config.seed, image_size=config.image_size)
    if config.batch_size is None:  # resolved here so the manifest records the size used
        config = dataclasses.replace(config, batch_size=default_batch_size(device))
    timings["load_prior"] = time.perf_counter() - t
    precision, decode = resolve_prior_precision(config.precision, device), resolve_decode(config.decode, device)
    say(
        f"prior {config.prior} on {device}, input {prior.preprocessing.crop_size} px, {precision.name}, "
        f"decoding on the {'device' if decode == 'gpu' else 'CPU'}"
    )

    run = EmbedRun(config, index, prior, device, precision, decode, distribution, out_dir, timings, say)
    identity = run_identity(config, index, prior, run.resolved)
    if distribution.enabled:  # every rank must see the same images and build the same prior
        values = distribution.gather(json.dumps(identity, sort_keys=True))
        other = next((v for v in values if v != values[0]), None)
        if other is not None:
            difference = first_difference(json.loads(values[0]), json.loads(other))
            raise RelaError(f"the ranks disagree on the dataset, the prior or the settings ({difference}): every rank must see the same DATA and OUT")
    with contextlib.ExitStack() as stack:

        def open_on_main() -> dict[str, Any] | None:
            make_output_dir(out_dir)
            stack.enter_context(exclusive_lock(out_dir / LOCK_NAME, f"embed into {out_dir}"))
            opened = open_run(config, out_dir, identity, say)
            if isinstance(opened, EmbedJournal):
                run.journal = opened
                return None
            say(f"{out_dir} already holds this shard set, complete; nothing to resume")
            return opened

        complete = distribution.on_main(open_on_main)
        if complete is not None:
            return complete
        try:
            manifest = _run_stages(run)
            if distribution.is_main:
                timings["total"] = time.perf_counter() - t0
                manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
                write_json_atomic(out_dir / MANIFEST_NAME, manifest)
        except OSError as error:
            where = f": {error.filename}" if error.filename else ""
            raise RelaError(
                f"I/O error ({error.strerror or error}{where}); no manifest written, finished work kept in {out_dir}: "
                "fix the cause (e.g. free disk space) and rerun with --resume"
            ) from None
        distribution.barrier()  # no rank is still reading OUT/.work
        if distribution.is_main:
            remove_path(run.work)
        return distribution.broadcast(manifest if distribution.is_main else None)


def _phase_done(journal: EmbedJournal, phase: str, path: Path) -> bool:
    """Whether a finished ``phase``'s file still has the journal's SHA-256."""
    expected = journal.phase_sha256(phase)
    return expected is not None and path.is_file() and sha256_file(path) == expected


def _shared_phase(
    run: EmbedRun,
    phase: str,
    path: Path,
    *,
    prepare: Callable[[], None] = lambda: None,
    work: Callable[[], None] = lambda: None,
    finish: Callable[[], dict[str, Any] | None] = lambda: None,
) -> bool:
    """Keep a finished ``phase`` whose file ``path`` still has the journal's SHA-256, or redo it:
    rank 0 drops every later phase and runs ``prepare`` (e.g. creates the shared output), every
    rank runs ``work`` (its share), then rank 0 runs ``finish`` (which may return JSON-ready info
    on how the phase ran) and records the file's SHA-256. Returns True when kept."""

    def decide() -> bool:
        if _phase_done(run.journal, phase, path):
            return True
        run.journal.invalidate_after(phase)
        prepare()
        return False

    if run.distribution.on_main(decide):
        return True
    work()
    run.distribution.barrier()

    def record() -> None:
        info = finish()  # may write the file
        run.journal.record_phase(phase, sha256_file(path), info)

    run.distribution.on_main(record)
    return False


def _rows_sha256(array: np.ndarray, start: int, stop: int) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(array[start:stop])).cast("B")).hexdigest()


def _embedding_to_do(run: EmbedRun, path: Path, shape: tuple[int, int]) -> list[tuple[int, int]]:
    """On rank 0: fold in the ranks' records, check the finished row ranges against their checksums
    (dropping those that no longer match), create the embeddings map if there is none, and when
    rows are left to embed drop every later phase; return the finished ranges."""
    done = _verified_embedding(run, path, shape)
    if len(missing_batches(shape[0], run.config.batch_size, done)):
        run.journal.invalidate_after("embed")
        run.journal.save()
    return done


def _verified_embedding(run: EmbedRun, path: Path, shape: tuple[int, int]) -> list[tuple[int, int]]:
    journal = run.journal
    journal.absorb_rank_progress()
    chunks = journal.embedded_chunks
    embeddings = open_npy_memmap(path, np.float32, shape) if chunks else None
    if embeddings is None:
        if chunks:
            run.say(f"{path} is missing or malformed: embedding every image again")
            journal.keep_embedded([])
            journal.save()
        create_npy_memmap(path, np.float32, shape)
        return []
    good = [chunk for chunk in chunks if _rows_sha256(embeddings, chunk[0], chunk[1]) == chunk[2]]
    if len(good) < len(chunks):
        run.say(f"{len(chunks) - len(good)} embedded row ranges do not match their checksums: embedding them again")
        journal.keep_embedded(good)
        journal.save()
    run.say(f"resuming: {sum(b - a for a, b, _ in good)} of {shape[0]} images already embedded (checksums match)")
    return [(a, b) for a, b, _ in good]


def _embed_phase(run: EmbedRun) -> tuple[np.ndarray, dict[int, str], EmbeddingResult | None, bool]:
    """Embed every image not yet embedded, each rank its share of the missing batches; return the
    embeddings map (read-only), the failed rows, the run's throughput (None when nothing was
    embedded) and whether finished embeddings were found (a resumed run)."""
    config, distribution = run.config, run.distribution
    run.prior.model.to(run.device)
    shape = (len(run.index.files), embedding_dim(run.prior, run.device))
    path = run.work / EMBEDDINGS_NAME
    done = distribution.on_main(lambda: _embedding_to_do(run, path, shape))
    mine = rank_rows_to_embed(shape[0], config.batch_size, done, distribution.rank, distribution.world_size)
    images, seconds, decoded_by = 0, 0.0, collections.Counter()
    if mine:
        embeddings = open_npy_memmap(path, np.float32, shape, mode="r+")
        recorder = run.recorder()
        for start, stop in mine:
            result = embed_images(
                run.index,
                run.prior,
                embeddings,
                start_row=start,
                stop_row=stop,
                batch_size=config.batch_size,
                num_workers=config.num_workers,
                device=run.device,
                precision=run.precision,
                decode=run.decode,
                progress=config.progress,
                checkpoint_seconds=config.checkpoint_seconds,
                on_checkpoint=lambda a, b, failed: recorder.record_embedded(a, b, _rows_sha256(embeddings, a, b), failed),
            )
            images, seconds = images + result.images, seconds + result.seconds
            decoded_by.update(result.decoded_by or {})
        embeddings.flush()
        del embeddings  # closed before the barrier, so every rank's rows are on disk for the next phases
    counts = distribution.gather((images, seconds, dict(decoded_by)))
    images, seconds = sum(c[0] for c in counts), max(c[1] for c in counts)
    decoded_by = sum((collections.Counter(c[2]) for c in counts), collections.Counter())

    def finished() -> dict[int, str]:
        run.journal.absorb_rank_progress()
        missing = missing_batches(shape[0], config.batch_size, [(a, b) for a, b, _ in run.journal.embedded_chunks])
        if len(missing):  # every rank finished its share, so this is a bug, not bad input
            raise RelaError(f"{len(missing)} batches (first rows {int(missing[0]) * config.batch_size}..) were embedded by no rank; rerun with --resume")
        return run.journal.embed_failures

    failures = distribution.on_main(finished)
    result = None
    if images:
        result = EmbeddingResult({}, images, seconds, {k: decoded_by[k] for k in ("device", "cpu", "failed")} if run.decode == "gpu" else None)
        run.timings["embed"] = seconds
        run.say(
            f"embedded {images} images in {seconds:.1f}s ({result.images_per_second:.0f} img/s"
            + (f" over {distribution.world_size} ranks)" if distribution.enabled else ")")
        )
    return open_npy_memmap(path, np.float32, shape, mode="r"), failures, result, bool(done)


def _run_stages(run: EmbedRun) -> dict[str, Any]:
    config, index, distribution = run.config, run.index, run.distribution
    embeddings, failures, result, resumed = _embed_phase(run)
    ok = np.ones(len(index.files), dtype=bool)
    ok[list(failures)] = False
    kept = np.flatnonzero(ok)
    if len(kept) < 2:
        raise RelaError(
            f"only {len(kept)} of {len(index.files)} images could be decoded; nothing to transport (first failure: {next(iter(failures.values()), '-')})"
        )

    t = time.perf_counter()
    transport_path, targets_path = run.out_dir / TRANSPORT_NAME, run.work / "targets.npy"
    reference = reference_sample_indices(len(kept))

    def fit_transport() -> None:  # rank 0, from the map in its fixed chunk order: the same for any world size
        fitted = fit_linear_transport(embeddings, ok, run.device)
        fitted.save(transport_path, reference=(reference, np.asarray(embeddings[kept[reference]])))

    _shared_phase(run, "transport", transport_path, prepare=fit_transport)
    transport = LinearTransport.load(transport_path)
    targets_shape = (len(kept), transport.output_dim)

    def transport_share() -> None:
        targets = open_npy_memmap(targets_path, config.target_dtype, targets_shape, mode="r+")
        start, stop = rank_row_range(len(kept), TRANSPORT_CHUNK_ROWS, distribution.rank, distribution.world_size)
        transport_rows(embeddings, kept, transport, targets, run.device, start, stop)
        targets.flush()

    _shared_phase(
        run, "targets", targets_path, prepare=lambda: create_npy_memmap(targets_path, config.target_dtype, targets_shape).flush(), work=transport_share
    )
    targets = open_npy_memmap(targets_path, config.target_dtype, targets_shape, mode="r")
    if targets is None:
        raise RelaError(f"{targets_path} does not hold ({targets_shape[0]}, {targets_shape[1]}) {config.target_dtype} targets; start over with --overwrite")
    run.timings["transport"] = time.perf_counter() - t

    t = time.perf_counter()
    scores_path = run.out_dir / SCORES_NAME
    labels = index.labels[kept] if index.labels is not None else None
    _score_phase(run, targets, labels, scores_path)
    scores = load_npz(scores_path)
    run.timings["scores"] = time.perf_counter() - t
    score_dims = min(config.score_dims, transport.output_dim) if config.score_dims else transport.output_dim
    score_k = min(config.score_k, len(kept) - 1)
    scores_info = distribution.on_main(lambda: run.journal.phase_info("scores") or {})  # the search (index, recall) and where it ran
    search = scores_info.get("search", {"kind": "exact"})
    recall = f", recall@{score_k} {search['recall_at_k']:.3f}" if "recall_at_k" in search else ""
    run.say(f"transport: {transport.input_dim} -> {transport.output_dim} dims; scores with k={score_k} on {score_dims} dims ({search['kind']} search{recall})")

    t = time.perf_counter()
    shards, shards_reused = write_shards(run, kept, targets, scores, labels)
    if config.keep_embeddings and distribution.is_main:
        write_rows_npy(embeddings, kept, run.out_dir / EMBEDDINGS_NAME)
    run.timings["write_shards"] = time.perf_counter() - t
    run.say(f"wrote {len(shards)} shards ({sum(s.bytes for s in shards) / 1e6:.1f} MB) to {run.out_dir}")
    if not distribution.is_main:
        return {}
    run_record = {"resumed": resumed, "images_embedded": result.images if result else 0, "shards_reused": shards_reused, "world_size": distribution.world_size}
    files = {TRANSPORT_NAME: run.journal.phase_sha256("transport"), SCORES_NAME: run.journal.phase_sha256("scores")}
    manifest = build_manifest(
        run,
        result=result,
        failures=failures,
        kept=kept,
        transport=transport,
        reference_samples=len(reference),
        score_k=score_k,
        score_dims=score_dims,
        labels=labels,
        shards=shards,
        files=files,
        run_record=run_record,
    )
    manifest["scores"].update(scores_info)
    return manifest


#: The score index rank 0 builds and the other ranks load (``OUT/.work``; with a ``.json`` description).
SCORE_INDEX_NAME = "score-index.faiss"


def _score_phase(run: EmbedRun, targets: np.ndarray, labels: np.ndarray | None, scores_path: Path) -> None:
    """Score every sample: rank 0 builds (and tunes) the index, every rank searches its share of
    the query blocks, rank 0 assembles ``scores.npz``."""
    config, distribution = run.config, run.distribution
    index_path = run.work / SCORE_INDEX_NAME
    held: dict[str, Any] = {}

    def build() -> None:
        held["search"] = build_score_search(targets, k=config.score_k, dims=config.score_dims, gpu_id=run.gpu_id, index=config.score_index, seed=config.seed)
        if distribution.enabled:
            held["search"].save(index_path)

    def search_share() -> None:
        search = held.get("search") or ScoreSearch.load(index_path, run.gpu_id)
        start, stop = rank_row_range(len(targets), search.rows_per_call, distribution.rank, distribution.world_size)
        part = score_rows(search, targets, start, stop)
        held["kind"], held["device"] = search.kind, search.device
        if distribution.enabled:
            write_npz_atomic(
                run.work / f"scores-rank-{distribution.rank}.npz",
                {
                    "rows": np.array([part.start, part.stop, part.searched_exactly], dtype=np.int64),
                    "knn_density": part.knn_density,
                    "nn_similarity": part.nn_similarity,
                    "nn_index": part.nn_index,
                },
            )
        else:
            held["parts"] = [part]

    def assemble() -> dict[str, Any]:
        search = held["search"]
        if distribution.enabled:
            parts = []
            for rank in range(distribution.world_size):
                saved = load_npz(run.work / f"scores-rank-{rank}.npz")
                start, stop, exact = (int(v) for v in saved["rows"])
                parts.append(RowScores(start, stop, saved["knn_density"], saved["nn_similarity"], saved["nn_index"], exact))
        else:
            parts = held["parts"]
        n = len(targets)
        if [(p.start, p.stop) for p in parts] != [rank_row_range(n, search.rows_per_call, r, distribution.world_size) for r in range(distribution.world_size)]:
            raise RelaError("the ranks' score parts do not cover every sample once; rerun with --resume")
        write_npz_atomic(
            scores_path,
            {
                "knn_density": np.concatenate([p.knn_density for p in parts]),
                "nn_similarity": np.concatenate([p.nn_similarity for p in parts]),
                "nn_index": np.concatenate([p.nn_index for p in parts]),
                "label": labels if labels is not None else np.full(n, -1, dtype=np.int64),
            },
        )
        for stale in [index_path, index_path.with_name(index_path.name + ".json"), *run.work.glob("scores-rank-*.npz")]:
            stale.unlink(missing_ok=True)
        settings = dict(search.settings)
        if search.kind != "exact":
            settings["searched_exactly"] = sum(p.searched_exactly for p in parts)
        return {"search": settings, "device": search.device}

    _shared_phase(run, "scores", scores_path, prepare=build, work=search_share, finish=assemble)
