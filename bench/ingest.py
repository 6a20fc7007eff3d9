"""`python -m bench ingest`: files/sec (and per core) of `loaders.ingest` for each format,
with 1 worker and with N workers, against the loop a user would write otherwise.

Baseline, in the same run: one process, for each file read it (Pillow / pydicom
pixel_array / nibabel get_fdata), scale by /max to 8 bits, resize to the same size as
ours (short side 512, Lanczos) and save a JPEG (quality 95) to disk. It does less than
we do (no windows, no percentiles, no manifest, no shards), so the ratio is conservative.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

from bench.common import bar_plot, card_name, print_table, write_result

# name -> (files per unit of --files, what one file is)
FORMATS = {
    "dicom_ct": (1.0, "DICOM CT 512x512 int16, rescale + window tags"),
    "dicom_multiframe": (0.25, "DICOM XA 12 frames 512x512 uint16"),
    "nifti": (1 / 16, "NIfTI .nii.gz 256x256x64 float32 volume"),
    "png16": (0.25, "16-bit PNG 1536x1536 (X-ray like)"),
    "tiff_rgb": (0.5, "RGB TIFF 1024x1024 uncompressed (pathology tile)"),
    "jpeg": (0.5, "RGB JPEG 2048x1536 q90 (dermoscopy photo)"),
}


def make_files(root: str, fmt: str, n: int) -> list[str]:
    from loaders.ingest.synthetic import ct_hu, phantom, rgb_tissue, volume, write_dicom, write_image, write_nifti

    paths = []
    for i in range(n):
        if fmt == "dicom_ct":
            stored = np.round(ct_hu(512, 512, seed=i) + 1024).astype(np.int16)
            p = write_dicom(f"{root}/{fmt}/{i:04d}.dcm", stored, intercept=-1024, window=(40, 400))
        elif fmt == "dicom_multiframe":
            frames = np.stack([np.round(phantom(512, 512, i * 100 + k, 0, 4000)).astype(np.uint16)
                               for k in range(12)])
            p = write_dicom(f"{root}/{fmt}/{i:04d}.dcm", frames, modality="XA", multiframe=True)
        elif fmt == "nifti":
            p = write_nifti(f"{root}/{fmt}/{i:04d}.nii.gz", volume((256, 256, 64), seed=i, empty_border=4))
        elif fmt == "png16":
            img = np.round(phantom(1536, 1536, i, 200, 60000)).clip(0, 65535).astype(np.uint16)
            p = write_image(f"{root}/{fmt}/{i:04d}.png", img)
        elif fmt == "tiff_rgb":
            p = write_image(f"{root}/{fmt}/{i:04d}.tiff", rgb_tissue(1024, 1024, i))
        elif fmt == "jpeg":
            p = write_image(f"{root}/{fmt}/{i:04d}.jpg", rgb_tissue(1536, 2048, i), quality=90)
        else:
            raise ValueError(fmt)
        paths.append(p)
    return paths


def naive_loop(paths: list[str], out_dir: str, max_size: int = 512) -> int:
    """What one writes without a tool: read, /max, resize, save JPEG. Returns images written."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    n = 0

    def save(arr: np.ndarray, name: str) -> None:
        arr = arr.astype(np.float32)
        m = float(arr.max()) or 1.0
        img = Image.fromarray((arr / m * 255).astype(np.uint8))
        h, w = arr.shape[:2]
        s = max_size / min(h, w)
        if s < 1:
            img = img.resize((round(w * s), round(h * s)), Image.Resampling.LANCZOS)
        img.save(os.path.join(out_dir, name + ".jpg"), quality=95)

    for p in paths:
        base = os.path.basename(p)
        if p.endswith(".dcm"):
            import pydicom

            arr = pydicom.dcmread(p).pixel_array
            frames = arr if arr.ndim == 3 else arr[None]
            for k, f in enumerate(frames):
                save(f, f"{base}_{k}")
                n += 1
        elif p.endswith(".nii.gz"):
            import nibabel as nib

            vol = nib.load(p).get_fdata()
            for k in range(vol.shape[2]):
                save(vol[:, :, k], f"{base}_{k}")
                n += 1
        else:
            save(np.asarray(Image.open(p)), base)
            n += 1
    return n


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=96, help="files per format unit (see FORMATS; default 96)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N for the parallel run")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of " + ",".join(FORMATS))
    p.add_argument("--tmp", default=None, help="folder for the generated files (default: a temp dir)")
    args = p.parse_args(argv)

    from loaders.ingest import ingest
    from loaders.ingest.core import _preload

    _preload({"dicom", "nifti"})  # imports are not what we measure
    load_before = os.getloadavg()
    root = tempfile.mkdtemp(prefix="bench_ingest_", dir=args.tmp)
    wn = args.workers
    rows = []
    try:
        for fmt in args.formats.split(","):
            scale, what = FORMATS[fmt]
            n = max(2, int(round(args.files * scale)))
            t0 = time.perf_counter()
            paths = make_files(root, fmt, n)
            gen_s = time.perf_counter() - t0
            c0, t0 = cpu_seconds(), time.perf_counter()
            n_base = naive_loop(paths, f"{root}/naive_{fmt}")
            base_s, base_cpu = time.perf_counter() - t0, cpu_seconds() - c0
            row = {"format": fmt, "files": n, "what": what, "generate_s": round(gen_s, 2),
                   "baseline_files_per_s": n / base_s, "baseline_files_per_cpu_s": n / base_cpu,
                   "baseline_images": n_base}
            for w in sorted({1, wn}):
                out = f"{root}/out_{fmt}_{w}"
                c0, t0 = cpu_seconds(), time.perf_counter()
                m = ingest([{"path": f"{root}/{fmt}", "name": fmt}], out, workers=w, progress=False)
                secs, cpu = time.perf_counter() - t0, cpu_seconds() - c0
                assert m["files"]["skipped"] == 0, m["skipped"]
                row[f"w{w}_files_per_s"] = n / secs
                row[f"w{w}_files_per_s_per_core"] = n / secs / w
                row[f"w{w}_files_per_cpu_s"] = n / cpu
                row[f"w{w}_samples_per_s"] = m["samples"] / secs
                row["samples"] = m["samples"]
                shutil.rmtree(out)
            row["ratio_w1_vs_baseline"] = row["w1_files_per_s"] / row["baseline_files_per_s"]
            row["ratio_cpu_w1_vs_baseline"] = row["w1_files_per_cpu_s"] / row["baseline_files_per_cpu_s"]
            row[f"ratio_w{wn}_vs_baseline"] = row[f"w{wn}_files_per_s"] / row["baseline_files_per_s"]
            row[f"scaling_w{wn}_vs_w1"] = row[f"w{wn}_files_per_s"] / row["w1_files_per_s"]
            rows.append(row)
            print(f"{fmt}: done", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    cols = ["format", "files", "samples", "baseline_files_per_s", "w1_files_per_s", f"w{wn}_files_per_s",
            "baseline_files_per_cpu_s", "w1_files_per_cpu_s", f"w{wn}_files_per_cpu_s", "ratio_cpu_w1_vs_baseline",
            f"ratio_w{wn}_vs_baseline"]
    print_table(rows, cols)
    payload = {
        "workers": wn,
        "cpu_count": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "note": "files_per_s is wall clock; files_per_cpu_s is files per CPU-second of this process and its "
                "workers, i.e. files/sec per fully used core, which stays meaningful when other jobs share "
                "the machine (see loadavg)",
        "baseline": "single process: read (Pillow/pydicom/nibabel), /max to uint8, Lanczos resize to short "
                    "side 512, save JPEG q95 to files",
        "ours": "loaders.ingest.ingest(..., workers=W): windows/percentiles, resize short side 512, JPEG q95, "
                "MDS shards + manifest; wall time includes pool start-up, merge and manifest",
        "rows": rows,
    }
    path = write_result("ingest", payload, argv if argv is not None else sys.argv[1:])
    labels = [r["format"] for r in rows]
    bar_plot(path.with_suffix(".png"), labels,
             {"naive loop (1 proc)": [r["baseline_files_per_cpu_s"] for r in rows],
              "ingest, 1 worker": [r["w1_files_per_cpu_s"] for r in rows],
              f"ingest, {wn} workers": [r[f"w{wn}_files_per_cpu_s"] for r in rows]},
             "files per CPU-second (per core)", f"ingest throughput per core, {card_name()}")
    return 0
