"""The output directory: its lock, what a new, overwritten or resumed run finds there, and the
run's identity."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ... import __version__
from ...errors import RelaError
from ...fileio import PARTIAL_SUFFIX
from ...priors import Prior
from ...shards.format import EMBEDDINGS_NAME, MANIFEST_NAME, SCORES_NAME, SHARD_GLOB, TRANSPORT_NAME
from ...shards.manifest import read_manifest
from ...sources import ImageSource
from .config import RUN_CONTROL_FIELDS, EmbedConfig
from .journal import EmbedJournal, first_difference, journal_path

WORK_DIR_NAME = ".work"


_OWNED_NAMES = {MANIFEST_NAME, TRANSPORT_NAME, SCORES_NAME, EMBEDDINGS_NAME, WORK_DIR_NAME}


#: Lock file held in OUT while a run writes there (see :func:`rela_pipeline.fileio.exclusive_lock`).
LOCK_NAME = ".rela-embed.lock"


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0], "rela-pipeline": __version__}
    for name in ("torch", "torchvision", "open_clip_torch", "webdataset", "numpy", "pillow", "faiss-gpu", "faiss-cpu"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def make_output_dir(out_dir: Path) -> None:
    """Create ``out_dir`` (and its parents) if missing.

    Raises:
        RelaError: ``out_dir`` exists and is not a directory.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise RelaError(f"output path exists and is not a directory: {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)


def _is_owned(name: str) -> bool:
    return name in _OWNED_NAMES or Path(name).match(SHARD_GLOB) or name.endswith(PARTIAL_SUFFIX)


def prepare_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Check that the existing directory ``out_dir`` is empty, or clear a previous shard set (or
    interrupted run) from it.

    The run's lock file (:data:`LOCK_NAME`) does not count and is never removed.

    Raises:
        RelaError: it is non-empty and ``overwrite`` is False (the message says whether it holds an
            interrupted run, which ``--resume`` continues); or, with ``overwrite``, it holds files
            rela-pipeline did not write (never deleted).
    """
    entries = sorted(e for e in os.listdir(out_dir) if e != LOCK_NAME)
    if not entries:
        return
    if not overwrite:
        if WORK_DIR_NAME in entries and MANIFEST_NAME not in entries:
            raise RelaError(f"output directory {out_dir} holds an interrupted embed run; pass --resume to continue it, or --overwrite to start over")
        raise RelaError(f"output directory {out_dir} is not empty; pass --overwrite to replace the shard set in it")
    foreign = [e for e in entries if not _is_owned(e)]
    if foreign:
        raise RelaError(f"--overwrite refused: {out_dir} holds files rela-pipeline did not write (e.g. {foreign[0]})")
    # The manifest goes first: from here on the directory no longer claims to be complete.
    for name in [MANIFEST_NAME] + [e for e in entries if e != MANIFEST_NAME]:
        remove_path(out_dir / name)


def remove_path(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def identity_settings(config: EmbedConfig) -> dict[str, Any]:
    """The settings that decide a shard set's bytes, JSON-ready: every :class:`EmbedConfig` field
    except the run-control ones (:data:`RUN_CONTROL_FIELDS`). Recorded as the manifest's ``settings``."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items() if k not in RUN_CONTROL_FIELDS}


def run_identity(config: EmbedConfig, index: ImageSource, prior: Prior, resolved: dict[str, str]) -> dict[str, Any]:
    """What must match for ``--resume`` to continue a run, or for two runs to give the same bytes:
    identity settings, what ``auto`` resolved to (``resolved``: the device type, the prior's
    precision and where images are decoded, so a resume never mixes rows computed differently),
    dataset fingerprint, prior spec and weights provenance, software versions."""
    identity = {
        "settings": identity_settings(config),
        "resolved": dict(resolved),
        "dataset": index.fingerprint(),
        "prior": {"spec": prior.spec, "weights": prior.weights},
        "software": package_versions(),
    }
    return json.loads(json.dumps(identity))  # tuples -> lists, as read back from JSON


def manifest_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """The :func:`run_identity` of the run that wrote ``manifest``."""
    return {
        "settings": manifest.get("settings"),
        "resolved": manifest.get("resolved"),
        "dataset": manifest["dataset"]["fingerprint"],
        "prior": {"spec": manifest["prior"]["spec"], "weights": manifest["prior"]["weights"]},
        "software": manifest["software"],
    }


def open_run(config: EmbedConfig, out_dir: Path, identity: dict[str, Any], say: Callable[[str], None]) -> EmbedJournal | dict[str, Any]:
    """Decide how the run starts in ``out_dir`` (locked): a new journal, the interrupted run's
    journal (``--resume``), or, for ``--resume`` on a complete set with this identity, its manifest.

    Raises:
        RelaError: see :func:`prepare_output_dir`; a resume whose identity differs (naming the first
            difference); an unreadable journal.
    """
    work = out_dir / WORK_DIR_NAME
    if config.resume:
        if (out_dir / MANIFEST_NAME).is_file():
            manifest = read_manifest(out_dir)
            difference = first_difference(manifest_identity(manifest), identity)
            if difference:
                raise RelaError(f"--resume refused: {out_dir} holds a complete shard set made differently ({difference}); use --overwrite to replace it")
            remove_path(work)  # left by a run killed between writing its manifest and cleaning up
            return manifest
        journal = EmbedJournal.load(journal_path(work))
        if journal is not None:
            difference = first_difference(journal.identity, identity)
            if difference:
                raise RelaError(
                    f"--resume refused: the interrupted run in {out_dir} was started differently ({difference}); rerun it as it was, or use --overwrite"
                )
            for partial in out_dir.glob("*" + PARTIAL_SUFFIX):
                partial.unlink()
            return journal
        if any(e != LOCK_NAME for e in os.listdir(out_dir)):
            say(f"no progress journal in {out_dir}: nothing can be resumed, starting over")
        prepare_output_dir(out_dir, overwrite=True)
    else:
        prepare_output_dir(out_dir, config.overwrite)
    work.mkdir()
    journal = EmbedJournal(journal_path(work), identity)
    journal.save()
    return journal
