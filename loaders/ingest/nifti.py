"""NIfTI reader (nibabel): reorient to RAS, slice a 3-D volume along one axis, window or
percentile-scale with bounds computed once per volume, drop empty/near-constant slices."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .common import Frame, ReadOptions, SkipFile
from .scaling import WINDOW_PRESETS, parse_window, percentile_bounds, to_uint8, window_bounds

AXIS_NAMES = {"sagittal": 0, "coronal": 1, "axial": 2}  # in RAS+ voxel order


def choose_axis(shape: tuple[int, int, int], axis: str) -> int:
    """'auto': the axis with the most slices, ties going to axial, then coronal."""
    axis = str(axis).lower()
    if axis in AXIS_NAMES:
        return AXIS_NAMES[axis]
    if axis in ("0", "1", "2"):
        return int(axis)
    return max((2, 1, 0), key=lambda a: shape[a])  # max() keeps the first of equal keys


def is_empty(pixels: np.ndarray, min_std: float, min_foreground: float) -> bool:
    """Near-constant (8-bit std below min_std), or almost all background: fewer than
    min_foreground of the pixels differ from the slice's median by more than 10% of the range."""
    counts = np.bincount(pixels.reshape(-1), minlength=256)  # one pass; all stats from the histogram
    n = pixels.size
    levels = np.arange(256, dtype=np.float64)
    mean = float(counts @ levels) / n
    std = (max(float(counts @ (levels * levels)) / n - mean * mean, 0.0)) ** 0.5
    if std < min_std:
        return True
    median = int(np.searchsorted(np.cumsum(counts), (n + 1) // 2))
    near = int(counts[max(median - 25, 0): median + 26].sum())
    return (n - near) / n < min_foreground


def read_nifti(path: str, window: str, axis: str, stride: int, volumes: str, opts: ReadOptions,
               modality: str | None) -> Iterator[Frame]:
    import nibabel as nib

    try:
        img = nib.load(path)
    except Exception as e:
        raise SkipFile(f"not a readable NIfTI file: {type(e).__name__}: {e}") from None
    orig_dtype = str(img.get_data_dtype())
    try:
        img = nib.as_closest_canonical(img)  # RAS+: the same slice orientation for every file
        zooms = [float(z) for z in img.header.get_zooms()[:3]]
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise SkipFile(f"cannot read NIfTI voxels: {type(e).__name__}: {e}") from None
    if data.ndim > 3:  # drop singleton dims after the third (X x Y x Z x 1 x 1)
        data = data.reshape(data.shape[:3] + tuple(s for s in data.shape[3:] if s != 1))
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim not in (3, 4):
        raise SkipFile(f"{data.ndim}-D NIfTI is not supported (shape {img.shape})")
    while len(zooms) < 3:
        zooms.append(1.0)
    n_vol = data.shape[3] if data.ndim == 4 else 1
    vol_ids = list(range(n_vol)) if volumes == "all" else [0]

    ax = choose_axis(data.shape[:3], axis)
    in_plane = [a for a in range(3) if a != ax]
    # Image rows run along the second in-plane axis flipped (anterior/superior at the top),
    # columns along the first: row spacing / column spacing gives the pixel aspect.
    aspect = zooms[in_plane[1]] / zooms[in_plane[0]] if zooms[in_plane[0]] > 0 and zooms[in_plane[1]] > 0 else 1.0
    mode = parse_window(window)
    n_slices = data.shape[ax]
    meta_base = {
        "format": "nifti",
        "original_dtype": orig_dtype,
        "volume_shape": [int(s) for s in data.shape],
        "spacing": [round(z, 6) for z in zooms],
        "axis": ax,
        "orientation": "RAS",
    }
    produced = 0
    for t in vol_ids:
        vol = data[..., t] if data.ndim == 4 else data
        vol = np.asarray(vol, dtype=np.float32)  # applies scl_slope/scl_inter
        if isinstance(mode, tuple):
            bounds, how = window_bounds(*mode), {"window": {"center": mode[0], "width": mode[1], "from": "user"}}
        elif mode in WINDOW_PRESETS:
            c, w = WINDOW_PRESETS[mode]
            bounds, how = window_bounds(c, w), {"window": {"center": c, "width": w, "from": mode}}
        else:  # auto / file / percentile: NIfTI has no window tags
            scaled = percentile_bounds(vol, None, opts.percentiles)
            if scaled is None:
                raise SkipFile("volume has no finite voxels (all NaN/inf)")
            bounds, how = scaled[0], {"scaling": scaled[1]}
        for s in range(0, n_slices, stride):
            plane = vol[(slice(None),) * ax + (s,)]  # a view: (first in-plane axis, second)
            pixels = to_uint8(np.flipud(plane.T), *bounds)
            if is_empty(pixels, opts.min_std, opts.min_foreground):
                continue  # empty or near-constant slice (background, padding, NaN)
            meta = {**meta_base, **how, "slice": s}
            index = s
            if n_vol > 1:
                meta["volume"] = t
                index = t * n_slices + s
            produced += 1
            yield Frame(np.ascontiguousarray(pixels), index, meta, modality, aspect)
    if produced == 0:
        raise SkipFile("every slice is empty or near-constant")
