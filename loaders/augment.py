"""The augmentation spec: what every backend must do to an image, independent of how.

A backend is a choice of decoder, never of semantics: each one reads an `AugmentSpec`
and applies the same random-resized-crop, flip and normalization.
"""
from __future__ import annotations

import math
import random
import _random
from dataclasses import dataclass, field

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AugmentSpec:
    """Single-view augmentation (MAE): RandomResizedCrop + horizontal flip + normalize.

    Grayscale images are repeated to 3 channels before normalization.
    """

    size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)  # MAE's default crop scale
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5  # probability
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        self.scale = tuple(float(s) for s in self.scale)  # YAML gives lists
        self.ratio = tuple(float(r) for r in self.ratio)
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if self.size <= 0:
            raise ValueError(f"augment.size must be positive, got {self.size}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"augment.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"augment.ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if not (0 <= self.hflip <= 1):
            raise ValueError(f"augment.hflip is a probability, got {self.hflip}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("augment.mean and augment.std need 3 values (std > 0)")

    # The two halves every augmentation spec provides, so that a backend that decodes on
    # the CPU can serve any spec (MultiCropSpec for DINOv2 follows the same interface).
    def views(self, img: torch.Tensor, gen: SampleRNG | torch.Generator) -> list[torch.Tensor]:
        """Geometric part on one decoded uint8 [C, H, W] image -> list of uint8 [3, s, s] views."""
        from torchvision.transforms.v2 import functional as TF

        top, left, h, w, flip = sample_crop(img.shape[1], img.shape[2], self, gen)
        out = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        out = out.flip(-1) if flip else out
        return [out.expand(3, -1, -1) if out.shape[0] == 1 else out]

    def crop_specs(self) -> list[AugmentSpec]:
        """The single-view spec of each crop, in order: one crop, this spec (as MultiCropSpec's)."""
        return [self]

    def finish(self, views: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Batched part on the device: uint8 [B, 3, s, s] per view -> the batch's images."""
        return normalize(views[0], self, dtype)


class SampleRNG(random.Random):
    """One sample's random stream: Python's Mersenne Twister seeded with the sample's key
    (a few microseconds to create; a torch.Generator plus torch.rand cost ~100 us per sample,
    the largest share of a loader worker's time at tens of thousands of images/s). `torch`
    is a torch.Generator with the same key, made on first use, for tensor-valued draws."""

    def __init__(self, key: int):
        _random.Random.seed(self, key)  # random.Random(key)'s state, without its Python-level seed()
        self.gauss_next = None
        self.key = key
        self._torch: torch.Generator | None = None

    @property
    def torch(self) -> torch.Generator:
        if self._torch is None:
            self._torch = torch.Generator().manual_seed(self.key)
        return self._torch


def sample_crop(height: int, width: int, spec: AugmentSpec, gen: SampleRNG | torch.Generator,
                ) -> tuple[int, int, int, int, bool]:
    """Draw (top, left, h, w, flip) for one image, the way torchvision's RandomResizedCrop does:
    up to 10 tries of area scale x log-uniform aspect ratio, else a center crop clamped to the
    ratio range. Shared by all backends so their crop statistics match."""
    area = height * width
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    if isinstance(gen, random.Random):  # flip first, then 4 numbers per try, drawn as needed
        u = gen.random
        flip = u() < spec.hflip
        draws = ((u(), u(), u(), u()) for _ in range(10))
    else:
        table = torch.rand(11, 4, generator=gen).tolist()
        flip, draws = bool(table[10][0] < spec.hflip), table[:10]
    for a, r, p, q in draws:
        target = area * (spec.scale[0] + a * (spec.scale[1] - spec.scale[0]))
        aspect = math.exp(log_lo + r * (log_hi - log_lo))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(p * (height - h + 1)), int(q * (width - w + 1)), h, w, flip
    in_ratio = width / height
    if in_ratio < spec.ratio[0]:
        w, h = width, int(round(width / spec.ratio[0]))
    elif in_ratio > spec.ratio[1]:
        h, w = height, int(round(height * spec.ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, flip


def normalize(images: torch.Tensor, spec: AugmentSpec, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [B, C, H, W] (C = 1 or 3) -> normalized `dtype` [B, 3, H, W], on images' device."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    mean = torch.tensor(spec.mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    inv_std = 1.0 / (torch.tensor(spec.std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1) * 255)
    return ((images.float() - mean) * inv_std).to(dtype)
