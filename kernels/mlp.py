"""A ViT block's MLP, fc2(gelu(fc1(x))) with the exact (erf) GELU, with its GELU and fc1's bias in our kernels.

    out = gelu_mlp(x, w1, b1, w2, b2)      # x [..., C], w1 [F, C], b1 [F], w2 [C, F], b2 [C]

The matrix products stay on cuBLAS (torch.mm); what changes is the elementwise work around them. Compiled by
inductor, a timm Mlp runs fc1 with its bias (cuBLAS), a GELU pass (read the [tokens, F] pre-activation, write its
GELU) and, backward, a pass that reads d gelu and the pre-activation and writes d pre plus the GELU again (inductor
keeps the pre-activation, not the GELU, and recomputes the GELU for fc2's weight gradient), then one more pass over
d pre for fc1's bias gradient. At DINOv2 ViT-S, batch 256, F = 1,536 over 244k student tokens, those passes took
0.55 + 0.76 + 0.27 ms a block on an H200 (bench/results/profiles/vit_s_dinov2-1gpu-prof-s-factored.txt).

Here fc1 runs without its bias; `_bias_gelu_fwd` adds it as it makes the GELU (keeping y = x w1^T for the backward),
and `_bias_gelu_bwd` reads d gelu and y once to write d y and the GELU (for fc2's weight gradient) while it sums d y's
columns into fc1's bias gradient: partial sums per chunk of rows, added by torch in a fixed order (the same bits run
to run). The bias-gradient pass is gone; the other passes move what inductor's move.

Inputs in any float dtype, one for x, w1 and w2 (under autocast the caller casts: engine.models.FusedMlp does);
GELU math in fp32. `impl`: "triton", "torch" (F.linear / F.gelu), "auto" (triton on CUDA under a verified Triton).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import triton_version

# tile [rows x columns] and warps of both kernels; the backward's column sums: rows per program (a chunk) at least
# min_chunk_rows, at most max_chunks chunks
LAUNCH = {"bm": 16, "bn": 512, "warps": 8, "min_chunk_rows": 256, "max_chunks": 256}
_RSQRT2 = tl.constexpr(0.7071067811865476)
_RSQRT2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu_parts(y, b):
    """(gelu(x), gelu'(x)) for x = y + b, in fp32."""
    x = y.to(tl.float32) + b
    cdf = 0.5 + 0.5 * tl.math.erf(x * _RSQRT2)
    return x * cdf, cdf + x * tl.exp(-0.5 * x * x) * _RSQRT2PI


# M (tokens) may change from call to call (DINOv2's packed crops, batch sizes): not specialized on divisibility
@triton.jit(do_not_specialize=["M"])
def _bias_gelu_fwd(Y, B, H, M, N, BM: tl.constexpr, BN: tl.constexpr):
    """H = gelu(Y + B) over contiguous [M, N] rows."""
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    ok = (m < M)[:, None] & (n < N)[None, :]
    at = m.to(tl.int64)[:, None] * N + n[None, :]
    b = tl.load(B + n, mask=n < N, other=0.0).to(tl.float32)
    h, _ = _gelu_parts(tl.load(Y + at, mask=ok, other=0.0), b[None, :])
    tl.store(H + at, h.to(H.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["M", "chunk_rows"])
def _bias_gelu_bwd(DH, Y, B, DY, H, P, M, N, chunk_rows, BM: tl.constexpr, BN: tl.constexpr):
    """DY = DH x gelu'(Y + B), H = gelu(Y + B), P[chunk, n] = sum over the chunk's rows of DY[m, n] (fp32)."""
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    chunk = tl.program_id(1)
    n_ok = n < N
    b = tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = tl.zeros([BM, BN], tl.float32)
    start = chunk * chunk_rows
    stop = tl.minimum(start + chunk_rows, M)
    for m0 in range(start, stop, BM):
        m = m0 + tl.arange(0, BM)
        ok = (m < stop)[:, None] & n_ok[None, :]
        at = m.to(tl.int64)[:, None] * N + n[None, :]
        h, dgelu = _gelu_parts(tl.load(Y + at, mask=ok, other=0.0), b)
        dy = tl.load(DH + at, mask=ok, other=0.0).to(tl.float32) * dgelu
        tl.store(DY + at, dy.to(DY.dtype.element_ty), mask=ok)
        tl.store(H + at, h.to(H.dtype.element_ty), mask=ok)
        acc += tl.where(ok, dy, 0.0)
    tl.store(P + chunk.to(tl.int64) * N + n, tl.sum(acc, 0), mask=n_ok)


def _blocks(N: int) -> tuple[int, int]:
    bn = min(LAUNCH["bn"], triton.next_power_of_2(N))
    return max(1, LAUNCH["bm"] * LAUNCH["bn"] // bn), bn


def _chunks(M: int, N: int) -> tuple[int, int]:
    """(chunks, rows per chunk) for the backward: enough programs to fill the card, each with whole row tiles."""
    chunks = max(1, min(LAUNCH["max_chunks"], M // LAUNCH["min_chunk_rows"]))
    bm, _ = _blocks(N)
    rows = triton.cdiv(triton.cdiv(M, chunks), bm) * bm
    return triton.cdiv(M, rows), rows


@torch.library.custom_op("vfm::gelu_mlp", mutates_args=())
def _mlp_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
            b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [M, C], y [M, F] = x w1^T, kept for the backward); x [M, C] contiguous."""
    M, F_ = x.shape[0], w1.shape[0]
    y = torch.mm(x, w1.t())
    h = torch.empty_like(y)
    if M and F_:
        bm, bn = _blocks(F_)
        _bias_gelu_fwd[(triton.cdiv(M, bm), triton.cdiv(F_, bn))](y, b1, h, M, F_, BM=bm, BN=bn,
                                                                  num_warps=LAUNCH["warps"])
    out = torch.addmm(b2.to(h.dtype), h, w2.t())
    return out, y


@_mlp_op.register_fake
def _(x, w1, b1, w2, b2):
    return x.new_empty(x.shape[0], w2.shape[0]), x.new_empty(x.shape[0], w1.shape[0])


@torch.library.custom_op("vfm::gelu_mlp_bwd", mutates_args=())
def _mlp_bwd_op(dout: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw1, db1, dw2, db2)."""
    dout = dout.contiguous()
    M, F_ = y.shape
    dh = torch.mm(dout, w2)
    dy, h = torch.empty_like(y), torch.empty_like(y)
    if M and F_:
        bm, bn = _blocks(F_)
        chunks, rows = _chunks(M, F_)
        parts = torch.empty(chunks, F_, device=y.device, dtype=torch.float32)
        _bias_gelu_bwd[(triton.cdiv(F_, bn), chunks)](dh, y, b1, dy, h, parts, M, F_, rows, BM=bm, BN=bn,
                                                      num_warps=LAUNCH["warps"])
        db1 = parts.sum(0)
    else:
        db1 = torch.zeros(F_, device=y.device, dtype=torch.float32)
    del dh
    dw2 = torch.mm(dout.t(), h)
    db2 = dout.sum(0, dtype=torch.float32)
    dw1 = torch.mm(dy.t(), x)
    dx = torch.mm(dy, w1)
    return dx, dw1, db1.to(b1.dtype), dw2, db2.to(w2.dtype)


@_mlp_bwd_op.register_fake
def _(dout, x, w1, b1, w2, y):
    return (x.new_empty(x.shape), w1.new_empty(w1.shape), b1.new_empty(b1.shape), w2.new_empty(w2.shape),
            w2.new_empty(w2.shape[0]))


def _setup(ctx, inputs, output):
    x, w1, b1, w2, b2 = inputs
    ctx.save_for_backward(x, w1, b1, w2, output[1])
    ctx.b2_dtype = b2.dtype
    ctx.set_materialize_grads(False)  # y takes no gradient


def _backward(ctx, dout, dy_unused):
    if dout is None:
        return (None,) * 5
    x, w1, b1, w2, y = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = _mlp_bwd_op(dout, x, w1, b1, w2, y)
    return dx, dw1, db1, dw2, db2.to(ctx.b2_dtype)


_mlp_op.register_autograd(_backward, setup_context=_setup)


def gelu_mlp_reference(x, w1, b1, w2, b2) -> torch.Tensor:
    """timm's Mlp (fc1, exact GELU, fc2; no dropout or norm) in torch."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def gelu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, *,
             impl: str = "auto") -> torch.Tensor:
    """fc2(gelu(fc1(x))), differentiable in every input. x [..., C], w1 [F, C], b1 [F], w2 [C, F], b2 [C]; x, w1 and
    w2 of one dtype (the output's). impl: "triton" (the GELU, fc1's bias and its gradient in our kernels, the products
    on cuBLAS), "torch" (gelu_mlp_reference), "auto" (triton on CUDA under a verified Triton)."""
    C, F_ = x.shape[-1], w1.shape[0]
    if w1.shape != (F_, C) or b1.shape != (F_,) or w2.shape != (C, F_) or b2.shape != (C,):
        raise ValueError(f"gelu_mlp: x [..., {C}] needs w1 [F, {C}], b1 [F], w2 [{C}, F], b2 [{C}]; got w1 "
                         f"{tuple(w1.shape)}, b1 {tuple(b1.shape)}, w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}")
    if not (x.dtype == w1.dtype == w2.dtype):
        raise ValueError(f"gelu_mlp: x, w1 and w2 must share a dtype; got {x.dtype}, {w1.dtype}, {w2.dtype}")
    if triton_version.resolve(impl, x) == "torch":
        return gelu_mlp_reference(x, w1, b1, w2, b2)
    out, _ = _mlp_op(x.reshape(-1, C).contiguous(), w1.contiguous(), b1.contiguous(), w2.contiguous(),
                     b2.contiguous())
    return out.view(*x.shape[:-1], C)
