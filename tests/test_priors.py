"""Prior specs: parsing, seeded random priors, local weights files, checkpoints, safe loading."""

from __future__ import annotations

import os
import pickle
import time

import pytest
import torch
import torchvision

from rela_pipeline import priors
from rela_pipeline.errors import RelaError
from rela_pipeline.models import build_backbone, save_backbone_checkpoint
from rela_pipeline.priors import load_prior


def forward(prior, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return prior.model(prior.preprocessing.normalise(images))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec", ["resnet18", "random", "random:", "hub:resnet18", "torchvision"])
def test_unknown_spec_lists_the_valid_forms(spec):
    with pytest.raises(RelaError) as error:
        load_prior(spec)
    message = str(error.value)
    assert "\n" not in message
    assert all(form in message for form in priors.SPEC_FORMS)


def test_unknown_architecture_is_named():
    with pytest.raises(RelaError, match="unknown torchvision architecture 'resnet19'"):
        load_prior("random:resnet19")


def test_random_prior_is_seeded_and_headless(images):
    a, b, c = load_prior("random:resnet18", seed=1), load_prior("random:resnet18", seed=1), load_prior("random:resnet18", seed=2)
    out_a, out_b, out_c = forward(a, images), forward(b, images), forward(c, images)
    assert out_a.shape == (3, 512)  # the fc classifier is gone: pooled features
    torch.testing.assert_close(out_a, out_b)
    assert not torch.allclose(out_a, out_c)
    assert a.preprocessing.crop_size == 224 and a.preprocessing.mean == priors.IMAGENET_MEAN


def test_torchvision_weights_file_loads_exactly(tmp_path, images):
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    prior = load_prior(f"torchvision:resnet18:{path}", image_size=32)
    reference.fc = torch.nn.Identity()
    reference.eval()
    expected = reference(prior.preprocessing.normalise(images))
    torch.testing.assert_close(forward(prior, images), expected)
    assert prior.weights["sha256"] and prior.weights["path"] == str(path)
    assert prior.preprocessing.crop_size == 32


def test_torchvision_weights_file_without_its_classifier_loads_into_the_headless_model(tmp_path, images):
    reference = torchvision.models.mobilenet_v3_small()  # the classifier is classifier.3, after another linear
    reference.classifier[3] = torch.nn.Identity()  # as a student's export or an SSL checkpoint holds it
    path = tmp_path / "mobilenet_headless.pth"
    torch.save(reference.state_dict(), path)
    assert not any(k.startswith("classifier.3.") for k in torch.load(path)) and "classifier.0.weight" in torch.load(path)
    prior = load_prior(f"torchvision:mobilenet_v3_small:{path}", image_size=32)
    reference.eval()
    torch.testing.assert_close(forward(prior, images), reference(prior.preprocessing.normalise(images)))
    broken = {k: v for k, v in reference.state_dict().items() if not k.startswith("classifier.0.")}
    torch.save(broken, path)  # a headless file still has to hold every other key
    with pytest.raises(RelaError, match="2 missing keys"):
        load_prior(f"torchvision:mobilenet_v3_small:{path}", image_size=32)


def test_weights_file_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(RelaError, match="does not fit the architecture"):
        load_prior(f"torchvision:resnet34:{path}")


def test_missing_weights_file():
    with pytest.raises(RelaError, match="not found"):
        load_prior("torchvision:resnet18:/nonexistent/weights.pth")


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": _Exploit(str(marker))}, handle)
    with pytest.raises(RelaError, match="not a plain weights file"):
        load_prior(f"torchvision:resnet18:{path}")
    with pytest.raises(RelaError, match="not a plain weights file"):
        load_prior(f"checkpoint:{path}")
    assert not marker.exists()


def test_project_checkpoint_is_a_prior(tmp_path, images):
    backbone = build_backbone("convnet").eval()
    path = tmp_path / "backbone.pt"
    save_backbone_checkpoint(path, backbone, {"name": "convnet"}, preprocessing={"resize_size": 32, "crop_size": 32}, step=7)
    prior = load_prior(f"checkpoint:{path}")
    assert prior.preprocessing.crop_size == 32
    assert "step 7" in prior.weights["source"]
    torch.testing.assert_close(forward(prior, images), backbone(prior.preprocessing.normalise(images)))


def test_checkpoint_of_unknown_format_is_refused(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(RelaError, match="not a rela-pipeline backbone checkpoint"):
        load_prior(f"checkpoint:{path}")


def test_open_clip_tag_fails_fast_and_clearly_offline(monkeypatch):
    monkeypatch.setattr(priors, "_hub_is_reachable", lambda host, timeout_s=3.0: False)
    start = time.perf_counter()
    with pytest.raises(RelaError, match="unreachable.*weights file"):
        load_prior("open_clip:RN50:openai")
    assert time.perf_counter() - start < 30  # cache-only lookup, no network retries


def test_open_clip_unknown_model_and_tag():
    with pytest.raises(RelaError, match="unknown open_clip model"):
        load_prior("open_clip:NoSuchModel:random")
    with pytest.raises(RelaError, match="no pretrained tag 'nosuchtag'"):
        load_prior("open_clip:RN50:nosuchtag")
    with pytest.raises(RelaError, match="needs a pretrained tag"):
        load_prior("open_clip:RN50")


def test_open_clip_random_image_tower(images):
    prior = load_prior("open_clip:ViT-B-32:random", seed=0)
    assert prior.preprocessing.crop_size == 224 and prior.preprocessing.interpolation == "bicubic"
    resized = torch.nn.functional.interpolate(images.float(), size=224).to(torch.uint8)
    assert forward(prior, resized).shape == (3, 512)


def test_open_clip_weights_file_loads_with_the_weights_only_loader(images, tmp_path):
    """A training checkpoint (``state_dict`` under DDP's ``module.`` prefix) gives the model it
    was saved from; a pickle that would run code is refused before anything runs, whatever the
    installed open_clip's own loader would do."""
    saved = load_prior("open_clip:ViT-S-32:random", seed=1)
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in saved.model.clip_model.state_dict().items()}}, path)
    loaded = load_prior(f"open_clip:ViT-S-32:{path}")
    assert loaded.weights["sha256"] and loaded.weights["source"] == "local file"
    resized = torch.nn.functional.interpolate(images.float(), size=224).to(torch.uint8)
    assert torch.equal(forward(loaded, resized), forward(saved, resized))
    assert not torch.equal(forward(load_prior("open_clip:ViT-S-32:random", seed=2), resized), forward(saved, resized))

    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hostile = tmp_path / "hostile.pt"
    torch.save({"state_dict": RunsCode()}, hostile)
    with pytest.raises(RelaError, match="not a plain weights file"):
        load_prior(f"open_clip:ViT-S-32:{hostile}")
    assert not marker.exists()
