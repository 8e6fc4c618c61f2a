"""Augmented views per image with PIL: lightly's transforms built from the recipes of
:mod:`rela_pipeline.recipes` (the ReLA views and each SSL method's standard views).

Every transform maps a PIL RGB image to a list of float32 ``(3, s, s)`` tensors normalised with the
ImageNet mean and std (the same normalisation the student's evaluation preprocessing uses). The
same recipes are made batched on the device by :mod:`rela_pipeline.batched_views`.

:class:`PerImageViews` makes any such per-image transform (or a user's own) a batched view
transform, the one interface the training data path calls (``--augment pil``).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from lightly.transforms.byol_transform import BYOLView1Transform
from lightly.transforms.dino_transform import DINOViewTransform
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.transforms.vicreg_transform import VICRegViewTransform
from PIL import Image

from .errors import RelaError
from .recipes import NO_BLUR_MAX_SIZE, ViewRecipe, dino_recipes, method_recipes, rela_recipes  # noqa: F401  (NO_BLUR_MAX_SIZE: part of the interface)

ViewTransform = Callable[[object], list]

#: torchvision's default ``RandomResizedCrop`` aspect-ratio range, the only one lightly's views take.
_DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def lightly_view(recipe: ViewRecipe) -> Callable:
    """One view of ``recipe`` as a lightly per-view transform (PIL image -> float ``(3, s, s)``):
    ``DINOViewTransform`` for bicubic recipes (any crop scale), ``VICRegViewTransform`` for
    recipes that solarise before they blur, else ``BYOLView1Transform`` (bilinear). They apply
    crop, flip, colour jitter, grayscale, blur and solarisation in that order (VICReg's:
    solarisation, then blur), as :mod:`rela_pipeline.batched_views` does. A bilinear crop whose
    scale stops below 1 (SwaV's low-resolution crops) gets its ``RandomResizedCrop`` replaced by
    one with that scale range, which is how lightly's ``MultiCropTranform`` builds them.

    Raises:
        RelaError: a recipe lightly's views cannot express (another aspect-ratio range, or a
            bicubic recipe that solarises before it blurs).
    """
    b, c, s, h = recipe.jitter
    common = dict(
        hf_prob=recipe.flip_p,
        cj_prob=recipe.jitter_p,
        cj_strength=1.0,
        cj_bright=b,
        cj_contrast=c,
        cj_sat=s,
        cj_hue=h,
        random_gray_scale=recipe.gray_p,
        gaussian_blur=recipe.blur_p,
        sigmas=tuple(recipe.blur_sigma),
        solarization_prob=recipe.solarize_p,
    )
    if tuple(recipe.ratio) != _DEFAULT_RATIO:
        raise RelaError(f"lightly's views take the default crop aspect ratio range {_DEFAULT_RATIO}, got {recipe.ratio}")
    if recipe.interpolation == "bicubic":
        if recipe.solarize_before_blur:
            raise RelaError("lightly's bicubic (DINO) views blur before they solarise; a bicubic recipe cannot solarise first")
        return DINOViewTransform(crop_size=recipe.size, crop_scale=tuple(recipe.scale), **common)
    if recipe.solarize_before_blur:
        solarize = common.pop("solarization_prob")
        view = VICRegViewTransform(input_size=recipe.size, min_scale=recipe.scale[0], solarize_prob=solarize, **common)
    else:
        view = BYOLView1Transform(input_size=recipe.size, min_scale=recipe.scale[0], **common)
    if recipe.scale[1] != 1.0:
        crop = view.transform.transforms[0]
        view.transform.transforms[0] = type(crop)(size=recipe.size, scale=tuple(recipe.scale))
    return view


def views_of(recipes: Sequence[ViewRecipe]) -> MultiViewTransform:
    """Per-image transform giving one view per recipe, in order."""
    return MultiViewTransform([lightly_view(recipe) for recipe in recipes])


def rela_views(image_size: int) -> MultiViewTransform:
    """Two ReLA views of ``image_size`` pixels (:func:`rela_pipeline.recipes.rela_recipe`)."""
    return views_of(rela_recipes(image_size))


def byol_views(image_size: int, crop_min_scale: float = 0.08) -> MultiViewTransform:
    """BYOL's asymmetric pair (:func:`rela_pipeline.recipes.byol_recipes`)."""
    return views_of(method_recipes("byol", image_size, crop_min_scale))


def simclr_views(image_size: int, crop_min_scale: float = 0.08) -> MultiViewTransform:
    """SimCLR's symmetric pair (:func:`rela_pipeline.recipes.simclr_recipe`)."""
    return views_of(method_recipes("simclr", image_size, crop_min_scale))


def dino_views(image_size: int, crop_min_scale: float = 0.4, n_local_views: int = 6) -> MultiViewTransform:
    """DINO's multi-crop (:func:`rela_pipeline.recipes.dino_recipes`): two global crops of
    ``image_size`` (scale ``(crop_min_scale, 1)``) and ``n_local_views`` local crops."""
    from .recipes import check_image_size, with_crop_min_scale

    check_image_size(image_size)
    return views_of(with_crop_min_scale(dino_recipes(image_size, n_local_views), crop_min_scale))


def method_views(method: str, image_size: int, crop_min_scale: float | None = None, local_views: int | None = None) -> MultiViewTransform:
    """The standard views of a built-in method (:func:`rela_pipeline.recipes.method_recipes`).

    Args:
        method: a name of :data:`rela_pipeline.methods.METHODS`.
        image_size: S, pixels of the (global) views.
        crop_min_scale: lower bound of the full-size crops' ``RandomResizedCrop`` scale; None keeps
            the method's (:func:`rela_pipeline.recipes.method_recipes`).
        local_views: DINO's and SwaV's number of local (low-resolution) views; None keeps
            lightly's 6.

    Raises:
        RelaError: unknown method, an image size below 8 pixels, ``crop_min_scale`` outside
            ``(0, 1]``, or a bad ``local_views`` (:func:`rela_pipeline.recipes.method_recipes`).
    """
    return views_of(method_recipes(method, image_size, crop_min_scale, local_views))


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, ``random`` and numpy's global generator with ``seed`` for the
    block (what torchvision's and lightly's per-image transforms draw from), then restore them."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class PerImageViews:
    """A per-image view transform (PIL RGB image -> list of float ``(3, s, s)`` tensors: lightly's,
    torchvision's or a user's own) as a batched one: ``(uint8 (B, 3, S, S), generator) -> list of
    float (B, 3, s, s)`` on the batch's device.

    Each image gets its own seed, drawn from the batch's generator, and its transform runs with
    torch's CPU generator, ``random`` and numpy's global generator seeded with it (and restored
    after), so the views are a function of the batch's seed: the same on every data path, on every
    run and on resume. The images are transformed one by one in this process, on the CPU: the
    reference path and the one for per-image transforms of your own, not the fast one
    (:mod:`rela_pipeline.batched_views` makes the built-in recipes batched on the device).

    Args:
        transform: the per-image transform.
    """

    def __init__(self, transform: ViewTransform) -> None:
        self.transform = transform

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """The views of a uint8 ``(B, 3, S, S)`` batch.

        Raises:
            RelaError: the transform does not return the same number of ``(3, s, s)`` tensors for
                every image.
        """
        seeds = torch.randint(0, 2**62, (images.shape[0],), generator=generator, device=generator.device).tolist()
        per_image = []
        for row, seed in zip(images.cpu(), seeds):
            with _seeded(seed):
                per_image.append(self.transform(Image.fromarray(row.permute(1, 2, 0).numpy())))
        counts = {len(views) for views in per_image}
        if len(counts) != 1:
            raise RelaError(
                f"the per-image transform returned {sorted(counts)} views for the images of one batch; it must return the same number for every image"
            )
        return [torch.stack([views[v] for views in per_image]).to(images.device, non_blocking=True) for v in range(counts.pop())]

    def __repr__(self) -> str:
        return f"PerImageViews({self.transform!r})"
