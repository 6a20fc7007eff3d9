"""DINOv2 rows of `python -m bench train`: the engine's training step against the naive one.

Variants, each a full training step (student + EMA teacher, DINO/iBOT/KoLeo losses, fused
AdamW, the EMA update) on the same synthetic multi-crop batch, bf16 autocast on CUDA:
- engine-triton: all crops of the student in one packed pass (varlen Triton attention),
  Triton attention in the teacher, torch.compile unless --no-compile;
- engine-torch: one student pass per crop size, SDPA, torch.compile unless --no-compile;
- naive: what one writes first: one pass per crop size, SDPA, eager (the same objective
  with packing, kernels and compilation off, so the math is identical).
Images/s count source images (each = all its crops); MFU uses the two-pass FLOPs of
`engine.plan.measure_model` (forward + backward of the student, forward of the teacher).
"""
from __future__ import annotations

import copy
from typing import Any

import torch

VARIANTS = ("engine-triton", "engine-torch", "naive")


def _variant_config(base, variant: str, compile_: bool, compile_mode: str = "auto"):
    cfg = copy.deepcopy(base)
    cfg.model.compile_mode = compile_mode if compile_ and variant != "naive" else "auto"
    if variant == "engine-triton":
        cfg.model.kernels, cfg.model.compile, cfg.objective.dinov2.pack_crops = "triton", compile_, True
    elif variant == "engine-torch":
        cfg.model.kernels, cfg.model.compile, cfg.objective.dinov2.pack_crops = "torch", compile_, False
    else:
        cfg.model.kernels, cfg.model.compile, cfg.objective.dinov2.pack_crops = "torch", False, False
    return cfg


def bench_dinov2(recipe_cfg, steps: int = 20, device: torch.device | str | None = None, *, batch: int | None = None,
                 warmup: int = 5, compile_: bool = True, variants=VARIANTS,
                 compile_mode: str = "auto") -> dict[str, Any]:
    """Images/s, step time, MFU and peak memory per variant, and engine / naive ratios.

    recipe_cfg: a loaded dinov2 recipe (engine.config.Config); batch: per-GPU images
    (default: the recipe's micro_batch). Keys: `<variant>_img_s`, `<variant>_step_ms`,
    `<variant>_mfu` (CUDA), `<variant>_peak_mem_gib` and `<variant>_peak_reserved_gib` (CUDA), `<variant>_error` when
    a variant fails (the others still run), `<variant>_compile_mode` (the engine variants' torch.compile mode:
    compile_mode, their model.compile_mode, resolved), `<variant>_compile_tuning` (model.compile_tuning in effect),
    `engine-triton_vs_naive`, `engine-torch_vs_naive`,
    `tokens_per_image` (student + teacher)."""
    from bench.train import peak_flops, release_memory, run_engine
    from engine.plan import measure_model

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if recipe_cfg.objective.name != "dinov2":
        raise ValueError(f"bench_dinov2 needs a dinov2 recipe, got objective {recipe_cfg.objective.name!r}")
    batch = batch or recipe_cfg.train.micro_batch or recipe_cfg.train.batch_size
    base = copy.deepcopy(recipe_cfg)
    base.train.device = device.type if device.index is None else f"{device.type}:{device.index}"
    flops = measure_model(base)["flops"]
    peak = peak_flops() if device.type == "cuda" else None
    mc = base.data.multicrop
    patch = base.model.patch_size or _timm_patch(base.model.name)
    prefix = 1 + int((base.objective.dinov2.encoder_kwargs or {}).get("reg_tokens", 4 if "reg4" in base.model.name
                                                                          else 0))
    glob_tokens = (mc.global_size // patch) ** 2 + prefix
    loc_tokens = (mc.local_size // patch) ** 2 + prefix
    out: dict[str, Any] = {
        "flops_per_image": flops,
        "tokens_per_image": mc.global_crops * glob_tokens * 2 + mc.local_crops * loc_tokens,
        "crops": f"{mc.global_crops}x{mc.global_size} + {mc.local_crops}x{mc.local_size}",
    }
    release_memory(device)  # each variant starts from a released allocator (the loop releases after each)
    for variant in variants:
        try:
            if variant == "engine-triton" and device.type != "cuda":
                raise RuntimeError("Triton kernels need CUDA (the interpreter is for tests)")
            cfg = _variant_config(base, variant, compile_, compile_mode)
            try:
                r = run_engine(cfg, batch, steps, warmup)
            except Exception as e:
                if not cfg.model.compile or isinstance(e, torch.cuda.OutOfMemoryError):
                    raise
                # A compiler failure should not cost the figure: say so and measure it eager.
                out[f"{variant}_compile_error"] = f"{type(e).__name__}: {str(e)[:400]}"
                release_memory(device)
                cfg.model.compile, cfg.model.compile_mode = False, "auto"
                r = run_engine(cfg, batch, steps, warmup)
            out[f"{variant}_compiled"] = cfg.model.compile
            if "compile_mode" in r and variant != "naive":
                out[f"{variant}_compile_mode"] = r["compile_mode"]
                out[f"{variant}_compile_tuning"] = r["compile_tuning"]
            out[f"{variant}_img_s"] = r["img_per_s"]
            out[f"{variant}_step_ms"] = r["step_ms"]
            for key in ("peak_mem_gib", "peak_reserved_gib", "start_reserved_gib"):
                if r.get(key) is not None:
                    out[f"{variant}_{key}"] = r[key]
            if peak:
                out[f"{variant}_mfu"] = r["img_per_s"] * flops / peak
        except Exception as e:  # one failing variant must not hide the others
            out[f"{variant}_error"] = f"{type(e).__name__}: {str(e)[:400]}"
        release_memory(device)
    for variant in ("engine-triton", "engine-torch"):
        if out.get(f"{variant}_img_s") and out.get("naive_img_s"):
            out[f"{variant}_vs_naive"] = out[f"{variant}_img_s"] / out["naive_img_s"]
    return out


def _timm_patch(name: str) -> int:
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0).patch_embed.patch_size[0]
