"""Stage one's two decode paths (``--decode cpu`` in the workers, ``--decode gpu`` batched on the
device) on a JPEG ImageFolder made from the real fixture, run on the CPU through the device
path's own code (torchvision's CPU JPEG decoder in place of nvJPEG)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rela_pipeline.imagefolder import scan_image_folder
from rela_pipeline.priors import Preprocessing
from rela_pipeline.stages.embed import run_embed
from rela_pipeline.stages.embed.decoding import EncodedImages, EncodedItem, decode_on_device, device_decodable_jpeg
from tests.conftest import TRAIN_DIR, small_embed_config
from tests.test_torchrun_embed import samples

#: PNG files kept as PNG (one per class: the CPU decoder takes them on both paths).
KEPT_PNG = 10


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> Path:
    """The fixture's train split as JPEGs (quality 90, in colour so chroma subsampling is in
    play), the first image of each class kept as PNG, plus a CMYK JPEG, a truncated JPEG and a
    text file named ``.jpg``."""
    root = tmp_path_factory.mktemp("jpegs") / "train"
    for class_dir in sorted(p for p in TRAIN_DIR.iterdir() if p.is_dir()):
        (root / class_dir.name).mkdir(parents=True)
        for i, png in enumerate(sorted(class_dir.glob("*.png"))):
            if i == 0:
                shutil.copy(png, root / class_dir.name / png.name)
                continue
            gray = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
            colour = np.stack([gray, gray[::-1] * 0.7 + 40, 255 - gray], axis=-1).clip(0, 255).astype(np.uint8)
            Image.fromarray(colour).save(root / class_dir.name / f"{png.stem}.jpg", quality=90)
    first_class = sorted(root.iterdir())[0]
    Image.open(next(first_class.glob("*.jpg"))).convert("CMYK").save(first_class / "zz-cmyk.jpg", quality=90)
    whole = (next(first_class.glob("*.jpg"))).read_bytes()
    (first_class / "zz-truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (first_class / "zz-text.jpg").write_text("not an image\n")
    return root


def test_jpegs_decoded_on_the_device_path_give_the_cpu_paths_targets(jpeg_folder, tmp_path):
    cpu = run_embed(small_embed_config(jpeg_folder, tmp_path / "cpu", decode="cpu"))
    device = run_embed(small_embed_config(jpeg_folder, tmp_path / "device", decode="gpu"))
    assert cpu["resolved"]["decode"] == "cpu" and device["resolved"]["decode"] == "gpu"
    jpegs = 300 - KEPT_PNG  # every colour JPEG (the CMYK one goes to the CPU decoder)
    assert device["throughput"]["decoded_by"] == {"device": jpegs, "cpu": KEPT_PNG + 1, "failed": 2}
    assert "decoded_by" not in cpu["throughput"]
    # The same two files skipped for the same reasons on both paths.
    assert device["skipped"] == cpu["skipped"] and [s["path"].rsplit("/", 1)[1] for s in cpu["skipped"]] == ["zz-text.jpg", "zz-truncated.jpg"]
    # torchvision's CPU decoder and PIL are both libjpeg-turbo: identical pixels, identical targets.
    assert (tmp_path / "cpu" / "transport.npz").read_bytes() == (tmp_path / "device" / "transport.npz").read_bytes()
    on_cpu, on_device = samples(tmp_path / "cpu"), samples(tmp_path / "device")
    assert on_cpu.keys() == on_device.keys() and len(on_cpu) == 301
    assert all(np.array_equal(on_cpu[key]["target"], on_device[key]["target"]) for key in on_cpu)


def test_a_jpeg_the_device_decoder_refuses_is_skipped_and_the_rest_of_the_batch_is_decoded(jpeg_folder):
    preprocessing = Preprocessing(resize_size=32, crop_size=32, resize_mode="squash")
    source = scan_image_folder(jpeg_folder)
    rows = [r for r, name in enumerate(source.files) if name.endswith(".jpg") and "zz-" not in name][:3]
    files = [source.files[r] for r in rows]
    items = [EncodedImages(source, r, r + 1, preprocessing)[0] for r in rows]
    assert all(item.jpeg is not None for item in items)
    # JPEG magic and end marker around garbage, handed over as a worker hands a JPEG it let
    # through: the device decoder refuses it, then PIL does.
    garbage = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9"
    items.insert(1, EncodedItem(99, jpeg=torch.frombuffer(bytearray(garbage), dtype=torch.uint8)))
    images, decoded, reasons = decode_on_device(items, preprocessing, torch.device("cpu"))
    assert decoded.tolist() == [True, False, True, True]
    assert reasons[1] and not any(reasons[k] for k in (0, 2, 3))
    assert images[1].eq(0).all() and images[0].float().std() > 0
    whole = Image.open(jpeg_folder / files[0]).convert("RGB").resize((32, 32), Image.BILINEAR)
    assert (images[0].permute(1, 2, 0).int() - torch.from_numpy(np.array(whole)).int()).abs().float().mean() < 3


def test_the_worker_refuses_a_decompression_bomb_as_the_cpu_path_does(jpeg_folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # every 28 x 28 image is then over the limit
    source = scan_image_folder(jpeg_folder)
    row = next(r for r, name in enumerate(source.files) if name.endswith(".jpg") and "zz-" not in name)
    name = source.files[row]
    item = EncodedImages(source, row, row + 1, Preprocessing(resize_size=32, crop_size=32))[0]
    assert item.jpeg is None and item.pixels is None and "DecompressionBomb" in item.reason
    data = (jpeg_folder / name).read_bytes()
    with pytest.raises(Image.DecompressionBombError):
        device_decodable_jpeg(data)
    assert io.BytesIO(data).read(3) == b"\xff\xd8\xff"
