"""Augmented views: the ReLA views and each SSL method's standard views, scaled to the image size.

All transforms are lightly's (torchvision underneath) and map a PIL RGB image to a list of float32
``(3, S, S)`` tensors normalised with the ImageNet mean and std (the same normalisation the
student's evaluation preprocessing uses). Gaussian blur is off at 32 px and below, as in the SSL
literature's CIFAR recipes (solo-learn, lightly's CIFAR-10 benchmarks).

ReLA views (the authors' code, ReLA section 4): RandomResizedCrop(scale 0.5-1), horizontal flip,
ColorJitter(0.8, 0.8, 0.8, 0.2) with p=0.8, grayscale p=0.2. That is lightly's SimCLR view with
``min_scale=0.5`` and no blur.

:class:`PerImageViews` makes any such per-image transform (or a user's own) a batched view
transform, the one interface the training data path calls (``--augment pil``).
"""

from __future__ import annotations

import contextlib
import random
from typing import Callable, Iterator

import numpy as np
import torch
from lightly.transforms import BYOLTransform, DINOTransform, SimCLRTransform
from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform
from lightly.transforms.multi_view_transform import MultiViewTransform
from lightly.transforms.simclr_transform import SimCLRViewTransform

from PIL import Image

from .errors import RelaError

#: Image sizes at or below which Gaussian blur is not used.
NO_BLUR_MAX_SIZE = 32

ViewTransform = Callable[[object], list]


def _blur(size: int, probability: float) -> float:
    return 0.0 if size <= NO_BLUR_MAX_SIZE else probability


def rela_views(image_size: int) -> MultiViewTransform:
    """Two ReLA views of ``image_size`` pixels (module docstring)."""
    view = SimCLRViewTransform(input_size=image_size, min_scale=0.5, cj_prob=0.8, cj_strength=1.0, cj_bright=0.8, cj_contrast=0.8, cj_sat=0.8, cj_hue=0.2, random_gray_scale=0.2, gaussian_blur=0.0)
    return MultiViewTransform([view, view])


def byol_views(image_size: int, crop_min_scale: float = 0.08) -> BYOLTransform:
    """BYOL's asymmetric pair (lightly's BYOLTransform: blur 1.0 / 0.1, solarisation 0 / 0.2)."""
    return BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=image_size, min_scale=crop_min_scale, gaussian_blur=_blur(image_size, 1.0)),
        view_2_transform=BYOLView2Transform(input_size=image_size, min_scale=crop_min_scale, gaussian_blur=_blur(image_size, 0.1)),
    )


def simclr_views(image_size: int, crop_min_scale: float = 0.08) -> SimCLRTransform:
    """SimCLR's symmetric pair (lightly's SimCLRTransform, blur 0.5 above 32 px)."""
    return SimCLRTransform(input_size=image_size, min_scale=crop_min_scale, gaussian_blur=_blur(image_size, 0.5))


def dino_views(image_size: int, crop_min_scale: float = 0.4, n_local_views: int = 6) -> DINOTransform:
    """DINO's multi-crop: two global crops of ``image_size`` (scale ``(crop_min_scale, 1)``) and
    ``n_local_views`` local crops of ``round(image_size * 96 / 224)`` pixels (the paper's 224/96
    ratio; at least 8)."""
    local = max(8, round(image_size * 96 / 224))
    blur = (1.0, 0.1, 0.5) if image_size > NO_BLUR_MAX_SIZE else (0.0, 0.0, 0.0)
    return DINOTransform(global_crop_size=image_size, global_crop_scale=(crop_min_scale, 1.0), local_crop_size=local,
                         n_local_views=n_local_views, gaussian_blur=blur)


_METHOD_VIEWS = {"byol": byol_views, "simclr": simclr_views, "dino": dino_views}


def method_views(method: str, image_size: int, crop_min_scale: float | None = None) -> ViewTransform:
    """The standard views of a built-in SSL method.

    Args:
        method: ``"byol"``, ``"simclr"`` or ``"dino"``.
        image_size: S, pixels of the (global) views.
        crop_min_scale: lower bound of the (global) crops' ``RandomResizedCrop`` scale; None keeps
            the method's (0.08 for BYOL and SimCLR, 0.4 for DINO's global crops).

    Raises:
        RelaError: unknown method, an image size below 8 pixels, or ``crop_min_scale`` outside
            ``(0, 1]``.
    """
    if image_size < 8:
        raise RelaError(f"image size must be at least 8 pixels, got {image_size}")
    if method not in _METHOD_VIEWS:
        raise RelaError(f"unknown SSL method '{method}'; choose one of: {', '.join(_METHOD_VIEWS)}")
    if crop_min_scale is None:
        return _METHOD_VIEWS[method](image_size)
    if not 0.0 < crop_min_scale <= 1.0:
        raise RelaError(f"the crop's minimum scale must be in (0, 1], got {crop_min_scale}")
    return _METHOD_VIEWS[method](image_size, crop_min_scale=crop_min_scale)


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
            raise RelaError(f"the per-image transform returned {sorted(counts)} views for the images of one batch; it must return the same number for every image")
        return [torch.stack([views[v] for views in per_image]).to(images.device, non_blocking=True) for v in range(counts.pop())]

    def __repr__(self) -> str:
        return f"PerImageViews({self.transform!r})"
