"""The shard-set manifest: reading, validating, verifying and summarising.

``manifest.json`` is the contract between the producing and the receiving team. It is written
last and atomically by ``embed``; its presence marks a complete run. Fields (schema version 1):

* ``schema``, ``schema_version``, ``created_at`` (UTC ISO 8601)
* ``prior``: spec, weights provenance (source, path, sha256), embedding_dim, preprocessing
* ``transport``: file, sha256, input_dim, output_dim, explained_variance_ratio (first 16), num_samples
* ``targets``: field, dtype, dim
* ``scores``: file, sha256, k, dims, device, fields
* ``dataset``: root, fingerprint (file_count, total_bytes, paths_sha256), class_names, labelled
* ``samples``: scanned, written, skipped, per_class
* ``skipped`` / ``ignored``: ``[{"path", "reason"}]``
* ``shards``: ``[{"name", "samples", "bytes", "sha256"}]``
* ``settings`` (those that decide the bytes), ``software`` (package versions)
* ``run`` (out_dir, num_workers, checkpoint_seconds, resumed, images_embedded, shards_reused: what
  this invocation did), ``host``, ``timings_s``, ``throughput``

Two runs with the same data, prior, seed, settings and software write byte-identical files and
manifests that differ only in :data:`VARYING_FIELDS`.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RelaError
from ..fileio import HashingFile, load_npz, sha256_file
from .format import MANIFEST_NAME, SCHEMA, SCHEMA_VERSION, TARGET_FIELD

#: Top-level fields every manifest of this schema version must have.
REQUIRED_FIELDS = (
    "schema", "schema_version", "created_at", "prior", "transport", "targets", "scores",
    "dataset", "samples", "skipped", "shards", "software", "timings_s",
)


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``OUT/manifest.json``.

    Raises:
        RelaError: OUT or the manifest missing (an incomplete run), unreadable JSON, another schema,
            an incompatible schema version, or missing required fields.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise RelaError(f"shard set directory not found: {out_dir}")
    path = out / MANIFEST_NAME
    if not path.is_file():
        raise RelaError(f"{out_dir} has no {MANIFEST_NAME}: not a shard set, or an incomplete embed run")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RelaError(f"cannot read {path}: {error}") from None
    return parse_manifest(text, str(path))


def parse_manifest(text: str, where: str) -> dict[str, Any]:
    """Parse and validate a manifest's JSON text; ``where`` names it in error messages.

    Raises:
        RelaError: malformed JSON, another schema, an incompatible schema version, or missing
            required fields.
    """
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise RelaError(f"cannot read {where}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise RelaError(f"{where} is not a rela-pipeline shard-set manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise RelaError(f"{where} has schema_version {manifest.get('schema_version')!r}; this version of rela-pipeline reads {SCHEMA_VERSION}")
    missing = [name for name in REQUIRED_FIELDS if name not in manifest]
    if missing:
        raise RelaError(f"{where} lacks required fields: {', '.join(missing)}")
    return manifest


#: Top-level manifest fields that differ between runs that wrote the same bytes: when and where the
#: run happened and how long it took (:func:`reproducible_part` drops them).
VARYING_FIELDS = ("created_at", "run", "host", "timings_s", "throughput")
#: Nested fields that name where the inputs were read from; equal on one machine, not across them.
INPUT_PATH_FIELDS = (("dataset", "root"), ("settings", "data_dir"), ("prior", "weights", "path"))


def reproducible_part(manifest: dict[str, Any], *, ignore_input_paths: bool = False) -> dict[str, Any]:
    """The manifest without :data:`VARYING_FIELDS` (and, with ``ignore_input_paths``, without
    :data:`INPUT_PATH_FIELDS`): equal for runs that wrote the same bytes."""
    part = json.loads(json.dumps({key: value for key, value in manifest.items() if key not in VARYING_FIELDS}))
    if ignore_input_paths:
        for *parents, name in INPUT_PATH_FIELDS:
            record = part
            for parent in parents:
                record = record.get(parent) if isinstance(record, dict) else None
            if isinstance(record, dict):
                record.pop(name, None)
    return part


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_shard_set`: ``problems`` is empty when everything checks out."""

    checked_files: int = 0
    checked_samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _scan_shard(path: Path, target_dim: int, target_dtype: str, problems: list[str]) -> tuple[int, str]:
    """Read a shard once: count its samples with ``tarfile``, check each target's shape and dtype,
    and hash the file in the same pass. Returns ``(samples, hex sha256)``.

    Raises:
        tarfile.TarError, OSError, ValueError: when the file is not a readable tar.
    """
    keys: set[str] = set()
    with open(path, "rb") as raw:
        stream = HashingFile(raw)
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                if not member.isfile():
                    problems.append(f"{path.name}: unexpected non-file member {member.name!r}")
                    continue
                key, _, suffix = member.name.partition(".")
                if "/" in key or key.startswith(".") or not key:
                    problems.append(f"{path.name}: unsafe member name {member.name!r}")
                    continue
                keys.add(key)
                if suffix == TARGET_FIELD:
                    target = np.load(io.BytesIO(archive.extractfile(member).read()), allow_pickle=False)
                    if target.shape != (target_dim,) or str(target.dtype) != target_dtype:
                        problems.append(f"{path.name}: sample {key} target is {target.dtype}{list(target.shape)}, manifest says {target_dtype}[{target_dim}]")
        stream.drain()
    return len(keys), stream.hexdigest()


def verify_shard_set(out_dir: str | os.PathLike) -> VerifyReport:
    """Check a shard set against its manifest.

    Checks: the manifest validates; every listed file exists with the recorded SHA-256; every
    shard holds the recorded number of samples, each target of the recorded shape and dtype;
    shard counts add up to ``samples.written``; the transport and score files have matching shapes;
    no unlisted shard files are present.

    Raises:
        RelaError: when the manifest itself cannot be read (problems with data are reported).
    """
    out = Path(out_dir)
    manifest = read_manifest(out)
    report = VerifyReport()
    targets = manifest["targets"]

    def compare_sha256(name: str, actual: str, expected: str) -> bool:
        report.checked_files += 1
        if actual != expected:
            report.problems.append(f"{name}: sha256 {actual[:12]}... does not match manifest {expected[:12]}...")
            return False
        return True

    def check_file(name: str, expected_sha256: str) -> bool:
        if not (out / name).is_file():
            report.problems.append(f"{name}: missing")
            return False
        return compare_sha256(name, sha256_file(out / name), expected_sha256)

    for shard in manifest["shards"]:
        path = out / shard["name"]
        if not path.is_file():
            report.problems.append(f"{shard['name']}: missing")
            continue
        try:
            count, actual = _scan_shard(path, int(targets["dim"]), str(targets["dtype"]), report.problems)
        except (tarfile.TarError, OSError, ValueError) as error:
            compare_sha256(shard["name"], sha256_file(path), shard["sha256"])
            report.problems.append(f"{shard['name']}: unreadable tar ({error})")
            continue
        if not compare_sha256(shard["name"], actual, shard["sha256"]):
            continue
        report.checked_samples += count
        if count != shard["samples"]:
            report.problems.append(f"{shard['name']}: {count} samples, manifest says {shard['samples']}")
    total = sum(int(s["samples"]) for s in manifest["shards"])
    if total != manifest["samples"]["written"]:
        report.problems.append(f"shards hold {total} samples, manifest says {manifest['samples']['written']} written")
    listed = {s["name"] for s in manifest["shards"]}
    for extra in sorted(p.name for p in out.glob("shard-*.tar") if p.name not in listed):
        report.problems.append(f"{extra}: shard file not listed in the manifest")
    if check_file(manifest["transport"]["file"], manifest["transport"]["sha256"]):
        arrays = load_npz(out / manifest["transport"]["file"])
        shape = arrays["components"].shape
        if shape != (targets["dim"], manifest["prior"]["embedding_dim"]):
            report.problems.append(f"transport components are {shape}, manifest says ({targets['dim']}, {manifest['prior']['embedding_dim']})")
    if check_file(manifest["scores"]["file"], manifest["scores"]["sha256"]):
        arrays = load_npz(out / manifest["scores"]["file"])
        for name, values in arrays.items():
            if values.shape[0] != manifest["samples"]["written"]:
                report.problems.append(f"scores '{name}' has {values.shape[0]} rows, manifest says {manifest['samples']['written']} samples")
    return report


_PHASE_ORDER = ("scan", "load_prior", "embed", "transport", "scores", "write_shards", "total")


def _format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TB"


def describe_shard_set(out_dir: str | os.PathLike) -> str:
    """A human-readable multi-line summary of a shard set (prior, data, targets, scores, shards).

    Raises:
        RelaError: when the manifest cannot be read.
    """
    out = Path(out_dir)
    manifest = read_manifest(out)
    prior, dataset, samples = manifest["prior"], manifest["dataset"], manifest["samples"]
    shard_sizes = [int(s["bytes"]) for s in manifest["shards"]]
    ratio = manifest["transport"].get("explained_variance_ratio", [])
    lines = [
        f"shard set      {out.resolve()}  (schema v{manifest['schema_version']}, created {manifest['created_at']})",
        f"prior          {prior['spec']}  [{prior['weights'].get('source')}]  embedding dim {prior['embedding_dim']}",
        f"preprocessing  resize {prior['preprocessing']['resize_size']} crop {prior['preprocessing']['crop_size']} {prior['preprocessing']['interpolation']}",
        f"dataset        {dataset['root']}  {dataset['fingerprint']['file_count']} images, {_format_bytes(dataset['fingerprint']['total_bytes'])}",
        f"classes        {len(dataset['class_names'])}" + (f"  ({', '.join(dataset['class_names'][:10])}{', ...' if len(dataset['class_names']) > 10 else ''})" if dataset["class_names"] else "  (unlabelled)"),
        f"samples        {samples['written']} written, {samples['skipped']} skipped",
        f"targets        {manifest['targets']['dim']} dims, {manifest['targets']['dtype']}; top-5 explained variance ratio {', '.join(f'{r:.3f}' for r in ratio[:5])}",
        f"shards         {len(shard_sizes)} files, {_format_bytes(sum(shard_sizes))} total"
        + (f", {_format_bytes(min(shard_sizes))} - {_format_bytes(max(shard_sizes))} each" if shard_sizes else ""),
    ]
    scores_path = out / manifest["scores"]["file"]
    if scores_path.is_file():
        arrays = load_npz(scores_path)
        for name in ("knn_density", "nn_similarity"):
            if name in arrays and arrays[name].size:
                q = np.quantile(arrays[name], [0.0, 0.25, 0.5, 0.75, 1.0])
                lines.append(f"{name:<14} min {q[0]:.3f}  q25 {q[1]:.3f}  median {q[2]:.3f}  q75 {q[3]:.3f}  max {q[4]:.3f}")
    timings = manifest["timings_s"]
    phases = [p for p in _PHASE_ORDER if p in timings] + sorted(set(timings) - set(_PHASE_ORDER))
    lines.append("timings        " + ", ".join(f"{p} {timings[p]:.1f}s" for p in phases))
    for item in manifest["skipped"][:5]:
        lines.append(f"skipped        {item['path']}: {item['reason']}")
    if len(manifest["skipped"]) > 5:
        lines.append(f"skipped        ... and {len(manifest['skipped']) - 5} more (see manifest.json)")
    return "\n".join(lines)
