"""The view recipes: every parameter of the ReLA views and of each SSL method's standard views,
defined once and made two ways, per image with lightly's PIL transforms (:mod:`rela_pipeline.views`)
and batched on the device (:mod:`rela_pipeline.batched_views`).

The numbers are lightly 1.6's transforms' defaults (``BYOLView1Transform``/``BYOLView2Transform``
for BYOL and Barlow Twins, ``SimCLRViewTransform``, ``DINOTransform``, ``VICRegTransform``,
``MoCoV2Transform``, ``SwaVTransform``; a test checks them against lightly's own objects), the
ReLA view of the authors' code, and torchvision's standard supervised crop and flip. Gaussian blur
is off at 32 px and below (:data:`NO_BLUR_MAX_SIZE`), as in the SSL literature's CIFAR recipes
(solo-learn, lightly's CIFAR-10 benchmarks and its Barlow Twins example).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import RelaError

#: Image sizes at or below which Gaussian blur is not used (the rule of :mod:`rela_pipeline.views`).
NO_BLUR_MAX_SIZE = 32


@dataclass(frozen=True)
class ViewRecipe:
    """The parameters of one view (one lightly per-view transform).

    Attributes:
        size: output side in pixels (``RandomResizedCrop(size=...)``).
        scale: ``(min, max)`` crop area as a fraction of the input area (``RandomResizedCrop``).
        ratio: ``(min, max)`` crop aspect ratio width / height; torchvision's default (3/4, 4/3).
        flip_p: probability of a horizontal flip (``RandomHorizontalFlip(p)``).
        jitter: ``(brightness, contrast, saturation, hue)`` strengths of torchvision's
            ``ColorJitter`` (lightly passes ``cj_strength * cj_bright`` etc.): factors are drawn
            from ``[max(0, 1 - b), 1 + b]``, ``[max(0, 1 - c), 1 + c]``, ``[max(0, 1 - s), 1 + s]``
            and ``[-h, h]`` (hue in turns, ``h <= 0.5``).
        jitter_p: probability that the jitter is applied (``RandomApply([ColorJitter], p)``).
        gray_p: probability of grayscale (``RandomGrayscale(p)``).
        blur_p: probability of Gaussian blur (lightly's ``GaussianBlur(prob=...)``).
        blur_sigma: ``(min, max)`` of the blur's standard deviation in pixels, drawn uniformly
            (lightly's ``sigmas``, default (0.1, 2)).
        solarize_p: probability of solarisation, ``x >= 0.5 -> 1 - x`` on [0, 1] values
            (lightly's ``RandomSolarization(prob, threshold=128)``).
        solarize_before_blur: the order of the last two ops: lightly's ``VICRegViewTransform``
            solarises before it blurs (True); every other view blurs first (False).
        interpolation: ``"bilinear"`` (torchvision's default, lightly's SimCLR/BYOL views) or
            ``"bicubic"`` (lightly's DINO views).

    Raises:
        RelaError: a size below 1, a probability outside [0, 1], an empty or inverted range, a
            negative jitter strength, a hue strength above 0.5 or an unknown interpolation.
    """

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    jitter_p: float = 0.0
    gray_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    interpolation: str = "bilinear"
    solarize_before_blur: bool = False

    def __post_init__(self) -> None:
        if int(self.size) != self.size or self.size < 1:
            raise RelaError(f"view size must be a positive integer, got {self.size}")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise RelaError(f"view {name} must be a probability in [0, 1], got {p}")
        for name, low_limit in (("scale", 0.0), ("ratio", 0.0), ("blur_sigma", 0.0)):
            low, high = getattr(self, name)
            if not (low_limit < low <= high):
                raise RelaError(f"view {name} must be (min, max) with 0 < min <= max, got {getattr(self, name)}")
        if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise RelaError(f"view jitter must be 4 non-negative strengths (hue <= 0.5), got {self.jitter}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise RelaError(f"view interpolation must be 'bilinear' or 'bicubic', got '{self.interpolation}'")

    def jitter_ranges(self) -> tuple[tuple[float, float], ...]:
        """The four factor ranges ``(low, high)``: brightness, contrast, saturation (multiplicative,
        low clipped at 0) and hue (additive, turns), as torchvision's ``ColorJitter._check_input``."""
        b, c, s, h = (float(v) for v in self.jitter)
        return ((max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h))


def _blur(size: int, probability: float) -> float:
    return 0.0 if size <= NO_BLUR_MAX_SIZE else probability


def check_image_size(image_size: int) -> None:
    """Raise :class:`RelaError` for views of fewer than 8 pixels."""
    if image_size < 8:
        raise RelaError(f"image size must be at least 8 pixels, got {image_size}")


def rela_recipe(image_size: int) -> ViewRecipe:
    """The ReLA view (the authors' code): ``RandomResizedCrop(scale=(0.5, 1))`` (bilinear), flip
    p = 0.5, ``ColorJitter(0.8, 0.8, 0.8, 0.2)`` applied with p = 0.8, grayscale p = 0.2, no blur
    and no solarisation: lightly's ``SimCLRViewTransform`` with ``min_scale=0.5`` and no blur."""
    return ViewRecipe(size=image_size, scale=(0.5, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2)


def byol_recipes(image_size: int) -> tuple[ViewRecipe, ViewRecipe]:
    """BYOL's asymmetric pair, lightly's ``BYOLView1Transform`` / ``BYOLView2Transform`` defaults:
    ``RandomResizedCrop(scale=(0.08, 1))`` (bilinear), flip p = 0.5,
    ``ColorJitter(0.4, 0.4, 0.2, 0.1)`` with p = 0.8, grayscale p = 0.2, Gaussian blur p = 1.0 /
    0.1 with sigma in (0.1, 2) (off at <= 32 px), solarisation
    p = 0.0 / 0.2."""
    common = dict(size=image_size, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2)
    return (
        ViewRecipe(**common, blur_p=_blur(image_size, 1.0), solarize_p=0.0),
        ViewRecipe(**common, blur_p=_blur(image_size, 0.1), solarize_p=0.2),
    )


def simclr_recipe(image_size: int) -> ViewRecipe:
    """SimCLR's view, lightly's ``SimCLRViewTransform`` defaults: ``RandomResizedCrop(scale=(0.08,
    1))`` (bilinear), flip p = 0.5, ``ColorJitter(0.8, 0.8, 0.8, 0.2)`` with p = 0.8, grayscale
    p = 0.2, Gaussian blur p = 0.5 with sigma in (0.1, 2) (off at <= 32 px), no solarisation."""
    return ViewRecipe(size=image_size, scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2, blur_p=_blur(image_size, 0.5))


def dino_local_size(image_size: int) -> int:
    """The multi-crop local (low-resolution) crop side of DINO and SwaV:
    ``max(8, round(image_size * 96 / 224))`` (both papers' 96 px crops for 224 px global ones)."""
    return max(8, round(image_size * 96 / 224))


def dino_recipes(image_size: int, n_local_views: int = 6) -> tuple[ViewRecipe, ...]:
    """DINO's multi-crop, lightly's ``DINOTransform`` / ``DINOViewTransform`` defaults:
    ``RandomResizedCrop`` with BICUBIC interpolation, global crops of ``image_size`` with scale
    (0.4, 1), local crops of :func:`dino_local_size` with scale (0.05, 0.4); flip p = 0.5;
    ``ColorJitter`` of strength 0.5 x (0.8, 0.8, 0.4, 0.2) = (0.4, 0.4, 0.2, 0.1) with p = 0.8;
    grayscale p = 0.2; Gaussian blur p = (1.0, 0.1, 0.5) for (global 1, global 2, locals), sigma
    in (0.1, 2), off at <= 32 px; solarisation p = 0.2 on the second global view only."""
    if n_local_views < 0:
        raise RelaError(f"the number of DINO local views must be >= 0, got {n_local_views}")
    common = dict(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, interpolation="bicubic")
    global_0 = ViewRecipe(size=image_size, scale=(0.4, 1.0), blur_p=_blur(image_size, 1.0), **common)
    global_1 = ViewRecipe(size=image_size, scale=(0.4, 1.0), blur_p=_blur(image_size, 0.1), solarize_p=0.2, **common)
    local = ViewRecipe(size=dino_local_size(image_size), scale=(0.05, 0.4), blur_p=_blur(image_size, 0.5), **common)
    return (global_0, global_1) + (local,) * n_local_views


def barlowtwins_recipes(image_size: int) -> tuple[ViewRecipe, ViewRecipe]:
    """Barlow Twins' pair: BYOL's (:func:`byol_recipes`), as in the Barlow Twins paper (Zbontar et
    al. 2021, appendix) and lightly's Barlow Twins example (``BYOLTransform`` with
    ``BYOLView1Transform`` / ``BYOLView2Transform``)."""
    return byol_recipes(image_size)


def vicreg_recipe(image_size: int) -> ViewRecipe:
    """VICReg's view (both views), lightly's ``VICRegTransform`` defaults: ``RandomResizedCrop(scale=
    (0.08, 1))`` (bilinear), flip p = 0.5, ``ColorJitter`` of strength 0.5 x (0.8, 0.8, 0.4, 0.2) =
    (0.4, 0.4, 0.2, 0.1) with p = 0.8, grayscale p = 0.2, solarisation p = 0.1 and then Gaussian
    blur p = 0.5 with sigma in (0.1, 2) (off at <= 32 px): lightly solarises before it blurs."""
    return ViewRecipe(
        size=image_size,
        scale=(0.08, 1.0),
        jitter=(0.4, 0.4, 0.2, 0.1),
        jitter_p=0.8,
        gray_p=0.2,
        blur_p=_blur(image_size, 0.5),
        solarize_p=0.1,
        solarize_before_blur=True,
    )


def moco_recipe(image_size: int) -> ViewRecipe:
    """MoCo v2's view (query and key), lightly's ``MoCoV2Transform`` defaults (Chen et al. 2020,
    "Improved Baselines with Momentum Contrastive Learning"): ``RandomResizedCrop(scale=(0.2, 1))``
    (bilinear), flip p = 0.5, ``ColorJitter(0.4, 0.4, 0.4, 0.1)`` with p = 0.8, grayscale p = 0.2,
    Gaussian blur p = 0.5 with sigma in (0.1, 2) (off at <= 32 px), no solarisation."""
    return ViewRecipe(size=image_size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=_blur(image_size, 0.5))


def swav_recipes(image_size: int, n_low_resolution: int = 6) -> tuple[ViewRecipe, ...]:
    """SwaV's multi-crop, lightly's ``SwaVTransform`` defaults (Caron et al. 2020): 2 high-resolution
    crops of ``image_size`` with scale (0.14, 1) and ``n_low_resolution`` low-resolution crops of
    :func:`dino_local_size` (lightly's 96 px for 224) with scale (0.05, 0.14), all bilinear; flip
    p = 0.5, ``ColorJitter(0.8, 0.8, 0.8, 0.2)`` with p = 0.8, grayscale p = 0.2, Gaussian blur
    p = 0.5 with sigma in (0.1, 2) (off at <= 32 px, judged on ``image_size`` as for DINO), no
    solarisation.

    Raises:
        RelaError: a negative ``n_low_resolution``.
    """
    if n_low_resolution < 0:
        raise RelaError(f"the number of SwaV low-resolution views must be >= 0, got {n_low_resolution}")
    common = dict(jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, gray_p=0.2, blur_p=_blur(image_size, 0.5))
    high = ViewRecipe(size=image_size, scale=(0.14, 1.0), **common)
    low = ViewRecipe(size=dino_local_size(image_size), scale=(0.05, 0.14), **common)
    return (high, high) + (low,) * n_low_resolution


def supervised_recipe(image_size: int) -> ViewRecipe:
    """The standard supervised augmentation (torchvision's ImageNet training recipe):
    ``RandomResizedCrop(scale=(0.08, 1))`` (bilinear) and flip p = 0.5, nothing else."""
    return ViewRecipe(size=image_size, scale=(0.08, 1.0))


def rela_recipes(image_size: int) -> tuple[ViewRecipe, ViewRecipe]:
    """The two ReLA views (:func:`rela_recipe`, twice).

    Raises:
        RelaError: ``image_size`` below 8.
    """
    check_image_size(image_size)
    view = rela_recipe(image_size)
    return (view, view)


def with_crop_min_scale(recipes: Sequence[ViewRecipe], min_scale: float) -> tuple[ViewRecipe, ...]:
    """``recipes`` with the lower bound of every full-size view's crop scale set to ``min_scale``
    (DINO's local and SwaV's low-resolution crops keep theirs): ``RandomResizedCrop(scale=(min_scale, 1))``.

    Raises:
        RelaError: ``min_scale`` outside ``(0, 1]``.
    """
    if not 0.0 < min_scale <= 1.0:
        raise RelaError(f"the crop's minimum scale must be in (0, 1], got {min_scale}")
    size = max(r.size for r in recipes)
    return tuple(dataclasses.replace(r, scale=(min_scale, r.scale[1])) if r.size == size else r for r in recipes)


#: The built-in methods' recipes. Every method has at least two views (the data path's rule);
#: ``supervised`` gets two independent crops of each image, both classified.
_METHOD_RECIPES = {
    "byol": byol_recipes,
    "simclr": lambda image_size: (simclr_recipe(image_size),) * 2,
    "dino": dino_recipes,
    "barlowtwins": barlowtwins_recipes,
    "vicreg": lambda image_size: (vicreg_recipe(image_size),) * 2,
    "moco": lambda image_size: (moco_recipe(image_size),) * 2,
    "swav": swav_recipes,
    "supervised": lambda image_size: (supervised_recipe(image_size),) * 2,
}


#: The methods with multi-crop views, whose number of local (low-resolution) views
#: ``local_views`` sets: DINO's local crops and SwaV's low-resolution crops (6 by default).
MULTI_CROP_METHODS = ("dino", "swav")


def method_recipes(method: str, image_size: int, crop_min_scale: float | None = None, local_views: int | None = None) -> tuple[ViewRecipe, ...]:
    """The standard views of a built-in method.

    Args:
        method: a key of :data:`_METHOD_RECIPES` (``byol``, ``simclr``, ``dino``, ``barlowtwins``,
            ``vicreg``, ``moco``, ``swav``, ``supervised``).
        image_size: S, pixels of the (global, high-resolution) views.
        crop_min_scale: if given, the lower bound of the crop scale of the full-size views
            (:func:`with_crop_min_scale`); None keeps the method's (0.08 for BYOL, SimCLR, Barlow
            Twins, VICReg and supervised, 0.2 for MoCo v2, 0.4 for DINO's global crops, 0.14 for
            SwaV's high-resolution crops).
        local_views: for the :data:`MULTI_CROP_METHODS`, the number of local (low-resolution)
            views after the two full-size ones; None keeps lightly's 6. 0 leaves the two full-size
            views alone, as solo-learn's CIFAR recipes for DINO and SwaV do at 32 px
            (``num_small_crops: 0``).

    Raises:
        RelaError: unknown method, an image size below 8 pixels, ``crop_min_scale`` outside
            ``(0, 1]``, a negative ``local_views``, or ``local_views`` for a method without
            multi-crop views.
    """
    check_image_size(image_size)
    if method not in _METHOD_RECIPES:
        raise RelaError(f"unknown SSL method '{method}'; choose one of: {', '.join(_METHOD_RECIPES)}")
    if local_views is not None and local_views < 0:
        raise RelaError(f"local views must be >= 0, got {local_views}")
    if local_views is None:
        recipes = tuple(_METHOD_RECIPES[method](image_size))
    elif method in MULTI_CROP_METHODS:
        recipes = tuple(_METHOD_RECIPES[method](image_size, local_views))
    else:
        raise RelaError(f"local views are a multi-crop setting ({', '.join(MULTI_CROP_METHODS)}); method '{method}' has none")
    return recipes if crop_min_scale is None else with_crop_min_scale(recipes, crop_min_scale)
