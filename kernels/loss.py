"""MAE's pixel loss in one pass over the pixels.

    loss = mae_loss(imgs, pred, mask, patch_size, norm_pix=True, eps=1e-6)

imgs [B, C, H, W]; pred [B, N, p*p*C] in MAE's patchify order
(pred[b, i*w + j, (pi*p + pj)*C + c] is pixel (c, i*p + pi, j*p + pj)); mask [B, N], 1 = masked.
Target = the patch normalized by its own mean and unbiased variance (+ eps, sqrt) when
norm_pix; loss = sum over masked patches of mean((pred - target)^2) / sum(mask).

The kernel reads each patch straight from the image (no patchify copy), and skips the pixels
of unmasked patches entirely (their gradient is zero): with MAE's 75 % masking it touches
3/4 of the pixels. The backward recomputes the target from the image instead of saving it.
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
def _patch_loss(IMG, PRED, MASK, LOSS, DPRED, GSCALE, N, W_PATCHES, si_b, si_c, si_h, si_w,
                sp_b, sp_n, G, eps,
                C: tl.constexpr, P: tl.constexpr, L: tl.constexpr, NORM: tl.constexpr, BACKWARD: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr):
    # patch size and channels are constexpr (L = P * P * C): the per-element index math below
    # (e -> c, pi, pj) becomes shifts and constant multiplies instead of run-time integer divisions
    offs_g = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # patch = b * N + n
    ok_g = offs_g < G
    m = tl.load(MASK + offs_g, mask=ok_g, other=0.0)
    live = ok_g & (m != 0.0)
    b = (offs_g // N).to(tl.int64)
    n = offs_g % N
    pi0 = (n // W_PATCHES) * P
    pj0 = (n % W_PATCHES) * P
    # element e walks the image order (c, pi, pj) so that image rows are read contiguously
    e = tl.arange(0, BLOCK_L)
    c = e // (P * P)
    pi = (e // P) % P
    pj = e % P
    ok_e = e < L
    ld = live[:, None] & ok_e[None, :]
    img_off = b[:, None] * si_b + c[None, :] * si_c + (pi0[:, None] + pi[None, :]) * si_h + (pj0[:, None] + pj[None, :]) * si_w
    t = tl.load(IMG + img_off, mask=ld, other=0.0).to(tl.float32)
    pred_off = b[:, None] * sp_b + n[:, None] * sp_n + ((pi * P + pj) * C + c)[None, :]
    x = tl.load(PRED + pred_off, mask=ld, other=0.0).to(tl.float32)
    if NORM:
        mean = tl.sum(t, 1) / L
        dt = tl.where(ld, t - mean[:, None], 0.0)
        var = tl.sum(dt * dt, 1) / (L - 1)
        t = dt / tl.sqrt(var + eps)[:, None]
    diff = tl.where(ld, x - t, 0.0)
    if BACKWARD:
        gs = tl.load(GSCALE)
        g = diff * (m * gs * 2.0 / L)[:, None]
        st = ok_g[:, None] & ok_e[None, :]
        tl.store(DPRED + pred_off, g.to(DPRED.dtype.element_ty), mask=st)
    else:
        tl.store(LOSS + offs_g, tl.sum(diff * diff, 1) / L * m, mask=ok_g)


def _launch(imgs, pred, m, p, eps, norm_pix, backward, gscale=None):
    B, C, H, W = imgs.shape
    N = pred.shape[1]
    L = p * p * C
    G = B * N
    bl = triton.next_power_of_2(L)
    bp = max(1, min(16, 4096 // bl))
    loss = dpred = None
    if backward:
        dpred = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)
        out, dp = m, dpred
    else:
        loss = torch.empty(G, device=pred.device, dtype=torch.float32)
        out, dp = loss, pred
    if G:
        _patch_loss[(triton.cdiv(G, bp),)](
            imgs, pred, m, out, dp, gscale if gscale is not None else m, N, W // p,
            *imgs.stride(), pred.stride(0), pred.stride(1), G, eps,
            C=C, P=p, L=L, NORM=norm_pix, BACKWARD=backward, BLOCK_P=bp, BLOCK_L=bl, num_warps=8 if bl >= 1024 else 4)
    return dpred if backward else loss


# torch.library custom ops: opaque to torch.compile (the engine compiles the whole objective).


@torch.library.custom_op("vfm::mae_loss", mutates_args=())
def _loss_op(imgs: torch.Tensor, pred: torch.Tensor, m: torch.Tensor, p: int, norm_pix: bool,
             eps: float) -> torch.Tensor:
    pred = pred if pred.stride(-1) == 1 else pred.contiguous()
    per_patch = _launch(imgs, pred, m.contiguous(), p, eps, norm_pix, backward=False)
    return per_patch.sum() / m.sum()


@_loss_op.register_fake
def _(imgs, pred, m, p, norm_pix, eps):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op("vfm::mae_loss_bwd", mutates_args=())
def _loss_bwd_op(gout: torch.Tensor, imgs: torch.Tensor, pred: torch.Tensor, m: torch.Tensor, p: int,
                 norm_pix: bool, eps: float) -> torch.Tensor:
    # recomputes the target from the image instead of saving it
    pred = pred if pred.stride(-1) == 1 else pred.contiguous()
    gscale = (gout.float() / m.sum()).reshape(1)
    return _launch(imgs, pred, m.contiguous(), p, eps, norm_pix, backward=True, gscale=gscale)


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
    if impl == "torch":
        return mae_loss_reference(imgs, pred, mask, p, norm_pix=norm_pix, eps=eps)
    m = mask.reshape(-1).to(torch.float32)
    return _loss_op(imgs.detach(), pred, m, p, bool(norm_pix), float(eps))
