"""Shards and helpers the loader-backend tests share.

The shard set mixes:
- `grad/i`: RGB images whose red channel encodes x and green encodes y (linear ramps), so
  the crop window and flip of any output can be read back from its pixels;
- `const/i`: flat colours, for the normalization check;
- `misc/i`: other sizes, grayscale JPEGs and one PNG;
- `bad/garbage` (not an image), `bad/truncated` (a JPEG cut short) and `bad/noquant` (a JPEG
  whose header parses but lacks its quantization tables, so only the decoder finds out):
  all must be skipped.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from loaders.augment import AugmentSpec, sample_crop
from loaders.shards import ShardWriter, make_sample

GRAD_H, GRAD_W = 96, 128
N_GRAD, N_CONST = 120, 16
CONST_COLOURS = [(20, 200, 90), (250, 5, 128), (128, 128, 128), (0, 64, 255)]
BAD = ("bad/garbage", "bad/truncated", "bad/noquant")
SPEC = AugmentSpec(size=32)


def gradient_image() -> np.ndarray:
    y, x = np.mgrid[0:GRAD_H, 0:GRAD_W].astype(np.float64)
    r = (x + 0.5) / GRAD_W * 255
    g = (y + 0.5) / GRAD_H * 255
    b = np.full_like(r, 128.0)
    return np.round(np.stack([r, g, b], -1)).astype(np.uint8)


def drop_segment(jpeg: bytes, marker: int) -> bytes:
    """The JPEG without its header segments of type `marker` (e.g. 0xDB: quantization tables)."""
    out, pos = bytearray(jpeg[:2]), 2
    while jpeg[pos + 1] != 0xDA:
        length = int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
        if jpeg[pos + 1] != marker:
            out += jpeg[pos : pos + 2 + length]
        pos += 2 + length
    return bytes(out + jpeg[pos:])


def write_shards(out: str) -> list[str]:
    """Write the test shard set; return the uids in row order (row index = list position)."""
    rng = np.random.default_rng(0)
    uids = []

    def put(w, pixels, uid, **kw):
        w.write(make_sample(pixels, modality="CT", source=uid.split("/")[0], uid=uid, **kw))
        uids.append(uid)

    grad = gradient_image()
    with ShardWriter(out, size_limit=1 << 18) as w:
        for i in range(N_GRAD + N_CONST + 12):
            if i < N_GRAD:
                put(w, grad, f"grad/{i}", quality=98)
            elif i < N_GRAD + N_CONST:
                colour = CONST_COLOURS[i % len(CONST_COLOURS)]
                put(w, np.broadcast_to(np.array(colour, np.uint8), (40, 56, 3)).copy(),
                    f"const/{i % len(CONST_COLOURS)}/{i}")
            else:
                k = i - N_GRAD - N_CONST
                shape = (70, 90) if k % 2 else (64, 64, 3)
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                put(w, pixels, f"misc/{k}", encoding="png" if k == 3 else "jpeg")
            if i == 30:
                row = make_sample(grad, modality="CT", source="bad", uid=BAD[0])
                row["image"] = b"this is not an image" * 20
                w.write(row)
                uids.append(BAD[0])
            if i == 100:
                row = make_sample(grad, modality="CT", source="bad", uid=BAD[2])
                row["image"] = drop_segment(row["image"], 0xDB)
                w.write(row)
                uids.append(BAD[2])
            if i == 70:
                row = make_sample(grad, modality="CT", source="bad", uid=BAD[1])
                row["image"] = row["image"][: len(row["image"]) // 2]
                w.write(row)
                uids.append(BAD[1])
    return uids


def unnormalize(images: torch.Tensor, spec: AugmentSpec = SPEC) -> torch.Tensor:
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
    return images.float().cpu() * std + mean


def recover_crop(pixels: torch.Tensor) -> tuple[float, float, float, float, bool]:
    """(top, left, h, w, flip) of a crop of `gradient_image()` from its output pixels
    [3, S, S] (0..255): a straight-line fit of the x ramp along columns and the y ramp
    along rows. Output pixel j samples input x = left + (j + 0.5) * w / S."""
    s = pixels.shape[-1]
    j = torch.arange(s, dtype=torch.float64) + 0.5
    jc = j - j.mean()

    def fit(profile):
        slope = float((jc * (profile.double() - profile.double().mean())).sum() / (jc * jc).sum())
        return slope, float(profile.double().mean() - slope * j.mean())

    bx, ax = fit(pixels[0].mean(0))  # red varies with x
    by, ay = fit(pixels[1].mean(1))  # green varies with y
    flip = bx < 0
    w = abs(bx) * s * GRAD_W / 255
    h = by * s * GRAD_H / 255
    left = ax * GRAD_W / 255 if not flip else (ax + bx * s) * GRAD_W / 255
    top = ay * GRAD_H / 255
    return top, left, h, w, flip


def crop_stats(crops: list[tuple[float, float, float, float, bool]]) -> dict[str, float]:
    scale = [h * w / (GRAD_H * GRAD_W) for _, _, h, w, _ in crops]
    log_aspect = [math.log(w / h) for _, _, h, w, _ in crops]
    return {
        "scale": float(np.mean(scale)),
        "scale_sd": float(np.std(scale)),
        "log_aspect": float(np.mean(log_aspect)),
        "log_aspect_sd": float(np.std(log_aspect)),
        "flip": float(np.mean([c[4] for c in crops])),
        "n": len(crops),
    }


def reference_stats(spec: AugmentSpec = SPEC, n: int = 20000) -> dict[str, float]:
    """The crop distribution `sample_crop` draws for the gradient image, by Monte Carlo."""
    gen = torch.Generator().manual_seed(1234)
    return crop_stats([sample_crop(GRAD_H, GRAD_W, spec, gen) for _ in range(n)])


def run_epochs(loader, epochs: int, snapshot_after: int | None = None):
    """Iterate whole epochs; return per-epoch lists of batches (moved to CPU), and the
    loader state taken after `snapshot_after` batches of the first epoch."""
    out, state = [], None
    for _ in range(epochs):
        batches = []
        for batch in loader:
            batches.append(batch)
            if snapshot_after is not None and state is None and len(batches) == snapshot_after:
                state = loader.state_dict()
        out.append(batches)
    return out, state
