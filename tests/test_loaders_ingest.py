"""Readers, scaling, hostile inputs and the manifest of `loaders.ingest`, on files made here."""
from __future__ import annotations

import io
import json
import os
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from ingest_fixtures import (CT_SHAPE, FRAMES, NIFTI_EMPTY, NIFTI_SHAPE, build_corpus, ct_stored,  # noqa: E402
                             read_shards)

from loaders.ingest import (IngestOptions, SourceSpec, ingest, load_sources_yaml, parse_source, plan,  # noqa: E402
                            process_file)
from loaders.ingest.__main__ import main as cli_main  # noqa: E402
from loaders.ingest.core import Task  # noqa: E402
from loaders.ingest.scaling import WINDOW_PRESETS, target_size  # noqa: E402
from loaders.shards import COLUMNS  # noqa: E402


def decode(sample) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample["image"])))


def ref_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((values.astype(np.float64) - lo) / (hi - lo) * 255 + 0.5, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("corpus"))
    expect = build_corpus(root)
    out = str(tmp_path_factory.mktemp("shards") / "out")
    rc = cli_main([root, "--name", "mix", "--out", out, "--workers", "2", "--encoding", "png", "--quiet",
                   "--chunk-size", "5"])
    assert rc == 0
    samples = read_shards(out)
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    by_file: dict[str, list] = {}
    for s in samples:
        by_file.setdefault(s["meta"]["relpath"], []).append(s)
    return root, expect, out, samples, manifest, by_file


def test_every_good_file_gives_expected_samples_and_bad_ones_are_listed(corpus):
    root, expect, out, samples, manifest, by_file = corpus
    good = {k: v for k, v in expect.items() if isinstance(v, int)}
    bad = {k: v for k, v in expect.items() if isinstance(v, str)}
    assert {k: len(v) for k, v in by_file.items()} == good
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == set(bad)
    for path, pattern in bad.items():
        assert pattern.lower() in skipped[path].lower(), (path, skipped[path])
    assert manifest["samples"] == len(samples) == sum(good.values())
    assert manifest["files"] == {"selected": len(expect), "ingested": len(good), "skipped": len(bad),
                                 "per_source_ingested": {"mix": len(good)}}
    assert manifest["counts"]["mix"] == dict(sorted(Counter(s["modality"] for s in samples).items()))
    assert manifest["by_modality"]["CT"] == 4 and manifest["by_modality"]["US"] == FRAMES
    assert manifest["by_modality"]["XR"] == 1  # the CR file, from its DICOM Modality tag
    stats = manifest["pixel_stats"]["by_modality"]
    assert 0 < stats["CT"]["mean"] < 1 and stats["CT"]["std"] > 0
    assert manifest["options"]["encoding"] == "png" and manifest["parts"] == 4


def test_uids_are_unique_and_stable(corpus):
    _, _, _, samples, _, by_file = corpus
    uids = [s["uid"] for s in samples]
    assert len(set(uids)) == len(uids)
    assert by_file["dicom/ct_window.dcm"][0]["uid"] == "mix/dicom/ct_window.dcm"
    assert [s["uid"] for s in by_file["dicom/us_multiframe.dcm"]] == [
        f"mix/dicom/us_multiframe.dcm#{i}" for i in range(FRAMES)]
    assert uids == sorted(uids, key=lambda u: (u.split("#")[0], int(u.split("#")[1]) if "#" in u else -1))


def test_shards_read_back_with_contract_columns(corpus):
    _, _, _, samples, _, _ = corpus
    for s in samples:
        assert set(COLUMNS) <= set(s)
        img = decode(s)
        assert img.shape[:2] == (s["height"], s["width"])
        assert (img.ndim == 2) == (s["channels"] == 1)
        assert isinstance(s["meta"], dict) and "original_dtype" in s["meta"]
        assert s["source"] == "mix" and s["label"] == -1


def test_ct_rescale_and_file_window(corpus):
    _, _, _, _, _, by_file = corpus
    s = by_file["dicom/ct_window.dcm"][0]
    hu = ct_stored(0).astype(np.float64) - 1024  # slope 1, intercept -1024
    ref = ref_uint8(hu, 40 - 200, 40 + 200)
    got = decode(s)
    assert got.shape == CT_SHAPE and s["modality"] == "CT"
    assert np.abs(got.astype(int) - ref).max() <= 1
    assert s["meta"]["window"] == {"center": 40.0, "width": 400.0, "from": "file"}
    # The RLE-compressed copy and the copy without file header decode to the same pixels.
    assert np.array_equal(decode(by_file["dicom/ct_rle.dcm"][0]), got)
    assert np.array_equal(decode(by_file["dicom/ct_no_header.dcm"][0]), got)


def test_ct_without_window_uses_rescaled_percentiles(corpus):
    _, _, _, _, _, by_file = corpus
    s = by_file["dicom/ct_rescale.dcm"][0]
    hu = ct_stored(1, slope=2, intercept=-1000).astype(np.float64) * 2 - 1000
    lo, hi = np.percentile(hu, [0.5, 99.5])
    assert s["meta"]["scaling"]["bounds"] == pytest.approx([lo, hi], abs=1e-3)
    assert np.abs(decode(s).astype(int) - ref_uint8(hu, lo, hi)).max() <= 1


@pytest.mark.parametrize("preset", ["lung", "bone", "brain", "mediastinum"])
def test_ct_window_presets(corpus, preset):
    root = corpus[0]
    task = Task(0, f"{root}/dicom/ct_window.dcm", "ct.dcm", "dicom", -1)
    res = process_file(task, SourceSpec(root, name="x", window=preset, stride=1, axis="auto", volumes="first"),
                       IngestOptions(encoding="png"))
    c, w = WINDOW_PRESETS[preset]
    ref = ref_uint8(ct_stored(0).astype(np.float64) - 1024, c - w / 2, c + w / 2)
    assert np.abs(decode(res["samples"][0]).astype(int) - ref).max() <= 1
    assert res["samples"][0]["meta"]["window"]["from"] == preset


def test_monochrome1_is_inverted(corpus):
    root, _, _, _, _, by_file = corpus
    import pydicom

    stored = pydicom.dcmread(f"{root}/dicom/cr_mono1.dcm").pixel_array.astype(np.float64)
    lo, hi = np.percentile(stored, [0.5, 99.5])
    got = decode(by_file["dicom/cr_mono1.dcm"][0]).astype(int)
    assert np.abs(got - (255 - ref_uint8(stored, lo, hi).astype(int))).max() <= 1
    assert got[stored == stored.max()].max() <= 1  # the highest stored value (least dense) is dark
    assert by_file["dicom/cr_mono1.dcm"][0]["meta"]["inverted"] is True


def test_multiframe_one_sample_per_frame_with_file_wide_scaling(corpus):
    root, _, _, _, _, by_file = corpus
    import pydicom

    frames = pydicom.dcmread(f"{root}/dicom/us_multiframe.dcm").pixel_array.astype(np.float64)
    lo, hi = np.percentile(frames, [0.5, 99.5])
    for i, s in enumerate(by_file["dicom/us_multiframe.dcm"]):
        assert s["meta"]["frame"] == i and s["modality"] == "US"
        assert np.abs(decode(s).astype(int) - ref_uint8(frames[i], lo, hi)).max() <= 1


def test_16bit_png_is_percentile_scaled_not_divided_or_clipped(corpus):
    _, _, _, _, _, by_file = corpus
    full = decode(by_file["raster/xr16_full.png"][0]).astype(int)
    assert full.ndim == 2 and full.min() == 0 and full.max() == 255
    row = full[0]
    assert (np.diff(row) >= 0).all() and 100 < row[48] < 155  # a ramp, not a white clip of /255
    # 12-bit data in a 16-bit file: /65535 would be black, /255 then clip would be white.
    low = decode(by_file["raster/xr12_in16.png"][0]).astype(int)
    assert low.min() == 0 and low.max() == 255 and 100 < low[0, 48] < 155
    assert by_file["raster/xr16_full.png"][0]["meta"]["original_dtype"] == "uint16"


def test_8bit_gray_kept_exact_and_rgb_kept_rgb(corpus):
    root, _, _, _, _, by_file = corpus
    gray = by_file["raster/gray8.png"][0]
    assert gray["channels"] == 1
    assert np.array_equal(decode(gray), np.asarray(Image.open(f"{root}/raster/gray8.png")))
    jpg = by_file["raster/derm.jpg"][0]
    assert jpg["channels"] == 3 and decode(jpg).shape == (120, 90, 3)


def test_rgb_tiff_resized_short_side_with_antialiasing(corpus):
    root, _, _, _, _, by_file = corpus
    s = by_file["raster/path_rgb.tiff"][0]
    assert s["channels"] == 3 and (s["height"], s["width"]) == (512, 683)
    src = Image.open(f"{root}/raster/path_rgb.tiff")
    ref = np.asarray(src.resize((683, 512), Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(decode(s).astype(int) - ref).mean() < 1.0
    assert s["meta"]["resized_from"] == [600, 800]


def test_nifti_slices_ras_volume_scaling_and_empty_slices_dropped(corpus):
    root, _, _, _, _, by_file = corpus
    import nibabel as nib

    slices = by_file["nifti/brain.nii.gz"]
    assert [s["meta"]["slice"] for s in slices] == list(range(NIFTI_EMPTY, NIFTI_SHAPE[2] - NIFTI_EMPTY))
    vol = np.asarray(nib.as_closest_canonical(nib.load(f"{root}/nifti/brain.nii.gz")).dataobj, np.float64)
    lo, hi = np.percentile(vol, [0.5, 99.5])
    k = slices[5]["meta"]["slice"]
    ref = ref_uint8(np.flipud(vol[:, :, k].T), lo, hi)
    assert np.abs(decode(slices[5]).astype(int) - ref).max() <= 1
    assert slices[5]["meta"]["axis"] == 2 and slices[5]["meta"]["spacing"] == [1.0, 1.0, 1.0]


def test_nifti_axis_stride_and_aspect(tmp_path):
    from loaders.ingest.synthetic import volume, write_nifti

    path = write_nifti(str(tmp_path / "v.nii.gz"), volume((24, 20, 16), seed=3, empty_border=0),
                       spacing=(1.0, 1.0, 3.0))
    task = Task(0, path, "v.nii.gz", "nifti", -1)
    spec = SourceSpec(str(tmp_path), name="v", window="auto", axis="coronal", stride=4, volumes="first")
    res = process_file(task, spec, IngestOptions(encoding="png", min_std=0, min_foreground=0))
    assert res["skip"] is None
    assert [s["meta"]["slice"] for s in res["samples"]] == [0, 4, 8, 12, 16]
    # Coronal slice: columns along x (1 mm), rows along z (3 mm) -> rows stretched 3x.
    assert (res["samples"][0]["height"], res["samples"][0]["width"]) == (48, 24)


def test_nan_voxels_are_safe(tmp_path):
    from loaders.ingest.synthetic import volume, write_nifti

    vol = volume((16, 16, 8), seed=2, empty_border=0)
    vol[:8] = np.nan
    path = write_nifti(str(tmp_path / "half_nan.nii.gz"), vol)
    res = process_file(Task(0, path, "h.nii.gz", "nifti", -1),
                       SourceSpec(str(tmp_path), name="h", window="auto", axis="2", stride=1, volumes="first"),
                       IngestOptions(encoding="png"))
    assert res["skip"] is None and len(res["samples"]) == 8
    assert all(np.isfinite(decode(s)).all() for s in res["samples"])


def test_target_size():
    assert target_size(600, 800, 512, "short") == (512, 683)
    assert target_size(600, 800, 512, "long") == (384, 512)
    assert target_size(100, 80, 512, "short") == (100, 80)
    assert target_size(10, 20, 0, "short", aspect=2.0) == (20, 20)


def test_subset_fraction_are_seeded_and_nested(tmp_path):
    from loaders.ingest.synthetic import write_image

    for i in range(20):
        write_image(str(tmp_path / f"src/{i:02d}.png"), np.full((8, 8), i, np.uint8))
    src = [str(tmp_path / "src")]

    def picked(**kw):
        return [t.relpath for t in plan(src, IngestOptions(**kw))[1]]

    small, big = picked(subset=5, seed=1), picked(subset=12, seed=1)
    assert len(small) == 5 and len(big) == 12 and set(small) <= set(big)
    assert small == sorted(small) and small == picked(subset=5, seed=1)
    assert small != picked(subset=5, seed=2)
    assert len(picked(fraction=0.25, seed=0)) == 5
    assert len(picked()) == 20


def test_sources_yaml_labels_and_cli_options(tmp_path):
    from loaders.ingest.synthetic import write_image

    for cls in ("benign", "malignant"):
        for i in range(2):
            write_image(str(tmp_path / f"derm/{cls}/{i}.jpg"), np.full((16, 16, 3), 100, np.uint8))
    write_image(str(tmp_path / "xr/a.png"), np.full((16, 16), 7, np.uint8))
    with open(tmp_path / "labels.csv", "w") as f:
        f.write("path,label\na.png,3\n")
    (tmp_path / "sources.yaml").write_text(
        "defaults: {window: percentile}\n"
        "sources:\n"
        "  - {path: derm, name: isic, modality: DERM, labels: folder}\n"
        f"  - {{path: xr, name: cxr, modality: XR, labels: {tmp_path / 'labels.csv'}}}\n")
    specs, defaults = load_sources_yaml(str(tmp_path / "sources.yaml"))
    assert defaults == {"window": "percentile"} and specs[0].path == str(tmp_path / "derm")
    out = str(tmp_path / "out")
    assert cli_main(["--sources", str(tmp_path / "sources.yaml"), "--out", out, "--workers", "1", "--quiet"]) == 0
    samples = read_shards(out)
    labels = {s["uid"]: s["label"] for s in samples}
    assert labels == {"isic/benign/0.jpg": 0, "isic/benign/1.jpg": 0, "isic/malignant/0.jpg": 1,
                      "isic/malignant/1.jpg": 1, "cxr/a.png": 3}
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["sources"][0]["classes"] == {"benign": 0, "malignant": 1}
    assert manifest["counts"] == {"cxr": {"XR": 1}, "isic": {"DERM": 4}}
    assert manifest["options"]["window"] == "percentile"
    out2 = str(tmp_path / "out2")  # a flag given on the command line beats the YAML's defaults
    assert cli_main(["--sources", str(tmp_path / "sources.yaml"), "--out", out2, "--window", "lung", "--quiet"]) == 0
    assert json.load(open(os.path.join(out2, "manifest.json")))["options"]["window"] == "lung"
    # Bad per-source options are errors that name the valid ones.
    with pytest.raises(ValueError, match="valid"):
        parse_source("path=x,modality=CAT")
    with pytest.raises(ValueError, match="valid"):
        parse_source("path=x,colour=red")
    assert cli_main([str(tmp_path / "xr"), "--out", out, "--quiet"]) == 2  # out holds another ingest


def test_remote_upload_reads_back(tmp_path):
    from loaders.ingest.synthetic import rgb_tissue, write_image

    for i in range(3):
        write_image(str(tmp_path / f"src/{i}.png"), rgb_tissue(30, 40, i))
    remote = str(tmp_path / "remote")  # a local path stands in for s3://...: same uploader code path
    ingest([str(tmp_path / "src")], str(tmp_path / "out"), remote=remote, chunk_size=2, workers=1, progress=False)
    assert os.path.exists(os.path.join(remote, "manifest.json"))
    from streaming import StreamingDataset

    ds = StreamingDataset(remote=remote, local=str(tmp_path / "cache"), batch_size=1, shuffle=False)
    assert [ds[i]["uid"] for i in range(len(ds))] == ["src/0.png", "src/1.png", "src/2.png"]


def test_ingested_shards_feed_the_loader(corpus):
    from loaders import AugmentSpec, build_loader

    _, _, out, samples, _, _ = corpus
    loader = build_loader(out, backend="cpu", batch_size=1, augment=AugmentSpec(size=32), device="cpu",
                          shuffle=False, num_workers=0)
    seen = []
    for batch in loader:
        assert batch.images.shape[1:] == (3, 32, 32) and batch.images.dtype.is_floating_point
        seen += batch.uid
    assert sorted(seen) == sorted(s["uid"] for s in samples)


def test_large_jpeg_draft_decode_and_exif_rotation(tmp_path):
    from loaders.ingest.synthetic import rgb_tissue

    rgb = rgb_tissue(1200, 1600, 9)
    exif = Image.Exif()
    exif[0x0112] = 6  # camera held upright: display rotated by 90 degrees
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95, exif=exif)
    Image.fromarray(rgb).save(tmp_path / "plain.jpg", quality=95)
    spec = SourceSpec(str(tmp_path), name="p", window="auto", axis="auto", stride=1, volumes="first")
    plain = process_file(Task(0, str(tmp_path / "plain.jpg"), "plain.jpg", "raster", -1), spec,
                         IngestOptions(encoding="png"))["samples"][0]
    assert (plain["height"], plain["width"]) == (512, 683) and plain["meta"]["original_shape"] == [1200, 1600]
    full = np.asarray(Image.open(tmp_path / "plain.jpg").resize((683, 512), Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(decode(plain).astype(int) - full).mean() < 2.0  # reduced-scale decode ~ full decode
    rotated = process_file(Task(0, str(tmp_path / "photo.jpg"), "photo.jpg", "raster", -1), spec,
                           IngestOptions(encoding="png"))["samples"][0]
    assert (rotated["height"], rotated["width"]) == (683, 512) and rotated["meta"]["exif_rotated"] is True
