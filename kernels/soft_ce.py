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

Targets may also come as FactoredTargets (row x col x exp((logits - shift) x inv_temp), what kernels.sinkhorn_knopp
returns with factored=True): the kernels then make each target as they read the logits, and the [M, K] fp32 targets
are never written. H200, [20,000 x 65,536]: 4.83 ms fwd+bwd against written-out targets vs the torch form's 29.0;
with Sinkhorn's factored targets, both 8.91 ms vs 56.5 in torch (kernels/README.md). The DINOv2 objective runs it with
our kernels (`objective.dinov2.fused_ce`, on by default).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from kernels import triton_version
from kernels.host import next_power_of_2

# elements of a row per step and warps per program (one program a row)
LAUNCH = {"block": 4096, "warps": 8}
_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x log2(e)); kernels/sinkhorn.py's passes use it too
_NEG = tl.constexpr(-1.0e30)  # the running max's start: finite, so that exp(m_old - m_new) is never inf - inf


def soft_cross_entropy_reference(scores: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
    """[M] fp32: -(targets * log_softmax(scores / temp)).sum(-1), as DINOv2's losses write it."""
    return -(targets.float() * torch.log_softmax(scores.float() / temp, dim=-1)).sum(-1)


@triton.jit
def _target(T, TR, TC, SHIFT, TINV, row, k, ok, t_row, FACTORED: tl.constexpr):
    """One step of row `row`'s targets: loaded, or (FACTORED) row[m] x col[k] x exp((logits[m, k] - shift) x tinv)."""
    if FACTORED:
        x = tl.load(T + row * t_row + k, mask=ok, other=0.0).to(tl.float32)
        e = tl.exp2((x - tl.load(SHIFT)) * (tl.load(TINV) * _LOG2E))
        t = tl.where(ok, e * tl.load(TC + k, mask=ok, other=0.0), 0.0) * tl.load(TR + row)
    else:
        t = tl.load(T + row * t_row + k, mask=ok, other=0.0).to(tl.float32)
    return t


@triton.jit
def _lse_step(m, l, x, ok):
    """One step of a per-lane online log-sum-exp: the running max m and sum of exp(x - m) l, with x's lanes (ok)."""
    x_max = tl.where(ok, x, _NEG)
    m_new = tl.maximum(m, x_max)
    l = l * tl.exp(m - m_new) + tl.where(ok, tl.exp(x_max - m_new), 0.0)  # (a lane never loaded: exp(0), dropped)
    return m_new, l


@triton.jit
def _lse_total(m, l):
    """The log-sum-exp of the row from its lanes' running maxima and sums."""
    top = tl.max(m, 0)
    return top + tl.log(tl.sum(l * tl.exp(m - top), 0))


@triton.jit
def _soft_ce_fwd(S, T, TR, TC, SHIFT, TINV, CE, LSE, TSUM, K, s_row, t_row, inv_temp, BLOCK: tl.constexpr,
                 FACTORED: tl.constexpr):
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
        t = _target(T, TR, TC, SHIFT, TINV, row, k, ok, t_row, FACTORED)
        m, l = _lse_step(m, l, x, ok)
        ts += t
        tx += t * x
    lse = _lse_total(m, l)
    tsum = tl.sum(ts, 0)
    tl.store(LSE + row, lse)
    tl.store(TSUM + row, tsum)
    tl.store(CE + row, lse * tsum - tl.sum(tx, 0))


@triton.jit
def _soft_ce_bwd(G, S, T, TR, TC, SHIFT, TINV, LSE, TSUM, DS, K, s_row, t_row, ds_row, inv_temp, BLOCK: tl.constexpr,
                 FACTORED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    g = tl.load(G + row).to(tl.float32) * inv_temp
    lse = tl.load(LSE + row)
    tsum = tl.load(TSUM + row)
    for k0 in range(0, K, BLOCK):
        k = k0 + offs
        ok = k < K
        x = tl.load(S + row * s_row + k, mask=ok, other=0.0).to(tl.float32) * inv_temp
        t = _target(T, TR, TC, SHIFT, TINV, row, k, ok, t_row, FACTORED)
        ds = g * (tl.exp(x - lse) * tsum - t)
        tl.store(DS + row * ds_row + k, ds.to(DS.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _factors(targets, row, col, shift, tinv):
    """The kernels' target arguments: (T, TR, TC, SHIFT, TINV, FACTORED). Dense targets fill the factor slots with
    themselves (never read: FACTORED is a constexpr)."""
    if row is None:
        return targets, targets, targets, targets, targets, False
    return targets, row.contiguous(), col.contiguous(), shift, tinv, True


Factor = Optional[torch.Tensor]


@torch.library.custom_op("vfm::soft_ce", mutates_args=())
def _soft_ce_op(scores: torch.Tensor, targets: torch.Tensor, row: Factor, col: Factor, shift: Factor, tinv: Factor,
                inv_temp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce [M] fp32; lse [M] fp32, the log-sum-exp of scores / temp, and sum(targets) [M] fp32: both saved for the
    backward, so that it reads each row once). With row / col / shift / tinv, `targets` are the logits of
    FactoredTargets."""
    scores, targets = _rows(scores), _rows(targets)
    M, K = scores.shape
    ce, lse, tsum = (torch.empty(M, device=scores.device, dtype=torch.float32) for _ in range(3))
    if M and K:
        block = min(LAUNCH["block"], next_power_of_2(K))
        *t, factored = _factors(targets, row, col, shift, tinv)
        _soft_ce_fwd[(M,)](scores, *t, ce, lse, tsum, K, scores.stride(0), targets.stride(0), inv_temp,
                           BLOCK=block, FACTORED=factored, num_warps=LAUNCH["warps"])
    elif M:  # no classes: nothing to predict, no loss
        ce.zero_()
        lse.fill_(float("-inf"))
        tsum.zero_()
    return ce, lse, tsum


@_soft_ce_op.register_fake
def _(scores, targets, row, col, shift, tinv, inv_temp):
    M = scores.shape[0]
    return tuple(scores.new_empty(M, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("vfm::soft_ce_bwd", mutates_args=())
def _soft_ce_bwd_op(gce: torch.Tensor, scores: torch.Tensor, targets: torch.Tensor, row: Factor, col: Factor,
                    shift: Factor, tinv: Factor, lse: torch.Tensor, tsum: torch.Tensor,
                    inv_temp: float) -> torch.Tensor:
    scores, targets = _rows(scores), _rows(targets)
    M, K = scores.shape
    ds = torch.empty(M, K, device=scores.device, dtype=scores.dtype)
    if M and K:
        block = min(LAUNCH["block"], next_power_of_2(K))
        *t, factored = _factors(targets, row, col, shift, tinv)
        _soft_ce_bwd[(M,)](gce.contiguous(), scores, *t, lse, tsum, ds, K, scores.stride(0), targets.stride(0),
                           ds.stride(0), inv_temp, BLOCK=block, FACTORED=factored, num_warps=LAUNCH["warps"])
    return ds


@_soft_ce_bwd_op.register_fake
def _(gce, scores, targets, row, col, shift, tinv, lse, tsum, inv_temp):
    return scores.new_empty(scores.shape)


def _setup(ctx, inputs, output):
    scores, targets, row, col, shift, tinv, inv_temp = inputs
    ctx.save_for_backward(scores, targets, row, col, shift, tinv, output[1], output[2])
    ctx.inv_temp = inv_temp
    ctx.set_materialize_grads(False)  # lse and sum(targets) take no gradient


def _backward(ctx, gce, glse, gtsum):
    if gce is None:
        return (None,) * 7
    scores, targets, row, col, shift, tinv, lse, tsum = ctx.saved_tensors
    ds = _soft_ce_bwd_op(gce, scores, targets, row, col, shift, tinv, lse, tsum, ctx.inv_temp)
    return (ds,) + (None,) * 6


_soft_ce_op.register_autograd(_backward, setup_context=_setup)


class FactoredTargets(NamedTuple):
    """Targets [M, K] kept as factors, never written out: targets[m, k] = row[m] x col[k] x exp((logits[m, k] - shift)
    x inv_temp). Sinkhorn-Knopp's (kernels.sinkhorn_knopp(..., factored=True)) are of this form, and so is a softmax
    (row = 1 / its sum, col = 1). logits [M, K] any float dtype; row [M], col [K], shift [1], inv_temp [1] fp32 (device
    tensors: a scheduled temperature costs no host sync)."""
    logits: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    shift: torch.Tensor
    inv_temp: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.logits.shape

    def dense(self) -> torch.Tensor:
        """The [M, K] fp32 targets, written out (the torch path; tests)."""
        return (self.logits.float() - self.shift).mul_(self.inv_temp).exp_().mul_(self.col).mul_(self.row[:, None])


def soft_cross_entropy(scores: torch.Tensor, targets: torch.Tensor | FactoredTargets, temp: float, *,
                       impl: str = "auto") -> torch.Tensor:
    """[M] fp32: -sum_k targets[m, k] * log_softmax(scores[m] / temp)[k]; differentiable w.r.t. scores (targets take no
    gradient). targets: [M, K], or FactoredTargets (generated in the kernels as they are read: the [M, K] fp32 matrix
    is never written). impl: "triton" (one pass over each row forward, one backward), "torch" (the reference), "auto"
    (triton on CUDA under a verified Triton)."""
    if scores.dim() != 2 or targets.shape != scores.shape:
        raise ValueError(f"scores and targets must be [M, K] of one shape; got {tuple(scores.shape)} and "
                         f"{tuple(targets.shape)}")
    temp = float(temp)
    if not temp > 0:
        raise ValueError(f"temp must be > 0; got {temp}")
    factored = isinstance(targets, FactoredTargets)
    if factored and (targets.row.shape != scores.shape[:1] or targets.col.shape != scores.shape[1:]):
        raise ValueError(f"FactoredTargets: row {tuple(targets.row.shape)} and col {tuple(targets.col.shape)} do not "
                         f"fit scores {tuple(scores.shape)}")
    if triton_version.resolve(impl, scores) == "torch":
        return soft_cross_entropy_reference(scores, targets.dense() if factored else targets.detach(), temp)
    return _soft_ce_op(scores, *_target_operands(targets), 1.0 / temp)[0]


def _target_operands(targets: torch.Tensor | FactoredTargets) -> tuple:
    """The custom ops' target operands (targets or logits, row, col, shift, inv_temp), detached: FactoredTargets' own,
    shift and inv_temp as [1] fp32; written-out targets with the factor slots None."""
    if isinstance(targets, FactoredTargets):
        t = FactoredTargets(*(x.detach() for x in targets))
        return t.logits, t.row, t.col, t.shift.float().reshape(1), t.inv_temp.float().reshape(1)
    return targets.detach(), None, None, None, None


# ----------------------------------------------------------------------------- DINO's crop pairs
# DINO's class-token loss compares every student crop v with every teacher (global) crop g of the same image b:
# ce[g, v, b] = -sum_k targets[g, b, k] * log_softmax(scores[v, b] / temp)[k]. Written in torch (engine's dino_loss)
# it makes an fp32 copy of the [V, B, K] scores, divides it, writes log_softmax and permutes it for the einsum, and
# as many passes backward. Here one program takes one student row and the G target rows of its image: an online
# log-sum-exp beside G sums of targets x scores / temp, ce = lse x sum(t) - sum(t x s) / temp for each g. Programs
# run image by image (the V rows of an image next to each other), so each image's target rows are read from memory
# once and from L2 by the other crops.


@triton.jit
def _crop_ce_fwd(S, T, TR, TC, SHIFT, TINV, CE, LSE, TSUM, V, B, K, s_row, t_row, inv_temp, G: tl.constexpr,
                 GP: tl.constexpr, BLOCK: tl.constexpr, FACTORED: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // V
    v = pid % V
    offs = tl.arange(0, BLOCK)
    g = tl.arange(0, GP)
    rows = (tl.where(g < G, g, 0) * B + b)[:, None]  # [GP, 1] target rows (padding rows read row b, then dropped)
    g_ok = (g < G)[:, None]
    m = tl.full([BLOCK], _NEG, tl.float32)
    l = tl.zeros([BLOCK], tl.float32)
    ts = tl.zeros([GP, BLOCK], tl.float32)
    tx = tl.zeros([GP, BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + offs
        ok = k < K
        x = tl.load(S + (v * B + b) * s_row + k, mask=ok, other=0.0).to(tl.float32) * inv_temp
        t = _target(T, TR, TC, SHIFT, TINV, rows, k[None, :], g_ok & ok[None, :], t_row, FACTORED)
        m, l = _lse_step(m, l, x, ok)
        ts += t
        tx += t * x[None, :]
    lse = _lse_total(m, l)
    tsum = tl.sum(ts, 1)  # [GP]
    tl.store(LSE + v * B + b, lse)
    tl.store(TSUM + g * B + b, tsum, mask=(g < G) & (v == 0))
    tl.store(CE + (g * V + v) * B + b, lse * tsum - tl.sum(tx, 1), mask=g < G)


@triton.jit
def _crop_ce_bwd(GCE, S, T, TR, TC, SHIFT, TINV, LSE, TSUM, DS, V, B, K, s_row, t_row, ds_row, inv_temp,
                 G: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, FACTORED: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // V
    v = pid % V
    offs = tl.arange(0, BLOCK)
    g = tl.arange(0, GP)
    rows = (tl.where(g < G, g, 0) * B + b)[:, None]
    g_ok = (g < G)[:, None]
    # d scores[k] = (sum_g gce[g] (sum(t_g) softmax(s / temp)[k] - t_g[k])) / temp
    gce = tl.load(GCE + (g * V + v) * B + b, mask=g < G, other=0.0).to(tl.float32) * inv_temp  # [GP]
    a = tl.sum(gce * tl.load(TSUM + g * B + b, mask=g < G, other=0.0), 0)
    lse = tl.load(LSE + v * B + b)
    for k0 in range(0, K, BLOCK):
        k = k0 + offs
        ok = k < K
        x = tl.load(S + (v * B + b) * s_row + k, mask=ok, other=0.0).to(tl.float32) * inv_temp
        t = _target(T, TR, TC, SHIFT, TINV, rows, k[None, :], g_ok & ok[None, :], t_row, FACTORED)
        ds = a * tl.exp(x - lse) - tl.sum(gce[:, None] * t, 0)
        tl.store(DS + (v * B + b) * ds_row + k, ds.to(DS.dtype.element_ty), mask=ok)


def _crop_dims(scores: torch.Tensor, targets: torch.Tensor, groups: int) -> tuple[int, int, int, int]:
    """(G, V, B, K) of the ops' flat operands: scores [V * B, K] crop-major, targets [G * B, K], G = groups."""
    B = targets.shape[0] // groups
    return groups, scores.shape[0] // B if B else 0, B, scores.shape[1]


def _crop_launch(K: int, G: int) -> tuple[int, int]:
    """(GP, BLOCK): the target rows padded to a power of two, and a step of LAUNCH["block"] elements in all."""
    gp = next_power_of_2(G)
    return gp, max(16, min(LAUNCH["block"] // gp, next_power_of_2(K)))


@torch.library.custom_op("vfm::crop_ce", mutates_args=())
def _crop_ce_op(scores: torch.Tensor, targets: torch.Tensor, row: Factor, col: Factor, shift: Factor, tinv: Factor,
                groups: int, inv_temp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce [G, V, B] fp32; lse [V * B], sum(targets) [G * B], both fp32 and saved for the backward). scores [V * B, K]
    (crop-major rows), targets [G * B, K] (or the logits of FactoredTargets), G = groups."""
    scores, targets = _rows(scores), _rows(targets)
    G, V, B, K = _crop_dims(scores, targets, groups)
    ce = torch.empty(G, V, B, device=scores.device, dtype=torch.float32)
    lse = torch.empty(V * B, device=scores.device, dtype=torch.float32)
    tsum = torch.empty(G * B, device=scores.device, dtype=torch.float32)
    if V * B and K:
        gp, block = _crop_launch(K, G)
        *t, factored = _factors(targets, row, col, shift, tinv)
        _crop_ce_fwd[(V * B,)](scores, *t, ce, lse, tsum, V, B, K, scores.stride(0), targets.stride(0), inv_temp,
                               G=G, GP=gp, BLOCK=block, FACTORED=factored, num_warps=LAUNCH["warps"])
    elif V * B:  # no classes: nothing to predict, no loss
        ce.zero_()
        lse.fill_(float("-inf"))
        tsum.zero_()
    return ce, lse, tsum


@_crop_ce_op.register_fake
def _(scores, targets, row, col, shift, tinv, groups, inv_temp):
    G, V, B, _K = _crop_dims(scores, targets, groups)
    return (scores.new_empty(G, V, B, dtype=torch.float32), scores.new_empty(V * B, dtype=torch.float32),
            scores.new_empty(G * B, dtype=torch.float32))


@torch.library.custom_op("vfm::crop_ce_bwd", mutates_args=())
def _crop_ce_bwd_op(gce: torch.Tensor, scores: torch.Tensor, targets: torch.Tensor, row: Factor, col: Factor,
                    shift: Factor, tinv: Factor, lse: torch.Tensor, tsum: torch.Tensor, groups: int,
                    inv_temp: float) -> torch.Tensor:
    scores, targets = _rows(scores), _rows(targets)
    G, V, B, K = _crop_dims(scores, targets, groups)
    ds = torch.empty(scores.shape, device=scores.device, dtype=scores.dtype)
    if V * B and K:
        gp, block = _crop_launch(K, G)
        *t, factored = _factors(targets, row, col, shift, tinv)
        _crop_ce_bwd[(V * B,)](gce.contiguous(), scores, *t, lse, tsum, ds, V, B, K, scores.stride(0),
                               targets.stride(0), ds.stride(0), inv_temp, G=G, GP=gp, BLOCK=block, FACTORED=factored,
                               num_warps=LAUNCH["warps"])
    return ds


@_crop_ce_bwd_op.register_fake
def _(gce, scores, targets, row, col, shift, tinv, lse, tsum, groups, inv_temp):
    return scores.new_empty(scores.shape)


def _crop_setup(ctx, inputs, output):
    scores, targets, row, col, shift, tinv, groups, inv_temp = inputs
    ctx.save_for_backward(scores, targets, row, col, shift, tinv, output[1], output[2])
    ctx.groups, ctx.inv_temp = groups, inv_temp
    ctx.set_materialize_grads(False)


def _crop_backward(ctx, gce, glse, gtsum):
    if gce is None:
        return (None,) * 8
    scores, targets, row, col, shift, tinv, lse, tsum = ctx.saved_tensors
    ds = _crop_ce_bwd_op(gce, scores, targets, row, col, shift, tinv, lse, tsum, ctx.groups, ctx.inv_temp)
    return (ds,) + (None,) * 7


_crop_ce_op.register_autograd(_crop_backward, setup_context=_crop_setup)


def crop_cross_entropy_reference(scores: torch.Tensor, targets: torch.Tensor, temp: float) -> torch.Tensor:
    """[G, V, B] fp32: -(targets[g, b] * log_softmax(scores[v, b] / temp)).sum(-1) for every pair of crops; scores
    [V, B, K], targets [G, B, K]."""
    log_p = torch.log_softmax(scores.float() / temp, dim=-1)
    return -torch.einsum("gbk,vbk->gvb", targets.float(), log_p)


def crop_cross_entropy(scores: torch.Tensor, targets: torch.Tensor | FactoredTargets, temp: float, *,
                       impl: str = "auto") -> torch.Tensor:
    """DINO's class-token cross-entropy for every pair of crops of an image: [G, V, B] fp32,
    ce[g, v, b] = -sum_k targets[g, b, k] * log_softmax(scores[v, b] / temp)[k]; differentiable w.r.t. scores.

    scores [V, B, K] (the student's V crops of B images, crop-major, as DINOv2 lays them out), targets [G, B, K]
    (the teacher's G global crops) or FactoredTargets over the [G * B, K] rows (Sinkhorn's, never written out).
    impl: "triton" (one pass over each student row forward, one backward; the target rows of an image are shared by
    its crops through L2), "torch" (the reference: fp32 copies, log_softmax and an einsum), "auto" (triton on CUDA
    under a verified Triton)."""
    if scores.dim() != 3:
        raise ValueError(f"scores must be [V, B, K] (crops, images, classes); got {tuple(scores.shape)}")
    V, B, K = scores.shape
    factored = isinstance(targets, FactoredTargets)
    if factored:
        M = targets.logits.shape[0]
        if targets.logits.dim() != 2 or targets.logits.shape[1] != K or (B and M % B) or (not B and M):
            raise ValueError(f"FactoredTargets over {tuple(targets.logits.shape)} rows do not fit scores "
                             f"{tuple(scores.shape)}: they must be [G * B, K]")
        if targets.row.shape != (M,) or targets.col.shape != (K,):
            raise ValueError(f"FactoredTargets: row {tuple(targets.row.shape)} and col {tuple(targets.col.shape)} do "
                             f"not fit their logits {tuple(targets.logits.shape)}")
        G = M // B if B else 0
    else:
        if targets.dim() != 3 or targets.shape[1:] != scores.shape[1:]:
            raise ValueError(f"targets must be [G, B, K] with scores' B and K; got {tuple(targets.shape)} for scores "
                             f"{tuple(scores.shape)}")
        G = targets.shape[0]
    temp = float(temp)
    if not temp > 0:
        raise ValueError(f"temp must be > 0; got {temp}")
    if triton_version.resolve(impl, scores) == "torch" or not (G and B and V):
        dense = targets.dense().view(G, B, K) if factored else targets.detach()
        return crop_cross_entropy_reference(scores, dense, temp)
    rows = targets if factored else targets.reshape(G * B, K)
    return _crop_ce_op(scores.reshape(V * B, K), *_target_operands(rows), G, 1.0 / temp)[0]
