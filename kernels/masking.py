"""MAE random masking as fused kernels.

    visible, ids_keep, mask = mae_mask(tokens, pos_embed, mask_ratio, noise=None)
    full = mae_unmask(visible, ids_keep, mask_token, pos_embed)

MAE keeps, per sample, the K = int(N * (1 - mask_ratio)) tokens with the smallest noise, in
order of increasing noise (argsort semantics; ties broken by index, i.e. a stable sort).
The reference does argsort + gather + add (encoder) and cat + gather + add (decoder). Here:
- `_rank_kernel`: one program per sample ranks its N noise values by counting (N <= ~1.4k, so
  an N x N comparison in tiles is cheaper than a sort launch) and writes ids_keep, the mask
  and each position's rank.
- `_gather_kernel`: visible[b, r] = tokens[b, ids_keep[b, r]] + pos[ids_keep[b, r]].
- backward of the gather writes every token gradient once (zero where masked) and reduces the
  pos_embed gradient over the batch in the same pass.
- `_unmask_kernel` / its backward do the same for the decoder side.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------- references


def _pos2d(pos_embed: torch.Tensor) -> torch.Tensor:
    return pos_embed.reshape(pos_embed.shape[-2], pos_embed.shape[-1])


def keep_count(n: int, mask_ratio: float) -> int:
    return int(n * (1 - mask_ratio))


def mae_mask_reference(tokens, pos_embed, mask_ratio, *, noise=None):
    B, N, C = tokens.shape
    K = keep_count(N, mask_ratio)
    if noise is None:
        noise = torch.rand(B, N, device=tokens.device)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :K]
    x = tokens + _pos2d(pos_embed)[None]
    visible = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, C))
    mask = torch.ones(B, N, dtype=torch.bool, device=tokens.device)
    mask.scatter_(1, ids_keep, False)
    return visible, ids_keep, mask


def mae_unmask_reference(visible, ids_keep, mask_token, pos_embed):
    B, K, C = visible.shape
    pos = _pos2d(pos_embed)
    N = pos.shape[0]
    filler = mask_token.reshape(1, 1, C).to(visible.dtype).expand(B, N - K, C)
    x = torch.cat([visible, filler], 1)
    ids_shuffle_rest = _complete_shuffle(ids_keep, N)
    ids_restore = torch.argsort(ids_shuffle_rest, dim=1)
    x = torch.gather(x, 1, ids_restore[:, :, None].expand(-1, -1, C))
    return x + pos[None]


def _complete_shuffle(ids_keep, N):
    """ids_keep followed by the masked indices (any order): a full permutation of 0..N-1."""
    B, K = ids_keep.shape
    taken = torch.zeros(B, N, dtype=torch.bool, device=ids_keep.device)
    taken.scatter_(1, ids_keep, True)
    rest = torch.argsort(taken.to(torch.int8), dim=1, stable=True)[:, : N - K]
    return torch.cat([ids_keep, rest], 1)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _rank_kernel(NOISE, IDS_KEEP, MASK, RANK, N, K, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_J)
    nj = tl.load(NOISE + b * N + offs_j, mask=offs_j < N, other=float("inf"))
    for i0 in range(0, N, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        ok_i = offs_i < N
        ni = tl.load(NOISE + b * N + offs_i, mask=ok_i, other=float("inf"))
        before = (nj[None, :] < ni[:, None]) | ((nj[None, :] == ni[:, None]) & (offs_j[None, :] < offs_i[:, None]))
        before = before & (offs_j < N)[None, :]
        rank = tl.sum(before.to(tl.int32), 1)
        keep = rank < K
        tl.store(RANK + b * N + offs_i, rank, mask=ok_i)
        tl.store(MASK + b * N + offs_i, (rank >= K).to(tl.int8), mask=ok_i)
        tl.store(IDS_KEEP + b * K + rank, offs_i.to(tl.int64), mask=ok_i & keep)


@triton.jit
def _gather_kernel(TOK, POS, IDS, OUT, R, K, C, st_b, st_n, sp_n,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    src = tl.load(IDS + offs_r, mask=offs_r < R, other=0)
    b = (offs_r // K).to(tl.int64)
    t = tl.load(TOK + b[:, None] * st_b + src[:, None] * st_n + offs_c[None, :], mask=ok, other=0.0)
    p = tl.load(POS + src[:, None] * sp_n + offs_c[None, :], mask=ok, other=0.0)
    y = t.to(tl.float32) + p.to(tl.float32)
    tl.store(OUT + offs_r.to(tl.int64)[:, None] * C + offs_c[None, :], y.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _gather_bwd_kernel(DVIS, RANK, DTOK, DPOS, B, N, K, C, B_CHUNK,
                       HAS_DPOS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(2)
    ok_n = offs_n < N
    ok = ok_n[:, None] & (offs_c < C)[None, :]
    dpos = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    b_lo = chunk * B_CHUNK
    b_hi = tl.minimum(b_lo + B_CHUNK, B)
    offs_n64 = offs_n.to(tl.int64)
    for b in range(b_lo, b_hi):
        r = tl.load(RANK + b * N + offs_n64, mask=ok_n, other=K)
        kept = r < K
        g = tl.load(DVIS + (r.to(tl.int64) + b * K)[:, None] * C + offs_c[None, :], mask=ok & kept[:, None], other=0.0)
        g = g.to(tl.float32)
        tl.store(DTOK + (offs_n64 + b * N)[:, None] * C + offs_c[None, :], g.to(DTOK.dtype.element_ty), mask=ok)
        dpos += g
    if HAS_DPOS:
        tl.store(DPOS + (chunk.to(tl.int64) * N + offs_n)[:, None] * C + offs_c[None, :], dpos, mask=ok)


@triton.jit
def _unmask_kernel(VIS, INV, MT, POS, OUT, R, N, K, C, sp_n,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # row = b * N + n
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok_r = offs_r < R
    ok_c = offs_c < C
    ok = ok_r[:, None] & ok_c[None, :]
    r = tl.load(INV + offs_r, mask=ok_r, other=-1)
    kept = r >= 0
    b = (offs_r // N).to(tl.int64)
    n = offs_r % N
    x = tl.load(VIS + (b * K + r)[:, None] * C + offs_c[None, :], mask=ok & kept[:, None], other=0.0).to(tl.float32)
    mt = tl.load(MT + offs_c, mask=ok_c, other=0.0).to(tl.float32)
    x = tl.where(kept[:, None], x, mt[None, :])
    p = tl.load(POS + n[:, None] * sp_n + offs_c[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + offs_r.to(tl.int64)[:, None] * C + offs_c[None, :], (x + p).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _unmask_bwd_kernel(DFULL, INV, DVIS, DPOS, DMT, B, N, K, C, B_CHUNK,
                       BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(2)
    ok_n = offs_n < N
    ok_c = offs_c < C
    ok = ok_n[:, None] & ok_c[None, :]
    dpos = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    dmt = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    b_lo = chunk * B_CHUNK
    b_hi = tl.minimum(b_lo + B_CHUNK, B)
    offs_n64 = offs_n.to(tl.int64)
    for b in range(b_lo, b_hi):
        r = tl.load(INV + b * N + offs_n64, mask=ok_n, other=-1)
        kept = r >= 0
        g = tl.load(DFULL + (offs_n64 + b * N)[:, None] * C + offs_c[None, :], mask=ok, other=0.0).to(tl.float32)
        dpos += g
        dmt += tl.where(kept[:, None], 0.0, g)
        tl.store(DVIS + (r.to(tl.int64) + b * K)[:, None] * C + offs_c[None, :], g.to(DVIS.dtype.element_ty),
                 mask=ok & kept[:, None])
    part = chunk.to(tl.int64) * N + offs_n
    tl.store(DPOS + part[:, None] * C + offs_c[None, :], dpos, mask=ok)
    nblocks = tl.num_programs(0)
    tl.store(DMT + (chunk.to(tl.int64) * nblocks + tl.program_id(0)) * C + offs_c, tl.sum(dmt, 0), mask=ok_c)


# ----------------------------------------------------------------------------- launch


def _row_block(C: int):
    bc = min(triton.next_power_of_2(C), 512)
    return max(1, 4096 // bc), bc


def _b_chunks(B: int, n_tiles: int, target: int = 1024) -> int:
    """Batch chunk length so that (tiles x chunks) programs fill the GPU."""
    chunks = max(1, min(B, triton.cdiv(target, max(n_tiles, 1))))
    return triton.cdiv(B, chunks)


# The ops are torch.library custom ops: torch.compile (the engine compiles the whole objective)
# sees opaque ops with known output shapes instead of tracing into the Triton launchers.


@torch.library.custom_op("vfm::mae_rank", mutates_args=())
def mae_rank(noise: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_keep [B, K] int64, mask [B, N] bool, rank [B, N] int32) from noise [B, N]."""
    B, N = noise.shape
    noise = noise.float().contiguous()
    ids_keep = torch.empty(B, K, device=noise.device, dtype=torch.int64)
    mask = torch.empty(B, N, device=noise.device, dtype=torch.int8)
    rank = torch.empty(B, N, device=noise.device, dtype=torch.int32)
    bj = triton.next_power_of_2(max(N, 1))
    bi = max(1, min(64, 8192 // bj))
    if B and N:
        _rank_kernel[(B,)](noise, ids_keep, mask, rank, N, K, BLOCK_I=bi, BLOCK_J=bj, num_warps=4)
    return ids_keep, mask.to(torch.bool), rank


@mae_rank.register_fake
def _(noise, K):
    B, N = noise.shape
    return (noise.new_empty((B, K), dtype=torch.int64), noise.new_empty((B, N), dtype=torch.bool),
            noise.new_empty((B, N), dtype=torch.int32))


def _gather_impl(tokens, pos, ids_keep):
    B, N, C = tokens.shape
    K = ids_keep.shape[1]
    tokens = tokens if tokens.stride(-1) == 1 else tokens.contiguous()
    pos = pos if pos.stride(-1) == 1 else pos.contiguous()
    ids_keep = ids_keep.contiguous()
    out = torch.empty(B, K, C, device=tokens.device, dtype=torch.result_type(tokens, pos))
    br, bc = _row_block(C)
    if B * K:
        _gather_kernel[(triton.cdiv(B * K, br), triton.cdiv(C, bc))](
            tokens, pos, ids_keep, out, B * K, K, C, tokens.stride(0), tokens.stride(1), pos.stride(0),
            BLOCK_R=br, BLOCK_C=bc, num_warps=4)
    return out


@torch.library.custom_op("vfm::mae_gather_bwd", mutates_args=())
def _gather_bwd(dvis: torch.Tensor, rank: torch.Tensor, tokens_dtype: torch.dtype,
                need_dpos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dtokens [B, N, C], dpos [N, C] fp32; empty when not needed)."""
    B, K, C = dvis.shape
    N = rank.shape[1]
    dvis = dvis.contiguous()
    dtok = torch.empty(B, N, C, device=dvis.device, dtype=tokens_dtype)
    bn, bc = 16, min(triton.next_power_of_2(C), 256)
    tiles = triton.cdiv(N, bn) * triton.cdiv(C, bc)
    bchunk = _b_chunks(B, tiles)
    nchunks = triton.cdiv(B, bchunk) if B else 0
    part = torch.empty(nchunks, N, C, device=dvis.device, dtype=torch.float32) if need_dpos else dtok
    if B and N:
        _gather_bwd_kernel[(triton.cdiv(N, bn), triton.cdiv(C, bc), nchunks)](
            dvis, rank, dtok, part, B, N, K, C, bchunk, HAS_DPOS=need_dpos, BLOCK_N=bn, BLOCK_C=bc, num_warps=4)
    if not need_dpos:
        return dtok, dvis.new_empty((0,), dtype=torch.float32)
    return dtok, part.sum(0) if nchunks else dvis.new_zeros((N, C), dtype=torch.float32)


@_gather_bwd.register_fake
def _(dvis, rank, tokens_dtype, need_dpos):
    B, K, C = dvis.shape
    N = rank.shape[1]
    dpos = dvis.new_empty((N, C) if need_dpos else (0,), dtype=torch.float32)
    return dvis.new_empty((B, N, C), dtype=tokens_dtype), dpos


@torch.library.custom_op("vfm::mae_gather", mutates_args=())
def _gather_ranked(tokens: torch.Tensor, pos: torch.Tensor, ids_keep: torch.Tensor,
                   rank: torch.Tensor) -> torch.Tensor:
    """visible[b, r] = tokens[b, ids_keep[b, r]] + pos[ids_keep[b, r]]; `rank` is kept for the backward."""
    return _gather_impl(tokens, pos, ids_keep)


@_gather_ranked.register_fake
def _(tokens, pos, ids_keep, rank):
    B, N, C = tokens.shape
    return tokens.new_empty((B, ids_keep.shape[1], C), dtype=torch.result_type(tokens, pos))


def _ranked_setup(ctx, inputs, output):
    tokens, pos, ids_keep, rank = inputs
    ctx.save_for_backward(rank)
    ctx.tokens_dtype, ctx.pos_dtype = tokens.dtype, pos.dtype


def _ranked_backward(ctx, dvis):
    (rank,) = ctx.saved_tensors
    need_dpos = bool(ctx.needs_input_grad[1])
    dtok, dpos = _gather_bwd(dvis, rank, ctx.tokens_dtype, need_dpos)
    return dtok, (dpos.to(ctx.pos_dtype) if need_dpos else None), None, None


_gather_ranked.register_autograd(_ranked_backward, setup_context=_ranked_setup)


@torch.library.custom_op("vfm::mae_unmask", mutates_args=())
def _unmask(visible: torch.Tensor, ids_keep: torch.Tensor, mask_token: torch.Tensor,
            pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(full [B, N, C], inv [B, N] int32: each position's row in `visible`, -1 where masked)."""
    B, K, C = visible.shape
    N = pos.shape[0]
    pos = pos if pos.stride(-1) == 1 else pos.contiguous()
    visible = visible.contiguous()
    inv = torch.full((B, N), -1, device=visible.device, dtype=torch.int32)
    inv.scatter_(1, ids_keep, torch.arange(K, device=visible.device, dtype=torch.int32).expand(B, K))
    mt = mask_token.contiguous()
    out = torch.empty(B, N, C, device=visible.device, dtype=torch.result_type(visible, pos))
    br, bc = _row_block(C)
    if B * N:
        _unmask_kernel[(triton.cdiv(B * N, br), triton.cdiv(C, bc))](
            visible, inv, mt, pos, out, B * N, N, K, C, pos.stride(0), BLOCK_R=br, BLOCK_C=bc, num_warps=4)
    return out, inv


@_unmask.register_fake
def _(visible, ids_keep, mask_token, pos):
    B, K, C = visible.shape
    N = pos.shape[0]
    return (visible.new_empty((B, N, C), dtype=torch.result_type(visible, pos)),
            visible.new_empty((B, N), dtype=torch.int32))


@torch.library.custom_op("vfm::mae_unmask_bwd", mutates_args=())
def _unmask_bwd(dfull: torch.Tensor, inv: torch.Tensor, K: int,
                visible_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dvisible [B, K, C], dmask_token [C] fp32, dpos [N, C] fp32)."""
    B, N, C = dfull.shape
    dfull = dfull.contiguous()
    dvis = torch.empty(B, K, C, device=dfull.device, dtype=visible_dtype)
    bn, bc = 16, min(triton.next_power_of_2(C), 256)
    nb = triton.cdiv(N, bn)
    tiles = nb * triton.cdiv(C, bc)
    bchunk = _b_chunks(B, tiles)
    nchunks = triton.cdiv(B, bchunk) if B else 0
    dpos = torch.zeros(max(nchunks, 1), N, C, device=dfull.device, dtype=torch.float32)
    dmt = torch.zeros(max(nchunks, 1), nb, C, device=dfull.device, dtype=torch.float32)
    if B and N:
        _unmask_bwd_kernel[(nb, triton.cdiv(C, bc), nchunks)](
            dfull, inv, dvis, dpos, dmt, B, N, K, C, bchunk, BLOCK_N=bn, BLOCK_C=bc, num_warps=4)
    return dvis, dmt.sum((0, 1)), dpos.sum(0)


@_unmask_bwd.register_fake
def _(dfull, inv, K, visible_dtype):
    B, N, C = dfull.shape
    return (dfull.new_empty((B, K, C), dtype=visible_dtype), dfull.new_empty((C,), dtype=torch.float32),
            dfull.new_empty((N, C), dtype=torch.float32))


def _unmask_setup(ctx, inputs, output):
    visible, ids_keep, mask_token, pos = inputs
    ctx.save_for_backward(output[1])
    ctx.K, ctx.dtypes = visible.shape[1], (visible.dtype, mask_token.dtype, pos.dtype)


def _unmask_backward(ctx, dfull, dinv):
    (inv,) = ctx.saved_tensors
    vdt, mdt, pdt = ctx.dtypes
    dvis, dmt, dpos = _unmask_bwd(dfull, inv, ctx.K, vdt)
    return dvis, None, dmt.to(mdt), dpos.to(pdt)


_unmask.register_autograd(_unmask_backward, setup_context=_unmask_setup)


def _resolve(impl: str, x: torch.Tensor) -> str:
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "auto":
        return "triton" if x.is_cuda else "torch"
    return impl


def mae_mask(tokens, pos_embed, mask_ratio, *, noise: Optional[torch.Tensor] = None, impl="auto"):
    """Random MAE masking: (visible [B, K, C] with pos_embed added, ids_keep [B, K], mask [B, N] True=masked)."""
    B, N, C = tokens.shape
    if _pos2d(pos_embed).shape != (N, C):
        raise ValueError(f"pos_embed {tuple(pos_embed.shape)} does not match tokens {tuple(tokens.shape)}")
    if noise is None:
        noise = torch.rand(B, N, device=tokens.device)
    if _resolve(impl, tokens) == "torch":
        return mae_mask_reference(tokens, pos_embed, mask_ratio, noise=noise)
    K = keep_count(N, mask_ratio)
    ids_keep, mask, rank = mae_rank(noise, K)
    visible = _gather_ranked(tokens, _pos2d(pos_embed), ids_keep, rank)
    return visible, ids_keep, mask


def mae_unmask(visible, ids_keep, mask_token, pos_embed, *, impl="auto"):
    """Decoder side: visible tokens back to their positions, mask_token elsewhere, + pos_embed."""
    if _resolve(impl, visible) == "torch":
        return mae_unmask_reference(visible, ids_keep, mask_token, pos_embed)
    C = visible.shape[-1]
    return _unmask(visible, ids_keep, mask_token.reshape(C), _pos2d(pos_embed))[0]
