"""Intensity scaling to 8 bits and resizing, shared by every reader.

Two ways to map raw intensities to 0..255, both linear between a low and a high value:
- a window (center, width), for CT in Hounsfield units: the file's own or a named preset;
- robust percentiles of the finite values (default 0.5 and 99.5), for everything else.
Never a division by 255 or a clip of 16-bit data to 255: a 12-bit X-ray in a 16-bit PNG
would come out black, and a full-range one white.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
from PIL import Image

# (center, width) in Hounsfield units; the usual radiology reading windows.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "soft_tissue": (40.0, 400.0),
    "mediastinum": (40.0, 400.0),  # same window under its other common name
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "wide": (0.0, 2000.0),  # -1000..1000 HU: air to dense bone, little tissue contrast
}
WINDOW_MODES = ("auto", "file", "percentile", *WINDOW_PRESETS)


def parse_window(value: str) -> str | tuple[float, float]:
    """'auto' | 'file' | 'percentile' | a preset name | 'C:W' (e.g. '40:400')."""
    value = str(value).strip().lower().replace("-", "_").replace(" ", "_")
    if value in WINDOW_MODES:
        return value
    if ":" in value:
        c, w = value.split(":", 1)
        center, width = float(c), float(w)
        if width <= 0:
            raise ValueError(f"window width must be > 0, got {width}")
        return (center, width)
    raise ValueError(f"unknown window {value!r}; valid: {', '.join(WINDOW_MODES)} or CENTER:WIDTH")


def window_bounds(center: float, width: float) -> tuple[float, float]:
    return center - width / 2.0, center + width / 2.0


def robust_bounds(values: np.ndarray, lo_pct: float, hi_pct: float,
                  max_samples: int = 1_000_000) -> tuple[float, float] | None:
    """Percentiles of the finite values (subsampled for big volumes); None when there are none."""
    flat = values.reshape(-1)
    if flat.size > max_samples:
        flat = flat[:: math.ceil(flat.size / max_samples)]
    if flat.dtype.kind == "f":
        flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return None
    lo, hi = np.percentile(flat, [lo_pct, hi_pct])
    lo, hi = float(lo), float(hi)
    if hi <= lo:  # (near) constant under the percentiles: fall back to the full range
        lo, hi = float(flat.min()), float(flat.max())
    return lo, hi


def to_uint8(values: np.ndarray, lo: float, hi: float, finite: bool = False) -> np.ndarray:
    """Linear map [lo, hi] -> [0, 255], saturating outside; NaN/inf -> 0 (skipped when the
    caller knows the values are finite). Constant input -> 0."""
    x = values.astype(np.float32, copy=False)
    if hi <= lo:
        out = np.zeros(x.shape, np.uint8)
    else:
        x = (x - np.float32(lo)) * np.float32(255.0 / (hi - lo)) + np.float32(0.5)
        if values.dtype.kind == "f" and not finite:
            x = np.nan_to_num(x, nan=0.0, posinf=255.0, neginf=0.0)
        out = np.clip(x, 0, 255, out=x).astype(np.uint8)
    return out


# ---- 8/16-bit integer images: a histogram and a lookup table instead of float passes.
# Percentiles from np.bincount are exact (same linear interpolation as np.percentile) and
# the 8-bit result is one gather through a 65536-entry table that also holds the rescale.


class IntegerView(NamedTuple):
    """values == table[indices]; `order` sorts `table` (a cached argsort)."""

    indices: np.ndarray
    table: np.ndarray
    order: np.ndarray

    def rescaled(self, slope: float, intercept: float) -> "IntegerView":
        """The same pixels with table values slope * v + intercept (DICOM modality rescale)."""
        order = self.order if slope >= 0 else self.order[::-1]
        return IntegerView(self.indices, self.table * slope + intercept, order)


def integer_view(values: np.ndarray) -> IntegerView | None:
    """An IntegerView of (u)int8/(u)int16 arrays; None for other dtypes."""
    dt = values.dtype
    if dt in (np.uint8, np.uint16, np.int8, np.int16):
        table, order = _value_table(dt.str)
        return IntegerView(values.view(np.uint8 if dt.itemsize == 1 else np.uint16), table, order)
    return None


@functools.lru_cache(maxsize=None)
def _value_table(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Every value of an 8/16-bit integer dtype, in the order of its unsigned bit patterns,
    and the argsort of that table."""
    dt = np.dtype(dtype)
    udt = np.uint8 if dt.itemsize == 1 else np.uint16
    table = np.arange(1 << (8 * dt.itemsize), dtype=np.int64).astype(udt).view(dt).astype(np.float64)
    order = np.argsort(table, kind="stable")
    table.setflags(write=False)
    order.setflags(write=False)
    return table, order


def table_percentiles(view: IntegerView, lo_pct: float, hi_pct: float,
                      max_samples: int = 1_000_000) -> tuple[float, float] | None:
    """np.percentile(values, [lo, hi]) (linear method) from a histogram of the indices
    (of every k-th one beyond max_samples, as robust_bounds does)."""
    indices, table, order = view
    flat = indices.reshape(-1)
    if flat.size > max_samples:
        flat = flat[:: math.ceil(flat.size / max_samples)]
    counts = np.bincount(flat, minlength=table.size)
    cum = np.cumsum(counts[order])
    n = int(cum[-1]) if cum.size else 0
    if n == 0:
        return None
    sorted_table = table[order]

    def stat(k: int) -> float:  # k-th smallest value, 0-based
        return float(sorted_table[np.searchsorted(cum, k, side="right")])

    out = []
    for q in (lo_pct, hi_pct):
        pos = q / 100.0 * (n - 1)
        k = int(np.floor(pos))
        v0, v1 = stat(k), stat(min(k + 1, n - 1))
        out.append(v0 + (pos - k) * (v1 - v0))
    lo, hi = out
    if hi <= lo:
        present = sorted_table[counts[order] > 0]
        lo, hi = float(present[0]), float(present[-1])
    return lo, hi


def table_to_uint8(view: IntegerView, lo: float, hi: float) -> np.ndarray:
    """to_uint8(values, lo, hi) as one lookup."""
    return to_uint8(view.table.astype(np.float32), lo, hi, finite=True)[view.indices]


def percentile_bounds(values: np.ndarray | None, view: IntegerView | None,
                      percentiles) -> tuple[tuple[float, float], dict] | None:
    """Bounds at the (lo, hi) percentiles of the finite values (from the integer view's histogram
    when there is one) and the manifest record of that scaling; None when no value is finite."""
    lo_pct, hi_pct = percentiles
    bounds = table_percentiles(view, lo_pct, hi_pct) if view is not None else robust_bounds(values, lo_pct, hi_pct)
    if bounds is None:
        return None
    return bounds, {"percentile": [lo_pct, hi_pct], "bounds": [round(b, 4) for b in bounds]}


def scale_to_uint8(values: np.ndarray | None, view: IntegerView | None, lo: float, hi: float) -> np.ndarray:
    """to_uint8(values, lo, hi), as one table lookup when the values have an integer view."""
    return table_to_uint8(view, lo, hi) if view is not None else to_uint8(values, lo, hi)


def target_size(h: int, w: int, max_size: int, side: str = "short", aspect: float = 1.0) -> tuple[int, int]:
    """(height, width) after making pixels square (aspect = row spacing / column spacing)
    and shrinking so the short (or long) side is at most max_size. Never upsamples for size."""
    fh, fw = float(h) * aspect, float(w)
    if max_size and max_size > 0:
        ref = min(fh, fw) if side == "short" else max(fh, fw)
        if ref > max_size:
            s = max_size / ref
            fh, fw = fh * s, fw * s
    return max(1, int(round(fh))), max(1, int(round(fw)))


def resize(pixels: np.ndarray, max_size: int, side: str = "short", aspect: float = 1.0) -> np.ndarray:
    """Antialiased resize of an 8-bit HxW or HxWx3 array (Pillow's Lanczos, reducing_gap for speed)."""
    h, w = pixels.shape[:2]
    th, tw = target_size(h, w, max_size, side, aspect)
    if (th, tw) == (h, w):
        return pixels
    img = Image.fromarray(pixels)
    img = img.resize((tw, th), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(img)
