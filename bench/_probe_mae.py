"""The MAE ops of `bench kernels --only mae` (same shapes: ViT-L, B = 256, 75 % masked, bf16), each run
forward + backward a few times in eager mode, plus an elementwise kernel moving the unmask forward's bytes:
a target for a hardware-counter profiler, e.g.

    ncu --clock-control none --nvtx --nvtx-include "probe/" --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats python3 -m bench._probe_mae

The first `--warmup` rounds compile the kernels; the rounds after run inside the NVTX range "probe",
so the counters cover only warm launches and say how close each kernel comes to DRAM bandwidth and
what its warps wait on. NVTX ranges belong to a thread, and autograd runs the backward kernels on a
thread of its own, so the range holds the forwards only: for the backwards, filter by kernel name
instead (e.g. `-k regex:_bwd --launch-skip 2`). The reference is an elementwise kernel (y = x * 1,
bf16; a plain `copy_` would be a memcpy, which the profiler does not count).
"""
from __future__ import annotations

import argparse

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="rounds before the profiled one")
    p.add_argument("--rounds", type=int, default=1, help="profiled rounds")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run (TRITON_INTERPRET=1, a small --batch)")
    a = p.parse_args(argv)
    import kernels

    dev = a.device
    dt = torch.bfloat16 if dev == "cuda" else torch.float32  # the interpreter's bf16 is slow and partial
    nvtx = torch.cuda.nvtx if dev == "cuda" else None
    B, N, C, Cd, ps, ratio = a.batch, 196, 1024, 512, 16, 0.75
    K = int(N * (1 - ratio))
    tokens = torch.randn(B, N, C, device=dev, dtype=dt, requires_grad=True)
    pos = torch.randn(1, N, C, device=dev, dtype=dt)  # fixed (the engine's sin-cos): no pos gradient
    noise = torch.rand(B, N, device=dev)
    gvis = torch.randn(B, K, C, device=dev, dtype=dt)
    vis = torch.randn(B, K, Cd, device=dev, dtype=dt, requires_grad=True)
    mt = torch.randn(Cd, device=dev, dtype=dt, requires_grad=True)
    dpos = torch.randn(1, N, Cd, device=dev, dtype=dt)
    gfull = torch.randn(B, N, Cd, device=dev, dtype=dt)
    imgs = torch.randn(B, 3, 224, 224, device=dev, dtype=dt)
    pred = torch.randn(B, N, ps * ps * 3, device=dev, dtype=dt, requires_grad=True)
    src = torch.randn((B * N * Cd + B * K * Cd) // 2, device=dev, dtype=dt)  # read + written = the unmask fwd's bytes
    dst = torch.empty_like(src)
    for r in range(a.warmup + a.rounds):
        if r == a.warmup and nvtx:
            nvtx.range_push("probe")
        visible, ids, mask = kernels.mae_mask(tokens, pos, ratio, noise=noise, impl="triton")
        torch.autograd.grad(visible, tokens, gvis)
        full = kernels.mae_unmask(vis, ids, mt, dpos, impl="triton")
        torch.autograd.grad(full, (vis, mt), gfull)
        for layout in ("pqc", "cpq"):
            loss = kernels.mae_loss(imgs, pred, mask, ps, impl="triton", layout=layout)
            torch.autograd.grad(loss, pred)
        torch.mul(src, 1, out=dst)
        if nvtx:
            torch.cuda.synchronize()
        print(f"round {r} done", flush=True)
    if nvtx:
        nvtx.range_pop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
