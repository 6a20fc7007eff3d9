"""Frozen-encoder features: uint8 images → device → resize + normalize → encoder → pooled vector.

The images travel as uint8 (4× less than float) through pinned memory, and everything else
happens on the device: grayscale → 3 channels, bilinear resize to the model input (antialias
only when shrinking), normalization, the forward in bf16 autocast on CUDA (fp32 on CPU).
The pooled features stay on the device until the split is done, so the loop never waits on
the GPU. Pooling is the paper's: the mean of the patch tokens of `forward_features` (after
the final norm), prefix tokens (class, registers) left out.

Features are cached as `.npy` files under a key made of the encoder's identity (checkpoint
path, size and mtime, or a fingerprint of the weights), the preprocessing, the data file
(path, size, mtime) and the subset, so a second evaluation reads them back.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(
    images: torch.Tensor, img_size: int, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 [B, H, W] or [B, H, W, C] on the device → normalized [B, 3, img_size, img_size]."""
    x = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    x = x.float()
    h, w = x.shape[-2:]
    if (h, w) != (img_size, img_size):
        # resize before expanding gray to 3 channels: a third of the work
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False,
                          antialias=max(h, w) > img_size)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:  # RGBA
        x = x[:, :3]
    x = (x * (1.0 / 255.0) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def pool(features: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Tokens [B, T, D] → mean of the non-prefix tokens; maps [B, C, H, W] → spatial mean; [B, D] as is."""
    if features.ndim == 3:
        return features[:, num_prefix_tokens:].float().mean(1)
    if features.ndim == 4:
        return features.float().mean((2, 3))
    return features.float()


def encoder_forward(encoder: torch.nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """The features function of an encoder (timm `forward_features` when present) and its prefix count."""
    fn = getattr(encoder, "forward_features", None)
    if fn is None:
        fn = encoder
    prefix = int(getattr(encoder, "num_prefix_tokens", 0) or 0)
    return fn, prefix


@torch.no_grad()
def extract_features(
    encoder: torch.nn.Module,
    images: np.ndarray,
    *,
    img_size: int,
    device: torch.device,
    batch_size: int = 256,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    desc: str = "features",
    progress: bool = True,
) -> torch.Tensor:
    """Pooled features [N, D] (fp32, on `device`) of uint8 images [N, H, W(, C)]."""
    from tqdm.auto import tqdm

    forward, prefix = encoder_forward(encoder)
    cuda = device.type == "cuda"
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    n = len(images)
    out: torch.Tensor | None = None
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False, dynamic_ncols=True)
    for start in range(0, n, batch_size):
        chunk = torch.from_numpy(images[start : start + batch_size])
        if cuda:
            chunk = chunk.pin_memory()
        x = preprocess(chunk.to(device, non_blocking=True), img_size, mean_t, std_t)
        with autocast:
            f = pool(forward(x), prefix)
        if out is None:
            out = torch.empty(n, f.shape[1], dtype=torch.float32, device=device)
        out[start : start + len(f)] = f
        bar.update(len(f))
    bar.close()
    if out is None:
        dim = int(getattr(encoder, "num_features", 0) or getattr(encoder, "embed_dim", 0))
        out = torch.empty(0, dim, dtype=torch.float32, device=device)
    return out


def weights_fingerprint(module: torch.nn.Module) -> str:
    """Cheap identity of in-memory weights: per-tensor sums and a strided sample, hashed.

    Avoids copying every byte of a large encoder to the host; two different trainings
    collide only if every tensor agrees on all of these.
    """
    h = hashlib.sha1()
    with torch.no_grad():
        for name, t in sorted(module.state_dict().items()):
            if not torch.is_tensor(t) or t.numel() == 0:
                continue
            if hasattr(t, "to_local"):  # an FSDP2 shard: this rank's part identifies it well enough
                t = t.to_local()
            flat = t.detach().reshape(-1).double()
            step = max(1, flat.numel() // 64)
            sums = torch.stack([flat.sum(), flat.abs().sum(), (flat * flat).sum()])
            h.update(name.encode())
            h.update(torch.cat([sums, flat[::step][:64]]).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def file_fingerprint(path: str | Path) -> str:
    p = Path(path).resolve()
    st = p.stat()
    return f"{p}:{st.st_size}:{st.st_mtime_ns}"


def cache_key(**parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class FeatureCache:
    """`.npy` files under `root/<encoder key>/`, written atomically; `root=None` disables it."""

    def __init__(self, root: str | Path | None, encoder_key: str, meta: dict | None = None):
        self.dir = Path(root) / encoder_key if root is not None else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            if meta is not None and not (self.dir / "encoder.json").exists():
                (self.dir / "encoder.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")

    def path(self, task: str, size: int, split: str, data_key: str) -> Path | None:
        if self.dir is None:
            return None
        return self.dir / f"{task}_{size}_{split}_{data_key}.npy"

    def load(self, path: Path | None) -> np.ndarray | None:
        if path is None or not path.is_file():
            return None
        try:
            return np.load(path)
        except (OSError, ValueError):
            return None  # a torn file from an interrupted run: recompute

    def save(self, path: Path | None, features: torch.Tensor) -> None:
        if path is None:
            return
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, features.detach().float().cpu().numpy())
        os.replace(tmp, path)
