"""Medical-looking synthetic phantoms and the quickstart data set built from them.

The quickstart must train with no download, so its data is made here on first use and
cached: phantoms of seven modalities (CT, MR, XR, US, PATH, FUNDUS, DERM) plus the real
sample DICOM and NIfTI files that pydicom and nibabel ship, ingested like any user data.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from loaders.shards import ShardWriter, make_sample, make_uid

log = logging.getLogger("loaders")

QUICKSTART_VERSION = 1


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:n, 0:n].astype(np.float32)
    return (x - n / 2) / (n / 2), (y - n / 2) / (n / 2)


def _ellipse(x, y, cx, cy, ax, ay, theta=0.0) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    return (u / ax) ** 2 + (v / ay) ** 2 <= 1.0


def _smooth_noise(rng: np.random.Generator, n: int, scale: int) -> np.ndarray:
    """Low-frequency noise: coarse random grid upsampled bilinearly, in [0, 1]."""
    coarse = rng.random((scale + 1, scale + 1)).astype(np.float32)
    idx = np.linspace(0, scale, n, dtype=np.float32)
    i0 = np.minimum(idx.astype(int), scale - 1)
    f = idx - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _to_u8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def phantom_ct(rng, n):
    x, y = _grid(n)
    img = np.zeros((n, n), np.float32)
    body = _ellipse(x, y, 0, 0.05, 0.85 + 0.05 * rng.random(), 0.65 + 0.05 * rng.random())
    img[body] = 0.45
    for side in (-1, 1):  # lungs
        img[_ellipse(x, y, side * 0.38, 0.0, 0.25 + 0.05 * rng.random(), 0.4, side * 0.2)] = 0.08
    img[_ellipse(x, y, 0, 0.45, 0.12, 0.1)] = 0.95  # spine
    img[_ellipse(x, y, 0.05 * rng.standard_normal(), -0.05, 0.15, 0.17)] = 0.55  # heart
    for _ in range(rng.integers(0, 3)):  # nodules
        img[_ellipse(x, y, rng.uniform(-0.5, 0.5), rng.uniform(-0.3, 0.3), 0.04, 0.04)] = 0.6
    return _to_u8(img + 0.03 * rng.standard_normal((n, n)))


def phantom_mr(rng, n):
    x, y = _grid(n)
    img = np.zeros((n, n), np.float32)
    img[_ellipse(x, y, 0, 0, 0.8, 0.92)] = 0.85  # scalp
    img[_ellipse(x, y, 0, 0, 0.74, 0.86)] = 0.15  # skull
    brain = _ellipse(x, y, 0, 0, 0.7, 0.82)
    tex = _smooth_noise(rng, n, 12)
    img[brain] = 0.45 + 0.25 * (tex[brain] > 0.5)  # grey / white matter
    for side in (-1, 1):
        img[_ellipse(x, y, side * 0.12, -0.05, 0.07, 0.22, side * 0.3)] = 0.9  # ventricles (T2-bright)
    return _to_u8(img * (0.9 + 0.2 * _smooth_noise(rng, n, 3)) + 0.02 * rng.standard_normal((n, n)))


def phantom_xr(rng, n):
    x, y = _grid(n)
    img = 0.8 - 0.2 * np.abs(x) + 0.05 * _smooth_noise(rng, n, 4)
    for side in (-1, 1):
        img[_ellipse(x, y, side * 0.4, -0.05, 0.3, 0.6)] -= 0.45  # lung fields
    for k in range(8):  # ribs
        yy = -0.55 + k * 0.14
        img[(np.abs(y - yy - 0.15 * x**2) < 0.025) & (np.abs(x) < 0.75)] += 0.2
    img[np.abs(x) < 0.08] += 0.15  # spine
    return _to_u8(img + 0.02 * rng.standard_normal((n, n)))


def phantom_us(rng, n):
    x, y = _grid(n)
    r, ang = np.hypot(x, y + 1.0), np.arctan2(x, y + 1.0)
    fan = (r < 1.9) & (np.abs(ang) < 0.6)
    speckle = rng.rayleigh(0.25, (n, n)).astype(np.float32)
    tissue = 0.3 + 0.3 * _smooth_noise(rng, n, 6)
    cyst = _ellipse(x, y, rng.uniform(-0.3, 0.3), rng.uniform(0.1, 0.5), 0.2, 0.12)
    img = np.where(fan, 2.2 * tissue * speckle * np.exp(-0.4 * r), 0.0)
    img[cyst & fan] *= 0.15
    return _to_u8(img)


def phantom_path(rng, n):
    bg = np.stack([0.93, 0.75, 0.85])[None, None] * (0.9 + 0.1 * _smooth_noise(rng, n, 5)[..., None])
    img = bg.copy()
    x, y = _grid(n)
    for _ in range(int(rng.integers(40, 90))):  # nuclei: purple blobs
        m = _ellipse(x, y, rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.03, 0.07),
                     rng.uniform(0.02, 0.05), rng.uniform(0, np.pi))
        img[m] = np.array([0.35, 0.2, 0.55]) * rng.uniform(0.8, 1.1)
    return _to_u8(img + 0.02 * rng.standard_normal(img.shape))


def phantom_fundus(rng, n):
    x, y = _grid(n)
    r = np.hypot(x, y)
    img = np.zeros((n, n, 3), np.float32)
    disk = r < 0.95
    img[disk] = np.array([0.8, 0.35, 0.15])
    img *= (1.1 - 0.5 * r)[..., None]
    ox, oy = rng.choice([-0.45, 0.45]), rng.uniform(-0.1, 0.1)
    img[_ellipse(x, y, ox, oy, 0.13, 0.15)] = np.array([1.0, 0.85, 0.6])  # optic disc
    for _ in range(6):  # vessels radiating from the disc
        theta = rng.uniform(0, 2 * np.pi)
        t = np.linspace(0, 1.3, 400)
        bend = rng.uniform(-0.6, 0.6)
        px, py = ox + t * np.cos(theta + bend * t), oy + t * np.sin(theta + bend * t)
        ix, iy = ((px + 1) * n / 2).astype(int), ((py + 1) * n / 2).astype(int)
        ok = (ix >= 0) & (ix < n) & (iy >= 0) & (iy < n)
        for d in range(-1, 2):
            img[np.clip(iy[ok] + d, 0, n - 1), ix[ok]] *= 0.55
    img[~disk] = 0
    return _to_u8(img)


def phantom_derm(rng, n):
    x, y = _grid(n)
    skin = np.array([0.9, 0.72, 0.6]) * (0.9 + 0.1 * _smooth_noise(rng, n, 8)[..., None])
    img = skin.copy()
    edge = 0.35 + 0.15 * _smooth_noise(rng, n, 5)
    lesion = np.hypot(x - rng.uniform(-0.2, 0.2), (y - rng.uniform(-0.2, 0.2)) * 1.2) < edge
    img[lesion] = np.array([0.45, 0.28, 0.18]) * (0.7 + 0.4 * _smooth_noise(rng, n, 10)[lesion][:, None])
    return _to_u8(img)


PHANTOMS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "CT": phantom_ct,
    "MR": phantom_mr,
    "XR": phantom_xr,
    "US": phantom_us,
    "PATH": phantom_path,
    "FUNDUS": phantom_fundus,
    "DERM": phantom_derm,
}


def write_phantom_shards(out: str | os.PathLike, per_modality: int = 200, size: int = 128, seed: int = 0) -> dict:
    """Write `per_modality` phantoms of each modality as MDS shards; returns counts."""
    counts = {}
    with ShardWriter(str(out), size_limit="16mb") as writer:
        for m_index, (modality, make) in enumerate(PHANTOMS.items()):
            rng = np.random.default_rng([seed, m_index])
            for i in range(per_modality):
                pixels = make(rng, size)
                label = m_index  # the modality is a free, meaningful label for probes
                writer.write(make_sample(pixels, modality=modality, source=f"phantom-{modality.lower()}",
                                         uid=make_uid(f"phantom-{modality.lower()}", f"{i:05d}.png"), label=label,
                                         meta={"synthetic": True, "seed": seed}))
            counts[modality] = per_modality
    return counts


def real_sample_files() -> list[tuple[str, str, str]]:
    """(path, source, modality) of the sample medical files shipped inside pydicom and nibabel."""
    found: list[tuple[str, str, str]] = []
    try:
        from pydicom.data import get_testdata_file

        for name, modality in (("CT_small.dcm", "CT"), ("MR_small.dcm", "MR"), ("US1_UNCR.dcm", "US"),
                               ("MR2_UNCR.dcm", "MR")):
            try:
                path = get_testdata_file(name, download=False)  # only what the wheel ships
            except Exception:
                path = None
            if path:
                found.append((str(path), f"pydicom-{Path(name).stem}", modality))
    except ImportError:
        pass
    try:
        from nibabel.testing import data_path

        for name in ("anatomical.nii", "example4d.nii.gz"):
            p = Path(data_path) / name
            if p.is_file():
                found.append((str(p), f"nibabel-{name.split('.')[0]}", "MR"))
    except ImportError:
        pass
    return found


def quickstart_shards(cache_dir: str | os.PathLike | None = None, *, per_modality: int = 200, size: int = 128) -> str:
    """Path of the quickstart shard set, built on first use and cached.

    Layout: <cache>/quickstart-v1/{phantoms,real}/ (each an MDS folder) and streams.json
    listing the folders that exist. Built in a temporary folder and renamed, so an
    interrupted build never leaves a half-written cache."""
    root = Path(cache_dir or os.environ.get("BIOVFM_CACHE", Path.home() / ".cache" / "biovfm"))
    dest = root / f"quickstart-v{QUICKSTART_VERSION}"
    if (dest / "streams.json").is_file():
        return str(dest)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".quickstart-", dir=root))
    try:
        log.info("building the quickstart data set in %s (once)", dest)
        write_phantom_shards(tmp / "phantoms", per_modality=per_modality, size=size)
        streams = ["phantoms"]
        samples = real_sample_files()
        if samples:
            try:
                from loaders.ingest import ingest
            except ImportError:
                ingest = None
            if ingest is not None:
                ingest([{"path": p, "name": s, "modality": m} for p, s, m in samples], str(tmp / "real"),
                       max_size=size * 2, workers=1, progress=False)
                if (tmp / "real" / "index.json").is_file():
                    streams.append("real")
        (tmp / "streams.json").write_text(json.dumps(streams))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def quickstart_streams(cache_dir: str | os.PathLike | None = None) -> list[str]:
    dest = Path(quickstart_shards(cache_dir))
    return [str(dest / name) for name in json.loads((dest / "streams.json").read_text())]
