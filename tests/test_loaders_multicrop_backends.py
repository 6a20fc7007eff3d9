"""DINOv2 multi-crop from the GPU-decoding backends (nvjpeg's code path on CPU tensors, DALI
CPU-only): the same crops and photometric parameters as the cpu backend, cut from one decoded
image, with the same layout, sample order and skipped samples."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from backend_fixtures import BAD, write_shards  # noqa: E402

from loaders import build_loader  # noqa: E402
from loaders.backends.nvjpeg import NvjpegLoader  # noqa: E402
from loaders.loader import as_stream_specs  # noqa: E402
from loaders.multicrop import MultiCropSpec  # noqa: E402

HAVE_DALI = importlib.util.find_spec("nvidia.dali") is not None
SPEC = MultiCropSpec(global_size=32, local_size=16, global_crops=2, local_crops=3)
BATCH = 8


@pytest.fixture(scope="module")
def epochs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multicrop_shards")
    write_shards(str(root / "mds"))
    out = {}
    for backend in ["cpu", "nvjpeg"] + (["dali"] if HAVE_DALI else []):
        kw = dict(batch_size=BATCH, augment=SPEC, dtype=torch.float32, seed=7, num_workers=1,
                  cache_dir=str(root / f"cache-{backend}"))
        if backend == "nvjpeg":  # CUDA-only as a backend; its code path runs unchanged on CPU tensors
            loader = NvjpegLoader(streams=as_stream_specs(str(root / "mds")), device=torch.device("cpu"),
                                  shuffle=True, num_canonical_nodes=None, **kw)
        else:
            loader = build_loader(str(root / "mds"), backend=backend, device="cpu", **kw)
        batches = list(loader)
        out[backend] = (batches, loader.skipped)
        loader.close()
    return out


def test_layout_order_and_skips_match_the_cpu_backend(epochs):
    ref, ref_skipped = epochs["cpu"]
    assert ref_skipped == len(BAD)
    for backend, (batches, skipped) in epochs.items():
        assert skipped == len(BAD), backend
        assert [b.uid for b in batches] == [b.uid for b in ref], backend
        for b in batches:
            g, loc = b.images
            assert g.shape == (2 * len(b), 3, 32, 32) and loc.shape == (3 * len(b), 3, 16, 16), backend
            assert g.dtype == torch.float32 and torch.isfinite(g).all() and torch.isfinite(loc).all()


@pytest.mark.parametrize("backend", ["nvjpeg", pytest.param("dali", marks=pytest.mark.skipif(
    not HAVE_DALI, reason="nvidia-dali not installed"))])
def test_crops_match_the_cpu_backend(epochs, backend):
    """Same boxes, flips and photometric parameters: only the decoder's and resizer's rounding
    differ. A crop from another window, flip or jitter would differ by far more."""
    ref = epochs["cpu"][0]
    diffs, shuffled = [], []
    for a, b in zip(epochs[backend][0], ref):
        for x, y in zip(a.images, b.images):
            diffs.append((x - y).abs().mean(dim=(1, 2, 3)))
            shuffled.append((x - y.roll(1, dims=0)).abs().mean(dim=(1, 2, 3)))
    diffs, shuffled = torch.cat(diffs), torch.cat(shuffled)
    assert diffs.median() < 0.02 and diffs.max() < 0.15, (diffs.median(), diffs.max())
    assert shuffled.median() > 5 * diffs.median()
