"""MAE random masking as fused kernels.

    visible, ids_keep, mask = mae_mask(tokens, pos_embed, mask_ratio, noise=None)
    full = mae_unmask(visible, ids_keep, mask_token, pos_embed, mask=mask)

MAE keeps, per sample, the K = int(N * (1 - mask_ratio)) tokens with the smallest noise, in
order of increasing noise (argsort semantics; ties broken by index, i.e. a stable sort).
The reference does argsort + gather + add (encoder) and cat + gather + add (decoder). Here:
- `_rank_sort_kernel` (the default): one program per sample sorts int64 keys (the noise's order-preserving
  integer image with the position in its low bits: ties broken by index, as a stable argsort) with one bitonic
  `tl.sort`, and writes ids_keep, the bool mask and each position's rank. `_rank_kernel` ranks by counting
  instead (programs per block of positions compare each with all N): 4 us slower at MAE-L.
- `_gather_kernel`: visible[b, r] = tokens[b, ids_keep[b, r]] + pos[ids_keep[b, r]], whole rows
  of 16-byte vectors.
- backward of the gather: programs walk the batch for a tile of positions, several samples a
  step, writing every token gradient once (zero where masked) and summing the pos_embed gradient
  in registers; a few batch chunks leave partial sums that one small kernel adds up.
- `_unmask_split_kernel` (with `mask=`, mae_mask's bool mask, what the engine passes): programs of one kind scatter
  the visible rows to their positions (ids and rows loaded at once), programs of another fill the masked positions
  with the mask token (the mask, pos_embed and mask-token loads depend on nothing), and both write the inverse (each
  position's row in `visible`) for the backward. Without the mask, `_unmask_kernel` finds each position's row by
  comparing with ids_keep (no scatter kernels), which puts a dependent round trip before every row.
- the unmask backward walks like the gather's, summing the mask-token gradient (and the pos_embed one, only when
  pos_embed needs a gradient: MAE's fixed sin-cos embedding, what the engine uses, does not).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels import triton_version
from kernels.host import cdiv, next_power_of_2
from kernels.pdl import launch_options, pdl_enter, use_pdl

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
def _sort_key(x, offs, IDX_BITS: tl.constexpr):
    """int64 keys ordered as argsort orders (x, position): the float's order-preserving integer image (negative
    floats reversed, -0.0 made +0.0) shifted left, the position in the low IDX_BITS bits (2**IDX_BITS > positions)."""
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties +0.0, as in the argsort
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    return (key << IDX_BITS) | offs.to(tl.int64)


@triton.jit
def _rank_kernel(NOISE, IDS_KEEP, MASK, RANK, N, K, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    # program (b, i-block): the ranks of BLOCK_I positions against all N (many short programs
    # instead of one serial walk per sample); the bool mask is written directly
    b = tl.program_id(0).to(tl.int64)
    offs_j = tl.arange(0, BLOCK_J)
    nj = tl.load(NOISE + b * N + offs_j, mask=offs_j < N, other=float("inf"))
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok_i = offs_i < N
    ni = tl.load(NOISE + b * N + offs_i, mask=ok_i, other=float("inf"))
    before = (nj[None, :] < ni[:, None]) | ((nj[None, :] == ni[:, None]) & (offs_j[None, :] < offs_i[:, None]))
    before = before & (offs_j < N)[None, :]
    rank = tl.sum(before.to(tl.int32), 1)
    keep = rank < K
    tl.store(RANK + b * N + offs_i, rank, mask=ok_i)
    tl.store(MASK + b * N + offs_i, rank >= K, mask=ok_i)
    tl.store(IDS_KEEP + b * K + rank, offs_i.to(tl.int64), mask=ok_i & keep)


@triton.jit
def _rank_sort_kernel(NOISE, IDS_KEEP, MASK, RANK, N, K, BLOCK: tl.constexpr, IDX_BITS: tl.constexpr,
                      PDL: tl.constexpr):
    pdl_enter(PDL)
    # one program per sample: each noise value becomes an int64 key (_sort_key), so one bitonic sort (tl.sort)
    # gives the stable argsort; padding positions get +inf and positions >= N, which sort last. Then scattered stores:
    # rank[position] = sorted index, mask, and ids_keep from the first K.
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x = tl.load(NOISE + b * N + offs, mask=offs < N, other=float("inf"))
    srt = tl.sort(_sort_key(x, offs, IDX_BITS))
    pos = (srt & ((1 << IDX_BITS) - 1)).to(tl.int32)
    ok = offs < N
    tl.store(RANK + b * N + pos, offs, mask=ok)
    tl.store(MASK + b * N + pos, offs >= K, mask=ok)
    tl.store(IDS_KEEP + b * K + offs, pos.to(tl.int64), mask=offs < K)


@triton.jit
def _gather_kernel(TOK, POS, IDS, OUT, R, K, C, st_b, st_n, sp_n,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr, STREAM: tl.constexpr = "",
                   KEEP: tl.constexpr = ""):
    pdl_enter(PDL)
    # BLOCK_R output rows x BLOCK_C columns (whole rows up to 1024): 16-byte vectors when C is a
    # multiple of 8 (the launcher's integer specialization tells the compiler)
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    src = tl.load(IDS + offs_r, mask=offs_r < R, other=0)
    b = (offs_r // K).to(tl.int64)
    t = tl.load(TOK + (b * st_b + src * st_n)[:, None] + offs_c[None, :], mask=ok, other=0.0, eviction_policy=STREAM)
    p = tl.load(POS + (src * sp_n)[:, None] + offs_c[None, :], mask=ok, other=0.0, eviction_policy=KEEP)
    y = t.to(tl.float32) + p.to(tl.float32)
    tl.store(OUT + (offs_r.to(tl.int64) * C)[:, None] + offs_c[None, :], y.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _gather_bwd_kernel(DVIS, RANK, DTOK, PART, B, N, K, C, B_CHUNK, PLANE,
                       HAS_DPOS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_C: tl.constexpr, PDL: tl.constexpr, STREAM: tl.constexpr = ""):
    pdl_enter(PDL)
    # Program (position tile, column tile, batch chunk). Each step moves BLOCK_B samples x BLOCK_N
    # positions at once (rows u-major: row = u * BLOCK_N + j), so a step has BLOCK_B times the
    # bytes in flight of a one-sample step; the ranks of the next step are loaded one step ahead.
    # dpos: each step's rows are summed over u (within a thread for the default layout) into a
    # [BLOCK_N, BLOCK_C] accumulator.
    row = tl.arange(0, BLOCK_B * BLOCK_N)
    u = row // BLOCK_N
    n = tl.program_id(0) * BLOCK_N + row % BLOCK_N
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(2)
    ok_n = n < N
    ok_c = offs_c < C
    b_lo = chunk * B_CHUNK
    b_hi = tl.minimum(b_lo + B_CHUNK, B)
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    b = b_lo + u
    r = tl.load(RANK + b.to(tl.int64) * N + n, mask=ok_n & (b < b_hi), other=K)
    for b0 in range(b_lo, b_hi, BLOCK_B):
        b = b0 + u
        ok_r = ok_n & (b < b_hi)
        nxt = b + BLOCK_B
        r_next = tl.load(RANK + nxt.to(tl.int64) * N + n, mask=ok_n & (nxt < b_hi), other=K)
        b64 = b.to(tl.int64)
        g = tl.load(DVIS + ((b64 * K + r) * C)[:, None] + offs_c[None, :], mask=(r < K)[:, None] & ok_c[None, :],
                    other=0.0, eviction_policy=STREAM)
        tl.store(DTOK + ((b64 * N + n) * C)[:, None] + offs_c[None, :], g.to(DTOK.dtype.element_ty),
                 mask=ok_r[:, None] & ok_c[None, :])
        if HAS_DPOS:
            acc += tl.sum(tl.reshape(g.to(tl.float32), [BLOCK_B, BLOCK_N, BLOCK_C]), 0)
        r = r_next
    if HAS_DPOS:
        n1 = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(PART + chunk.to(tl.int64) * PLANE + (n1 * C)[:, None] + offs_c[None, :], acc,
                 mask=(n1 < N)[:, None] & ok_c[None, :])


@triton.jit
def _unmask_kernel(VIS, IDS, MT, POS, OUT, INV, RANK, N, K, C, sp_n,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, HOIST: tl.constexpr,
                   PDL: tl.constexpr, FROM_RANK: tl.constexpr = False):
    pdl_enter(PDL)
    # program (b, row block, column block). Each row's source in `visible` comes from comparing
    # its position with ids_keep[b] (K <= N int64s, from L1/L2): no separate inverse-permutation
    # kernels. The column-block-0 programs also write inv (what the backward needs).
    # HOIST (the default): the pos_embed / mask-token loads are issued before the ids compare, which they do
    # not depend on, so their latency overlaps the ids round trip instead of following it
    b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok_n = offs_n < N
    ok_c = offs_c < C
    ok = ok_n[:, None] & ok_c[None, :]
    if HOIST:
        p = tl.load(POS + (offs_n * sp_n)[:, None] + offs_c[None, :], mask=ok, other=0.0)
        mt = tl.load(MT + offs_c, mask=ok_c, other=0.0)
    if FROM_RANK:  # each position's rank from the mask's rank kernel: its row in visible where < K
        r = tl.load(RANK + b * N + offs_n, mask=ok_n, other=K)
        r = tl.where(r < K, r, -1)
    else:
        r = tl.full([BLOCK_R], -1, tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            ids = tl.load(IDS + b * K + offs_k, mask=offs_k < K, other=-1).to(tl.int32)
            hit = ids[None, :] == offs_n[:, None]
            r = tl.maximum(r, tl.max(tl.where(hit, offs_k[None, :], -1), 1))
    kept = r >= 0
    tl.store(INV + b * N + offs_n, r, mask=ok_n & (tl.program_id(2) == 0))
    x = tl.load(VIS + ((b * K + r) * C)[:, None] + offs_c[None, :], mask=ok & kept[:, None], other=0.0)
    if not HOIST:
        mt = tl.load(MT + offs_c, mask=ok_c, other=0.0)
    x = tl.where(kept[:, None], x.to(tl.float32), mt.to(tl.float32)[None, :])
    if not HOIST:
        p = tl.load(POS + (offs_n * sp_n)[:, None] + offs_c[None, :], mask=ok, other=0.0)
    tl.store(OUT + ((b * N + offs_n) * C)[:, None] + offs_c[None, :], (x + p.to(tl.float32)).to(OUT.dtype.element_ty),
             mask=ok)


@triton.jit
def _unmask_bwd_kernel(DFULL, INV, DVIS, PART, B, N, K, C, B_CHUNK, PLANE, MT_ROW,
                       HAS_DPOS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_C: tl.constexpr, PDL: tl.constexpr, STREAM: tl.constexpr = ""):
    pdl_enter(PDL)
    # same walk as _gather_bwd_kernel: every dfull row is read once (contiguous), kept rows are
    # written to dvisible, and the pos_embed (HAS_DPOS) / mask_token partial sums stay in registers.
    # A chunk's plane: N rows of dpos partials (HAS_DPOS), then from row MT_ROW one mask-token
    # partial per position tile
    row = tl.arange(0, BLOCK_B * BLOCK_N)
    u = row // BLOCK_N
    n = tl.program_id(0) * BLOCK_N + row % BLOCK_N
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk = tl.program_id(2)
    ok_n = n < N
    ok_c = offs_c < C
    b_lo = chunk * B_CHUNK
    b_hi = tl.minimum(b_lo + B_CHUNK, B)
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    acc_mt = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    b = b_lo + u
    r = tl.load(INV + b.to(tl.int64) * N + n, mask=ok_n & (b < b_hi), other=-1)
    for b0 in range(b_lo, b_hi, BLOCK_B):
        b = b0 + u
        ok_r = ok_n & (b < b_hi)
        nxt = b + BLOCK_B
        r_next = tl.load(INV + nxt.to(tl.int64) * N + n, mask=ok_n & (nxt < b_hi), other=-1)
        b64 = b.to(tl.int64)
        ok = ok_r[:, None] & ok_c[None, :]
        g = tl.load(DFULL + ((b64 * N + n) * C)[:, None] + offs_c[None, :], mask=ok, other=0.0, eviction_policy=STREAM)
        kept = r >= 0
        tl.store(DVIS + ((b64 * K + r) * C)[:, None] + offs_c[None, :], g.to(DVIS.dtype.element_ty),
                 mask=ok & kept[:, None])
        g = g.to(tl.float32)
        if HAS_DPOS:
            acc += tl.sum(tl.reshape(g, [BLOCK_B, BLOCK_N, BLOCK_C]), 0)
        acc_mt += tl.sum(tl.reshape(tl.where(kept[:, None], 0.0, g), [BLOCK_B, BLOCK_N, BLOCK_C]), 0)
        r = r_next
    n1 = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    base = PART + chunk.to(tl.int64) * PLANE
    if HAS_DPOS:
        tl.store(base + (n1 * C)[:, None] + offs_c[None, :], acc, mask=(n1 < N)[:, None] & ok_c[None, :])
    tl.store(base + (MT_ROW + tl.program_id(0)) * C + offs_c, tl.sum(acc_mt, 0), mask=ok_c)


@triton.jit
def _unmask_split_kernel(VIS, IDS, MASKB, MT, POS, OUT, INV, R_VIS, R_ALL, N, K, C, st_b, st_n, sp_n, SB,
                         BLOCK_SR: tl.constexpr, BLOCK_FR: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr,
                         STREAM: tl.constexpr = "", KEEP: tl.constexpr = "", NATIVE: tl.constexpr = False):
    pdl_enter(PDL)
    # With the mask (mae_mask's, for the same ids_keep) no program needs to find a position's row first. Programs
    # below SB scatter BLOCK_SR visible rows (flattened b * K + k) to their positions: the ids and the rows load at
    # once, then the positions' pos_embed rows (L2). The others fill BLOCK_FR positions (flattened b * N + n) with
    # mask token + pos_embed where the mask says masked: the mask, pos_embed and mask-token loads are independent.
    # Both write their part of inv (column block 0).
    pid = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok_c = offs_c < C
    first = tl.program_id(1) == 0
    if pid < SB:
        r = pid.to(tl.int64) * BLOCK_SR + tl.arange(0, BLOCK_SR)
        ok_r = r < R_VIS
        ok = ok_r[:, None] & ok_c[None, :]
        b = r // K
        k = r - b * K
        ids = tl.load(IDS + r, mask=ok_r, other=0)
        x = tl.load(VIS + (b * st_b + k * st_n)[:, None] + offs_c[None, :], mask=ok, other=0.0, eviction_policy=STREAM)
        p = tl.load(POS + (ids * sp_n)[:, None] + offs_c[None, :], mask=ok, other=0.0, eviction_policy=KEEP)
        if NATIVE:  # every operand in the output's 16-bit dtype: one rounding of the exact sum, as via fp32
            y = x + p
        else:
            y = x.to(tl.float32) + p.to(tl.float32)
        tl.store(OUT + ((b * N + ids) * C)[:, None] + offs_c[None, :], y.to(OUT.dtype.element_ty), mask=ok)
        tl.store(INV + b * N + ids, k.to(tl.int32), mask=ok_r & first)
    else:  # (names of their own: a name bound in both branches must have one shape)
        rf = (pid - SB).to(tl.int64) * BLOCK_FR + tl.arange(0, BLOCK_FR)
        ok_f = rf < R_ALL
        n = rf % N
        pf = tl.load(POS + (n * sp_n)[:, None] + offs_c[None, :], mask=ok_f[:, None] & ok_c[None, :], other=0.0,
                     eviction_policy=KEEP)
        mt = tl.load(MT + offs_c, mask=ok_c, other=0.0)
        masked = tl.load(MASKB + rf, mask=ok_f, other=0) != 0
        if NATIVE:
            yf = mt[None, :] + pf
        else:
            yf = mt.to(tl.float32)[None, :] + pf.to(tl.float32)
        tl.store(OUT + (rf * C)[:, None] + offs_c[None, :], yf.to(OUT.dtype.element_ty),
                 mask=(ok_f & masked)[:, None] & ok_c[None, :])
        tl.store(INV + rf, tl.full([BLOCK_FR], -1, tl.int32), mask=ok_f & masked & first)


@triton.jit
def _sum_parts(PART, DPOS, DMT, NCHUNK, M, PLANE, EXTRA, C, NPB,
               BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    # partial planes [NCHUNK, PLANE]: dpos = sum over chunks of the first M = N * C entries; the
    # programs past NPB sum the EXTRA mask-token rows of every chunk into dmask_token
    pid = tl.program_id(0)
    if pid < NPB:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < M
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(NCHUNK):
            acc += tl.load(PART + i * PLANE + offs, mask=ok, other=0.0)
        tl.store(DPOS + offs, acc, mask=ok)
    else:
        offs_c = (pid - NPB) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok_c = offs_c < C
        acc_mt = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
        for t0 in range(0, NCHUNK * EXTRA, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            row = (t // EXTRA).to(tl.int64) * PLANE + M + (t % EXTRA) * C
            acc_mt += tl.load(PART + row[:, None] + offs_c[None, :],
                              mask=(t < NCHUNK * EXTRA)[:, None] & ok_c[None, :], other=0.0)
        tl.store(DMT + offs_c, tl.sum(acc_mt, 0), mask=ok_c)


# ----------------------------------------------------------------------------- launch


def _col_block(C: int, cap: int) -> int:
    """Column tile: the largest power of two <= cap dividing C (no ragged tile; 1408 -> 128),
    else C rounded up to a power of two (capped)."""
    bc = cap
    while bc >= 64:
        if C % bc == 0:
            return bc
        bc //= 2
    return min(next_power_of_2(max(C, 1)), cap)


# Launch shapes of the gather / unmask forwards (rows per program, warps; columns: whole rows up to
# 1,024) and of the mask-token reduction (partial rows per step, columns per program: 512 x 16 takes MAE-L's
# 294 partial rows in one step, 0.0548 ms for the fixed-pos unmask fwd+bwd vs 0.0570 at 128 x 32, whose three
# dependent steps made the sum 8.4 us of the ~30-us backward under Nsight Compute; `...-mae-summt.json`).
# Measured on the H200 (bench/results/kernels-nvidia-h200-2026-11-28-mae-fused.json) and dropped:
# rank + gather in one launch (a program ranks its positions, then copies the kept rows): forward
# 0.032 ms at best vs 0.0265 for the two launches; 2-16 rows or 8 warps for either forward: same.
LAUNCH = {"gather": (4, 4), "unmask": (8, 4), "sum_mt": (512, 16), "rank_sort": 4,
          # with the mask: (visible rows per scatter program, positions per fill program, warps)
          "unmask_split": (8, 16, 4),
          # samples a step of the unmask's backward walk: with the pos_embed's accumulator too, with the mask token's
          # alone
          "unmask_walk": (4, 8)}
UNMASK_SPLIT = True  # mae_unmask(mask=...): the split forward (False: the mask is ignored, the ids compared)
# The unmask forward issues its pos_embed / mask-token loads before the ids compare (bench variant UNMASK_HOIST=False:
# after it, as before). H200, MAE-L fixed-pos unmask, three runs: forward 0.0258 / 0.0252 / 0.0254 ms vs 0.0275 /
# 0.0269 / 0.0268, fwd+bwd 0.0538 / 0.0530 / 0.0530 vs 0.0553 / 0.0549 / 0.0549 (`...-2026-11-29-mae-unmask-variants
# {,-2,-3}.json`). Measured there and dropped: a persistent forward (ids_keep loaded an item ahead; 4-16 programs per
# SM), programs of 2-8 samples sharing one pos_embed load, streaming stores, a backward walk loading a step ahead,
# 4 or 16 samples a walk step, and a backward walking each sample's rows instead of the batch: none faster.
UNMASK_HOIST = True
# mae_unmask(rank=...) reads each position's row from mae_rank's output instead of comparing with ids_keep: forward
# 0.0230-0.0232 ms vs 0.0254, fwd+bwd 0.0506-0.0510 vs 0.0531 (two runs, `...-2026-11-29-mae-unmask-rank-{1,2}.json`)
# How the rank kernel orders each sample's noise: "sort" (one program per sample sorts position-tagged int64
# keys) or "count" (programs per block of positions compare each with all N; bench variant RANK_BY=count).
# Measured on the H200 at MAE-L (B = 256, N = 196; `...-mae-rank.json`, `...-mae-rank-2.json`): mask forward
# 0.0224 / 0.0225 ms by sort, 0.0263-0.0265 by count; counting with one int64 compare of the sort keys per pair
# was slower still (0.0278-0.0281) and was dropped
RANK_BY = "sort"
WALK_PROGRAMS = 512  # programs the backward walks aim for (tests lower it to get long walks)
# Whether the backward walks launch with PDL. The unmask's does not with a learnable pos_embed (with a fixed one it
# does: UNMASK_FIXED_WALK_PDL below): launched by PDL straight after the unmask forward
# its one wave of programs (~4.5 per SM) was slower with a learnable pos_embed, fwd+bwd 0.0547 / 0.0548 ms vs 0.0502 /
# 0.0504 launched plainly, and the same either way with a fixed one (0.0487 / 0.0490 vs 0.0490 / 0.0489; H200, two runs,
# `...-2026-11-29-mae-walk-pdl-{1,2}.json`). Suspected: placed onto SMs as the forward drains, up to 8 of its
# 64-register programs stack on one SM (the fixed-pos walk's 96 registers allow 5). The gather's walk (the mask
# backward) keeps PDL: 0.0613-0.0615 ms without it vs 0.0602-0.0604 (fixed pos: 0.0572 vs 0.0564-0.0566)
GATHER_WALK_PDL = True
UNMASK_WALK_PDL = False
# The unmask's walk with a fixed pos_embed (no dpos: MAE's sin-cos, the engine's case) does launch with PDL. H200,
# MAE-L, fwd+bwd ms with vs without: under Triton 3.8 0.0431 / 0.0433 / 0.0433 vs 0.0440 / 0.0440 / 0.0441 (three
# runs, ...-2026-11-29-triton38-unmask-walkpdl-{1,2}.json and one more; 0.0433 vs 0.0442 the run before, ...-sum-1
# .json), under 3.6 0.0474 / 0.0474 vs 0.0476 / 0.0476 (...-triton36-unmask-walkpdl-{1,2}.json). The learnable-pos walk
# still loses with it under both (0.0474-0.0476 vs 0.0440 under 3.8). Bench variant UNMASK_FIXED_WALK_PDL=False.
# The learnable-pos walk at 8 samples a step (106 registers, 4 programs per SM) in one wave of 490 programs, with PDL:
# 0.0442 / 0.0442 ms vs 0.0441 / 0.0442 under 3.8 (two runs), 0.0476 vs 0.0484 under 3.6 (one run); without PDL
# 0.0450-0.0452 (...-2026-11-29-triton{38,36}-unmask-lwalk*.json; bench LEARNABLE_WALK_VARIANTS). Not taken
UNMASK_FIXED_WALK_PDL = True


# L2 eviction hints on the masking kernels' loads: rows read once (visible rows, the walks' gradients, tokens) as
# evict_first, the pos_embed rows every sample re-reads as evict_last. The unmask takes them: fwd+bwd at MAE-L
# (B = 256, N = 196, C = 512; H200, Triton 3.6, three calls) 0.0477 / 0.0478 / 0.0483 ms vs 0.0490 / 0.0488 / 0.0489
# with a fixed pos_embed, 0.0488 / 0.0491 vs 0.0503 / 0.0503 with a learnable one (...-2026-11-29-mae-evict{,-u1,-u2}
# .json). The mask does not: 0.0608 vs 0.0604 ms (fixed pos 0.0571 vs 0.0565), so it runs without (bench variants
# UNMASK_EVICT=False / MASK_EVICT=True)
MASK_EVICT = False
UNMASK_EVICT = True


# The unmask forward's additions in the operands' own 16-bit dtype where visible, mask token, pos_embed and output
# share one (the engine casts the mask token and pos_embed to the activations' dtype). The sum of two bf16 / fp16
# numbers rounded once is what the fp32 path gives (its fp32 sum is exact or off by less than the 16-bit rounding can
# see), so the output is the same; Triton 3.6 already compiles the fp32 path to such additions (add.bf16), Triton 3.8
# does not (a convert to fp32, an fp32 add and a convert back per element, 70 registers instead of 64: offline, sm_90).
# H200, MAE-L (B = 256, N = 196, C = 512), one call: under Triton 3.8 forward 0.0214 ms vs 0.0230, fwd+bwd 0.0444 vs
# 0.0463; under 3.6 the same as without (0.0475 vs 0.0479). Bit-identical outputs on the GPU in bf16 and fp16
# (...-2026-11-29-{triton38,triton36}-unmask-native.json, ...-unmask-native.json)
UNMASK_NATIVE_ADD = True

# Measured and dropped: the unmask backward's sums (the mask token's; pos_embed's when it learns) reduced by the walk's
# own last programs instead of by _sum_parts after it. Two levels of arrival counters (zeroed by the forward past inv's
# B * N entries, reset by the last arrival): the last of a tile's batch chunks summed its partials, then the last of
# a column's position tiles summed those rows; every sum read back in one fixed order, so deterministic (300 backwards
# bit-identical on the H200 under Triton 3.6 and 3.8, ...-2026-11-29-unmask-fold-check.json). Slower at MAE-L
# (B = 256, N = 196, C = 512), fwd+bwd ms with the fold vs without: fixed pos_embed 0.0458 vs 0.0446 under Triton 3.8,
# 0.0492 vs 0.0476 under 3.6; learnable 0.0476 vs 0.0446 and 0.0565 vs 0.0488 (...-{triton38,triton36}-unmask-fold
# .json). The serial chain after the last walk program (a release / acquire atomic, the chunk sums, a second atomic,
# 49 rows read by one program) cost more than the kernel boundary it removed.


def _native_add_ok(*xs) -> bool:
    """Whether the unmask forward may add in the operands' own dtype: one 16-bit dtype for all, and not bf16 under
    Triton's interpreter (CPU tensors), whose bf16 arithmetic is wrong (its fp16 is right)."""
    dt = xs[0].dtype
    return (dt in (torch.bfloat16, torch.float16) and all(x.dtype == dt for x in xs)
            and (xs[0].is_cuda or dt == torch.float16))


def _evict(on: bool, keep: bool = True) -> dict:
    """The STREAM / KEEP eviction-policy constexprs of a masking kernel's launch (empty strings: no hint)."""
    out = {"STREAM": "evict_first" if on else ""}
    if keep:
        out["KEEP"] = "evict_last" if on else ""
    return out


def _walk_config(B: int, N: int, C: int, bb: int, target: Optional[int] = None):
    """(BLOCK_B, BLOCK_N, BLOCK_C, batch chunk, chunks) for the backward walks: about `target`
    programs (all resident at once on an H200 at <= 96 registers) with few partial planes (each
    costs a write and a read of N * C fp32). B = 256, N = 196: 3 chunks for C = 1024, 6 for 512."""
    bn, bc = 4, _col_block(C, 256)
    target = WALK_PROGRAMS if target is None else target
    tiles = cdiv(N, bn) * cdiv(C, bc)
    chunks = max(1, min(cdiv(B, bb), cdiv(target, tiles)))
    bchunk = cdiv(cdiv(B, chunks), bb) * bb  # a multiple of BLOCK_B
    return bb, bn, bc, bchunk, cdiv(B, bchunk)


def _finish_parts(part, nchunks, N, C, extra, dmt, dtype):
    """Reduce the partial planes with one launch: (dpos [N, C] in `dtype`, dmt [C] filled in place, in its own
    dtype: the sums are fp32, stored in the parameters' dtypes, so no cast kernels follow).
    N = 0: the planes hold only the `extra` mask-token rows (no dpos; an empty one is returned)."""
    dpos = part.new_empty((N, C), dtype=dtype)
    M = N * C
    block = 1024
    npb = cdiv(M, block)
    # the mask-token rows (chunks x position tiles, ~300 at MAE-L) are summed by C / BLOCK_C programs,
    # BLOCK_T rows a step: few dependent steps (it was 2 programs x 37 steps of 8 rows, ~30 us)
    bt, bcm = LAUNCH["sum_mt"]
    bcm = min(next_power_of_2(max(C, 1)), bcm)
    grid = npb + (cdiv(C, bcm) if dmt is not None else 0)
    _sum_parts[(grid,)](part, dpos, dmt if dmt is not None else dpos, nchunks, M, M + extra * C, extra, C, npb,
                        BLOCK=block, BLOCK_T=bt, BLOCK_C=bcm, num_warps=4, **launch_options(use_pdl(part)))
    return dpos


# The ops are torch.library custom ops: torch.compile (the engine compiles the whole objective)
# sees opaque ops with known output shapes instead of tracing into the Triton launchers.


@torch.library.custom_op("vfm::mae_rank", mutates_args=())
def mae_rank(noise: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_keep [B, K] int64, mask [B, N] bool, rank [B, N] int32) from noise [B, N]."""
    B, N = noise.shape
    noise = noise.float().contiguous()
    ids_keep = torch.empty(B, K, device=noise.device, dtype=torch.int64)
    mask = torch.empty(B, N, device=noise.device, dtype=torch.bool)
    rank = torch.empty(B, N, device=noise.device, dtype=torch.int32)
    bj = next_power_of_2(max(N, 1))
    if not (B and N):
        return ids_keep, mask, rank
    bits = max(1, bj.bit_length() - 1)  # 2**bits == bj > every position
    if RANK_BY == "sort":
        warps = LAUNCH["rank_sort"] if bj <= 512 else max(8, LAUNCH["rank_sort"])
        _rank_sort_kernel[(B,)](noise, ids_keep, mask, rank, N, K, BLOCK=bj, IDX_BITS=bits, num_warps=warps,
                                **launch_options(use_pdl(noise)))
    else:
        bi = max(1, min(32, 4096 // bj))
        _rank_kernel[(B, cdiv(N, bi))](noise, ids_keep, mask, rank, N, K, BLOCK_I=bi, BLOCK_J=bj, num_warps=4,
                                       **launch_options(use_pdl(noise)))
    return ids_keep, mask, rank


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
    bc = min(next_power_of_2(max(C, 1)), 1024)
    rows, warps = LAUNCH["gather"]
    br = max(1, rows * 1024 // bc)
    if B * K:
        _gather_kernel[(cdiv(B * K, br), cdiv(C, bc))](
            tokens, pos, ids_keep, out, B * K, K, C, tokens.stride(0), tokens.stride(1), pos.stride(0),
            BLOCK_R=br, BLOCK_C=bc, num_warps=warps, **_evict(MASK_EVICT), **launch_options(use_pdl(out)))
    return out


@torch.library.custom_op("vfm::mae_gather_bwd", mutates_args=())
def _gather_bwd(dvis: torch.Tensor, rank: torch.Tensor, tokens_dtype: torch.dtype,
                need_dpos: bool, pos_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(dtokens [B, N, C], dpos [N, C] in pos_dtype, summed in fp32; empty when not needed)."""
    B, K, C = dvis.shape
    N = rank.shape[1]
    dvis = dvis.contiguous()
    dtok = torch.empty(B, N, C, device=dvis.device, dtype=tokens_dtype)
    if not B or not N:
        return dtok, dvis.new_zeros((N, C) if need_dpos else (0,), dtype=pos_dtype)
    # 8 samples a step: 16 KB of stores in flight. Without dpos no partial planes: 8x the programs
    # (measured at MAE-L, H200: 4x gave 0.035 ms vs 0.037 for 1x; 8x then fwd+bwd 0.0603 / 0.0607 ms vs
    # 0.0610 / 0.0610 for 4x in two calls, as the variant WALK_PROGRAMS=1024 of `bench kernels
    # --mae-variants`; with dpos more programs mean more planes, and 512 wins)
    bb, bn, bc, bchunk, nchunks = _walk_config(B, N, C, 8, None if need_dpos else 8 * WALK_PROGRAMS)
    # one chunk: the kernel writes dpos itself (in pos_dtype); else fp32 partial planes and one reduction launch
    part = (dvis.new_empty((nchunks, N, C), dtype=torch.float32) if nchunks > 1 else
            dvis.new_empty((N, C), dtype=pos_dtype)) if need_dpos else dtok
    _gather_bwd_kernel[(cdiv(N, bn), cdiv(C, bc), nchunks)](
        dvis, rank, dtok, part, B, N, K, C, bchunk, N * C, HAS_DPOS=need_dpos, BLOCK_B=bb, BLOCK_N=bn, BLOCK_C=bc,
        num_warps=4, **_evict(MASK_EVICT, keep=False), **launch_options(GATHER_WALK_PDL and use_pdl(dvis)))
    if not need_dpos:
        return dtok, dvis.new_empty((0,), dtype=pos_dtype)
    return dtok, (_finish_parts(part, nchunks, N, C, 0, None, pos_dtype) if nchunks > 1 else part)


@_gather_bwd.register_fake
def _(dvis, rank, tokens_dtype, need_dpos, pos_dtype=torch.float32):
    B, K, C = dvis.shape
    N = rank.shape[1]
    dpos = dvis.new_empty((N, C) if need_dpos else (0,), dtype=pos_dtype)
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
    dtok, dpos = _gather_bwd(dvis, rank, ctx.tokens_dtype, need_dpos, ctx.pos_dtype)
    return dtok, (dpos if need_dpos else None), None, None


_gather_ranked.register_autograd(_ranked_backward, setup_context=_ranked_setup)


@torch.library.custom_op("vfm::mae_unmask", mutates_args=())
def _unmask(visible: torch.Tensor, ids_keep: torch.Tensor, mask_token: torch.Tensor,
            pos: torch.Tensor, rank: Optional[torch.Tensor] = None,
            mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(full [B, N, C], inv [B, N] int32: each position's row in `visible`, -1 where masked). `rank` (optional,
    int32 [B, N], mae_rank's third output for the same sample): each position's row read from it instead of
    found by comparing with ids_keep. `mask` (optional, bool [B, N], mae_mask's for the same ids_keep): the
    visible rows are scattered and the masked positions filled by separate programs (`_unmask_split_kernel`)."""
    B, K, C = visible.shape
    N = pos.shape[0]
    pos = pos if pos.stride(-1) == 1 else pos.contiguous()
    ids_keep = ids_keep.contiguous()
    inv = torch.empty((B, N), device=visible.device, dtype=torch.int32)
    mt = mask_token.contiguous()
    out = torch.empty(B, N, C, device=visible.device, dtype=torch.result_type(visible, pos))
    bc = min(next_power_of_2(max(C, 1)), 1024)
    if mask is not None and UNMASK_SPLIT:
        if not B * N:
            return out, inv
        visible = visible if visible.stride(-1) == 1 else visible.contiguous()
        sr, fr, warps = LAUNCH["unmask_split"]
        sb = cdiv(B * K, sr)
        _unmask_split_kernel[(sb + cdiv(B * N, fr), cdiv(C, bc))](
            visible, ids_keep, _mask_bytes(mask), mt, pos, out, inv, B * K, B * N, N, K, C, visible.stride(0),
            visible.stride(1), pos.stride(0), sb, BLOCK_SR=sr, BLOCK_FR=fr, BLOCK_C=bc, num_warps=warps,
            NATIVE=UNMASK_NATIVE_ADD and _native_add_ok(visible, mt, pos, out), **_evict(UNMASK_EVICT),
            **launch_options(use_pdl(out)))
        return out, inv
    visible = visible.contiguous()
    rows, warps = LAUNCH["unmask"]
    br = max(1, min(2 * rows, rows * 512 // bc))
    bk = min(next_power_of_2(max(K, 1)), max(16, 1024 // br))
    if not B * N:
        return out, inv
    from_rank = rank is not None
    rank = rank.contiguous() if from_rank else inv
    _unmask_kernel[(B, cdiv(N, br), cdiv(C, bc))](
        visible, ids_keep, mt, pos, out, inv, rank, N, K, C, pos.stride(0), BLOCK_R=br, BLOCK_C=bc, BLOCK_K=bk,
        HOIST=UNMASK_HOIST, FROM_RANK=from_rank, num_warps=warps, **launch_options(use_pdl(out)))
    return out, inv


@_unmask.register_fake
def _(visible, ids_keep, mask_token, pos, rank=None, mask=None):
    B, K, C = visible.shape
    N = pos.shape[0]
    return (visible.new_empty((B, N, C), dtype=torch.result_type(visible, pos)),
            visible.new_empty((B, N), dtype=torch.int32))


@torch.library.custom_op("vfm::mae_unmask_bwd", mutates_args=())
def _unmask_bwd(dfull: torch.Tensor, inv: torch.Tensor, K: int, visible_dtype: torch.dtype,
                need_dpos: bool = True, mt_dtype: torch.dtype = torch.float32,
                pos_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dvisible [B, K, C], dmask_token [C] in mt_dtype, dpos [N, C] in pos_dtype, both summed in fp32; dpos
    empty when not needed: MAE's fixed sin-cos decoder pos_embed)."""
    B, N, C = dfull.shape
    dfull = dfull.contiguous()
    dvis = torch.empty(B, K, C, device=dfull.device, dtype=visible_dtype)
    n_pos = N if need_dpos else 0
    if not B or not N:
        return dvis, dfull.new_zeros((C,), dtype=mt_dtype), dfull.new_zeros((n_pos, C), dtype=pos_dtype)
    # two accumulators: 4 samples a step; the mask token's alone: 8
    bb, bn, bc, bchunk, nchunks = _walk_config(B, N, C, LAUNCH["unmask_walk"][0 if need_dpos else 1])
    nb = cdiv(N, bn)
    # per chunk one plane: N rows of dpos partials (if needed), then nb rows of mask-token partials
    part = dfull.new_empty((nchunks, n_pos + nb, C), dtype=torch.float32)
    _unmask_bwd_kernel[(nb, cdiv(C, bc), nchunks)](
        dfull, inv, dvis, part, B, N, K, C, bchunk, (n_pos + nb) * C, n_pos, HAS_DPOS=need_dpos, BLOCK_B=bb,
        BLOCK_N=bn, BLOCK_C=bc, num_warps=4, **_evict(UNMASK_EVICT, keep=False),
        **launch_options((UNMASK_WALK_PDL if need_dpos else UNMASK_FIXED_WALK_PDL) and use_pdl(dfull)))
    dmt = dfull.new_empty((C,), dtype=mt_dtype)
    dpos = _finish_parts(part, nchunks, n_pos, C, nb, dmt, pos_dtype)
    return dvis, dmt, dpos


@_unmask_bwd.register_fake
def _(dfull, inv, K, visible_dtype, need_dpos=True, mt_dtype=torch.float32, pos_dtype=torch.float32):
    B, N, C = dfull.shape
    return (dfull.new_empty((B, K, C), dtype=visible_dtype), dfull.new_empty((C,), dtype=mt_dtype),
            dfull.new_empty((N if need_dpos else 0, C), dtype=pos_dtype))


def _unmask_setup(ctx, inputs, output):
    visible, ids_keep, mask_token, pos, _rank, _mask = inputs
    ctx.save_for_backward(output[1])
    ctx.K, ctx.dtypes = visible.shape[1], (visible.dtype, mask_token.dtype, pos.dtype)
    # inv takes no gradient: without this autograd fills a zero [B, N] int32 tensor for it every backward (a kernel
    # of its own, ~1 us in the graphed fwd+bwd)
    ctx.set_materialize_grads(False)


def _unmask_backward(ctx, dfull, dinv):
    if dfull is None:
        return None, None, None, None, None, None
    (inv,) = ctx.saved_tensors
    vdt, mdt, pdt = ctx.dtypes
    need_dpos = bool(ctx.needs_input_grad[3])
    dvis, dmt, dpos = _unmask_bwd(dfull, inv, ctx.K, vdt, need_dpos, mdt, pdt)
    return dvis, None, dmt, (dpos if need_dpos else None), None, None


_unmask.register_autograd(_unmask_backward, setup_context=_unmask_setup)


def mae_mask(tokens, pos_embed, mask_ratio, *, noise: Optional[torch.Tensor] = None, impl="auto"):
    """Random MAE masking: (visible [B, K, C] with pos_embed added, ids_keep [B, K], mask [B, N] True=masked)."""
    B, N, C = tokens.shape
    if _pos2d(pos_embed).shape != (N, C):
        raise ValueError(f"pos_embed {tuple(pos_embed.shape)} does not match tokens {tuple(tokens.shape)}")
    if noise is None:
        noise = torch.rand(B, N, device=tokens.device)
    if triton_version.resolve(impl, tokens) == "torch":
        return mae_mask_reference(tokens, pos_embed, mask_ratio, noise=noise)
    K = keep_count(N, mask_ratio)
    ids_keep, mask, rank = mae_rank(noise, K)
    visible = _gather_ranked(tokens, _pos2d(pos_embed), ids_keep, rank)
    return visible, ids_keep, mask


def mae_unmask(visible, ids_keep, mask_token, pos_embed, *, mask: Optional[torch.Tensor] = None,
               rank: Optional[torch.Tensor] = None, impl="auto"):
    """Decoder side: visible tokens back to their positions, mask_token elsewhere, + pos_embed.
    `mask` (bool [B, N], True = masked: `mae_mask`'s third output, for the same ids_keep; the Triton path's fast
    one, what the engine passes): which positions take the mask token, so that no program has to find a position's
    row in `visible` first. It must be the complement of ids_keep (positions it marks kept but ids_keep does not
    hold are left unwritten). `rank` (Triton path only; int32 [B, N] from `mae_rank` on the same noise, used when
    no mask is given): each position's row taken from it instead of from comparing its index with ids_keep."""
    if mask is not None:
        want = (visible.shape[0], _pos2d(pos_embed).shape[0])
        if tuple(mask.shape) != want:
            raise ValueError(f"mask {tuple(mask.shape)} is not [batch, positions] = [{want[0]}, {want[1]}]")
        if mask.device != visible.device:
            raise ValueError(f"mask is on {mask.device}, visible on {visible.device}")
    if triton_version.resolve(impl, visible) == "torch":
        return mae_unmask_reference(visible, ids_keep, mask_token, pos_embed)
    C = visible.shape[-1]
    return _unmask(visible, ids_keep, mask_token.reshape(C), _pos2d(pos_embed), rank, mask)[0]


def _mask_bytes(mask: torch.Tensor) -> torch.Tensor:
    """The bool mask as one byte per position (a view when it is contiguous bool)."""
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)
