"""What the views cost: :mod:`rela_pipeline.batched_views` beside the alternatives it was chosen over.

In one process, on the CPU, for a batch of B = 128 real Fashion-MNIST images (from the test
fixture, half of them tinted so the colour ops have colour to work on) at 32 x 32: the whole
batched transform per recipe; its parts (crop + resize + flip by ``grid_sample``, by separable PIL
filter matrices, by ``torchvision.ops.roi_align``, by ``affine_grid``; the per-sample colour
jitter by blend slots, by index_select subsets, by kornia's functional ops; single colour ops
against kornia's); kornia.augmentation's own pipelines (one jitter order per batch, i.e. not the
recipe); and lightly's per-sample PIL transforms. Median (and minimum) of ``--runs`` runs after
warm-up, in milliseconds. Needs the ``bench`` extra (kornia).

    python benchmarks/views_cost.py --out benchmarks/results/views-cost-cpu.json
"""

from __future__ import annotations

import argparse
import glob
import statistics
import time

import numpy as np
import torch
from PIL import Image

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, default=None)
parser.add_argument("--runs", type=int, default=30)
parser.add_argument("--out", default=None, help="also write the timings as JSON here")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

import kornia  # noqa: E402
import kornia.augmentation as K  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchvision.ops import roi_align  # noqa: E402

from rela_pipeline import batched_views as bv  # noqa: E402
from rela_pipeline import views as pil_views  # noqa: E402

B, S = 128, 32
RESULTS: list[tuple[str, float, float]] = []


def bench(name: str, fn, runs: int = args.runs, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    med, low = statistics.median(times), min(times)
    RESULTS.append((name, med, low))
    print(f"{name:70s} {med:8.2f} ms  (min {low:6.2f})", flush=True)
    return med


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
files = sorted(glob.glob(str(ROOT / "tests/fixtures/fashion_mnist_mini/train/*/*.png")))
pils = [Image.open(f).convert("RGB").resize((S, S), Image.BILINEAR) for f in files[:B]]
# Fashion-MNIST is gray: tint half of the images so that the colour ops have colour to work on
rng = np.random.default_rng(0)
arrays = []
for i, im in enumerate(pils):
    a = np.asarray(im).astype(np.float32)
    if i % 2:
        a = a * rng.uniform(0.3, 1.0, size=3)
    arrays.append(a.clip(0, 255).astype(np.uint8))
pils = [Image.fromarray(a) for a in arrays]
images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
g = torch.Generator().manual_seed(0)
print(f"torch {torch.__version__}, kornia {kornia.__version__}, threads {torch.get_num_threads()}, B={B}, S={S}")

print("\n== batched_views (this module), whole call ==")
for name, views in (
    ("rela (2 views)", bv.batched_rela_views(S)),
    ("byol (2 views)", bv.batched_byol_views(S)),
    ("simclr (2 views)", bv.batched_simclr_views(S)),
    ("dino (2 global + 6 local)", bv.batched_dino_views(S)),
):
    bench(f"ours {name}", lambda v=views: v(images, g))
for name, views in (("byol 64 px input (blur on)", bv.batched_byol_views(64)),):
    images64 = F.interpolate(images.float(), size=64, mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8)
    bench(f"ours {name}", lambda v=views, x=images64: v(x, g))

print("\n== components, both ReLA views (N = 256 samples) ==")
views = bv.batched_rela_views(S)
params = views.sample_parameters(B, S, S, g)
bench("sample_parameters (rela, 2 views)", lambda: views.sample_parameters(B, S, S, g))
bench("apply (rela, 2 views)", lambda: views.apply(images, params))
p = {k: torch.cat([params[0][k], params[1][k]]) for k in params[0]}
x = images.float() / 255
x2 = x.repeat(2, 1, 1, 1)
grid = torch.empty(2 * B, S, S, 2)
bench("crop+resize+flip: grid_sample (used for bilinear upscaling)", lambda: bv._grid_crop(x2, p["crop"], p["flip"], S, grid))
bench("crop+resize+flip: separable PIL matrices, bilinear (used when shrinking)", lambda: bv._matrix_crop(x, p["crop"], p["flip"], S, False))
bench("crop+resize+flip: separable PIL matrices, bicubic (DINO)", lambda: bv._matrix_crop(x, p["crop"], p["flip"], S, True))


def roi_crop():
    b = p["crop"].float()
    boxes = torch.stack([torch.arange(2 * B, dtype=torch.float32) % B, b[:, 1], b[:, 0], b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], 1)
    y = roi_align(x, boxes, (S, S), 1.0, -1, True)
    return torch.where(p["flip"].view(-1, 1, 1, 1), y.flip(-1), y)


bench("crop+resize+flip: torchvision roi_align (aligned, adaptive) + where-flip", roi_crop)


def affine_grid_crop():
    b = p["crop"].float()
    top, left, h, w = b.unbind(1)
    theta = torch.zeros(2 * B, 2, 3)
    sign = 1 - 2 * p["flip"].float()
    theta[:, 0, 0] = sign * w / S
    theta[:, 0, 2] = (2 * left + w) / S - 1
    theta[:, 1, 1] = h / S
    theta[:, 1, 2] = (2 * top + h) / S - 1
    return F.grid_sample(x2, F.affine_grid(theta, (2 * B, 3, S, S), align_corners=False), align_corners=False, padding_mode="border")


bench("crop+resize+flip: affine_grid + grid_sample (no crop-edge clamp)", affine_grid_crop)

y = bv._grid_crop(x2, p["crop"], p["flip"], S)
planes, block = bv._scratch(y)
factors = p["factors"]
bench("clone of the 256 views (baseline for in-place ops below)", lambda: y.clone())
bench(
    "colour jitter: 6 blend slots + 1 hue pass, per-sample order (used)", lambda: bv._color_jitter_(y.clone(), p["jitter"], factors, p["order"], planes, block)
)


def jitter_indexed(z):
    """4 slots x 4 ops on index_select'ed subsets (needs nonzero: a host sync on CUDA)."""
    for slot in range(4):
        for op in range(4):
            idx = ((p["order"][:, slot] == op) & p["jitter"]).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            sub = z.index_select(0, idx)
            f = factors[idx, op]
            m = idx.numel()
            if op == 3:
                sub = bv._adjust_hue_(sub, f, torch.ones(m, 1, 1, 1), *bv._scratch(sub))
            else:
                a = f.view(m, 1, 1, 1)
                zero = torch.zeros_like(a)
                sub = bv._blend_(sub, a, (1 - a) if op == 2 else zero, (1 - a) if op == 1 else zero, bv._scratch(sub)[0])
            z.index_copy_(0, idx, sub)
    return z


bench("colour jitter: 4 slots x 4 ops, index_select/index_copy subsets", lambda: jitter_indexed(y.clone()))


def jitter_kornia_functional(z):
    """Same 4 x 4 subset scheme with kornia's functional ops (semantics-matched variants)."""
    for slot in range(4):
        for op in range(4):
            idx = ((p["order"][:, slot] == op) & p["jitter"]).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            sub = z.index_select(0, idx)
            f = factors[idx, op]
            if op == 0:
                sub = kornia.enhance.adjust_contrast(sub, f)  # kornia's multiplicative op = torchvision brightness
            elif op == 1:
                sub = kornia.enhance.adjust_contrast_with_mean_subtraction(sub, f)
            elif op == 2:
                sub = kornia.enhance.adjust_saturation_with_gray_subtraction(sub, f)
            else:
                sub = kornia.enhance.adjust_hue(sub, f * 2 * torch.pi)  # radians
            z.index_copy_(0, idx, sub)
    return z


bench("colour jitter: 4 x 4 subsets with kornia.enhance functional ops", lambda: jitter_kornia_functional(y.clone()))

print("\n== single ops on all 256 views (includes a clone) ==")
n = 2 * B
ones = torch.ones(n, 1, 1, 1)
a = factors[:, 1].view(n, 1, 1, 1)
zero = torch.zeros_like(a)
bench("hue: direct branch-free formula (used)", lambda: bv._adjust_hue_(y.clone(), factors[:, 3], ones, planes, block))
bench("hue: kornia.enhance.adjust_hue (radians)", lambda: kornia.enhance.adjust_hue(y.clone(), factors[:, 3] * 2 * torch.pi))
bench("hue: torchvision adjust_hue (one factor for the batch)", lambda: __import__("torchvision").transforms.v2.functional.adjust_hue(y.clone(), 0.1))
bench("contrast: blend slot (used)", lambda: bv._blend_(y.clone(), a, zero, 1 - a, planes))
bench("contrast: kornia adjust_contrast_with_mean_subtraction", lambda: kornia.enhance.adjust_contrast_with_mean_subtraction(y.clone(), factors[:, 1]))
bench("saturation: blend slot (used)", lambda: bv._blend_(y.clone(), a, 1 - a, zero, planes))
bench("saturation: kornia adjust_saturation_with_gray_subtraction", lambda: kornia.enhance.adjust_saturation_with_gray_subtraction(y.clone(), factors[:, 2]))
bench("brightness: blend slot (used)", lambda: bv._blend_(y.clone(), a, zero, zero, planes))
bench("brightness: kornia adjust_contrast (x * f, clamped)", lambda: kornia.enhance.adjust_contrast(y.clone(), factors[:, 0]))
bench("grayscale: lerp with 0/1 weights (used)", lambda: bv._grayscale_(y.clone(), p["gray"], planes))
bench(
    "grayscale: kornia rgb_to_grayscale + torch.where",
    lambda: torch.where(p["gray"].view(-1, 1, 1, 1), kornia.color.rgb_to_grayscale(y).expand(-1, 3, -1, -1), y),
)
bench("solarize: min(x, t - x) (used)", lambda: bv._solarize_(y.clone(), p["solarize"], block))
bench("solarize: torch.where(mask & (x >= 0.5), 1 - x, x)", lambda: torch.where(p["solarize"].view(-1, 1, 1, 1) & (y >= 0.5), 1 - y, y))
y64 = torch.rand(n, 3, 64, 64)
sig = 0.1 + 1.9 * torch.rand(n)
on = torch.rand(n) < 0.5
bench("blur 64 px: separable depthwise conv, per-sample kernel (used)", lambda: bv._gaussian_blur(y64, sig, on, 2.0))
bench(
    "blur 64 px: kornia gaussian_blur2d per-sample sigma + where",
    lambda: torch.where(on.view(-1, 1, 1, 1), kornia.filters.gaussian_blur2d(y64, (13, 13), torch.stack([sig, sig], 1), border_type="replicate"), y64),
)

print("\n== kornia.augmentation pipelines (float input, 2 views per call; one jitter order per batch) ==")
xf = images.float() / 255
for mode in ("slice", "resample"):
    for label, scale, jit in (("rela", (0.5, 1.0), (0.8, 0.8, 0.8, 0.2)), ("byol", (0.08, 1.0), (0.4, 0.4, 0.2, 0.1))):
        aug = K.AugmentationSequential(
            K.RandomResizedCrop((S, S), scale=scale, cropping_mode=mode),
            K.RandomHorizontalFlip(),
            K.ColorJitter(*jit, p=0.8),
            K.RandomGrayscale(p=0.2),
        )
        bench(f"kornia {label}: RRC(cropping_mode={mode}) + flip + ColorJitter + gray", lambda a=aug: [a(xf), a(xf)])

print("\n== lightly PIL transforms, per sample, 128 images, one process (reference) ==")
for name, transform in (
    ("rela", pil_views.rela_views(S)),
    ("byol", pil_views.byol_views(S)),
    ("simclr", pil_views.simclr_views(S)),
    ("dino", pil_views.dino_views(S)),
):
    bench(f"lightly PIL {name}", lambda t=transform: [t(im) for im in pils], runs=max(5, args.runs // 3), warmup=2)

if args.out:
    import json
    import platform

    payload = {
        "host": {"cpu": platform.processor() or "cpu", "torch": torch.__version__, "kornia": kornia.__version__, "threads": torch.get_num_threads()},
        "batch": B,
        "size": S,
        "runs": args.runs,
        "timings_ms": [{"name": name, "median": round(med, 3), "min": round(low, 3)} for name, med, low in RESULTS],
    }
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
