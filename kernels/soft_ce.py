"""Cross-entropy against soft targets, row by row, in one pass over the scores (DINOv2's iBOT loss).

    ce = soft_cross_entropy(scores, targets, temp)      # [M] fp32

scores [M, K] (bf16 / fp16 / fp32; the student's prototype scores), targets [M, K] (the teacher's distributions,
taking no gradient), ce[m] = -sum_k targets[m, k] * log_softmax(scores[m] / temp)[k]. The torch form
(`soft_cross_entropy_reference`) makes fp32 copies of the scores, divides them, writes log_softmax, multiplies by the
targets and sums: five passes over an [M, K] matrix forward and as many backward, where iBOT's K is 65,536 and M the
masked patches of every global crop (~20k at ViT-S, batch 256: 5 GB per fp32 pass).

The kernel reads each row once forward: an online log-sum-exp of scores / temp beside the sums of targets and of
targets x scores / temp give ce = lse x sum(t) - sum(t x s) / temp, and it keeps lse (one float a row) for the
backward with sum(t). The backward reads the row once more and writes d scores = g x (softmax(s / temp) x sum(t) - t)
/ temp in the scores' dtype. Bytes moved (bf16 scores, fp32 targets): 6 bytes an element forward, 8 backward.

Not measured on a GPU yet: the DINOv2 objective takes it only with `objective.dinov2.fused_ce: true`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import triton_version

# elements of a row per step and warps per program (one program a row)
LAUNCH = {"block": 4096, "warps": 8}
_NEG = tl.constexpr(-1.0e30)  # the running max's start: finite, so that exp(m_old - m_new) is never inf - inf


def soft_cross_entropy_reference(scores: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
    """[M] fp32: -(targets * log_softmax(scores / temp)).sum(-1), as DINOv2's losses write it."""
    return -(targets.float() * torch.log_softmax(scores.float() / temp, dim=-1)).sum(-1)


@triton.jit
def _soft_ce_fwd(S, T, CE, LSE, TSUM, K, s_row, t_row, inv_temp, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], _NEG, tl.float32)  # per lane: running max, sum of exp, sum of t, sum of t x s / temp
    l = tl.zeros([BLOCK], tl.float32)
    ts = tl.zeros([BLOCK], tl.float32)
    tx = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + offs
        ok = k < K
        x = tl.load(S + row * s_row + k, mask=ok, other=0.0).to(tl.float32) * inv_temp
        t = tl.load(T + row * t_row + k, mask=ok, other=0.0).to(tl.float32)
        x_max = tl.where(ok, x, _NEG)
        m_new = tl.maximum(m, x_max)
        l = l * tl.exp(m - m_new) + tl.where(ok, tl.exp(x_max - m_new), 0.0)  # (a lane never loaded: exp(0), dropped)
        m = m_new
        ts += t
        tx += t * x
    top = tl.max(m, 0)
    lse = top + tl.log(tl.sum(l * tl.exp(m - top), 0))
    tsum = tl.sum(ts, 0)
    tl.store(LSE + row, lse)
    tl.store(TSUM + row, tsum)
    tl.store(CE + row, lse * tsum - tl.sum(tx, 0))


@triton.jit
def _soft_ce_bwd(G, S, T, LSE, TSUM, DS, K, s_row, t_row, ds_row, inv_temp, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    g = tl.load(G + row).to(tl.float32) * inv_temp
    lse = tl.load(LSE + row)
    tsum = tl.load(TSUM + row)
    for k0 in range(0, K, BLOCK):
        k = k0 + offs
        ok = k < K
        x = tl.load(S + row * s_row + k, mask=ok, other=0.0).to(tl.float32) * inv_temp
        t = tl.load(T + row * t_row + k, mask=ok, other=0.0).to(tl.float32)
        ds = g * (tl.exp(x - lse) * tsum - t)
        tl.store(DS + row * ds_row + k, ds.to(DS.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("vfm::soft_ce", mutates_args=())
def _soft_ce_op(scores: torch.Tensor, targets: torch.Tensor,
                inv_temp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce [M] fp32; lse [M] fp32, the log-sum-exp of scores / temp, and sum(targets) [M] fp32: both saved for the
    backward, so that it reads each row once)."""
    scores, targets = _rows(scores), _rows(targets)
    M, K = scores.shape
    ce, lse, tsum = (torch.empty(M, device=scores.device, dtype=torch.float32) for _ in range(3))
    if M and K:
        block = min(LAUNCH["block"], triton.next_power_of_2(K))
        _soft_ce_fwd[(M,)](scores, targets, ce, lse, tsum, K, scores.stride(0), targets.stride(0), inv_temp,
                           BLOCK=block, num_warps=LAUNCH["warps"])
    elif M:  # no classes: nothing to predict, no loss
        ce.zero_()
        lse.fill_(float("-inf"))
        tsum.zero_()
    return ce, lse, tsum


@_soft_ce_op.register_fake
def _(scores, targets, inv_temp):
    M = scores.shape[0]
    return tuple(scores.new_empty(M, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("vfm::soft_ce_bwd", mutates_args=())
def _soft_ce_bwd_op(gce: torch.Tensor, scores: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                    tsum: torch.Tensor, inv_temp: float) -> torch.Tensor:
    scores, targets = _rows(scores), _rows(targets)
    M, K = scores.shape
    ds = torch.empty(M, K, device=scores.device, dtype=scores.dtype)
    if M and K:
        block = min(LAUNCH["block"], triton.next_power_of_2(K))
        _soft_ce_bwd[(M,)](gce.contiguous(), scores, targets, lse, tsum, ds, K, scores.stride(0), targets.stride(0),
                           ds.stride(0), inv_temp, BLOCK=block, num_warps=LAUNCH["warps"])
    return ds


@_soft_ce_bwd_op.register_fake
def _(gce, scores, targets, lse, tsum, inv_temp):
    return scores.new_empty(scores.shape)


def _setup(ctx, inputs, output):
    scores, targets, inv_temp = inputs
    ctx.save_for_backward(scores, targets, output[1], output[2])
    ctx.inv_temp = inv_temp
    ctx.set_materialize_grads(False)  # lse and sum(targets) take no gradient


def _backward(ctx, gce, glse, gtsum):
    if gce is None:
        return None, None, None
    scores, targets, lse, tsum = ctx.saved_tensors
    return _soft_ce_bwd_op(gce, scores, targets, lse, tsum, ctx.inv_temp), None, None


_soft_ce_op.register_autograd(_backward, setup_context=_setup)


def soft_cross_entropy(scores: torch.Tensor, targets: torch.Tensor, temp: float, *, impl: str = "auto") -> torch.Tensor:
    """[M] fp32: -sum_k targets[m, k] * log_softmax(scores[m] / temp)[k]; differentiable w.r.t. scores (targets take no
    gradient). impl: "triton" (one pass over each row forward, one backward), "torch" (the reference), "auto" (triton
    on CUDA under a verified Triton)."""
    if scores.dim() != 2 or targets.shape != scores.shape:
        raise ValueError(f"scores and targets must be [M, K] of one shape; got {tuple(scores.shape)} and "
                         f"{tuple(targets.shape)}")
    temp = float(temp)
    if not temp > 0:
        raise ValueError(f"temp must be > 0; got {temp}")
    if triton_version.resolve(impl, scores) == "torch":
        return soft_cross_entropy_reference(scores, targets.detach(), temp)
    return _soft_ce_op(scores, targets.detach(), 1.0 / temp)[0]
