"""Sinkhorn-Knopp targets (DINOv2's centering) without writing the [M, K] matrices.

    targets = sinkhorn_knopp(logits, temp, iters)                 # [M, K] fp32, written out
    targets = sinkhorn_knopp(logits, temp, iters, factored=True)  # FactoredTargets: row [M], col [K] and the logits

Sinkhorn-Knopp rescales E = exp((logits - max) / temp) until every row sums to 1 and every column to M / K. The result
is diag(row) E diag(col), so each alternation needs only E's column sums weighted by row and its row sums weighted by
col. The torch path writes E once in fp32 and takes them as matrix-vector products over it. The Triton path never
writes E: each alternation is two reads of the logits (bf16 at the teacher's output), E computed in registers,

- `_sk_cols`: tiles of [BM rows, BK prototypes], a chunk of rows per program, partial column sums per chunk, summed
  by torch (a fixed order: the same bits run to run);
- `_sk_rows`: one row per program, its weighted sum.

With factored=True the targets stay as FactoredTargets, which kernels.soft_cross_entropy generates as it reads: iBOT's
[~20k masked patches, 65,536 prototypes] (ViT-S, batch 256) is then never written at all, where the torch path moves
~90 GB a step for it (fp32 E, its in-place passes, the matrix-vector products and the cross-entropy's reads).

M and the sums span all ranks through `all_reduce(tensor, op)` (op "sum" or "max"; in place, returning the tensor),
so the targets of a sharded batch are those of the whole batch.

`softmax_targets` is DINO's other centering, softmax((logits - center) / temp) per row, in the same factored form:
col = exp((mid(center) - center) / temp) with the shift at the logits' midrange, row = 1 / the row's sum, taken by one
`_sk_rows` pass (no [M, K] matrix either).
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from kernels import triton_version
from kernels.host import cdiv, next_power_of_2
from kernels.soft_ce import _LOG2E, FactoredTargets, _rows

# _sk_rows: elements of a row per step and warps (one program a row); _sk_cols: tile rows x prototypes, warps, and
# rows per program (a chunk), at most max_chunks chunks
LAUNCH = {"row_block": 4096, "row_warps": 8, "col_bm": 32, "col_bk": 256, "col_warps": 8, "chunk_rows": 1024,
          "max_chunks": 32}


@triton.jit
def _sk_rows(X, A, SHIFT, TINV, R, K, x_row, HAS_A: tl.constexpr, BLOCK: tl.constexpr):
    """R[m] = sum_k exp((X[m, k] - shift) x tinv) x A[k] (A = 1 without HAS_A)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    c = tl.load(TINV) * _LOG2E
    shift = tl.load(SHIFT)
    acc = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + offs
        ok = k < K
        e = tl.exp2((tl.load(X + row * x_row + k, mask=ok, other=0.0).to(tl.float32) - shift) * c)
        if HAS_A:
            e = e * tl.load(A + k, mask=ok, other=0.0)
        acc += tl.where(ok, e, 0.0)
    tl.store(R + row, tl.sum(acc, 0))


# M and the chunk's rows change every step (the masked patches): not specialized, so no step compiles a new variant
@triton.jit(do_not_specialize=["M", "chunk_rows"])
def _sk_cols(X, B, SHIFT, TINV, P, M, K, x_row, chunk_rows, BM: tl.constexpr, BK: tl.constexpr):
    """P[chunk, k] = sum over the chunk's rows m of exp((X[m, k] - shift) x tinv) x B[m]."""
    chunk = tl.program_id(1)
    k = tl.program_id(0) * BK + tl.arange(0, BK)
    k_ok = k < K
    c = tl.load(TINV) * _LOG2E
    shift = tl.load(SHIFT)
    acc = tl.zeros([BM, BK], tl.float32)
    start = chunk * chunk_rows
    stop = tl.minimum(start + chunk_rows, M)
    for m0 in range(start, stop, BM):
        m = m0 + tl.arange(0, BM)
        ok = (m < stop)[:, None] & k_ok[None, :]
        x = tl.load(X + m.to(tl.int64)[:, None] * x_row + k[None, :], mask=ok, other=0.0).to(tl.float32)
        b = tl.load(B + m, mask=m < stop, other=0.0)
        acc += tl.where(ok, tl.exp2((x - shift) * c) * b[:, None], 0.0)
    tl.store(P + chunk.to(tl.int64) * K + k, tl.sum(acc, 0), mask=k_ok)


@torch.library.custom_op("vfm::sk_rows", mutates_args=())
def _sk_rows_op(logits: torch.Tensor, col: torch.Tensor | None, shift: torch.Tensor,
                tinv: torch.Tensor) -> torch.Tensor:
    x = _rows(logits)
    M, K = x.shape
    out = torch.zeros(M, device=x.device, dtype=torch.float32)
    if M and K:
        block = min(LAUNCH["row_block"], next_power_of_2(K))
        _sk_rows[(M,)](x, x if col is None else col.contiguous(), shift, tinv, out, K, x.stride(0),
                       HAS_A=col is not None, BLOCK=block, num_warps=LAUNCH["row_warps"])
    return out


@_sk_rows_op.register_fake
def _(logits, col, shift, tinv):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def _chunks(M: int) -> tuple[int, int]:
    """(chunks, rows per chunk) for the column pass: chunk_rows rows a program, at most max_chunks chunks."""
    chunks = max(1, min(LAUNCH["max_chunks"], cdiv(M, LAUNCH["chunk_rows"])))
    return chunks, cdiv(M, chunks)


@torch.library.custom_op("vfm::sk_cols", mutates_args=())
def _sk_cols_op(logits: torch.Tensor, row: torch.Tensor, shift: torch.Tensor, tinv: torch.Tensor) -> torch.Tensor:
    x = _rows(logits)
    M, K = x.shape
    if not (M and K):
        return torch.zeros(K, device=x.device, dtype=torch.float32)
    chunks, chunk_rows = _chunks(M)
    partial = torch.empty(chunks, K, device=x.device, dtype=torch.float32)
    bk = min(LAUNCH["col_bk"], next_power_of_2(K))
    _sk_cols[(cdiv(K, bk), chunks)](x, row.contiguous(), shift, tinv, partial, M, K, x.stride(0), chunk_rows,
                                    BM=LAUNCH["col_bm"], BK=bk, num_warps=LAUNCH["col_warps"])
    return partial.sum(0)


@_sk_cols_op.register_fake
def _(logits, row, shift, tinv):
    return logits.new_empty(logits.shape[1], dtype=torch.float32)


def _identity(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    return t


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float | torch.Tensor, iters: int = 3, *,
                   all_reduce: Callable[..., torch.Tensor] | None = None, factored: bool = False,
                   impl: str = "auto") -> torch.Tensor | FactoredTargets:
    """[M, K] teacher scores -> targets: each row a distribution (sums to 1) while the K prototypes share the M samples
    (columns sum to M / K) as evenly as `iters` alternations allow. temp: a float or a device tensor (no host sync).
    all_reduce(t, op): sums ("sum") and maxima ("max") over ranks, in place (None: one process).
    factored: FactoredTargets (row, col and the logits) instead of the [M, K] fp32 matrix.
    impl: "triton" (never writes E), "torch" (E written once in fp32), "auto" (triton on CUDA)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [M, K]; got {tuple(logits.shape)}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0; got {iters}")
    red = all_reduce or _identity
    M_local, K = logits.shape
    dev = logits.device
    top = logits.amax() if logits.numel() else logits.new_full((), float("-inf"))  # a rank may hold no tokens
    shift = red(top.float().reshape(1), "max")  # one shift for all ranks leaves the result unchanged
    inv_temp = (1.0 / torch.as_tensor(temp, dtype=torch.float32, device=dev)).reshape(1)
    M = red(torch.full((1,), float(M_local), device=dev))  # a fill: no host copy (no sync)
    if triton_version.resolve(impl, logits) == "torch":
        e = (logits - shift).mul_(inv_temp).exp_()  # fp32 ([1]-shaped shift promotes), then in place
        b = (1.0 / red(e.sum().reshape(1))).expand(M_local)  # q = E / sum(E)
        a = e.new_ones(K)
        for _ in range(iters):
            a = 1.0 / (red(e.t() @ b) * K)  # every prototype gets mass 1/K: sum_m q[m, k] = a_k (E^T b)_k
            b = 1.0 / ((e @ a) * M)  # every sample gets mass 1/M
        if not factored:
            return e.mul_(a * M).mul_(b[:, None])
        return FactoredTargets(logits, b.contiguous(), a * M, shift, inv_temp)
    # The Triton path starts from b = 1, not 1 / sum(E): a scale of b cancels in the next a, so the targets are the
    # same and a pass over the logits is saved (with iters = 0 the sum is taken: there it is the only scale).
    if iters == 0:
        b = (1.0 / red(_sk_rows_op(logits, None, shift, inv_temp).sum().reshape(1))).expand(M_local)
        a = torch.ones(K, device=dev)
    else:
        b = torch.ones(M_local, device=dev)
        for _ in range(iters):
            a = 1.0 / (red(_sk_cols_op(logits, b, shift, inv_temp)) * K)
            b = 1.0 / (_sk_rows_op(logits, a, shift, inv_temp) * M)
    t = FactoredTargets(logits, b.contiguous(), a * M, shift, inv_temp)
    return t if factored else t.dense()


@torch.no_grad()
def softmax_targets(logits: torch.Tensor, center: torch.Tensor, temp: float | torch.Tensor, *, factored: bool = False,
                    impl: str = "auto") -> torch.Tensor | FactoredTargets:
    """[M, K] teacher scores -> softmax((logits - center) / temp) over each row (DINO's centering by a running center
    [K] or [1, K]). temp: a float or a device tensor (no host sync). factored: FactoredTargets (row = 1 / the row's sum,
    col = exp((mid(center) - center) / temp), shift = mid(logits); mid: the midrange) instead of the [M, K] fp32
    matrix. impl: "triton" (the row sums by one pass over the logits, never writing E), "torch", "auto" (triton on
    CUDA).

    Every factor and product is exp of a difference of midranges: exp((logits - mid(logits)) / temp) x exp((mid(center)
    - center) / temp), within exp(+-(range(logits) + range(center)) / (2 temp)), so no factor, target or row sum leaves
    fp32 while that half-range plus ln K stays under ~88: with the cosine scores of DINO's heads (within [-1, 1], and
    so are their running means) at K = 65,536, any temp above ~0.026 (DINOv2's teacher runs 0.04 -> 0.07)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [M, K]; got {tuple(logits.shape)}")
    K = logits.shape[1]
    c = center.detach().float().reshape(-1)
    if c.numel() != K:
        raise ValueError(f"center must hold one value per column ({K}); got {tuple(center.shape)}")
    dev = logits.device
    inv_temp = (1.0 / torch.as_tensor(temp, dtype=torch.float32, device=dev)).reshape(1)
    lo, hi = torch.aminmax(logits) if logits.numel() else (c.new_zeros(()),) * 2  # a rank may hold no masked tokens
    shift = ((lo.float() + hi.float()) * 0.5).reshape(1)
    c_lo, c_hi = torch.aminmax(c)
    col = (((c_lo + c_hi) * 0.5 - c) * inv_temp).exp_()
    if triton_version.resolve(impl, logits) == "torch":
        e = (logits - shift).mul_(inv_temp).exp_().mul_(col)  # fp32 ([1]-shaped shift promotes), then in place
        row = 1.0 / e.sum(1)
        if not factored:
            return e.mul_(row[:, None])
        return FactoredTargets(logits, row, col, shift, inv_temp)
    row = 1.0 / _sk_rows_op(logits, col, shift, inv_temp)
    t = FactoredTargets(logits, row, col, shift, inv_temp)
    return t if factored else t.dense()
