"""Small synthetic medical files in every format the ingester reads: for tests, the bench
and demos without patient data. Pixel content is a smooth 'body' phantom with structure,
so windowing, percentiles and resizing have something to act on."""
from __future__ import annotations

import os

import numpy as np


def phantom(h: int, w: int, seed: int = 0, lo: float = -1000.0, hi: float = 1000.0) -> np.ndarray:
    """float32 HxW: background `lo`, an elliptical body, bright blobs up to `hi`, mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h / 2, w / 2
    body = ((y - cy) / (0.42 * h)) ** 2 + ((x - cx) / (0.38 * w)) ** 2 <= 1
    img = np.full((h, w), lo, np.float32)
    img[body] = lo + 0.52 * (hi - lo)
    for _ in range(4):
        by, bx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        r = rng.uniform(0.04, 0.1) * min(h, w)
        img[(y - by) ** 2 + (x - bx) ** 2 <= r * r] = rng.uniform(lo + 0.2 * (hi - lo), hi)
    img += rng.normal(0, 0.01 * (hi - lo), (h, w)).astype(np.float32)
    return img


def write_dicom(path: str, pixels: np.ndarray, *, modality: str = "CT", photometric: str = "MONOCHROME2",
                slope: float = 1.0, intercept: float = 0.0, window: tuple[float, float] | None = None,
                spacing: tuple[float, float] = (0.7, 0.7), multiframe: bool = False, with_pixels: bool = True,
                transfer_syntax: str | None = None, encapsulated: list[bytes] | None = None) -> str:
    """Write a DICOM file with pydicom. `pixels`: stored values, int16/uint16 HxW, or FxHxW
    with multiframe=True, or uint8 HxWx3 (RGB). `encapsulated`: raw compressed frames to
    put under `transfer_syntax` as-is (to test undecodable syntaxes)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    sop_class = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
                 "CR": "1.2.840.10008.5.1.4.1.1.1", "US": "1.2.840.10008.5.1.4.1.1.3.1"}.get(
        modality, SecondaryCaptureImageStorage)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = "SYNTHETIC"
    ds.InstanceNumber = 1
    if with_pixels:
        arr = np.asarray(pixels)
        rgb = arr.ndim == 3 and not multiframe
        frames = arr.shape[0] if multiframe else 1
        rows, cols = (arr.shape[1:3] if multiframe else arr.shape[:2])
        ds.Rows, ds.Columns = int(rows), int(cols)
        ds.SamplesPerPixel = 3 if rgb else 1
        ds.PhotometricInterpretation = "RGB" if rgb else photometric
        if rgb:
            ds.PlanarConfiguration = 0
        bits = 8 if arr.dtype == np.uint8 else 16
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
        ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
        if multiframe:
            ds.NumberOfFrames = frames
        ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
        if not rgb:
            ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
        if encapsulated is not None:
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate(encapsulated)
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        else:
            ds.PixelData = np.ascontiguousarray(arr).tobytes()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_hu(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A CT slice in HU (air -1000 .. bone ~1000)."""
    return phantom(h, w, seed, -1000.0, 1000.0)


def write_nifti(path: str, volume: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> str:
    import nibabel as nib

    affine = np.diag([*spacing, 1.0])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    nib.save(nib.Nifti1Image(volume, affine), path)
    return path


def volume(shape: tuple[int, int, int], seed: int = 0, empty_border: int = 2) -> np.ndarray:
    """float32 X x Y x Z MR-like volume; `empty_border` zero slices at each end of the last axis."""
    x, y, z = shape
    vol = np.zeros(shape, np.float32)
    for k in range(empty_border, z - empty_border):
        vol[:, :, k] = phantom(x, y, seed + k, 0.0, 1200.0)
    return vol


def write_image(path: str, pixels: np.ndarray, **save_kwargs) -> str:
    """PNG/TIFF/JPEG by extension via Pillow. uint16 HxW is written as 16-bit ('I;16')."""
    from PIL import Image

    arr = np.asarray(pixels)
    img = Image.fromarray(arr)  # uint16 HxW -> mode "I;16"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path, **save_kwargs)
    return path


def rgb_tissue(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 HxWx3, H&E-like pink/purple texture."""
    rng = np.random.default_rng(seed)
    base = phantom(h, w, seed, 0.0, 1.0)
    r = 200 + 40 * base + rng.normal(0, 6, (h, w))
    g = 120 + 60 * (1 - base) + rng.normal(0, 6, (h, w))
    b = 180 + 50 * base + rng.normal(0, 6, (h, w))
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)
