"""bench._dinov2.bench_dinov2 on CPU with a tiny recipe: every variant runs or says why not."""
from __future__ import annotations

from pathlib import Path

import torch

from engine.config import load_config

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_bench_dinov2_tiny_on_cpu():
    from bench._dinov2 import bench_dinov2

    cfg = load_config(RECIPES / "quickstart_dinov2.yaml", [
        "objective.dinov2.dino_prototypes=32", "objective.dinov2.ibot_prototypes=16",
        "objective.dinov2.head_hidden_dim=32", "objective.dinov2.head_bottleneck_dim=16",
        "objective.dinov2.encoder_kwargs={embed_dim: 32, depth: 2, num_heads: 2}",
        "data.multicrop.local_crops=2", "data.multicrop.global_size=16", "data.multicrop.local_size=8",
        "model.img_size=16", "model.patch_size=4",
    ])
    out = bench_dinov2(cfg, steps=2, device=torch.device("cpu"), batch=4, warmup=1, compile_=False)
    assert "CUDA" in out["engine-triton_error"]  # the Triton variant needs a GPU; the others ran
    for v in ("engine-torch", "naive"):
        assert out[f"{v}_img_s"] > 0 and out[f"{v}_step_ms"] > 0, out
    assert out["engine-torch_vs_naive"] > 0 and out["flops_per_image"] > 0
    assert out["engine-torch_compile_mode"] == "eager" and "naive_compile_mode" not in out
    assert out["engine-torch_compile_tuning"] is False  # the recipe asks for it, but nothing was compiled
    # student: 2 x (16 + 5) + 2 x (4 + 5) tokens, teacher 2 x (16 + 5)
    assert out["tokens_per_image"] == 2 * 21 * 2 + 2 * 9


def test_compile_mode_reaches_the_engine_variants():
    """bench train --compile-mode reaches DINOv2's engine variants (it was dropped: a max-autotune run measured torch's
    default mode); the naive variant stays eager."""
    from bench._dinov2 import _variant_config

    base = load_config(RECIPES / "quickstart_dinov2.yaml", [])
    mode = "max-autotune-no-cudagraphs"
    for v in ("engine-triton", "engine-torch"):
        cfg = _variant_config(base, v, True, mode)
        assert (cfg.model.compile, cfg.model.compile_mode) == (True, mode)
        assert _variant_config(base, v, False, mode).model.compile_mode == "auto"  # eager: no mode to pass
    naive = _variant_config(base, "naive", True, mode)
    assert (naive.model.compile, naive.model.compile_mode) == (False, "auto")
