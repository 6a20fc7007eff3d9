"""DINOv2's multi-crop augmentation as an augmentation spec (same interface as `AugmentSpec`).

From one decoded image: `global_crops` large crops and `local_crops` small ones, each a
random-resized crop with a horizontal flip, then color jitter, random grayscale, Gaussian
blur and solarization (DINOv2's recipe: blur always on the first global crop, rarely on the
second, which alone is solarized sometimes; half of the local crops are blurred).

The work is split like `AugmentSpec`'s:
- `views(img, gen)` (CPU, loader workers, one image): the crops as uint8 tensors, plus the
  photometric parameters of every crop drawn from the same per-sample generator and carried
  as one small float tensor. Drawing them here rather than from a device RNG makes every
  crop a pure function of (seed, epoch, sample index): resume is exact, independent of the
  number of workers, with no RNG state to checkpoint.
- `finish(views, dtype)` (device, batched): applies those parameters to the whole batch at
  once and normalizes.

Layout. `views()` returns `global_crops` tensors [3, G, G], then `local_crops` tensors
[3, L, L], then the parameters [crops, NUM_PARAMS] float32. `finish()` receives them
stacked over the batch and returns two tensors, crop-major (all images' crop 0, then all
images' crop 1, ...):
    [globals [global_crops * B, 3, G, G], locals [local_crops * B, 3, L, L]]
(the locals tensor has 0 rows when local_crops is 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loaders.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, sample_crop

# Per-crop photometric parameters, one float each, in this order.
PARAMS = ("jitter", "brightness", "contrast", "saturation", "hue", "order0", "order1", "order2", "order3",
          "gray", "blur", "sigma", "solarize")
NUM_PARAMS = len(PARAMS)
LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601 weights, as torchvision rounds them
BLUR_SIGMA = (0.1, 2.0)


@dataclass
class MultiCropSpec:
    global_size: int = 224
    local_size: int = 96
    global_crops: int = 2
    local_crops: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.8  # probability that a crop is jittered
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.2
    blur: tuple[float, float, float] = (1.0, 0.1, 0.5)  # probability: first global, other globals, locals
    solarize: tuple[float, float, float] = (0.0, 0.2, 0.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("global_scale", "local_scale", "ratio", "blur", "solarize", "mean", "std"):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.global_crops < 1 or self.local_crops < 0:
            raise ValueError("multicrop needs global_crops >= 1 and local_crops >= 0")
        if self.global_size <= 0 or self.local_size <= 0:
            raise ValueError("multicrop crop sizes must be positive")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"multicrop.{name} must satisfy 0 < lo <= hi <= 1, got {(lo, hi)}")
        probs = [self.hflip, self.color_jitter, self.grayscale, *self.blur, *self.solarize]
        if not all(0 <= p <= 1 for p in probs) or len(self.blur) != 3 or len(self.solarize) != 3:
            raise ValueError("multicrop probabilities must be in [0, 1]; blur and solarize take 3 each")
        if not 0 <= self.hue <= 0.5 or min(self.brightness, self.contrast, self.saturation) < 0:
            raise ValueError("multicrop jitter strengths must be >= 0 (hue <= 0.5)")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("multicrop mean and std need 3 values (std > 0)")
        # sample_crop reads scale/ratio/hflip from a spec: one per crop kind.
        self._global = AugmentSpec(self.global_size, self.global_scale, self.ratio, self.hflip, self.mean, self.std)
        self._local = AugmentSpec(self.local_size, self.local_scale, self.ratio, self.hflip, self.mean, self.std)

    def crop_specs(self) -> list[AugmentSpec]:
        """The single-view spec of each crop, in order (globals, then locals)."""
        return [self._global] * self.global_crops + [self._local] * self.local_crops

    @property
    def num_crops(self) -> int:
        return self.global_crops + self.local_crops

    def _crop_probs(self, i: int) -> tuple[float, float]:
        """(blur, solarize) probabilities of crop i."""
        kind = 0 if i == 0 else (1 if i < self.global_crops else 2)
        return self.blur[kind], self.solarize[kind]

    # ------------------------------------------------------------------ CPU part
    def draw_params(self, gen: torch.Generator) -> torch.Tensor:
        """[crops, NUM_PARAMS] photometric parameters (see PARAMS), drawn from `gen`."""
        gen = getattr(gen, "torch", gen)  # a SampleRNG's torch.Generator
        u = torch.rand(self.num_crops, 8, generator=gen, dtype=torch.float64)
        order = torch.rand(self.num_crops, 4, generator=gen).argsort(dim=1).double()  # a random permutation
        out = torch.empty(self.num_crops, NUM_PARAMS, dtype=torch.float64)
        out[:, 0] = (u[:, 0] < self.color_jitter).double()
        out[:, 1] = 1 + self.brightness * (2 * u[:, 1] - 1)
        out[:, 2] = 1 + self.contrast * (2 * u[:, 2] - 1)
        out[:, 3] = 1 + self.saturation * (2 * u[:, 3] - 1)
        out[:, 4] = self.hue * (2 * u[:, 4] - 1)
        out[:, 5:9] = order
        out[:, 9] = (u[:, 5] < self.grayscale).double()
        probs = torch.tensor([self._crop_probs(i) for i in range(self.num_crops)], dtype=torch.float64)
        out[:, 10] = (u[:, 6] < probs[:, 0]).double()
        out[:, 11] = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, 7]
        out[:, 12] = (torch.rand(self.num_crops, generator=gen, dtype=torch.float64) < probs[:, 1]).double()
        return out.float()

    def views(self, img: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        """One decoded uint8 [C, H, W] image -> the crops (uint8 [3, s, s]) and their parameters."""
        from torchvision.transforms.v2 import functional as TF

        out = []
        for spec in self.crop_specs():
            top, left, h, w, flip = sample_crop(img.shape[1], img.shape[2], spec, gen)
            crop = TF.resized_crop(img, top, left, h, w, [spec.size, spec.size], antialias=True)
            crop = crop.flip(-1) if flip else crop
            out.append(crop.expand(3, -1, -1).contiguous() if crop.shape[0] == 1 else crop)
        out.append(self.draw_params(gen))
        return out

    # ------------------------------------------------------------------ device part
    def finish(self, views: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        """Batched: uint8 [B, 3, s, s] per crop + params [B, crops, NUM_PARAMS] -> [globals, locals]."""
        params = views[-1].to(torch.float32)
        crops = [photometric(v, params[:, i]) for i, v in enumerate(views[:-1])]
        crops = [normalize01(c, self.mean, self.std, dtype) for c in crops]
        g = torch.cat(crops[: self.global_crops])
        if self.local_crops:
            loc = torch.cat(crops[self.global_crops:])
        else:
            loc = g.new_empty(0, 3, self.local_size, self.local_size)
        return [g, loc]

    def synthetic(self, batch_size: int, device, dtype=torch.float32) -> list[torch.Tensor]:
        """Random images shaped like `finish()`'s output (benchmarks, dry runs)."""
        g = torch.randn(self.global_crops * batch_size, 3, self.global_size, self.global_size, device=device,
                        dtype=dtype)
        loc = torch.randn(self.local_crops * batch_size, 3, self.local_size, self.local_size, device=device,
                          dtype=dtype)
        return [g, loc]


# ---------------------------------------------------------------------- batched photometric ops
# Images are float in [0, 1], [B, 3, H, W]; every parameter is a [B] tensor, one value per image.
def _gray(x: torch.Tensor) -> torch.Tensor:
    w = x.new_tensor(LUMA).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _per_image(p: torch.Tensor) -> torch.Tensor:
    return p.view(-1, 1, 1, 1)


def adjust_brightness(x, f):
    return (x * _per_image(f)).clamp(0, 1)


def adjust_contrast(x, f):
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * _per_image(f) + mean).clamp(0, 1)


def adjust_saturation(x, f):
    g = _gray(x)
    return ((x - g) * _per_image(f) + g).clamp(0, 1)


def adjust_hue(x, shift):
    """Rotate the hue by `shift` turns (in [-0.5, 0.5]) through HSV."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    # HSV -> RGB: channel k takes v - v*s*clamp(min(t, 4 - t), 0, 1) with t = (n_k + 6h) mod 6
    v = maxc
    n = x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    t = (n + 6 * h.unsqueeze(1)) % 6
    k = torch.minimum(t, 4 - t).clamp(0, 1)
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * k


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (reflect padding)."""
    B, C, H, W = x.shape
    radius = max(1, min(math.ceil(3 * BLUR_SIGMA[1]), (min(H, W) - 1)))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # [B*C, taps]
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(B * C, 1, 1, -1), groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(B * C, 1, -1, 1), groups=B * C)
    return y.view(B, C, H, W)


def photometric(images: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] + params [B, NUM_PARAMS] -> float [B, 3, H, W] in [0, 1].

    Color jitter applies its four adjustments in a per-image random order (like torchvision's
    ColorJitter); every op is computed for the whole batch and selected per image, which
    keeps the batch on the device with no data-dependent shapes."""
    x = images.float() / 255
    if images.shape[0] == 0:
        return x
    col = {name: p[:, i] for i, name in enumerate(PARAMS)}
    ops = (
        lambda y: adjust_brightness(y, col["brightness"]),
        lambda y: adjust_contrast(y, col["contrast"]),
        lambda y: adjust_saturation(y, col["saturation"]),
        lambda y: adjust_hue(y, col["hue"]),
    )
    jittered = x
    for slot in range(4):
        which = col[f"order{slot}"]
        out = jittered
        for op_index, op in enumerate(ops):
            out = torch.where(_per_image(which == op_index), op(jittered), out)
        jittered = out
    x = torch.where(_per_image(col["jitter"] > 0), jittered, x)
    x = torch.where(_per_image(col["gray"] > 0), _gray(x).expand_as(x), x)
    if bool(images.shape[-1] > 1):
        x = torch.where(_per_image(col["blur"] > 0), gaussian_blur(x, col["sigma"]), x)
    x = torch.where(_per_image(col["solarize"] > 0) & (x >= 0.5), 1.0 - x, x)
    return x


def normalize01(x: torch.Tensor, mean, std, dtype: torch.dtype) -> torch.Tensor:
    m = x.new_tensor(mean).view(1, 3, 1, 1)
    s = x.new_tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)
