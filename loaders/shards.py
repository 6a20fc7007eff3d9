"""The shard-sample contract: one MDS row per 2-D image (see DESIGN.md).

Every writer (ingestion, the synthetic quickstart set, tests) goes through
`ShardWriter` so the columns and their encodings stay in one place, and every
reader can rely on them.
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image

# Column name -> MDS encoding. `label` is -1 when a source has none.
COLUMNS: dict[str, str] = {
    "image": "bytes",
    "height": "int32",
    "width": "int32",
    "channels": "int8",
    "modality": "str",
    "source": "str",
    "uid": "str",
    "label": "int32",
    "meta": "json",
}

MODALITIES = ("CT", "MR", "XR", "US", "PATH", "FUNDUS", "DERM", "OCT", "ENDO", "OTHER")
ENCODINGS = ("jpeg", "png")


def make_uid(source: str, relpath: str, slice_index: int | None = None) -> str:
    """Stable sample id: source + relative path (+ slice/frame)."""
    uid = f"{source}/{relpath}"
    return uid if slice_index is None else f"{uid}#{slice_index}"


def encode_image(pixels: np.ndarray, encoding: str = "jpeg", quality: int = 95) -> bytes:
    """Encode an 8-bit HxW or HxWx3 array. JPEG (GPU-decodable) by default."""
    if pixels.dtype != np.uint8:
        raise TypeError(f"encode_image wants uint8 pixels, got {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ValueError(f"encode_image wants HxW or HxWx3, got shape {pixels.shape}")
    buf = io.BytesIO()
    img = Image.fromarray(pixels)
    if encoding == "jpeg":
        img.save(buf, format="JPEG", quality=quality)
    elif encoding == "png":
        img.save(buf, format="PNG")
    else:
        raise ValueError(f"unknown encoding {encoding!r}; valid: {', '.join(ENCODINGS)}")
    return buf.getvalue()


def make_sample(
    pixels: np.ndarray,
    *,
    modality: str,
    source: str,
    uid: str,
    label: int = -1,
    meta: dict[str, Any] | None = None,
    encoding: str = "jpeg",
    quality: int = 95,
) -> dict[str, Any]:
    """Build one shard row from 8-bit pixels, checking the contract."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")
    channels = 1 if pixels.ndim == 2 or pixels.shape[2] == 1 else 3
    return {
        "image": encode_image(pixels, encoding, quality),
        "height": int(pixels.shape[0]),
        "width": int(pixels.shape[1]),
        "channels": channels,
        "modality": modality,
        "source": source,
        "uid": uid,
        "label": int(label),
        "meta": json.loads(json.dumps(meta or {})),  # fail early on non-JSON values
    }


class ShardWriter:
    """`streaming.MDSWriter` with the contract's columns. Use as a context manager."""

    def __init__(self, out: str, *, size_limit: int | str = "64mb", compression: str | None = None):
        from streaming import MDSWriter

        self._writer = MDSWriter(out=out, columns=COLUMNS, size_limit=size_limit, compression=compression)

    def write(self, sample: dict[str, Any]) -> None:
        missing = set(COLUMNS) - set(sample)
        if missing:
            raise KeyError(f"shard sample lacks columns: {sorted(missing)}")
        self._writer.write(sample)

    def close(self) -> None:
        self._writer.finish()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
