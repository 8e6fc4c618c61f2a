"""The progress journal of an ``embed`` run, which ``embed --resume`` continues from.

A run keeps its progress in ``OUT/.work/journal.json``, rewritten atomically (write, fsync,
rename) after each unit of finished work. Every unit is recorded with a SHA-256 of its bytes, so
a resumed run keeps only what still hashes to the journal and redoes the rest:

==============  =====================================================================  ===========================
phase           recorded when finished                                                 file
==============  =====================================================================  ===========================
``embed``       rows ``[start, stop)`` of the embeddings, every ``checkpoint_seconds``  ``.work/embeddings.npy``
                (hash of those rows' bytes), and the rows that failed to decode
``transport``   the fitted transport                                                   ``OUT/transport.npz``
``targets``     every transported target                                               ``.work/targets.npy``
``scores``      the k-NN scores                                                        ``OUT/scores.npz``
``shards``      each shard, with its sample count                                      ``OUT/shard-NNNNNN.tar``
==============  =====================================================================  ===========================

Under torchrun every rank embeds (and writes shards) at once. Rank 0 alone writes the journal;
rank r > 0 records its finished rows and shards in ``OUT/.work/rank-R.json`` (:class:`RankProgress`),
which rank 0 folds into the journal when the phase ends, and at the start of a resumed run, whatever
the world size (:meth:`EmbedJournal.absorb_rank_progress`). Embedded row ranges are units of the
fixed batch grid, so a run resumed with another world size keeps every finished range; shards
written in parts by W ranks (``.work/shards-W-R/``) are kept by a resume with the same W only.

Phases run in this order and each depends only on the ones before it, so a phase that is redone
drops the record of every later phase (:meth:`EmbedJournal.invalidate_after`). The journal also
holds the run's *identity* (settings that decide the output's bytes, the dataset fingerprint, the
prior and the software versions); a resume with another identity is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ...errors import RelaError
from ...fileio import write_json_atomic

JOURNAL_NAME = "journal.json"
JOURNAL_VERSION = 1
#: Phases in run order (see the module docstring).
PHASES = ("embed", "transport", "targets", "scores", "shards")


def first_difference(expected: Any, actual: Any, path: str = "") -> str | None:
    """The first place where two JSON-like values differ, as ``"a.b: <expected> -> <actual>"``,
    or None when they are equal. Keys are visited in ``actual``'s order, then those only in
    ``expected``."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in list(actual) + [k for k in expected if k not in actual]:
            where = f"{path}.{key}" if path else str(key)
            if key not in expected or key not in actual:
                return f"{where}: {expected.get(key, '(absent)')!r} -> {actual.get(key, '(absent)')!r}"
            found = first_difference(expected[key], actual[key], where)
            if found:
                return found
        return None
    return None if expected == actual else f"{path or 'value'}: {expected!r} -> {actual!r}"


class EmbedJournal:
    """Progress of one ``embed`` run (see the module docstring).

    Attributes:
        path: ``OUT/.work/journal.json``.
        identity: JSON-ready dict fixing the output's bytes.
        state: ``{"embed": {"chunks": [[start, stop, sha256], ...], "failures": {row: reason}},
            "transport" | "targets" | "scores": {"sha256": hex, "info": {...}?} or absent,
            "shards": [shard dicts]}``.
    """

    def __init__(self, path: Path, identity: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.identity = identity
        self.state = state or {"embed": {"chunks": [], "failures": {}}, "shards": []}

    @classmethod
    def load(cls, path: Path) -> EmbedJournal | None:
        """Read a journal; None when there is none.

        Raises:
            RelaError: the file exists but is not a journal this version wrote.
        """
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if record["version"] != JOURNAL_VERSION:
                raise ValueError(f"version {record['version']!r}")
            return cls(path, record["identity"], record["state"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RelaError(f"cannot read the progress journal {path} ({error}); start over with --overwrite") from None

    def save(self) -> None:
        """Write the journal atomically (``OSError`` on a write error; the previous one then stays)."""
        write_json_atomic(self.path, {"version": JOURNAL_VERSION, "identity": self.identity, "state": self.state})

    # -- the embedding phase ----------------------------------------------------------------
    @property
    def embedded_chunks(self) -> list[tuple[int, int, str]]:
        """Finished row ranges ``(start, stop, sha256 of the rows' float32 bytes)``, in order."""
        return [(int(a), int(b), str(h)) for a, b, h in self.state["embed"]["chunks"]]

    @property
    def embed_failures(self) -> dict[int, str]:
        """``{row: reason}`` for the rows of finished chunks that could not be embedded."""
        return {int(row): reason for row, reason in self.state["embed"]["failures"].items()}

    def record_embedded(self, start: int, stop: int, sha256: str, failures: dict[int, str]) -> None:
        """Record rows ``[start, stop)`` as embedded (``failures``: those rows that were not) and save."""
        _add_chunk(self.state["embed"], start, stop, sha256, failures)
        self.save()

    def keep_embedded(self, chunks: list[tuple[int, int, str]]) -> None:
        """Keep only these finished chunks (and the failures inside them); drop later phases. Does not save."""
        inside = lambda row: any(a <= row < b for a, b, _ in chunks)  # noqa: E731
        self.state["embed"] = {
            "chunks": [[int(a), int(b), sha] for a, b, sha in chunks],
            "failures": {row: reason for row, reason in self.state["embed"]["failures"].items() if inside(int(row))},
        }
        self.invalidate_after("embed")

    def absorb_rank_progress(self) -> int:
        """Fold every ``rank-R.json`` next to the journal (:class:`RankProgress`) into it: their
        embedded chunks (kept in row order) and failures, and their shard parts; delete them and
        save. Returns how many files were folded in.

        Raises:
            RelaError: a file that is not a rank's progress record.
        """
        paths = sorted(self.path.parent.glob(RANK_PROGRESS_GLOB))
        for path in paths:
            progress = RankProgress.load(path)
            self.state["embed"]["chunks"].extend(progress.state["embed"]["chunks"])
            self.state["embed"]["failures"].update(progress.state["embed"]["failures"])
            if progress.state.get("shard_part") is not None:
                parts = self.state.setdefault("shard_parts", {"world_size": progress.state["world_size"], "parts": {}})
                if parts["world_size"] == progress.state["world_size"]:
                    parts["parts"][str(progress.rank)] = progress.state["shard_part"]
        self.state["embed"]["chunks"].sort(key=lambda chunk: int(chunk[0]))
        self.save()
        for path in paths:
            path.unlink()
        return len(paths)

    # -- shards written in parts by several ranks ----------------------------------------------
    def shard_parts(self, world_size: int) -> dict[int, list[dict[str, Any]]]:
        """Finished shards of each rank's part, ``{rank: [shard dicts]}``, when the parts were
        written by a run of ``world_size`` ranks; ``{}`` otherwise."""
        parts = self.state.get("shard_parts")
        if not parts or parts["world_size"] != world_size:
            return {}
        return {int(rank): list(shards) for rank, shards in parts["parts"].items()}

    def record_shard_part(self, rank: int, world_size: int, shards: list[dict[str, Any]]) -> None:
        """Record rank ``rank``'s finished part shards (rank 0's own, or a folded-in rank's) and save."""
        parts = self.state.get("shard_parts")
        if not parts or parts["world_size"] != world_size:
            parts = self.state["shard_parts"] = {"world_size": world_size, "parts": {}}
        parts["parts"][str(rank)] = list(shards)
        self.save()

    def drop_shard_parts(self) -> None:
        """Forget the part shards (they have been published, or another world size writes them). Does not save."""
        self.state.pop("shard_parts", None)

    # -- later phases -------------------------------------------------------------------------
    def phase_sha256(self, phase: str) -> str | None:
        """The recorded SHA-256 of a finished ``transport``, ``targets`` or ``scores`` phase."""
        record = self.state.get(phase)
        return record["sha256"] if record else None

    def record_phase(self, phase: str, sha256: str, info: dict[str, Any] | None = None) -> None:
        """Record ``phase`` as finished with its file's SHA-256 (and JSON-ready ``info`` about how
        it was computed, e.g. the scores' search) and save."""
        self.state[phase] = {"sha256": sha256, **({"info": info} if info else {})}
        self.save()

    def phase_info(self, phase: str) -> dict[str, Any] | None:
        """The ``info`` recorded with a finished phase, or None."""
        record = self.state.get(phase)
        return record.get("info") if record else None

    @property
    def shards(self) -> list[dict[str, Any]]:
        """Finished shards ``{"name", "samples", "bytes", "sha256"}`` in write order."""
        return list(self.state["shards"])

    def record_shards(self, shards: list[dict[str, Any]]) -> None:
        """Replace the list of finished shards and save."""
        self.state["shards"] = list(shards)
        self.save()

    def invalidate_after(self, phase: str) -> None:
        """Forget every phase after ``phase`` (it is being redone). Does not save."""
        for later in PHASES[PHASES.index(phase) + 1 :]:
            if later == "shards":
                self.state["shards"] = []
                self.drop_shard_parts()
            else:
                self.state.pop(later, None)


def _add_chunk(embed_state: dict[str, Any], start: int, stop: int, sha256: str, failures: dict[int, str]) -> None:
    """Append a finished row range and its failed rows to an ``embed`` state (journal or rank record)."""
    embed_state["chunks"].append([int(start), int(stop), sha256])
    embed_state["failures"].update({str(row): reason for row, reason in failures.items()})


#: Progress files of ranks other than 0, next to the journal.
RANK_PROGRESS_GLOB = "rank-*.json"


class RankProgress:
    """What rank ``rank`` (> 0) of a torchrun job has finished, in ``OUT/.work/rank-R.json``
    (rewritten atomically after each record; folded into the journal by rank 0).

    Attributes:
        state: ``{"world_size": W, "embed": {"chunks": [...], "failures": {...}},
            "shard_part": [shard dicts] or None}`` (chunks as in :class:`EmbedJournal`).
    """

    def __init__(self, path: Path, rank: int, world_size: int, state: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.rank = rank
        self.state = state or {"world_size": world_size, "embed": {"chunks": [], "failures": {}}, "shard_part": None}

    @classmethod
    def at(cls, work_dir: Path, rank: int, world_size: int) -> RankProgress:
        """A new, empty record for ``rank`` in ``work_dir`` (written on its first record)."""
        return cls(Path(work_dir) / f"rank-{rank}.json", rank, world_size)

    @classmethod
    def load(cls, path: Path) -> RankProgress:
        """Read a rank's record.

        Raises:
            RelaError: it is not one.
        """
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            return cls(path, int(record["rank"]), int(record["state"]["world_size"]), record["state"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RelaError(f"cannot read the rank progress record {path} ({error}); start over with --overwrite") from None

    def save(self) -> None:
        """Write the record atomically."""
        write_json_atomic(self.path, {"version": JOURNAL_VERSION, "rank": self.rank, "state": self.state})

    def record_embedded(self, start: int, stop: int, sha256: str, failures: dict[int, str]) -> None:
        """As :meth:`EmbedJournal.record_embedded`."""
        _add_chunk(self.state["embed"], start, stop, sha256, failures)
        self.save()

    def record_shard_part(self, rank: int, world_size: int, shards: list[dict[str, Any]]) -> None:
        """As :meth:`EmbedJournal.record_shard_part` (for this rank)."""
        self.state["shard_part"] = list(shards)
        self.save()


def journal_path(work_dir: str | os.PathLike) -> Path:
    """``WORK/journal.json``."""
    return Path(work_dir) / JOURNAL_NAME
