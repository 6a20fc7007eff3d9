"""`python -m bench loaders` runs end to end on a CPU with tiny settings: every requested
backend gets a row (an unavailable one records its error instead of stopping the run),
the PIL baseline and the ratios are there, and the MAE stall section is filled in."""
from __future__ import annotations

import json

import pytest

import bench.common
import bench.loaders


def test_bench_loaders_tiny_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("psutil")
    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    backends = ["nvjpeg", "pil", "dali"]
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        backends.remove("dali")
    rc = bench.loaders.main(["--tiny", "--workers", "1", "--backends", ",".join(backends), "--images", "48",
                             "--stall", "--stall-backends", "pil", "--data-dir", str(tmp_path / "data")])
    assert rc == 0
    (result,) = tmp_path.glob("loaders-*.json")
    out = json.loads(result.read_text())
    rows = {r["backend"]: r for r in out["throughput"]}
    assert set(rows) == set(backends)
    assert "not available" in rows["nvjpeg"]["error"]  # needs CUDA: recorded, the run goes on
    for name in set(backends) - {"nvjpeg"}:
        r = rows[name]
        assert r["img_s"] > 0 and r["images"] >= 8 and r["cpu_cores"] > 0
        assert r["shape"] == [8, 3, 32, 32]
    assert out["shards"]["64"]["rows"] == 48
    if "dali" in rows:
        assert "dali/pil 64px w1" in out["ratios"]
    (stall,) = out["stall"]
    assert stall["backend"] == "pil" and stall["real_img_s"] > 0 and stall["stall"] < 1
    assert out["stall_model"]["synthetic_img_s"] > 0
    assert list(tmp_path.glob("loaders-*.png"))
