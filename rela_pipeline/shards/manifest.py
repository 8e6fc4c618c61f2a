"""The shard-set manifest: reading, validating, verifying and summarising.

``manifest.json`` is the contract between the producing and the receiving team. It is written
last and atomically by ``embed``; its presence marks a complete run. Fields (schema version 1):

* ``schema``, ``schema_version``, ``created_at`` (UTC ISO 8601)
* ``prior``: spec, weights provenance (source, path, sha256), embedding_dim, preprocessing
* ``transport``: file, sha256, input_dim, output_dim, explained_variance_ratio (first 16), num_samples
* ``targets``: field, dtype, dim
* ``scores``: file, sha256, k, dims, device, fields
* ``dataset``: root (the ``--data`` given), kind (``imagefolder``, ``webdataset`` or ``filelist``;
  absent: an ImageFolder), fingerprint (file_count, total_bytes, paths_sha256; for tars also each
  shard's name, bytes and sha256, for lists the list's sha256), class_names, labelled
* ``samples``: scanned, written, skipped, per_class
* ``skipped`` / ``ignored``: ``[{"path", "reason"}]``
* ``shards``: ``[{"name", "samples", "bytes", "sha256"}]``
* ``settings`` (those that decide the bytes), ``resolved`` (what ``--device`` and ``--precision``
  resolved to: device type and the prior's forward-pass precision), ``software`` (package versions)
* ``run`` (out_dir, num_workers, checkpoint_seconds, resumed, images_embedded, shards_reused: what
  this invocation did), ``host``, ``timings_s``, ``throughput``

Two runs with the same data, prior, seed, settings and software on the same kind of CPU (or GPU)
write byte-identical files and manifests that differ only in :data:`VARYING_FIELDS`; another
instruction set rounds differently (docs/shards.md, "Reproducible bytes").
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import RelaError
from ..fileio import HashingFile, load_npz, npy_from_bytes
from .format import IMAGE_FIELDS, MANIFEST_NAME, SCHEMA, SCHEMA_VERSION, TARGET_DTYPES, TARGET_FIELD
from .location import error_line, open_url, read_url, resolve_location, sibling_url

#: Top-level fields every manifest of this schema version must have.
REQUIRED_FIELDS = (
    "schema",
    "schema_version",
    "created_at",
    "prior",
    "transport",
    "targets",
    "scores",
    "dataset",
    "samples",
    "skipped",
    "shards",
    "software",
    "timings_s",
)
#: Top-level fields a manifest may have besides the required ones; any other field is refused.
OPTIONAL_FIELDS = ("ignored", "settings", "resolved", "shard_order", "run", "host", "throughput", "embeddings")
#: Keys each section must have (readers rely on them); extra keys in these sections are refused
#: too, except the ones listed in :data:`OPTIONAL_SECTION_KEYS`.
SECTION_KEYS = {
    "prior": ("spec", "weights", "embedding_dim", "preprocessing"),
    "transport": ("file", "sha256", "method", "input_dim", "output_dim", "num_samples", "explained_variance_ratio"),
    "targets": ("field", "dtype", "dim"),
    "scores": ("file", "sha256", "fields", "k", "dims", "metric"),
    "dataset": ("root", "fingerprint", "class_names", "labelled"),
    "samples": ("scanned", "written", "skipped", "per_class"),
    "embeddings": ("file", "sha256", "dtype", "shape"),
}
OPTIONAL_SECTION_KEYS = {"transport": ("reference_samples",), "scores": ("device", "search"), "dataset": ("kind",)}
SHARD_KEYS = ("name", "samples", "bytes", "sha256")


def _is_plain_file_name(name: object) -> bool:
    """A file name inside OUT: no directory part, not hidden, not empty (no path traversal)."""
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and not name.startswith(".") and "\x00" not in name


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _schema_problem(manifest: dict[str, Any]) -> str | None:
    """The first way ``manifest`` departs from the schema, or None."""
    missing = [name for name in REQUIRED_FIELDS if name not in manifest]
    if missing:
        return f"lacks required fields: {', '.join(missing)}"
    extra = sorted(set(manifest) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if extra:
        return f"has unknown fields: {', '.join(extra)}"
    for section, keys in SECTION_KEYS.items():
        if section not in manifest:
            continue
        record = manifest[section]
        if not isinstance(record, dict):
            return f"field {section} is not an object"
        missing = [k for k in keys if k not in record]
        extra = sorted(set(record) - set(keys) - set(OPTIONAL_SECTION_KEYS.get(section, ())))
        if missing or extra:
            return f"section {section} " + (f"lacks {', '.join(missing)}" if missing else f"has unknown keys {', '.join(extra)}")
    for section in ("transport", "scores", "embeddings"):
        if section in manifest and not _is_plain_file_name(manifest[section]["file"]):
            return f"{section}.file {manifest[section]['file']!r} is not a plain file name inside the shard set"
        if section in manifest and not _is_sha256(manifest[section]["sha256"]):
            return f"{section}.sha256 is not a SHA-256 hex digest"
    targets = manifest["targets"]
    if targets["dtype"] not in TARGET_DTYPES or not _is_count(targets["dim"]) or targets["dim"] < 1:
        return f"targets are {targets['dtype']!r}[{targets['dim']!r}], expected float16 or float32 with dim >= 1"
    if not _is_count(manifest["samples"]["written"]):
        return "samples.written is not a count"
    if not isinstance(manifest["shards"], list):
        return "shards is not a list"
    for shard in manifest["shards"]:
        if not isinstance(shard, dict) or set(shard) != set(SHARD_KEYS):
            return f"shard record {shard!r} does not have exactly the keys {', '.join(SHARD_KEYS)}"
        if not _is_plain_file_name(shard["name"]):
            return f"shard name {shard['name']!r} is not a plain file name inside the shard set"
        if not (_is_count(shard["samples"]) and _is_count(shard["bytes"]) and _is_sha256(shard["sha256"])):
            return f"shard record {shard['name']} has a malformed count, size or sha256"
    return None


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
        RelaError: malformed JSON, another schema, an incompatible schema version, missing or
            unknown fields (top level, the sections readers use, shard records), or a file or
            shard name that is not a plain name inside the shard set (path traversal).
    """
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise RelaError(f"cannot read {where}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise RelaError(f"{where} is not a rela-pipeline shard-set manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise RelaError(f"{where} has schema_version {manifest.get('schema_version')!r}; this version of rela-pipeline reads {SCHEMA_VERSION}")
    problem = _schema_problem(manifest)
    if problem:
        raise RelaError(f"{where} {problem}")
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
    """Outcome of :func:`verify_shard_set`: ``problems`` is empty when everything checks out.

    Attributes:
        checked_files: files whose SHA-256 was compared with the manifest.
        checked_samples: samples read from shards that matched their checksum.
        problems: one line per problem found.
        bad_shards: names of the shards with a problem (missing, altered, malformed samples).
        shard_problems: ``{shard name: its problems}`` (also in ``problems``).
        reference_checked: targets recomputed from the reference embeddings and compared.
    """

    checked_files: int = 0
    checked_samples: int = 0
    problems: list[str] = field(default_factory=list)
    bad_shards: list[str] = field(default_factory=list)
    shard_problems: dict[str, list[str]] = field(default_factory=dict)
    reference_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


#: Sample fields a shard may hold (besides the image field, one of ``IMAGE_FIELDS``).
SAMPLE_FIELDS = ("cls", TARGET_FIELD, "json")
#: Tolerance of the target statistics check: |mean| and |covariance - identity| per entry.
TARGET_STATISTICS_TOLERANCE = 0.02


class _TargetChecks:
    """Accumulates, over every stored target, the float64 mean and covariance (which must be 0 and
    the identity for PCA + standardisation fitted on these very samples), and keeps the targets of
    the reference samples. Memory O(K^2 + batch * K)."""

    def __init__(self, dim: int, written: int, reference: set[int]) -> None:
        self.dim, self.written, self.reference = dim, written, reference
        self.count = 0
        self.sum = np.zeros(dim)
        self.outer = np.zeros((dim, dim))
        self.batch: list[np.ndarray] = []
        self.seen = np.zeros(written, dtype=bool)
        self.reference_targets: dict[int, np.ndarray] = {}

    def add(self, index: int, target: np.ndarray) -> None:
        self.batch.append(target)
        if index in self.reference:
            self.reference_targets[index] = target
        if len(self.batch) == 4096:
            self.flush()

    def flush(self) -> None:
        if self.batch:
            x = np.stack(self.batch).astype(np.float64)
            self.count += len(x)
            self.sum += x.sum(0)
            self.outer += x.T @ x
            self.batch = []

    def problems(self) -> list[str]:
        self.flush()
        if self.count < 2:
            return []
        mean = self.sum / self.count
        covariance = self.outer / self.count - np.outer(mean, mean)
        worst_mean = float(np.abs(mean).max())
        worst_cov = float(np.abs(covariance - np.eye(self.dim)).max())
        if max(worst_mean, worst_cov) > TARGET_STATISTICS_TOLERANCE:
            return [
                f"targets are not standardised principal components (max |mean| {worst_mean:.3g}, max |covariance - I| {worst_cov:.3g}): they do not come from one linear transport of these samples"
            ]
        return []


def _scan_shard(name: str, raw: IO[bytes], written: int, target_dim: int, target_dtype: str, checks: _TargetChecks, problems: list[str]) -> tuple[int, str]:
    """Read a shard once: hash the file, check every member name (a 9-digit sample index below
    ``written``, seen once in the whole set, and a known field), and each target's shape, dtype
    and finiteness; feed the targets to ``checks``. Nothing is extracted to disk.

    Args:
        name: the shard's name (for messages); raw: its bytes as a binary stream (closed here).

    Returns:
        ``(samples, hex sha256)``.

    Raises:
        tarfile.TarError, OSError, ValueError: when the file is not a readable tar.
    """
    keys: set[str] = set()
    before = len(problems)

    def bad(message: str) -> None:
        if len(problems) - before < 5:  # a hostile shard can hold millions of bad members
            problems.append(f"{name}: {message}")

    with raw:
        stream = HashingFile(raw)
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                key, _, suffix = member.name.partition(".")
                if not member.isfile():
                    bad(f"unexpected non-file member {member.name!r}")
                    continue
                if not (len(key) == 9 and key.isdigit() and int(key) < written):
                    bad(f"member {member.name!r} is not named <sample index>.<field> (unsafe or foreign key)")
                    continue
                if suffix not in SAMPLE_FIELDS and suffix not in IMAGE_FIELDS:
                    bad(f"member {member.name!r} has an unknown field")
                    continue
                if key not in keys:
                    keys.add(key)
                    if checks.seen[int(key)]:
                        bad(f"sample {key} also appears in another shard")
                    checks.seen[int(key)] = True
                if suffix == TARGET_FIELD:
                    if member.size > 1024 + 8 * target_dim:
                        bad(f"sample {key} target is {member.size} bytes, too large for {target_dtype}[{target_dim}]")
                        continue
                    try:
                        target = npy_from_bytes(archive.extractfile(member).read(), max_items=target_dim)
                    except ValueError as error:
                        bad(f"sample {key} target is not a .npy array ({error})")
                        continue
                    if target.shape != (target_dim,) or str(target.dtype) != target_dtype:
                        bad(f"sample {key} target is {target.dtype}{list(target.shape)}, manifest says {target_dtype}[{target_dim}]")
                    elif not np.isfinite(target).all():
                        bad(f"sample {key} target has NaN or Inf")
                    else:
                        checks.add(int(key), target)
        stream.drain()
    return len(keys), stream.hexdigest()


class _ShardSetFiles:
    """The files of a shard set, in a local directory or next to a manifest URL (see
    :mod:`rela_pipeline.shards.location`), read as streams."""

    def __init__(self, location: str | os.PathLike) -> None:
        self.location = str(location)
        self.local = resolve_location(self.location)

    def manifest(self) -> dict[str, Any]:
        if self.local is not None:
            return read_manifest(self.local)
        return parse_manifest(read_url(self.location).decode("utf-8", errors="replace"), self.location)

    def open(self, name: str) -> IO[bytes]:
        """A binary stream of ``name`` (raises for a missing or unreadable file)."""
        return open_url(str(self.local / name) if self.local is not None else sibling_url(self.location, name))

    def exists(self, name: str) -> bool:
        """False for a missing local file; remote files are found out by opening them."""
        return self.local is None or (self.local / name).is_file()

    def read(self, name: str) -> bytes:
        with self.open(name) as stream:
            return stream.read()


def verify_shard_set(out_dir: str | os.PathLike) -> VerifyReport:
    """Check a shard set (a directory, or the URL of its ``manifest.json``) against its manifest.

    Checks:

    * the manifest validates (schema, required and unknown fields, plain file names);
    * every listed file exists with the recorded SHA-256; no unlisted shard is present;
    * every shard holds the recorded number of samples; every member is ``<index>.<field>`` with a
      9-digit index below ``samples.written``, each index in one shard only (no path traversal);
      every target has the recorded shape and dtype and is finite;
    * the transport file is consistent in itself (:meth:`LinearTransport.consistency_problems`),
      has the manifest's shapes and was fitted on ``samples.written`` samples;
    * the transport matches the targets: the targets of the reference samples are recomputed from
      their raw embeddings stored in the transport file and compared with the stored ones (atol
      and rtol 1e-2: float16 storage, CPU against GPU arithmetic); and over all samples the targets
      have mean 0 and covariance I within :data:`TARGET_STATISTICS_TOLERANCE`, as PCA +
      standardisation fitted on exactly these samples gives;
    * score arrays have one row per sample.

    A remote set is streamed once, file by file (nothing is stored); the check for unlisted
    shards needs a directory listing and is done for local sets only.

    Raises:
        RelaError: when the manifest itself cannot be read (problems with data are reported).
    """
    from ..transport import LinearTransport  # torch is only needed once a manifest was read

    files = _ShardSetFiles(out_dir)
    manifest = files.manifest()
    report = VerifyReport()
    targets = manifest["targets"]
    written = int(manifest["samples"]["written"])
    transport_name = manifest["transport"]["file"]

    def compare_sha256(name: str, actual: str, expected: str) -> bool:
        report.checked_files += 1
        if actual != expected:
            report.problems.append(f"{name}: sha256 {actual[:12]}... does not match manifest {expected[:12]}...")
            return False
        return True

    def read_checked(name: str, expected_sha256: str) -> bytes | None:
        """The file's bytes if it matches its checksum, else None (the problem is reported)."""
        if not files.exists(name):
            report.problems.append(f"{name}: missing")
            return None
        try:
            data = files.read(name)
        except Exception as error:  # OSError locally; gopen raises other types for URLs and pipes
            report.problems.append(f"{name}: cannot read ({error_line(error)})")
            return None
        return data if compare_sha256(name, hashlib.sha256(data).hexdigest(), expected_sha256) else None

    def sha256_of(name: str) -> str:
        with files.open(name) as raw:
            stream = HashingFile(raw)
            stream.drain()
        return stream.hexdigest()

    transport = None
    reference_indices = reference_embeddings = None
    transport_bytes = read_checked(transport_name, manifest["transport"]["sha256"])
    if transport_bytes is not None:
        transport = LinearTransport.load(io.BytesIO(transport_bytes))
        arrays = load_npz(io.BytesIO(transport_bytes))
        reference_indices, reference_embeddings = arrays.get("reference_indices"), arrays.get("reference_embeddings")
        report.problems += transport.consistency_problems()
        if transport.components.shape != (targets["dim"], manifest["prior"]["embedding_dim"]):
            report.problems.append(
                f"transport components are {transport.components.shape}, manifest says ({targets['dim']}, {manifest['prior']['embedding_dim']})"
            )
            transport = None
        elif transport.num_samples != written:
            report.problems.append(f"transport was fitted on {transport.num_samples} samples, manifest says {written} written")
    reference = set(int(i) for i in reference_indices) if reference_indices is not None else set()
    checks = _TargetChecks(int(targets["dim"]), written, reference)

    for shard in manifest["shards"]:
        problems_before = len(report.problems)
        if not files.exists(shard["name"]):
            report.problems.append(f"{shard['name']}: missing")
        else:
            try:
                count, actual = _scan_shard(
                    shard["name"], files.open(shard["name"]), written, int(targets["dim"]), str(targets["dtype"]), checks, report.problems
                )
            except Exception as error:  # tarfile.TarError, OSError, ValueError; gopen's own types for URLs
                with contextlib.suppress(Exception):
                    compare_sha256(shard["name"], sha256_of(shard["name"]), shard["sha256"])
                report.problems.append(f"{shard['name']}: unreadable ({error_line(error)})")
            else:
                if compare_sha256(shard["name"], actual, shard["sha256"]):
                    report.checked_samples += count
                    if count != shard["samples"]:
                        report.problems.append(f"{shard['name']}: {count} samples, manifest says {shard['samples']}")
        if len(report.problems) > problems_before:
            report.bad_shards.append(shard["name"])
            report.shard_problems[shard["name"]] = report.problems[problems_before:]
    total = sum(int(s["samples"]) for s in manifest["shards"])
    if total != written:
        report.problems.append(f"shards hold {total} samples, manifest says {written} written")
    listed = {s["name"] for s in manifest["shards"]}
    if files.local is not None:
        for extra in sorted(p.name for p in files.local.glob("shard-*.tar") if p.name not in listed):
            report.problems.append(f"{extra}: shard file not listed in the manifest")

    checks.flush()
    if not report.bad_shards and checks.count == written:  # the statistics need every target
        report.problems += checks.problems()
    if transport is not None and reference_embeddings is not None:
        indices = sorted(i for i in reference if i in checks.reference_targets)
        if indices:
            position = {int(i): row for row, i in enumerate(reference_indices)}
            recomputed = transport.apply(reference_embeddings[[position[i] for i in indices]]).numpy().astype(targets["dtype"]).astype(np.float32)
            stored = np.stack([checks.reference_targets[i] for i in indices]).astype(np.float32)
            report.reference_checked = len(indices)
            mismatch = ~np.isclose(recomputed, stored, rtol=1e-2, atol=1e-2)
            if mismatch.any():
                row = int(np.flatnonzero(mismatch.any(axis=1))[0])
                report.problems.append(
                    f"targets do not match the transport: {int(mismatch.any(axis=1).sum())} of {len(indices)} reference samples differ "
                    f"(sample {indices[row]}: max |difference| {float(np.abs(recomputed[row] - stored[row]).max()):.3g})"
                )
    scores_bytes = read_checked(manifest["scores"]["file"], manifest["scores"]["sha256"])
    if scores_bytes is not None:
        arrays = load_npz(io.BytesIO(scores_bytes))
        for name, values in arrays.items():
            if values.shape[0] != written:
                report.problems.append(f"scores '{name}' has {values.shape[0]} rows, manifest says {written} samples")
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
        f"classes        {len(dataset['class_names'])}"
        + (
            f"  ({', '.join(dataset['class_names'][:10])}{', ...' if len(dataset['class_names']) > 10 else ''})" if dataset["class_names"] else "  (unlabelled)"
        ),
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
