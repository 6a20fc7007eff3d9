"""MAE's pixel loss in one pass over the pixels.

    loss = mae_loss(imgs, pred, mask, patch_size, norm_pix=True, eps=1e-6)

imgs [B, C, H, W]; pred [B, N, p*p*C] in MAE's patchify order
(pred[b, i*w + j, (pi*p + pj)*C + c] is pixel (c, i*p + pi, j*p + pj)); mask [B, N], 1 = masked.
Target = the patch normalized by its own mean and unbiased variance (+ eps, sqrt) when
norm_pix; loss = sum over masked patches of mean((pred - target)^2) / sum(mask).

The kernel reads each patch straight from the image (no patchify copy), and skips the pixels
of unmasked patches entirely (their gradient is zero): with MAE's 75 % masking it touches
3/4 of the pixels. The backward recomputes the target from the image instead of saving it.
The forward's per-program partial sums are reduced by a second one-program kernel into the
loss (no per-patch vector, no torch reductions); the backward divides by sum(mask) in-kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, p * p * C)


def mae_loss_reference(imgs, pred, mask, patch_size, *, norm_pix=True, eps=1e-6):
    target = patchify(imgs, patch_size).float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps) ** 0.5
    loss = ((pred.float() - target) ** 2).mean(dim=-1)
    m = mask.float()
    return (loss * m).sum() / m.sum()


@triton.jit
def _load_f32(ptr, ok, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
    else:
        return tl.load(ptr).to(tl.float32)


@triton.jit
def _patch_loss(IMG, PRED, MASK, PART, DPRED, GOUT, MSUM, N, W_PATCHES, G, eps,
                si_b: tl.constexpr, si_c: tl.constexpr, si_h: tl.constexpr, si_w: tl.constexpr,
                sp_b: tl.constexpr, sp_n: tl.constexpr,
                C: tl.constexpr, P: tl.constexpr, PP: tl.constexpr, LANES: tl.constexpr,
                NORM: tl.constexpr, BACKWARD: tl.constexpr, PATCHES: tl.constexpr):
    # One warp walks PATCHES patches. A patch is C tiles [R, LANES] (one per channel) over its
    # PP * PP pixels (P padded), lanes on consecutive pixels: a warp-wide access is 2 image rows
    # (2 x 32 bytes) or 32 pixels of pred (192 contiguous bytes, stride C), so every access
    # touches 2 cache lines and no register permutation is needed between the image order and
    # pred's (pixel, channel) order. The strides are constexprs: the per-element offsets are
    # immediates of the load/store instructions. The ~10 instructions per element this leaves
    # (the version with run-time strides and masked loads needed ~30) keep the kernel memory-bound.
    # A masked patch is a scalar branch: unmasked patches load nothing (zero gradient, zero loss).
    L: tl.constexpr = C * P * P
    R: tl.constexpr = PP * PP // LANES
    MASKED: tl.constexpr = P != PP
    pid = tl.program_id(0)
    q = tl.arange(0, R)[:, None] * LANES + tl.arange(0, LANES)[None, :]
    qi = q // PP
    qj = q % PP
    ok_q = (qi < P) & (qj < P)
    # contiguity 1: the compiler must not vectorize the image (or, for C = 1, pred) accesses into
    # a layout of its own, which would cost a shared-memory conversion per tile
    img_q = tl.max_contiguous(qi * si_h + qj * si_w, [1, 1])
    pred_q = tl.max_contiguous((qi * P + qj) * C, [1, 1])
    if BACKWARD:
        w0 = tl.load(GOUT).to(tl.float32) / tl.load(MSUM).to(tl.float32) * (2.0 / L)
    acc_l = 0.0
    acc_m = 0.0
    for k in range(PATCHES):
        g = pid * PATCHES + k  # patch = b * N + n
        if g < G:
            m = tl.load(MASK + g).to(tl.float32)
            b = (g // N).to(tl.int64)
            n = g % N
            pimg = IMG + b * si_b + ((n // W_PATCHES) * (P * si_h) + (n % W_PATCHES) * (P * si_w)) + img_q
            off = b * sp_b + n * sp_n + pred_q
            if m != 0.0:
                t0 = _load_f32(pimg, ok_q, MASKED)
                x0 = _load_f32(PRED + off, ok_q, MASKED)
                if C > 1:
                    t1 = _load_f32(pimg + si_c, ok_q, MASKED)
                    x1 = _load_f32(PRED + off + 1, ok_q, MASKED)
                if C > 2:
                    t2 = _load_f32(pimg + 2 * si_c, ok_q, MASKED)
                    x2 = _load_f32(PRED + off + 2, ok_q, MASKED)
                if C > 3:
                    t3 = _load_f32(pimg + 3 * si_c, ok_q, MASKED)
                    x3 = _load_f32(PRED + off + 3, ok_q, MASKED)
                if NORM:
                    s = t0
                    if C > 1:
                        s += t1
                    if C > 2:
                        s += t2
                    if C > 3:
                        s += t3
                    mean = _sum_tile(s) / L
                    t0 = _centered(t0, mean, ok_q, MASKED)
                    v = t0 * t0
                    if C > 1:
                        t1 = _centered(t1, mean, ok_q, MASKED)
                        v += t1 * t1
                    if C > 2:
                        t2 = _centered(t2, mean, ok_q, MASKED)
                        v += t2 * t2
                    if C > 3:
                        t3 = _centered(t3, mean, ok_q, MASKED)
                        v += t3 * t3
                    rstd = tl.rsqrt(_sum_tile(v) / (L - 1) + eps)
                else:
                    rstd = 1.0
                d0 = x0 - t0 * rstd
                if C > 1:
                    d1 = x1 - t1 * rstd
                if C > 2:
                    d2 = x2 - t2 * rstd
                if C > 3:
                    d3 = x3 - t3 * rstd
                if BACKWARD:
                    w = w0 * m
                    out = DPRED + off
                    ty = DPRED.dtype.element_ty
                    tl.store(out, (d0 * w).to(ty), mask=ok_q)
                    if C > 1:
                        tl.store(out + 1, (d1 * w).to(ty), mask=ok_q)
                    if C > 2:
                        tl.store(out + 2, (d2 * w).to(ty), mask=ok_q)
                    if C > 3:
                        tl.store(out + 3, (d3 * w).to(ty), mask=ok_q)
                else:
                    e = d0 * d0
                    if C > 1:
                        e += d1 * d1
                    if C > 2:
                        e += d2 * d2
                    if C > 3:
                        e += d3 * d3
                    acc_l += _sum_tile(e) * m
            elif BACKWARD:
                zero = tl.zeros([R, LANES], DPRED.dtype.element_ty)
                for c in tl.static_range(C):
                    tl.store(DPRED + off + c, zero, mask=ok_q)
            acc_m += m
    if not BACKWARD:
        # per-program partial sums; _loss_finish reduces them (no per-patch vector, no torch sums)
        tl.store(PART + pid, acc_l / L)
        tl.store(PART + tl.num_programs(0) + pid, acc_m)


@triton.jit
def _sum_tile(x):
    return tl.sum(tl.sum(x, 0), 0)  # within threads first, then one shuffle tree


@triton.jit
def _centered(t, mean, ok, MASKED: tl.constexpr):
    t = t - mean
    if MASKED:  # padded pixels (P not a power of two) must not enter the variance
        t = tl.where(ok, t, 0.0)
    return t


@triton.jit
def _loss_finish(PART, OUT, NPROG, BLOCK: tl.constexpr):
    acc_l = tl.zeros([BLOCK], tl.float32)
    acc_m = tl.zeros([BLOCK], tl.float32)
    for i in range(0, NPROG, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc_l += tl.load(PART + offs, mask=offs < NPROG, other=0.0)
        acc_m += tl.load(PART + NPROG + offs, mask=offs < NPROG, other=0.0)
    tl.store(OUT, tl.sum(acc_l) / tl.sum(acc_m))


MAX_CHANNELS = 4  # channel tiles are unrolled in _patch_loss
PATCHES_PER_PROGRAM = 4


def _launch(imgs, pred, m, p, eps, norm_pix, backward, gout=None, msum=None):
    """Forward: the scalar loss. Backward: dpred = d loss / d pred * gout (gout, msum: 1-element tensors)."""
    B, C, H, W = imgs.shape
    if C > MAX_CHANNELS:
        raise ValueError(f"the mae_loss kernel takes at most {MAX_CHANNELS} channels, got {C}")
    N = pred.shape[1]
    G = B * N
    pp = triton.next_power_of_2(p)
    grid = triton.cdiv(G, PATCHES_PER_PROGRAM)
    if backward:
        out = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)
        part, dpred = m, out
    else:
        out = torch.empty((), device=pred.device, dtype=torch.float32)
        part, dpred, gout, msum = torch.empty(2 * grid, device=pred.device, dtype=torch.float32), pred, m, m
    if G:
        si = imgs.stride()
        _patch_loss[(grid,)](
            imgs, pred, m, part, dpred, gout, msum, N, W // p, G, eps,
            si_b=si[0], si_c=si[1], si_h=si[2], si_w=si[3], sp_b=pred.stride(0), sp_n=pred.stride(1),
            C=C, P=p, PP=pp, LANES=min(32, pp * pp), NORM=norm_pix, BACKWARD=backward,
            PATCHES=PATCHES_PER_PROGRAM, num_warps=1)
        if not backward:
            bl = min(triton.next_power_of_2(grid), 16384)
            _loss_finish[(1,)](part, out, grid, BLOCK=bl, num_warps=16 if bl >= 8192 else 4)
    elif not backward:
        out.fill_(float("nan"))  # 0 / 0, as the reference
    return out


# torch.library custom ops: opaque to torch.compile (the engine compiles the whole objective).


@torch.library.custom_op("vfm::mae_loss", mutates_args=())
def _loss_op(imgs: torch.Tensor, pred: torch.Tensor, m: torch.Tensor, p: int, norm_pix: bool,
             eps: float) -> torch.Tensor:
    pred = pred if pred.stride(-1) == 1 else pred.contiguous()
    return _launch(imgs, pred, m.contiguous(), p, eps, norm_pix, backward=False)


@_loss_op.register_fake
def _(imgs, pred, m, p, norm_pix, eps):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("vfm::mae_loss_bwd", mutates_args=())
def _loss_bwd_op(gout: torch.Tensor, imgs: torch.Tensor, pred: torch.Tensor, m: torch.Tensor, p: int,
                 norm_pix: bool, eps: float) -> torch.Tensor:
    # recomputes the target from the image instead of saving it
    pred = pred if pred.stride(-1) == 1 else pred.contiguous()
    # the kernel divides gout by sum(mask) itself: one small reduction here, no scalar arithmetic kernels
    msum = m.sum(dtype=torch.float32)
    return _launch(imgs, pred, m.contiguous(), p, eps, norm_pix, backward=True, gout=gout, msum=msum)


@_loss_bwd_op.register_fake
def _(gout, imgs, pred, m, p, norm_pix, eps):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _loss_setup(ctx, inputs, output):
    imgs, pred, m, p, norm_pix, eps = inputs
    ctx.save_for_backward(imgs, pred, m)
    ctx.cfg = (p, norm_pix, eps)


def _loss_backward(ctx, gout):
    imgs, pred, m = ctx.saved_tensors
    return None, _loss_bwd_op(gout, imgs, pred, m, *ctx.cfg), None, None, None, None


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


def mae_loss(imgs, pred, mask, patch_size, *, norm_pix=True, eps=1e-6, impl="auto"):
    """MAE norm-pix MSE over masked patches; differentiable w.r.t. pred."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    B, C, H, W = imgs.shape
    p = int(patch_size)
    if H % p or W % p or pred.shape != (B, (H // p) * (W // p), p * p * C) or mask.shape != pred.shape[:2]:
        raise ValueError(f"shapes disagree: imgs {tuple(imgs.shape)}, pred {tuple(pred.shape)}, "
                         f"mask {tuple(mask.shape)}, patch {p}")
    if impl == "auto":
        impl = "triton" if pred.is_cuda else "torch"
    if impl == "torch" or C > MAX_CHANNELS:  # images have 1 or 3 channels; more fall back to torch
        return mae_loss_reference(imgs, pred, mask, p, norm_pix=norm_pix, eps=eps)
    m = mask.reshape(-1)
    if m.dtype != torch.bool:  # a bool mask goes to the kernel as is (no conversion kernel)
        m = m.to(torch.float32)
    return _loss_op(imgs.detach(), pred, m, p, bool(norm_pix), float(eps))
