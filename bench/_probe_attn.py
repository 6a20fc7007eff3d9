"""Attention forward + backward at the ViT shapes of `bench kernels`, ours (the default configs) beside cuDNN's SDPA
on the same inputs: a target for a hardware-counter profiler, e.g.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section LaunchStats --section WarpStateStats python3 -m bench._probe_attn --shapes dinov2-g-n261-d64

The first `--warmup` rounds compile and warm the kernels; the profiled round runs between cudaProfilerStart and
cudaProfilerStop (torch.cuda.profiler), so with `--profile-from-start off` the counters cover one warm launch of each
kernel, the backward kernels included (autograd runs them on a thread of its own, which an NVTX range would miss).
Ours runs through kernels.attn.attention_fwd / attention_bwd (the forward, then the dQ and dK/dV passes); cuDNN's
through torch's SDPA under sdpa_kernel(CUDNN_ATTENTION) and autograd.
"""
from __future__ import annotations

import argparse

import torch


def main(argv=None) -> int:
    from bench.kernels import ATTN_SHAPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="dinov2-g-n261-d64", help="comma-separated: " + ",".join(ATTN_SHAPES))
    p.add_argument("--warmup", type=int, default=2, help="rounds before the profiled one")
    p.add_argument("--no-sdpa", action="store_true", help="ours only")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run (TRITON_INTERPRET=1; shapes cut to B = H = 1)")
    a = p.parse_args(argv)
    from kernels import attn

    dev = a.device
    names = [s for s in a.shapes.split(",") if s]
    unknown = [n for n in names if n not in ATTN_SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}")
    cases = []
    for name in names:
        B, H, N, D = ATTN_SHAPES[name] if dev == "cuda" else (1, 1, ATTN_SHAPES[name][2], ATTN_SHAPES[name][3])
        dt = torch.bfloat16 if dev == "cuda" else torch.float32
        q, k, v, do = (torch.randn(B, H, N, D, device=dev, dtype=dt) for _ in range(4))
        cases.append((name, q, k, v, do))

    def ours(q, k, v, do):
        scale = q.shape[-1] ** -0.5
        o, lse = attn.attention_fwd(q, k, v, scale)
        return attn.attention_bwd(do, q, k, v, o, lse, scale)

    def cudnn(q, k, v, do):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qr, kr, vr = (x.detach().requires_grad_() for x in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(qr, kr, vr)
        return torch.autograd.grad(o, (qr, kr, vr), do)

    runs = [ours] + ([] if a.no_sdpa or dev != "cuda" else [cudnn])
    for r in range(a.warmup + 1):
        if r == a.warmup and dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        for name, q, k, v, do in cases:
            for run in runs:
                grads = run(q, k, v, do)
                if dev == "cuda":
                    torch.cuda.synchronize()
                if r == a.warmup:
                    print(f"{name} {run.__name__}: |dq| {grads[0].float().norm():.3e}", flush=True)
    if dev == "cuda":
        torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
