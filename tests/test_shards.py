"""Shards read back with plain webdataset and with tarfile; manifest verification."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import webdataset as wds

from rela_pipeline.errors import RelaError
from rela_pipeline.fileio import load_npz
from rela_pipeline.shards.manifest import read_manifest, verify_shard_set
from rela_pipeline.stages.embed import shard_write_order
from rela_pipeline.transport import LinearTransport
from tests.conftest import TRAIN_DIR


def shard_paths(out, manifest):
    return [str(out / s["name"]) for s in manifest["shards"]]


def test_webdataset_reads_every_sample_with_targets_equal_to_transported_embeddings(shard_set):
    out, manifest = shard_set
    transport = LinearTransport.load(out / "transport.npz")
    expected = transport.apply(np.load(out / "embeddings.npy")).numpy()
    samples = list(wds.WebDataset(shard_paths(out, manifest), shardshuffle=False).decode())
    assert len(samples) == manifest["samples"]["written"] == 300
    for sample in samples:
        meta = sample["json"]
        index = meta["index"]
        assert sample["__key__"] == f"{index:09d}" and "." not in sample["__key__"]
        target = sample["target.npy"]
        assert target.dtype == np.float16 and target.shape == (manifest["targets"]["dim"],)
        # The float32 targets rounded once to float16: within one float16 step of the recomputed ones.
        one_step = np.spacing(np.abs(expected[index]).astype(np.float16)).astype(np.float32)
        assert np.all(np.abs(target.astype(np.float32) - expected[index]) <= one_step)
        assert sample["cls"] == meta["label"] == manifest["dataset"]["class_names"].index(meta["path"].split("/")[0])
    assert sorted(s["json"]["index"] for s in samples) == list(range(300))


def test_samples_are_written_in_the_seeded_permutation_so_each_shard_mixes_classes(shard_set):
    out, manifest = shard_set
    samples = list(wds.WebDataset(shard_paths(out, manifest), shardshuffle=False).decode())
    written = [s["json"]["index"] for s in samples]
    assert manifest["shard_order"] == {"kind": "permutation", "seed": 0}
    assert written == shard_write_order(300, 0).tolist() != list(range(300))
    first_shard = samples[: manifest["shards"][0]["samples"]]  # 64 samples of a class-sorted folder
    assert len({s["cls"] for s in first_shard}) == 10


def test_tarfile_sees_original_image_bytes_and_consistent_fields(shard_set):
    out, manifest = shard_set
    scores = load_npz(out / "scores.npz")
    seen = 0
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
        keys = {name.split(".", 1)[0] for name in members}
        assert len(keys) == shard["samples"]
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            assert members[f"{key}.png"] == (TRAIN_DIR / meta["path"]).read_bytes()  # not re-encoded
            assert int(members[f"{key}.cls"]) == meta["label"]
            target = np.load(io.BytesIO(members[f"{key}.target.npy"]), allow_pickle=False)
            assert target.shape == (manifest["targets"]["dim"],)
            assert meta["knn_density"] == pytest.approx(float(scores["knn_density"][meta["index"]]))
            assert meta["nn_index"] == int(scores["nn_index"][meta["index"]])
            seen += 1
    assert seen == 300


def test_manifest_records_provenance(shard_set):
    out, manifest = shard_set
    assert manifest["prior"]["spec"] == "random:resnet18"
    assert manifest["prior"]["preprocessing"]["crop_size"] == 32
    fingerprint = manifest["dataset"]["fingerprint"]
    assert fingerprint["file_count"] == 300
    assert fingerprint["total_bytes"] == sum(p.stat().st_size for p in TRAIN_DIR.rglob("*.png"))
    assert sum(manifest["samples"]["per_class"].values()) == 300
    assert [s["samples"] for s in manifest["shards"]] == [64, 64, 64, 64, 44]
    assert manifest["software"]["torch"] and manifest["timings_s"]["total"] > 0
    assert read_manifest(out) == manifest


def test_verify_passes_then_catches_tampering_and_missing_shards(shard_set, tmp_path):
    out, manifest = shard_set
    assert verify_shard_set(out).ok
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = copy / manifest["shards"][1]["name"]
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    (copy / manifest["shards"][3]["name"]).unlink()
    problems = verify_shard_set(copy).problems
    assert any(manifest["shards"][1]["name"] in p and "sha256" in p for p in problems)
    assert any(manifest["shards"][3]["name"] in p and "missing" in p for p in problems)


def test_verify_catches_a_manifest_count_that_lies(shard_set, tmp_path):
    out, manifest = shard_set
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    edited = json.loads((copy / "manifest.json").read_text())
    edited["shards"][0]["samples"] += 1
    (copy / "manifest.json").write_text(json.dumps(edited))
    problems = verify_shard_set(copy).problems
    assert any("65" in p or "64 samples" in p for p in problems)


def test_incompatible_schema_and_missing_manifest_are_refused(shard_set, tmp_path):
    out, _ = shard_set
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    edited = json.loads((copy / "manifest.json").read_text())
    edited["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(RelaError, match="schema_version 99"):
        read_manifest(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(RelaError, match="incomplete"):
        read_manifest(copy)


def test_verify_recomputes_the_reference_targets_and_checks_their_statistics(shard_set):
    out, manifest = shard_set
    report = verify_shard_set(out)
    assert report.ok and report.reference_checked == 256 == manifest["transport"]["reference_samples"]
    arrays = load_npz(out / "transport.npz")
    embeddings = np.load(out / "embeddings.npy")  # the run kept every raw embedding
    np.testing.assert_array_equal(arrays["reference_embeddings"], embeddings[arrays["reference_indices"]])


def resign(out, name):
    """Update the manifest's checksum of ``name`` as a producer that rewrote the file would."""
    from rela_pipeline.fileio import sha256_file

    manifest = json.loads((out / "manifest.json").read_text())
    for record in [manifest["transport"], manifest["scores"], *manifest["shards"]]:
        if record.get("file", record.get("name")) == name:
            record["sha256"] = sha256_file(out / name)
            if "bytes" in record:
                record["bytes"] = (out / name).stat().st_size
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_verify_catches_a_transport_from_another_run_even_when_re_signed(shard_copy, tmp_path):
    from rela_pipeline.stages.embed import run_embed
    from tests.conftest import small_embed_config

    other = tmp_path / "other"
    run_embed(small_embed_config(TRAIN_DIR, other, seed=1))  # another random prior: same shapes
    shutil.copy(other / "transport.npz", shard_copy / "transport.npz")
    resign(shard_copy, "transport.npz")
    problems = verify_shard_set(shard_copy).problems
    assert len(problems) == 1 and problems[0].startswith("targets do not match the transport: 256 of 256 reference samples differ"), problems


def test_verify_catches_targets_that_are_not_standardised_even_when_re_signed(shard_copy):
    """Every target scaled by 2: shapes, dtypes and checksums agree, the statistics and the
    reference samples do not."""
    manifest = json.loads((shard_copy / "manifest.json").read_text())
    for shard in manifest["shards"]:
        path = shard_copy / shard["name"]
        with tarfile.open(path) as archive:
            members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
            for info, data in members:
                if info.name.endswith("target.npy"):
                    buffer = io.BytesIO()
                    np.save(buffer, np.load(io.BytesIO(data)) * 2)
                    data = buffer.getvalue()
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        resign(shard_copy, shard["name"])
    problems = verify_shard_set(shard_copy).problems
    assert any(p.startswith("targets are not standardised principal components (max |mean|") for p in problems), problems
    assert any(p.startswith("targets do not match the transport") for p in problems), problems


def test_verify_catches_a_transport_that_is_not_sound(shard_copy):
    from rela_pipeline.fileio import write_npz_atomic

    arrays = load_npz(shard_copy / "transport.npz")
    arrays["components"][[0, 1]] = arrays["components"][[1, 0]]  # order no longer by variance ...
    arrays["scale"][0] *= 1.5  # ... and a scale that is not sqrt(variance)
    write_npz_atomic(shard_copy / "transport.npz", arrays)
    resign(shard_copy, "transport.npz")
    problems = verify_shard_set(shard_copy).problems
    assert "transport scale is not the square root of the explained variance" in problems
    assert any(p.startswith("targets do not match the transport") for p in problems)


def test_verify_streams_a_remote_set_named_by_its_manifest_url(shard_copy):
    url = f"pipe:cat {shard_copy}/manifest.json"
    report = verify_shard_set(url)
    assert report.ok and report.checked_samples == 300 and report.reference_checked == 256
    shard = shard_copy / "shard-000003.tar"
    data = bytearray(shard.read_bytes())
    data[3000] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = verify_shard_set(url)
    assert report.bad_shards == ["shard-000003.tar"] and "sha256" in report.shard_problems["shard-000003.tar"][-1]
