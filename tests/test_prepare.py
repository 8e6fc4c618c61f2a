"""Tests of the prepare stage (Fashion-MNIST IDX files -> ImageFolder PNG tree)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rela_pipeline.errors import RelaError
from rela_pipeline.stages.prepare import (
    FASHION_MNIST_CLASSES,
    SYSTEM_FASHION_MNIST_DIR,
    prepare_fashion_mnist,
    read_idx,
)

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "fashion_mnist_mini"


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """Encode a uint8 array in IDX format: big-endian int32 magic, uint32 dims, raw bytes."""
    header = struct.pack(">i", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int, gzipped: bool) -> Path:
    """Write ``array`` as an IDX file, gzip-compressed if ``gzipped``; return the path."""
    data = idx_bytes(array, magic)
    path.write_bytes(gzip.compress(data, mtime=0) if gzipped else data)
    return path


def fixture_samples(split: str, class_ids: tuple[int, ...], per_class: int):
    """Load ``per_class`` fixture PNGs of each class: list of (uint8 (28, 28) pixels, label)."""
    samples = []
    for label in class_ids:
        class_dir = FIXTURE_DIR / split / FASHION_MNIST_CLASSES[label]
        for png in sorted(class_dir.glob("*.png"))[:per_class]:
            samples.append((np.array(Image.open(png)), label))
    return samples


def write_source(directory: Path, train, test) -> Path:
    """Write train (gzipped) and test (raw) IDX files of the given samples into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for samples, prefix, gzipped in ((train, "train", True), (test, "t10k", False)):
        images = np.stack([pixels for pixels, _ in samples])
        labels = np.array([label for _, label in samples], dtype=np.uint8)
        suffix = ".gz" if gzipped else ""
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, 2051, gzipped)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 2049, gzipped)
    return directory


def interleave(samples):
    """Reorder samples so that classes alternate (exercises index-based file names)."""
    return samples[::2] + samples[1::2]


@pytest.fixture
def tiny_source(tmp_path):
    """A source dir with 6 train images (classes 0, 3, 9) and 4 test images (classes 1, 7)."""
    train = interleave(fixture_samples("train", (0, 3, 9), per_class=2))
    test = interleave(fixture_samples("test", (1, 7), per_class=2))
    return write_source(tmp_path / "src", train, test), train, test


def png_files(split_dir: Path) -> list[Path]:
    """All files below ``split_dir``, sorted, as paths relative to it."""
    return sorted(p.relative_to(split_dir) for p in split_dir.rglob("*") if p.is_file())


def test_round_trip_reproduces_pixels_labels_and_layout(tmp_path, tiny_source):
    source, train, test = tiny_source
    out = tmp_path / "out"

    summary = prepare_fashion_mnist(out, source=source)

    assert summary == {
        "source": str(source),
        "splits": {"train": {"images": 6, "classes": 3}, "test": {"images": 4, "classes": 2}},
        "out_dir": str(out),
    }
    for split, samples in (("train", train), ("test", test)):
        expected = {Path(FASHION_MNIST_CLASSES[label]) / f"{index:05d}.png": pixels for index, (pixels, label) in enumerate(samples)}
        assert png_files(out / split) == sorted(expected)
        for relative, pixels in expected.items():
            with Image.open(out / split / relative) as image:
                assert image.mode == "L" and image.size == (28, 28)
                np.testing.assert_array_equal(np.array(image), pixels)
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]


def test_limit_per_class_keeps_first_images_of_each_class(tmp_path, tiny_source):
    source, train, _ = tiny_source
    out = tmp_path / "out"

    summary = prepare_fashion_mnist(out, source=source, splits=("train",), limit_per_class=1)

    first_index = {}
    for index, (_, label) in enumerate(train):
        first_index.setdefault(label, index)
    expected = sorted(Path(FASHION_MNIST_CLASSES[label]) / f"{index:05d}.png" for label, index in first_index.items())
    assert png_files(out / "train") == expected
    assert summary["splits"] == {"train": {"images": 3, "classes": 3}}
    assert not (out / "test").exists()


def test_output_bytes_are_deterministic(tmp_path, tiny_source):
    source, _, _ = tiny_source
    prepare_fashion_mnist(tmp_path / "a", source=source)
    prepare_fashion_mnist(tmp_path / "b", source=source)
    for relative in png_files(tmp_path / "a" / "train"):
        first = (tmp_path / "a" / "train" / relative).read_bytes()
        assert first == (tmp_path / "b" / "train" / relative).read_bytes()


def test_missing_source_dir_raises(tmp_path):
    with pytest.raises(RelaError, match="does not exist"):
        prepare_fashion_mnist(tmp_path / "out", source=tmp_path / "no-such-dir")
    assert not (tmp_path / "out").exists()


def test_source_missing_a_file_raises_naming_it(tmp_path, tiny_source):
    source, _, _ = tiny_source
    (source / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(RelaError, match="t10k-labels-idx1-ubyte"):
        prepare_fashion_mnist(tmp_path / "out", source=source)
    # Only the requested splits need their files.
    assert prepare_fashion_mnist(tmp_path / "out", source=source, splits=("train",))


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda data: struct.pack(">i", 2052) + data[4:], id="bad-magic"),
        pytest.param(lambda data: data[:-10], id="truncated-data"),
        pytest.param(lambda data: data[:10], id="truncated-header"),
        pytest.param(lambda data: data + b"\x00", id="trailing-bytes"),
    ],
)
def test_malformed_idx_raises_naming_the_file(tmp_path, tiny_source, corrupt):
    source, _, _ = tiny_source
    bad = source / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(corrupt(gzip.decompress(bad.read_bytes()))))

    with pytest.raises(RelaError, match="train-images-idx3-ubyte.gz"):
        read_idx(bad)
    with pytest.raises(RelaError, match="train-images-idx3-ubyte.gz"):
        prepare_fashion_mnist(tmp_path / "out", source=source)
    assert not (tmp_path / "out" / "train").exists()


def test_corrupt_gzip_raises_naming_the_file(tmp_path):
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(idx_bytes(np.zeros(5, np.uint8), 2049))[:-8])
    with pytest.raises(RelaError, match="train-labels-idx1-ubyte.gz"):
        read_idx(bad)


def test_existing_split_is_kept_unless_overwrite(tmp_path, tiny_source):
    source, _, _ = tiny_source
    out = tmp_path / "out"
    keep = out / "train" / "keep.txt"
    keep.parent.mkdir(parents=True)
    keep.write_text("previous run")

    with pytest.raises(RelaError, match="overwrite"):
        prepare_fashion_mnist(out, source=source)
    assert png_files(out / "train") == [Path("keep.txt")]
    assert keep.read_text() == "previous run"
    assert sorted(p.name for p in out.iterdir()) == ["train"]  # test split not written either

    prepare_fashion_mnist(out, source=source, overwrite=True)
    assert not keep.exists()
    assert len(png_files(out / "train")) == 6
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]


def test_interrupted_write_leaves_no_split(tmp_path, tiny_source, monkeypatch):
    source, _, _ = tiny_source
    out = tmp_path / "out"
    real_save = Image.Image.save
    calls = []

    def save_then_interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_fashion_mnist(out, source=source)
    assert list(out.iterdir()) == []


@pytest.mark.skipif(
    not (SYSTEM_FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_dataset_limit_matches_read_idx(tmp_path):
    out = tmp_path / "out"
    summary = prepare_fashion_mnist(out, limit_per_class=2)

    assert summary["source"] == str(SYSTEM_FASHION_MNIST_DIR)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        assert summary["splits"][split] == {"images": 20, "classes": 10}
        images = read_idx(SYSTEM_FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(SYSTEM_FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        assert images.shape[1:] == (28, 28) and images.dtype == np.uint8
        assert labels.shape == images.shape[:1] and labels.dtype == np.uint8
        files = png_files(out / split)
        assert len(files) == 20
        for relative in files:
            index = int(relative.stem)
            assert relative.parent.name == FASHION_MNIST_CLASSES[labels[index]]
            with Image.open(out / split / relative) as image:
                np.testing.assert_array_equal(np.array(image), images[index])
        # The first two images of each class, in IDX order.
        for label, class_name in enumerate(FASHION_MNIST_CLASSES):
            chosen = sorted(int(f.stem) for f in files if f.parent.name == class_name)
            assert chosen == list(np.flatnonzero(labels == label)[:2])
