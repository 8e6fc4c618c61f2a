"""Stage one's other inputs: the real fixture as WebDataset tars (img2dataset's layout) and as a
file list give the ImageFolder run's targets, with provenance a team can join back on; hostile
tars and lists are skipped and counted; bad ``--data`` is one line."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rela_pipeline.imagefolder import scan_image_folder
from rela_pipeline.shards.manifest import verify_shard_set
from rela_pipeline.stages.embed import run_embed
from tests.conftest import TRAIN_DIR, assert_one_line_error, run_cli, small_embed_config
from tests.test_torchrun_embed import samples

#: Samples per input shard (300 images: 3 shards).
PER_SHARD = 100


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path | str]:
    """The fixture's train split three ways, in the ImageFolder's order: ``tars`` (a brace
    pattern of 3 shards: ``{key}.png`` + ``.cls`` + ``.json`` + ``.txt``) and ``list`` (a
    ``.csv`` of relative paths and class names)."""
    root = tmp_path_factory.mktemp("inputs")
    index = scan_image_folder(TRAIN_DIR)
    for shard in range(len(index.files) // PER_SHARD):
        with tarfile.open(root / f"part-{shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as archive:
            for row in range(shard * PER_SHARD, (shard + 1) * PER_SHARD):
                key = f"{row:06d}"
                add_member(archive, f"{key}.png", (index.root / index.files[row]).read_bytes())
                add_member(archive, f"{key}.cls", str(int(index.labels[row])).encode())
                add_member(archive, f"{key}.json", json.dumps({"url": f"https://example.org/{key}.png", "label": int(index.labels[row])}).encode())
                add_member(archive, f"{key}.txt", f"caption {key}".encode())
    listing = root / "images.csv"
    with listing.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for relative in index.files:
            writer.writerow([os.path.relpath(index.root / relative, root), relative.split("/")[0]])
    return {"tars": str(root / "part-{000000..000002}.tar"), "list": listing, "root": root}


@pytest.fixture(scope="module")
def imagefolder_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imagefolder") / "out"
    run_embed(small_embed_config(TRAIN_DIR, out))
    return out


@pytest.mark.parametrize("kind", ["tars", "list"])
def test_tars_and_file_lists_give_the_imagefolder_runs_targets(inputs, imagefolder_run, tmp_path, kind):
    out = tmp_path / "out"
    manifest = run_embed(small_embed_config(inputs[kind], out))
    assert manifest["dataset"]["kind"] == ("webdataset" if kind == "tars" else "filelist")
    assert manifest["samples"]["written"] == 300 and manifest["dataset"]["labelled"]
    # Same images in the same order, same labels: the transport, the scores and every target are the same bytes.
    for name in ("transport.npz", "scores.npz"):
        assert (out / name).read_bytes() == (imagefolder_run / name).read_bytes(), name
    ours, reference = samples(out), samples(imagefolder_run)
    assert ours.keys() == reference.keys()
    assert all(np.array_equal(ours[k]["target"], reference[k]["target"]) for k in ours)
    assert verify_shard_set(out).ok
    some = ours["000000123"]["json"]
    if kind == "tars":
        # Provenance: the input shard and key, and the input's own .json and .txt.
        assert some["source_shard"] == "part-000001.tar" and some["source_key"] == "000123" and "path" not in some
        assert some["source"] == {"json": {"url": "https://example.org/000123.png", "label": some["label"]}, "txt": "caption 000123"}
        shards = manifest["dataset"]["fingerprint"]["shards"]
        assert [s["name"] for s in shards] == [f"part-{i:06d}.tar" for i in range(3)]
        assert all(s["sha256"] == hashlib.sha256((inputs["root"] / s["name"]).read_bytes()).hexdigest() for s in shards)
        assert manifest["dataset"]["class_names"] == [str(i) for i in range(10)]
    else:
        assert some["path"].endswith(reference["000000123"]["json"]["path"])  # the path as listed
        assert manifest["dataset"]["class_names"] == json.loads((imagefolder_run / "manifest.json").read_text())["dataset"]["class_names"]


def hostile_tar(path: Path, good: list[bytes]) -> None:
    """A tar with good samples and every bad kind of member."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for i, data in enumerate(good):
            add_member(archive, f"good{i}.png", data)
        add_member(archive, "truncated.png", good[0][: len(good[0]) // 2])
        add_member(archive, "text.jpg", b"not an image at all\n")
        add_member(archive, "nolabel.cls", b"3")  # a sample with no image
        add_member(archive, "good0.txt", b"a duplicate key, after another key")
        add_member(archive, "../../escape.png", good[1])
        add_member(archive, "README", b"no extension")


def test_hostile_tars_are_skipped_and_counted_and_nothing_lands_outside_out(inputs, tmp_path, caplog):
    index = scan_image_folder(TRAIN_DIR)
    good = [(index.root / f).read_bytes() for f in index.files[:20]]
    data = tmp_path / "in"
    data.mkdir()
    hostile_tar(data / "a.tar", good)
    (data / "b.tar").write_bytes(b"")  # empty
    whole = data / "c.tar"
    with tarfile.open(whole, "w", format=tarfile.USTAR_FORMAT) as archive:
        for i, payload in enumerate(good[:4]):
            add_member(archive, f"c{i}.png", payload)
    data_cut = data / "d.tar"
    data_cut.write_bytes(whole.read_bytes()[: 2048 + len(good[1]) // 2])  # cut inside its second image
    whole.write_bytes(whole.read_bytes()[: 1536 + 100])  # cut inside its second header
    manifest = run_embed(small_embed_config(str(data / "*.tar"), tmp_path / "out", batch_size=8, shard_size=16))
    ignored = {entry["path"]: entry["reason"] for entry in manifest["ignored"]}
    assert ignored["a.tar/nolabel"] == "no image field"
    assert ignored["a.tar/good0"] == "duplicate key in the shard"
    assert ignored["a.tar/README"] == "not a key.extension member name"
    assert all("ends early" in ignored[name] for name in ("b.tar", "c.tar", "d.tar"))
    skipped = {entry["path"] for entry in manifest["skipped"]}
    assert skipped == {"a.tar/truncated", "a.tar/text"}
    # 20 good + the escaping name (read as bytes, named only in the provenance) + d.tar's first sample. A shard
    # that ends early loses the sample it was in (its fields may be incomplete): c.tar's only one, d.tar's second.
    assert manifest["samples"]["written"] == 22 and manifest["samples"]["skipped"] == 2
    escaped = [s for s in samples(tmp_path / "out").values() if s["json"].get("source_key") == "../../escape"]
    assert len(escaped) == 1
    assert not (tmp_path / "escape.png").exists() and not (tmp_path.parent / "escape.png").exists()
    assert not manifest["dataset"]["labelled"]  # not every sample has a .cls


def test_a_pool_of_processes_scans_tars_into_the_one_process_source(inputs, tmp_path):
    from rela_pipeline.sources import _scan_tars, expand_pattern

    index = scan_image_folder(TRAIN_DIR)
    hostile_tar(tmp_path / "a.tar", [(index.root / f).read_bytes() for f in index.files[:20]])
    paths = expand_pattern(inputs["tars"]) + [str(tmp_path / "a.tar")]
    alone = _scan_tars("pattern", paths, None, workers=1)
    pooled = _scan_tars("pattern", paths, None, workers=2, min_parallel_bytes=0)
    for name, value in vars(alone).items():
        other = getattr(pooled, name)
        assert np.array_equal(other, value) if isinstance(value, np.ndarray) else other == value, name
    assert len(alone.files) == 300 + 23 and "a.tar/nolabel" in alone.ignored  # 20 good, truncated, text, escape


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pool forks on Linux only; elsewhere it spawns")
def test_a_script_without_a_main_guard_scans_with_the_pool_silently(inputs, tmp_path):
    from rela_pipeline.sources import open_image_source

    script = tmp_path / "unguarded.py"  # what a user's notebook-turned-script looks like
    script.write_text(
        "from rela_pipeline.sources import _scan_tars, expand_pattern\n"
        f"paths = expand_pattern({str(inputs['tars'])!r})\n"
        "print(len(_scan_tars('pattern', paths, None, workers=2, min_parallel_bytes=0).files))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    expected = len(open_image_source(inputs["tars"]).files)
    assert done.returncode == 0 and done.stdout.split() == [str(expected)] and done.stderr == "", done.stderr[-2000:]


def test_prefetched_reads_equal_each_sources_reads_in_any_order_and_fail_at_their_turn(inputs, tmp_path):
    from rela_pipeline.fileio import read_byte_ranges
    from rela_pipeline.sources import open_image_source

    open_files = len(os.listdir("/proc/self/fd"))
    for data in (TRAIN_DIR, inputs["tars"], inputs["list"]):
        source = open_image_source(data)
        rows = np.random.default_rng(0).permutation(len(source.files)).tolist()  # the shards' write order
        assert list(read_byte_ranges(map(source.byte_range, rows), lookahead=16)) == [source.read(r) for r in rows]
    assert len(os.listdir("/proc/self/fd")) == open_files  # every file opened for the window is closed

    whole = tmp_path / "whole.bin"
    whole.write_bytes(bytes(range(256)) * 8)
    ranges = [(str(whole), 0, 10), (str(whole), 2040, None), (str(tmp_path / "gone.png"), 0, None), (str(whole), 0, 1)]
    got = []
    with pytest.raises(FileNotFoundError, match="gone.png"):
        for data in read_byte_ranges(ranges, lookahead=3):  # the missing file is opened two ranges early
            got.append(data)
    assert got == [bytes(range(10)), bytes(range(248, 256))]
    with pytest.raises(OSError, match="100 bytes expected at offset 2000, the file ends after 48"):
        list(read_byte_ranges([(str(whole), 2000, 100)]))
    assert len(os.listdir("/proc/self/fd")) == open_files


def resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache (Linux ``mincore`` on a read-only map)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        vector = ctypes.create_string_buffer(pages)
        assert libc.mincore(address, size, vector) == 0, ctypes.get_errno()
        libc.munmap(address, size)
    finally:
        os.close(fd)
    return sum(byte & 1 for byte in vector.raw)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux's")
def test_announced_ranges_are_read_into_the_page_cache_and_missing_files_are_left_to_the_read(tmp_path):
    from rela_pipeline.fileio import announce_byte_ranges

    files = []
    for i in range(4):
        files.append(tmp_path / f"{i}.bin")
        files[-1].write_bytes(os.urandom(1 << 20))
    for path in files:  # written back, then dropped from the page cache
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    if any(resident_pages(path) for path in files):
        pytest.skip("this file system keeps its pages (tmpfs)")
    ranges = [(str(files[0]), 0, None), (str(tmp_path / "gone.bin"), 0, None), (str(files[1]), 1 << 19, 4096)]
    assert announce_byte_ranges(ranges) == 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (resident_pages(files[0]) < 256 or resident_pages(files[1]) < 1):
        time.sleep(0.01)
    assert resident_pages(files[0]) == 256  # the whole file
    assert 1 <= resident_pages(files[1]) < 256  # its range (and the kernel's read-around), not the file
    assert resident_pages(files[2]) == resident_pages(files[3]) == 0  # nothing not announced


def item_fields(item) -> tuple:
    """A dataset item's values: a tuple's own, or a dataclass's fields."""
    return tuple(vars(item).values()) if dataclasses.is_dataclass(item) else item


def test_a_batch_fetched_at_once_equals_its_items_fetched_one_by_one(inputs, tmp_path):
    from rela_pipeline.priors import Preprocessing
    from rela_pipeline.sources import open_image_source
    from rela_pipeline.stages.embed.decoding import EncodedImages
    from rela_pipeline.stages.embed.images import SourceImages

    index = scan_image_folder(TRAIN_DIR)
    broken = tmp_path / "broken" / "a"
    broken.mkdir(parents=True)
    for f in index.files[:5]:
        (broken / Path(f).name).write_bytes((index.root / f).read_bytes())
    (broken / "text.jpg").write_text("not an image")
    preprocessing = Preprocessing(resize_size=32, crop_size=32)
    for data in (TRAIN_DIR, inputs["tars"], broken.parent):
        source = open_image_source(data)
        for dataset in (SourceImages(source, 1, 6, preprocessing), EncodedImages(source, 1, 6, preprocessing)):
            batch = [3, 0, 4, 1]
            together, alone = dataset.__getitems__(batch), [dataset[i] for i in batch]
            for a, b in zip(together, alone, strict=True):
                for x, y in zip(item_fields(a), item_fields(b), strict=True):
                    assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert any(not item[2] for item in SourceImages(open_image_source(broken.parent), 0, 6, preprocessing).__getitems__(list(range(6))))


def test_bad_tar_and_list_input_is_one_line(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    code, _, stderr = run_cli("embed", "--data", str(tmp_path / "empty.tar"), "--out", str(tmp_path / "out"), "--prior", "random:resnet18", "--device", "cpu")
    assert_one_line_error(code, stderr, "no sample with an image in 1 shard(s)")
    assert not (tmp_path / "out").exists()
    index = scan_image_folder(TRAIN_DIR)
    with tarfile.open(tmp_path / "labels.tar", "w", format=tarfile.USTAR_FORMAT) as archive:
        for i in range(3):
            add_member(archive, f"s{i}.png", (index.root / index.files[i]).read_bytes())
            add_member(archive, f"s{i}.json", json.dumps({"label": "cat"} if i != 1 else {}).encode())
    code, _, stderr = run_cli(
        "embed",
        "--data",
        str(tmp_path / "labels.tar"),
        "--out",
        str(tmp_path / "out"),
        "--label-field",
        "json:label",
        "--prior",
        "random:resnet18",
        "--device",
        "cpu",
    )
    assert_one_line_error(code, stderr, "--label-field json:label: sample labels.tar/s1 has none")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{index.root / index.files[0]}\nmissing.png\n{index.root / index.files[1]}\n")
    manifest = run_embed(small_embed_config(listing, tmp_path / "listed", batch_size=2, shard_size=2))
    assert manifest["samples"]["written"] == 2 and {e["path"]: e["reason"] for e in manifest["ignored"]} == {"missing.png": "listed file is missing"}
    (tmp_path / "nothing.txt").write_text("gone.png\n")
    code, _, stderr = run_cli(
        "embed", "--data", str(tmp_path / "nothing.txt"), "--out", str(tmp_path / "out2"), "--prior", "random:resnet18", "--device", "cpu"
    )
    assert_one_line_error(code, stderr, "names no existing image")


def test_a_killed_run_on_tar_input_resumes_into_the_uninterrupted_bytes(inputs, tmp_path):
    fast = [
        "--prior",
        "random:resnet18",
        "--image-size",
        "32",
        "--num-workers",
        "0",
        "--batch-size",
        "8",
        "--shard-size",
        "64",
        "--device",
        "cpu",
        "--checkpoint-seconds",
        "1e-9",
    ]
    reference = tmp_path / "reference"
    code, _, stderr = run_cli("embed", "--data", inputs["tars"], "--out", str(reference), *fast)
    assert code == 0, stderr
    out, ready = tmp_path / "out", tmp_path / "paused"
    command = [sys.executable, str(Path(__file__).parent / "pausing_cli.py"), "-q", "embed", "--data", inputs["tars"], "--out", str(out), *fast]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "PAUSE_AFTER_ROWS": "100", "PAUSE_READY": str(ready)}
    )
    deadline = time.monotonic() + 180
    while not ready.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run did not reach its pause point"
        time.sleep(0.02)
    process.kill()
    process.wait(timeout=60)
    code, _, stderr = run_cli("embed", "--data", inputs["tars"], "--out", str(out), *fast, "--resume")
    assert code == 0, stderr
    for path in sorted(reference.iterdir()):
        if path.name != "manifest.json":
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    assert json.loads((out / "manifest.json").read_text())["run"]["resumed"] is True


def test_two_ranks_embed_tar_input_into_the_one_process_bytes(inputs, tmp_path):
    """Every rank scans the same tars (the ranks compare fingerprints) and reads its rows by offset."""
    from tests.test_torchrun_embed import FAST, ONE_THREAD, one_process, torchrun_command

    one = one_process(tmp_path / "one", *FAST, data=inputs["tars"])
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(torchrun_command(tmp_path / "two", *FAST, data=inputs["tars"]), capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert two.returncode == 0, two.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        if name != "manifest.json":
            assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["run"]["world_size"] == 2


class _Server:
    """A real HTTP server on localhost serving a folder (the standard library's ``http.server``),
    in a thread; a path containing ``drop`` is answered with its full length announced and half
    its bytes, then the connection is closed."""

    def __init__(self, root: Path) -> None:
        import functools
        import http.server
        import threading

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                if "drop" in self.path:
                    data = (root / self.path.lstrip("/").replace("drop-", "")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.close()
                    return
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def served(inputs, imagefolder_run, tmp_path):
    """The input tars under ``/in/`` and a complete shard set under ``/set/``, over HTTP."""
    import shutil

    root = tmp_path / "www"
    (root / "in").mkdir(parents=True)
    for i in range(3):
        shutil.copy(inputs["root"] / f"part-{i:06d}.tar", root / "in")
    shutil.copytree(imagefolder_run, root / "set")
    server = _Server(root)
    yield server
    server.close()


def test_embed_verify_and_train_over_http_with_a_real_server(served, inputs, tmp_path):
    local = tmp_path / "local"
    assert run_embed(small_embed_config(inputs["tars"], local))["dataset"]["kind"] == "webdataset"
    out = tmp_path / "remote"
    pattern = f"{served.url}/in/part-{{000000..000002}}.tar"
    manifest = run_embed(small_embed_config(pattern, out))
    assert manifest["dataset"]["root"] == pattern
    for name in ("transport.npz", "scores.npz"):
        assert (out / name).read_bytes() == (local / name).read_bytes()
    assert samples(out)["000000007"]["json"]["source_shard"] == "part-000000.tar"
    code, stdout, stderr = run_cli("verify", f"{served.url}/set/manifest.json")
    assert code == 0 and stdout.startswith("OK"), stderr
    code, _, stderr = run_cli(
        "train",
        "--shards",
        f"{served.url}/set/manifest.json",
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--data-ratio",
        "0.3",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--no-verify",
    )
    assert code == 0, stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["budget"]["steps"] == 90 // 32


def test_a_missing_or_dropped_remote_tar_is_one_line_naming_the_url_and_nothing_is_written(served, tmp_path):
    for path, fragment in (("in/part-000009.tar", "HTTP 404"), ("in/drop-part-000001.tar", "cannot read")):
        url = f"{served.url}/{path}"
        code, _, stderr = run_cli("embed", "--data", url, "--out", str(tmp_path / "out"), "--prior", "random:resnet18", "--device", "cpu")
        assert_one_line_error(code, stderr, f"cannot read {url}")
        assert fragment in stderr
        assert not (tmp_path / "out").exists()


def test_a_parquet_list_and_a_decompression_bomb_in_a_tar(inputs, imagefolder_run, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    with open(inputs["list"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    table = pa.table({"path": [str((Path(inputs["list"]).parent / r["path"]).resolve()) for r in rows], "label": [r["label"] for r in rows]})
    pq.write_table(table, tmp_path / "images.parquet")
    manifest = run_embed(small_embed_config(tmp_path / "images.parquet", tmp_path / "out"))
    assert manifest["dataset"]["kind"] == "filelist" and manifest["samples"]["written"] == 300
    assert (tmp_path / "out" / "transport.npz").read_bytes() == (imagefolder_run / "transport.npz").read_bytes()

    index = scan_image_folder(TRAIN_DIR)
    big = io.BytesIO()
    Image.new("RGB", (4000, 4000)).save(big, "PNG")  # 16 Mpx, over the limit set below
    with tarfile.open(tmp_path / "bomb.tar", "w", format=tarfile.USTAR_FORMAT) as archive:
        for i in range(4):
            add_member(archive, f"s{i}.png", (index.root / index.files[i]).read_bytes())
        add_member(archive, "bomb.png", big.getvalue())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # in this process: embed decodes in it (num_workers=0)
    manifest = run_embed(small_embed_config(tmp_path / "bomb.tar", tmp_path / "bombed", batch_size=2, shard_size=2))
    assert manifest["samples"]["written"] == 4
    assert [s["path"] for s in manifest["skipped"]] == ["bomb.tar/bomb"] and "DecompressionBomb" in manifest["skipped"][0]["reason"]
