"""Batched device views (rela_pipeline.batched_views) against lightly's recipes and torchvision's ops."""

from __future__ import annotations

import dataclasses
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from rela_pipeline import batched_views as bv
from rela_pipeline import views as pil_views
from rela_pipeline.batched_views import (
    BatchedViews,
    ViewRecipe,
    batched_byol_views,
    batched_dino_views,
    batched_method_views,
    batched_rela_views,
    batched_simclr_views,
    check_views,
)
from rela_pipeline.errors import RelaError

FASHION = Path(__file__).parent / "fixtures" / "fashion_mnist_mini" / "train"
MEAN = torch.tensor(bv.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(bv.IMAGENET_STD).view(3, 1, 1)


def fashion_images(n: int, size: int = 32) -> torch.Tensor:
    """uint8 (n, 3, size, size): Fashion-MNIST PNGs as RGB, resized like the shard reader does."""
    files = sorted(FASHION.glob("*/*.png"))[:: max(1, 300 // n)][:n]
    arrays = [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def colour_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size): saturated RGB gradients and blobs (every hue, grays, extremes)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for i in range(n):
        phase = torch.rand(3, generator=g) * 6.283
        freq = 1 + 3 * torch.rand(3, generator=g)
        img = torch.stack([0.5 + 0.5 * torch.sin(freq[c] * (xx * 4 + yy * (c + 1)) + phase[c]) for c in range(3)])
        if i % 4 == 1:
            img[:, : size // 2] = img[:1, : size // 2]  # a gray half
        if i % 4 == 2:
            img = (img * 1.6 - 0.3).clamp(0, 1)  # saturated extremes
        out.append(img)
    return (torch.stack(out) * 255).round().to(torch.uint8)


def float_batch() -> torch.Tensor:
    return torch.cat([colour_images(6), fashion_images(4)]).float() / 255


# ------------------------------------------------------------------------------------------------
# Recipes: exactly lightly's parameters as configured in rela_pipeline.views
# ------------------------------------------------------------------------------------------------


def flat_transforms(view) -> list:
    """The ops of one per-view transform in order: Composes and lightly per-view transforms
    (whose ``transform`` is a Compose) flattened; lightly's multi-crop views are
    ``Compose([RandomResizedCrop, SwaVViewTransform])``."""
    if type(view).__name__ == "Compose":
        return [op for t in view.transforms for op in flat_transforms(t)]
    inner = getattr(view, "transform", None)
    if type(inner).__name__ == "Compose":
        return flat_transforms(inner)
    return [view]


def lightly_recipe(view) -> dict:
    """The parameters of one lightly (or torchvision) per-view transform, and whether it
    solarises before it blurs."""
    found = {}
    ops = flat_transforms(view)
    names = [type(t).__name__ for t in ops]
    found["solarize_before_blur"] = (
        "RandomSolarization" in names and "GaussianBlur" in names and names.index("RandomSolarization") < names.index("GaussianBlur")
    )
    for t in ops:
        name = type(t).__name__
        if name == "RandomResizedCrop":
            found.update(size=t.size[0], scale=tuple(t.scale), ratio=tuple(t.ratio), interpolation=getattr(t.interpolation, "value", t.interpolation))
        elif name == "RandomHorizontalFlip":
            found["flip_p"] = t.p
        elif name in ("RandomVerticalFlip",):
            assert t.p == 0
        elif name == "RandomRotate":
            assert t.prob == 0
        elif name == "ColorJitter":  # lightly's SwaV views start with a no-op ColorJitter()
            assert all(getattr(t, k) is None for k in ("brightness", "contrast", "saturation", "hue"))
        elif name == "RandomApply":
            cj = t.transforms[0]
            found["jitter_p"] = t.p
            # torchvision stores a strength of 0 as None: the identity range
            identity = {"brightness": (1.0, 1.0), "contrast": (1.0, 1.0), "saturation": (1.0, 1.0), "hue": (0.0, 0.0)}
            found["jitter_ranges"] = tuple(v for k in identity for v in (getattr(cj, k) or identity[k]))
        elif name == "RandomGrayscale":
            found["gray_p"] = t.p
        elif name == "GaussianBlur":
            found.update(blur_p=t.prob, blur_sigma=tuple(float(s) for s in t.sigmas))
        elif name == "RandomSolarization":
            assert t.threshold == 128
            found["solarize_p"] = t.prob
        elif name == "Normalize":
            found["normalize"] = (tuple(t.mean), tuple(t.std))
    found.setdefault("solarize_p", 0.0)
    found.setdefault("blur_p", 0.0)
    found.setdefault("jitter_p", 0.0)
    found.setdefault("jitter_ranges", (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0))
    found.setdefault("gray_p", 0.0)
    return found


def recipe_dict(r: ViewRecipe) -> dict:
    return dict(
        size=r.size,
        scale=tuple(r.scale),
        ratio=tuple(r.ratio),
        interpolation=r.interpolation,
        flip_p=r.flip_p,
        jitter_p=r.jitter_p,
        jitter_ranges=tuple(v for pair in r.jitter_ranges() for v in pair),
        gray_p=r.gray_p,
        blur_p=r.blur_p,
        solarize_p=r.solarize_p,
        solarize_before_blur=r.solarize_before_blur,
    )


def lightly_reference_views(family: str, size: int) -> list:
    """lightly's own transforms for ``family`` at ``size`` px, built from lightly's defaults (the
    recipes' source of truth, independent of rela_pipeline.recipes): BYOL, SimCLR, DINO, Barlow
    Twins (``BYOLTransform``, as lightly's Barlow Twins example), VICReg, MoCo v2 and SwaV (2 + 6
    crops) with Gaussian blur off at 32 px and below; the ReLA view is the authors' SimCLR view
    with crop scale (0.5, 1), ColorJitter(0.8, 0.8, 0.8, 0.2) p 0.8, grayscale p 0.2 and no blur;
    the supervised view is torchvision's RandomResizedCrop + RandomHorizontalFlip."""
    import torchvision.transforms as TV
    from lightly.transforms import BYOLTransform, DINOTransform, MoCoV2Transform, SimCLRTransform, SwaVTransform, VICRegTransform
    from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform
    from lightly.transforms.simclr_transform import SimCLRViewTransform
    from lightly.transforms.utils import IMAGENET_NORMALIZE

    def blur(p):
        return 0.0 if size <= 32 else p

    local = max(8, round(size * 96 / 224))
    if family in ("byol", "barlowtwins"):
        return BYOLTransform(
            view_1_transform=BYOLView1Transform(input_size=size, gaussian_blur=blur(1.0)),
            view_2_transform=BYOLView2Transform(input_size=size, gaussian_blur=blur(0.1)),
        ).transforms
    if family == "vicreg":
        return VICRegTransform(input_size=size, gaussian_blur=blur(0.5)).transforms
    if family == "moco":
        return MoCoV2Transform(input_size=size, gaussian_blur=blur(0.5)).transforms
    if family == "swav":
        return SwaVTransform(crop_sizes=(size, local), gaussian_blur=blur(0.5)).transforms
    if family == "supervised":
        view = TV.Compose([TV.RandomResizedCrop(size), TV.RandomHorizontalFlip(), TV.ToTensor(), TV.Normalize(**IMAGENET_NORMALIZE)])
        return [view, view]

    if family == "rela":
        view = SimCLRViewTransform(
            input_size=size,
            min_scale=0.5,
            cj_prob=0.8,
            cj_strength=1.0,
            cj_bright=0.8,
            cj_contrast=0.8,
            cj_sat=0.8,
            cj_hue=0.2,
            random_gray_scale=0.2,
            gaussian_blur=0.0,
        )
        return [view, view]
    if family == "simclr":
        return SimCLRTransform(input_size=size, gaussian_blur=blur(0.5)).transforms
    return DINOTransform(global_crop_size=size, local_crop_size=local, gaussian_blur=(blur(1.0), blur(0.1), blur(0.5))).transforms


#: Every built-in method's views.
METHOD_FAMILIES = ["byol", "simclr", "dino", "barlowtwins", "vicreg", "moco", "swav", "supervised"]


@pytest.mark.parametrize("size", [32, 64, 224])
@pytest.mark.parametrize("family", ["rela", *METHOD_FAMILIES])
def test_both_view_paths_make_lightlys_recipes(family, size):
    """The one set of recipes, as the device path uses them and as the PIL path builds lightly
    transforms from them, equals lightly's own transforms parameter by parameter."""
    reference = lightly_reference_views(family, size)
    ours = pil_views.rela_views(size) if family == "rela" else pil_views.method_views(family, size)
    batched = batched_rela_views(size) if family == "rela" else batched_method_views(family, size)
    assert batched.name == family
    assert len(reference) == len(ours.transforms) == len(batched.recipes)
    for view, pil_view, recipe in zip(reference, ours.transforms, batched.recipes):
        expected = lightly_recipe(view)
        assert expected.pop("normalize") == (bv.IMAGENET_MEAN, bv.IMAGENET_STD) == lightly_recipe(pil_view).pop("normalize")
        if expected["blur_p"] > 0:
            assert tuple(recipe.blur_sigma) == pytest.approx(expected["blur_sigma"])
        expected.pop("blur_sigma", None)
        for got in (recipe_dict(recipe), {k: v for k, v in lightly_recipe(pil_view).items() if k != "blur_sigma"}):
            for key, value in expected.items():
                assert got[key] == pytest.approx(value), (family, size, key)


@pytest.mark.parametrize("family", METHOD_FAMILIES)
def test_crop_min_scale_is_the_same_on_both_paths_and_spares_dino_local_crops(family):
    reference = pil_views.method_views(family, 32, crop_min_scale=0.3)
    batched = batched_method_views(family, 32, crop_min_scale=0.3)
    defaults = batched_method_views(family, 32)
    for view, recipe, default in zip(reference.transforms, batched.recipes, defaults.recipes):
        assert lightly_recipe(view)["scale"] == pytest.approx(recipe.scale)
        if recipe.size == 32:
            assert recipe.scale == (0.3, 1.0)
        else:  # DINO's local crops keep their (0.05, 0.4), SwaV's low-resolution ones their (0.05, 0.14)
            assert recipe.scale == default.scale == {"dino": (0.05, 0.4), "swav": (0.05, 0.14)}[family]
    with pytest.raises(RelaError, match="minimum scale must be in"):
        batched_method_views(family, 32, crop_min_scale=0.0)
    with pytest.raises(RelaError, match="minimum scale must be in"):
        pil_views.method_views(family, 32, crop_min_scale=1.5)


@pytest.mark.parametrize("family", ["dino", "swav"])
def test_local_views_set_the_multi_crop_count_on_both_paths(family):
    defaults = batched_method_views(family, 32).recipes
    for n in (0, 2):
        batched = batched_method_views(family, 32, local_views=n)
        reference = pil_views.method_views(family, 32, local_views=n)
        assert len(batched.recipes) == len(reference.transforms) == 2 + n
        assert batched.recipes == defaults[: 2 + n]  # the full-size pair, then local crops of the default recipe
        views = batched(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.Generator().manual_seed(0))
        assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, defaults[2].size, defaults[2].size)] * n
    with pytest.raises(RelaError, match="must be >= 0"):
        batched_method_views(family, 32, local_views=-1)


def test_local_views_are_refused_for_a_method_without_multi_crop_or_below_zero():
    with pytest.raises(RelaError, match="method 'byol' has none"):
        batched_method_views("byol", 32, local_views=2)
    with pytest.raises(RelaError, match="local views must be >= 0, got -1"):
        batched_method_views("dino", 32, local_views=-1)  # the library path, without TrainConfig's check


def test_normalisation_constants_are_lightlys():
    from lightly.transforms.utils import IMAGENET_NORMALIZE

    assert list(bv.IMAGENET_MEAN) == IMAGENET_NORMALIZE["mean"]
    assert list(bv.IMAGENET_STD) == IMAGENET_NORMALIZE["std"]


def test_dino_sizes_and_blur_rule():
    views = batched_dino_views(32, n_local_views=3)
    assert [r.size for r in views.recipes] == [32, 32, 14, 14, 14]
    assert all(r.blur_p == 0 for r in views.recipes)
    views = batched_dino_views(64)
    assert [r.size for r in views.recipes] == [64, 64] + [27] * 6
    assert [r.blur_p for r in views.recipes[:3]] == [1.0, 0.1, 0.5]
    assert [r.solarize_p for r in views.recipes[:3]] == [0.0, 0.2, 0.0]
    assert batched_dino_views(8).recipes[2].size == 8


def test_method_views_errors():
    with pytest.raises(RelaError, match="unknown SSL method 'mocov3'; choose one of: byol, simclr, dino, barlowtwins, vicreg, moco, swav, supervised"):
        batched_method_views("mocov3", 32)
    for make in (lambda: batched_method_views("byol", 7), lambda: batched_rela_views(4)):
        with pytest.raises(RelaError, match="image size must be at least 8 pixels, got"):
            make()
    with pytest.raises(RelaError):
        ViewRecipe(size=32, scale=(0.5, 1.0), flip_p=1.5)
    with pytest.raises(RelaError):
        ViewRecipe(size=32, scale=(1.0, 0.5))
    with pytest.raises(RelaError):
        ViewRecipe(size=32, scale=(0.5, 1.0), interpolation="nearest")


# ------------------------------------------------------------------------------------------------
# Output contract
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 40])
def test_output_shapes_dtype_device(size):
    images = colour_images(5, size)
    g = torch.Generator().manual_seed(0)
    for views, sizes in (
        (batched_rela_views(size), [size] * 2),
        (batched_byol_views(size), [size] * 2),
        (batched_simclr_views(size), [size] * 2),
        (batched_dino_views(size, 2), [size] * 2 + [bv.dino_local_size(size)] * 2),
        (batched_method_views("swav", size), [size] * 2 + [bv.dino_local_size(size)] * 6),
        *((batched_method_views(m, size), [size] * 2) for m in ("barlowtwins", "vicreg", "moco", "supervised")),
    ):
        out = views(images, g)
        assert [tuple(v.shape) for v in out] == [(5, 3, s, s) for s in sizes]
        for v in out:
            assert v.dtype == torch.float32 and v.device == images.device and v.is_contiguous()
            assert torch.isfinite(v).all()
            # normalised [0, 1] values
            low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
            assert (v >= low - 1e-5).all() and (v <= high + 1e-5).all()
        assert check_views(out, 5, views.name) == out


def test_autocast_does_not_change_the_views():
    images = colour_images(4)
    views = batched_dino_views(32, 1)
    plain = views(images, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = views(images, torch.Generator().manual_seed(0))
    assert all(m.dtype == torch.float32 and torch.equal(m, p) for m, p in zip(mixed, plain))


def test_empty_batch_and_bad_inputs():
    views = batched_rela_views(32)
    g = torch.Generator().manual_seed(0)
    out = views(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), g)
    assert [tuple(v.shape) for v in out] == [(0, 3, 32, 32)] * 2
    for bad in (torch.zeros(2, 3, 32, 32), torch.zeros(2, 1, 32, 32, dtype=torch.uint8), np.zeros((2, 3, 32, 32), np.uint8)):
        with pytest.raises(RelaError, match="rela views need a uint8 image batch"):
            views(bad, g)
    with pytest.raises(RelaError, match="torch.Generator"):
        views(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), 0)
    with pytest.raises(RelaError, match="the parameters do not fit 2 views of a batch of 3"):
        views.apply(torch.zeros(3, 3, 32, 32, dtype=torch.uint8), views.sample_parameters(2, 32, 32, g))


def test_full_image_crop_without_jitter_is_plain_normalisation():
    images = torch.cat([fashion_images(4), colour_images(4)])
    expected = (images.float() / 255 - MEAN) / STD
    g = torch.Generator().manual_seed(0)
    for interpolation in ("bilinear", "bicubic"):
        views = BatchedViews([ViewRecipe(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, interpolation=interpolation)] * 2, "plain")
        params = views.sample_parameters(8, 32, 32, g)
        assert (params[0]["crop"] == torch.tensor([0, 0, 32, 32])).all()
        for v in views(images, g):
            torch.testing.assert_close(v, expected, atol=2e-6, rtol=0)
    # a forced flip is an exact mirror
    flipped = BatchedViews([ViewRecipe(size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)] * 2, "flip")
    torch.testing.assert_close(flipped(images, g)[0], expected.flip(-1), atol=2e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# Randomness: per sample, generator only, reproducible
# ------------------------------------------------------------------------------------------------


def test_identical_images_get_independent_views():
    image = colour_images(1)
    images = image.expand(16, 3, 32, 32).contiguous()
    views = batched_rela_views(32)
    g = torch.Generator().manual_seed(3)
    params = views.sample_parameters(16, 32, 32, g)
    out = views.apply(images, params)
    for p in params:
        assert len({tuple(b) for b in p["crop"].tolist()}) > 8
        assert len({tuple(o) for o in p["order"].tolist()}) > 4
        assert torch.unique(p["factors"][:, 0]).numel() == 16
    for v in out:
        flat = v.flatten(1)
        distance = torch.cdist(flat, flat)
        assert (distance + torch.eye(16) * 1e9).min() > 1.0  # every pair of samples differs
    assert (out[0] - out[1]).abs().flatten(1).amax(1).min() > 0.1  # and the two views of each sample


def test_same_seed_same_views_other_seed_other_views():
    images = colour_images(8)
    for views in (batched_rela_views(32), batched_byol_views(40), batched_dino_views(32, 2)):
        a = views(images, torch.Generator().manual_seed(11))
        b = views(images, torch.Generator().manual_seed(11))
        c = views(images, torch.Generator().manual_seed(12))
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert all(not torch.equal(x, z) for x, z in zip(a, c))


def test_no_global_rng_is_used():
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    batched_byol_views(40)(colour_images(4, 40), torch.Generator().manual_seed(0))
    batched_dino_views(40, 2)(colour_images(4, 40), torch.Generator().manual_seed(0))
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    assert random.getstate() == py_state


def test_sample_parameters_then_apply_is_call():
    for views, size in ((batched_rela_views(32), 32), (batched_byol_views(40), 40), (batched_dino_views(32, 2), 32)):
        images = colour_images(6, size)
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        direct = views(images, g1)
        staged = views.apply(images, views.sample_parameters(6, size, size, g2))
        assert all(torch.equal(x, y) for x, y in zip(direct, staged))
        assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # same consumption


def test_pickled_transform_gives_the_same_views():
    views = batched_byol_views(32)
    images = colour_images(4)
    views(images, torch.Generator().manual_seed(0))  # fills the workspace cache
    clone = pickle.loads(pickle.dumps(views))
    a = views(images, torch.Generator().manual_seed(1))
    b = clone(images, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------------
# Parameter distributions over a large batch
# ------------------------------------------------------------------------------------------------

N_LARGE = 4096


def assert_fraction(mask: torch.Tensor, p: float) -> None:
    tolerance = 4.5 * max((p * (1 - p) / mask.numel()) ** 0.5, 1e-9)
    assert abs(mask.float().mean().item() - p) <= tolerance, (mask.float().mean().item(), p)


@pytest.mark.parametrize("family,size", [("rela", 32), ("byol", 32), ("byol", 64), ("simclr", 64), ("dino", 64), ("vicreg", 64), ("swav", 64)])
def test_parameter_ranges(family, size):
    views = batched_rela_views(size) if family == "rela" else batched_method_views(family, size)
    g = torch.Generator().manual_seed(1)
    height = width = size
    for recipe, p in zip(views.recipes, views.sample_parameters(N_LARGE, height, width, g)):
        top, left, h, w = p["crop"].T.double()
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
        drawn = ~p["crop_fallback"]
        assert drawn.float().mean() > 0.99
        # the drawn (unrounded) area and ratio lie in the recipe's ranges, up to rounding of h, w
        h, w = h[drawn], w[drawn]
        area = height * width
        assert ((w + 0.5) * (h + 0.5) >= recipe.scale[0] * area).all()
        assert ((w - 0.5) * (h - 0.5) <= recipe.scale[1] * area).all()
        assert ((w + 0.5) / (h - 0.5) >= recipe.ratio[0]).all() and ((w - 0.5) / (h + 0.5) <= recipe.ratio[1]).all()
        fraction = w * h / area
        assert fraction.min() < recipe.scale[0] + 0.02 and fraction.max() > recipe.scale[1] - 0.1
        assert (top == 0).any() and (top[drawn] == height - h).any()
        assert_fraction(p["flip"], recipe.flip_p)
        assert_fraction(p["jitter"], recipe.jitter_p)
        assert_fraction(p["gray"], recipe.gray_p)
        assert_fraction(p["blur"], recipe.blur_p)
        assert_fraction(p["solarize"], recipe.solarize_p)
        for k, (low, high) in enumerate(recipe.jitter_ranges()):
            f = p["factors"][:, k]
            assert f.min() >= low and f.max() <= high
            assert f.min() < low + 0.01 * (high - low) and f.max() > high - 0.01 * (high - low)
        assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0
        order = p["order"]
        assert (order.sort(dim=1).values == torch.arange(4)).all()
        assert len({tuple(o) for o in order.tolist()}) == 24
        assert all(p[key].shape[0] == N_LARGE for key in p)
    if family == "byol":
        assert [r.solarize_p for r in views.recipes] == [0.0, 0.2]


# ------------------------------------------------------------------------------------------------
# Each op against torchvision.transforms.functional
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,reference", [(0, TF.adjust_brightness), (1, TF.adjust_contrast), (2, TF.adjust_saturation)])
def test_linear_jitter_ops_match_torchvision(op, reference):
    x = float_batch()
    n = x.shape[0]
    factors = torch.linspace(0.2, 1.8, n)
    a = factors.view(n, 1, 1, 1)
    zero = torch.zeros_like(a)
    y = bv._blend_(x.clone(), a, (1 - a) if op == 2 else zero, (1 - a) if op == 1 else zero, bv._scratch(x)[0])
    expected = torch.stack([reference(x[i], float(factors[i])) for i in range(n)])
    # 2e-4: ITU-R 601 luma 0.299 R (PIL, kornia) against torchvision's 0.2989 R
    torch.testing.assert_close(y, expected, atol=2e-4, rtol=0)
    if op == 0:
        assert torch.equal(y, expected)


def test_hue_matches_torchvision():
    x = float_batch()
    n = x.shape[0]
    for shifts in (torch.linspace(-0.5, 0.5, n), torch.linspace(-0.1, 0.1, n), torch.zeros(n)):
        planes, block = bv._scratch(x)
        y = bv._adjust_hue_(x.clone(), shifts, torch.ones(n, 1, 1, 1), planes, block)
        expected = torch.stack([TF.adjust_hue(x[i], float(shifts[i])) for i in range(n)])
        torch.testing.assert_close(y, expected, atol=5e-6, rtol=0)
    # samples switched off are untouched
    y = bv._adjust_hue_(x.clone(), torch.full((n,), 0.3), torch.zeros(n, 1, 1, 1), planes, block)
    assert torch.equal(y, x)


def test_grayscale_and_solarize_match_torchvision():
    x = float_batch()
    n = x.shape[0]
    on = torch.arange(n) % 2 == 0
    planes, block = bv._scratch(x)
    y = bv._grayscale_(x.clone(), on, planes)
    expected = torch.stack([TF.rgb_to_grayscale(x[i], 3) if on[i] else x[i] for i in range(n)])
    torch.testing.assert_close(y, expected, atol=2e-4, rtol=0)
    assert torch.equal(y[~on], x[~on])
    assert (y[on][:, 0] == y[on][:, 1]).all() and (y[on][:, 1] == y[on][:, 2]).all()
    y = bv._solarize_(x.clone(), on, block)
    expected = torch.stack([TF.solarize(x[i], 0.5) if on[i] else x[i] for i in range(n)])
    assert torch.equal(y, expected)


def test_gaussian_blur_matches_torchvision():
    x = float_batch()
    n = x.shape[0]
    sigma = torch.linspace(0.1, 2.0, n)
    on = torch.arange(n) != 3
    y = bv._gaussian_blur(x.clone(), sigma, on, 2.0, subset=False)  # the CUDA path: whole batch, delta kernels
    torch.testing.assert_close(bv._gaussian_blur(x.clone(), sigma, on, 2.0), y, atol=1e-6, rtol=0)  # CPU: subset
    padded = torch.nn.functional.pad(x, (6, 6, 6, 6), mode="replicate")  # replicate borders, as PIL
    for i in range(n):
        expected = TF.gaussian_blur(padded[i], [13, 13], [float(sigma[i])] * 2)[:, 6:-6, 6:-6] if on[i] else x[i]
        torch.testing.assert_close(y[i], expected, atol=2e-6, rtol=0)
    assert torch.equal(y[3], x[3])


def test_color_jitter_with_per_sample_order_matches_torchvision_colorjitter():
    """All 24 orders in one batch, each sample against torchvision's ColorJitter with its params."""
    x = torch.cat([float_batch()] * 5)[:48]
    n = x.shape[0]
    g = torch.Generator().manual_seed(0)
    orders = torch.tensor([list(p) for p in __import__("itertools").permutations(range(4))] * 2)
    factors = torch.stack([0.2 + 1.6 * torch.rand(n, generator=g) for _ in range(3)] + [0.4 * torch.rand(n, generator=g) - 0.2], 1)
    apply = torch.rand(n, generator=g) < 0.8
    planes, block = bv._scratch(x)
    y = bv._color_jitter_(x.clone(), apply, factors, orders, planes, block)
    jitter = T.ColorJitter(0.8, 0.8, 0.8, 0.2)
    for i in range(n):
        params = dict(
            fn_idx=orders[i],
            brightness_factor=float(factors[i, 0]),
            contrast_factor=float(factors[i, 1]),
            saturation_factor=float(factors[i, 2]),
            hue_factor=float(factors[i, 3]),
        )
        expected = jitter.transform(x[i], params) if apply[i] else x[i]
        torch.testing.assert_close(y[i], expected, atol=1e-3, rtol=0)
        if not apply[i]:
            assert torch.equal(y[i], x[i])


def crop_reference(x: torch.Tensor, box, flip: bool, size: int, interpolation) -> torch.Tensor:
    top, left, h, w = (int(v) for v in box)
    out = TF.resized_crop(x, top, left, h, w, [size, size], interpolation=interpolation, antialias=True)
    return TF.horizontal_flip(out) if flip else out


@pytest.mark.parametrize("size", [32, 20])
def test_bilinear_crops_match_torchvision_resized_crop(size):
    """Upscaling (grid_sample path) and shrinking (matrix path) against torchvision's antialiased
    bilinear resized_crop on the float image (PIL's algorithm)."""
    images = torch.cat([colour_images(4), fashion_images(4)])
    x = images.float() / 255
    g = torch.Generator().manual_seed(2)
    views = BatchedViews([ViewRecipe(size=size, scale=(0.05, 1.0))] * 2, "crops")
    params = views.sample_parameters(8, 32, 32, g)
    crops = torch.cat([p["crop"] for p in params])
    flips = torch.cat([p["flip"] for p in params])
    if size >= 32:
        y = bv._grid_crop(x.repeat(2, 1, 1, 1), crops, flips, size)
    else:
        y = bv._matrix_crop(x, crops, flips, size, bicubic=False)
    for i in range(16):
        expected = crop_reference(x[i % 8], crops[i], bool(flips[i]), size, TF.InterpolationMode.BILINEAR)
        torch.testing.assert_close(y[i], expected, atol=3e-6, rtol=0)


def test_bicubic_crops_match_pil():
    """DINO's bicubic RandomResizedCrop on PIL images (lightly's path): within the uint8 rounding."""
    images = colour_images(6)
    x = images.float() / 255
    boxes = torch.tensor([[0, 0, 32, 32], [3, 5, 20, 17], [10, 2, 9, 30], [0, 0, 13, 13], [5, 5, 27, 27], [2, 7, 24, 18]])
    flips = torch.tensor([False, True, False, True, False, True])
    for size in (32, 14):
        y = bv._matrix_crop(x, boxes, flips, size, bicubic=True)
        for i in range(6):
            pil = Image.fromarray(images[i].permute(1, 2, 0).numpy())
            expected = TF.resized_crop(pil, *boxes[i].tolist(), [size, size], interpolation=TF.InterpolationMode.BICUBIC)
            expected = torch.from_numpy(np.array(TF.horizontal_flip(expected) if flips[i] else expected))
            expected = expected.permute(2, 0, 1).float() / 255
            torch.testing.assert_close(y[i], expected, atol=4.5 / 255, rtol=0)


def test_vicreg_views_solarise_before_they_blur_as_lightly_does():
    """lightly's VICReg view runs RandomSolarization before GaussianBlur (every other view blurs
    first): with both on, the batched view is blur(solarise(x)), not solarise(blur(x))."""
    images = torch.cat([colour_images(4, 40), fashion_images(4, 40)])
    x = images.float() / 255
    for first in (True, False):
        recipe = ViewRecipe(size=40, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, blur_p=1.0, solarize_p=1.0, solarize_before_blur=first)
        views = BatchedViews([recipe] * 2, "order")
        params = views.sample_parameters(8, 40, 40, torch.Generator().manual_seed(0))
        got = views.apply(images, params)[0] * STD + MEAN
        sigma = params[0]["sigma"]
        on = torch.ones(8, dtype=torch.bool)
        if first:
            expected = bv._gaussian_blur(TF.solarize(x, 0.5), sigma, on, 2.0)
        else:
            expected = TF.solarize(bv._gaussian_blur(x.clone(), sigma, on, 2.0), 0.5)
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
    mixed = BatchedViews([recipe, dataclasses.replace(recipe, solarize_before_blur=True)], "mixed")
    assert len(mixed._groups) == 2  # a group never mixes the two orders


@pytest.mark.parametrize("family", ["rela", "byol"])
def test_views_match_per_sample_torchvision_pipeline(family):
    """The whole view (crop, flip, jitter in its order, grayscale, solarisation, normalisation)
    against torchvision's functional ops sample by sample, with the same parameters."""
    images = torch.cat([colour_images(12), fashion_images(4)])
    views = batched_rela_views(32) if family == "rela" else batched_byol_views(32)
    params = views.sample_parameters(16, 32, 32, torch.Generator().manual_seed(4))
    out = views.apply(images, params)
    x = images.float() / 255
    for recipe, p, got in zip(views.recipes, params, out):
        jitter = T.ColorJitter(*recipe.jitter)
        for i in range(16):
            y = crop_reference(x[i], p["crop"][i], bool(p["flip"][i]), 32, TF.InterpolationMode.BILINEAR)
            if p["jitter"][i]:
                f = p["factors"][i].tolist()
                y = jitter.transform(y, dict(fn_idx=p["order"][i], brightness_factor=f[0], contrast_factor=f[1], saturation_factor=f[2], hue_factor=f[3]))
            if p["gray"][i]:
                y = TF.rgb_to_grayscale(y, 3)
            if p["solarize"][i]:
                y = TF.solarize(y, 0.5)
            expected = TF.normalize(y, list(bv.IMAGENET_MEAN), list(bv.IMAGENET_STD))
            torch.testing.assert_close(got[i], expected, atol=5e-3, rtol=0)


# ------------------------------------------------------------------------------------------------
# check_views
# ------------------------------------------------------------------------------------------------


def one_line_error(views, batch_size=4, name="BYOL views") -> str:
    with pytest.raises(RelaError) as info:
        check_views(views, batch_size, name)
    message = str(info.value)
    assert "\n" not in message and name in message
    return message


def test_check_views_accepts_good_views():
    good = [torch.zeros(4, 3, 32, 32), torch.zeros(4, 3, 32, 32), torch.zeros(4, 3, 14, 14)]
    assert check_views(tuple(good), 4, "x") == good


def test_check_views_rejects_bad_views():
    message = one_line_error([torch.zeros(4, 3, 32, 32), torch.zeros(2, 3, 32, 32)])
    assert "(4, 3, 32, 32)" in message and "(2, 3, 32, 32)" in message and "(4, 3, h, w)" in message
    message = one_line_error([torch.zeros(4, 3, 32, 32)])
    assert "1 views" in message and "(4, 3, 32, 32)" in message
    message = one_line_error(["a", 3])
    assert "[str, int]" in message
    message = one_line_error(torch.zeros(2, 4, 3, 32, 32))
    assert "float32 (2, 4, 3, 32, 32)" in message
    message = one_line_error([torch.zeros(4, 3, 32, 32, dtype=torch.uint8)] * 2)
    assert "uint8 (4, 3, 32, 32)" in message
    message = one_line_error([torch.zeros(4, 3, 32, 32), torch.zeros(4, 3, 16, 16)])
    assert "the first two the same size" in message
    message = one_line_error([torch.zeros(4, 1, 32, 32)] * 2)
    assert "(4, 1, 32, 32)" in message


def test_non_square_input_matches_torchvision():
    """H != W: the grid path (output >= both sides) and the matrix path (shrinking)."""
    images = colour_images(4, 40)[:, :, 8:32, :]  # (4, 3, 24, 40)
    x = images.float() / 255
    for size in (40, 16):
        views = BatchedViews([ViewRecipe(size=size, scale=(0.2, 1.0), flip_p=0.5)] * 2, "wide")
        params = views.sample_parameters(4, 24, 40, torch.Generator().manual_seed(0))
        out = views.apply(images, params)
        for v, p in enumerate(params):
            assert (p["crop"][:, 0] + p["crop"][:, 2] <= 24).all() and (p["crop"][:, 1] + p["crop"][:, 3] <= 40).all()
            for i in range(4):
                expected = crop_reference(x[i], p["crop"][i], bool(p["flip"][i]), size, TF.InterpolationMode.BILINEAR)
                torch.testing.assert_close(out[v][i], (expected - MEAN) / STD, atol=2e-5, rtol=0)
