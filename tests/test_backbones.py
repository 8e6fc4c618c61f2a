"""Students and priors from torchvision and timm, and ``export`` of a trained backbone into each
library's own model: on the real fixture, on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from torch import nn

from rela_pipeline import priors
from rela_pipeline.errors import RelaError
from rela_pipeline.imagefolder import decode_rgb, scan_image_folder
from rela_pipeline.models import (
    TORCHVISION_HEADS,
    TORCHVISION_WITHOUT_LINEAR_HEAD,
    build_backbone,
    check_backbone_name,
    check_input_size,
    load_backbone_checkpoint,
    save_backbone_checkpoint,
)
from rela_pipeline.priors import Preprocessing, load_prior
from rela_pipeline.runtime import uses_channels_last
from rela_pipeline.stages.embed import run_embed
from rela_pipeline.stages.evaluate import EvalConfig, run_eval
from rela_pipeline.stages.export import export_backbone
from rela_pipeline.stages.train import TrainConfig, run_train
from tests.conftest import TEST_DIR, TRAIN_DIR, assert_one_line_error, run_cli, small_embed_config

#: The four students: name -> (feature width, convolutional (channels_last), export format).
STUDENTS = {
    "timm:resnet10t": (512, True, "timm"),
    "timm:vit_tiny_patch16_224": (192, False, "timm"),
    "torchvision:mobilenet_v3_small": (1024, True, "torchvision"),
    "torchvision:resnet18": (512, True, "torchvision"),
}


def fixture_batch(preprocessing: dict, n: int = 8) -> torch.Tensor:
    """The first ``n`` fixture train images as a normalised float32 ``(n, 3, S, S)`` batch, with a
    checkpoint's recorded preprocessing (what ``eval`` feeds the backbone)."""
    prep = Preprocessing.from_dict(preprocessing)
    index = scan_image_folder(TRAIN_DIR)
    transform = prep.to_uint8_transform()
    images = torch.stack([transform(decode_rgb(index.root / f)) for f in index.files[:n]])
    return prep.normalise(images)


@pytest.fixture(scope="module", params=list(STUDENTS))
def student_run(request, shard_set, tmp_path_factory) -> tuple[str, Path, dict]:
    """Each student trained 2 steps of BYOL + ReLA at 32 px on the fixture shard set:
    ``(name, run directory, summary)``."""
    shards, _ = shard_set
    name = request.param
    run = tmp_path_factory.mktemp("student") / "run"
    config = TrainConfig(
        shards=str(shards),
        out_dir=run,
        backbone=name,
        epochs=1,
        batch_size=32,
        data_ratio=0.25,  # 75 samples: 2 steps, both in the ReLA phase of the adaptive schedule
        precision="fp32",
        num_workers=0,
        log_every=1,
        progress=False,
        device="cpu",
        verify=False,
    )
    return name, run, run_train(config)


# ---------------------------------------------------------------- students


def test_each_student_trains_with_rela_and_its_checkpoint_evaluates(student_run):
    name, run, summary = student_run
    feature_dim, convolutional, _ = STUDENTS[name]
    assert summary["budget"]["steps"] == 2
    assert summary["resolved"]["memory_format"] == ("channels_last" if convolutional else "contiguous")
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rela_losses = [r["rela_loss"] for r in logged if "rela_loss" in r]
    assert len(rela_losses) == 2 and all(0.0 <= loss <= 2.0 for loss in rela_losses)  # 1 - cos, finite

    payload = torch.load(run / "backbone.pt", weights_only=True)
    assert payload["backbone"] == {"name": name, "cifar_stem": True, "image_size": 32}
    assert payload["feature_dim"] == feature_dim
    backbone, meta = load_backbone_checkpoint(run / "backbone.pt")
    assert backbone(fixture_batch(meta["preprocessing"], 4)).shape == (4, feature_dim)
    # The CIFAR stem applies to the ResNets only.
    assert backbone.cifar_stem == ("resnet" in name)

    result = run_eval(
        EvalConfig(
            checkpoint=run / "backbone.pt",
            train_dir=TRAIN_DIR,
            test_dir=TEST_DIR,
            device="cpu",
            num_workers=0,
            probe_epochs=3,
            probe_lr=1e-3,
            knn_k=20,
            progress=False,
        )
    )
    assert result["backbone"] == payload["backbone"] and result["feature_dim"] == feature_dim and result["image_size"] == 32
    assert result["step"] == 2 and result["test_samples"] == 100
    assert 0.0 <= result["linear_probe"]["top1"] <= 1.0 and 0.0 <= result["knn"]["top1"] <= 1.0


def test_short_names_keep_their_module_structure_and_old_checkpoints_load(tmp_path):
    torch.manual_seed(0)
    short = build_backbone("resnet18", cifar_stem=True)
    reference = torchvision.models.resnet18()
    expected = {f"net.{k}": v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    expected["net.conv1.weight"] = torch.Size([64, 3, 3, 3])
    assert {k: v.shape for k, v in short.state_dict().items()} == expected
    assert isinstance(short.net.maxpool, nn.Identity) and isinstance(short.net.fc, nn.Identity)
    # A checkpoint in the old layout (no image_size) loads, and the library name has the same keys.
    path = tmp_path / "old.pt"
    save_backbone_checkpoint(path, short, {"name": "resnet18", "cifar_stem": True})
    loaded, meta = load_backbone_checkpoint(path)
    assert meta["backbone"] == {"name": "resnet18", "cifar_stem": True}
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images), short.eval()(images))
    library = build_backbone("torchvision:resnet18", cifar_stem=True, image_size=32)
    assert {k: v.shape for k, v in library.state_dict().items()} == expected


@pytest.fixture(scope="module")
def torchvision_vit() -> nn.Module:
    """``torchvision:vit_b_16`` built for 32 px (the smallest torchvision ViT: 86M parameters)."""
    return build_backbone("torchvision:vit_b_16", image_size=32)


def test_cifar_stem_of_both_libraries_and_vit_image_size(torchvision_vit):
    timm_resnet = build_backbone("timm:resnet10t", cifar_stem=True, image_size=32)
    assert isinstance(timm_resnet.net.conv1, nn.Conv2d) and timm_resnet.net.conv1.stride == (1, 1) and timm_resnet.net.conv1.kernel_size == (3, 3)
    assert isinstance(timm_resnet.net.maxpool, nn.Identity) and timm_resnet.cifar_stem
    assert not build_backbone("timm:resnet10t", cifar_stem=False, image_size=32).cifar_stem
    resnext = build_backbone("torchvision:resnext50_32x4d", cifar_stem=True, image_size=32)
    assert resnext.cifar_stem and resnext.net.conv1.kernel_size == (3, 3) and resnext.feature_dim == 2048
    vit = build_backbone("timm:vit_tiny_patch16_224", cifar_stem=True, image_size=32)
    assert not vit.cifar_stem and vit.kwargs == {"img_size": 32, "dynamic_img_size": True}
    assert vit.net.pos_embed.shape[1] == 1 + (32 // 16) ** 2  # the position embeddings of a 2 x 2 grid
    assert vit(torch.randn(2, 3, 48, 48)).shape == (2, 192)  # dynamic sizes: DINO's crops, eval at another size
    tv_vit = torchvision_vit
    assert tv_vit.kwargs == {"image_size": 32} and tv_vit.feature_dim == 768 and tv_vit.head == "heads.head"
    check_input_size(tv_vit, 32, "vit")
    with pytest.raises(RelaError, match="takes only 32 x 32 px inputs"):
        check_input_size(tv_vit, 64, "vit")
    with pytest.raises(RelaError, match="cannot take 32 x 32 px images"):
        build_backbone("torchvision:inception_v3", image_size=32)  # needs 75 px and more


def test_channels_last_for_convolutional_students_only(torchvision_vit):
    for name in ("convnet", "resnet18", "timm:resnet10t", "torchvision:mobilenet_v3_small", "torchvision:convnext_tiny"):
        assert uses_channels_last(build_backbone(name, image_size=32 if ":" in name else None)), name
    for name in ("timm:vit_tiny_patch16_224", "torchvision:swin_t"):  # convolutions only in the patch embedding
        assert not uses_channels_last(build_backbone(name, image_size=32)), name
    assert not uses_channels_last(torchvision_vit)


def test_models_without_a_linear_head_are_exactly_the_listed_ones():
    """Built on the meta device (no memory, no initialisation): the classification models whose
    head attribute holds no ``nn.Linear`` are :data:`TORCHVISION_WITHOUT_LINEAR_HEAD`."""
    without, checked = set(), 0
    for arch in torchvision.models.list_models(module=torchvision.models):
        kwargs = {"aux_logits": False, "init_weights": False} if arch in ("googlenet", "inception_v3") else {}
        try:
            with torch.device("meta"):
                model = torchvision.models.get_model(arch, weights=None, **kwargs)
        except NotImplementedError:  # RegNets compute their widths with tensors; one real build stands for the family
            assert arch.startswith("regnet_"), arch
            if arch != "regnet_x_400mf":
                continue
            model = torchvision.models.get_model(arch, weights=None)
        checked += 1
        head = next((getattr(model, a) for a in TORCHVISION_HEADS if isinstance(getattr(model, a, None), nn.Module)), None)
        if head is None or not any(isinstance(m, nn.Linear) for m in head.modules()):
            without.add(arch)
    assert checked > 50 and without == set(TORCHVISION_WITHOUT_LINEAR_HEAD)


# ---------------------------------------------------------------- export


def test_export_round_trips_through_the_library_constructor(student_run, tmp_path):
    name, run, _ = student_run
    feature_dim, _, library = STUDENTS[name]
    backbone, meta = load_backbone_checkpoint(run / "backbone.pt")
    batch = fixture_batch(meta["preprocessing"])
    with torch.no_grad():
        expected = backbone(batch)

    # The API, torch.save: the printed lines rebuild the library's model, and it gives the same features.
    result = export_backbone(run, library, tmp_path / "weights.pt")
    sidecar = json.loads(Path(result["sidecar"]).read_text())
    assert sidecar["library"] == library and sidecar["feature_dim"] == feature_dim and sidecar["step"] == 2
    assert sidecar["run"] == str(run.resolve()) and sidecar["cifar_stem"] == ("resnet" in name)
    assert sidecar[("arch" if library == "torchvision" else "name")] == name.partition(":")[2]
    state = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert not any(k.startswith("net.") for k in state)
    if library == "torchvision":
        model = torchvision.models.get_model(sidecar["arch"], weights=None, **sidecar["kwargs"])
        if sidecar["cifar_stem"]:
            model.conv1, model.maxpool = nn.Conv2d(3, sidecar["stem_channels"], 3, 1, 1, bias=False), nn.Identity()
        report = model.load_state_dict(state, strict=False)
        assert sorted(report.missing_keys) == sorted(sidecar["missing_keys"]) and report.unexpected_keys == []
    else:
        model = timm.create_model(sidecar["name"], num_classes=0, **sidecar["kwargs"])
        if sidecar["cifar_stem"]:
            model.conv1, model.maxpool = nn.Conv2d(3, sidecar["stem_channels"], 3, 1, 1, bias=False), nn.Identity()
        model.load_state_dict(state, strict=True)
    namespace: dict = {}
    exec("\n".join(result["load"]), namespace)  # the lines the CLI prints
    for built in (namespace["model"],):
        with torch.no_grad():
            torch.testing.assert_close(built.eval()(batch), expected)

    # The CLI, safetensors: same tensors, and its printed lines load it too.
    out = tmp_path / "weights.safetensors"
    code, stdout, stderr = run_cli("export", str(run), "--format", library, "--safetensors", "--out", str(out))
    assert code == 0, stderr
    lines = [line[4:] for line in stdout.splitlines() if line.startswith("    ")]
    assert any("load_state_dict(safetensors.torch.load_file(" in line for line in lines)
    loaded = safetensors.torch.load_file(out)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    namespace = {}
    exec("\n".join(lines), namespace)
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"].eval()(batch), expected)
    assert not list(tmp_path.glob("*.partial"))  # atomic writes leave no temporary file


def test_state_dict_export_keeps_the_project_keys(student_run, tmp_path):
    name, run, _ = student_run
    result = export_backbone(run / "backbone.pt", "state_dict", tmp_path / "sd.safetensors", safetensors=True)
    backbone, meta = load_backbone_checkpoint(run / "backbone.pt")
    state = safetensors.torch.load_file(tmp_path / "sd.safetensors")
    assert state.keys() == backbone.state_dict().keys() and result["library"] == "rela-pipeline"
    namespace: dict = {}
    exec("\n".join(result["load"]), namespace)
    batch = fixture_batch(meta["preprocessing"], 4)
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"].eval()(batch), backbone(batch))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("backbone", "fragment"),
    [
        ("torchvision:resnet19", "unknown torchvision model 'resnet19'; did you mean torchvision:resnet18"),
        ("timm:resnet10x", "unknown timm model 'resnet10x'; did you mean timm:resnet10t"),
        ("torchvision:squeezenet1_0", "torchvision:squeezenet1_0 has no pooled-feature output"),
        ("torchvision:fasterrcnn_resnet50_fpn", "torchvision:fasterrcnn_resnet50_fpn is a detection model"),
        ("torchvision:deeplabv3_resnet50", "is a segmentation model"),
        ("vit", "unknown backbone 'vit'"),
    ],
)
def test_bad_backbone_names_are_one_line_before_anything_is_written(shard_set, tmp_path, backbone, fragment):
    shards, _ = shard_set
    code, _, stderr = run_cli("train", "--shards", str(shards), "--out", str(tmp_path / "run"), "--backbone", backbone)
    assert_one_line_error(code, stderr, fragment)
    assert not (tmp_path / "run").exists()


def test_check_backbone_name_accepts_library_names_without_building():
    for name in ("convnet", "torchvision:regnet_y_128gf", "timm:vit_giant_patch14_224", "timm:resnet18.a1_in1k"):
        check_backbone_name(name)


def test_bad_exports_are_one_line(tmp_path):
    convnet = tmp_path / "convnet.pt"
    save_backbone_checkpoint(convnet, build_backbone("convnet"), {"name": "convnet", "cifar_stem": True})
    timm_run = tmp_path / "timm-run"
    timm_run.mkdir()
    save_backbone_checkpoint(
        timm_run / "backbone.pt", build_backbone("timm:resnet10t", True, 32), {"name": "timm:resnet10t", "cifar_stem": True, "image_size": 32}
    )
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "checkpoints" / "last.pt").write_bytes(b"")
    out = str(tmp_path / "w.pt")
    cases = [
        ((str(timm_run), "--format", "torchvision"), "timm:resnet10t exports as --format timm or state_dict, not torchvision"),
        ((str(convnet), "--format", "timm"), "convnet exports as --format state_dict, not timm"),
        ((str(tmp_path / "nothing"), "--format", "timm"), "no run directory or checkpoint at"),
        ((str(unfinished), "--format", "timm"), "checkpoints/last.pt (the last epoch's checkpoint) instead"),
        ((str(timm_run), "--format", "onnx"), "--format must be one of torchvision, timm, state_dict"),
    ]
    for args, fragment in cases:
        code, _, stderr = run_cli("export", *args, "--out", out)
        assert_one_line_error(code, stderr, fragment)
    code, _, stderr = run_cli("export", str(timm_run), "--format", "timm", "--out", str(tmp_path / "w.safetensors"))
    assert_one_line_error(code, stderr, "add --safetensors")
    assert not (tmp_path / "w.pt").exists() and not (tmp_path / "w.safetensors").exists()


# ---------------------------------------------------------------- priors


def test_timm_random_prior_is_seeded_and_uses_timms_data_config():
    a, b, c = (load_prior("timm:resnet10t:random", seed=s) for s in (1, 1, 2))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_a, out_b, out_c = (p.model(p.preprocessing.normalise(images)) for p in (a, b, c))
    assert out_a.shape == (2, 512)
    torch.testing.assert_close(out_a, out_b)
    assert not torch.allclose(out_a, out_c)
    cfg = timm.data.resolve_model_data_config(timm.create_model("resnet10t", num_classes=0))
    assert a.preprocessing.crop_size == cfg["input_size"][-1] == 176
    assert a.preprocessing.resize_size == int(176 / cfg["crop_pct"])  # floor(crop / crop_pct) = 201
    assert (a.preprocessing.interpolation, a.preprocessing.mean, a.preprocessing.std) == (cfg["interpolation"], cfg["mean"], cfg["std"])
    vit = load_prior("timm:vit_tiny_patch16_224:random", image_size=32)  # dynamic image size: 224 px weights at 32 px
    assert vit.preprocessing.crop_size == 32 and vit.preprocessing.mean == (0.5, 0.5, 0.5)
    with torch.no_grad():
        assert vit.model(torch.zeros(1, 3, 32, 32)).shape == (1, 192)


def test_timm_priors_random_and_from_files_embed_the_fixture(tmp_path):
    torch.manual_seed(3)
    classifier = timm.create_model("resnet10t", num_classes=10)  # with its head: dropped on load
    torch.save(classifier.state_dict(), tmp_path / "classifier.pth")
    headless = timm.create_model("resnet10t", num_classes=0)
    headless.load_state_dict({k: v for k, v in classifier.state_dict().items() if not k.startswith("fc.")})
    safetensors.torch.save_file({k: v.contiguous() for k, v in headless.state_dict().items()}, tmp_path / "headless.safetensors")

    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for file in ("classifier.pth", "headless.safetensors"):
        prior = load_prior(f"timm:resnet10t:{tmp_path / file}", image_size=32)
        assert prior.weights["path"] == str(tmp_path / file) and prior.weights["sha256"]
        x = prior.preprocessing.normalise(images)
        with torch.no_grad():
            torch.testing.assert_close(prior.model(x), headless.eval()(x))

    for i, spec in enumerate(("timm:resnet10t:random", f"timm:resnet10t:{tmp_path / 'headless.safetensors'}")):
        out = tmp_path / f"shards-{i}"
        manifest = run_embed(small_embed_config(TRAIN_DIR, out, prior=spec))
        assert manifest["prior"]["spec"] == spec and manifest["prior"]["embedding_dim"] == 512
        assert manifest["samples"]["written"] == 300


def test_timm_prior_bad_input_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(priors, "_hub_is_reachable", lambda host, timeout_s=3.0: False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-torch-hub"))
    data, out = str(TRAIN_DIR), str(tmp_path / "shards")
    cases = [
        ("timm:resnet10t", "cannot load timm:resnet10t: the model hub is unreachable and the weights are not in the local cache"),
        ("timm:resnet10x:random", "unknown timm model 'resnet10x'; did you mean timm:resnet10t"),
        (f"timm:resnet10t:{tmp_path / 'missing.pth'}", "timm weights file for resnet10t not found"),
        ("timm", "timm:<name>[:<weights file>|random]"),  # the valid forms, this one among them
    ]
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), tmp_path / "resnet18.pth")
    cases.append((f"timm:resnet10t:{tmp_path / 'resnet18.pth'}", "does not fit the architecture"))
    for spec, fragment in cases:
        code, _, stderr = run_cli("embed", "--data", data, "--prior", spec, "--out", out, "--image-size", "32", "--num-workers", "0")
        assert_one_line_error(code, stderr, fragment)
