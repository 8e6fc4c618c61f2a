"""Hostile shard sets from a producer that re-signs its manifest: every file matches its checksum,
so only the content checks stand between the receiving team and the damage. Each is refused by
``verify`` and by ``train`` (verifying or not) with a clear message; nothing runs and nothing is
written outside OUT."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from rela_pipeline.fileio import npy_bytes, sha256_file
from rela_pipeline.shards.manifest import verify_shard_set
from tests.conftest import TRAIN_DIR, assert_one_line_error, run_cli

TRAIN = ["--epochs", "1", "--batch-size", "32", "--num-workers", "0", "--device", "cpu", "--no-rela"]


def rewrite_shard(out: Path, name: str, edit) -> None:
    """Replace shard ``name`` by ``edit([(TarInfo, bytes), ...])`` and re-sign the manifest (sha256,
    bytes, samples), as a producer that controls both would."""
    with tarfile.open(out / name) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    members = edit(members)
    with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as archive:
        for info, data in members:
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"]:
        if shard["name"] == name:
            keys = {m.name.split(".", 1)[0] for m, _ in members} - {""}
            keys = {k for k in keys if k.isdigit()}  # hostile extra members are not counted as samples
            shard.update(sha256=sha256_file(out / name), bytes=(out / name).stat().st_size, samples=len(keys))
    manifest["samples"]["written"] = sum(s["samples"] for s in manifest["shards"])
    (out / "manifest.json").write_text(json.dumps(manifest))


def replace_field(key_index: int, suffix: str, data: bytes):
    def edit(members):
        return [(m, data if m.name.endswith(suffix) and i // 4 == key_index else d) for i, (m, d) in enumerate(members)]

    return edit


def first_key(out: Path, name: str) -> str:
    with tarfile.open(out / name) as archive:
        return archive.getmembers()[0].name.split(".", 1)[0]


def assert_train_refuses(shards: Path, tmp_path: Path, fragment_verify: str, fragment_stream: str) -> None:
    code, _, stderr = run_cli("train", "--shards", str(shards), "--out", str(tmp_path / "run"), *TRAIN)
    assert_one_line_error(code, stderr, fragment_verify)
    assert "does not verify" in stderr and not (tmp_path / "run").exists()
    code, _, stderr = run_cli("train", "--shards", str(shards), "--out", str(tmp_path / "run"), *TRAIN, "--no-verify")
    assert_one_line_error(code, stderr, fragment_stream)
    assert not (tmp_path / "run").exists()


def test_path_traversal_member_names_are_refused_and_never_extracted(shard_copy, tmp_path):
    target = tmp_path / "escaped.png"
    hostile = [f"../../{target.name}", str(target), "../" * 12 + "tmp/escaped.png"]

    def edit(members):
        extra = []
        for name in hostile:
            info = tarfile.TarInfo(name)
            extra.append((info, members[0][1]))
        return extra + members

    rewrite_shard(shard_copy, "shard-000000.tar", edit)
    report = verify_shard_set(shard_copy)
    assert report.bad_shards == ["shard-000000.tar"]
    assert any("is not named <sample index>.<field>" in p and "../../escaped.png" in p for p in report.problems)
    assert_train_refuses(shard_copy, tmp_path, "shard-000000.tar", "is not a sample index")
    assert not target.exists() and not Path("/tmp/escaped.png").exists()


def test_nan_target_is_refused(shard_copy, tmp_path):
    target = np.load(
        io.BytesIO(
            tarfile.open(shard_copy / "shard-000001.tar")
            .extractfile(next(m for m in tarfile.open(shard_copy / "shard-000001.tar").getmembers() if m.name.endswith("target.npy")))
            .read()
        )
    )
    target[3] = np.nan
    rewrite_shard(shard_copy, "shard-000001.tar", replace_field(0, "target.npy", npy_bytes(target)))
    report = verify_shard_set(shard_copy)
    assert any("target has NaN or Inf" in p for p in report.problems), report.problems
    assert_train_refuses(shard_copy, tmp_path, "target has NaN or Inf", "target has NaN or Inf")


def test_wrong_shape_target_is_refused(shard_copy, tmp_path):
    rewrite_shard(shard_copy, "shard-000002.tar", replace_field(0, "target.npy", npy_bytes(np.zeros(5, dtype=np.float16))))
    key = first_key(shard_copy, "shard-000002.tar")
    report = verify_shard_set(shard_copy)
    assert f"shard-000002.tar: sample {key} target is float16[5], manifest says float16[299]" in report.problems
    assert_train_refuses(shard_copy, tmp_path, "target is float16[5]", "expected float[>=")


def test_target_whose_header_claims_a_huge_array_is_refused_before_allocating(shard_copy, tmp_path):
    header = b"{'descr': '<f2', 'fortran_order': False, 'shape': (4000000000000,), }"
    header += b" " * (63 - len(header) % 64) + b"\n"
    bomb = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\x00" * 16
    rewrite_shard(shard_copy, "shard-000003.tar", replace_field(0, "target.npy", bomb))
    report = verify_shard_set(shard_copy)
    assert any("larger than 299 elements" in p for p in report.problems), report.problems
    assert_train_refuses(shard_copy, tmp_path, "larger than 299 elements", "larger than")


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A tiny PNG whose header declares ``width x height`` pixels (PIL refuses it on open)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_in_a_shard_stops_training(shard_copy, tmp_path):
    rewrite_shard(shard_copy, "shard-000000.tar", replace_field(0, ".png", png_bomb()))
    assert verify_shard_set(shard_copy).ok  # images are not decoded by verify; training refuses it
    code, _, stderr = run_cli("train", "--shards", str(shard_copy), "--out", str(tmp_path / "run"), *TRAIN)
    assert_one_line_error(code, stderr, "bad sample in shard shard-000000.tar: Image size (400000000 pixels) exceeds limit")
    assert "decompression bomb" in stderr and not (tmp_path / "run").exists()


def test_decompression_bomb_in_the_image_folder_is_skipped_and_listed(tmp_path):
    from tests.test_cli import FAST, small_tree

    data = small_tree(tmp_path, per_class=2)
    (sorted(data.iterdir())[0] / "bomb.png").write_bytes(png_bomb())
    code, _, stderr = run_cli("embed", "--data", str(data), "--out", str(tmp_path / "out"), *FAST)
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    class_dir = sorted(data.iterdir())[0].name
    assert [(s["path"], s["reason"].split(":")[0]) for s in manifest["skipped"]] == [(f"{class_dir}/bomb.png", "DecompressionBombError")]


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m.update(notes="hello"), "has unknown fields: notes"),
        (lambda m: m.pop("targets"), "lacks required fields: targets"),
        (lambda m: m["targets"].pop("dtype"), "section targets lacks dtype"),
        (lambda m: m["scores"].update(extra=1), "section scores has unknown keys extra"),
        (lambda m: m["transport"].update(file="../../etc/passwd"), "is not a plain file name"),
        (lambda m: m["shards"][0].update(name="../shard-000000.tar"), "is not a plain file name"),
        (lambda m: m["shards"][0].update(samples="64"), "malformed count"),
    ],
)
def test_manifest_with_extra_missing_or_unsafe_fields_is_refused(shard_copy, tmp_path, edit, fragment):
    manifest = json.loads((shard_copy / "manifest.json").read_text())
    edit(manifest)
    (shard_copy / "manifest.json").write_text(json.dumps(manifest))
    for command in (
        ["verify", str(shard_copy)],
        ["inspect", str(shard_copy)],
        ["train", "--shards", str(shard_copy), "--out", str(tmp_path / "run"), *TRAIN, "--no-verify"],
    ):
        code, _, stderr = run_cli(*command)
        assert_one_line_error(code, stderr, fragment)
    assert not (tmp_path / "run").exists()


def test_pickle_prior_with_code_is_refused_by_the_cli_and_never_runs(tmp_path):
    import pickle

    from tests.test_priors import _Exploit

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"state_dict": _Exploit(str(marker))}))
    out = tmp_path / "out"
    code, _, stderr = run_cli("embed", "--data", str(TRAIN_DIR), "--out", str(out), "--prior", f"checkpoint:{path}")
    assert_one_line_error(code, stderr, "not a plain weights file")
    assert not marker.exists() and not out.exists()
