"""DICOM reader (pydicom): modality LUT (RescaleSlope/Intercept), CT windows in HU,
MONOCHROME1 inversion, robust percentiles elsewhere, one sample per frame."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .common import Frame, ReadOptions, SkipFile, jsonable
from .scaling import (WINDOW_PRESETS, integer_view, parse_window, percentile_bounds, scale_to_uint8, to_uint8,
                      window_bounds)

# DICOM Modality tag -> shard contract code.
DICOM_MODALITY = {
    "CT": "CT", "MR": "MR", "CR": "XR", "DX": "XR", "MG": "XR", "RF": "XR", "XA": "XR", "IO": "XR",
    "PX": "XR", "US": "US", "OCT": "OCT", "OP": "FUNDUS", "OPT": "OCT", "SM": "PATH", "ES": "ENDO",
    "XC": "OTHER", "PT": "OTHER", "NM": "OTHER",
}


def _first(value) -> float | None:
    if value is None:
        return None
    try:
        return float(value[0]) if not isinstance(value, (str, bytes)) and hasattr(value, "__len__") else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _set_transfer_syntax(ds) -> None:
    """Files without a file meta header are uncompressed; name their syntax from how they
    were parsed, so that pydicom can decode the pixels."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def read_dicom(path: str, window: str, opts: ReadOptions, modality: str | None = None) -> Iterator[Frame]:
    """`modality`: the source's (wins over the file's tag for choosing CT windows)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        # No preamble/'DICM': old ACR-NEMA style files still parse with force=True; random
        # bytes do not give a dataset with pixel data.
        try:
            ds = pydicom.dcmread(path, force=True)
            ok = "PixelData" in ds and "Rows" in ds
        except Exception:
            ok = False
        if not ok:
            raise SkipFile("not a DICOM image: no 'DICM' file header, and no pixel data when read anyway") from None
        _set_transfer_syntax(ds)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise SkipFile(f"DICOM has no pixel data (SOP class {ds.get('SOPClassUID', '?')})")
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    syntax_name = getattr(syntax, "name", str(syntax)) if syntax is not None else "unknown"
    try:
        arr = ds.pixel_array
    except Exception as e:  # missing decoder plugin, corrupt stream
        msg = " ".join(line.strip() for line in str(e).splitlines())[:400] or type(e).__name__
        raise SkipFile(f"cannot decode pixel data ({syntax_name}): {msg}") from None

    from pydicom.pixels import apply_modality_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1))
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames == 1:
        arr = arr[None]
    if samples == 1 and arr.ndim != 3 or samples == 3 and arr.ndim != 4:
        raise SkipFile(f"unexpected pixel array shape {arr.shape} for {n_frames} frame(s), {samples} samples/pixel")
    orig_dtype = str(arr.dtype)
    tag_modality = str(ds.get("Modality", "")).upper()
    file_modality = DICOM_MODALITY.get(tag_modality)

    meta = {
        "format": "dicom",
        "original_dtype": orig_dtype,
        "original_shape": [int(s) for s in arr.shape[1:]],
        "dicom_modality": tag_modality or None,
        "photometric": photometric,
        "transfer_syntax": syntax_name,
        "bits_stored": jsonable(ds.get("BitsStored")),
        "n_frames": n_frames,
    }
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    aspect = 1.0
    if spacing is not None and len(spacing) == 2 and float(spacing[0]) > 0 and float(spacing[1]) > 0:
        meta["spacing"] = jsonable(list(spacing))  # [row spacing, column spacing] in mm
        aspect = float(spacing[0]) / float(spacing[1])
    for key, name in (("SliceThickness", "slice_thickness"), ("BodyPartExamined", "body_part"),
                      ("InstanceNumber", "instance_number")):
        if key in ds and ds[key].value not in (None, ""):
            meta[name] = jsonable(ds[key].value)

    if samples == 3:
        # pydicom already converted YBR to RGB; 8-bit color is kept as is.
        if arr.dtype == np.uint8:
            frames8 = arr
            meta["scaling"] = "none"
        else:
            scaled = percentile_bounds(arr, None, opts.percentiles)
            if scaled is None:
                raise SkipFile("no finite pixel values")
            bounds, meta["scaling"] = scaled
            frames8 = to_uint8(arr, *bounds)
    else:
        # RescaleSlope/Intercept (-> HU for CT) folded into a lookup table for 8/16-bit data;
        # pydicom's apply_modality_lut for Modality LUT sequences and other bit depths.
        iv = None if "ModalityLUTSequence" in ds else integer_view(arr)
        if iv is not None:
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
            iv = iv.rescaled(slope, intercept)
            values = None  # the view's lookup table stands for the values
        else:
            values = apply_modality_lut(arr, ds)
        mode = parse_window(window)
        is_ct = (modality or file_modality) == "CT"
        bounds = None
        if isinstance(mode, tuple):
            bounds = window_bounds(*mode)
            meta["window"] = {"center": mode[0], "width": mode[1], "from": "user"}
        elif mode in WINDOW_PRESETS:
            bounds = window_bounds(*WINDOW_PRESETS[mode])
            meta["window"] = {"center": WINDOW_PRESETS[mode][0], "width": WINDOW_PRESETS[mode][1], "from": mode}
        elif mode in ("file", "auto"):
            c, w = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
            if c is not None and w is not None and w > 0 and (mode == "file" or is_ct):
                bounds = window_bounds(c, w)
                meta["window"] = {"center": c, "width": w, "from": "file"}
            elif mode == "file":
                meta["window_missing"] = True
        if bounds is None:
            scaled = percentile_bounds(values, iv, opts.percentiles)
            if scaled is None:
                raise SkipFile("no finite pixel values")
            bounds, meta["scaling"] = scaled
        frames8 = scale_to_uint8(values, iv, *bounds)
        if photometric == "MONOCHROME1":  # low values are bright: invert so bright means dense
            frames8 = 255 - frames8
            meta["inverted"] = True

    for i in range(n_frames):
        fm = dict(meta)
        if n_frames > 1:
            fm["frame"] = i
        yield Frame(np.ascontiguousarray(frames8[i]), i if n_frames > 1 else None, fm, file_modality, aspect)
