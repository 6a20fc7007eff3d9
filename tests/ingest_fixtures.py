"""Builds the small corpus the ingest tests use: every file made here, with the number of
samples each should give (None: it must be skipped, with a reason matching the pattern)."""
from __future__ import annotations

import io
import os
import time

import numpy as np
from PIL import Image

from loaders.ingest.synthetic import ct_hu, phantom, rgb_tissue, volume, write_dicom, write_image, write_nifti

CT_SHAPE = (96, 80)
NIFTI_SHAPE = (30, 36, 44)  # axis 2 has the most slices
NIFTI_EMPTY = 2  # zero slices at each end of axis 2
FRAMES = 5


def ct_stored(seed: int = 0, slope: float = 1.0, intercept: float = -1024.0) -> np.ndarray:
    return np.round((ct_hu(*CT_SHAPE, seed=seed) - intercept) / slope).astype(np.int16)


def build_corpus(root: str) -> dict[str, int | str]:
    """Write the corpus under root; return relpath -> expected samples (int) or skip-reason pattern (str)."""
    from pydicom.uid import JPEGLSLossless, RLELossless

    expect: dict[str, int | str] = {}
    # DICOM
    write_dicom(f"{root}/dicom/ct_window.dcm", ct_stored(0), slope=1, intercept=-1024, window=(40, 400))
    expect["dicom/ct_window.dcm"] = 1
    write_dicom(f"{root}/dicom/ct_rescale.dcm", ct_stored(1, slope=2, intercept=-1000), slope=2, intercept=-1000)
    expect["dicom/ct_rescale.dcm"] = 1
    mono1 = np.round(phantom(70, 60, 2, 0, 4000)).astype(np.uint16)
    write_dicom(f"{root}/dicom/cr_mono1.dcm", mono1, modality="CR", photometric="MONOCHROME1")
    expect["dicom/cr_mono1.dcm"] = 1
    frames = np.stack([np.round(phantom(48, 64, 10 + i, 0, 3000)).astype(np.uint16) for i in range(FRAMES)])
    write_dicom(f"{root}/dicom/us_multiframe.dcm", frames, modality="US", multiframe=True)
    expect["dicom/us_multiframe.dcm"] = FRAMES
    # RLE-compressed: decodable with pydicom's own handler.
    import pydicom

    ds = pydicom.dcmread(f"{root}/dicom/ct_window.dcm")
    ds.compress(RLELossless)
    ds.save_as(f"{root}/dicom/ct_rle.dcm")
    expect["dicom/ct_rle.dcm"] = 1
    # No preamble, no file meta (ACR-NEMA style): read anyway.
    ds = pydicom.dcmread(f"{root}/dicom/ct_window.dcm")
    del ds.file_meta
    ds.preamble = None
    ds.save_as(f"{root}/dicom/ct_no_header.dcm", implicit_vr=True, little_endian=True, enforce_file_format=False)
    expect["dicom/ct_no_header.dcm"] = 1
    # Hostile DICOM
    write_dicom(f"{root}/dicom/jpegls.dcm", np.zeros((32, 32), np.uint16), modality="MR",
                transfer_syntax=JPEGLSLossless, encapsulated=[b"\xff\xd8\xff\xf7" + bytes(64)])
    expect["dicom/jpegls.dcm"] = "cannot decode pixel data"
    write_dicom(f"{root}/dicom/no_pixels.dcm", None, with_pixels=False)
    expect["dicom/no_pixels.dcm"] = "no pixel data"
    with open(f"{root}/dicom/random.dcm", "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expect["dicom/random.dcm"] = "not a DICOM"
    # Raster
    grad = np.tile(np.linspace(0, 65535, 96).round().astype(np.uint16), (64, 1))
    write_image(f"{root}/raster/xr16_full.png", grad)
    expect["raster/xr16_full.png"] = 1
    write_image(f"{root}/raster/xr12_in16.png", (grad // 16).astype(np.uint16))
    expect["raster/xr12_in16.png"] = 1
    write_image(f"{root}/raster/gray8.png", np.round(phantom(50, 70, 3, 0, 255)).clip(0, 255).astype(np.uint8))
    expect["raster/gray8.png"] = 1
    write_image(f"{root}/raster/path_rgb.tiff", rgb_tissue(600, 800, 4))
    expect["raster/path_rgb.tiff"] = 1
    write_image(f"{root}/raster/derm.jpg", rgb_tissue(120, 90, 5), quality=90)
    expect["raster/derm.jpg"] = 1
    buf = io.BytesIO()
    Image.fromarray(rgb_tissue(200, 200, 6)).save(buf, format="JPEG", quality=90)
    with open(f"{root}/raster/truncated.jpg", "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    expect["raster/truncated.jpg"] = "truncated"
    open(f"{root}/raster/empty.png", "wb").close()
    expect["raster/empty.png"] = "empty file"
    with open(f"{root}/raster/notes.csv", "w") as f:
        f.write("not,an,image\n")
    expect["raster/notes.csv"] = "unsupported file type"
    # NIfTI
    write_nifti(f"{root}/nifti/brain.nii.gz", volume(NIFTI_SHAPE, seed=7, empty_border=NIFTI_EMPTY))
    expect["nifti/brain.nii.gz"] = NIFTI_SHAPE[2] - 2 * NIFTI_EMPTY
    write_nifti(f"{root}/nifti/all_nan.nii.gz", np.full((8, 8, 6), np.nan, np.float32))
    expect["nifti/all_nan.nii.gz"] = "no finite voxels"
    return expect


def small_corpus(root: str, n_png: int = 10) -> None:
    """For resume tests: several small files of three formats and one bad file."""
    for i in range(n_png):
        write_image(f"{root}/png/{i:03d}.png", rgb_tissue(40 + i, 52, i))
    for i in range(3):
        write_dicom(f"{root}/dcm/{i}.dcm", ct_stored(i), window=(40, 400), intercept=-1024)
    write_nifti(f"{root}/nii/vol.nii.gz", volume((12, 10, 14), seed=1, empty_border=1))
    with open(f"{root}/png/bad.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + os.urandom(40))


def read_shards(path: str) -> list[dict]:
    from streaming import StreamingDataset

    for attempt in range(5):
        try:
            ds = StreamingDataset(local=path, remote=None, batch_size=1, shuffle=False)
            break
        except FileExistsError:  # streaming's shared-memory names can race with other processes
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    return [ds[i] for i in range(len(ds))]
