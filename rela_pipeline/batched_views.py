"""Batched augmented views on the training device: the recipes of :mod:`rela_pipeline.recipes`
(lightly 1.6's transforms, torchvision underneath) applied to a whole uint8 batch at once.

Input: a uint8 batch ``(B, 3, H, W)`` (normally ``H = W = S``: the images are already resized to
the training resolution) on any device, and a :class:`torch.Generator` on the same device.
Output: one contiguous float32 tensor ``(B, 3, s, s)`` per view on that device, normalised with
lightly's ``IMAGENET_NORMALIZE`` mean and std, like lightly's ``ToTensor()`` + ``Normalize`` after
its PIL transforms.

Design
------
* **Per-sample independence.** Every random quantity (crop box, flip, jitter on/off, the four
  jitter factors, the jitter order, grayscale, blur and its sigma, solarisation) is drawn
  independently for every sample and every view, as lightly does by calling its per-image
  transform once per image and view. In particular the ColorJitter order is a random permutation
  PER SAMPLE (torchvision's ``ColorJitter`` draws ``torch.randperm(4)`` on every call, i.e. per
  image); ``kornia.augmentation.ColorJitter`` would use one order for the whole batch.
* **Generator-only randomness.** All draws come from ONE ``torch.rand((V, B, 36))`` call on the
  given generator (:data:`_N_UNIFORMS` uniforms per sample and view); no global RNG (torch,
  numpy, random) is touched, so a generator seeded the same way on the same device gives the same
  views on every run and on resume. The CPU and CUDA generators are different streams (Mersenne
  Twister and Philox): the same seed gives other views on the two devices.
  :meth:`BatchedViews.sample_parameters` makes the draws, :meth:`BatchedViews.apply` uses them,
  and ``__call__`` is exactly ``apply(images, sample_parameters(B, H, W, generator))``.
* **Vectorised.** No Python loop over samples. The Python loops run over view groups (views with
  the same output size, interpolation and op order are processed as one batch of ``n_views * B``
  samples: both ReLA views, both BYOL views, DINO's local views, SwaV's low-resolution views) and over the six fixed jitter slots. On
  CUDA nothing has a data-dependent shape (no ``nonzero``, ``.item()`` or boolean indexing), so a
  call queues its kernels without a device-to-host sync; only on CPU, where that costs nothing,
  the blur runs on the blurred samples alone.
* **Where.** Everything, parameters included, runs on the device of the images and generator, in
  float32 (autocast is switched off inside). On CUDA, bitwise reproducibility also assumes the
  same cuDNN algorithm for the blur's convolution (``cudnn.benchmark`` off or deterministic
  mode), and the matmul crops (DINO, shrinking views) follow the global TF32 setting.

Pipeline per view (the order of lightly's ``Compose``), on float32 values in [0, 1]
(``images.float() / 255``): RandomResizedCrop + RandomHorizontalFlip -> RandomApply(ColorJitter)
-> RandomGrayscale -> GaussianBlur -> RandomSolarization -> Normalize; for recipes with
``solarize_before_blur`` (lightly's VICReg views) RandomSolarization comes before GaussianBlur.

* **Crop + resize + flip**, one batched kernel per view group. Bilinear views that never shrink
  (output side >= input side: every view at the training resolution) use one ``grid_sample``
  (:func:`_grid_crop`) whose sample positions are clamped to the crop box: exactly PIL's bilinear
  ``Image.resize`` of the cropped image (torchvision's ``resized_crop`` on lightly's PIL images)
  when upscaling. Views that can shrink (DINO's local, SwaV's low-resolution crops) or are bicubic (DINO) use separable
  per-sample resampling matrices with PIL's filters (:func:`_resample_matrices`: antialiasing
  support, taps restricted to the crop, Keys a = -0.5 cubic), two batched matmuls
  (:func:`_matrix_crop`). ``roi_align`` (no flip, leaks the pixels around the crop, area sampling
  not PIL's filter) and an ``affine_grid`` were measured slower (``benchmarks/views_cost.py``).
* **ColorJitter** (:func:`_color_jitter_`): brightness, contrast and saturation are one per-sample
  blend ``clamp(a x + (1 - a) ref, 0, 1)`` with ``ref = 0`` (torchvision ``adjust_brightness``),
  ``mean(gray(x))`` (``adjust_contrast``) or ``gray(x)`` (``adjust_saturation``); ``a = 1`` is an
  exact identity. Per-sample order without gathers: with ``k`` the position of hue in a sample's
  permutation, three blend slots run its non-hue ops that come before hue (identity from slot
  ``k`` on), then one hue pass over the batch, then three slots with the rest. Measured 1.7x
  faster than 4 slots x 4 ops on ``index_select``-ed subsets (which also needs ``nonzero``, a
  host sync on CUDA), 3.3x faster than the same with kornia's functional ops.
* **Hue** (:func:`_adjust_hue_`): torchvision's ``_rgb_to_hsv`` hue (same ties: red, then green,
  then blue maximum), shifted, and a closed-form HSV -> RGB equal to torchvision's sextant table.
  Written directly because ``kornia.enhance.adjust_hue`` (radians) and torchvision's tensor kernel
  cost 6.5x more here.
* **Grayscale**: ITU-R 601 luma ``0.299 R + 0.587 G + 0.114 B`` (PIL's ``convert("L")``,
  kornia's ``rgb_to_grayscale``; torchvision's tensor kernel uses 0.2989) on 3 channels.
* **Gaussian blur** (:func:`_gaussian_blur`; only where a recipe's probability is non-zero, i.e.
  above 32 px): per-sample sigma ~ U(0.1, 2) (lightly's ``GaussianBlur``), separable depthwise
  convolution with the normalised Gaussian of size ``2 * ceil(3 * sigma_max) + 1`` (13), replicate
  padding.
* **Solarisation**: ``x >= 0.5 -> 1 - x`` (torchvision ``solarize(x, 0.5)``), as ``min(x, 1 - x)``.
* **CPU speed.** Freshly allocated memory costs page faults on every call (~0.1 ms per MB, more
  than the arithmetic on it: glibc returns large blocks to the kernel), and comparisons,
  ``torch.where`` and ``remainder`` run 5-30x slower than arithmetic. So the ops work in place on
  the view tensor, take their temporaries from a per-thread workspace kept between calls (CPU
  only; :meth:`BatchedViews._workspace`), and select with arithmetic masks (``lerp`` with 0/1
  weights, ``1 + sign(c - max)``) instead of ``where``. A first version of this module without
  these measures took 3x as long.

What each part costs is measured by ``benchmarks/views_cost.py`` (the docs' results pages).

Deviations from the PIL reference (lightly's actual path):

* float32 throughout: no uint8 rounding after each PIL operation (differences up to ~1/255 per
  operation);
* grayscale (and the contrast/saturation reference) uses 0.299 R (PIL) where torchvision's tensor
  kernel uses 0.2989 (< 1e-4);
* hue is torchvision's float HSV formula; PIL's uint8 HSV round trip quantises hue to 1/256;
* solarisation threshold 0.5 on [0, 1] values where lightly's ``threshold=128`` on uint8 is
  128/255 = 0.50196 (only float values in [0.5, 0.502) differ);
* the blur is a true (truncated at 3 sigma_max) Gaussian; PIL's ``GaussianBlur(radius=sigma)`` is
  an extended-box-blur approximation of it;
* bicubic (DINO): the intermediate of the two passes is clamped after the horizontal pass
  (Pillow's ``ImagingResampleInner`` order); the Pillow 13 installed here runs the vertical pass
  first for crops taller than wide that shrink vertically, which changes only overshooting
  pixels (up to ~0.02);
* crop sampling: torchvision draws in double precision; here float32 (rounding of ``w``/``h`` at
  exact .5 boundaries may differ; the distribution is the same).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import RelaError
from .recipes import (  # noqa: F401  (ViewRecipe and the recipes are part of this module's interface)
    NO_BLUR_MAX_SIZE,
    ViewRecipe,
    byol_recipes,
    check_image_size,
    dino_local_size,
    dino_recipes,
    method_recipes,
    rela_recipe,
    rela_recipes,
    simclr_recipe,
)
from .recipes import with_crop_min_scale as recipes_with_crop_min_scale

#: lightly.transforms.utils.IMAGENET_NORMALIZE (copied so that importing this module does not
#: import lightly; a test checks they are equal).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: ITU-R 601-2 luma weights (PIL ``convert("L")``, kornia ``rgb_to_grayscale``).
GRAY_WEIGHTS = (0.299, 0.587, 0.114)

#: Trials of torchvision's ``RandomResizedCrop.get_params`` before its centre-crop fallback.
CROP_TRIALS = 10

# Columns of the per-sample uniform block drawn for each view.
_AREA = slice(0, CROP_TRIALS)
_LOG_RATIO = slice(CROP_TRIALS, 2 * CROP_TRIALS)
_TOP, _LEFT, _FLIP, _JITTER = 20, 21, 22, 23
_FACTORS = slice(24, 28)
_ORDER = slice(28, 32)
_GRAY, _BLUR, _SIGMA, _SOLARIZE = 32, 33, 34, 35
#: Uniforms drawn per sample and view.
_N_UNIFORMS = 36

#: The keys of one view's parameters (:meth:`BatchedViews.sample_parameters`).
_PARAMETER_KEYS = frozenset(("crop", "crop_fallback", "flip", "jitter", "factors", "order", "gray", "blur", "sigma", "solarize"))

#: Jitter op ids, torchvision ``ColorJitter``'s ``fn_idx`` convention.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

#: Largest CPU scratch workspace kept between calls, in bytes.
MAX_CACHED_WORKSPACE = 256 * 2**20


# ----------------------------------------------------------------------------------------------
# Parameter sampling
# ----------------------------------------------------------------------------------------------


def _fallback_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop`` fallback ``(top, left, h, w)``: the whole image, or the
    centre crop with the aspect ratio clamped to ``ratio``."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _recipe_table(recipes: Sequence[ViewRecipe], height: int, width: int, device: torch.device) -> torch.Tensor:
    """float32 ``(V, 1, 23)``: each view's constants for :func:`_draw_parameters`."""
    rows = []
    for r in recipes:
        ranges = [v for pair in r.jitter_ranges() for v in pair]
        rows.append(
            [
                float(r.scale[0]),
                float(r.scale[1]),
                math.log(r.ratio[0]),
                math.log(r.ratio[1]),
                r.flip_p,
                r.jitter_p,
                r.gray_p,
                r.blur_p,
                float(r.blur_sigma[0]),
                float(r.blur_sigma[1]),
                r.solarize_p,
                *ranges,
                *(float(v) for v in _fallback_crop(height, width, r.ratio)),
            ]
        )
    return torch.tensor(rows, dtype=torch.float32, device=device).unsqueeze(1)


def _draw_parameters(u: torch.Tensor, table: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    """Every view's parameters at once from the uniforms ``u`` (float32 ``(V, B, 36)``) and the
    constants of :func:`_recipe_table`; tensors ``(V, B, ...)`` (keys: :meth:`BatchedViews.sample_parameters`).

    Crop: torchvision's ``RandomResizedCrop.get_params`` with its 10 trials drawn at once: area
    fraction ``U(scale)``, log aspect ratio ``U(log r0, log r1)``, ``w = round(sqrt(area * ratio))``,
    ``h = round(sqrt(area / ratio))``; the first trial with ``0 < w <= W`` and ``0 < h <= H`` wins,
    then ``top ~ randint(0, H - h + 1)`` and ``left ~ randint(0, W - w + 1)`` (as
    ``floor(U * (H - h + 1))``); samples without a valid trial get the fallback
    (:func:`_fallback_crop`). Bernoulli(p) draws are ``U < p``; factors and sigma ``lo + (hi - lo) U``;
    the jitter order is the ``argsort`` of 4 uniforms, a uniformly random permutation.
    """
    c = table.unbind(dim=2)  # 23 x (V, 1)
    area = float(height * width)
    target = (c[0][..., None] + (c[1] - c[0])[..., None] * u[..., _AREA]).mul_(area)
    aspect = torch.exp(c[2][..., None] + (c[3] - c[2])[..., None] * u[..., _LOG_RATIO])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target.div_(aspect)))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.to(torch.uint8).argmax(dim=2, keepdim=True)
    found = valid.any(dim=2)
    w = torch.where(found, w.gather(2, first).squeeze(2), c[22])
    h = torch.where(found, h.gather(2, first).squeeze(2), c[21])
    top = torch.where(found, torch.floor(u[..., _TOP] * (height + 1 - h)).clamp_(max=height - h), c[19])
    left = torch.where(found, torch.floor(u[..., _LEFT] * (width + 1 - w)).clamp_(max=width - w), c[20])
    low = table[..., 11:19:2]
    factors = low + (table[..., 12:19:2] - low) * u[..., _FACTORS]
    return {
        "crop": torch.stack((top, left, h, w), dim=2).to(torch.int64),
        "crop_fallback": ~found,
        "flip": u[..., _FLIP] < c[4],
        "jitter": u[..., _JITTER] < c[5],
        "factors": factors,
        "order": torch.argsort(u[..., _ORDER], dim=2),
        "gray": u[..., _GRAY] < c[6],
        "blur": u[..., _BLUR] < c[7],
        "sigma": c[8] + (c[9] - c[8]) * u[..., _SIGMA],
        "solarize": u[..., _SOLARIZE] < c[10],
    }


# ----------------------------------------------------------------------------------------------
# Per-sample image operations (float32 in [0, 1], shape (N, 3, H, W), in place where possible)
#
# On CPU, every freshly allocated MB costs ~0.1 ms of page faults (glibc hands large blocks back
# to the kernel), more than the arithmetic on it, and comparisons, ``where`` and ``remainder`` are
# 5-30x slower than plain arithmetic. So the ops below work in place on the view tensor, take
# their temporaries from a caller-provided scratch (``planes``: float32 ``(7, N, H, W)``,
# ``block``: float32 ``(N, 3, H, W)``; :func:`_scratch` allocates fresh ones) and use arithmetic
# masks (``lerp`` with 0/1 weights, ``1 + sign(...)``) instead of ``where``.
# ----------------------------------------------------------------------------------------------


def _scratch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh scratch ``(planes (7, N, H, W), block (N, 3, H, W))`` for the ops on ``x``."""
    n, _, height, width = x.shape
    return x.new_empty((7, n, height, width)), x.new_empty((n, 3, height, width))


def _filter(t: torch.Tensor, bicubic: bool) -> torch.Tensor:
    """PIL's resampling filters (``libImaging/Resample.c``), in place on ``t``: triangle
    ``max(0, 1 - |t|)`` or Keys cubic with a = -0.5, ``1.5 s^3 - 2.5 s^2 + 1`` on ``s = |t| < 1`` and
    ``-0.5 (s - 1) (s - 2)^2`` on ``1 <= s < 2``, evaluated branch-free as
    ``near(min(s, 1)) + far(clamp(s, 1, 2))`` (each piece vanishes at the clamped ends)."""
    s = t.abs_()
    if not bicubic:
        return s.neg_().add_(1.0).clamp_(min=0.0)
    u = s.clamp(max=1.0)
    near = (u - 1.0).mul_(u.mul(1.5).sub_(1.0).mul_(u).sub_(1.0))  # (u - 1)(1.5 u^2 - u - 1)
    v = s.clamp_(1.0, 2.0)
    far = (v - 2.0).square_().mul_(v.sub_(1.0)).mul_(-0.5)
    return near.add_(far)


def _resample_matrices(start: torch.Tensor, length: torch.Tensor, flip: torch.Tensor | None, in_size: int, out_size: int, bicubic: bool) -> torch.Tensor:
    """Per-sample 1-D resampling matrices ``(M, out_size, in_size)`` of PIL's ``Image.resize`` on
    the crop ``[start, start + length)`` of an axis of ``in_size`` pixels (PIL's
    ``precompute_coeffs``): output pixel ``j`` (or ``out_size - 1 - j`` where ``flip``) is centred
    at ``start + (j + 0.5) * scale``, ``scale = length / out_size``; tap ``x`` weighs
    ``filter((x + 0.5 - centre) / max(scale, 1))`` (antialiasing when shrinking) if ``x`` is inside
    the crop, and each row is normalised to sum 1.

    Args:
        start, length: float32 ``(M,)``, in pixels.
        flip: bool ``(M,)`` or None.
    """
    device = start.device
    scale = length / out_size
    filter_scale = scale.clamp(min=1.0)
    j = torch.arange(out_size, device=device, dtype=torch.float32)
    if flip is not None:
        j = torch.where(flip[:, None], (out_size - 1) - j, j)
    centre = start[:, None] + (j + 0.5) * scale[:, None]  # (M, out)
    pos = torch.arange(in_size, device=device, dtype=torch.float32)
    inside = (pos >= start[:, None]) & (pos < (start + length)[:, None])  # (M, in)
    t = (pos + 0.5 - centre[:, :, None]).div_(filter_scale[:, None, None])  # (M, out, in)
    weights = _filter(t, bicubic).mul_(inside[:, None, :])
    return weights.div_(weights.sum(dim=2, keepdim=True))


def _matrix_crop(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int, bicubic: bool) -> torch.Tensor:
    """Crop ``boxes`` (int64 ``(V * B, 4)``: top, left, height, width) out of ``x`` (float32
    ``(B, 3, H, W)``; sample ``i`` of every view reads image ``i % B``), flip where ``flip`` and
    resize to ``size x size`` with PIL's filters (:func:`_resample_matrices`): float32
    ``(V * B, 3, size, size)``, two batched matmuls, horizontal pass first as in Pillow's
    ``ImagingResampleInner``; with bicubic both passes are clamped to [0, 1], as Pillow clips its
    uint8 intermediate and output. (The Pillow 13 here runs the vertical pass first for crops
    taller than wide that shrink vertically; that changes only overshooting pixels, which the
    intermediate clamp cuts differently.) Used for bicubic views and where a crop can be shrunk
    (antialiasing)."""
    n_img, channels, height, width = x.shape
    n = boxes.shape[0]
    views = n // n_img if n_img else 0
    b = boxes.to(torch.float32)
    if height == width:
        both = _resample_matrices(
            torch.cat((b[:, 0], b[:, 1])), torch.cat((b[:, 2], b[:, 3])), torch.cat((torch.zeros_like(flip), flip)), height, size, bicubic
        )
        wy, wx = both[:n], both[n:]
    else:
        wy = _resample_matrices(b[:, 0], b[:, 2], None, height, size, bicubic)
        wx = _resample_matrices(b[:, 1], b[:, 3], flip, width, size, bicubic)
    # Horizontal, all views of an image at once: (B, 3 H, W) @ (B, W, V * size) -> (B, 3 H, V * size).
    columns = wx.view(views, n_img, size, width).permute(1, 3, 0, 2).reshape(n_img, width, views * size)
    y = torch.bmm(x.reshape(n_img, channels * height, width), columns)
    if bicubic:
        y.clamp_(0.0, 1.0)
    # Vertical: (V, B, 1, size, H) @ (V, B, 3, H, size) -> (V, B, 3, size, size).
    y = y.view(n_img, channels, height, views, size).permute(3, 0, 1, 2, 4)
    y = torch.matmul(wy.view(views, n_img, 1, size, height), y)
    y = y.view(n, channels, size, size)
    return y.clamp_(0.0, 1.0) if bicubic else y


def _grid_crop(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int, grid: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear crop + upscale + flip with one ``grid_sample`` (``x`` float32 ``(N, 3, H, W)``,
    one image per box; returns float32 ``(N, 3, size, size)``). Output pixel ``j`` samples the crop
    at ``left - 0.5 + (j + 0.5) * w / size`` (half-pixel centres; mirrored where ``flip``), clamped
    to the crop's first and last pixel centres, which is exactly PIL's bilinear ``resize`` of the
    cropped image when it is not shrunk (triangle filter of support 1, taps outside the crop
    dropped and the weights renormalised). ``grid``: optional float32 ``(N, size, size, 2)`` buffer.
    """
    n, _, height, width = x.shape
    b = boxes.to(torch.float32)
    top, left, h, w = b.unbind(dim=1)
    j = torch.arange(size, device=x.device, dtype=torch.float32) + 0.5
    jx = torch.where(flip[:, None], size - j, j)  # (N, size)
    px = (left[:, None] - 0.5 + jx * (w / size)[:, None]).clamp_(min=left[:, None], max=(left + w - 1)[:, None])
    py = (top[:, None] - 0.5 + j * (h / size)[:, None]).clamp_(min=top[:, None], max=(top + h - 1)[:, None])
    if grid is None:
        grid = x.new_empty((n, size, size, 2))
    grid[..., 0].copy_(px.mul_(2.0 / width).add_(1.0 / width - 1.0)[:, None, :])
    grid[..., 1].copy_(py.mul_(2.0 / height).add_(1.0 / height - 1.0)[:, :, None])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """ITU-R 601 luma ``(N, H, W)`` of float RGB ``(N, 3, H, W)`` (PIL ``convert("L")``,
    kornia ``rgb_to_grayscale``), optionally into ``out``."""
    r, g, b = x.unbind(dim=1)
    return torch.mul(r, GRAY_WEIGHTS[0], out=out).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])


def _blend_(x: torch.Tensor, a: torch.Tensor, sat: torch.Tensor, con: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """One linear jitter op per sample, in place: ``x = clamp(a x + sat gray(x) + con mean(gray(x)),
    0, 1)`` with per-sample ``(N, 1, 1, 1)`` coefficients. Brightness is ``sat = con = 0``
    (torchvision ``adjust_brightness``: ``x * a``), contrast ``con = 1 - a`` (``adjust_contrast``:
    blend with the mean of the grayscale image), saturation ``sat = 1 - a``
    (``adjust_saturation``: blend with the grayscale image); ``a = 1, sat = con = 0`` is an exact
    identity. Uses ``planes[0:2]``."""
    gray = _gray(x, out=planes[0]).unsqueeze(1)
    ref = torch.addcmul(con * gray.mean(dim=(2, 3), keepdim=True), gray, sat, out=planes[1].unsqueeze(1))
    return torch.addcmul(ref, x, a, out=x).clamp_(0.0, 1.0)


def _adjust_hue_(x: torch.Tensor, shift: torch.Tensor, on: torch.Tensor, planes: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """torchvision ``adjust_hue`` per sample, in place: ``shift`` float32 ``(N,)`` in turns, applied
    where ``on`` (float 0/1 ``(N, 1, 1, 1)``; exact identity elsewhere).

    RGB -> hue in sixths as torchvision's ``_rgb_to_hsv``: ``(g - b) / C``, ``2 + (b - r) / C`` or
    ``4 + (r - g) / C`` for a red, green or blue maximum (ties in that order), ``C = max - min``.
    Shifted hue ``h' = (h + 6 shift) mod 6``; then HSV -> RGB in closed form: channel ``c`` (offset
    ``n = 5, 3, 1`` for R, G, B) is ``max - C * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (h' + n) mod 6``; for ``h' + n`` in [1, 11) that is ``(2 min - max) + C * clamp(||h' + n - 5|
    - 3|, 1, 2)`` (no second mod) - the values of torchvision's sextant table (a hue shift keeps
    V = max and S, hence also min).
    Branch-free: ``1 + sign(c - max)`` is the 0/1 mask "channel c is the maximum". Uses all 7
    planes and ``block``.
    """
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g, out=planes[0]), b, out=planes[0])
    minc = torch.minimum(torch.minimum(r, g, out=planes[1]), b, out=planes[1])
    red = torch.sub(r, maxc, out=planes[2]).sign_().add_(1.0)
    green = torch.sub(g, maxc, out=planes[3]).sign_().add_(1.0)
    green.addcmul_(green, red, value=-1.0)  # green is the maximum and red is not
    blue = torch.add(red, green, out=planes[4]).neg_().add_(1.0)
    diff = planes[5]
    num = torch.sub(g, b, out=planes[6]).mul_(red)
    num.addcmul_(torch.sub(b, r, out=diff), green).addcmul_(torch.sub(r, g, out=diff), blue)
    chroma = torch.sub(maxc, minc, out=diff)
    hue = num.div_(torch.clamp(chroma, min=1e-30, out=red)).add_(green, alpha=2.0).add_(blue, alpha=4.0)
    hue.add_((6.0 * shift).view(-1, 1, 1))  # in [-4, 8)
    hue.add_(torch.mul(hue, 1.0 / 6.0, out=green).floor_(), alpha=-6.0)  # mod 6
    base = minc.mul_(2.0).sub_(maxc)
    offsets = torch.tensor((0.0, -2.0, -4.0), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.add(hue.unsqueeze(1), offsets, out=block)  # (h' + n) - 5
    k.abs_().sub_(3.0).abs_().clamp_(1.0, 2.0)
    out = torch.addcmul(base.unsqueeze(1), chroma.unsqueeze(1), k, out=block)
    return x.lerp_(out, on)


def _color_jitter_(x: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, planes: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``RandomApply([ColorJitter], p)`` per sample, each sample with its own op order, in place.

    Args:
        x: float32 ``(N, 3, H, W)`` in [0, 1].
        apply: bool ``(N,)``, jitter on.
        factors: float32 ``(N, 4)``: brightness, contrast, saturation factors and hue shift (turns).
        order: int64 ``(N, 4)``, a permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue)
            per sample, applied left to right (torchvision's ``fn_idx``).
        planes, block: scratch (:func:`_scratch`).

    Hue at position ``k``: the 3 blend slots before the one hue pass apply the sample's ``j``-th
    non-hue op iff ``j < k``, the 3 slots after it iff ``j >= k``; inactive slots are exact
    identities. A hue factor of exactly 0 skips hue (torchvision skips a zero-strength op).
    """
    n = x.shape[0]
    is_hue = order == HUE
    k = is_hue.to(torch.uint8).argmax(dim=1, keepdim=True)  # (N, 1)
    linear = order.gather(1, torch.argsort(is_hue.to(torch.uint8), dim=1, stable=True)[:, :3])  # (N, 3)
    j = torch.arange(3, device=x.device)
    before = (j < k) & apply[:, None]
    after = (j >= k) & apply[:, None]
    ops = torch.cat((torch.where(before, linear, -1), torch.where(after, linear, -1)), dim=1)  # (N, 6)
    a = torch.where(ops >= 0, factors.gather(1, ops.clamp(min=0)), 1.0)
    rest = 1.0 - a
    sat = torch.where(ops == SATURATION, rest, 0.0)
    con = torch.where(ops == CONTRAST, rest, 0.0)
    a, sat, con = (c.T.reshape(6, n, 1, 1, 1).to(x.dtype) for c in (a, sat, con))
    for slot in range(3):
        _blend_(x, a[slot], sat[slot], con[slot], planes)
    hue_on = (apply & (factors[:, 3] != 0)).to(x.dtype).view(n, 1, 1, 1)
    _adjust_hue_(x, factors[:, 3].to(x.dtype), hue_on, planes, block)
    for slot in range(3, 6):
        _blend_(x, a[slot], sat[slot], con[slot], planes)
    return x


def _grayscale_(x: torch.Tensor, on: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """``RandomGrayscale``: luma on all 3 channels where ``on`` (bool ``(N,)``), in place (``lerp``
    with 0/1 weights, exact)."""
    return x.lerp_(_gray(x, out=planes[0]).unsqueeze(1), on.to(x.dtype).view(-1, 1, 1, 1))


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, on: torch.Tensor, sigma_max: float, subset: bool | None = None) -> torch.Tensor:
    """Per-sample Gaussian blur (lightly ``GaussianBlur``): separable depthwise convolution with the
    normalised kernel ``exp(-t^2 / (2 sigma^2))``, ``t = -r..r``, ``r = ceil(3 * sigma_max)``,
    replicate padding (PIL's box blurs extend the edge pixels). Samples with ``on`` False are left
    exactly as they are: with ``subset`` (default: on CPU) only the blurred samples are convolved
    (``index_select`` / ``index_copy_``, in place on ``x``); otherwise (no data-dependent shapes,
    so no host sync on CUDA) the whole batch is, with a delta kernel for the others (an exact
    identity).

    Args:
        x: float32 ``(N, C, H, W)``; sigma: float32 ``(N,)`` pixels; on: bool ``(N,)``.

    Returns:
        The blurred batch (``x`` itself with ``subset``).
    """
    if subset if subset is not None else x.device.type == "cpu":
        index = on.nonzero().squeeze(1)
        if index.numel() < x.shape[0]:
            if index.numel():
                blurred = _gaussian_blur(x.index_select(0, index), sigma[index], on[index], sigma_max, subset=False)
                x.index_copy_(0, index, blurred)
            return x
    n, c, height, width = x.shape
    radius = int(math.ceil(3.0 * sigma_max))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(t * t) / (2.0 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = torch.where(on[:, None], kernel, (t == 0).to(x.dtype))
    kernel = kernel.repeat_interleave(c, dim=0)  # (N * C, K)
    size = 2 * radius + 1
    y = F.pad(x.reshape(1, n * c, height, width), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, kernel.view(n * c, 1, size, 1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, 1, size), groups=n * c)
    return y.view(n, c, height, width)


def _solarize_(x: torch.Tensor, on: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """torchvision ``solarize(x, 0.5)`` (``x >= 0.5 -> 1 - x``) where ``on`` (bool ``(N,)``), in
    place, as ``min(x, 1 - x)`` (the same on [0, 1]); elsewhere ``min(x, 3 - x) = x``."""
    top = torch.where(on, 1.0, 3.0).to(x.dtype).view(-1, 1, 1, 1)
    return torch.minimum(x, torch.sub(top, x, out=block), out=x)


# ----------------------------------------------------------------------------------------------
# The transform
# ----------------------------------------------------------------------------------------------


class BatchedViews:
    """Views of a uint8 image batch, made on its device (module docstring).

    Attributes:
        recipes: one :class:`ViewRecipe` per output view, in output order.
        name: the recipe family (``"rela"``, ``"byol"``, ``"simclr"``, ``"dino"`` or yours).

    Call: ``views(images, generator) -> list[Tensor]``; ``images`` uint8 ``(B, 3, H, W)`` with
    values 0..255 on any device, ``generator`` a :class:`torch.Generator` on the same device; returns
    one contiguous float32 ``(B, 3, s, s)`` tensor per recipe on that device (``s`` the recipe's
    size), normalised with the ImageNet mean/std. Raises :class:`RelaError` for any other input.
    """

    def __init__(self, recipes: Sequence[ViewRecipe], name: str) -> None:
        recipes = tuple(recipes)
        if not recipes or not all(isinstance(r, ViewRecipe) for r in recipes):
            raise RelaError(f"{name} views need at least one ViewRecipe, got {recipes!r}")
        self.recipes: tuple[ViewRecipe, ...] = recipes
        self.name: str = name
        groups: dict[tuple[int, str, bool], list[int]] = {}
        for index, recipe in enumerate(recipes):  # a group shares size, interpolation and op order
            groups.setdefault((recipe.size, recipe.interpolation, recipe.solarize_before_blur), []).append(index)
        self._groups = [(size, interp, tuple(indices)) for (size, interp, _), indices in groups.items()]
        self._cache = threading.local()

    def __repr__(self) -> str:
        sizes = ", ".join(str(r.size) for r in self.recipes)
        return f"BatchedViews(name={self.name!r}, views={len(self.recipes)}, sizes=[{sizes}])"

    def sample_parameters(
        self, batch_size: int, height: int, width: int, generator: torch.Generator, rows: slice | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """Draw every view's random parameters: one ``torch.rand((V, B, 36), generator=generator)``
        on the generator's device (the only randomness :meth:`__call__` uses).

        Args:
            batch_size: B; height, width: the input images' H and W in pixels.
            generator: a :class:`torch.Generator`; its device is the parameters' device.
            rows: keep only these samples' parameters (``slice(start, stop)`` of the B drawn):
                a rank of a distributed run that holds rows ``start:stop`` of a global batch of B
                gets exactly the parameters one process would give those rows.

        Returns:
            One dict per view, every tensor with leading dimension B (``stop - start`` with ``rows``):
            ``crop`` int64 ``(B, 4)`` top, left, height, width of the crop box in input pixels;
            ``crop_fallback`` bool (no valid trial: torchvision's centre-crop fallback);
            ``flip`` bool; ``jitter`` bool (ColorJitter applied); ``factors`` float32 ``(B, 4)``
            brightness, contrast, saturation factors and hue shift in turns (drawn even where the
            jitter is off); ``order`` int64 ``(B, 4)``, a permutation of 0..3 (brightness,
            contrast, saturation, hue), the order the ops run in; ``gray`` bool; ``blur`` bool;
            ``sigma`` float32 blur std in pixels; ``solarize`` bool.

        Raises:
            RelaError: a negative batch size, a non-positive height or width, or no generator.
        """
        if not isinstance(generator, torch.Generator):
            raise RelaError(f"{self.name} views need a torch.Generator, got {type(generator).__name__}")
        if batch_size < 0 or height < 1 or width < 1:
            raise RelaError(f"{self.name} views: bad batch geometry B={batch_size}, H={height}, W={width}")
        u = torch.rand((len(self.recipes), batch_size, _N_UNIFORMS), generator=generator, device=generator.device)
        if rows is not None:
            u = u[:, rows]
        drawn = _draw_parameters(u, _recipe_table(self.recipes, height, width, u.device), height, width)
        return [{key: value[v] for key, value in drawn.items()} for v in range(len(self.recipes))]

    def apply(self, images: torch.Tensor, parameters: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Make the views of ``images`` (uint8 ``(B, 3, H, W)``) with the given parameters (as
        returned by :meth:`sample_parameters` for this B, H, W, on the images' device); no
        randomness. Returns one contiguous float32 ``(B, 3, s, s)`` tensor per view, computed in
        float32 whatever autocast is active.

        Raises:
            RelaError: images that are not a uint8 ``(B, 3, H, W)`` tensor, or parameters that do
                not fit the recipes and the batch.
        """
        self._check_images(images)
        batch, _, height, width = images.shape
        if len(parameters) != len(self.recipes) or any(
            not isinstance(p, dict) or not _PARAMETER_KEYS <= p.keys() or tuple(p["crop"].shape) != (batch, 4) or p["crop"].device != images.device
            for p in parameters
        ):
            raise RelaError(
                f"{self.name} views: the parameters do not fit {len(self.recipes)} views of a batch of {batch} "
                f"on {images.device} (use sample_parameters({batch}, {height}, {width}, generator))"
            )
        plans = []
        for size, interpolation, indices in self._groups:
            n = len(indices) * batch
            grid = interpolation == "bilinear" and size >= height and size >= width  # never shrinks
            source = n if grid else batch  # float copies of the images the crop reads
            plans.append((size, interpolation, indices, grid, source * 3 * height * width, n * size * size))
        workspace = self._workspace(max(image + plane * (12 if grid else 10) for *_, grid, image, plane in plans), images.device)
        out: list[torch.Tensor] = [images.new_empty(0)] * len(self.recipes)
        no_autocast = torch.autocast(device_type=images.device.type, enabled=False) if images.device.type in ("cpu", "cuda") else contextlib.nullcontext()
        with no_autocast:
            for size, interpolation, indices, grid, image, plane in plans:
                group = {key: torch.cat([parameters[i][key] for i in indices]) for key in _PARAMETER_KEYS}
                y = self._apply_group(
                    images,
                    group,
                    [self.recipes[i] for i in indices],
                    size,
                    grid,
                    interpolation == "bicubic",
                    workspace[:image],
                    workspace[image : image + plane * (12 if grid else 10)],
                )
                for view, index in zip(y.view(len(indices), batch, 3, size, size).unbind(0), indices):
                    out[index] = view
        return out

    @staticmethod
    def _apply_group(
        images: torch.Tensor,
        p: dict[str, torch.Tensor],
        recipes: list[ViewRecipe],
        size: int,
        grid: bool,
        bicubic: bool,
        image_space: torch.Tensor,
        scratch: torch.Tensor,
    ) -> torch.Tensor:
        """The views of one group (same size, interpolation and op order), float32 ``(V * B, 3, size, size)``;
        ``p`` holds the group's parameters concatenated view after view. Steps a group's recipes do
        not use (probability 0) are skipped."""
        batch, _, height, width = images.shape
        n = p["crop"].shape[0]
        # uint8 -> float in [0, 1] (ToTensor); grid_sample needs one image per output sample
        copies = len(recipes) if grid else 1
        x = image_space.view(copies, batch, 3, height, width)
        x.copy_(images.unsqueeze(0)).div_(255.0)
        x = x.view(copies * batch, 3, height, width)
        planes = scratch[: 7 * n * size * size].view(7, n, size, size)
        block = scratch[7 * n * size * size : 10 * n * size * size].view(n, 3, size, size)
        if grid:
            y = _grid_crop(x, p["crop"], p["flip"], size, scratch[10 * n * size * size :].view(n, size, size, 2))
        else:
            y = _matrix_crop(x, p["crop"], p["flip"], size, bicubic)
        if any(r.jitter_p > 0 and any(r.jitter) for r in recipes):
            _color_jitter_(y, p["jitter"], p["factors"].to(y.dtype), p["order"], planes, block)
        if any(r.gray_p > 0 for r in recipes):
            _grayscale_(y, p["gray"], planes)
        solarize = any(r.solarize_p > 0 for r in recipes)
        if solarize and recipes[0].solarize_before_blur:  # lightly's VICReg views
            _solarize_(y, p["solarize"], block)
        if any(r.blur_p > 0 for r in recipes):
            sigma_max = max(r.blur_sigma[1] for r in recipes if r.blur_p > 0)
            y = _gaussian_blur(y, p["sigma"].to(y.dtype), p["blur"], sigma_max)
        if solarize and not recipes[0].solarize_before_blur:
            _solarize_(y, p["solarize"], block)
        mean = torch.tensor(IMAGENET_MEAN, device=y.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=y.device).view(1, 3, 1, 1)
        return y.sub_(mean).div_(std)

    def _workspace(self, numel: int, device: torch.device) -> torch.Tensor:
        """float32 scratch of at least ``numel`` elements. On CPU the largest one (up to
        :data:`MAX_CACHED_WORKSPACE` bytes) is kept per thread and reused: freshly allocated memory
        costs page faults on every call (module docstring). Fully overwritten before it is read."""
        if device.type != "cpu":
            return torch.empty(numel, device=device)
        cached = getattr(self._cache, "workspace", None)
        if cached is not None and cached.numel() >= numel:
            return cached
        workspace = torch.empty(numel)
        if numel * 4 <= MAX_CACHED_WORKSPACE:
            self._cache.workspace = workspace
        return workspace

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_cache", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache = threading.local()

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """``apply(images, sample_parameters(B, H, W, generator))`` (class docstring).

        Raises:
            RelaError: bad images, no generator, or a generator on another device.
        """
        self._check_images(images)
        if isinstance(generator, torch.Generator) and generator.device.type != images.device.type:
            raise RelaError(f"{self.name} views: the generator is on {generator.device}, the images on {images.device}")
        batch, _, height, width = images.shape
        return self.apply(images, self.sample_parameters(batch, height, width, generator))

    def rows_of_batch(self, images: torch.Tensor, generator: torch.Generator, start: int, batch_size: int) -> list[torch.Tensor]:
        """The views of rows ``start : start + len(images)`` of a batch of ``batch_size`` whose views
        ``generator`` draws: equal to those rows of ``self(whole_batch, generator)``, at the cost of
        ``len(images)`` samples (the parameters of the other rows are drawn, not applied).

        Raises:
            RelaError: bad images, no generator, or rows outside the batch.
        """
        self._check_images(images)
        stop = start + images.shape[0]
        if start < 0 or stop > batch_size:
            raise RelaError(f"{self.name} views: rows {start}:{stop} are outside a batch of {batch_size}")
        _, _, height, width = images.shape
        return self.apply(images, self.sample_parameters(batch_size, height, width, generator, rows=slice(start, stop)))

    def _check_images(self, images: object) -> None:
        if (
            not isinstance(images, torch.Tensor)
            or images.dtype != torch.uint8
            or images.dim() != 4
            or images.shape[1] != 3
            or images.shape[2] < 1
            or images.shape[3] < 1
        ):
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise RelaError(f"{self.name} views need a uint8 image batch (B, 3, H, W), got {got}")


def batched_rela_views(image_size: int) -> BatchedViews:
    """The two ReLA views of ``image_size`` pixels (:func:`rela_pipeline.recipes.rela_recipes`).

    Raises:
        RelaError: ``image_size`` below 8.
    """
    return BatchedViews(rela_recipes(image_size), "rela")


def batched_byol_views(image_size: int) -> BatchedViews:
    """BYOL's asymmetric pair of ``image_size`` pixels (:func:`rela_pipeline.recipes.byol_recipes`).

    Raises:
        RelaError: ``image_size`` below 8.
    """
    return batched_method_views("byol", image_size)


def batched_simclr_views(image_size: int) -> BatchedViews:
    """SimCLR's symmetric pair of ``image_size`` pixels (:func:`rela_pipeline.recipes.simclr_recipe`, twice).

    Raises:
        RelaError: ``image_size`` below 8.
    """
    return batched_method_views("simclr", image_size)


def batched_dino_views(image_size: int, n_local_views: int = 6) -> BatchedViews:
    """DINO's 2 global views of ``image_size`` and ``n_local_views`` local views
    (:func:`rela_pipeline.recipes.dino_recipes`).

    Raises:
        RelaError: ``image_size`` below 8 or a negative ``n_local_views``.
    """
    check_image_size(image_size)
    return BatchedViews(dino_recipes(image_size, n_local_views), "dino")


def with_crop_min_scale(views: BatchedViews, min_scale: float) -> BatchedViews:
    """``views`` with the lower bound of every full-size view's crop scale set to ``min_scale``
    (:func:`rela_pipeline.recipes.with_crop_min_scale`).

    Raises:
        RelaError: ``min_scale`` outside ``(0, 1]``.
    """
    return BatchedViews(recipes_with_crop_min_scale(views.recipes, min_scale), views.name)


def batched_method_views(method: str, image_size: int, crop_min_scale: float | None = None, local_views: int | None = None) -> BatchedViews:
    """The standard views of a built-in method (a name of :data:`rela_pipeline.methods.METHODS`:
    ``byol``, ``simclr``, ``dino``, ``barlowtwins``, ``vicreg``, ``moco``, ``swav``, ``supervised``), made
    from the same recipes as :func:`rela_pipeline.views.method_views`
    (:func:`rela_pipeline.recipes.method_recipes`; ``local_views``: DINO's and SwaV's number of
    local views, None for lightly's 6).

    Raises:
        RelaError: unknown method, an image size below 8 pixels, ``crop_min_scale`` outside
            ``(0, 1]``, or a bad ``local_views`` (:func:`rela_pipeline.recipes.method_recipes`).
    """
    return BatchedViews(method_recipes(method, image_size, crop_min_scale, local_views), method)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).replace('torch.', '')} {tuple(value.shape)}"
    return type(value).__name__


def check_views(views: object, batch_size: int, name: str) -> list[torch.Tensor]:
    """Validate a batched transform's output: a list or tuple of at least 2 floating-point tensors
    of shape ``(batch_size, 3, h, w)``, the first two of the same shape.

    Args:
        views: the transform's output.
        batch_size: the expected B.
        name: the method or transform, for the message.

    Returns:
        The views as a list.

    Raises:
        RelaError: one line naming ``name``, the shapes got and the shape expected.
    """
    expected = f"expected a list of >= 2 float tensors of shape ({batch_size}, 3, h, w), the first two the same size"
    if not isinstance(views, (list, tuple)):
        raise RelaError(f"{name}: the view transform returned {_describe(views)}; {expected}")
    got = "[" + ", ".join(_describe(v) for v in views) + "]"
    ok = len(views) >= 2 and all(
        isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 4 and v.shape[0] == batch_size and v.shape[1] == 3 for v in views
    )
    if not ok or views[0].shape != views[1].shape:
        raise RelaError(f"{name}: the view transform returned {len(views)} views {got}; {expected}")
    return list(views)
