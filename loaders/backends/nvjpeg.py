"""`nvjpeg` backend: workers read encoded bytes, the GPU decodes them in one batched
`torchvision.io.decode_jpeg(list, device='cuda')` call, and crops + resizes the whole batch
with two batched matmuls. Needs nothing beyond torch and torchvision.

The crop + resize is a separable linear map: for each sample, a [size, H] matrix along y
and a [size, W] one along x whose rows hold the antialiased bilinear (triangle) filter
taps over the crop window, the same filter torchvision's `resized_crop(antialias=True)`
and PIL use. `out = Wy @ img @ Wx^T` then does crop, resize and flip (rows of Wx reversed)
for every image of a size group in one call, with no per-image Python on the hot path.
Crops come from the same per-sample RNG as the `cpu` backend, so for the same seed both
backends cut the same windows. With a `MultiCropSpec` (DINOv2) every crop is cut from the one
decoded image the same way, and the spec's `finish` applies the photometric ops batched.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterator

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from loaders.loader import Batch, register_backend
from loaders.backends.encoded import EncodedLoader, encoded_positions, prefetch, select, split_encoded


def crop_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int,
                 flip: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Resampling matrices [B, out_size, in_size] mapping a window [start, start + length)
    of an axis of `in_size` pixels onto `out_size` pixels (antialiased when shrinking)."""
    device = start.device
    start = start.to(torch.float32)[:, None, None]
    length = length.to(torch.float32)[:, None, None]
    scale = length / out_size  # input pixels per output pixel
    support = scale.clamp(min=1.0)  # the triangle widens when shrinking: antialiasing
    center = start + (torch.arange(out_size, device=device, dtype=torch.float32)[None, :, None] + 0.5) * scale
    pos = torch.arange(in_size, device=device, dtype=torch.float32)[None, None, :] + 0.5
    w = (1.0 - ((pos - center) / support).abs()).clamp_(min=0.0)
    w = w * ((pos > start) & (pos < start + length))  # only pixels inside the crop window
    w = w / w.sum(-1, keepdim=True).clamp_(min=1e-12)
    if flip is not None:
        w = torch.where(flip.to(torch.bool)[:, None, None], w.flip(1), w)
    return w.to(dtype)


def resized_crop_batch(images: torch.Tensor, crops: torch.Tensor, size: int,
                       compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """images uint8/float [B, C, H, W]; crops int [B, 5] = (top, left, h, w, flip) ->
    float [B, C, size, size], each image's window resized (antialiased bilinear) and flipped."""
    b, c, h, w = images.shape
    if compute_dtype is None:  # fp16 holds 0..255 exactly enough (< 0.07 error); tensor cores on GPU
        compute_dtype = torch.float16 if images.is_cuda else torch.float32
    crops = crops.to(images.device)
    wy = crop_weights(crops[:, 0], crops[:, 2], h, size, dtype=compute_dtype)
    wx = crop_weights(crops[:, 1], crops[:, 3], w, size, flip=crops[:, 4], dtype=compute_dtype)
    x = images.to(compute_dtype)
    if h * size * (w + size) > w * size * (h + size):  # cheaper to shrink x first
        x = torch.matmul(x, wx.transpose(1, 2)[:, None])  # [B, C, H, size]
        x = torch.matmul(wy[:, None], x)  # [B, C, size, size]
    else:
        x = torch.matmul(wy[:, None], x)  # [B, C, size, W]
        x = torch.matmul(x, wx.transpose(1, 2)[:, None])
    return x.float()


def resized_crop_list(images: list[torch.Tensor], crops: torch.Tensor, size: int) -> torch.Tensor:
    """Decoded images of mixed sizes ([C, H, W] each, C = 1 or 3) -> float [B, 3, size, size].
    Images are grouped by size, so the work is one batched call per distinct size."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, img in enumerate(images):
        groups[(img.shape[-2], img.shape[-1])].append(i)
    if len(groups) == 1:
        stack = torch.stack([img.expand(3, -1, -1) for img in images])
        return resized_crop_batch(stack, crops, size)
    out = torch.empty(len(images), 3, size, size, device=images[0].device)
    crops = crops.to(images[0].device)
    for idx in groups.values():
        stack = torch.stack([images[i].expand(3, -1, -1) for i in idx])
        index = torch.tensor(idx, device=out.device)
        out.index_copy_(0, index, resized_crop_batch(stack, crops[index], size))
    return out


class NvjpegLoader(EncodedLoader):
    """decode_ahead: decode the next batch in a thread of its own (on a stream of its own) while this
    one is cropped and normalized. torchvision decodes under one global lock with one nvJPEG state,
    so a second decoder would wait; but the decode's host work (header parsing, one output
    allocation per image) and the crops' launches can overlap. Off by default: it raises the
    loader's own rate (H200, 256 px, 2 workers, 3 rounds: 18.0k / 19.2k img/s median at 32 / 8 CUDA
    queues vs 18.2k / 15.6k in line, whose runs spread wider, 12.9k-19.8k vs 16.7k-19.9k), but its
    second Python thread takes host time from a training loop that launches its kernels one by one:
    MAE ViT-B in engine.run without CUDA graphs lost 27.9 % to it vs 22.0 % in line (with graphs:
    4.1 % vs 4.2 %). Turn it on where the loader, not the step, is the bound (small models)."""

    backend = "nvjpeg"
    decode_png = True  # nvjpeg decodes JPEG only: workers decode the (rare) PNG rows

    def __init__(self, *, decode_ahead: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.decode_ahead = bool(decode_ahead)

    def decode(self, raw: dict[str, Any]) -> tuple[list[torch.Tensor], dict[str, Any], list[tuple[str, str]]]:
        """Batched decode on the device; a batch that fails is decoded image by image to
        find (and drop) the samples at fault. Returns images in sample order."""
        parts = split_encoded(raw, self.maps)
        positions = encoded_positions(raw)
        failed: list[tuple[str, str]] = []
        try:
            decoded = decode_jpeg(parts, mode=ImageReadMode.RGB, device=self.device) if parts else []
        except Exception:
            decoded, bad = [], set()
            for i, data in zip(positions, parts):
                try:
                    decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                except Exception as e:
                    bad.add(i)
                    failed.append((raw["uid"][i], f"{type(e).__name__}: {e}"))
            positions = [i for i in positions if i not in bad]
            keep = sorted(set(range(len(raw["uid"]))) - bad)
            remap = {old: new for new, old in enumerate(keep)}
            positions = [remap[i] for i in positions]
            raw = select(raw, keep, self.maps)
        images: list[torch.Tensor | None] = [None] * len(raw["uid"])
        for i, img in zip(positions, decoded):
            images[i] = img
        for i, pix in zip(raw["decoded_at"], raw["pixels"]):
            images[i] = pix.to(self.device, non_blocking=True)
        return images, raw, failed  # type: ignore[return-value]

    def _decoded(self, batches: Iterator[dict[str, Any]]) -> Iterator[tuple[Any, list[torch.Tensor]]]:
        """((raw, images, failed), images) per encoded batch: the decode half."""
        for raw in batches:
            failed = list(raw["failed"])
            images, raw, more = self.decode(raw) if raw["uid"] else ([], raw, [])
            yield (raw, images, failed + more), [img for img in images if img is not None]

    def _produce(self, batches: Iterator[dict[str, Any]]) -> Iterator[tuple[Any, list[torch.Tensor]]]:
        if self.decode_ahead:  # one batch decoded ahead, in its own thread and stream
            decoded = prefetch(lambda: self._decoded(batches), self.device, depth=1, priority=self.stream_priority)
        else:
            decoded = (payload for payload, _ in self._decoded(batches))
        try:
            for raw, images, failed in decoded:
                if not images:
                    yield (None, failed), []
                    continue
                # every crop from the one decoded image; multi-crop's photometric ops run batched in finish
                views = [resized_crop_list(images, raw["crops"][:, k], spec.size)
                         for k, spec in enumerate(self.augment.crop_specs())]
                params = [raw["params"].to(self.device)] if "params" in raw else []
                out = self.augment.finish(views + params, self.dtype)
                keep = out if isinstance(out, list) else [out]
                yield (Batch(out, raw["modality"], raw["source"], raw["uid"]), failed), keep
        finally:
            decoded.close()  # stops the decode thread when the consumer stops early


register_backend("nvjpeg", available=lambda d: d.type == "cuda" and torch.cuda.is_available())(NvjpegLoader)
