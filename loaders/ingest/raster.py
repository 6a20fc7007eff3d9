"""PNG / TIFF / JPEG / BMP reader (Pillow). 8-bit stays as is (gray 1 channel, color RGB);
16-bit and float images go to 8 bits by robust percentiles."""
from __future__ import annotations

from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from .common import Frame, ReadOptions, SkipFile
from .scaling import integer_view, percentile_bounds, scale_to_uint8, target_size

HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def read_raster(path: str, opts: ReadOptions) -> Iterator[Frame]:
    try:
        img = Image.open(path)
    except Exception as e:
        raise SkipFile(f"not a readable image: {type(e).__name__}: {e}") from None
    with img:
        fmt = img.format
        n_pages = getattr(img, "n_frames", 1)
        orig_mode = img.mode
        rawmode = img.tile[0][3] if img.tile and isinstance(img.tile[0][3], str) else ""
        meta = {"format": (fmt or "unknown").lower(), "original_mode": orig_mode,
                "original_shape": [img.height, img.width]}
        if fmt == "JPEG" and opts.max_size and opts.max_size > 0:
            # Decode at 1/2, 1/4 or 1/8 scale when the result still covers the target size:
            # the DCT does the downscale, most of the decode work is skipped.
            th, tw = target_size(img.height, img.width, opts.max_size, opts.resize_side)
            img.draft(img.mode, (tw, th))
        try:
            img.load()  # truncated/corrupt files fail here, not later
        except Exception as e:
            raise SkipFile(f"corrupt or truncated image: {type(e).__name__}: {e}") from None
        if fmt in ("JPEG", "MPO", "TIFF") and img.getexif().get(0x0112, 1) != 1:
            img = ImageOps.exif_transpose(img)  # camera photos (dermoscopy, fundus) rotated upright
            meta["exif_rotated"] = True
        if img.mode == "RGB" and ";16" in rawmode:
            meta["note"] = "16-bit color read as 8 bits by Pillow (high byte kept)"
        if n_pages > 1:
            meta["n_pages"] = n_pages  # multi-page TIFF: first page only (pyramids, stacks)
        mode = img.mode
        if mode in HIGH_DEPTH_MODES:
            arr = np.asarray(img)
            if mode == "I" and arr.dtype != np.int32:
                arr = arr.astype(np.int32)
            meta["original_dtype"] = str(arr.dtype)
            iv = integer_view(arr)
            scaled = percentile_bounds(arr, iv, opts.percentiles)
            if scaled is None:
                raise SkipFile("no finite pixel values")
            bounds, meta["scaling"] = scaled
            pixels = scale_to_uint8(arr, iv, *bounds)
        else:
            meta["original_dtype"] = "uint8"
            if mode in ("1", "L"):
                pixels = np.asarray(img.convert("L"))
            elif mode == "LA":
                pixels = np.asarray(img.getchannel("L"))
            elif mode == "P":
                rgb = img.convert("RGB")
                arr = np.asarray(rgb)
                gray = (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
                pixels = np.ascontiguousarray(arr[..., 0]) if gray else arr
            else:  # RGB, RGBA (alpha dropped), CMYK, YCbCr, LAB, ...
                pixels = np.asarray(img.convert("RGB"))
            meta["scaling"] = "none"
    yield Frame(np.ascontiguousarray(pixels), None, meta, None, 1.0)
