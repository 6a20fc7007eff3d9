"""MAE's pixel loss in one pass over the pixels.

    loss = mae_loss(imgs, pred, mask, patch_size, norm_pix=True, eps=1e-6)

imgs [B, C, H, W]; pred [B, N, p*p*C] in MAE's patchify order, layout "pqc"
(pred[b, i*w + j, (pi*p + pj)*C + c] is pixel (c, i*p + pi, j*p + pj)), or channel-major, layout "cpq"
(pred[b, i*w + j, (c*p + pi)*p + pj]: each channel's patch rows as in the image, so the kernel reads
the image in contiguous row pieces instead of gathering it across the channel planes; a model whose
last linear layer emits that order learns the same function); mask [B, N], 1 = masked.
Target = the patch normalized by its own mean and unbiased variance (+ eps, sqrt) when
norm_pix; loss = sum over masked patches of mean((pred - target)^2) / sum(mask).

The kernel reads each patch straight from the image (no patchify copy), and skips the pixels
of unmasked patches entirely (their gradient is zero): with MAE's 75 % masking it touches
3/4 of the pixels. The backward recomputes the target from the image instead of saving it.
The forward's per-program partial sums are reduced by a second one-program kernel into the
loss and sum(mask) (no per-patch vector, no torch reductions); sum(mask) is an output of the
forward op, saved for the backward, which divides by it in-kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import triton_version
from kernels.host import cdiv, next_power_of_2
from kernels.pdl import launch_options, pdl_enter, use_pdl


LAYOUTS = ("pqc", "cpq")  # pred's element order within a patch (see the module docstring)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")


def patchify(imgs: torch.Tensor, p: int, layout: str = "pqc") -> torch.Tensor:
    _check_layout(layout)
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc" if layout == "pqc" else "nchpwq->nhwcpq", x)
    return x.reshape(B, h * w, p * p * C)


def mae_loss_reference(imgs, pred, mask, patch_size, *, norm_pix=True, eps=1e-6, layout="pqc"):
    target = patchify(imgs, patch_size, layout).float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    loss = ((pred.float() - target) ** 2).mean(dim=-1)
    m = mask.float()
    return (loss * m).sum() / m.sum()


# Budget (H200, B = 256, 224 px, p = 16, 75 % masked, bf16): the bytes fwd+bwd must move are
# 2 x 0.75 x (image 77 MB + pred 77 MB) read + dpred 77 MB written = 308 MB: 73 us at copy
# bandwidth, 104 us at the 70 % target; this kernel takes 135 us (54 % of copy).
#
# `_loss_rows` (recompute in the backward): a program takes BP consecutive patches at once as
# [BP, P*P] tiles, one per channel chunk, in pred's natural order: chunk ch holds the pred
# elements e = ch*P*P + r of each patch, contiguous, so pred loads/stores are 16-byte vectors;
# the image is gathered with offsets computed once per program from e (c = e % C,
# pixel = e // C, constexpr strides). Patch statistics are row reductions (one warp per patch
# row for BP = warps). All loads of all BP patches are issued before the first reduction (one
# memory round trip per program, BP x 3 KB in flight), and unmasked patches are masked loads
# (no bytes moved; the backward stores their zeros). Launches: forward main + finish (the
# finish also writes sum(mask), an output of the op saved for the backward: no torch reduction
# in the backward), backward main: 3 + the autograd ones for grad=None.
# Measured slower on the H200 and dropped: one warp walking 4 patches one after the other
# (0.281 ms: two dependent memory round trips per patch, latency-bound), a fused version
# whose forward also writes the unit gradient for a one-kernel scaling backward (0.144 ms: 12 %
# more bytes), and each patch loaded in the image's own order (16-byte vectors) then reordered
# in registers with tl.gather (8.0 ms: the gather lowers to a slow path), vs 0.135 ms for this one.
# Split (same run): forward 0.070 ms (its main kernel reads 115 MB at ~1.8 TB/s: the pixel
# gather, 2-byte loads across three planes, bounds it), backward 0.064 ms (also writes 77 MB).


@triton.jit
def _rows_load(IMG, PRED, ibase, pbase, r, ld, CH: tl.constexpr, C: tl.constexpr, P: tl.constexpr,
               si_c: tl.constexpr, si_h: tl.constexpr, si_w: tl.constexpr, CPQ: tl.constexpr):
    e = CH * P * P + r  # element of the patch in pred's order
    if CPQ:  # channel-major: chunk CH is channel CH, r its pixel in row order (contiguous row pieces)
        ioff = CH * si_c + (r // P) * si_h + (r % P) * si_w
    else:  # MAE's order (pixel-major, channel fastest): gathered across the channel planes
        pix = e // C
        ioff = (e % C) * si_c + (pix // P) * si_h + (pix % P) * si_w
    t = tl.load(IMG + ibase[:, None] + ioff[None, :], mask=ld, other=0.0).to(tl.float32)
    x = tl.load(PRED + pbase[:, None] + e[None, :], mask=ld, other=0.0).to(tl.float32)
    return t, x


@triton.jit
def _rows_center(t, mean, ld, FULL: tl.constexpr):
    t = t - mean[:, None]
    if not FULL:  # padded elements (P*P not a power of two) must not enter the variance
        t = tl.where(ld, t, 0.0)
    return t


@triton.jit
def _loss_rows(IMG, PRED, MASK, PART, DPRED, GOUT, MSUM, N, W_PATCHES, G, eps,
               si_b: tl.constexpr, si_c: tl.constexpr, si_h: tl.constexpr, si_w: tl.constexpr,
               sp_b: tl.constexpr, sp_n: tl.constexpr,
               C: tl.constexpr, P: tl.constexpr, PAP: tl.constexpr, BP: tl.constexpr,
               NORM: tl.constexpr, BACKWARD: tl.constexpr, PDL: tl.constexpr, CPQ: tl.constexpr = False):
    pdl_enter(PDL)
    # forward: per-program partial sums (loss, sum(mask)); backward: dpred (scaled by gout / sum(mask))
    L: tl.constexpr = C * P * P
    PA: tl.constexpr = P * P
    FULL: tl.constexpr = PA == PAP
    pid = tl.program_id(0)
    g = pid * BP + tl.arange(0, BP)
    ok_g = g < G
    m = tl.load(MASK + g, mask=ok_g, other=0).to(tl.float32)
    b = (g // N).to(tl.int64)
    n = g % N
    ibase = b * si_b + (n // W_PATCHES) * (P * si_h) + (n % W_PATCHES) * (P * si_w)
    pbase = b * sp_b + n * sp_n
    r = tl.arange(0, PAP)
    ok_r = r < PA
    ld = (m != 0.0)[:, None] & ok_r[None, :]  # unmasked patches: no bytes loaded
    t0, x0 = _rows_load(IMG, PRED, ibase, pbase, r, ld, 0, C, P, si_c, si_h, si_w, CPQ)
    if C > 1:
        t1, x1 = _rows_load(IMG, PRED, ibase, pbase, r, ld, 1, C, P, si_c, si_h, si_w, CPQ)
    if C > 2:
        t2, x2 = _rows_load(IMG, PRED, ibase, pbase, r, ld, 2, C, P, si_c, si_h, si_w, CPQ)
    if C > 3:
        t3, x3 = _rows_load(IMG, PRED, ibase, pbase, r, ld, 3, C, P, si_c, si_h, si_w, CPQ)
    if NORM:
        s = t0
        if C > 1:
            s += t1
        if C > 2:
            s += t2
        if C > 3:
            s += t3
        mean = tl.sum(s, 1) / L
        t0 = _rows_center(t0, mean, ld, FULL)
        v = t0 * t0
        if C > 1:
            t1 = _rows_center(t1, mean, ld, FULL)
            v += t1 * t1
        if C > 2:
            t2 = _rows_center(t2, mean, ld, FULL)
            v += t2 * t2
        if C > 3:
            t3 = _rows_center(t3, mean, ld, FULL)
            v += t3 * t3
        rstd = tl.rsqrt(tl.sum(v, 1) / (L - 1) + eps)[:, None]
    else:
        rstd = 1.0
    d0 = x0 - t0 * rstd
    if C > 1:
        d1 = x1 - t1 * rstd
    if C > 2:
        d2 = x2 - t2 * rstd
    if C > 3:
        d3 = x3 - t3 * rstd
    if not BACKWARD:
        e2 = d0 * d0
        if C > 1:
            e2 += d1 * d1
        if C > 2:
            e2 += d2 * d2
        if C > 3:
            e2 += d3 * d3
        tl.store(PART + pid, tl.sum(tl.sum(e2, 1) * m, 0) / L)
        tl.store(PART + tl.num_programs(0) + pid, tl.sum(m, 0))
    if BACKWARD:
        w = (tl.load(GOUT).to(tl.float32) / tl.load(MSUM).to(tl.float32) * (2.0 / L)) * m
        w = w[:, None]
        st = ok_g[:, None] & ok_r[None, :]  # every patch's row is written (zeros when unmasked)
        out = DPRED + (g.to(tl.int64) * L)[:, None] + r[None, :]  # dpred is contiguous
        ty = DPRED.dtype.element_ty
        tl.store(out, (d0 * w).to(ty), mask=st)
        if C > 1:
            tl.store(out + PA, (d1 * w).to(ty), mask=st)
        if C > 2:
            tl.store(out + 2 * PA, (d2 * w).to(ty), mask=st)
        if C > 3:
            tl.store(out + 3 * PA, (d3 * w).to(ty), mask=st)


@triton.jit
def _loss_finish(PART, OUT, MSUM, NPROG, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    # reduces the forward's partial sums: the loss, and sum(mask) for the backward
    acc_l = tl.zeros([BLOCK], tl.float32)
    acc_m = tl.zeros([BLOCK], tl.float32)
    for i in range(0, NPROG, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc_l += tl.load(PART + offs, mask=offs < NPROG, other=0.0)
        acc_m += tl.load(PART + NPROG + offs, mask=offs < NPROG, other=0.0)
    msum = tl.sum(acc_m)
    tl.store(OUT, tl.sum(acc_l) / msum)
    tl.store(MSUM, msum)


MAX_CHANNELS = 4  # channel chunks are unrolled in _loss_rows
PATCHES_PER_PROGRAM = 4  # BP; one warp per patch row
NUM_WARPS = 4


def _launch(imgs, pred, m, p, eps, norm_pix, backward, gout=None, msum=None, cpq=False):
    """Forward: (loss, sum(mask)) fp32 scalars. Backward: dpred = d loss / d pred * gout (contiguous)."""
    B, C, H, W = imgs.shape
    if C > MAX_CHANNELS:
        raise ValueError(f"the mae_loss kernel takes at most {MAX_CHANNELS} channels, got {C}")
    N = pred.shape[1]
    G = B * N
    grid = cdiv(G, PATCHES_PER_PROGRAM)
    dev = pred.device
    dpred = torch.empty(pred.shape, device=dev, dtype=pred.dtype) if backward else pred
    if not backward:
        loss = torch.empty((), device=dev, dtype=torch.float32)
        msum = torch.empty((), device=dev, dtype=torch.float32)
        part = torch.empty(2 * grid, device=dev, dtype=torch.float32)
        gout = msum
    else:
        part = dpred
    if G:
        pdl = launch_options(use_pdl(pred))
        si = imgs.stride()
        _loss_rows[(grid,)](
            imgs, pred, m, part, dpred, gout, msum, N, W // p, G, eps,
            si_b=si[0], si_c=si[1], si_h=si[2], si_w=si[3], sp_b=pred.stride(0), sp_n=pred.stride(1),
            C=C, P=p, PAP=next_power_of_2(p * p), BP=PATCHES_PER_PROGRAM, NORM=norm_pix,
            BACKWARD=backward, CPQ=cpq, num_warps=NUM_WARPS, **pdl)
        if not backward:
            bl = min(next_power_of_2(grid), 16384)
            _loss_finish[(1,)](part, loss, msum, grid, BLOCK=bl, num_warps=16 if bl >= 8192 else 4, **pdl)
    elif not backward:
        loss.fill_(float("nan"))  # 0 / 0, as the reference
        msum.zero_()
    return dpred if backward else (loss, msum)


def _pred_rows(pred):
    # the kernel reads pred with its batch / patch strides and unit element stride, and writes dpred
    # contiguous (indexed by patch * L, not by pred's strides): a sliced pred is safe
    return pred if pred.stride(-1) == 1 else pred.contiguous()


# torch.library custom ops: opaque to torch.compile (the engine compiles the whole objective).


@torch.library.custom_op("vfm::mae_loss", mutates_args=())
def _loss_op(imgs: torch.Tensor, pred: torch.Tensor, m: torch.Tensor, p: int, norm_pix: bool,
             eps: float, cpq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, sum(mask) fp32): the sum is saved for the backward."""
    return _launch(imgs, _pred_rows(pred), m.contiguous(), p, eps, norm_pix, backward=False, cpq=cpq)


@_loss_op.register_fake
def _(imgs, pred, m, p, norm_pix, eps, cpq):
    return pred.new_empty((), dtype=torch.float32), pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("vfm::mae_loss_bwd", mutates_args=())
def _loss_bwd_op(gout: torch.Tensor, msum: torch.Tensor, imgs: torch.Tensor, pred: torch.Tensor,
                 m: torch.Tensor, p: int, norm_pix: bool, eps: float, cpq: bool) -> torch.Tensor:
    # recomputes the target from the image instead of saving it; divides gout by sum(mask) in-kernel
    return _launch(imgs, _pred_rows(pred), m.contiguous(), p, eps, norm_pix, backward=True, gout=gout, msum=msum,
                   cpq=cpq)


@_loss_bwd_op.register_fake
def _(gout, msum, imgs, pred, m, p, norm_pix, eps, cpq):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _loss_setup(ctx, inputs, output):
    imgs, pred, m, p, norm_pix, eps, cpq = inputs
    ctx.save_for_backward(imgs, pred, m, output[1])
    ctx.cfg = (p, norm_pix, eps, cpq)
    ctx.set_materialize_grads(False)  # sum(mask) takes no gradient: no zero scalar filled for it every backward


def _loss_backward(ctx, gout, dmsum):
    if gout is None:
        return None, None, None, None, None, None, None
    imgs, pred, m, msum = ctx.saved_tensors
    return None, _loss_bwd_op(gout, msum, imgs, pred, m, *ctx.cfg), None, None, None, None, None


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


def mae_loss(imgs, pred, mask, patch_size, *, norm_pix=True, eps=1e-6, impl="auto", layout="pqc"):
    """MAE norm-pix MSE over masked patches; differentiable w.r.t. pred. layout: pred's order within a
    patch, "pqc" (MAE's patchify) or "cpq" (channel-major: see the module docstring)."""
    impl = triton_version.resolve(impl, pred)
    _check_layout(layout)
    B, C, H, W = imgs.shape
    p = int(patch_size)
    if H % p or W % p or pred.shape != (B, (H // p) * (W // p), p * p * C) or mask.shape != pred.shape[:2]:
        raise ValueError(f"shapes disagree: imgs {tuple(imgs.shape)}, pred {tuple(pred.shape)}, "
                         f"mask {tuple(mask.shape)}, patch {p}")
    if impl == "torch" or C > MAX_CHANNELS:  # images have 1 or 3 channels; more fall back to torch
        return mae_loss_reference(imgs, pred, mask, p, norm_pix=norm_pix, eps=eps, layout=layout)
    m = mask.reshape(-1)
    if m.dtype != torch.bool:  # a bool mask goes to the kernel as is (no conversion kernel)
        m = m.to(torch.float32)
    return _loss_op(imgs.detach(), pred, m, p, bool(norm_pix), float(eps), layout == "cpq")[0]
