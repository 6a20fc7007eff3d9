"""`python -m bench kernels`: our Triton kernels against what users would otherwise run.

Attention (bf16, TFLOP/s with fwd = 4*B*H*N^2*D and fwd+bwd = 3.5x that): kernels.attention
vs every SDPA backend that runs (flash, efficient, cuDNN, math for short N) and xformers when
installed, at ViT shapes; ratio vs the best SDPA backend. Error: max relative error
(||x - ref|| / ||ref||) of out, dq, dk, dv vs an fp32 reference on the same bf16 inputs.

DINOv2's packed crops (PACKED_SHAPES; left out of --tune runs): our grouped launches and our varlen launch vs every
SDPA backend on each crop size as a dense batch; ms and TFLOP/s fwd+bwd, ratio vs the best backend per crop size.

The patch embedding (PATCH_SHAPES, --only patch-embed): engine.models.PatchMatmul (one matrix product over the
patches) vs the convolution under cuDNN's heuristics and under cudnn.benchmark, fwd+bwd, TFLOP/s.

DINOv2's iBOT cross-entropy (SOFT_CE_SHAPES, in the MAE table as "soft_ce <shape>"): kernels.soft_cross_entropy vs
the torch form, GB/s of the bytes the fused kernels move; and "sinkhorn+ce <shape>": Sinkhorn-Knopp's targets and the
cross-entropy together, the targets kept as factors (triton), written out by torch into our kernels (triton-dense),
all torch (torch); "softmax+ce <shape>" the same with DINO's softmax centering (kernels.softmax_targets).
"dino-ce <shape>" (DINO_CE_SHAPES): DINO's class-token loss, fwd+bwd, the same three plans with
kernels.crop_cross_entropy over every pair of crops against the objective's torch dino_loss.

MAE masking and loss (GB/s of the bytes each op must move, fwd+bwd) vs the torch reference
(argsort + gather + add; cat + gather + add; patchify + mean/var + MSE), and the card's
device-to-device copy bandwidth measured in the same run.

MAE rows: fwd+bwd ms (graphed), the forward alone (fwd_ms) and the rest (bwd_ms); of_copy_bw vs the
1 GiB copy, of_same_size_copy vs one copy moving the op's own byte count; the masking ops
both with a learnable pos_embed and with MAE's fixed sin-cos one ("fixed-pos", what the engine runs).

Options: --quick (fewer shapes), --tune (sweep the attention block configs and print the best; --tune-regs,
--tune-ws, --tune-split, --tune-tma, --tune-tail-groups, --tune-tail-split, --tune-lean, --tune-blocks,
--tune-tail-step, --tune-occupancy: the current configs under register caps, warp specialization, a split head dim,
TMA loads, tail groups, split grouped tails, the forward's lean softmax, neighbouring blocks, the tail tiles loaded
or taken before the loop, shallower pipelines under caps for one more program per SM),
--shapes a,b (attention shape names), --only mae|attention|packed|soft-ce|patch-embed (one part; --skip-mae = --only
attention), --mae-variants (also the kernels' alternative paths), --tag (result file suffix).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import torch

from bench.common import bar_plot, card_name, cuda_time_ms, print_table, write_result

# name: (B, H, N, D) -- the workloads of issue 5
ATTN_SHAPES = {
    "mae-l-enc-n50-d64": (512, 16, 50, 64),
    "vit-l-n197-d64": (128, 16, 197, 64),
    "mae-l-dec-n197-d32": (256, 16, 197, 32),  # the MAE ViT-L decoder: 512 wide, 16 heads of 32, every patch + cls
    "dinov2-g-n261-d64": (128, 24, 261, 64),
    "dinov2-l-n257-d64": (128, 16, 257, 64),  # DINOv2 ViT-L/14 at 224 px: 256 patches + cls (1 row past 4 x 64)
    "vit-g-n257-d88": (96, 16, 257, 88),
    "vit-h-n257-d80": (128, 16, 257, 80),  # ViT-H/14 (the paper's largest MAE): head dim 80
    "mae-g-enc-n65-d88": (256, 16, 65, 88),  # the MAE ViT-g/14 encoder: 64 kept patches + the class token
    "dinov2-g518-n1374-d64": (8, 24, 1374, 64),
    "ref-n4096-d128": (4, 16, 4096, 128),
}
QUICK = ["mae-l-enc-n50-d64", "vit-l-n197-d64", "vit-g-n257-d88"]
# DINOv2's student pass with its crops packed end to end (name: (samples, heads, head dim), the recipes' per-GPU
# batches): a sample is PACKED_CROPS, (crops, tokens) per crop size: 2 global crops of 261 tokens and 8 local crops of
# 54 (timm's reg4 ViTs at 224 / 98 px: patches + class token + 4 registers). ViT-B's (128, 12) has ViT-S's B x H
PACKED_SHAPES = {"dinov2-s-crops": (256, 6, 64), "dinov2-l-crops": (32, 16, 64), "dinov2-g-crops": (32, 24, 64)}
PACKED_CROPS = ((2, 261), (8, 54))
PACKED_QUICK = ["dinov2-l-crops"]
# DINOv2's iBOT cross-entropy (kernels.soft_cross_entropy): (masked patches, prototypes) -- ViT-S at batch 256
# (512 global crops x 256 patches, half the crops masked at 10-50 %: ~20k) and ViT-L / g at batch 32
SOFT_CE_SHAPES = {"ibot-b256": (20000, 65536), "ibot-b32": (2500, 65536)}
# DINO's class-token cross-entropy over crop pairs: (global crops G, all crops V, images B, prototypes K) -- DINOv2
# ViT-S at batch 256 and ViT-L at batch 32, 2 global + 8 local crops
DINO_CE_SHAPES = {"dino-b256": (2, 10, 256, 65536), "dino-b32": (2, 10, 32, 65536)}
# ViTs' patch embedding (engine.models.PatchMatmul vs the convolution): (images, image size, patch, dim) -- DINOv2
# ViT-S at batch 256 (the student's and teacher's 512 global crops, the student's 2,048 local crops), MAE ViT-B / ViT-L
PATCH_SHAPES = {"dinov2-s-global": (512, 224, 14, 384), "dinov2-s-local": (2048, 98, 14, 384),
                "mae-b": (512, 224, 16, 768), "mae-l": (256, 224, 16, 1024)}
DEV = "cuda"  # a CPU smoke test of this script (TRITON_INTERPRET=1) sets "cpu"


def graph_ms(fn):
    """GPU time of fn (median ms) from CUDA-graph replays: no Python launch overhead in the figure."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    t = cuda_time_ms(g.replay)
    del g
    return t


def time_ms(fn):
    """(eager ms, graphed ms); graphed falls back to eager when the op cannot be captured."""
    eager = cuda_time_ms(fn)
    try:
        graphed = graph_ms(fn)
    except Exception as e:
        print(f"  (no CUDA graph: {type(e).__name__}: {str(e).splitlines()[0][:80]})", file=sys.stderr)
        graphed = eager
    return eager, graphed


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return {k: getattr(SDPBackend, v) for k, v in names.items() if hasattr(SDPBackend, v)}


def attention_candidates(N):
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    import kernels

    cands = {"triton": lambda q, k, v: kernels.attention(q, k, v, impl="triton")}
    for name, backend in sdpa_backends().items():
        if name == "math" and N > 512:
            continue

        def f(q, k, v, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        cands[f"sdpa-{name}"] = f
    try:
        import xformers.ops  # noqa: F401

        cands["xformers"] = lambda q, k, v: kernels.attention(q, k, v, impl="xformers")
    except Exception:
        pass
    return cands


def bench_attention(names, rows, errors):
    import kernels

    for name in names:
        B, H, N, D = ATTN_SHAPES[name]
        g = torch.Generator(device=DEV).manual_seed(0)
        q, k, v = (torch.randn(B, H, N, D, device=DEV, dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3))
        do = torch.randn(B, H, N, D, device=DEV, dtype=torch.bfloat16, generator=g)
        # numerics: bf16 kernel vs fp32 reference on the same inputs (a slice of the batch)
        bs = max(1, min(B, (1 << 27) // (H * N * N * 4)))
        qs, ks, vs = (x[:bs].detach().requires_grad_() for x in (q, k, v))
        out = kernels.attention(qs, ks, vs, impl="triton")
        got = (out, *torch.autograd.grad(out, (qs, ks, vs), do[:bs]))
        qf, kf, vf = (x.detach().float().requires_grad_() for x in (qs, ks, vs))
        ref = kernels.attention_reference(qf, kf, vf)
        want = (ref, *torch.autograd.grad(ref, (qf, kf, vf), do[:bs].float()))
        err = {n: _rel(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
        sd = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs)
        err_sdpa = {"out": _rel(sd, ref), **{n: _rel(a, b) for n, a, b in zip(
            ("dq", "dk", "dv"), torch.autograd.grad(sd, (qs, ks, vs), do[:bs]), want[1:])}}
        errors[name] = {"triton": err, "sdpa-default": err_sdpa, "batch": bs}
        del got, want, ref, out, sd

        flops_f = kernels.attention_flops(B * H * N * N, D, backward=False)
        flops_fb = kernels.attention_flops(B * H * N * N, D, backward=True)
        row = {"shape": name, "B": B, "H": H, "N": N, "D": D}
        for cname, fn in attention_candidates(N).items():
            try:
                fn(q, k, v)
                e_f, t_f = time_ms(lambda: fn(q, k, v))
                e_fb, t_fb = time_ms(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do))
            except Exception as e:  # a backend that does not take this shape
                print(f"  {name} {cname}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", file=sys.stderr)
                continue
            row[f"{cname}_fwd_tflops"] = flops_f / t_f / 1e9
            row[f"{cname}_fwdbwd_tflops"] = flops_fb / t_fb / 1e9
            row[f"{cname}_fwdbwd_ms"] = t_fb
            row[f"{cname}_eager_fwdbwd_tflops"] = flops_fb / e_fb / 1e9
        sd_fb = [v for kk, v in row.items() if kk.startswith("sdpa-") and kk.endswith("_fwdbwd_tflops")
                 and "_eager" not in kk]
        sd_e = [v for kk, v in row.items() if kk.startswith("sdpa-") and kk.endswith("_eager_fwdbwd_tflops")]
        sd_f = [v for kk, v in row.items() if kk.startswith("sdpa-") and kk.endswith("_fwd_tflops")]
        best = max(sd_fb) if sd_fb else float("nan")
        row["best_sdpa_fwdbwd_tflops"] = best
        row["best_sdpa_backend"] = next((kk[5:-14] for kk, v in row.items()
                                         if kk.endswith("_fwdbwd_tflops") and kk.startswith("sdpa-") and v == best
                                         and "_eager" not in kk), "")
        row["ratio_fwdbwd"] = row.get("triton_fwdbwd_tflops", float("nan")) / best
        row["ratio_eager_fwdbwd"] = row.get("triton_eager_fwdbwd_tflops", float("nan")) / max(sd_e or [float("nan")])
        row["ratio_fwd"] = row.get("triton_fwd_tflops", float("nan")) / (max(sd_f) if sd_f else float("nan"))
        row["max_rel_err"] = max(err.values())
        rows.append(row)
        print(f"  {name}: triton {row.get('triton_fwdbwd_tflops', 0):.0f} vs best sdpa ({row['best_sdpa_backend']}) "
              f"{best:.0f} TFLOP/s fwd+bwd -> x{row['ratio_fwdbwd']:.2f}; err {row['max_rel_err']:.1e}",
              file=sys.stderr)
        del q, k, v, do
        torch.cuda.empty_cache()


def bench_packed(names, rows, errors, crops=PACKED_CROPS, dtype=torch.bfloat16):
    """DINOv2's packed crops, fwd+bwd: ours one dense launch per crop size (`attention_qkv(seq_groups=...)`, the
    engine's DINOv2 path), ours one varlen launch over cu_seqlens (programs shaped for the longest crop), and every
    SDPA backend on each crop size as its own dense batch (what a trainer without packing runs: the best backend per
    crop size, summed). Error: the grouped op's out and dqkv vs the fp32 reference on one sample's crops."""
    import itertools

    import kernels

    for name in names:
        B, H, D = PACKED_SHAPES[name]
        groups = [(c * B, n) for c, n in crops]
        lens = [n for c, n in groups for _ in range(c)]
        T = sum(lens)
        cu = torch.tensor([0, *itertools.accumulate(lens)], device=DEV, dtype=torch.int32)
        gen = torch.Generator(device=DEV).manual_seed(0)
        randn = lambda *shape: torch.randn(*shape, device=DEV, dtype=dtype, generator=gen)

        one = list(crops)  # numerics: one sample's crops against the fp32 reference
        small = randn(sum(c * n for c, n in one), 3, H, D).requires_grad_()
        dsmall = randn(small.shape[0], H, D)
        out = kernels.attention_qkv(small, seq_groups=one, impl="triton")
        got = (out, *torch.autograd.grad(out, small, dsmall))
        ref32 = small.detach().float().requires_grad_()
        ref = kernels.attention_qkv(ref32, seq_groups=one, impl="torch")
        want = (ref, *torch.autograd.grad(ref, ref32, dsmall.float()))
        errors[name] = {"grouped": {n: _rel(a, b) for n, a, b in zip(("out", "dqkv"), got, want)}}

        qkv, do = randn(T, 3, H, D).requires_grad_(), randn(T, H, D)
        row = {"shape": name, "samples": B, "H": H, "D": D, "tokens": T,
               "crops": " + ".join(f"{c}x{n}" for c, n in crops)}

        def grouped():
            return kernels.attention_qkv(qkv, seq_groups=groups, impl="triton")

        def varlen():
            q, k, v = qkv.unbind(1)
            return kernels.attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lens), impl="triton")

        for cname, fn in (("grouped", grouped), ("varlen", varlen)):
            row[f"{cname}_eager_ms"], row[f"{cname}_ms"] = time_ms(_fwdbwd(fn, (qkv,), do))
            with torch.no_grad():
                row[f"{cname}_fwd_ms"] = time_ms(fn)[1]
        del qkv, do
        best = 0.0
        for c, n in groups:  # SDPA: each crop size a dense [c, H, n, D] batch of its own
            q, k, v = (randn(c, H, n, D).requires_grad_() for _ in range(3))
            dg = randn(c, H, n, D)
            times = {}
            for cname, fn in attention_candidates(n).items():
                if not cname.startswith("sdpa-") or cname == "sdpa-math":
                    continue
                try:
                    times[cname] = time_ms(_fwdbwd(lambda: fn(q, k, v), (q, k, v), dg))[1]
                except Exception as e:  # a backend that does not take this shape
                    print(f"  {name} {cname} N={n}: {type(e).__name__}: {str(e).splitlines()[0][:100]}",
                          file=sys.stderr)
                    continue
                row[f"{cname}_n{n}_ms"] = times[cname]
            best += min(times.values()) if times else float("nan")
            del q, k, v, dg
        f = kernels.attention_flops(sum(c * H * n * n for c, n in groups), D)
        row["best_sdpa_ms"] = best
        row["grouped_tflops"] = f / row["grouped_ms"] / 1e9
        row["varlen_tflops"] = f / row["varlen_ms"] / 1e9
        row["best_sdpa_tflops"] = f / best / 1e9
        row["ratio_vs_best_sdpa"] = best / row["grouped_ms"]
        row["grouped_vs_varlen"] = row["varlen_ms"] / row["grouped_ms"]
        row["max_rel_err"] = max(errors[name]["grouped"].values())
        rows.append(row)
        print(f"  {name}: grouped {row['grouped_ms']:.3f} ms, varlen {row['varlen_ms']:.3f}, best SDPA per crop size "
              f"{best:.3f} -> x{row['ratio_vs_best_sdpa']:.2f}; err {row['max_rel_err']:.1e}", file=sys.stderr)
        if DEV == "cuda":
            torch.cuda.empty_cache()


def bench_soft_ce(names, rows, errors, shapes=None, dtype=torch.bfloat16):
    """iBOT's cross-entropy against soft targets, fwd+bwd: kernels.soft_cross_entropy's kernels vs the torch form
    (-(targets * log_softmax(scores.float() / temp)).sum(-1), what the objective runs without fused_ce); GB/s of the
    bytes the fused kernels must move (scores and targets read forward, both read and d scores written backward)."""
    import kernels

    shapes = shapes or SOFT_CE_SHAPES
    for name in names:
        M, K = shapes[name]
        gen = torch.Generator(device=DEV).manual_seed(0)
        scores = (torch.randn(M, K, device=DEV, generator=gen) * 2).to(dtype).requires_grad_()
        targets = torch.softmax(torch.randn(M, K, device=DEV, generator=gen) * 4, -1)
        g = torch.randn(M, device=DEV, generator=gen)
        bs = max(1, min(M, 256))  # numerics: a slice (a leaf of its own: no [M, K] gradient) against fp32
        head = scores[:bs].detach().requires_grad_()
        got = kernels.soft_cross_entropy(head, targets[:bs], 0.1, impl="triton")
        ref32 = head.detach().float().requires_grad_()
        want = kernels.soft_cross_entropy_reference(ref32, targets[:bs], 0.1)
        errors[name] = {"ce": _rel(got, want), "dscores": _rel(torch.autograd.grad((got * g[:bs]).sum(), head)[0],
                                                               torch.autograd.grad((want * g[:bs]).sum(), ref32)[0])}
        moved = M * K * (scores.element_size() + 4) * 2 + M * K * scores.element_size()
        for impl in ("triton", "torch"):
            def run(impl=impl):
                ce = kernels.soft_cross_entropy(scores, targets, 0.1, impl=impl)
                return torch.autograd.grad(ce, scores, g)
            e, t = time_ms(run)
            with torch.no_grad():
                f = time_ms(lambda impl=impl: kernels.soft_cross_entropy(scores, targets, 0.1, impl=impl))[1]
            rows.append({"op": f"soft_ce {name}", "impl": impl, "shape": f"{M}x{K}", "ms": t, "eager_ms": e,
                         "fwd_ms": f, "bwd_ms": t - f, "GB/s": moved / t / 1e6,
                         "max_rel_err": max(errors[name].values())})
        del scores, targets, g
        if DEV == "cuda":
            torch.cuda.empty_cache()
        bench_sinkhorn_ce(name, M, K, rows, errors, dtype)
        bench_sinkhorn_ce(name, M, K, rows, errors, dtype, centering="softmax")


def _plan_rows(op, shape, plans, run, moved, rows, errors, value="ce"):
    """Rows of one op timed under several plans (the Sinkhorn + cross-entropy benches): errors[op] from the "triton"
    plan's (value, d scores) against the "torch" plan's, taken with TF32 off (the torch forms' products in full fp32),
    then every plan timed fwd+bwd, GB/s of the `moved` bytes."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        (v_ours, d_ours), (v_torch, d_torch) = run("triton"), run("torch")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    errors[op] = err = {value: _rel(v_ours, v_torch), "dscores": _rel(d_ours, d_torch)}
    del v_ours, d_ours, v_torch, d_torch
    for plan in plans:
        e, t = time_ms(lambda plan=plan: run(plan))
        rows.append({"op": op, "impl": plan, "shape": shape, "ms": t, "eager_ms": e, "GB/s": moved / t / 1e6,
                     "max_rel_err": max(err.values())})


def bench_sinkhorn_ce(name, M, K, rows, errors, dtype=torch.bfloat16, iters=3, centering="sinkhorn"):
    """iBOT's targets and cross-entropy together, fwd+bwd, as the objective runs them: Sinkhorn-Knopp (3 alternations)
    on the teacher's scores, or with centering="softmax" DINO's softmax about a running center ("softmax+ce" rows),
    then the cross-entropy of the student's against them. torch: both in torch (the objective with SDPA/torch);
    triton-dense: torch's targets written out, our cross-entropy kernels (fused_ce before the factored targets);
    triton: kernels.sinkhorn_knopp / softmax_targets (factored=True) into our cross-entropy, the targets never written.
    GB/s of the bytes the last must move (the teacher's scores read 9 times under Sinkhorn: max, 6 passes, forward,
    backward; 4 under softmax: min/max, the row sums, forward, backward; the student's read twice and d scores
    written)."""
    import kernels
    from engine.objectives.dinov2 import softmax_center

    gen = torch.Generator(device=DEV).manual_seed(1)
    scores = (torch.randn(M, K, device=DEV, generator=gen) * 2).to(dtype).requires_grad_()
    teacher = (torch.randn(M, K, device=DEV, generator=gen) * 0.3).to(dtype)  # cosine scores of a normalized head
    center = torch.randn(1, K, device=DEV, generator=gen) * 0.05  # a running mean of such scores
    temp = torch.tensor(0.07, device=DEV)  # a device tensor, as the objective's scheduled temperature
    g = torch.randn(M, device=DEV, generator=gen)
    plans = {"triton": ("triton", True, "triton"), "triton-dense": ("torch", False, "triton"),
             "torch": ("torch", False, "torch")}

    def run(plan):  # (ce, d scores)
        impl, factored, ce_impl = plans[plan]
        if centering == "sinkhorn":
            t = kernels.sinkhorn_knopp(teacher, temp, iters, factored=factored, impl=impl)
        elif factored:
            t = kernels.softmax_targets(teacher, center, temp, factored=True, impl=impl)
        else:  # the objective's torch form
            t = softmax_center(teacher, center, temp)
        ce = kernels.soft_cross_entropy(scores, t, 0.1, impl=ce_impl)
        return ce.detach(), torch.autograd.grad(ce, scores, g)[0]

    moved = M * K * ((9 if centering == "sinkhorn" else 4) * teacher.element_size() + 3 * scores.element_size())
    _plan_rows(f"{centering}+ce {name}", f"{M}x{K}", plans, run, moved, rows, errors)
    del scores, teacher, g
    if DEV == "cuda":
        torch.cuda.empty_cache()


def bench_dino_ce(names, rows, errors, shapes=None, dtype=torch.bfloat16, iters=3):
    """DINO's class-token loss, fwd+bwd, as the objective runs it: Sinkhorn-Knopp (3 alternations) on the teacher's
    [G * B, K] scores, then the cross-entropy of each of the student's V crops against the other crops' targets,
    averaged over the pairs of different crops. torch: the objective's torch form (engine's dino_loss: fp32 copy,
    log_softmax, an einsum); triton-dense: torch's targets written out, kernels.crop_cross_entropy; triton: Sinkhorn's
    factored targets into kernels.crop_cross_entropy. GB/s of the bytes the last must move (the teacher's scores read 9
    times: max, 6 passes, forward, backward; the student's read twice and d scores written)."""
    import kernels
    from engine.objectives.dinov2 import dino_loss

    shapes = shapes or DINO_CE_SHAPES
    for name in names:
        G, V, B, K = shapes[name]
        gen = torch.Generator(device=DEV).manual_seed(2)
        scores = (torch.randn(V, B, K, device=DEV, generator=gen) * 0.3).to(dtype).requires_grad_()
        teacher = (torch.randn(G * B, K, device=DEV, generator=gen) * 0.3).to(dtype)
        temp = torch.tensor(0.07, device=DEV)
        different = ~torch.eye(G, V, dtype=torch.bool, device=DEV)
        plans = {"triton": ("triton", True), "triton-dense": ("torch", False), "torch": ("torch", False)}

        def run(plan):  # (loss, d scores)
            sk_impl, factored = plans[plan]
            t = kernels.sinkhorn_knopp(teacher, temp, iters, factored=factored, impl=sk_impl)
            if plan == "torch":
                loss = dino_loss(scores, t.view(G, B, K), 0.1)
            else:
                ce = kernels.crop_cross_entropy(scores, t if factored else t.view(G, B, K), 0.1, impl="triton")
                loss = (ce.mean(-1) * different).sum() / different.sum()
            return loss.detach(), torch.autograd.grad(loss, scores)[0]

        moved = V * B * K * 3 * scores.element_size() + G * B * K * 9 * teacher.element_size()
        _plan_rows(f"dino-ce {name}", f"{G}x{V}x{B}x{K}", plans, run, moved, rows, errors, value="loss")
        del scores, teacher
        if DEV == "cuda":
            torch.cuda.empty_cache()


def mae_plot_series(rows) -> tuple[list[str], dict[str, list[float]]]:
    """The masking / loss / cross-entropy plot's bars: (ops, GB/s per implementation), every implementation the rows
    hold in the order first timed (triton-dense and the --mae-variants too); 0 where an op has no such row."""
    ops = sorted({r["op"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    return ops, {impl: [next((r["GB/s"] for r in rows if r["op"] == op and r["impl"] == impl), 0.0) for op in ops]
                 for impl in impls}


def bench_patch_embed(names, rows, errors, shapes=None):
    """The patch embedding, forward + backward to its weight and bias (images take no gradient), under bf16 autocast
    on fp32 images as the engine runs it: the convolution with cuDNN's heuristics (torch's default), with
    torch.backends.cudnn.benchmark (what a user might turn on), and PatchMatmul (one matrix product over the patches).
    TFLOP/s of the product's 2 x 3 x patches x (C p q) x dim (forward, weight and bias gradients); error of the bf16
    outputs and weight gradients against the fp32 convolution."""
    from torch import nn

    from engine.models import matmul_patch_embed

    shapes = shapes or PATCH_SHAPES
    bench_flag = torch.backends.cudnn.benchmark
    for name in names:
        n, size, p, dim = shapes[name]
        gen = torch.Generator(device=DEV).manual_seed(0)
        torch.manual_seed(0)
        conv = nn.Conv2d(3, dim, p, stride=p).to(DEV)
        mm = nn.Conv2d(3, dim, p, stride=p).to(DEV)
        mm.load_state_dict(conv.state_dict())
        matmul_patch_embed(mm)
        x = torch.randn(n, 3, size, size, device=DEV, generator=gen)
        g = torch.randn(n, dim, size // p, size // p, device=DEV, generator=gen)
        amp = DEV == "cuda"

        def run(m):
            with torch.autocast(DEV, dtype=torch.bfloat16, enabled=amp):
                y = m(x)
            return torch.autograd.grad(y, (m.weight, m.bias), g.to(y.dtype))

        k = min(n, 16)  # numerics on a slice, against the fp32 convolution
        with torch.autocast(DEV, dtype=torch.bfloat16, enabled=amp):
            got = mm(x[:k])
        want = conv(x[:k])
        dgot = torch.autograd.grad(got, mm.weight, g[:k].to(got.dtype))[0]
        dwant = torch.autograd.grad(want, conv.weight, g[:k])[0]
        errors[f"patch_embed {name}"] = err = {"out": _rel(got.float(), want), "dweight": _rel(dgot, dwant)}
        flops = 2 * 3 * n * (size // p) ** 2 * 3 * p * p * dim
        for impl, module, cudnn_bench in (("conv", conv, False), ("conv-benchmark", conv, True), ("matmul", mm, False)):
            torch.backends.cudnn.benchmark = cudnn_bench
            try:
                run(module)  # cudnn.benchmark picks its algorithm here, before any capture
                e, t = time_ms(lambda module=module: run(module))
            finally:
                torch.backends.cudnn.benchmark = bench_flag
            rows.append({"op": f"patch_embed {name}", "impl": impl, "shape": f"{n}x3x{size}x{size}/p{p}->{dim}",
                         "ms": t, "eager_ms": e, "tflops": flops / t / 1e9, "max_rel_err": max(err.values())})
        best_conv = min(r["ms"] for r in rows if r["op"] == f"patch_embed {name}" and r["impl"] != "matmul")
        for r in rows:
            if r["op"] == f"patch_embed {name}":
                r["speedup_vs_best_conv"] = best_conv / r["ms"]
        del x, g
        if DEV == "cuda":
            torch.cuda.empty_cache()


def copy_bandwidth(nbytes: int = 1 << 30):
    """GB/s (read + write) of a device-to-device copy of `nbytes` (default 1 GiB: the card's figure;
    at an op's own byte count: what a plain copy of that size reaches, ramp-up and tail included)."""
    x = torch.empty(max(1, int(nbytes)), device=DEV, dtype=torch.uint8)
    y = torch.empty_like(x)
    t = cuda_time_ms(lambda: y.copy_(x))  # eager: a memcpy node in a CUDA graph runs ~35 % slower here
    return 2 * x.numel() / t / 1e6


def _fwdbwd(fn, inputs, grad):
    def run():
        out = fn()
        return torch.autograd.grad(out, inputs, grad, allow_unused=True)
    return run


def _mae_row(rows, op, impl, shape, bytes_, fwdbwd, fwd):
    """Times one op fwd+bwd (eager and graphed) and its forward alone (graphed)."""
    e, t = time_ms(fwdbwd)
    f = time_ms(fwd)[1]
    rows.append({"op": op, "impl": impl, "shape": shape, "ms": t, "eager_ms": e, "fwd_ms": f, "bwd_ms": t - f,
                 "GB/s": bytes_ / t / 1e6})


# --mae-variants: (module, LAUNCH key or module attribute, value) set for one timing each
# ("pdl", "ENABLED", False): the same kernels launched without programmatic dependent launch
NO_PDL = ("pdl", "ENABLED", False)
NO_UNMASK_EVICT = ("masking", "UNMASK_EVICT", False)  # the unmask's loads without L2 eviction hints
MASK_VARIANTS = [NO_PDL] + [("masking", "gather", v) for v in [(2, 4), (8, 8)]] + \
    [("masking", "WALK_PROGRAMS", v) for v in (256, 1024)] + [("masking", "RANK_BY", "count")] + \
    [("masking", "rank_sort", v) for v in (1, 2, 8)] + \
    [("masking", "GATHER_WALK_PDL", False), ("masking", "MASK_EVICT", True)]
# the unmask's alternatives measured on the H200 and dropped from the code (kernels/masking.py says which) ran as
# variants here; what stays: the forward's loads in the old order, 256 / 1,024 walk programs, and other shapes of the
# mask-token sum after the walk (SUM_MT_VARIANTS, partial rows x columns a program: 128 x 32 takes three dependent
# steps at MAE-L, 256 x 16 two, 512 x 8 one with twice the programs)
SUM_MT_VARIANTS = [("masking", "sum_mt", v) for v in [(128, 32), (512, 8), (256, 16)]]
UNMASK_VARIANTS = [NO_PDL, ("masking", "UNMASK_HOIST", False)] + \
    [("masking", "WALK_PROGRAMS", v) for v in (256, 1024)] + \
    SUM_MT_VARIANTS + [NO_UNMASK_EVICT, ("masking", "UNMASK_NATIVE_ADD", False)]
# the learnable-pos unmask backward's walk launched with PDL (the default launches that one plainly)
WALK_PDL = ("masking", "UNMASK_WALK_PDL", True)
WALK_PDL_VARIANTS = [WALK_PDL]
# and with a fixed pos_embed (the default launches that one with PDL)
FIXED_WALK_PDL_VARIANTS = [("masking", "UNMASK_FIXED_WALK_PDL", False)]
# the learnable-pos walk in one wave of 490 programs (5 batch chunks at MAE-L): at 8 samples a step (106 registers:
# 4 programs per SM) with and without PDL, and at its default 4 with PDL
ONE_WAVE, STEP8 = ("masking", "WALK_PROGRAMS", 490), ("masking", "unmask_walk", (8, 8))
LEARNABLE_WALK_VARIANTS = [(STEP8, ONE_WAVE), (STEP8, ONE_WAVE, WALK_PDL), (ONE_WAVE, WALK_PDL)]
# with the mask: the mask ignored (the ids compared, as "triton:ids"), and other launch shapes of the split forward
UNMASK_SPLIT_VARIANTS = [("masking", "UNMASK_SPLIT", False)] + \
    [("masking", "unmask_split", v) for v in [(8, 8, 4), (16, 16, 4)]]
LOSS_VARIANTS = [NO_PDL, ("loss", "PATCHES_PER_PROGRAM", 2), ("loss", "NUM_WARPS", 8)]


class _setting:
    """Temporarily another value of a kernels.masking LAUNCH entry or a module constant (bench variants)."""

    def __init__(self, module, key, value):
        import importlib

        self.mod = importlib.import_module(f"kernels.{module}")
        self.key, self.value = key, value
        self.table = self.mod.LAUNCH if key in getattr(self.mod, "LAUNCH", {}) else None

    def __enter__(self):
        if self.table is not None:
            self.old = self.table[self.key]
            self.table[self.key] = self.value
        else:
            self.old = getattr(self.mod, self.key)
            setattr(self.mod, self.key, self.value)

    def __exit__(self, *exc):
        if self.table is not None:
            self.table[self.key] = self.old
        else:
            setattr(self.mod, self.key, self.old)
        return False


def _setting_name(key, value):
    v = "x".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return f"{key}={v}"


def _variant_rows(rows, op, shape, moved, variants, make):
    """One row per variant: a (module, key, value) setting or a tuple of them (all set at once); make() ->
    (fwd+bwd fn, fwd fn) built inside the settings."""
    import contextlib

    for variant in variants:
        combo = variant if isinstance(variant[0], tuple) else (variant,)
        with contextlib.ExitStack() as stack:
            for module, key, value in combo:
                stack.enter_context(_setting(module, key, value))
            fwdbwd, fwd = make()
            name = "triton:" + ",".join(_setting_name(k, v) for _, k, v in combo)
            _mae_row(rows, op, name, shape, moved, fwdbwd, fwd)


def bench_mae(rows, errors, B=256, variants=(), suffix=""):
    """MAE ViT-L shapes. The masking ops twice: with a learnable pos_embed (its gradient is a sum
    over the batch) and with MAE's fixed sin-cos one (no pos gradient: what the engine runs).
    variants: the ops ("mask", "unmask", "loss") also timed under the settings in MASK_VARIANTS, UNMASK_VARIANTS
    and LOSS_VARIANTS (impl "triton:<setting>=<value>[,<setting>=<value>]").
    suffix: appended to every op name and error key (" B512" for a second batch size in one run)."""
    import kernels

    mask_op, unmask_op, loss_op = "mae_mask" + suffix, "mae_unmask" + suffix, "mae_loss" + suffix
    mask_fixed, unmask_fixed = "mae_mask fixed-pos" + suffix, "mae_unmask fixed-pos" + suffix
    dt = torch.bfloat16
    N, C, Cd, p = 196, 1024, 512, 16
    ratio = 0.75
    K = int(N * (1 - ratio))
    dev = DEV
    # --- encoder side: mask + gather + pos
    tokens = torch.randn(B, N, C, device=dev, dtype=dt, requires_grad=True)
    pos = torch.randn(1, N, C, device=dev, dtype=dt, requires_grad=True)
    noise = torch.rand(B, N, device=dev)
    gvis = torch.randn(B, K, C, device=dev, dtype=dt)
    a = kernels.mae_mask(tokens, pos, ratio, noise=noise, impl="triton")
    r = kernels.mae_mask(tokens, pos, ratio, noise=noise, impl="torch")
    ga = torch.autograd.grad(a[0], (tokens, pos), gvis)
    gr = torch.autograd.grad(r[0], (tokens, pos), gvis)
    errors[mask_op] = {"ids_equal": bool(torch.equal(a[1], r[1])), "vis": _rel(a[0], r[0]),
                       "dtokens": _rel(ga[0], gr[0]), "dpos": _rel(ga[1], gr[1])}
    ids, mask = a[1].clone(), a[2].clone()
    del a, r, ga, gr  # no live autograd graph on the leaves while timing (CUDA-graph capture)
    fixed_pos = pos.detach()
    moved = 2 * B * K * C * 2 + B * N * 4 + B * N * C * 2 + B * K * C * 2  # read + write, fwd and bwd
    shape = f"B{B} N{N} C{C} keep{K}"
    for op, pe, inputs, extra in ((mask_op, pos, (tokens, pos), N * C * 2 * 2),
                                  (mask_fixed, fixed_pos, (tokens,), 0)):
        for impl in ("triton", "torch"):
            def fwd(impl=impl, pe=pe):
                return kernels.mae_mask(tokens, pe, ratio, noise=noise, impl=impl)[0]
            _mae_row(rows, op, impl, shape, moved + extra, _fwdbwd(fwd, inputs, gvis), fwd)
    if "mask" in variants:
        for op, pe, inputs, extra in ((mask_op, pos, (tokens, pos), N * C * 2 * 2),
                                      (mask_fixed, fixed_pos, (tokens,), 0)):
            def make(pe=pe, inputs=inputs):
                def fwd():
                    return kernels.mae_mask(tokens, pe, ratio, noise=noise, impl="triton")[0]
                return _fwdbwd(fwd, inputs, gvis), fwd
            _variant_rows(rows, op, shape, moved + extra, MASK_VARIANTS, make)
    # --- decoder side: unmask
    vis = torch.randn(B, K, Cd, device=dev, dtype=dt, requires_grad=True)
    mt = torch.randn(Cd, device=dev, dtype=dt, requires_grad=True)
    dpos = torch.randn(1, N, Cd, device=dev, dtype=dt, requires_grad=True)
    gfull = torch.randn(B, N, Cd, device=dev, dtype=dt)
    fa = kernels.mae_unmask(vis, ids, mt, dpos, mask=mask, impl="triton")
    fr = kernels.mae_unmask(vis, ids, mt, dpos, impl="torch")
    ga = torch.autograd.grad(fa, (vis, mt, dpos), gfull)
    gr = torch.autograd.grad(fr, (vis, mt, dpos), gfull)
    errors[unmask_op] = {"full": _rel(fa, fr), "dvis": _rel(ga[0], gr[0]), "dmask_token": _rel(ga[1], gr[1]),
                         "dpos": _rel(ga[2], gr[2])}
    del fa, fr, ga, gr
    moved = (B * K * Cd * 2 + B * N * Cd * 2) * 2
    shape = f"B{B} N{N} C{Cd} keep{K}"
    # the engine passes mae_mask's bool mask (the split kernels); "triton:ids" is the op without it (each position's
    # row found by comparing with ids_keep)
    for op, pe, inputs in ((unmask_op, dpos, (vis, mt, dpos)),
                           (unmask_fixed, dpos.detach(), (vis, mt))):
        for impl in ("triton", "torch", "triton:ids"):
            def fwd(impl=impl, pe=pe):
                return kernels.mae_unmask(vis, ids, mt, pe, mask=None if impl == "triton:ids" else mask,
                                          impl=impl.split(":")[0])
            _mae_row(rows, op, impl, shape, moved, _fwdbwd(fwd, inputs, gfull), fwd)
    if "unmask" in variants:
        def make(pe=dpos.detach(), inputs=(vis, mt)):  # fixed pos by default; learnable: pe=dpos, its grad too
            def fwd():
                return kernels.mae_unmask(vis, ids, mt, pe, mask=mask, impl="triton")
            return _fwdbwd(fwd, inputs, gfull), fwd
        _variant_rows(rows, unmask_fixed, shape, moved, UNMASK_VARIANTS, make)
        _variant_rows(rows, unmask_fixed, shape, moved, UNMASK_SPLIT_VARIANTS, make)
        _variant_rows(rows, unmask_fixed, shape, moved, FIXED_WALK_PDL_VARIANTS, make)
        _variant_rows(rows, unmask_op, shape, moved,
                      [NO_PDL] + WALK_PDL_VARIANTS + [NO_UNMASK_EVICT] + SUM_MT_VARIANTS + LEARNABLE_WALK_VARIANTS,
                      lambda: make(dpos, (vis, mt, dpos)))
        # each position's row read from the mask's rank kernel (same noise) instead of compared with ids_keep
        from kernels.masking import mae_rank

        rank = mae_rank(noise, K)[2]

        def fwd_rank():
            return kernels.mae_unmask(vis, ids, mt, dpos.detach(), rank=rank, impl="triton")
        _mae_row(rows, unmask_fixed, "triton:rank", shape, moved,
                 _fwdbwd(fwd_rank, (vis, mt), gfull), fwd_rank)
    # --- loss
    imgs = torch.randn(B, 3, 224, 224, device=dev, dtype=dt)
    pred = torch.randn(B, N, p * p * 3, device=dev, dtype=dt, requires_grad=True)
    # pred in MAE's order, and channel-major (layout "cpq", what a model whose last layer emits that order gives:
    # the image is read in contiguous row pieces instead of being gathered across its three planes)
    for layout, key in (("pqc", "mae_loss"), ("cpq", "mae_loss cpq")):
        la = kernels.mae_loss(imgs, pred, mask, p, impl="triton", layout=layout)
        lr = kernels.mae_loss(imgs, pred, mask, p, impl="torch", layout=layout)
        (ga,) = torch.autograd.grad(la, pred)
        (gr,) = torch.autograd.grad(lr, pred)
        errors[key + suffix] = {"loss": abs(la.item() - lr.item()) / abs(lr.item()), "dpred": _rel(ga, gr)}
        del la, lr, ga, gr
    frac = mask.float().mean().item()
    px = imgs.numel() * 2
    moved = 2 * frac * (px + pred.numel() * 2) + pred.numel() * 2  # fwd+bwd read masked patches, write dpred
    shape = f"B{B} 224px p{p} masked{frac:.2f}"
    for impl, layout, label in (("triton", "pqc", "triton"), ("torch", "pqc", "torch"),
                                ("triton", "cpq", "triton:layout=cpq")):
        def fwd(impl=impl, layout=layout):
            return kernels.mae_loss(imgs, pred, mask, p, impl=impl, layout=layout)
        _mae_row(rows, loss_op, label, shape, moved, _fwdbwd(fwd, (pred,), None), fwd)
    if "loss" in variants:
        def make():
            def fwd():
                return kernels.mae_loss(imgs, pred, mask, p, impl="triton")
            return _fwdbwd(fwd, (pred,), None), fwd
        _variant_rows(rows, loss_op, shape, moved, LOSS_VARIANTS, make)


FWD_CFGS = [dict(BLOCK_M=bm, BLOCK_N=bn, TAIL_M=tm, TAIL_N=tn, num_warps=w, num_stages=s)
            for bm, bn, tm, tn, w, s in [
                (64, 64, 64, 64, 4, 2), (64, 32, 64, 32, 4, 2), (128, 64, 16, 16, 4, 3), (128, 64, 16, 16, 8, 3),
                (128, 32, 16, 16, 4, 3), (64, 64, 16, 16, 4, 3), (128, 128, 16, 16, 8, 3), (128, 64, 32, 32, 4, 3),
                (64, 32, 16, 16, 4, 2), (128, 64, 64, 16, 4, 3),
                (64, 64, 16, 16, 4, 4), (64, 64, 16, 16, 4, 5), (64, 64, 32, 32, 4, 3), (64, 128, 16, 16, 4, 3)]]
BWD_CFGS = [dict(SPLIT=sp, BLOCK_M=bm, BLOCK_N=bn, TAIL_M=tm, TAIL_N=tn, num_warps=w, num_stages=s, TRANS=tr)
            for sp, bm, bn, tm, tn, w, s, tr in [
                (False, 64, 64, 64, 64, 4, 1, False), (False, 32, 64, 32, 64, 4, 1, False),
                (False, 64, 64, 16, 16, 4, 2, False), (False, 64, 64, 32, 32, 4, 2, False),
                (False, 32, 64, 16, 16, 4, 2, False), (False, 64, 64, 16, 16, 8, 2, False),
                (False, 64, 32, 16, 16, 4, 2, False), (False, 32, 32, 16, 16, 4, 2, False),
                (False, 128, 64, 16, 16, 8, 2, False),
                (False, 64, 64, 64, 64, 4, 1, True), (False, 64, 64, 16, 16, 4, 2, True),
                (False, 32, 64, 16, 16, 4, 2, True), (False, 64, 32, 16, 16, 4, 2, True),
                (False, 64, 64, 16, 16, 8, 2, True),
                (True, 64, 64, 16, 16, 4, 2, False), (True, 128, 128, 16, 16, 8, 1, False),
                (True, 64, 128, 16, 16, 8, 2, False), (True, 32, 128, 16, 16, 8, 2, True),
                (True, 64, 64, 16, 16, 4, 2, True), (True, 32, 64, 16, 16, 4, 2, True)]]
# the two-pass backward (SPLIT "kv+q"): dK/dV pass blocks (BLOCK_N keys per program, BLOCK_M query
# sub-tiles), then the dQ pass's (BLOCK_M queries per program, BLOCK_N key sub-tiles) under "DQ"
BWD_CFGS += [dict(SPLIT="kv+q", BLOCK_M=bm, BLOCK_N=bn, TAIL_M=tm, TAIL_N=tn, num_warps=w, num_stages=s,
                  DQ=dict(BLOCK_M=qm, BLOCK_N=qn, TAIL_M=qtm, TAIL_N=qtn, num_warps=qw, num_stages=qs))
             for (bm, bn, tm, tn, w, s), (qm, qn, qtm, qtn, qw, qs) in [
                 ((64, 64, 16, 16, 4, 2), (64, 64, 16, 16, 4, 2)), ((32, 64, 16, 16, 4, 2), (64, 32, 16, 16, 4, 2)),
                 ((64, 64, 16, 16, 8, 2), (64, 64, 16, 16, 8, 2)), ((32, 64, 16, 16, 4, 3), (64, 32, 16, 16, 4, 3)),
                 ((64, 128, 16, 16, 8, 2), (128, 64, 16, 16, 8, 2)), ((32, 128, 16, 16, 8, 2), (128, 32, 16, 16, 8, 2)),
                 ((64, 128, 16, 16, 8, 1), (64, 64, 16, 16, 4, 2)), ((32, 128, 16, 16, 4, 2), (128, 64, 16, 16, 8, 2)),
                 ((16, 64, 16, 16, 4, 2), (64, 16, 16, 16, 4, 2)), ((64, 32, 16, 16, 4, 2), (32, 64, 16, 16, 4, 2)),
                 ((64, 64, 32, 32, 4, 2), (64, 64, 32, 32, 4, 2)),
                 # neighbours of the first sweep's d = 64 winner ((32, 64, .., 4, 3) / (64, 32, .., 4, 3))
                 ((32, 64, 16, 16, 4, 4), (64, 32, 16, 16, 4, 4)), ((32, 64, 16, 16, 4, 3), (64, 64, 16, 16, 4, 3)),
                 ((32, 64, 16, 16, 4, 3), (128, 32, 16, 16, 8, 3)), ((32, 128, 16, 16, 4, 3), (128, 32, 16, 16, 8, 3)),
                 ((16, 64, 16, 16, 4, 3), (64, 16, 16, 16, 4, 3)), ((32, 64, 32, 32, 4, 3), (64, 32, 32, 32, 4, 3)),
                 ((32, 64, 16, 16, 2, 3), (64, 32, 16, 16, 2, 3)), ((16, 64, 16, 16, 2, 3), (32, 32, 16, 16, 2, 3)),
                 ((32, 32, 16, 16, 2, 3), (32, 32, 16, 16, 2, 3)), ((64, 64, 16, 16, 4, 3), (64, 64, 16, 16, 4, 3)),
                 ((32, 64, 16, 16, 8, 2), (64, 32, 16, 16, 8, 2)),
                 # neighbours of the N = 1374 winner ((64, 64, .., 4, 3) both passes): deeper pipelines,
                 # one tail tile instead of two, other dQ-pass tiles
                 ((64, 64, 16, 16, 4, 4), (64, 64, 16, 16, 4, 4)), ((64, 64, 16, 16, 4, 3), (64, 64, 16, 16, 4, 4)),
                 ((64, 64, 16, 16, 4, 4), (64, 64, 16, 16, 4, 3)), ((64, 64, 16, 16, 4, 5), (64, 64, 16, 16, 4, 5)),
                 ((64, 64, 32, 32, 4, 3), (64, 64, 32, 32, 4, 3)), ((64, 64, 16, 16, 4, 3), (64, 32, 16, 16, 4, 3)),
                 ((64, 64, 16, 16, 4, 3), (128, 64, 16, 16, 8, 3)), ((64, 64, 16, 16, 4, 3), (128, 32, 16, 16, 4, 3)),
                 ((64, 64, 16, 16, 4, 3), (64, 128, 16, 16, 4, 3))]]
# the N = 1374 winner (32-row tails) with 128 query rows per dK/dV sub-tile, 128 keys per dK/dV program on 8
# warps, 8-warp dQ programs, and a register cap per thread (Triton's maxnreg: 168 fits 3 programs of 4 warps
# per SM, 128 fits 4) on either pass
_W = dict(BLOCK_M=64, BLOCK_N=64, TAIL_M=32, TAIL_N=32, num_warps=4, num_stages=3)
BWD_CFGS += [dict(SPLIT="kv+q", **(_W | kv), DQ=_W | dq) for kv, dq in [
    (dict(BLOCK_M=128), {}), (dict(BLOCK_M=128, num_stages=2), {}), (dict(BLOCK_N=128, num_warps=8), {}),
    ({}, dict(BLOCK_M=128, num_warps=8, num_stages=2)), ({}, dict(num_warps=8)),
    (dict(maxnreg=168), {}), ({}, dict(maxnreg=168)), (dict(maxnreg=168), dict(maxnreg=168)),
    (dict(maxnreg=128), {}), ({}, dict(maxnreg=128)), (dict(maxnreg=128), dict(maxnreg=128))]]
TUNE_MAX_N = 2048  # the 4k reference point keeps its default config


def _compile_worker(job):
    """Compile (and run once at batch 1) one config; fills Triton's on-disk cache for the timing run."""
    import torch

    from kernels import attn

    shape, fwd_cfg, bwd_cfg = job
    _, H, N, D = shape
    q, k, v, do = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    try:
        o, lse = attn.attention_fwd(q, k, v, D ** -0.5, config=fwd_cfg)
        if bwd_cfg is not None:
            attn.attention_bwd(do, q, k, v, o, lse, D ** -0.5, config=bwd_cfg)
        torch.cuda.synchronize()
    except Exception as e:
        return f"{fwd_cfg} {bwd_cfg}: {type(e).__name__}: {str(e)[:200]}"
    return ""


def precompile(names, sweep=True, variants=None):
    """Compile the attention kernels in parallel processes before timing anything: the sweep's
    configs (--tune; --tune-regs / --tune-ws / --tune-split / --tune-tma / --tune-tail-groups / --tune-tail-split /
    --tune-lean / --tune-blocks / --tune-tail-step / --tune-occupancy: the variants of the current configs) or just the
    ones each shape will use."""
    import concurrent.futures as cf
    import multiprocessing as mp
    import os

    from kernels import attn

    jobs = []
    for n in names:
        shape = ATTN_SHAPES[n]
        N, D = shape[2], shape[3]
        if not sweep:
            jobs.append((shape, attn._fwd_config(N, D), attn._bwd_config(N, D)))
            continue
        if N > TUNE_MAX_N:
            continue
        if variants:
            fwds, bwds = VARIANT_SWEEPS[variants](N, D)
            jobs += [(shape, c, None) for c in fwds] + [(shape, fwds[0], c) for c in bwds]
            continue
        jobs += [(shape, c, None) for c in FWD_CFGS]
        jobs += [(shape, FWD_CFGS[0], c) for c in BWD_CFGS if c["SPLIT"] or N <= 1400]
    with cf.ProcessPoolExecutor(max_workers=max(1, min(16, len(jobs), (os.cpu_count() or 2) - 1)),
                                mp_context=mp.get_context("spawn")) as ex:
        errors = [e for e in ex.map(_compile_worker, jobs) if e]
    print(f"  precompiled {len(jobs)} kernels, {len(errors)} failed", file=sys.stderr)
    for e in errors[:10]:
        print("   ", e, file=sys.stderr)


REG_CAPS = (None, 128, 168)  # Triton's maxnreg per thread: 4-warp programs per SM by registers: 4 at 128, 3 at 168


def register_variants(N: int, D: int) -> tuple[list[dict], list[dict]]:
    """The shape's current configs (TUNED or the defaults) with each register cap on the forward and,
    for the two-pass backward, on each pass: does fitting more programs per SM beat the spills?"""
    from kernels import attn

    def capped(cfg, cap):
        cfg = {k: v for k, v in cfg.items() if k != "maxnreg"}
        return cfg if cap is None else cfg | {"maxnreg": cap}

    fwd, bwd = attn._fwd_config(N, D), attn._bwd_config(N, D)
    fwds = [capped(fwd, c) for c in REG_CAPS]
    if bwd.get("SPLIT") != attn.KV_Q:
        return fwds, [capped(bwd, c) for c in REG_CAPS]
    dq = attn._kv_q_dq_config(bwd)
    return fwds, [capped(bwd, a) | {"DQ": capped(dq, b)} for a in REG_CAPS for b in REG_CAPS]


def ws_variants(N: int, D: int) -> tuple[list[dict], list[dict]]:
    """The shape's current configs with Triton's warp specialization (WS) on the full-tile loop of the
    forward and, for the two-pass backward, of each pass (off, then on)."""
    from kernels import attn

    fwd, bwd = attn._fwd_config(N, D), attn._bwd_config(N, D)
    fwds = [fwd | {"WS": False}, fwd | {"WS": True}]
    if bwd.get("SPLIT") != attn.KV_Q:  # the one-pass kernels have no WS knob
        return fwds, [bwd]
    dq = attn._kv_q_dq_config(bwd)
    return fwds, [bwd | {"WS": a, "DQ": dq | {"WS": b}} for a in (False, True) for b in (False, True)]


def split_variants(N: int, D: int) -> tuple[list[dict], list[dict]]:
    """For a head dim that splits into two power-of-two pieces (kernels.attn._split_dims: d = 88 as 64 + 32): the
    shape's current configs as they are and with SPLIT_D, then block neighbours with SPLIT_D (the narrower tiles
    hold fewer registers, so larger blocks may fit); other head dims: the current configs only."""
    from kernels import attn

    fwd, bwd = attn._fwd_config(N, D), attn._bwd_config(N, D)
    if attn._split_dims(D) is None:
        return [fwd], [bwd]
    on = {"SPLIT_D": True}
    fwds = [fwd, fwd | on] + [attn._cfg(*c, split_d=True) for c in [
        (64, 64, 16, 16, 4, 2), (64, 64, 16, 16, 4, 3), (128, 32, 16, 16, 4, 3), (128, 64, 16, 16, 8, 3),
        (128, 64, 16, 16, 4, 3), (64, 32, 16, 16, 4, 3), (128, 128, 16, 16, 8, 3)]]
    bwds = [bwd, bwd | on] + [attn._cfg(*kv, split=attn.KV_Q, dq=dq, split_d=True) for kv, dq in [
        ((64, 64, 16, 16, 4, 3), (64, 64, 16, 16, 4, 3)), ((32, 64, 16, 16, 4, 3), (64, 32, 16, 16, 4, 3)),
        ((32, 64, 16, 16, 4, 2), (64, 32, 16, 16, 4, 2)), ((64, 64, 16, 16, 8, 2), (64, 64, 16, 16, 8, 2)),
        ((64, 128, 16, 16, 8, 2), (128, 64, 16, 16, 8, 2)), ((32, 128, 16, 16, 4, 2), (128, 32, 16, 16, 8, 2)),
        ((64, 64, 32, 32, 4, 2), (64, 64, 32, 32, 4, 2)), ((64, 64, 16, 16, 4, 2), (128, 64, 16, 16, 8, 2)),
        ((32, 64, 16, 16, 4, 4), (64, 32, 16, 16, 4, 4))]]
    return fwds, bwds


def tma_variants(N: int, D: int) -> tuple[list[dict], list[dict]]:
    """The shape's current configs without and with TMA (the full tiles each loop walks loaded through tensor
    descriptors): the forward, and the two-pass backward with it on either pass, both or neither, each at the
    current pipeline depths and at 3 stages (the first sweep's winners took 3 with TMA on both passes)."""
    from kernels import attn

    fwd, bwd = attn._fwd_config(N, D), attn._bwd_config(N, D)
    fwds = [fwd] if fwd.get("SPLIT_D") and attn._split_dims(D) else [fwd, fwd | {"TMA": True}]  # no split TMA fwd
    if bwd.get("SPLIT") != attn.KV_Q:  # the one-pass kernels have no TMA path
        return fwds, [bwd]
    dq = attn._kv_q_dq_config(bwd)
    depths = [(bwd["num_stages"], dq["num_stages"])]
    depths += [d for d in [(3, 3), (3, dq["num_stages"]), (bwd["num_stages"], 3)] if d not in depths]
    return fwds, [bwd | {"TMA": a, "num_stages": s, "DQ": dq | {"TMA": b, "num_stages": t}}
                  for s, t in depths for a in (False, True) for b in (False, True)]


TAIL_GROUPS = (2, 4)


def _without_tail_groups(c: dict) -> dict:
    """A config with its tail-group keys (TAIL_G, TAIL_GW, TAIL_GS) dropped: one tail program per head."""
    return {k: v for k, v in c.items() if k not in ("TAIL_G", "TAIL_GW", "TAIL_GS")}


def tail_group_variants(N: int, D: int) -> tuple[list[dict], list[dict]]:
    """The shape's current configs without and with tail groups (TAIL_G: the tail rows of G heads in one program),
    each also under the register cap that keeps the kernel's programs per SM (the grouped tail's 3D tiles raise the
    whole kernel's registers: 121 -> 158 per thread in the N = 197 forward, 3 programs per SM instead of 4): the
    forward at each G, the two-pass backward with groups on either pass or both (the dQ pass also under a 96 cap).
    Shapes without tail rows run the same kernels in every variant."""
    from kernels import attn

    fwd, bwd = attn._fwd_config(N, D), attn._bwd_config(N, D)
    base = _without_tail_groups
    capped = lambda c, cap: c | {"maxnreg": min(cap, c.get("maxnreg", cap))}
    fwd = base(fwd)
    fwds = [fwd] + [c for g in TAIL_GROUPS for c in (fwd | {"TAIL_G": g}, capped(fwd | {"TAIL_G": g}, 128))]
    if bwd.get("SPLIT") != attn.KV_Q:  # the one-pass kernels have no tail groups
        return _unique(fwds), [bwd]
    dq = base(attn._kv_q_dq_config(bwd))
    bwd = base(bwd)
    kvs = [bwd] + [c for g in TAIL_GROUPS for c in (bwd | {"TAIL_G": g}, capped(bwd | {"TAIL_G": g}, 128))]
    dqs = [dq] + [c for g in TAIL_GROUPS for c in (dq | {"TAIL_G": g}, capped(dq | {"TAIL_G": g}, 96),
                                                   capped(dq | {"TAIL_G": g}, 128))]
    return _unique(fwds), _unique([kv | {"DQ": d} for kv in kvs for d in dqs])


def tail_split_variants(N: int, D: int) -> tuple[list[dict], list[dict]]:
    """For a head dim the full blocks split (SPLIT_D; d = 80 / 88): the shape's current configs, then tail groups of
    2 and 4 heads with the grouped tail padded (128 columns) and split like the full blocks (TAIL_GS: 64 + 32 at
    d = 88) on the forward; the two-pass backward with each of those on the dK/dV pass crossed with each on the dQ
    pass, the dQ pass's also under a 168-register cap (offline for sm_90 under Triton 3.6, d = 88: its tail groups
    take the pass from 168 registers to 255, padded or split, so 2 programs fit an SM instead of 3; capped at 168 it
    spills 8 bytes). Other head dims: the current configs only."""
    from kernels import attn

    fwd, bwd = attn._fwd_config(N, D), attn._bwd_config(N, D)
    if attn._split_dims(D) is None or not fwd.get("SPLIT_D"):
        return [fwd], [bwd]
    base = _without_tail_groups
    groups = [{}] + [{"TAIL_G": g} | ({"TAIL_GS": True} if gs else {}) for g in TAIL_GROUPS for gs in (False, True)]
    fwds = [fwd] + [base(fwd) | t for t in groups]
    if bwd.get("SPLIT") != attn.KV_Q:
        return _unique(fwds), [bwd]
    dq = base(attn._kv_q_dq_config(bwd))
    dqs = [dq | t for t in groups] + [dq | t | {"maxnreg": 168} for t in groups[1:]]
    return _unique(fwds), _unique([bwd] + [base(bwd) | a | {"DQ": b} for a in groups for b in dqs])


def lean_variants(N: int, D: int) -> tuple[list[dict], list[dict]]:
    """The shape's current forward config with the plain softmax and with LEAN (the row max of the raw scores, the
    scale folded into exp2's argument, a reciprocal per row for the output; kernels.attn._attn_fwd); the backward
    as it is (timed once, for the JSON's completeness)."""
    from kernels import attn

    fwd = attn._fwd_config(N, D)
    return [fwd | {"LEAN": False}, fwd | {"LEAN": True}], [attn._bwd_config(N, D)]


# register caps for --tune-tail-step's TAIL_PRE variants: the forward's (4 programs of 4 warps per SM) and the dQ
# pass's (5)
TAIL_PRE_CAPS = {"fwd": 128, "dq": 96}
TAIL_STEP_KEYS = ("TAIL_PRE", "TAIL_FIRST")


def tail_step_variants(N: int, D: int) -> tuple[list[dict], list[dict]]:
    """The shape's current configs and the same without TAIL_PRE / TAIL_FIRST, then, from the latter, each walk's
    first tail tile loaded before the full-tile loop (TAIL_PRE, kernels.attn._fwd_q_block) or its tail steps taken
    before the loop (TAIL_FIRST): on the forward (TAIL_PRE also under TAIL_PRE_CAPS["fwd"], or none where that is the
    current cap); on the dK/dV pass; on the dQ pass (TAIL_PRE also under TAIL_PRE_CAPS["dq"]); on both passes.
    Configs that split the head dim (SPLIT_D) ignore both keys: only the current ones."""
    from kernels import attn

    off = lambda c: {k: v for k, v in c.items() if k not in TAIL_STEP_KEYS}
    pre, first = {"TAIL_PRE": True}, {"TAIL_FIRST": True}
    fwd, bwd = attn._fwd_config(N, D), attn._bwd_config(N, D)
    if fwd.get("SPLIT_D"):
        fwds = [fwd]
    else:
        cap = TAIL_PRE_CAPS["fwd"]
        recap = (lambda c: {k: v for k, v in c.items() if k != "maxnreg"}) if fwd.get("maxnreg") == cap else \
            (lambda c: c | {"maxnreg": cap})
        f0 = off(fwd)
        fwds = [fwd, f0, f0 | pre, recap(f0) | pre, f0 | first]
    if bwd.get("SPLIT") != attn.KV_Q or bwd.get("SPLIT_D"):
        return _unique(fwds), [bwd]
    dq, b0 = attn._kv_q_dq_config(bwd), off(bwd)
    dq0 = off(dq)
    capped = dq0 | pre | {"maxnreg": TAIL_PRE_CAPS["dq"]}
    return _unique(fwds), _unique([bwd | {"DQ": dq}, b0 | {"DQ": dq0}, b0 | pre | {"DQ": dq0}, b0 | first | {"DQ": dq0},
                                   b0 | {"DQ": dq0 | pre}, b0 | {"DQ": capped}, b0 | {"DQ": dq0 | first},
                                   b0 | pre | {"DQ": dq0 | pre}, b0 | first | {"DQ": dq0 | first}])


# (num_stages, maxnreg) pairs for --tune-occupancy: one stage fewer (less shared memory a program) under a register
# cap low enough for one more 4-warp program per SM (offline for sm_90: the d = 64 forward's full blocks fit 96
# registers and its dQ pass 84 without spills)
OCCUPANCY = {"fwd": [(2, 96), (2, 104)], "dq": [(2, 84), (2, 88), (3, 84)]}


def occupancy_variants(N: int, D: int) -> tuple[list[dict], list[dict]]:
    """The shape's current configs, then the forward and the dQ pass at the OCCUPANCY depths and caps (the forward
    with and without its tail groups), everything else kept; the dK/dV pass as it is (it needs ~134-166 registers)."""
    from kernels import attn

    fwd, bwd = attn._fwd_config(N, D), attn._bwd_config(N, D)
    deep = lambda c, st, cap: c | {"num_stages": st, "maxnreg": cap}
    fwds = [fwd] + [deep(fwd, *o) for o in OCCUPANCY["fwd"]]
    if fwd.get("TAIL_G"):
        fwds += [{k: v for k, v in deep(fwd, *o).items() if k != "TAIL_G"} for o in OCCUPANCY["fwd"]]
    if bwd.get("SPLIT") != attn.KV_Q:
        return _unique(fwds), [bwd]
    dq = attn._kv_q_dq_config(bwd)
    return _unique(fwds), _unique([bwd] + [bwd | {"DQ": deep(dq, *o)} for o in OCCUPANCY["dq"]])


# (BLOCK_M, BLOCK_N, num_warps, num_stages) neighbours for --tune-blocks: the forward's, the dK/dV pass's (BLOCK_M
# query rows a step, BLOCK_N keys per program) and the dQ pass's (BLOCK_M queries per program, BLOCK_N keys a step)
NEIGHBOUR_BLOCKS = {
    "fwd": [(128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (64, 64, 4, 2), (64, 32, 4, 3)],
    "kv": [(32, 128, 8, 3), (64, 128, 8, 3), (32, 128, 8, 2), (64, 64, 4, 3), (16, 64, 4, 3), (32, 64, 4, 4)],
    "dq": [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4), (64, 16, 4, 3)],
}


def block_variants(N: int, D: int) -> tuple[list[dict], list[dict]]:
    """The shape's current configs with every other knob kept (TMA, tail groups, caps, LEAN) and the blocks, warps and
    pipeline depth swapped for the NEIGHBOUR_BLOCKS: the block sweeps (--tune) predate those knobs. The forward's
    neighbours; the backward's dK/dV-pass neighbours with the current dQ pass, then the dQ-pass neighbours with the
    current dK/dV pass."""
    from kernels import attn

    def blocks(c, bm, bn, w, st):
        return c | {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}

    fwd, bwd = attn._fwd_config(N, D), attn._bwd_config(N, D)
    fwds = [fwd] + [blocks(fwd, *b) for b in NEIGHBOUR_BLOCKS["fwd"]]
    if bwd.get("SPLIT") != attn.KV_Q:
        return _unique(fwds), [bwd]
    dq = attn._kv_q_dq_config(bwd)
    kvs = [bwd | {"DQ": dq}] + [blocks(bwd, *b) | {"DQ": dq} for b in NEIGHBOUR_BLOCKS["kv"]]
    dqs = [bwd | {"DQ": blocks(dq, *b)} for b in NEIGHBOUR_BLOCKS["dq"]]
    return _unique(fwds), _unique(kvs + dqs)


# the variant sweeps' flags, in the order the first one given wins: (flag, VARIANT_SWEEPS key, --help after "instead
# of the block sweep, time each shape's current")
VARIANT_FLAGS = [
    ("--tune-regs", "regs", "configs under register caps "
     f"(Triton's maxnreg: {', '.join(str(c) for c in REG_CAPS)}) on the forward and each backward pass"),
    ("--tune-ws", "ws", "configs with Triton's warp specialization on the full-tile loops (forward, each pass of the "
     "two-pass backward; on Hopper Triton compiles the same kernel either way)"),
    ("--tune-split", "split", "configs with and without the head dim split in two pieces (SPLIT_D; d = 88 as 64 + 32), "
     "and block neighbours with it"),
    ("--tune-tma", "tma", "configs without and with TMA loads (tensor descriptors, Hopper and later; dense inputs; the "
     "forward with the head dim whole) on the forward and on each pass of the two-pass backward, at the current and "
     "3-stage pipeline depths"),
    ("--tune-tail-groups", "tailg", "configs without and with tail groups (TAIL_G: the rows past the last full block "
     "of G heads in one program) on the forward and on each pass of the two-pass backward"),
    ("--tune-tail-split", "tailsplit", "configs with tail groups whose tail holds a split head dim padded or split "
     "like the full blocks (TAIL_GS; d = 80 / 88) on the forward and on each pass of the two-pass backward"),
    ("--tune-lean", "lean", "forward config with the plain softmax and with LEAN (the scale folded into exp2's "
     "argument, a reciprocal per row)"),
    ("--tune-blocks", "blocks", "configs with their blocks, warps and pipeline depth swapped for neighbours "
     "(NEIGHBOUR_BLOCKS), every other knob kept"),
    ("--tune-tail-step", "tailstep", "configs without and with TAIL_PRE (each walk's first tail tile loaded before "
     "the full-tile loop) or TAIL_FIRST (its tail steps before the loop) on the forward and on each pass of the "
     "two-pass backward"),
    ("--tune-occupancy", "occupancy", "configs with the forward and the dQ pass one stage shallower under register "
     "caps that fit one more program per SM (OCCUPANCY)"),
]


def _unique(cfgs: list[dict]) -> list[dict]:
    """The configs in order, each once (a variant can equal another where the current config already has a cap)."""
    out = []
    for c in cfgs:
        if c not in out:
            out.append(c)
    return out


VARIANT_SWEEPS = {"regs": register_variants, "ws": ws_variants, "split": split_variants, "tma": tma_variants,
                  "tailg": tail_group_variants, "tailsplit": tail_split_variants, "lean": lean_variants,
                  "blocks": block_variants, "occupancy": occupancy_variants, "tailstep": tail_step_variants}


@contextlib.contextmanager
def launched_kernels():
    """The attention kernels launched inside the block, in launch order, as [{"regs": registers per thread,
    "spills": bytes spilled, "shared": bytes of shared memory per program}] (None each where Triton's compiled kernel
    does not say, e.g. under the interpreter)."""
    from kernels import attn

    seen, fns = [], (attn._attn_fwd, attn._attn_bwd_kv_q, attn._attn_bwd)
    for fn in fns:
        def run(*a, _run=fn.run, **kw):
            kernel = _run(*a, **kw)
            seen.append({"regs": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None),
                         "shared": getattr(getattr(kernel, "metadata", None), "shared", None)})
            return kernel
        fn.run = run  # an instance attribute over JITFunction.run, which fn[grid](...) calls
    try:
        yield seen
    finally:
        for fn in fns:
            del fn.run


def tune_attention(names, variants=None):
    """Time every block config of the forward and both backward layouts (or, with `variants` a key of
    VARIANT_SWEEPS, "regs" / "ws" / "split" / "tma" / "tailg" / "tailsplit" / "lean" / "blocks" / "occupancy" /
    "tailstep", the current configs under register caps / with warp specialization / with the head dim split / with
    TMA loads / with tail groups / with split grouped tails / with the lean softmax / with neighbouring blocks /
    shallower under caps / with the tail tiles loaded early or taken first);
    print the best per shape."""
    from kernels import attn

    out = {}
    for name in names:
        B, H, N, D = ATTN_SHAPES[name]
        if N > TUNE_MAX_N:
            continue
        fwd_cfgs, bwd_cfgs = VARIANT_SWEEPS[variants](N, D) if variants else (FWD_CFGS, BWD_CFGS)
        q, k, v, do = (torch.randn(B, H, N, D, device=DEV, dtype=torch.bfloat16) for _ in range(4))
        scale = D ** -0.5
        qf, kf, vf = (x.float().requires_grad_() for x in (q, k, v))
        bs = max(1, min(B, (1 << 27) // (H * N * N * 4)))
        ref = attn.attention_reference(qf[:bs], kf[:bs], vf[:bs])
        g_ref = torch.autograd.grad(ref, (qf, kf, vf), do[:bs].float())
        g_ref = [g[:bs] for g in g_ref]
        o_ref, lse_ref = attn.attention_fwd(q, k, v, scale, config=FWD_CFGS[0])
        res = {"fwd": [], "bwd": []}
        f = 4.0 * B * H * N * N * D
        for cfg in fwd_cfgs:
            try:
                with launched_kernels() as kern:
                    o, lse = attn.attention_fwd(q, k, v, scale, config=cfg)
                ok = _rel(o[:bs], ref) < 1e-2 and _rel(lse, lse_ref) < 1e-3
                t = graph_ms(lambda: attn.attention_fwd(q, k, v, scale, config=cfg))
                res["fwd"].append({**cfg, "ms": t, "tflops": f / t / 1e9, "ok": ok, "kernels": kern})
            except Exception as e:
                res["fwd"].append({**cfg, "error": f"{type(e).__name__}: {str(e)[:80]}"})
        for cfg in bwd_cfgs:
            if not cfg["SPLIT"] and N > 1400:
                continue
            try:
                with launched_kernels() as kern:
                    gs = attn.attention_bwd(do, q, k, v, o_ref, lse_ref, scale, config=cfg)
                ok = max(_rel(a[:bs], b) for a, b in zip(gs, g_ref)) < 1e-2
                t = graph_ms(lambda: attn.attention_bwd(do, q, k, v, o_ref, lse_ref, scale, config=cfg))
                res["bwd"].append({**cfg, "ms": t, "tflops": 2.5 * f / t / 1e9, "ok": ok, "kernels": kern})
            except Exception as e:
                res["bwd"].append({**cfg, "error": f"{type(e).__name__}: {str(e)[:80]}"})
        best = {}
        for part in ("fwd", "bwd"):
            good = sorted((r for r in res[part] if r.get("ok")), key=lambda r: r["ms"])
            if good:
                best[part] = {kk: vv for kk, vv in good[0].items() if kk not in ("ms", "tflops", "ok", "kernels")}
            for r in good[:3]:
                print(f"  tune {name} {part}: {r}", file=sys.stderr)
            if part == "bwd":  # the best of each backward layout, to compare the layouts
                for sp in (False, True, "kv+q"):
                    r = next((r for r in good if r["SPLIT"] == sp), None)
                    if r is not None:
                        print(f"  tune {name} bwd best SPLIT={sp!r}: {r['ms']:.4f} ms {r['tflops']:.0f} TFLOP/s {r}",
                              file=sys.stderr)
            bad = [r for r in res[part] if "ok" in r and not r["ok"]]
            if bad:
                print(f"  tune {name} {part}: WRONG RESULTS {bad}", file=sys.stderr)
        if len(best) == 2:  # the rest of this run uses the winners; hard-code them in kernels/attn.py TUNED
            attn.TUNED[(N, D)] = (best["fwd"], best["bwd"])
            res["best"] = best
            print(f"  TUNED[({N}, {D})] = ({best['fwd']}, {best['bwd']})", file=sys.stderr)
        out[name] = res
        del q, k, v, do
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"attention shapes {QUICK} only")
    ap.add_argument("--shapes", default="", help="comma-separated attention shape names: " + ",".join(ATTN_SHAPES))
    ap.add_argument("--tune", action="store_true", help="sweep block configs (slow) and add them to the JSON")
    for flag, _, text in VARIANT_FLAGS:
        ap.add_argument(flag, action="store_true", help="instead of the block sweep, time each shape's current " + text)
    ap.add_argument("--skip-mae", action="store_true")
    ap.add_argument("--mae-variants", nargs="?", const="mask,unmask,loss", default="",
                    help="also time the MAE kernels under other launch settings (MASK_VARIANTS, ...); optionally "
                         "only some ops: --mae-variants unmask (comma list of mask, unmask, loss)")
    ap.add_argument("--mae-batch", type=int, nargs="+", default=[256], metavar="B",
                    help="the MAE ops' batch sizes (default 256); rows of a size after the first carry it in their op "
                         "name (\"mae_unmask B512\"). The ViT-L recipe's micro batch is 512")
    ap.add_argument("--tag", default=None, help="suffix of the result file names")
    ap.add_argument("--only", choices=("mae", "attention", "packed", "soft-ce", "patch-embed"), default=None,
                    help="run one part: the MAE masking/loss ops, the attention shapes, DINOv2's packed crops "
                         f"({', '.join(PACKED_SHAPES)}), its iBOT and DINO cross-entropies "
                         f"({', '.join(SOFT_CE_SHAPES)}; {', '.join(DINO_CE_SHAPES)}) or the "
                         f"patch embedding ({', '.join(PATCH_SHAPES)})")
    args = ap.parse_args(argv or [])
    variant_ops = [v for v in args.mae_variants.split(",") if v]
    if set(variant_ops) - {"mask", "unmask", "loss"}:
        ap.error(f"--mae-variants takes mask, unmask, loss; got {args.mae_variants!r}")
    if min(args.mae_batch) < 1 or len(set(args.mae_batch)) < len(args.mae_batch):
        ap.error(f"--mae-batch takes distinct positive sizes; got {args.mae_batch}")
    run_attn = args.only in (None, "attention")
    run_mae = args.only in (None, "mae") and not args.skip_mae
    variants_on = args.tune or any(getattr(args, flag[2:].replace("-", "_")) for flag, _, _ in VARIANT_FLAGS)
    run_packed = args.only == "packed" or (args.only is None and not args.skip_mae and not variants_on)
    run_soft_ce = args.only == "soft-ce" or (args.only is None and not args.skip_mae and not variants_on)
    run_patch = args.only == "patch-embed" or (args.only is None and not args.skip_mae and not variants_on)
    if not torch.cuda.is_available():
        print("bench kernels needs a CUDA GPU (the Triton kernels are GPU kernels)", file=sys.stderr)
        return 2
    names = [s for s in args.shapes.split(",") if s] or (QUICK if args.quick else list(ATTN_SHAPES))
    unknown = [n for n in names if n not in ATTN_SHAPES]
    if unknown:
        print(f"unknown shapes {unknown}; valid: {list(ATTN_SHAPES)}", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    payload = {"card": card_name()}
    variants = next((key for flag, key, _ in VARIANT_FLAGS if getattr(args, flag[2:].replace("-", "_"))), None)
    if (args.tune or variants) and run_attn:
        import time

        t0 = time.time()
        precompile(names, variants=variants)
        print(f"  precompile {time.time() - t0:.0f}s", file=sys.stderr)
        payload["tune"] = tune_attention(names, variants=variants)
        print(f"  tune done {time.time() - t0:.0f}s", file=sys.stderr)
    elif run_attn:
        precompile(names, sweep=False)
    attn_rows, errors = [], {}
    if run_attn:
        bench_attention(names, attn_rows, errors)
    payload["attention"] = attn_rows
    packed_rows = []
    if run_packed:
        bench_packed(PACKED_QUICK if args.quick else list(PACKED_SHAPES), packed_rows, errors)
    payload["packed"] = packed_rows
    copy = copy_bandwidth()
    payload["copy_GBps"] = copy
    mae_rows = []
    if run_mae:
        for i, b in enumerate(args.mae_batch):
            bench_mae(mae_rows, errors, B=b, variants=variant_ops, suffix=f" B{b}" if i else "")
    if run_soft_ce:
        bench_soft_ce(["ibot-b32"] if args.quick else list(SOFT_CE_SHAPES), mae_rows, errors)
        bench_dino_ce(["dino-b32"] if args.quick else list(DINO_CE_SHAPES), mae_rows, errors)
    if mae_rows:
        same_size = {}  # the op's bytes moved as one copy (half read, half written), graphed like the ops
        for r in mae_rows:
            r["of_copy_bw"] = r["GB/s"] / copy
            if r["op"] not in same_size:
                same_size[r["op"]] = copy_bandwidth(r["GB/s"] * r["ms"] * 1e6 / 2)
            r["of_same_size_copy"] = r["GB/s"] / same_size[r["op"]]
        payload["same_size_copy_GBps"] = same_size
        torch_ms = {r["op"]: r["ms"] for r in mae_rows if r["impl"] == "torch"}
        for r in mae_rows:
            r["speedup_vs_torch"] = torch_ms[r["op"]] / r["ms"]
    payload["mae"] = mae_rows
    patch_rows = []
    if run_patch:
        bench_patch_embed(["dinov2-s-global"] if args.quick else list(PATCH_SHAPES), patch_rows, errors)
    payload["patch_embed"] = patch_rows
    payload["errors"] = errors

    cols = ["shape", "triton_fwdbwd_tflops", "best_sdpa_fwdbwd_tflops", "best_sdpa_backend", "ratio_fwdbwd",
            "ratio_eager_fwdbwd", "triton_fwd_tflops", "ratio_fwd", "max_rel_err"]
    others = sorted({k[:-14] for r in attn_rows for k in r if k.endswith("_fwdbwd_tflops")
                     and not k.startswith("best") and "_eager" not in k})
    if attn_rows:
        print(f"\nattention, bf16, {card_name()} (TFLOP/s from CUDA-graph replays; ratio vs best SDPA backend;"
              " ratio_eager: both timed eagerly, Python launch overhead included)")
        print_table(attn_rows, cols)
        print_table([{"shape": r["shape"], **{o: r.get(f"{o}_fwdbwd_tflops", "") for o in others}} for r in attn_rows],
                    ["shape", *others])
    if packed_rows:
        print(f"\nDINOv2's packed crops, attention fwd+bwd, bf16, {card_name()} (ms from CUDA-graph replays; grouped: "
              "one dense launch per crop size, the engine's path; varlen: one launch over cu_seqlens; SDPA: each crop "
              "size a dense batch, best backend per size)")
        print_table(packed_rows, ["shape", "crops", "tokens", "grouped_ms", "varlen_ms", "best_sdpa_ms",
                                  "ratio_vs_best_sdpa", "grouped_vs_varlen", "grouped_tflops", "grouped_eager_ms",
                                  "max_rel_err"])
    if mae_rows:
        print(f"\nMAE masking / loss fwd+bwd (copy bandwidth {copy:,.0f} GB/s)")
        print_table(mae_rows, ["op", "impl", "shape", "ms", "fwd_ms", "bwd_ms", "eager_ms", "GB/s", "of_copy_bw",
                               "of_same_size_copy", "speedup_vs_torch"])
        print("same-size copies (GB/s): " + ", ".join(f"{k} {v:,.0f}" for k, v in same_size.items()))
    if patch_rows:
        print(f"\npatch embedding fwd+bwd (weight, bias), bf16 autocast, {card_name()}: the convolution (cuDNN's "
              "heuristics / cudnn.benchmark) vs PatchMatmul")
        print_table(patch_rows, ["op", "impl", "shape", "ms", "eager_ms", "tflops", "speedup_vs_best_conv",
                                 "max_rel_err"])
    path = write_result("kernels", payload, argv, tag=args.tag)
    if attn_rows:
        labels = [r["shape"] for r in attn_rows]
        series = {o: [r.get(f"{o}_fwdbwd_tflops", 0.0) for r in attn_rows] for o in others}
        bar_plot(path.with_suffix(".png"), labels, series, "TFLOP/s (fwd+bwd)", f"attention bf16, {card_name()}")
    if packed_rows:
        bar_plot(path.with_name(path.stem + "-packed.png"), [r["shape"] for r in packed_rows],
                 {k: [r[f"{k}_tflops"] for r in packed_rows] for k in ("grouped", "varlen", "best_sdpa")},
                 "TFLOP/s (fwd+bwd)", f"DINOv2 packed crops, attention bf16, {card_name()}")
    if mae_rows:
        bar_plot(path.with_name(path.stem + "-mae.png"), *mae_plot_series(mae_rows), "GB/s (fwd+bwd)",
                 f"MAE masking and loss, DINOv2's cross-entropies, {card_name()}")
    if patch_rows:
        ops = sorted({r["op"] for r in patch_rows})
        bar_plot(path.with_name(path.stem + "-patch.png"), ops,
                 {impl: [next((r["tflops"] for r in patch_rows if r["op"] == op and r["impl"] == impl), 0.0)
                         for op in ops] for impl in ("conv", "conv-benchmark", "matmul")},
                 "TFLOP/s (fwd+bwd)", f"patch embedding, bf16, {card_name()}")
    return 0
