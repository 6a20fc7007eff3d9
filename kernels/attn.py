"""Fused scaled-dot-product attention shaped for ViT sequences (N <= ~1.4k, many batch x heads).

    kernels.attention(q, k, v, *, scale=None, cu_seqlens=None, max_seqlen=None, impl="auto")

q/k/v are [B, H, N, D] (any strides with a contiguous last dim), or packed [total, H, D] with
`cu_seqlens` (int32 [nseq + 1], the block-diagonal packing DINOv2 uses for its crops).

Forward: one program per (query block, batch x head); each streams the keys/values in
BLOCK_N tiles with an online softmax (exp2, scale folded in) and stores the output and the
row log-sum-exp. For short sequences the whole K/V is one tile.

Backward, three layouts chosen per shape (see `_bwd_config`; config key SPLIT = False, True, "kv+q"):
- "fused": one program per (batch x head) walks its key blocks and, inside, all query blocks,
  so dK/dV stay in registers and dQ accumulates in a private fp32 scratch (read-modify-write,
  no atomics). When the whole sequence is one key block there is no scratch at all and
  delta = rowsum(dO * O) is computed inline: one kernel, one pass. Made for N <= ~300.
- "split": one program per (key block, batch x head) with dQ accumulated by fp32 atomics;
  delta comes from a small preprocessing kernel. Made for longer sequences, where the
  per-head program above would leave SMs idle.
- "kv+q" (FlashAttention-2 style): two passes of one kernel source, each program owning one
  output tile: a dQ pass (query tile per program, walks the key tiles, also stores delta) and then
  a dK/dV pass (key tile per program, walks the query tiles). Recomputes P twice but holds two
  accumulators at most (the fused layouts hold three) and needs no atomics or scratch.
Head dims that are not a power of two (88) are padded in-kernel to the next power of two, or split in two
power-of-two pieces (config key SPLIT_D). On Hopper and later the config key TMA loads the full tiles a loop walks
through tensor descriptors (the default in the backward passes at d = 32 / 64 / 88; see kernels/README.md). The config
key TAIL_G puts the rows past the last full block of several heads in one program (see _grouped_pids); with TAIL_GS
that grouped tail splits the head dim as the full blocks do instead of padding it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import triton_version
from kernels.cuda_context import ensure_context
from kernels.host import cdiv, next_power_of_2

IMPLS = ("auto", "triton", "torch", "sdpa", "xformers")


# ----------------------------------------------------------------------------- references


def _split_packed(x: torch.Tensor, cu_seqlens: torch.Tensor):
    bounds = cu_seqlens.tolist()
    return [x[bounds[i]:bounds[i + 1]].transpose(0, 1) for i in range(len(bounds) - 1)]  # [H, n, D]


def attention_reference(q, k, v, *, scale=None, cu_seqlens=None, max_seqlen=None):
    """Plain softmax(q k^T * scale) v computed in fp32; output in q's dtype. Differentiable."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def dense(q_, k_, v_):
        s = (q_.float() @ k_.float().transpose(-1, -2)) * scale
        return (s.softmax(-1) @ v_.float()).to(q.dtype)

    if cu_seqlens is None:
        return dense(q, k, v)
    outs = [dense(a, b, c).transpose(0, 1) for a, b, c in
            zip(_split_packed(q, cu_seqlens), _split_packed(k, cu_seqlens), _split_packed(v, cu_seqlens))]
    return torch.cat(outs, 0)


def attention_sdpa(q, k, v, *, scale=None, cu_seqlens=None, max_seqlen=None):
    """torch's scaled_dot_product_attention; packed input runs one call per group of equal lengths."""
    if cu_seqlens is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    starts = cu_seqlens[:-1].tolist()
    out = torch.empty_like(q)
    for n in sorted(set(lengths)):
        idx = [s for s, m in zip(starts, lengths) if m == n]
        if n == 0:
            continue
        rows = torch.tensor(idx, device=q.device)[:, None] + torch.arange(n, device=q.device)  # [g, n]
        pick = lambda x: x[rows].transpose(1, 2)  # [g, H, n, D]
        o = F.scaled_dot_product_attention(pick(q), pick(k), pick(v), scale=scale)
        out = out.index_put((rows,), o.transpose(1, 2))
    return out


def attention_xformers(q, k, v, *, scale=None, cu_seqlens=None, max_seqlen=None):
    """xformers.ops.memory_efficient_attention (optional dependency, CUDA only)."""
    import xformers.ops as xops

    if cu_seqlens is None:
        o = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return o.transpose(1, 2)
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    bias = BlockDiagonalMask.from_seqlens((cu_seqlens[1:] - cu_seqlens[:-1]).tolist())
    o = xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=scale)
    return o[0]


# ----------------------------------------------------------------------------- Triton kernels
#
# Short sequences waste most of a fixed tile on padding (N = 197 in 64-blocks is 256: 59 % of
# the tile products are real). So every loop runs full BLOCK tiles without masks and then the
# remainder in TAIL tiles (16 by default: 197 -> 3 x 64 + 16), and query programs past the full
# blocks take TAIL_M rows. Block shapes are constexpr: both variants compile into one kernel.


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    if MASK_R and MASK_C:
        x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
    elif MASK_R:
        x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif MASK_C:
        x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(ptrs, x, rows_ok, cols_ok, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    if MASK_R and MASK_C:
        tl.store(ptrs, x, mask=rows_ok[:, None] & cols_ok[None, :])
    elif MASK_R:
        tl.store(ptrs, x, mask=rows_ok[:, None])
    elif MASK_C:
        tl.store(ptrs, x, mask=cols_ok[None, :])
    else:
        tl.store(ptrs, x)


@triton.jit
def _desc_tile(desc, b, h, row0, ROWS: tl.constexpr, COLS: tl.constexpr, COL0: tl.constexpr = 0):
    """Rows [row0, row0 + ROWS), columns [COL0, COL0 + COLS) of head (b, h) from a [B, H, N, D] tensor descriptor
    (block [1, 1, ROWS, COLS]); columns past D arrive as zeros."""
    return tl.reshape(desc.load([b, h, row0, COL0]), [ROWS, COLS])


@triton.jit
def _walk_pair(A, B, ao, bo, sa_n, sb_n, AD, BD, b, h, start, seqlen, offs_c, mask_c, ROWS: tl.constexpr,
               MASK: tl.constexpr, EVEN_C: tl.constexpr, TMA: tl.constexpr):
    """Rows [start, start + ROWS) of two tensors a loop walks together (K / V, Q / dO): through their tensor
    descriptors AD / BD when TMA (head-dim columns past HEAD_DIM arrive as zeros), else pointer loads (MASK: rows
    past seqlen read as zeros; EVEN_C: every column of offs_c valid)."""
    if TMA:
        a = _desc_tile(AD, b, h, start, ROWS, offs_c.shape[0])
        x = _desc_tile(BD, b, h, start, ROWS, offs_c.shape[0])
    else:
        rows = start + tl.arange(0, ROWS)
        rows_ok = rows < seqlen
        a = _load_tile(A + ao + rows[:, None] * sa_n + offs_c[None, :], rows_ok, mask_c, MASK, not EVEN_C)
        x = _load_tile(B + bo + rows[:, None] * sb_n + offs_c[None, :], rows_ok, mask_c, MASK, not EVEN_C)
    return a, x


@triton.jit
def _walk_pair2(A, B, ao, bo, sa_n, sb_n, AD, AD2, BD, BD2, b, h, start, seqlen, offs_d, offs_d2, mask_d2,
                ROWS: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr):
    """_walk_pair with the head dim in two pieces (SPLIT_D): (a, a2, x, x2), the second pieces through their own
    descriptors AD2 / BD2 (block columns D2, from column BLOCK_D) or masked past HEAD_DIM."""
    a, a2 = _split_rows(A, ao, sa_n, AD, AD2, b, h, start, seqlen, offs_d, offs_d2, mask_d2, ROWS, MASK, TMA)
    x, x2 = _split_rows(B, bo, sb_n, BD, BD2, b, h, start, seqlen, offs_d, offs_d2, mask_d2, ROWS, MASK, TMA)
    return a, a2, x, x2


@triton.jit
def _split_rows(A, ao, sa_n, AD, AD2, b, h, start, seqlen, offs_d, offs_d2, mask_d2, ROWS: tl.constexpr,
                MASK: tl.constexpr, TMA: tl.constexpr):
    if TMA:
        a = _desc_tile(AD, b, h, start, ROWS, offs_d.shape[0])
        a2 = _desc_tile(AD2, b, h, start, ROWS, offs_d2.shape[0], offs_d.shape[0])
    else:
        rows = start + tl.arange(0, ROWS)
        rows_ok = rows < seqlen
        a = _load_tile(A + ao + rows[:, None] * sa_n + offs_d[None, :], rows_ok, offs_d, MASK, False)
        a2 = _load_tile(A + ao + rows[:, None] * sa_n + offs_d2[None, :], rows_ok, mask_d2, MASK, True)
    return a, a2


@triton.jit
def _seq_bounds(CU, b, N, VARLEN: tl.constexpr):
    if VARLEN:
        start = tl.load(CU + b)
        seqlen = tl.load(CU + b + 1) - start
    else:
        start = b * 0
        seqlen = N + b * 0
    return start, seqlen


@triton.jit
def _softmax_step(qk, m_i, qk_scale, keep, MASK: tl.constexpr, AX: tl.constexpr, LEAN: tl.constexpr):
    """(row max, p) of one online-softmax step over the last axis AX of the raw scores qk, in log2 units; entries
    outside `keep` (MASK: padded keys) take no weight. LEAN (see _attn_fwd): the max of the raw scores, scaled once
    per row, and the scale folded into exp2's argument; else the scores are scaled first."""
    if LEAN:
        if MASK:
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, AX) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - tl.expand_dims(m_new, AX))
    else:
        s = qk * qk_scale
        if MASK:
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, AX))
        p = tl.math.exp2(s - tl.expand_dims(m_new, AX))
    return m_new, p


@triton.jit
def _normalise(acc, l_i, AX: tl.constexpr, LEAN: tl.constexpr):
    """The output rows divided by their softmax sums l_i (broadcast along AX); LEAN: by one reciprocal per row."""
    if LEAN:
        return acc * tl.expand_dims(1.0 / l_i, AX)
    return acc / tl.expand_dims(l_i, AX)


@triton.jit
def _fwd_kv_step(q, m_i, l_i, acc, K, V, ko, vo, start_n, seqlen, sk_n, sv_n, qk_scale, offs_d, mask_d,
                 BN: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr,
                 KD=None, VD=None, b=0, h=0, TMA: tl.constexpr = False, LEAN: tl.constexpr = False):
    cols = start_n + tl.arange(0, BN)
    cols_ok = cols < seqlen
    # TMA: full tiles through the tensor descriptors; head-dim columns past HEAD_DIM arrive as zeros
    k, v = _walk_pair(K, V, ko, vo, sk_n, sv_n, KD, VD, b, h, start_n, seqlen, offs_d, mask_d, BN, MASK_N, EVEN_D, TMA)
    return _fwd_kv_math(q, m_i, l_i, acc, k, v, cols_ok, qk_scale, MASK_N, LEAN)


@triton.jit
def _fwd_kv_math(q, m_i, l_i, acc, k, v, cols_ok, qk_scale, MASK_N: tl.constexpr, LEAN: tl.constexpr):
    """One online-softmax step of the forward over key tile (k, v), already loaded."""
    m_new, p = _softmax_step(tl.dot(q, tl.trans(k)), m_i, qk_scale, cols_ok[None, :], MASK_N, 1, LEAN)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _fwd_q_block(Q, K, V, O, LSE, qo, ko, vo, oo, lo, row0, seqlen, sq_n, sk_n, sv_n, so_n, qk_scale,
                 offs_d, mask_d,
                 BM: tl.constexpr, MASK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, WS: tl.constexpr,
                 KD=None, VD=None, b=0, h=0, TMA: tl.constexpr = False, LEAN: tl.constexpr = False,
                 PRE: tl.constexpr = False, FIRST: tl.constexpr = False):
    # PRE (config key TAIL_PRE): the walk's first tail tile (K and V) is loaded with Q, before the full-tile loop, so
    # its load latency hides behind the loop instead of following it
    # FIRST (config key TAIL_FIRST): the walk's tail steps run before the full-tile loop instead of after it; where
    # both are set, FIRST (PRE then does nothing), as in the backward blocks
    rows = row0 + tl.arange(0, BM)
    rows_ok = rows < seqlen
    q = _load_tile(Q + qo + rows[:, None] * sq_n + offs_d[None, :], rows_ok, mask_d, MASK_M, not EVEN_D)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BLOCK_D], tl.float32)
    n_full = (seqlen // BLOCK_N) * BLOCK_N
    n_tail = n_full
    if FIRST:
        for start_n in range(n_full, seqlen, TAIL_N):
            m_i, l_i, acc = _fwd_kv_step(q, m_i, l_i, acc, K, V, ko, vo, start_n, seqlen, sk_n, sv_n, qk_scale,
                                         offs_d, mask_d, TAIL_N, True, EVEN_D, KD, VD, b, h, False, LEAN)
        n_tail = seqlen
    elif PRE:
        kt, vt = _walk_pair(K, V, ko, vo, sk_n, sv_n, KD, VD, b, h, n_full, seqlen, offs_d, mask_d, TAIL_N, True,
                            EVEN_D, False)
        n_tail = n_full + TAIL_N
    for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WS):
        m_i, l_i, acc = _fwd_kv_step(q, m_i, l_i, acc, K, V, ko, vo, start_n, seqlen, sk_n, sv_n, qk_scale,
                                     offs_d, mask_d, BLOCK_N, False, EVEN_D, KD, VD, b, h, TMA, LEAN)
    if PRE and not FIRST:
        if n_full < seqlen:
            m_i, l_i, acc = _fwd_kv_math(q, m_i, l_i, acc, kt, vt, n_full + tl.arange(0, TAIL_N) < seqlen, qk_scale,
                                         True, LEAN)
    for start_n in range(n_tail, seqlen, TAIL_N):
        m_i, l_i, acc = _fwd_kv_step(q, m_i, l_i, acc, K, V, ko, vo, start_n, seqlen, sk_n, sv_n, qk_scale,
                                     offs_d, mask_d, TAIL_N, True, EVEN_D, KD, VD, b, h, False, LEAN)
    acc = _normalise(acc, l_i, 1, LEAN)
    _store_tile(O + oo + rows[:, None] * so_n + offs_d[None, :], acc.to(O.dtype.element_ty), rows_ok, mask_d,
                MASK_M, not EVEN_D)
    lse = m_i + tl.math.log2(l_i)
    if MASK_M:
        tl.store(LSE + lo + rows, lse, mask=rows_ok)
    else:
        tl.store(LSE + lo + rows, lse)


@triton.jit
def _fwd_kv_step2(q, q2, m_i, l_i, acc, acc2, K, V, ko, vo, start_n, seqlen, sk_n, sv_n, qk_scale, offs_d, offs_d2,
                  mask_d2, BN: tl.constexpr, MASK_N: tl.constexpr, LEAN: tl.constexpr = False):
    # the head dim in two pieces (SPLIT_D): columns offs_d (all valid) and offs_d2 (masked past HEAD_DIM)
    cols = start_n + tl.arange(0, BN)
    cols_ok = cols < seqlen
    kt = tl.trans(_load_tile(K + ko + cols[:, None] * sk_n + offs_d[None, :], cols_ok, offs_d, MASK_N, False))
    kt2 = tl.trans(_load_tile(K + ko + cols[:, None] * sk_n + offs_d2[None, :], cols_ok, mask_d2, MASK_N, True))
    v = _load_tile(V + vo + cols[:, None] * sv_n + offs_d[None, :], cols_ok, offs_d, MASK_N, False)
    v2 = _load_tile(V + vo + cols[:, None] * sv_n + offs_d2[None, :], cols_ok, mask_d2, MASK_N, True)
    m_new, p = _softmax_step(tl.dot(q2, kt2, tl.dot(q, kt)), m_i, qk_scale, cols_ok[None, :], MASK_N, 1, LEAN)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v.dtype)
    acc = acc * alpha[:, None] + tl.dot(p, v)
    acc2 = acc2 * alpha[:, None] + tl.dot(p, v2)
    return m_new, l_i, acc, acc2


@triton.jit
def _fwd_q_block2(Q, K, V, O, LSE, qo, ko, vo, oo, lo, row0, seqlen, sq_n, sk_n, sv_n, so_n, qk_scale,
                  offs_d, offs_d2, mask_d2,
                  BM: tl.constexpr, MASK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, D2: tl.constexpr, WS: tl.constexpr, LEAN: tl.constexpr = False):
    rows = row0 + tl.arange(0, BM)
    rows_ok = rows < seqlen
    q = _load_tile(Q + qo + rows[:, None] * sq_n + offs_d[None, :], rows_ok, offs_d, MASK_M, False)
    q2 = _load_tile(Q + qo + rows[:, None] * sq_n + offs_d2[None, :], rows_ok, mask_d2, MASK_M, True)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BLOCK_D], tl.float32)
    acc2 = tl.zeros([BM, D2], tl.float32)
    n_full = (seqlen // BLOCK_N) * BLOCK_N
    for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WS):
        m_i, l_i, acc, acc2 = _fwd_kv_step2(q, q2, m_i, l_i, acc, acc2, K, V, ko, vo, start_n, seqlen, sk_n, sv_n,
                                            qk_scale, offs_d, offs_d2, mask_d2, BLOCK_N, False, LEAN)
    for start_n in range(n_full, seqlen, TAIL_N):
        m_i, l_i, acc, acc2 = _fwd_kv_step2(q, q2, m_i, l_i, acc, acc2, K, V, ko, vo, start_n, seqlen, sk_n, sv_n,
                                            qk_scale, offs_d, offs_d2, mask_d2, TAIL_N, True, LEAN)
    acc = _normalise(acc, l_i, 1, LEAN)
    acc2 = _normalise(acc2, l_i, 1, LEAN)
    _store_tile(O + oo + rows[:, None] * so_n + offs_d[None, :], acc.to(O.dtype.element_ty), rows_ok, offs_d,
                MASK_M, False)
    _store_tile(O + oo + rows[:, None] * so_n + offs_d2[None, :], acc2.to(O.dtype.element_ty), rows_ok, mask_d2,
                MASK_M, True)
    lse = m_i + tl.math.log2(l_i)
    if MASK_M:
        tl.store(LSE + lo + rows, lse, mask=rows_ok)
    else:
        tl.store(LSE + lo + rows, lse)



# ----------------------------------------------------------------------------- grouped tails (TAIL_G)
#
# A sequence's last rows past its full blocks (N = 197 = 3 x 64 + 5) cost a whole program: it walks every key tile
# as long as a full one does (the loop is latency-bound), for 5 rows: ~30 % of the time at N = 197 / 261. With
# TAIL_G = G the tail rows of G heads share one program, as a [G, rows, d] tile whose products are batched (3D)
# tl.dot, one head per warp where G = num_warps. Each group of G heads launches as its full blocks head by head
# then its tail programs, next to each other, so the tail's keys are still in L2 (a tail kernel launched on its
# own re-reads K / V from memory: 40 us at N = 197, twice what the tail programs cost in-kernel).


@triton.jit
def _group_offs(bh, H, s_b, s_h):
    """int64 offsets of the heads bh (a [G] vector of b * H + h) in a tensor with batch / head strides s_b, s_h."""
    return (bh // H).to(tl.int64) * s_b + (bh % H).to(tl.int64) * s_h


@triton.jit
def _load_rows3(P, off, rows, s_n, offs_d, rows_ok, mask_d, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """Rows `rows` of the G heads at offsets `off`: a [G, rows, columns] tile (masked rows read as zeros)."""
    ptrs = P + off[:, None, None] + rows[None, :, None] * s_n + offs_d[None, None, :]
    if MASK_R and MASK_C:
        x = tl.load(ptrs, mask=rows_ok[None, :, None] & mask_d[None, None, :], other=0.0)
    elif MASK_R:
        x = tl.load(ptrs, mask=rows_ok[None, :, None], other=0.0)
    elif MASK_C:
        x = tl.load(ptrs, mask=mask_d[None, None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _store_rows3(P, off, rows, s_n, offs_d, x, rows_ok, mask_d, MASK_C: tl.constexpr):
    ptrs = P + off[:, None, None] + rows[None, :, None] * s_n + offs_d[None, None, :]
    if MASK_C:
        tl.store(ptrs, x, mask=rows_ok[None, :, None] & mask_d[None, None, :])
    else:
        tl.store(ptrs, x, mask=rows_ok[None, :, None])


@triton.jit
def _load_rows3_pair(P, off, rows, s_n, offs_d, offs_d2, rows_ok, mask_d2, MASK_R: tl.constexpr):
    """_load_rows3 of a head dim in two pieces (TAIL_GS): columns offs_d (all valid), then offs_d2 (masked)."""
    x = _load_rows3(P, off, rows, s_n, offs_d, rows_ok, offs_d, MASK_R, False)
    return x, _load_rows3(P, off, rows, s_n, offs_d2, rows_ok, mask_d2, MASK_R, True)


@triton.jit
def _store_rows3_pair(P, off, rows, s_n, offs_d, offs_d2, x, x2, rows_ok, mask_d2):
    """_store_rows3 of a head dim in two pieces: x into columns offs_d, x2 into offs_d2 (masked)."""
    _store_rows3(P, off, rows, s_n, offs_d, x, rows_ok, offs_d, False)
    _store_rows3(P, off, rows, s_n, offs_d2, x2, rows_ok, mask_d2, True)


@triton.jit
def _fwd_kv_step_g(q, m_i, l_i, acc, K, V, ko, vo, start_n, seqlen, sk_n, sv_n, qk_scale, offs_d, mask_d,
                   BN: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr, LEAN: tl.constexpr = False):
    # _fwd_kv_step for G heads: q [G, TM, d], m_i / l_i [G, TM]
    cols = start_n + tl.arange(0, BN)
    cols_ok = cols < seqlen
    k = _load_rows3(K, ko, cols, sk_n, offs_d, cols_ok, mask_d, MASK_N, not EVEN_D)
    v = _load_rows3(V, vo, cols, sv_n, offs_d, cols_ok, mask_d, MASK_N, not EVEN_D)
    m_new, p = _softmax_step(tl.dot(q, tl.permute(k, (0, 2, 1))), m_i, qk_scale, cols_ok[None, None, :], MASK_N, 2,
                             LEAN)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 2)
    acc = acc * alpha[:, :, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _fwd_tail_group(Q, K, V, O, LSE, bh, H, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                    sl_b, sl_h, row0, seqlen, qk_scale, offs_d, mask_d, G: tl.constexpr, TM: tl.constexpr,
                    WALK: tl.constexpr, TAIL_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                    LEAN: tl.constexpr = False):
    """Output rows [row0, row0 + TM) of the G heads bh (dense inputs: one length)."""
    rows = row0 + tl.arange(0, TM)
    rows_ok = rows < seqlen
    ko = _group_offs(bh, H, sk_b, sk_h)
    vo = _group_offs(bh, H, sv_b, sv_h)
    q = _load_rows3(Q, _group_offs(bh, H, sq_b, sq_h), rows, sq_n, offs_d, rows_ok, mask_d, True, not EVEN_D)
    m_i = tl.full([G, TM], float("-inf"), tl.float32)
    l_i = tl.zeros([G, TM], tl.float32)
    acc = tl.zeros([G, TM, BLOCK_D], tl.float32)
    n_full = (seqlen // WALK) * WALK
    for start_n in range(0, n_full, WALK):
        m_i, l_i, acc = _fwd_kv_step_g(q, m_i, l_i, acc, K, V, ko, vo, start_n, seqlen, sk_n, sv_n, qk_scale,
                                       offs_d, mask_d, WALK, False, EVEN_D, LEAN)
    for start_n in range(n_full, seqlen, TAIL_N):
        m_i, l_i, acc = _fwd_kv_step_g(q, m_i, l_i, acc, K, V, ko, vo, start_n, seqlen, sk_n, sv_n, qk_scale,
                                       offs_d, mask_d, TAIL_N, True, EVEN_D, LEAN)
    acc = _normalise(acc, l_i, 2, LEAN)
    _store_rows3(O, _group_offs(bh, H, so_b, so_h), rows, so_n, offs_d, acc.to(O.dtype.element_ty), rows_ok, mask_d,
                 not EVEN_D)
    lo = _group_offs(bh, H, sl_b, sl_h)
    tl.store(LSE + lo[:, None] + rows[None, :], m_i + tl.math.log2(l_i), mask=rows_ok[None, :])


@triton.jit
def _bwd_dq_step_g(K, V, ko, vo, sk_n, sv_n, q, do, lse, delta, dq, start_n, seqlen, qk_scale, offs_d, mask_d,
                   BN: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr):
    cols = start_n + tl.arange(0, BN)
    cols_ok = cols < seqlen
    k = _load_rows3(K, ko, cols, sk_n, offs_d, cols_ok, mask_d, MASK_N, not EVEN_D)
    v = _load_rows3(V, vo, cols, sv_n, offs_d, cols_ok, mask_d, MASK_N, not EVEN_D)
    p = tl.math.exp2(tl.dot(q, tl.permute(k, (0, 2, 1))) * qk_scale - lse[:, :, None])
    if MASK_N:
        p = tl.where(cols_ok[None, None, :], p, 0.0)
    ds = p * (tl.dot(do, tl.permute(v, (0, 2, 1))) - delta[:, :, None])
    return dq + tl.dot(ds.to(k.dtype), k)


@triton.jit
def _bwd_dq_tail_group(Q, K, V, O, DO, DQ, LSE, DELTA, bh, H, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                       so_b, so_h, so_n, sdo_b, sdo_h, sdo_n, sdq_b, sdq_h, sdq_n, sl_b, sl_h, row0, seqlen,
                       qk_scale, sm_scale, offs_d, mask_d, G: tl.constexpr, TM: tl.constexpr, WALK: tl.constexpr,
                       TAIL_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """dQ rows [row0, row0 + TM) of the G heads bh, and their delta = rowsum(dO * O) for the dK/dV pass."""
    rows = row0 + tl.arange(0, TM)
    rows_ok = rows < seqlen
    ko = _group_offs(bh, H, sk_b, sk_h)
    vo = _group_offs(bh, H, sv_b, sv_h)
    q = _load_rows3(Q, _group_offs(bh, H, sq_b, sq_h), rows, sq_n, offs_d, rows_ok, mask_d, True, not EVEN_D)
    do = _load_rows3(DO, _group_offs(bh, H, sdo_b, sdo_h), rows, sdo_n, offs_d, rows_ok, mask_d, True, not EVEN_D)
    o = _load_rows3(O, _group_offs(bh, H, so_b, so_h), rows, so_n, offs_d, rows_ok, mask_d, True, not EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 2)
    lp = _group_offs(bh, H, sl_b, sl_h)[:, None] + rows[None, :]
    lse = tl.load(LSE + lp, mask=rows_ok[None, :], other=float("inf"))
    tl.store(DELTA + lp, delta, mask=rows_ok[None, :])
    dq = tl.zeros([G, TM, BLOCK_D], tl.float32)
    n_full = (seqlen // WALK) * WALK
    for start_n in range(0, n_full, WALK):
        dq = _bwd_dq_step_g(K, V, ko, vo, sk_n, sv_n, q, do, lse, delta, dq, start_n, seqlen, qk_scale, offs_d,
                            mask_d, WALK, False, EVEN_D)
    for start_n in range(n_full, seqlen, TAIL_N):
        dq = _bwd_dq_step_g(K, V, ko, vo, sk_n, sv_n, q, do, lse, delta, dq, start_n, seqlen, qk_scale, offs_d,
                            mask_d, TAIL_N, True, EVEN_D)
    _store_rows3(DQ, _group_offs(bh, H, sdq_b, sdq_h), rows, sdq_n, offs_d, (dq * sm_scale).to(DQ.dtype.element_ty),
                 rows_ok, mask_d, not EVEN_D)


@triton.jit
def _bwd_dkdv_step_g(Q, DO, LSE, DELTA, qo, doo, lo, sq_n, sdo_n, k, v, dk, dv, start_m, seqlen, qk_scale, offs_d,
                     mask_d, BM: tl.constexpr, MASK_M: tl.constexpr, EVEN_D: tl.constexpr):
    rows = start_m + tl.arange(0, BM)
    rows_ok = rows < seqlen
    q = _load_rows3(Q, qo, rows, sq_n, offs_d, rows_ok, mask_d, MASK_M, not EVEN_D)
    do = _load_rows3(DO, doo, rows, sdo_n, offs_d, rows_ok, mask_d, MASK_M, not EVEN_D)
    lp = lo[:, None] + rows[None, :]
    if MASK_M:
        lse = tl.load(LSE + lp, mask=rows_ok[None, :], other=float("inf"))  # padded queries: p = 0
        delta = tl.load(DELTA + lp, mask=rows_ok[None, :], other=0.0)
    else:
        lse = tl.load(LSE + lp)
        delta = tl.load(DELTA + lp)
    pt = tl.math.exp2(tl.dot(k, tl.permute(q, (0, 2, 1))) * qk_scale - lse[:, None, :])
    dv += tl.dot(pt.to(do.dtype), do)
    dst = pt * (tl.dot(v, tl.permute(do, (0, 2, 1))) - delta[:, None, :])
    dk += tl.dot(dst.to(q.dtype), q)
    return dk, dv


@triton.jit
def _bwd_dkdv_tail_group(Q, K, V, DO, DK, DV, LSE, DELTA, bh, H, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                         sdo_b, sdo_h, sdo_n, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, sl_b, sl_h, start_n, seqlen,
                         qk_scale, sm_scale, offs_d, mask_d, G: tl.constexpr, TN: tl.constexpr, WALK: tl.constexpr,
                         TAIL_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """dK, dV of key rows [start_n, start_n + TN) of the G heads bh; every query tile streams past."""
    cols = start_n + tl.arange(0, TN)
    cols_ok = cols < seqlen
    qo = _group_offs(bh, H, sq_b, sq_h)
    doo = _group_offs(bh, H, sdo_b, sdo_h)
    lo = _group_offs(bh, H, sl_b, sl_h)
    k = _load_rows3(K, _group_offs(bh, H, sk_b, sk_h), cols, sk_n, offs_d, cols_ok, mask_d, True, not EVEN_D)
    v = _load_rows3(V, _group_offs(bh, H, sv_b, sv_h), cols, sv_n, offs_d, cols_ok, mask_d, True, not EVEN_D)
    dk = tl.zeros([G, TN, BLOCK_D], tl.float32)
    dv = tl.zeros([G, TN, BLOCK_D], tl.float32)
    m_full = (seqlen // WALK) * WALK
    for start_m in range(0, m_full, WALK):
        dk, dv = _bwd_dkdv_step_g(Q, DO, LSE, DELTA, qo, doo, lo, sq_n, sdo_n, k, v, dk, dv, start_m, seqlen,
                                  qk_scale, offs_d, mask_d, WALK, False, EVEN_D)
    for start_m in range(m_full, seqlen, TAIL_M):
        dk, dv = _bwd_dkdv_step_g(Q, DO, LSE, DELTA, qo, doo, lo, sq_n, sdo_n, k, v, dk, dv, start_m, seqlen,
                                  qk_scale, offs_d, mask_d, TAIL_M, True, EVEN_D)
    _store_rows3(DK, _group_offs(bh, H, sdk_b, sdk_h), cols, sdk_n, offs_d, (dk * sm_scale).to(DK.dtype.element_ty),
                 cols_ok, mask_d, not EVEN_D)
    _store_rows3(DV, _group_offs(bh, H, sdv_b, sdv_h), cols, sdv_n, offs_d, dv.to(DV.dtype.element_ty), cols_ok,
                 mask_d, not EVEN_D)


@triton.jit
def _fwd_kv_step_g2(q, q2, m_i, l_i, acc, acc2, K, V, ko, vo, start_n, seqlen, sk_n, sv_n, qk_scale, offs_d, offs_d2,
                    mask_d2, BN: tl.constexpr, MASK_N: tl.constexpr, LEAN: tl.constexpr = False):
    # _fwd_kv_step_g with the head dim in two pieces (TAIL_GD2): columns offs_d (all valid), offs_d2 (masked)
    cols = start_n + tl.arange(0, BN)
    cols_ok = cols < seqlen
    k, k2 = _load_rows3_pair(K, ko, cols, sk_n, offs_d, offs_d2, cols_ok, mask_d2, MASK_N)
    v, v2 = _load_rows3_pair(V, vo, cols, sv_n, offs_d, offs_d2, cols_ok, mask_d2, MASK_N)
    qk = tl.dot(q2, tl.permute(k2, (0, 2, 1)), tl.dot(q, tl.permute(k, (0, 2, 1))))
    m_new, p = _softmax_step(qk, m_i, qk_scale, cols_ok[None, None, :], MASK_N, 2, LEAN)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 2)
    p = p.to(v.dtype)
    acc = acc * alpha[:, :, None] + tl.dot(p, v)
    acc2 = acc2 * alpha[:, :, None] + tl.dot(p, v2)
    return m_new, l_i, acc, acc2


@triton.jit
def _fwd_tail_group2(Q, K, V, O, LSE, bh, H, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                     sl_b, sl_h, row0, seqlen, qk_scale, offs_d, offs_d2, mask_d2, G: tl.constexpr, TM: tl.constexpr,
                     WALK: tl.constexpr, TAIL_N: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                     LEAN: tl.constexpr = False):
    """_fwd_tail_group with the head dim in two pieces, D1 + D2 columns (d = 88: 64 + 32 instead of 128)."""
    rows = row0 + tl.arange(0, TM)
    rows_ok = rows < seqlen
    ko = _group_offs(bh, H, sk_b, sk_h)
    vo = _group_offs(bh, H, sv_b, sv_h)
    qo = _group_offs(bh, H, sq_b, sq_h)
    q, q2 = _load_rows3_pair(Q, qo, rows, sq_n, offs_d, offs_d2, rows_ok, mask_d2, True)
    m_i = tl.full([G, TM], float("-inf"), tl.float32)
    l_i = tl.zeros([G, TM], tl.float32)
    acc = tl.zeros([G, TM, D1], tl.float32)
    acc2 = tl.zeros([G, TM, D2], tl.float32)
    n_full = (seqlen // WALK) * WALK
    for start_n in range(0, n_full, WALK):
        m_i, l_i, acc, acc2 = _fwd_kv_step_g2(q, q2, m_i, l_i, acc, acc2, K, V, ko, vo, start_n, seqlen, sk_n, sv_n,
                                              qk_scale, offs_d, offs_d2, mask_d2, WALK, False, LEAN)
    for start_n in range(n_full, seqlen, TAIL_N):
        m_i, l_i, acc, acc2 = _fwd_kv_step_g2(q, q2, m_i, l_i, acc, acc2, K, V, ko, vo, start_n, seqlen, sk_n, sv_n,
                                              qk_scale, offs_d, offs_d2, mask_d2, TAIL_N, True, LEAN)
    acc = _normalise(acc, l_i, 2, LEAN)
    acc2 = _normalise(acc2, l_i, 2, LEAN)
    oo = _group_offs(bh, H, so_b, so_h)
    _store_rows3_pair(O, oo, rows, so_n, offs_d, offs_d2, acc.to(O.dtype.element_ty), acc2.to(O.dtype.element_ty),
                      rows_ok, mask_d2)
    lo = _group_offs(bh, H, sl_b, sl_h)
    tl.store(LSE + lo[:, None] + rows[None, :], m_i + tl.math.log2(l_i), mask=rows_ok[None, :])


@triton.jit
def _bwd_dq_step_g2(K, V, ko, vo, sk_n, sv_n, q, q2, do, do2, lse, delta, dq, dq2, start_n, seqlen, qk_scale, offs_d,
                    offs_d2, mask_d2, BN: tl.constexpr, MASK_N: tl.constexpr):
    cols = start_n + tl.arange(0, BN)
    cols_ok = cols < seqlen
    k, k2 = _load_rows3_pair(K, ko, cols, sk_n, offs_d, offs_d2, cols_ok, mask_d2, MASK_N)
    v, v2 = _load_rows3_pair(V, vo, cols, sv_n, offs_d, offs_d2, cols_ok, mask_d2, MASK_N)
    qk = tl.dot(q2, tl.permute(k2, (0, 2, 1)), tl.dot(q, tl.permute(k, (0, 2, 1))))
    p = tl.math.exp2(qk * qk_scale - lse[:, :, None])
    if MASK_N:
        p = tl.where(cols_ok[None, None, :], p, 0.0)
    dp = tl.dot(do2, tl.permute(v2, (0, 2, 1)), tl.dot(do, tl.permute(v, (0, 2, 1))))
    ds = (p * (dp - delta[:, :, None])).to(k.dtype)
    return dq + tl.dot(ds, k), dq2 + tl.dot(ds, k2)


@triton.jit
def _bwd_dq_tail_group2(Q, K, V, O, DO, DQ, LSE, DELTA, bh, H, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                        so_b, so_h, so_n, sdo_b, sdo_h, sdo_n, sdq_b, sdq_h, sdq_n, sl_b, sl_h, row0, seqlen,
                        qk_scale, sm_scale, offs_d, offs_d2, mask_d2, G: tl.constexpr, TM: tl.constexpr,
                        WALK: tl.constexpr, TAIL_N: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """_bwd_dq_tail_group with the head dim in two pieces, D1 + D2 columns."""
    rows = row0 + tl.arange(0, TM)
    rows_ok = rows < seqlen
    ko = _group_offs(bh, H, sk_b, sk_h)
    vo = _group_offs(bh, H, sv_b, sv_h)
    qo = _group_offs(bh, H, sq_b, sq_h)
    doo = _group_offs(bh, H, sdo_b, sdo_h)
    oo = _group_offs(bh, H, so_b, so_h)
    q, q2 = _load_rows3_pair(Q, qo, rows, sq_n, offs_d, offs_d2, rows_ok, mask_d2, True)
    do, do2 = _load_rows3_pair(DO, doo, rows, sdo_n, offs_d, offs_d2, rows_ok, mask_d2, True)
    o, o2 = _load_rows3_pair(O, oo, rows, so_n, offs_d, offs_d2, rows_ok, mask_d2, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 2) + tl.sum(o2.to(tl.float32) * do2.to(tl.float32), 2)
    lp = _group_offs(bh, H, sl_b, sl_h)[:, None] + rows[None, :]
    lse = tl.load(LSE + lp, mask=rows_ok[None, :], other=float("inf"))
    tl.store(DELTA + lp, delta, mask=rows_ok[None, :])
    dq = tl.zeros([G, TM, D1], tl.float32)
    dq2 = tl.zeros([G, TM, D2], tl.float32)
    n_full = (seqlen // WALK) * WALK
    for start_n in range(0, n_full, WALK):
        dq, dq2 = _bwd_dq_step_g2(K, V, ko, vo, sk_n, sv_n, q, q2, do, do2, lse, delta, dq, dq2, start_n, seqlen,
                                  qk_scale, offs_d, offs_d2, mask_d2, WALK, False)
    for start_n in range(n_full, seqlen, TAIL_N):
        dq, dq2 = _bwd_dq_step_g2(K, V, ko, vo, sk_n, sv_n, q, q2, do, do2, lse, delta, dq, dq2, start_n, seqlen,
                                  qk_scale, offs_d, offs_d2, mask_d2, TAIL_N, True)
    dqo = _group_offs(bh, H, sdq_b, sdq_h)
    _store_rows3_pair(DQ, dqo, rows, sdq_n, offs_d, offs_d2, (dq * sm_scale).to(DQ.dtype.element_ty),
                      (dq2 * sm_scale).to(DQ.dtype.element_ty), rows_ok, mask_d2)


@triton.jit
def _bwd_dkdv_step_g2(Q, DO, LSE, DELTA, qo, doo, lo, sq_n, sdo_n, k, k2, v, v2, dk, dk2, dv, dv2, start_m, seqlen,
                      qk_scale, offs_d, offs_d2, mask_d2, BM: tl.constexpr, MASK_M: tl.constexpr):
    rows = start_m + tl.arange(0, BM)
    rows_ok = rows < seqlen
    q, q2 = _load_rows3_pair(Q, qo, rows, sq_n, offs_d, offs_d2, rows_ok, mask_d2, MASK_M)
    do, do2 = _load_rows3_pair(DO, doo, rows, sdo_n, offs_d, offs_d2, rows_ok, mask_d2, MASK_M)
    lp = lo[:, None] + rows[None, :]
    if MASK_M:
        lse = tl.load(LSE + lp, mask=rows_ok[None, :], other=float("inf"))  # padded queries: p = 0
        delta = tl.load(DELTA + lp, mask=rows_ok[None, :], other=0.0)
    else:
        lse = tl.load(LSE + lp)
        delta = tl.load(DELTA + lp)
    kq = tl.dot(k2, tl.permute(q2, (0, 2, 1)), tl.dot(k, tl.permute(q, (0, 2, 1))))
    pt = tl.math.exp2(kq * qk_scale - lse[:, None, :])
    ptc = pt.to(do.dtype)
    dv += tl.dot(ptc, do)
    dv2 += tl.dot(ptc, do2)
    vdo = tl.dot(v2, tl.permute(do2, (0, 2, 1)), tl.dot(v, tl.permute(do, (0, 2, 1))))
    dst = (pt * (vdo - delta[:, None, :])).to(q.dtype)
    dk += tl.dot(dst, q)
    dk2 += tl.dot(dst, q2)
    return dk, dk2, dv, dv2


@triton.jit
def _bwd_dkdv_tail_group2(Q, K, V, DO, DK, DV, LSE, DELTA, bh, H, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                          sdo_b, sdo_h, sdo_n, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, sl_b, sl_h, start_n, seqlen,
                          qk_scale, sm_scale, offs_d, offs_d2, mask_d2, G: tl.constexpr, TN: tl.constexpr,
                          WALK: tl.constexpr, TAIL_M: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """_bwd_dkdv_tail_group with the head dim in two pieces, D1 + D2 columns."""
    cols = start_n + tl.arange(0, TN)
    cols_ok = cols < seqlen
    qo = _group_offs(bh, H, sq_b, sq_h)
    doo = _group_offs(bh, H, sdo_b, sdo_h)
    lo = _group_offs(bh, H, sl_b, sl_h)
    ko = _group_offs(bh, H, sk_b, sk_h)
    vo = _group_offs(bh, H, sv_b, sv_h)
    k, k2 = _load_rows3_pair(K, ko, cols, sk_n, offs_d, offs_d2, cols_ok, mask_d2, True)
    v, v2 = _load_rows3_pair(V, vo, cols, sv_n, offs_d, offs_d2, cols_ok, mask_d2, True)
    dk = tl.zeros([G, TN, D1], tl.float32)
    dk2 = tl.zeros([G, TN, D2], tl.float32)
    dv = tl.zeros([G, TN, D1], tl.float32)
    dv2 = tl.zeros([G, TN, D2], tl.float32)
    m_full = (seqlen // WALK) * WALK
    for start_m in range(0, m_full, WALK):
        dk, dk2, dv, dv2 = _bwd_dkdv_step_g2(Q, DO, LSE, DELTA, qo, doo, lo, sq_n, sdo_n, k, k2, v, v2, dk, dk2, dv,
                                             dv2, start_m, seqlen, qk_scale, offs_d, offs_d2, mask_d2, WALK, False)
    for start_m in range(m_full, seqlen, TAIL_M):
        dk, dk2, dv, dv2 = _bwd_dkdv_step_g2(Q, DO, LSE, DELTA, qo, doo, lo, sq_n, sdo_n, k, k2, v, v2, dk, dk2, dv,
                                             dv2, start_m, seqlen, qk_scale, offs_d, offs_d2, mask_d2, TAIL_M, True)
    dko = _group_offs(bh, H, sdk_b, sdk_h)
    dvo = _group_offs(bh, H, sdv_b, sdv_h)
    _store_rows3_pair(DK, dko, cols, sdk_n, offs_d, offs_d2, (dk * sm_scale).to(DK.dtype.element_ty),
                      (dk2 * sm_scale).to(DK.dtype.element_ty), cols_ok, mask_d2)
    _store_rows3_pair(DV, dvo, cols, sdv_n, offs_d, offs_d2, dv.to(DV.dtype.element_ty), dv2.to(DV.dtype.element_ty),
                      cols_ok, mask_d2)


@triton.jit
def _grouped_pids(H, N, BLOCK: tl.constexpr, TAIL_G: tl.constexpr):
    """(tile, b * h, grouped tail?) of this program in the grid of TAIL_G > 1: (full blocks x TAIL_G + tail tiles,
    B * H / TAIL_G), each group of TAIL_G heads' full blocks head by head, then its grouped tail tiles (whose tile
    index counts on from the full blocks', as without groups; b * h is then meaningless)."""
    pid = tl.program_id(0)
    m_full = N // BLOCK
    per = tl.maximum(m_full, 1)
    is_g = pid >= m_full * TAIL_G
    pid_bh = tl.program_id(1) * TAIL_G + pid // per
    pid = tl.where(is_g, m_full + pid - m_full * TAIL_G, pid % per)
    return pid, pid_bh, is_g


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, CU, KD, VD,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n, sl_b, sl_h,
    H, N, qk_scale,
    HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, WS: tl.constexpr = False, D2: tl.constexpr = 0,
    TMA: tl.constexpr = False, TAIL_G: tl.constexpr = 0, TAIL_GW: tl.constexpr = 16, TAIL_GD: tl.constexpr = 16,
    LEAN: tl.constexpr = False, TAIL_GD2: tl.constexpr = 0, TAIL_PRE: tl.constexpr = False,
    TAIL_FIRST: tl.constexpr = False,
):
    # TMA: the full key tiles are loaded through the tensor descriptors KD / VD (dense inputs; block
    # [1, 1, BLOCK_N, BLOCK_D]); otherwise KD / VD are unused.
    # WS: Triton's warp specialization of the full-tile loop (tl.range(warp_specialize=...)), a tuning knob. On Hopper
    # it changes nothing (no specialized region with pointer loads or host descriptors; kernels/README.md)
    # D2 > 0 (SPLIT_D): the head dim in two pieces, BLOCK_D columns then D2 (d = 88: 64 + 32 instead of 128)
    # TAIL_G > 1: the tail rows of TAIL_G heads in one program (dense inputs), walking TAIL_GW keys a step, the head dim
    # whole, padded to TAIL_GD columns (also where the full blocks split it: D2 > 0), or with TAIL_GD2 > 0 in two
    # pieces, TAIL_GD then TAIL_GD2 columns (config key TAIL_GS)
    # LEAN (qk_scale > 0): fewer instructions per score. Each step takes the row max of the raw scores and scales it
    # once per row, so the scale folds into exp2's argument (one FMA per score instead of a multiply beside it), and
    # the output is normalised by one reciprocal per row and a multiply per element instead of a division each
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    is_g = pid_m < 0  # read only where TAIL_G > 1 (`TAIL_G > 1 and is_g` is decided at compile time)
    if TAIL_G > 1:
        pid_m, pid_bh, is_g = _grouped_pids(H, N, BLOCK_M, TAIL_G)
    b = pid_bh // H
    h = pid_bh % H
    start, seqlen = _seq_bounds(CU, b, N, VARLEN)
    # strides arrive divided by ALIGN: multiplying back tells the compiler every row starts on a
    # 16-byte boundary, so the loads vectorize (d = 88: 176-byte rows)
    sq_b, sq_h, sq_n = sq_b * ALIGN, sq_h * ALIGN, sq_n * ALIGN
    sk_b, sk_h, sk_n = sk_b * ALIGN, sk_h * ALIGN, sk_n * ALIGN
    sv_b, sv_h, sv_n = sv_b * ALIGN, sv_h * ALIGN, sv_n * ALIGN
    so_b, so_h, so_n = so_b * ALIGN, so_h * ALIGN, so_n * ALIGN
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    tok = start.to(tl.int64)
    qo = b64 * sq_b + h64 * sq_h + tok * sq_n
    ko = b64 * sk_b + h64 * sk_h + tok * sk_n
    vo = b64 * sv_b + h64 * sv_h + tok * sv_n
    oo = b64 * so_b + h64 * so_h + tok * so_n
    lo = b64 * sl_b + h64 * sl_h + tok
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_d2 = BLOCK_D + tl.arange(0, max(D2, 16))
    mask_d2 = offs_d2 < HEAD_DIM
    m_full = seqlen // BLOCK_M
    if TAIL_G > 1 and is_g and TAIL_GD2 > 0:
        offs_g2 = TAIL_GD + tl.arange(0, TAIL_GD2)
        _fwd_tail_group2(Q, K, V, O, LSE, tl.program_id(1) * TAIL_G + tl.arange(0, TAIL_G), H, sq_b, sq_h, sq_n,
                         sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n, sl_b, sl_h,
                         m_full * BLOCK_M + (pid_m - m_full) * TAIL_M, seqlen, qk_scale, tl.arange(0, TAIL_GD),
                         offs_g2, offs_g2 < HEAD_DIM, TAIL_G, TAIL_M, TAIL_GW, TAIL_N, TAIL_GD, TAIL_GD2, LEAN)
    elif TAIL_G > 1 and is_g:
        _fwd_tail_group(Q, K, V, O, LSE, tl.program_id(1) * TAIL_G + tl.arange(0, TAIL_G), H, sq_b, sq_h, sq_n,
                        sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n, sl_b, sl_h,
                        m_full * BLOCK_M + (pid_m - m_full) * TAIL_M, seqlen, qk_scale, tl.arange(0, TAIL_GD),
                        tl.arange(0, TAIL_GD) < HEAD_DIM, TAIL_G, TAIL_M, TAIL_GW, TAIL_N, TAIL_GD,
                        TAIL_GD == HEAD_DIM, LEAN)
    elif pid_m < m_full:
        if D2 > 0:
            _fwd_q_block2(Q, K, V, O, LSE, qo, ko, vo, oo, lo, pid_m * BLOCK_M, seqlen, sq_n, sk_n, sv_n, so_n,
                          qk_scale, offs_d, offs_d2, mask_d2, BLOCK_M, False, BLOCK_N, TAIL_N, BLOCK_D, D2, WS, LEAN)
        else:
            _fwd_q_block(Q, K, V, O, LSE, qo, ko, vo, oo, lo, pid_m * BLOCK_M, seqlen, sq_n, sk_n, sv_n, so_n,
                         qk_scale, offs_d, mask_d, BLOCK_M, False, BLOCK_N, TAIL_N, BLOCK_D, EVEN_D, WS,
                         KD, VD, b, h, TMA, LEAN, TAIL_PRE, TAIL_FIRST)
    else:
        row0 = m_full * BLOCK_M + (pid_m - m_full) * TAIL_M
        if row0 < seqlen:
            if D2 > 0:
                _fwd_q_block2(Q, K, V, O, LSE, qo, ko, vo, oo, lo, row0, seqlen, sq_n, sk_n, sv_n, so_n, qk_scale,
                              offs_d, offs_d2, mask_d2, TAIL_M, True, BLOCK_N, TAIL_N, BLOCK_D, D2, WS, LEAN)
            else:
                _fwd_q_block(Q, K, V, O, LSE, qo, ko, vo, oo, lo, row0, seqlen, sq_n, sk_n, sv_n, so_n, qk_scale,
                             offs_d, mask_d, TAIL_M, True, BLOCK_N, TAIL_N, BLOCK_D, EVEN_D, WS, KD, VD, b, h, TMA,
                             LEAN, TAIL_PRE, TAIL_FIRST)


@triton.jit
def _attn_bwd_delta(
    O, DO, DELTA, CU,
    so_b, so_h, so_n, sd_b, sd_h, sd_n, sl_b, sl_h,
    H, N,
    HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start, seqlen = _seq_bounds(CU, b, N, VARLEN)
    if pid_m * BLOCK_M < seqlen:
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        tok = start.to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        msk = (offs_m < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(O + b64 * so_b + h64 * so_h + (tok + offs_m[:, None]) * so_n + offs_d[None, :], mask=msk, other=0.0)
        do = tl.load(DO + b64 * sd_b + h64 * sd_h + (tok + offs_m[:, None]) * sd_n + offs_d[None, :], mask=msk,
                     other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + b64 * sl_b + h64 * sl_h + tok + offs_m, delta, mask=offs_m < seqlen)


@triton.jit
def _bwd_q_step(Q, O, DO, DQ, DQACC, LSE, DELTA, qo, oo, doo, dqo, ao, lo, sq_n, so_n, sdo_n, sdq_n, sa_n,
                k, v, kt, dk, dv, cols_ok, start_m, seqlen, first, last, qk_scale, sm_scale, offs_d, mask_d,
                BM: tl.constexpr, MASK_M: tl.constexpr, MASK_N: tl.constexpr, DQ_MODE: tl.constexpr,
                EVEN_D: tl.constexpr, TRANS: tl.constexpr):
    """One (query tile, key tile) product of the backward; dQ goes out (DQ_MODE 0: final store,
    1: fp32 atomics, 2: private fp32 read-modify-write across key tiles)."""
    rows = start_m + tl.arange(0, BM)
    rows_ok = rows < seqlen
    q = _load_tile(Q + qo + rows[:, None] * sq_n + offs_d[None, :], rows_ok, mask_d, MASK_M, not EVEN_D)
    do = _load_tile(DO + doo + rows[:, None] * sdo_n + offs_d[None, :], rows_ok, mask_d, MASK_M, not EVEN_D)
    if MASK_M:
        lse = tl.load(LSE + lo + rows, mask=rows_ok, other=float("inf"))  # padded rows: p = 0
    else:
        lse = tl.load(LSE + lo + rows)
    if DQ_MODE == 0:
        o = _load_tile(O + oo + rows[:, None] * so_n + offs_d[None, :], rows_ok, mask_d, MASK_M, not EVEN_D)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    elif MASK_M:
        delta = tl.load(DELTA + lo + rows, mask=rows_ok, other=0.0)
    else:
        delta = tl.load(DELTA + lo + rows)
    if TRANS:
        # key-major products: P^T and dS^T come out of the dot in the layout dV and dK need,
        # so only dQ pays for a register transpose
        pt = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        if MASK_N:
            pt = tl.where(cols_ok[:, None], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do)
        dpt = tl.dot(v, tl.trans(do))
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk += tl.dot(dst, q)
        dq = tl.dot(tl.trans(dst), k)
    else:
        s = tl.dot(q, kt) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASK_N:
            p = tl.where(cols_ok[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dk += tl.dot(tl.trans(ds), q)
        dq = tl.dot(ds, k)
    dq_ptrs = DQ + dqo + rows[:, None] * sdq_n + offs_d[None, :]
    if DQ_MODE == 0:
        _store_tile(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), rows_ok, mask_d, MASK_M, not EVEN_D)
    elif DQ_MODE == 1:
        acc_ptrs = DQACC + ao + rows[:, None] * sa_n + offs_d[None, :]
        if MASK_M:
            tl.atomic_add(acc_ptrs, dq, mask=rows_ok[:, None] & mask_d[None, :], sem="relaxed")
        else:
            tl.atomic_add(acc_ptrs, dq, mask=mask_d[None, :], sem="relaxed")
    else:
        acc_ptrs = DQACC + ao + rows[:, None] * sa_n + offs_d[None, :]
        if not first:
            dq += _load_tile(acc_ptrs, rows_ok, mask_d, MASK_M, not EVEN_D)
        if last:
            _store_tile(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), rows_ok, mask_d, MASK_M, not EVEN_D)
        else:
            _store_tile(acc_ptrs, dq, rows_ok, mask_d, MASK_M, not EVEN_D)
    return dk, dv


@triton.jit
def _bwd_kv_block(Q, K, V, O, DO, DQ, DK, DV, DQACC, LSE, DELTA,
                  qo, ko, vo, oo, doo, dqo, dko, dvo, ao, lo,
                  sq_n, sk_n, sv_n, so_n, sdo_n, sdq_n, sdk_n, sdv_n, sa_n,
                  start_n, seqlen, qk_scale, sm_scale, offs_d, mask_d,
                  BN: tl.constexpr, MASK_N: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr,
                  BLOCK_D: tl.constexpr, DQ_MODE: tl.constexpr, EVEN_D: tl.constexpr, TRANS: tl.constexpr):
    """dK, dV of one key tile, walking every query tile (full ones, then the tail)."""
    cols = start_n + tl.arange(0, BN)
    cols_ok = cols < seqlen
    k = _load_tile(K + ko + cols[:, None] * sk_n + offs_d[None, :], cols_ok, mask_d, MASK_N, not EVEN_D)
    v = _load_tile(V + vo + cols[:, None] * sv_n + offs_d[None, :], cols_ok, mask_d, MASK_N, not EVEN_D)
    kt = tl.trans(k)
    dk = tl.zeros([BN, BLOCK_D], tl.float32)
    dv = tl.zeros([BN, BLOCK_D], tl.float32)
    first = start_n == 0
    last = start_n + BN >= seqlen
    m_full = (seqlen // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _bwd_q_step(Q, O, DO, DQ, DQACC, LSE, DELTA, qo, oo, doo, dqo, ao, lo, sq_n, so_n, sdo_n, sdq_n,
                             sa_n, k, v, kt, dk, dv, cols_ok, start_m, seqlen, first, last, qk_scale, sm_scale,
                             offs_d, mask_d, BLOCK_M, False, MASK_N, DQ_MODE, EVEN_D, TRANS)
    for start_m in range(m_full, seqlen, TAIL_M):
        dk, dv = _bwd_q_step(Q, O, DO, DQ, DQACC, LSE, DELTA, qo, oo, doo, dqo, ao, lo, sq_n, so_n, sdo_n, sdq_n,
                             sa_n, k, v, kt, dk, dv, cols_ok, start_m, seqlen, first, last, qk_scale, sm_scale,
                             offs_d, mask_d, TAIL_M, True, MASK_N, DQ_MODE, EVEN_D, TRANS)
    _store_tile(DK + dko + cols[:, None] * sdk_n + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
                cols_ok, mask_d, MASK_N, not EVEN_D)
    _store_tile(DV + dvo + cols[:, None] * sdv_n + offs_d[None, :], dv.to(DV.dtype.element_ty),
                cols_ok, mask_d, MASK_N, not EVEN_D)


@triton.jit
def _attn_bwd(
    Q, K, V, O, DO, DQ, DK, DV, DQACC, LSE, DELTA, CU,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n, sdo_b, sdo_h, sdo_n,
    sdq_b, sdq_h, sdq_n, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, sa_b, sa_h, sa_n, sl_b, sl_h,
    H, N, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, SPLIT: tl.constexpr, DQ_MODE: tl.constexpr, TRANS: tl.constexpr,
):
    # SPLIT: program (key tile, b*h), dQ by atomics (DQ_MODE 1). Otherwise program (b*h,) walking all
    # key tiles: DQ_MODE 0 when the whole sequence is one key tile, else 2 (private fp32 scratch).
    if SPLIT:
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
    else:
        pid_n = 0
        pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    start, seqlen = _seq_bounds(CU, b, N, VARLEN)
    sq_b, sq_h, sq_n = sq_b * ALIGN, sq_h * ALIGN, sq_n * ALIGN  # see _attn_fwd
    sk_b, sk_h, sk_n = sk_b * ALIGN, sk_h * ALIGN, sk_n * ALIGN
    sv_b, sv_h, sv_n = sv_b * ALIGN, sv_h * ALIGN, sv_n * ALIGN
    so_b, so_h, so_n = so_b * ALIGN, so_h * ALIGN, so_n * ALIGN
    sdo_b, sdo_h, sdo_n = sdo_b * ALIGN, sdo_h * ALIGN, sdo_n * ALIGN
    sdq_b, sdq_h, sdq_n = sdq_b * ALIGN, sdq_h * ALIGN, sdq_n * ALIGN
    sdk_b, sdk_h, sdk_n = sdk_b * ALIGN, sdk_h * ALIGN, sdk_n * ALIGN
    sdv_b, sdv_h, sdv_n = sdv_b * ALIGN, sdv_h * ALIGN, sdv_n * ALIGN
    sa_b, sa_h, sa_n = sa_b * ALIGN, sa_h * ALIGN, sa_n * ALIGN
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    tok = start.to(tl.int64)
    qo = b64 * sq_b + h64 * sq_h + tok * sq_n
    ko = b64 * sk_b + h64 * sk_h + tok * sk_n
    vo = b64 * sv_b + h64 * sv_h + tok * sv_n
    oo = b64 * so_b + h64 * so_h + tok * so_n
    doo = b64 * sdo_b + h64 * sdo_h + tok * sdo_n
    dqo = b64 * sdq_b + h64 * sdq_h + tok * sdq_n
    dko = b64 * sdk_b + h64 * sdk_h + tok * sdk_n
    dvo = b64 * sdv_b + h64 * sdv_h + tok * sdv_n
    ao = b64 * sa_b + h64 * sa_h + tok * sa_n
    lo = b64 * sl_b + h64 * sl_h + tok
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    if SPLIT:
        n_full = seqlen // BLOCK_N
        if pid_n < n_full:
            _bwd_kv_block(Q, K, V, O, DO, DQ, DK, DV, DQACC, LSE, DELTA, qo, ko, vo, oo, doo, dqo, dko, dvo, ao, lo,
                          sq_n, sk_n, sv_n, so_n, sdo_n, sdq_n, sdk_n, sdv_n, sa_n, pid_n * BLOCK_N, seqlen,
                          qk_scale, sm_scale, offs_d, mask_d, BLOCK_N, False, BLOCK_M, TAIL_M, BLOCK_D, 1, EVEN_D,
                          TRANS)
        else:
            start_n = n_full * BLOCK_N + (pid_n - n_full) * TAIL_N
            if start_n < seqlen:
                _bwd_kv_block(Q, K, V, O, DO, DQ, DK, DV, DQACC, LSE, DELTA, qo, ko, vo, oo, doo, dqo, dko, dvo, ao,
                              lo, sq_n, sk_n, sv_n, so_n, sdo_n, sdq_n, sdk_n, sdv_n, sa_n, start_n, seqlen,
                              qk_scale, sm_scale, offs_d, mask_d, TAIL_N, True, BLOCK_M, TAIL_M, BLOCK_D, 1, EVEN_D,
                              TRANS)
    else:
        n_full = (seqlen // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            _bwd_kv_block(Q, K, V, O, DO, DQ, DK, DV, DQACC, LSE, DELTA, qo, ko, vo, oo, doo, dqo, dko, dvo, ao, lo,
                          sq_n, sk_n, sv_n, so_n, sdo_n, sdq_n, sdk_n, sdv_n, sa_n, start_n, seqlen,
                          qk_scale, sm_scale, offs_d, mask_d, BLOCK_N, False, BLOCK_M, TAIL_M, BLOCK_D, DQ_MODE,
                          EVEN_D, TRANS)
            if DQ_MODE == 2:
                tl.debug_barrier()  # this key tile's dQ partials are read back by other threads next
        for start_n in range(n_full, seqlen, TAIL_N):
            _bwd_kv_block(Q, K, V, O, DO, DQ, DK, DV, DQACC, LSE, DELTA, qo, ko, vo, oo, doo, dqo, dko, dvo, ao, lo,
                          sq_n, sk_n, sv_n, so_n, sdo_n, sdq_n, sdk_n, sdv_n, sa_n, start_n, seqlen,
                          qk_scale, sm_scale, offs_d, mask_d, TAIL_N, True, BLOCK_M, TAIL_M, BLOCK_D, DQ_MODE,
                          EVEN_D, TRANS)
            if DQ_MODE == 2:
                tl.debug_barrier()


# FlashAttention-2 style backward ("kv+q"): two passes over the same inputs, each with one
# output per program, so no atomics, no scratch and at most two accumulators in registers.
# The dQ pass runs first and also stores delta = rowsum(dO * O), which the dK/dV pass reads.


@triton.jit
def _row_base(b64, h64, tok, s_b, s_h, s_n, ALIGN: tl.constexpr):
    """int64 offset of token `tok` of head (b, h) and the row stride; strides arrive divided by
    ALIGN (see _attn_fwd)."""
    s_n = s_n * ALIGN
    return b64 * (s_b * ALIGN) + h64 * (s_h * ALIGN) + tok * s_n, s_n


@triton.jit
def _bwd_dkdv_step(Q, DO, LSE, DELTA, qo, doo, lo, sq_n, sdo_n, k, v, dk, dv, start_m, seqlen, qk_scale,
                   offs_d, mask_d, BM: tl.constexpr, MASK_M: tl.constexpr, EVEN_D: tl.constexpr,
                   QD=None, DOD=None, b=0, h=0, TMA: tl.constexpr = False):
    # key-major products; padded keys need no mask here: their dK/dV rows are never stored
    q, do, lse, delta = _bwd_dkdv_load(Q, DO, LSE, DELTA, qo, doo, lo, sq_n, sdo_n, start_m, seqlen, offs_d, mask_d,
                                       BM, MASK_M, EVEN_D, QD, DOD, b, h, TMA)
    return _bwd_dkdv_math(q, do, lse, delta, k, v, dk, dv, qk_scale)


@triton.jit
def _bwd_dkdv_load(Q, DO, LSE, DELTA, qo, doo, lo, sq_n, sdo_n, start_m, seqlen, offs_d, mask_d,
                   BM: tl.constexpr, MASK_M: tl.constexpr, EVEN_D: tl.constexpr,
                   QD=None, DOD=None, b=0, h=0, TMA: tl.constexpr = False):
    """Q, dO, LSE and delta of query rows [start_m, start_m + BM) for a dK/dV step."""
    rows = start_m + tl.arange(0, BM)
    rows_ok = rows < seqlen
    q, do = _walk_pair(Q, DO, qo, doo, sq_n, sdo_n, QD, DOD, b, h, start_m, seqlen, offs_d, mask_d, BM, MASK_M, EVEN_D,
                       TMA)
    if MASK_M:
        lse = tl.load(LSE + lo + rows, mask=rows_ok, other=float("inf"))  # padded queries: p = 0
        delta = tl.load(DELTA + lo + rows, mask=rows_ok, other=0.0)
    else:
        lse = tl.load(LSE + lo + rows)
        delta = tl.load(DELTA + lo + rows)
    return q, do, lse, delta


@triton.jit
def _bwd_dkdv_math(q, do, lse, delta, k, v, dk, dv, qk_scale):
    pt = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
    dv += tl.dot(pt.to(do.dtype), do)
    dst = pt * (tl.dot(v, tl.trans(do)) - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q)
    return dk, dv


@triton.jit
def _bwd_dkdv_block(Q, K, V, DO, DK, DV, LSE, DELTA, qo, ko, vo, doo, dko, dvo, lo,
                    sq_n, sk_n, sv_n, sdo_n, sdk_n, sdv_n, start_n, seqlen, qk_scale, sm_scale, offs_d, mask_d,
                    BN: tl.constexpr, MASK_N: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr,
                    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, WS: tl.constexpr,
                    QD=None, DOD=None, b=0, h=0, TMA: tl.constexpr = False, PRE: tl.constexpr = False,
                    FIRST: tl.constexpr = False):
    """dK, dV of one key tile: K and V stay resident, every query tile streams past. PRE (TAIL_PRE): the walk's first
    tail tile (Q, dO, LSE, delta) is loaded with K and V, before the full-tile loop. FIRST (TAIL_FIRST): the walk's
    tail steps run before the full-tile loop."""
    cols = start_n + tl.arange(0, BN)
    cols_ok = cols < seqlen
    k = _load_tile(K + ko + cols[:, None] * sk_n + offs_d[None, :], cols_ok, mask_d, MASK_N, not EVEN_D)
    v = _load_tile(V + vo + cols[:, None] * sv_n + offs_d[None, :], cols_ok, mask_d, MASK_N, not EVEN_D)
    dk = tl.zeros([BN, BLOCK_D], tl.float32)
    dv = tl.zeros([BN, BLOCK_D], tl.float32)
    m_full = (seqlen // BLOCK_M) * BLOCK_M
    m_tail = m_full
    if FIRST:
        for start_m in range(m_full, seqlen, TAIL_M):
            dk, dv = _bwd_dkdv_step(Q, DO, LSE, DELTA, qo, doo, lo, sq_n, sdo_n, k, v, dk, dv, start_m, seqlen,
                                    qk_scale, offs_d, mask_d, TAIL_M, True, EVEN_D)
        m_tail = seqlen
    elif PRE:
        qt, dot, lset, deltat = _bwd_dkdv_load(Q, DO, LSE, DELTA, qo, doo, lo, sq_n, sdo_n, m_full, seqlen, offs_d,
                                               mask_d, TAIL_M, True, EVEN_D)
        m_tail = m_full + TAIL_M
    for start_m in tl.range(0, m_full, BLOCK_M, warp_specialize=WS):
        dk, dv = _bwd_dkdv_step(Q, DO, LSE, DELTA, qo, doo, lo, sq_n, sdo_n, k, v, dk, dv, start_m, seqlen,
                                qk_scale, offs_d, mask_d, BLOCK_M, False, EVEN_D, QD, DOD, b, h, TMA)
    if PRE and not FIRST:
        if m_full < seqlen:
            dk, dv = _bwd_dkdv_math(qt, dot, lset, deltat, k, v, dk, dv, qk_scale)
    for start_m in range(m_tail, seqlen, TAIL_M):
        dk, dv = _bwd_dkdv_step(Q, DO, LSE, DELTA, qo, doo, lo, sq_n, sdo_n, k, v, dk, dv, start_m, seqlen,
                                qk_scale, offs_d, mask_d, TAIL_M, True, EVEN_D)
    _store_tile(DK + dko + cols[:, None] * sdk_n + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
                cols_ok, mask_d, MASK_N, not EVEN_D)
    _store_tile(DV + dvo + cols[:, None] * sdv_n + offs_d[None, :], dv.to(DV.dtype.element_ty),
                cols_ok, mask_d, MASK_N, not EVEN_D)


@triton.jit
def _bwd_dq_step(K, V, ko, vo, sk_n, sv_n, q, do, lse, delta, dq, start_n, seqlen, qk_scale, offs_d, mask_d,
                 BN: tl.constexpr, MASK_N: tl.constexpr, EVEN_D: tl.constexpr,
                 KD=None, VD=None, b=0, h=0, TMA: tl.constexpr = False):
    cols = start_n + tl.arange(0, BN)
    cols_ok = cols < seqlen
    k, v = _walk_pair(K, V, ko, vo, sk_n, sv_n, KD, VD, b, h, start_n, seqlen, offs_d, mask_d, BN, MASK_N, EVEN_D, TMA)
    return _bwd_dq_math(k, v, q, do, lse, delta, dq, cols_ok, qk_scale, MASK_N)


@triton.jit
def _bwd_dq_math(k, v, q, do, lse, delta, dq, cols_ok, qk_scale, MASK_N: tl.constexpr):
    """One dQ step over key tile (k, v), already loaded."""
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
    if MASK_N:  # padded keys (k = 0) get p = exp2(-lse): inf when every real score is below -128
        p = tl.where(cols_ok[None, :], p, 0.0)
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k)


@triton.jit
def _bwd_dq_block(Q, K, V, O, DO, DQ, LSE, DELTA, qo, ko, vo, oo, doo, dqo, lo,
                  sq_n, sk_n, sv_n, so_n, sdo_n, sdq_n, row0, seqlen, qk_scale, sm_scale, offs_d, mask_d,
                  BM: tl.constexpr, MASK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, WS: tl.constexpr,
                  KD=None, VD=None, b=0, h=0, TMA: tl.constexpr = False, PRE: tl.constexpr = False,
                  FIRST: tl.constexpr = False):
    """dQ of one query tile (and its delta = rowsum(dO * O), stored for the dK/dV pass). PRE (TAIL_PRE): the walk's
    first tail tile of K and V is loaded with Q, dO and O, before the full-tile loop. FIRST (TAIL_FIRST): the walk's
    tail steps run before the full-tile loop."""
    rows = row0 + tl.arange(0, BM)
    rows_ok = rows < seqlen
    q = _load_tile(Q + qo + rows[:, None] * sq_n + offs_d[None, :], rows_ok, mask_d, MASK_M, not EVEN_D)
    do = _load_tile(DO + doo + rows[:, None] * sdo_n + offs_d[None, :], rows_ok, mask_d, MASK_M, not EVEN_D)
    o = _load_tile(O + oo + rows[:, None] * so_n + offs_d[None, :], rows_ok, mask_d, MASK_M, not EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if MASK_M:
        lse = tl.load(LSE + lo + rows, mask=rows_ok, other=float("inf"))
        tl.store(DELTA + lo + rows, delta, mask=rows_ok)
    else:
        lse = tl.load(LSE + lo + rows)
        tl.store(DELTA + lo + rows, delta)
    dq = tl.zeros([BM, BLOCK_D], tl.float32)
    n_full = (seqlen // BLOCK_N) * BLOCK_N
    n_tail = n_full
    if FIRST:
        for start_n in range(n_full, seqlen, TAIL_N):
            dq = _bwd_dq_step(K, V, ko, vo, sk_n, sv_n, q, do, lse, delta, dq, start_n, seqlen, qk_scale,
                              offs_d, mask_d, TAIL_N, True, EVEN_D)
        n_tail = seqlen
    elif PRE:
        kt, vt = _walk_pair(K, V, ko, vo, sk_n, sv_n, KD, VD, b, h, n_full, seqlen, offs_d, mask_d, TAIL_N, True,
                            EVEN_D, False)
        n_tail = n_full + TAIL_N
    for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WS):
        dq = _bwd_dq_step(K, V, ko, vo, sk_n, sv_n, q, do, lse, delta, dq, start_n, seqlen, qk_scale,
                          offs_d, mask_d, BLOCK_N, False, EVEN_D, KD, VD, b, h, TMA)
    if PRE and not FIRST:
        if n_full < seqlen:
            dq = _bwd_dq_math(kt, vt, q, do, lse, delta, dq, n_full + tl.arange(0, TAIL_N) < seqlen, qk_scale, True)
    for start_n in range(n_tail, seqlen, TAIL_N):
        dq = _bwd_dq_step(K, V, ko, vo, sk_n, sv_n, q, do, lse, delta, dq, start_n, seqlen, qk_scale,
                          offs_d, mask_d, TAIL_N, True, EVEN_D)
    _store_tile(DQ + dqo + rows[:, None] * sdq_n + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
                rows_ok, mask_d, MASK_M, not EVEN_D)


@triton.jit
def _bwd_dkdv_step2(Q, DO, LSE, DELTA, qo, doo, lo, sq_n, sdo_n, k, k2, v, v2, dk, dk2, dv, dv2, start_m, seqlen,
                    qk_scale, offs_d, offs_d2, mask_d2, BM: tl.constexpr, MASK_M: tl.constexpr,
                    QD=None, QD2=None, DOD=None, DOD2=None, b=0, h=0, TMA: tl.constexpr = False):
    # _bwd_dkdv_step with the head dim in two pieces (SPLIT_D)
    rows = start_m + tl.arange(0, BM)
    rows_ok = rows < seqlen
    q, q2, do, do2 = _walk_pair2(Q, DO, qo, doo, sq_n, sdo_n, QD, QD2, DOD, DOD2, b, h, start_m, seqlen, offs_d,
                                 offs_d2, mask_d2, BM, MASK_M, TMA)
    if MASK_M:
        lse = tl.load(LSE + lo + rows, mask=rows_ok, other=float("inf"))  # padded queries: p = 0
        delta = tl.load(DELTA + lo + rows, mask=rows_ok, other=0.0)
    else:
        lse = tl.load(LSE + lo + rows)
        delta = tl.load(DELTA + lo + rows)
    pt = tl.math.exp2(tl.dot(k2, tl.trans(q2), tl.dot(k, tl.trans(q))) * qk_scale - lse[None, :])
    ptc = pt.to(do.dtype)
    dv += tl.dot(ptc, do)
    dv2 += tl.dot(ptc, do2)
    dst = (pt * (tl.dot(v2, tl.trans(do2), tl.dot(v, tl.trans(do))) - delta[None, :])).to(q.dtype)
    dk += tl.dot(dst, q)
    dk2 += tl.dot(dst, q2)
    return dk, dk2, dv, dv2


@triton.jit
def _bwd_dkdv_block2(Q, K, V, DO, DK, DV, LSE, DELTA, qo, ko, vo, doo, dko, dvo, lo,
                     sq_n, sk_n, sv_n, sdo_n, sdk_n, sdv_n, start_n, seqlen, qk_scale, sm_scale, offs_d, offs_d2,
                     mask_d2, BN: tl.constexpr, MASK_N: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr,
                     BLOCK_D: tl.constexpr, D2: tl.constexpr, WS: tl.constexpr,
                     QD=None, QD2=None, DOD=None, DOD2=None, b=0, h=0, TMA: tl.constexpr = False):
    cols = start_n + tl.arange(0, BN)
    cols_ok = cols < seqlen
    k = _load_tile(K + ko + cols[:, None] * sk_n + offs_d[None, :], cols_ok, offs_d, MASK_N, False)
    k2 = _load_tile(K + ko + cols[:, None] * sk_n + offs_d2[None, :], cols_ok, mask_d2, MASK_N, True)
    v = _load_tile(V + vo + cols[:, None] * sv_n + offs_d[None, :], cols_ok, offs_d, MASK_N, False)
    v2 = _load_tile(V + vo + cols[:, None] * sv_n + offs_d2[None, :], cols_ok, mask_d2, MASK_N, True)
    dk = tl.zeros([BN, BLOCK_D], tl.float32)
    dk2 = tl.zeros([BN, D2], tl.float32)
    dv = tl.zeros([BN, BLOCK_D], tl.float32)
    dv2 = tl.zeros([BN, D2], tl.float32)
    m_full = (seqlen // BLOCK_M) * BLOCK_M
    for start_m in tl.range(0, m_full, BLOCK_M, warp_specialize=WS):
        dk, dk2, dv, dv2 = _bwd_dkdv_step2(Q, DO, LSE, DELTA, qo, doo, lo, sq_n, sdo_n, k, k2, v, v2, dk, dk2, dv,
                                           dv2, start_m, seqlen, qk_scale, offs_d, offs_d2, mask_d2, BLOCK_M, False,
                                           QD, QD2, DOD, DOD2, b, h, TMA)
    for start_m in range(m_full, seqlen, TAIL_M):
        dk, dk2, dv, dv2 = _bwd_dkdv_step2(Q, DO, LSE, DELTA, qo, doo, lo, sq_n, sdo_n, k, k2, v, v2, dk, dk2, dv,
                                           dv2, start_m, seqlen, qk_scale, offs_d, offs_d2, mask_d2, TAIL_M, True)
    _store_tile(DK + dko + cols[:, None] * sdk_n + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
                cols_ok, offs_d, MASK_N, False)
    _store_tile(DK + dko + cols[:, None] * sdk_n + offs_d2[None, :], (dk2 * sm_scale).to(DK.dtype.element_ty),
                cols_ok, mask_d2, MASK_N, True)
    _store_tile(DV + dvo + cols[:, None] * sdv_n + offs_d[None, :], dv.to(DV.dtype.element_ty),
                cols_ok, offs_d, MASK_N, False)
    _store_tile(DV + dvo + cols[:, None] * sdv_n + offs_d2[None, :], dv2.to(DV.dtype.element_ty),
                cols_ok, mask_d2, MASK_N, True)


@triton.jit
def _bwd_dq_step2(K, V, ko, vo, sk_n, sv_n, q, q2, do, do2, lse, delta, dq, dq2, start_n, seqlen, qk_scale,
                  offs_d, offs_d2, mask_d2, BN: tl.constexpr, MASK_N: tl.constexpr,
                  KD=None, KD2=None, VD=None, VD2=None, b=0, h=0, TMA: tl.constexpr = False):
    cols = start_n + tl.arange(0, BN)
    cols_ok = cols < seqlen
    k, k2, v, v2 = _walk_pair2(K, V, ko, vo, sk_n, sv_n, KD, KD2, VD, VD2, b, h, start_n, seqlen, offs_d, offs_d2,
                               mask_d2, BN, MASK_N, TMA)
    p = tl.math.exp2(tl.dot(q2, tl.trans(k2), tl.dot(q, tl.trans(k))) * qk_scale - lse[:, None])
    if MASK_N:  # padded keys (k = 0) get p = exp2(-lse): inf when every real score is below -128
        p = tl.where(cols_ok[None, :], p, 0.0)
    ds = (p * (tl.dot(do2, tl.trans(v2), tl.dot(do, tl.trans(v))) - delta[:, None])).to(k.dtype)
    return dq + tl.dot(ds, k), dq2 + tl.dot(ds, k2)


@triton.jit
def _bwd_dq_block2(Q, K, V, O, DO, DQ, LSE, DELTA, qo, ko, vo, oo, doo, dqo, lo,
                   sq_n, sk_n, sv_n, so_n, sdo_n, sdq_n, row0, seqlen, qk_scale, sm_scale, offs_d, offs_d2, mask_d2,
                   BM: tl.constexpr, MASK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, D2: tl.constexpr, WS: tl.constexpr,
                   KD=None, KD2=None, VD=None, VD2=None, b=0, h=0, TMA: tl.constexpr = False):
    rows = row0 + tl.arange(0, BM)
    rows_ok = rows < seqlen
    q = _load_tile(Q + qo + rows[:, None] * sq_n + offs_d[None, :], rows_ok, offs_d, MASK_M, False)
    q2 = _load_tile(Q + qo + rows[:, None] * sq_n + offs_d2[None, :], rows_ok, mask_d2, MASK_M, True)
    do = _load_tile(DO + doo + rows[:, None] * sdo_n + offs_d[None, :], rows_ok, offs_d, MASK_M, False)
    do2 = _load_tile(DO + doo + rows[:, None] * sdo_n + offs_d2[None, :], rows_ok, mask_d2, MASK_M, True)
    o = _load_tile(O + oo + rows[:, None] * so_n + offs_d[None, :], rows_ok, offs_d, MASK_M, False)
    o2 = _load_tile(O + oo + rows[:, None] * so_n + offs_d2[None, :], rows_ok, mask_d2, MASK_M, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) + tl.sum(o2.to(tl.float32) * do2.to(tl.float32), 1)
    if MASK_M:
        lse = tl.load(LSE + lo + rows, mask=rows_ok, other=float("inf"))
        tl.store(DELTA + lo + rows, delta, mask=rows_ok)
    else:
        lse = tl.load(LSE + lo + rows)
        tl.store(DELTA + lo + rows, delta)
    dq = tl.zeros([BM, BLOCK_D], tl.float32)
    dq2 = tl.zeros([BM, D2], tl.float32)
    n_full = (seqlen // BLOCK_N) * BLOCK_N
    for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WS):
        dq, dq2 = _bwd_dq_step2(K, V, ko, vo, sk_n, sv_n, q, q2, do, do2, lse, delta, dq, dq2, start_n, seqlen,
                                qk_scale, offs_d, offs_d2, mask_d2, BLOCK_N, False, KD, KD2, VD, VD2, b, h, TMA)
    for start_n in range(n_full, seqlen, TAIL_N):
        dq, dq2 = _bwd_dq_step2(K, V, ko, vo, sk_n, sv_n, q, q2, do, do2, lse, delta, dq, dq2, start_n, seqlen,
                                qk_scale, offs_d, offs_d2, mask_d2, TAIL_N, True)
    _store_tile(DQ + dqo + rows[:, None] * sdq_n + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
                rows_ok, offs_d, MASK_M, False)
    _store_tile(DQ + dqo + rows[:, None] * sdq_n + offs_d2[None, :], (dq2 * sm_scale).to(DQ.dtype.element_ty),
                rows_ok, mask_d2, MASK_M, True)


@triton.jit
def _bwd_tail_group(Q, K, V, O, DO, DQ, DK, DV, LSE, DELTA, bh, H, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h,
                    sv_n, so_b, so_h, so_n, sdo_b, sdo_h, sdo_n, sdq_b, sdq_h, sdq_n, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h,
                    sdv_n, sl_b, sl_h, pid, seqlen, qk_scale, sm_scale, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DQ_PASS: tl.constexpr, G: tl.constexpr,
                    WALK: tl.constexpr, D2: tl.constexpr = 0):
    """A grouped tail program of _attn_bwd_kv_q (strides already multiplied by ALIGN); pid: its tile index, counted
    on from the full blocks'. D2 > 0: the head dim in two pieces, BLOCK_D then D2 columns."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    offs_d2 = BLOCK_D + tl.arange(0, max(D2, 16))
    mask_d2 = offs_d2 < HEAD_DIM
    if D2 > 0 and DQ_PASS:
        m_full = seqlen // BLOCK_M
        _bwd_dq_tail_group2(Q, K, V, O, DO, DQ, LSE, DELTA, bh, H, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                            so_b, so_h, so_n, sdo_b, sdo_h, sdo_n, sdq_b, sdq_h, sdq_n, sl_b, sl_h,
                            m_full * BLOCK_M + (pid - m_full) * TAIL_M, seqlen, qk_scale, sm_scale, offs_d, offs_d2,
                            mask_d2, G, TAIL_M, WALK, TAIL_N, BLOCK_D, D2)
    elif D2 > 0:
        n_full = seqlen // BLOCK_N
        _bwd_dkdv_tail_group2(Q, K, V, DO, DK, DV, LSE, DELTA, bh, H, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h,
                              sv_n, sdo_b, sdo_h, sdo_n, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, sl_b, sl_h,
                              n_full * BLOCK_N + (pid - n_full) * TAIL_N, seqlen, qk_scale, sm_scale, offs_d, offs_d2,
                              mask_d2, G, TAIL_N, WALK, TAIL_M, BLOCK_D, D2)
    elif DQ_PASS:
        m_full = seqlen // BLOCK_M
        _bwd_dq_tail_group(Q, K, V, O, DO, DQ, LSE, DELTA, bh, H, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                           so_b, so_h, so_n, sdo_b, sdo_h, sdo_n, sdq_b, sdq_h, sdq_n, sl_b, sl_h,
                           m_full * BLOCK_M + (pid - m_full) * TAIL_M, seqlen, qk_scale, sm_scale, offs_d, mask_d, G,
                           TAIL_M, WALK, TAIL_N, BLOCK_D, EVEN_D)
    else:
        n_full = seqlen // BLOCK_N
        _bwd_dkdv_tail_group(Q, K, V, DO, DK, DV, LSE, DELTA, bh, H, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h,
                             sv_n, sdo_b, sdo_h, sdo_n, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, sl_b, sl_h,
                             n_full * BLOCK_N + (pid - n_full) * TAIL_N, seqlen, qk_scale, sm_scale, offs_d, mask_d,
                             G, TAIL_N, WALK, TAIL_M, BLOCK_D, EVEN_D)


@triton.jit
def _attn_bwd_kv_q(
    Q, K, V, O, DO, DQ, DK, DV, LSE, DELTA, CU, QD, KD, VD, DOD, QD2, KD2, VD2, DOD2,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n, sdo_b, sdo_h, sdo_n,
    sdq_b, sdq_h, sdq_n, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, sl_b, sl_h,
    H, N, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, VARLEN: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DQ_PASS: tl.constexpr, WS: tl.constexpr = False,
    D2: tl.constexpr = 0, TMA: tl.constexpr = False, TAIL_G: tl.constexpr = 0, TAIL_GW: tl.constexpr = 16,
    TAIL_GD: tl.constexpr = 16, TAIL_GD2: tl.constexpr = 0, TAIL_PRE: tl.constexpr = False,
    TAIL_FIRST: tl.constexpr = False,
):
    # TAIL_PRE: each walk's first tail tile is loaded before its full-tile loop (see _bwd_dq_block; unsplit head dims)
    # TAIL_FIRST: each walk's tail steps run before its full-tile loop (unsplit head dims)
    # TAIL_G > 1: the tail rows (dQ pass) or keys (dK/dV pass) of TAIL_G heads in one program (dense inputs), walking
    # TAIL_GW rows a step, the head dim whole in TAIL_GD columns (see _grouped_pids), or with TAIL_GD2 > 0 in two
    # pieces, TAIL_GD then TAIL_GD2 columns (config key TAIL_GS)
    # TMA: the full tiles each pass walks (K / V in the dQ pass, Q / dO in the dK/dV pass) come through the
    # tensor descriptors KD / VD / QD / DOD (dense inputs; block [1, 1, sub-tile, BLOCK_D]; with D2 > 0 the second
    # piece through QD2 ... DOD2, block [1, 1, sub-tile, D2])
    # two kernels in one source: DQ_PASS: program (query tile, b*h) walking key tiles;
    # else program (key tile, b*h) walking query tiles. M = queries, N = keys in both.
    # D2 > 0 (SPLIT_D): the head dim in two pieces, BLOCK_D columns then D2 (as in _attn_fwd)
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    is_g = pid < 0  # read only where TAIL_G > 1 (`TAIL_G > 1 and is_g` is decided at compile time)
    if TAIL_G > 1:
        pid, pid_bh, is_g = _grouped_pids(H, N, BLOCK_M if DQ_PASS else BLOCK_N, TAIL_G)
    b = pid_bh // H
    h = pid_bh % H
    start, seqlen = _seq_bounds(CU, b, N, VARLEN)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    tok = start.to(tl.int64)
    if TAIL_G > 1 and is_g:
        _bwd_tail_group(Q, K, V, O, DO, DQ, DK, DV, LSE, DELTA, tl.program_id(1) * TAIL_G + tl.arange(0, TAIL_G), H,
                        sq_b * ALIGN, sq_h * ALIGN, sq_n * ALIGN, sk_b * ALIGN, sk_h * ALIGN, sk_n * ALIGN,
                        sv_b * ALIGN, sv_h * ALIGN, sv_n * ALIGN, so_b * ALIGN, so_h * ALIGN, so_n * ALIGN,
                        sdo_b * ALIGN, sdo_h * ALIGN, sdo_n * ALIGN, sdq_b * ALIGN, sdq_h * ALIGN, sdq_n * ALIGN,
                        sdk_b * ALIGN, sdk_h * ALIGN, sdk_n * ALIGN, sdv_b * ALIGN, sdv_h * ALIGN, sdv_n * ALIGN,
                        sl_b, sl_h, pid, seqlen, qk_scale, sm_scale, HEAD_DIM, BLOCK_M, BLOCK_N, TAIL_M, TAIL_N,
                        TAIL_GD, TAIL_GD == HEAD_DIM, DQ_PASS, TAIL_G, TAIL_GW, TAIL_GD2)
    else:
        qo, sq_n = _row_base(b64, h64, tok, sq_b, sq_h, sq_n, ALIGN)
        ko, sk_n = _row_base(b64, h64, tok, sk_b, sk_h, sk_n, ALIGN)
        vo, sv_n = _row_base(b64, h64, tok, sv_b, sv_h, sv_n, ALIGN)
        doo, sdo_n = _row_base(b64, h64, tok, sdo_b, sdo_h, sdo_n, ALIGN)
        lo = b64 * sl_b + h64 * sl_h + tok
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        offs_d2 = BLOCK_D + tl.arange(0, max(D2, 16))
        mask_d2 = offs_d2 < HEAD_DIM
        if DQ_PASS:
            oo, so_n = _row_base(b64, h64, tok, so_b, so_h, so_n, ALIGN)
            dqo, sdq_n = _row_base(b64, h64, tok, sdq_b, sdq_h, sdq_n, ALIGN)
            m_full = seqlen // BLOCK_M
            if D2 > 0:
                if pid < m_full:
                    _bwd_dq_block2(Q, K, V, O, DO, DQ, LSE, DELTA, qo, ko, vo, oo, doo, dqo, lo,
                                   sq_n, sk_n, sv_n, so_n, sdo_n, sdq_n, pid * BLOCK_M, seqlen, qk_scale, sm_scale,
                                   offs_d, offs_d2, mask_d2, BLOCK_M, False, BLOCK_N, TAIL_N, BLOCK_D, D2, WS,
                                   KD, KD2, VD, VD2, b, h, TMA)
                else:
                    row0 = m_full * BLOCK_M + (pid - m_full) * TAIL_M
                    if row0 < seqlen:
                        _bwd_dq_block2(Q, K, V, O, DO, DQ, LSE, DELTA, qo, ko, vo, oo, doo, dqo, lo,
                                       sq_n, sk_n, sv_n, so_n, sdo_n, sdq_n, row0, seqlen, qk_scale, sm_scale,
                                       offs_d, offs_d2, mask_d2, TAIL_M, True, BLOCK_N, TAIL_N, BLOCK_D, D2, WS,
                                       KD, KD2, VD, VD2, b, h, TMA)
            elif pid < m_full:
                _bwd_dq_block(Q, K, V, O, DO, DQ, LSE, DELTA, qo, ko, vo, oo, doo, dqo, lo,
                              sq_n, sk_n, sv_n, so_n, sdo_n, sdq_n, pid * BLOCK_M, seqlen, qk_scale, sm_scale,
                              offs_d, mask_d, BLOCK_M, False, BLOCK_N, TAIL_N, BLOCK_D, EVEN_D, WS, KD, VD, b, h, TMA,
                              TAIL_PRE, TAIL_FIRST)
            else:
                row0 = m_full * BLOCK_M + (pid - m_full) * TAIL_M
                if row0 < seqlen:
                    _bwd_dq_block(Q, K, V, O, DO, DQ, LSE, DELTA, qo, ko, vo, oo, doo, dqo, lo,
                                  sq_n, sk_n, sv_n, so_n, sdo_n, sdq_n, row0, seqlen, qk_scale, sm_scale,
                                  offs_d, mask_d, TAIL_M, True, BLOCK_N, TAIL_N, BLOCK_D, EVEN_D, WS, KD, VD, b, h, TMA,
                                  TAIL_PRE, TAIL_FIRST)
        else:
            dko, sdk_n = _row_base(b64, h64, tok, sdk_b, sdk_h, sdk_n, ALIGN)
            dvo, sdv_n = _row_base(b64, h64, tok, sdv_b, sdv_h, sdv_n, ALIGN)
            n_full = seqlen // BLOCK_N
            if D2 > 0:
                if pid < n_full:
                    _bwd_dkdv_block2(Q, K, V, DO, DK, DV, LSE, DELTA, qo, ko, vo, doo, dko, dvo, lo,
                                     sq_n, sk_n, sv_n, sdo_n, sdk_n, sdv_n, pid * BLOCK_N, seqlen, qk_scale, sm_scale,
                                     offs_d, offs_d2, mask_d2, BLOCK_N, False, BLOCK_M, TAIL_M, BLOCK_D, D2, WS,
                                     QD, QD2, DOD, DOD2, b, h, TMA)
                else:
                    start_n = n_full * BLOCK_N + (pid - n_full) * TAIL_N
                    if start_n < seqlen:
                        _bwd_dkdv_block2(Q, K, V, DO, DK, DV, LSE, DELTA, qo, ko, vo, doo, dko, dvo, lo,
                                         sq_n, sk_n, sv_n, sdo_n, sdk_n, sdv_n, start_n, seqlen, qk_scale, sm_scale,
                                         offs_d, offs_d2, mask_d2, TAIL_N, True, BLOCK_M, TAIL_M, BLOCK_D, D2, WS,
                                         QD, QD2, DOD, DOD2, b, h, TMA)
            elif pid < n_full:
                _bwd_dkdv_block(Q, K, V, DO, DK, DV, LSE, DELTA, qo, ko, vo, doo, dko, dvo, lo,
                                sq_n, sk_n, sv_n, sdo_n, sdk_n, sdv_n, pid * BLOCK_N, seqlen, qk_scale, sm_scale,
                                offs_d, mask_d, BLOCK_N, False, BLOCK_M, TAIL_M, BLOCK_D, EVEN_D, WS, QD, DOD, b, h,
                                TMA, TAIL_PRE, TAIL_FIRST)
            else:
                start_n = n_full * BLOCK_N + (pid - n_full) * TAIL_N
                if start_n < seqlen:
                    _bwd_dkdv_block(Q, K, V, DO, DK, DV, LSE, DELTA, qo, ko, vo, doo, dko, dvo, lo,
                                    sq_n, sk_n, sv_n, sdo_n, sdk_n, sdv_n, start_n, seqlen, qk_scale, sm_scale,
                                    offs_d, mask_d, TAIL_N, True, BLOCK_M, TAIL_M, BLOCK_D, EVEN_D, WS, QD, DOD, b, h,
                                    TMA, TAIL_PRE, TAIL_FIRST)


# ----------------------------------------------------------------------------- launch


LOG2E = 1.4426950408889634


def _pow2(d: int) -> int:
    return max(16, next_power_of_2(d))


def _split_dims(d: int) -> Optional[tuple[int, int]]:
    """(D1, D2) for a head dim that fits two power-of-two pieces in fewer columns than one padded tile (88 -> 64 +
    32 = 96 instead of 128; 80 -> 64 + 16; 48 -> 32 + 16), else None (a power of two, or no saving)."""
    d1 = _pow2(d) // 2
    if d1 < 16 or d <= d1:
        return None
    d2 = _pow2(d - d1)
    return (d1, d2) if d1 + d2 < _pow2(d) else None


def _head_dim_meta(d: int, split_d: bool) -> dict:
    """BLOCK_D / EVEN_D / D2 launch keywords; split_d (a config's SPLIT_D): the head dim in two pieces, where
    _split_dims allows (ignored elsewhere)."""
    split = _split_dims(d) if split_d else None
    if split is not None:
        return dict(BLOCK_D=split[0], EVEN_D=False, D2=split[1])
    return dict(BLOCK_D=_pow2(d), EVEN_D=_pow2(d) == d, D2=0)


KV_Q = "kv+q"  # backward SPLIT value of the two-pass layout (_attn_bwd_kv_q)


def _cfg(bm, bn, tm, tn, warps, stages, split=None, trans=False, dq=None, regs=None, split_d=False, tma=False,
         tail_g=0, tail_gs=False, pre=False, first=False):
    """Block config; backward ones carry SPLIT (False, True or KV_Q). For KV_Q the top-level
    blocks drive the dK/dV pass (BLOCK_N key tile per program, BLOCK_M query sub-tiles) and
    `dq` = (bm, bn, tm, tn, warps, stages) the dQ pass (BLOCK_M query tile per program, BLOCK_N
    key sub-tiles); without it the dQ pass mirrors the dK/dV blocks. `regs` caps the registers per
    thread (Triton's maxnreg) of that kernel: more programs per SM, at the price of spills. `split_d`: the head
    dim in two power-of-two pieces where that is narrower than one padded tile (_split_dims: d = 88 as 64 + 32);
    the forward and the two-pass backward (both passes) take it, the one-pass backward ignores it. `tma`: the
    full tiles each loop walks come through tensor descriptors (Hopper's TMA) instead of pointer loads: dense inputs
    on sm_90+ only (ignored elsewhere), the forward with unsplit head dims only; in a two-pass backward config the
    top-level key drives the dK/dV pass and the "DQ" blocks' own key the dQ pass (`dq` takes it as a 7th entry).
    `tail_g` (TAIL_G): the tail rows of that many heads share one program (dense inputs with an unsplit head dim
    whose length is not a multiple of the block; see _grouped_pids), per pass as TMA (`dq`'s 8th entry; its 9th: the
    dQ pass's register cap). `tail_gs` (TAIL_GS): on every pass with tail groups, the grouped tail splits the head dim
    as the full blocks do (with split_d) instead of padding it. `pre` (TAIL_PRE): the walk's first tail tile loaded
    before the full-tile loop; `first` (TAIL_FIRST): the walk's tail steps taken before the full-tile loop; both for
    unsplit head dims, the forward's or, in a two-pass backward config, the dK/dV pass's."""
    c = dict(BLOCK_M=bm, BLOCK_N=bn, TAIL_M=tm, TAIL_N=tn, num_warps=warps, num_stages=stages)
    if pre:
        c["TAIL_PRE"] = pre
    if first:
        c["TAIL_FIRST"] = first
    if split_d:
        c["SPLIT_D"] = True
    if tma:
        c["TMA"] = True
    if tail_g > 1:
        c["TAIL_G"] = tail_g
        if tail_gs:
            c["TAIL_GS"] = True
    if regs is not None:
        c["maxnreg"] = regs
    if split == KV_Q:
        c["SPLIT"] = split
        if dq is not None:
            c["DQ"] = _cfg(*dq[:6], tma=len(dq) > 6 and dq[6], tail_g=dq[7] if len(dq) > 7 else 0,
                           regs=dq[8] if len(dq) > 8 else None, tail_gs=tail_gs)
    elif split is not None:
        c.update(SPLIT=split, TRANS=trans)
    return c


def _kv_q_dq_config(cfg: dict) -> dict:
    """The dQ pass's blocks of a KV_Q config: its "DQ" entry, else the dK/dV blocks mirrored."""
    if cfg.get("DQ"):
        return dict(cfg["DQ"])
    return dict(BLOCK_M=cfg["BLOCK_N"], BLOCK_N=cfg["BLOCK_M"], TAIL_M=cfg["TAIL_N"], TAIL_N=cfg["TAIL_M"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# The forward's LEAN softmax (see _attn_fwd) unless a config says otherwise (config key LEAN). K52 (`python -m bench
# kernels --tune-lean`, ...-2026-11-29-tune-lean-{1,2}.json, H200): every shape's forward 1.7-4.1 % faster, e.g.
# N = 261 0.2196 / 0.2190 ms vs 0.2260 / 0.2247, N = 197 0.1064 / 0.1064 vs 0.1091 / 0.1088, d = 88 0.1992 / 0.2003
# vs 0.2027 / 0.2038. Nsight Compute (K51) had the kernels issuing 2.1-2.4 instructions per cycle per SM with the
# tensor pipe 30-37 % busy; LEAN takes the forward's loop from 336 to 306 instructions per thread per 64 x 64 tile
FWD_LEAN = True

# (N, D) -> (forward config, backward config): the winners of `python -m bench kernels --tune`
# on an H200 (bench/results/kernels-nvidia-h200-2026-11-28-tune.log), bf16, ViT batch sizes.
TUNED: dict = {
    (50, 64): (_cfg(64, 64, 64, 64, 4, 2), _cfg(64, 64, 64, 64, 4, 1, split=False)),
    # N = 197 / 261: both backward passes load their walked tiles by TMA, at 3 stages instead of 4 (--tune-tma,
    # ...-2026-11-29-tune-tma{,-2}.json): bwd 0.3112 / 0.3101 ms vs 0.3251 / 0.3242 (N = 197), 0.6717 / 0.6740 vs
    # 0.6939 / 0.6976 (N = 261); TMA forwards were slower at every d = 64 shape (N = 197: 0.1316-0.1330 vs
    # 0.1153-0.1163) then tail groups (--tune-tail-groups, ...-2026-11-29-tune-tailg-caps.json): the forward's and the
    # dK/dV pass's tail rows of 4 heads in one program, under a 128-register cap (without it the grouped tail's tiles
    # raise the whole kernel's registers, 121 -> 158 in the forward, and fewer programs fit an SM: slower,
    # ...-tune-tailg.json): N = 197 fwd 0.1081 ms vs 0.1152, bwd 0.2972 vs 0.3112; N = 261 fwd 0.2232 vs 0.2374, bwd
    # 0.6528 vs 0.6692. Grouped dQ-pass tails were slower at d = 64 with or without caps (N = 197: 0.3144-0.3208 ms vs
    # 0.3112)
    # then the dK/dV pass's tail step taken before its loop (TAIL_FIRST; --tune-tail-step, K90,
    # ...-2026-11-30-s33-tune-tail-first-{1,2}.json): bwd 0.2875 / 0.2891 ms vs 0.2986 / 0.2987 (N = 197), 0.6174 /
    # 0.6227 vs 0.6456 / 0.6471 (N = 261), 0.4212 / 0.4217 vs 0.4373 / 0.4423 (N = 257). Its first tail tile loaded
    # before the loop instead (TAIL_PRE) gained a third of that (0.2965-0.2967, 0.6364-0.6367, 0.4301-0.4304; K85-K87,
    # ...-s33-tune-tail-pre*.json). Both lost on the forward (N = 197 0.1057 first, 0.1151 pre vs 0.1047-0.1051: pre
    # takes 61,440 bytes of shared memory per program, so 3 programs per SM instead of 4) and on the dQ pass (N = 261
    # first 0.6281 / 0.6256 with the dK/dV pass's; pre 0.6695, capped at 96 0.6520). Loading only Q and LSE early lost
    # everywhere (removed; commit 132d7db has it)
    (197, 64): (_cfg(64, 64, 16, 16, 4, 3, regs=128, tail_g=4),
                _cfg(32, 64, 16, 16, 4, 3, split=KV_Q, dq=(64, 32, 16, 16, 4, 3, True), tma=True, regs=128, tail_g=4,
                     first=True)),
    # the MAE ViT-L decoder (16 heads of 32): here the TMA forward wins too, 0.1600 ms vs 0.1725, and the backward
    # with TMA on both passes 0.4000 vs 0.4132 (...-tune-tma-d32.json); then tail groups of 4 heads on the forward
    # (0.1436 ms vs 0.1561; its registers do not rise at d = 32) and on the dQ pass under a 96-register cap (bwd
    # 0.3842 vs 0.3998; ...-tune-tailg-caps.json); then the forward's first tail tile of K and V loaded before its
    # loop (TAIL_PRE, ...-s33-tune-tail-pre2-{1,2}.json): 0.1345 / 0.1355 ms vs 0.1396 / 0.1402 (the backward's lost
    # on both passes here: 0.3938-0.4138 vs 0.3852 / 0.3889, as did TAIL_FIRST, forward 0.1409 / 0.1416 and backward
    # 0.3912-0.4008 vs 0.3863 / 0.3882, ...-s33-tune-tail-first-{1,2}.json)
    (197, 32): (_cfg(64, 64, 16, 16, 4, 3, tma=True, tail_g=4, pre=True),
                _cfg(32, 64, 16, 16, 4, 3, split=KV_Q, dq=(64, 32, 16, 16, 4, 3, True, 4, 96), tma=True)),
    (261, 64): (_cfg(64, 64, 16, 16, 4, 3, regs=128, tail_g=4),
                _cfg(32, 64, 16, 16, 4, 3, split=KV_Q, dq=(64, 32, 16, 16, 4, 3, True), tma=True, regs=128, tail_g=4,
                     first=True)),
    # d = 88 with the head dim in two pieces, 64 + 32 columns (`--tune-split`, ...-2026-11-29-tune-split.json): fwd
    # 0.2018 ms vs 0.2449 padded to 128, bwd 0.5948 vs 0.6956, fwd+bwd 1.15x cuDNN (was 0.97x)
    # then TMA on both backward passes (two descriptors per tensor: 64 and 32 columns), the dK/dV pass at 3 stages
    # (--tune-tma, ...-2026-11-29-tune-tma-split.json): bwd 0.5651 ms vs 0.6001. At d = 80 (64 + 16) and at the
    # MAE ViT-g encoder's N = 65 every TMA variant was slower (d = 80: 0.819-0.987 ms vs 0.760)
    # then split grouped tails (TAIL_GS: the grouped tail holds the head dim as 64 + 32 columns like the full blocks,
    # not padded to 128; --tune-tail-split, ...-2026-11-30-s30-tune-tail-split.json): the forward's tail rows of 2
    # heads in one program, 0.1914 ms vs 0.1990 (padded groups: 0.1974-0.1996); every grouped backward still lost
    # (best 0.5736 with the dQ pass's groups under a 168 cap vs 0.5636). What the tail costs at all: N = 256 with the
    # same configs runs 0.596 ms fwd+bwd vs 0.762 at 257 (...-s30-tail-bound.json)
    (257, 88): (_cfg(128, 64, 16, 16, 4, 3, split_d=True, tail_g=2, tail_gs=True),
                _cfg(64, 64, 16, 16, 4, 3, split=KV_Q, dq=(64, 64, 16, 16, 4, 2, True), split_d=True, tma=True)),
    # ViT-H/14's d = 80 as 64 + 16 (...-tune-split-2.json): fwd 0.2302 ms vs 0.3082 padded, bwd 0.7520 vs 0.8448,
    # fwd+bwd 1.17x cuDNN; then tail groups of 4 heads (the tail padded to 128 columns; ...-tune-tailg-split.json) on
    # the forward, 0.2233 ms vs 0.2325, and the dQ pass, bwd 0.7473 vs 0.7577. At d = 88 (N = 257) no variant gained
    # more than 1 % (fwd 0.2020 vs 0.2036) and every grouped backward lost: unchanged. Then split grouped tails (64 +
    # 16 columns, not 128; ...-s30-tune-tail-split.json): fwd 0.2029 ms vs 0.2149 padded, bwd (the dQ pass's groups
    # split) 0.7299 vs 0.7469
    (257, 80): (_cfg(128, 64, 16, 16, 4, 3, split_d=True, tail_g=4, tail_gs=True),
                _cfg(64, 64, 16, 16, 4, 3, split=KV_Q, dq=(64, 64, 16, 16, 4, 3, False, 4), split_d=True,
                     tail_gs=True)),
    # the MAE ViT-g/14 encoder (64 kept patches + class token, d = 88; ...-tune-split-n65.json): fwd 0.1089 ms vs
    # 0.317 with 128-row query blocks (one half-empty program per head), bwd 0.320; fwd+bwd 1.05x cuDNN. Then tail
    # groups (one row past 64: the tail program was half of each pass's programs; ...-tune-tailg-split.json): fwd with
    # groups of 2 under a 128 cap 0.1053 ms vs 0.1088, bwd with groups of 4 on the dK/dV pass and of 2 on the dQ pass
    # (capped at 128) 0.2944 vs 0.3205. Then split grouped tails (...-s30-tune-tail-split.json): fwd 0.0980 ms vs
    # 0.1019 padded; bwd with the groups split on both passes, the dQ pass's of 4 heads, 0.2742 vs 0.2925
    (65, 88): (_cfg(64, 32, 16, 16, 4, 3, split_d=True, regs=128, tail_g=2, tail_gs=True),
               _cfg(32, 64, 16, 16, 4, 2, split=KV_Q, dq=(64, 32, 16, 16, 4, 2, False, 4, 128), split_d=True,
                    tail_g=4, tail_gs=True)),
    # N = 1374: 1374 = 21 x 64 + 30, so one 32-row tail step instead of two 16-row ones (re-tuned with the
    # neighbours of the first winner, ...-tune-1374.json: fwd 0.2434 vs 0.2464 ms, bwd 0.7050 vs 0.7065); the
    # dK/dV pass capped at 168 registers per thread (3 programs per SM): bwd 0.690 vs 0.717 ms and 0.7045 vs
    # 0.7216 in two calls (...-tune-1374-2.json, ...-tune-regs.json); the cap gained nothing on the other shapes.
    # TMA on both passes: 0.6566 / 0.6748 ms vs 0.6827 / 0.6857 without (...-tune-tma{,-2}.json)
    (1374, 64): (_cfg(64, 64, 32, 32, 4, 3),
                 _cfg(64, 64, 32, 32, 4, 3, split=KV_Q, dq=(64, 64, 32, 32, 4, 3, True), regs=168, tma=True)),
}


# the d = 64 defaults take tail groups up to this length: they won at N = 197, 257 and 261 (fwd and dK/dV pass, 3-6 %;
# ...-tune-tailg-caps.json, ...-tune-tailg-bucket.json) and lost at N = 1374 (a 30-row tail of 22 blocks: 0.298-0.350
# ms vs 0.246 forward), where one tail program per head costs little
TAIL_GROUP_MAX_N = 320


# Whether the defaults group tail rows (TAIL_G) at power-of-two head dims (d = 32, 64), where the grouped tail's 3D
# products run at the full blocks' width. The groups were tuned under Triton 3.6 (torch 2.11), where they win 3-6 %
# (the TUNED notes). Under Triton 3.8 (torch 2.14's) on the same H200 they lose: the grouped kernels are slower than
# one tail program per head, with or without the register caps. Per pass, in ms
# (bench/results/kernels-nvidia-h200-2026-11-29-capab-triton38.json):
# - N = 197: forward 0.1324 grouped vs 0.1106 per head, backward 0.3669 vs 0.3110;
# - N = 261: forward 0.2819 vs 0.2503, backward 0.7934 vs 0.6903;
# - the MAE decoder's (197, 32): forward 0.1527 vs 0.1470, backward 0.4252 vs 0.3984.
# Per-head tails under 3.8 then match the grouped defaults under 3.6 within 3 % (...-capab-triton36.json: N = 197
# 0.1076 / 0.3134, N = 261 0.2377 / 0.7015). Split head dims keep their groups (d = 80, the tail padded to 128
# columns: 0.2121 / 0.7344 grouped vs 0.2281 / 0.7473 under 3.8). 3.7 is unmeasured and taken as 3.8.
NEWER_TRITON = triton_version.TRITON >= (3, 7)  # 3.7 unmeasured, taken as 3.8 (here and in TUNED_NEWER_TRITON)
POW2_TAIL_GROUPS = not NEWER_TRITON
# Split grouped tails (TAIL_GS) lose badly under Triton 3.8 (session 30, --tune-tail-split under 3.8 on the H200,
# ...-2026-11-30-s30-triton38-tune-tail-split.json; TUNED's 3.6 winners there): d = 88 forward 0.2164 ms vs 0.1925 with
# padded groups of 4, d = 80 backward 0.7784 vs 0.7012, the MAE ViT-g encoder backward 0.4286 vs 0.2831. Off from 3.7,
# the defaults drop the key (their padded groups stay), and TUNED_NEWER_TRITON holds 3.8's own winners for those shapes.
SPLIT_TAIL_GROUPS = not NEWER_TRITON
# TAIL_PRE (the walk's first tail tile loaded before the loop) and TAIL_FIRST (its tail steps taken before the loop)
# in the defaults, under every Triton: measured under 3.6 (session 33) and then under 3.8, beside the per-head tails
# that 3.8 runs at d = 64 (session 34, H200; HEAD's kernels against the same with this on, alternating processes, 4
# rounds, kernels-probe-nvidia-h200-2026-11-30-s34-triton38-ab-tail-step.json, median ms): backward at N = 261 0.6178
# vs 0.6297, N = 257 0.4179 vs 0.4264, N = 197 0.2929 vs 0.2975 (4 / 4 / 3 of 4 rounds apart); the MAE decoder's
# forward 0.1465 vs 0.1486. Off (for A/B runs), no default carries either key.
TAIL_STEP_DEFAULTS = True


# Shapes whose blocks differ under Triton 3.7 and later (measured under 3.8, torch 2.14's; 3.7 is taken as 3.8, as
# for POW2_TAIL_GROUPS): (forward, backward) configs that replace TUNED's there, None where TUNED's stays. d = 88's dQ
# pass at 32-key steps and 4 stages (--tune-blocks under 3.8 on the H200,
# ...-2026-11-29-triton38-tune-blocks-vit-g-n257-d88.json): backward 0.5580 ms vs 0.5907 with TUNED's (64-key steps,
# 2 stages), fwd+bwd 1.21x cuDNN vs 1.15x. Under 3.6 the same change is slower (0.5853 vs 0.5641,
# ...-2026-11-29-tune-blocks-2.json), so TUNED keeps its own. The other shapes' neighbours under 3.8 (N = 197, 261,
# 1374, the MAE decoder, d = 80, the MAE ViT-g encoder) gained nothing (...-triton38-tune-blocks-<shape>.json).
# The split head dims' tail groups under 3.8 (session 30, ...-s30-triton38-tune-tail-split.json, ms; padded, never
# split, see SPLIT_TAIL_GROUPS): d = 88's forward with groups of 4, 0.1925 vs 0.2031 per head (its backward's groups
# gained nothing: 0.5564 vs 0.5572); d = 80's backward with groups of 4 on both passes, 0.7012 vs 0.7254 (dQ pass
# only); the MAE ViT-g encoder per head on the forward (0.1043 vs 0.1044 in groups of 2) and on the dQ pass, 0.2831 vs
# 0.2898 (groups of 2)
TUNED_NEWER_TRITON: dict = {
    (257, 88): (_cfg(128, 64, 16, 16, 4, 3, split_d=True, tail_g=4),
                _cfg(64, 64, 16, 16, 4, 3, split=KV_Q, dq=(64, 32, 16, 16, 4, 4, True), split_d=True, tma=True)),
    (257, 80): (_cfg(128, 64, 16, 16, 4, 3, split_d=True, tail_g=4),
                _cfg(64, 64, 16, 16, 4, 3, split=KV_Q, dq=(64, 64, 16, 16, 4, 3, False, 4), split_d=True, tail_g=4)),
    (65, 88): (_cfg(64, 32, 16, 16, 4, 3, split_d=True, regs=128),
               _cfg(32, 64, 16, 16, 4, 2, split=KV_Q, dq=(64, 32, 16, 16, 4, 2, False, 0, 128), split_d=True,
                    tail_g=4)),
}


def _newer(n: int, d: int, i: int):
    """TUNED_NEWER_TRITON's forward (i = 0) or backward (1) config for (n, d) under Triton 3.7+, else None."""
    return TUNED_NEWER_TRITON.get((n, d), (None, None))[i] if NEWER_TRITON else None


def _for_this_triton(cfg: dict, d: int) -> dict:
    """A default config as this Triton runs it best: without tail groups at power-of-two head dims where
    POW2_TAIL_GROUPS is off, without split grouped tails (TAIL_GS; the padded groups stay) where SPLIT_TAIL_GROUPS is
    off, without TAIL_PRE / TAIL_FIRST where TAIL_STEP_DEFAULTS is off (both passes of a two-pass backward), else
    unchanged. The register caps stay: per-head tails under Triton 3.8 still run faster with them (N = 197 forward
    0.1106 vs 0.1141 ms, backward 0.3110 vs 0.3140)."""
    drop = ()
    if not POW2_TAIL_GROUPS and _pow2(d) == d:
        drop += ("TAIL_G", "TAIL_GW", "TAIL_GS")
    if not SPLIT_TAIL_GROUPS:
        drop += ("TAIL_GS",)
    if not TAIL_STEP_DEFAULTS:
        drop += ("TAIL_PRE", "TAIL_FIRST")
    if not drop:
        return cfg
    strip = lambda c: {k: v for k, v in c.items() if k not in drop}
    out = strip(cfg)
    if isinstance(out.get("DQ"), dict):
        out["DQ"] = strip(out["DQ"])
    return out


def _fwd_config(n: int, d: int) -> dict:
    """The forward's default config: TUNED_NEWER_TRITON's under Triton 3.7+ where it has one, else _fwd_tuned's, as
    this Triton runs it best (_for_this_triton)."""
    return _for_this_triton(_newer(n, d, 0) or _fwd_tuned(n, d), d)


def _bwd_config(n: int, d: int) -> dict:
    """The backward's default config: TUNED_NEWER_TRITON's under Triton 3.7+ where it has one, else _bwd_tuned's, as
    this Triton runs it best (_for_this_triton)."""
    return _for_this_triton(_newer(n, d, 1) or _bwd_tuned(n, d), d)


def _fwd_tuned(n: int, d: int) -> dict:
    """Block shapes by sequence length and head dim; exact tuned shapes first (tuned under Triton 3.6)."""
    if (n, d) in TUNED:
        return TUNED[(n, d)][0]
    if n <= 64:
        return _cfg(64, 64, 64, 64, 4, 2)  # one tile: the whole sequence
    if _pow2(d) == 64 and n <= TAIL_GROUP_MAX_N:  # the N = 197 / 257 / 261 winner (tail groups under a cap)
        return _cfg(64, 64, 16, 16, 4, 3, regs=128, tail_g=4)
    if _pow2(d) <= 64:
        return _cfg(64, 64, 16, 16, 4, 3)
    if _split_dims(d) is not None:  # d = 80, 88, 96 ...: the winners at N = 65 (d = 88) and N = 257 (d = 80, 88)
        return _cfg(64, 32, 16, 16, 4, 3, split_d=True) if n <= 128 else _cfg(128, 64, 16, 16, 4, 3, split_d=True)
    return _cfg(128, 32, 16, 16, 4, 3)


def _bwd_tuned(n: int, d: int) -> dict:
    if (n, d) in TUNED:
        return TUNED[(n, d)][1]
    if n <= 64:  # one program per (batch, head), whole sequence resident, delta inline
        return _cfg(64, 64, 64, 64, 4, 1, split=False)
    # the two-pass layout won every tuned shape above 64 tokens on the H200 (N = 197: 0.32 ms vs 0.47
    # for the best single-pass one; N = 1374: 0.71 vs 1.01; d = 88: 0.70 vs 1.02)
    if _pow2(d) == 64 and n <= TAIL_GROUP_MAX_N:  # the N = 197 / 257 / 261 winner: dK/dV-pass tail groups, capped,
        # its tail step before its loop
        return _cfg(32, 64, 16, 16, 4, 3, split=KV_Q, dq=(64, 32, 16, 16, 4, 3, True), tma=True, regs=128, tail_g=4,
                    first=True)
    if _pow2(d) <= 64:  # the N = 197 / 261 winner before tail groups
        return _cfg(32, 64, 16, 16, 4, 3, split=KV_Q, dq=(64, 32, 16, 16, 4, 3, True), tma=True)
    if n <= 128 and _split_dims(d) is not None:  # N = 65, d = 88: 0.320 ms vs 0.359 with the blocks below
        return _cfg(32, 64, 16, 16, 4, 2, split=KV_Q, dq=(64, 32, 16, 16, 4, 2), split_d=True)
    if n <= 2048 and _split_dims(d) is not None:  # 3 stages: d = 80's winner, 2.5 % behind d = 88's 2 stages
        return _cfg(64, 64, 16, 16, 4, 3, split=KV_Q, dq=(64, 64, 16, 16, 4, 3), split_d=True)
    if n <= 2048:
        return _cfg(64, 64, 16, 16, 4, 2, split=KV_Q, dq=(64, 64, 16, 16, 4, 2))
    return _cfg(128, 128, 16, 16, 8, 1, split=True)


def _n_tiles(n: int, block: int, tail: int, packed: bool) -> int:
    """Programs along a sequence: full blocks, then tail tiles (an upper bound when packed)."""
    if packed:
        return cdiv(n, block) + cdiv(block, tail)
    return n // block + cdiv(n % block, tail)


def _tail_group(cfg: dict, n: int, block: int, walk: int, bh: int, packed: bool, d: int, split_d: bool = False) -> dict:
    """The TAIL_G / TAIL_GW / TAIL_GD (/ TAIL_GD2) launch keywords a config's TAIL_G (and TAIL_GW, TAIL_GS, popped from
    `cfg`) come to for n rows in blocks of `block` walking tiles of `walk`, head dim d: G = the largest power of two
    <= TAIL_G dividing B * H; nothing (one tail program per head) when that is 1, the inputs are packed (lengths
    differ) or n has no tail rows. TAIL_GW, the grouped tail's walk step, defaults to walk / G rows (at least 16): the
    same bytes per tile as the full blocks' walk, so the grouped tail asks for no more shared memory than they do.
    TAIL_GD: the grouped tail's head dim, padded to a power of two (128 columns at d = 88), unless TAIL_GS is set
    where the full blocks split it (split_d, SPLIT_D): then the tail splits it alike, TAIL_GD + TAIL_GD2 columns
    (64 + 32 at d = 88)."""
    g, gw, gs = cfg.pop("TAIL_G", 0), cfg.pop("TAIL_GW", None), cfg.pop("TAIL_GS", False)
    if g < 2 or packed or n % block == 0:
        return {}
    g = 1 << (g.bit_length() - 1)
    while g > 1 and bh % g:
        g //= 2
    if g < 2:
        return {}
    out = dict(TAIL_G=g, TAIL_GW=gw or max(16, walk // g), TAIL_GD=_pow2(d))
    pieces = _split_dims(d) if gs and split_d else None
    if pieces is not None:
        out.update(TAIL_GD=pieces[0], TAIL_GD2=pieces[1])
    return out


def _grid(n: int, block: int, tail: int, packed: bool, bh: int, group: dict) -> tuple:
    """Programs (tiles, heads): with a tail group (see _grouped_pids) each group's full blocks, then its tail tiles."""
    g = group.get("TAIL_G", 1)
    if g > 1:
        return n // block * g + cdiv(n % block, tail), bh // g
    return _n_tiles(n, block, tail, packed), bh


def _align(*strides):
    """(ALIGN, strides divided by it): 8 when every stride is a multiple of 8 elements."""
    a = 8 if all(s % 8 == 0 for st in strides for s in st) else 1
    return a, [s // a for st in strides for s in st]


def _as_bhnd(x: torch.Tensor, packed: bool):
    """(tensor, strides b, h, n) with a unit last stride; packed [T, H, D] has b-stride 0."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if packed:
        return x, (0, x.stride(1), x.stride(0))
    return x, (x.stride(0), x.stride(1), x.stride(2))


def _empty_out(q: torch.Tensor, packed: bool, dtype=None):
    dtype = dtype or q.dtype
    if packed:
        return torch.empty(q.shape, device=q.device, dtype=dtype)
    B, H, N, D = q.shape
    # [B, N, H, D] memory, viewed as [B, H, N, D]: the caller's transpose(1, 2).reshape is free.
    return torch.empty(B, N, H, D, device=q.device, dtype=dtype).transpose(1, 2)


def _geometry(q, cu_seqlens, max_seqlen):
    if cu_seqlens is None:
        B, H, N, D = q.shape
        return B, H, N, D, N
    T, H, D = q.shape
    nseq = cu_seqlens.numel() - 1
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if nseq else 0
    return nseq, H, T, D, int(max_seqlen)


def _lse_strides(H, N, packed):
    # dense: [B, H, N]; packed: [H, T]
    return (0, N) if packed else (H * N, N)


def _tma_ok(*xs) -> bool:
    """Tensor descriptors (TMA) need 16-byte aligned bases and row/head/batch strides, and a unit last stride."""
    return all(x.data_ptr() % 16 == 0 and x.stride(-1) == 1 and all(s * x.element_size() % 16 == 0
               for s in x.stride()[:-1]) for x in xs)


def _descs(use: bool, xs, rows: int, cols: int, cols2: int = 0):
    """[B, H, N, D] tensor descriptors with block [1, 1, rows, cols] for the kernels' TMA path (then, with cols2, one
    more per tensor with block columns cols2: a split head dim's second piece), or Nones: TMA off (the config has
    no TMA key, the inputs are packed, the card is older than Hopper, or an alignment does not hold)."""
    n = len(xs) * (2 if cols2 else 1)
    if not use or not _tma_ok(*xs) or (xs[0].is_cuda and torch.cuda.get_device_capability(xs[0].device)[0] < 9):
        return [None] * n, False
    from triton.tools.tensor_descriptor import TensorDescriptor

    if xs[0].is_cuda:  # Triton encodes them on the host before its launcher makes a context current
        ensure_context(xs[0].device.index)
    blocks = [cols, cols2] if cols2 else [cols]
    return [TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, c]) for c in blocks for x in xs], True


def attention_fwd(q, k, v, scale, cu_seqlens=None, max_seqlen=None, config=None, out=None):
    """(o, lse); `out` may hand in both: o with any strides and a unit last stride, lse contiguous ([B, H, N] dense,
    [H, T] packed)."""
    packed = cu_seqlens is not None
    B, H, N, D, maxn = _geometry(q, cu_seqlens, max_seqlen)
    q, sq = _as_bhnd(q, packed)
    k, sk = _as_bhnd(k, packed)
    v, sv = _as_bhnd(v, packed)
    if out is not None:
        o, lse = out
        if o.stride(-1) != 1 or not lse.is_contiguous():
            raise ValueError("attention_fwd(out=...): o needs a unit last stride and lse to be contiguous")
    else:
        o = _empty_out(q, packed)
        lse = torch.empty((H, N) if packed else (B, H, N), device=q.device, dtype=torch.float32)
    so = _as_bhnd(o, packed)[1]
    cfg = dict(config or _fwd_config(maxn, D))
    dims = _head_dim_meta(D, cfg.pop("SPLIT_D", False))
    tma = cfg.pop("TMA", False) and not packed and dims["D2"] == 0
    lean = cfg.pop("LEAN", FWD_LEAN) and scale > 0  # the row max of raw scores scales only by a positive number
    group = _tail_group(cfg, maxn, cfg["BLOCK_M"], cfg["BLOCK_N"], B * H, packed, D, dims["D2"] > 0)
    cu = cu_seqlens.to(torch.int32) if packed else q  # dummy pointer when dense
    if B * H > 0 and maxn > 0:
        grid = _grid(maxn, cfg["BLOCK_M"], cfg["TAIL_M"], packed, B * H, group)
        align, strides = _align(sq, sk, sv, so)
        descs, tma = _descs(tma, (k, v), cfg["BLOCK_N"], dims["BLOCK_D"])
        _attn_fwd[grid](
            q, k, v, o, lse, cu, *descs, *strides, *_lse_strides(H, N, packed),
            H, N, scale * LOG2E,
            HEAD_DIM=D, VARLEN=packed, ALIGN=align, TMA=tma, LEAN=lean, **dims, **group, **cfg,
        )
    return o, lse


def attention_bwd(do, q, k, v, o, lse, scale, cu_seqlens=None, max_seqlen=None, config=None, out=None):
    """(dq, dk, dv); `out` may hand in the three gradient tensors (any strides, unit last stride)."""
    packed = cu_seqlens is not None
    B, H, N, D, maxn = _geometry(q, cu_seqlens, max_seqlen)
    q, sq = _as_bhnd(q, packed)
    k, sk = _as_bhnd(k, packed)
    v, sv = _as_bhnd(v, packed)
    o, so = _as_bhnd(o, packed)
    do, sdo = _as_bhnd(do, packed)
    dq, dk, dv = out if out is not None else (_empty_out(x, packed) for x in (q, k, v))
    sdq, sdk, sdv = (_as_bhnd(x, packed)[1] for x in (dq, dk, dv))
    if B * H == 0 or maxn == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    cfg = dict(config or _bwd_config(maxn, D))
    split = cfg.pop("SPLIT")
    split_d = cfg.pop("SPLIT_D", False)
    tma = cfg.pop("TMA", False)
    sl = _lse_strides(H, N, packed)
    cu = cu_seqlens.to(torch.int32) if packed else q
    bd = _pow2(D)
    if split == KV_Q:  # dQ pass (stores delta), then the dK/dV pass that reads it: stream order
        dq_cfg = _kv_q_dq_config(cfg)
        dq_cfg.pop("SPLIT_D", None)
        tma_dq = dq_cfg.pop("TMA", False)
        cfg.pop("DQ", None)
        cfg.pop("TRANS", None)
        delta = torch.empty_like(lse)
        align, strides = _align(sq, sk, sv, so, sdo, sdq, sdk, sdv)
        head = (q, k, v, o, do, dq, dk, dv, lse, delta, cu)
        rest = (*strides, *sl, H, N, scale * LOG2E, scale)
        # SPLIT_D (the config's top level) applies to both passes; TMA, like WS, to the pass whose blocks carry it
        dims = _head_dim_meta(D, split_d)
        meta = dict(HEAD_DIM=D, VARLEN=packed, ALIGN=align, **dims)
        descs, tma_q = _descs(tma_dq and not packed, (k, v), dq_cfg["BLOCK_N"], dims["BLOCK_D"], dims["D2"])
        kd, vd, kd2, vd2 = descs + [None] * (4 - len(descs))
        group = _tail_group(dq_cfg, maxn, dq_cfg["BLOCK_M"], dq_cfg["BLOCK_N"], B * H, packed, D, dims["D2"] > 0)
        _attn_bwd_kv_q[_grid(maxn, dq_cfg["BLOCK_M"], dq_cfg["TAIL_M"], packed, B * H, group)](
            *head, None, kd, vd, None, None, kd2, vd2, None, *rest, DQ_PASS=True, TMA=tma_q, **meta, **group,
            **dq_cfg)
        descs, tma_kv = _descs(tma and not packed, (q, do), cfg["BLOCK_M"], dims["BLOCK_D"], dims["D2"])
        qd, dod, qd2, dod2 = descs + [None] * (4 - len(descs))
        group = _tail_group(cfg, maxn, cfg["BLOCK_N"], cfg["BLOCK_M"], B * H, packed, D, dims["D2"] > 0)
        _attn_bwd_kv_q[_grid(maxn, cfg["BLOCK_N"], cfg["TAIL_N"], packed, B * H, group)](
            *head, qd, None, None, dod, qd2, None, None, dod2, *rest, DQ_PASS=False, TMA=tma_kv, **meta, **group,
            **cfg)
        return dq, dk, dv
    if split not in (True, False):
        raise ValueError(f"backward SPLIT must be True, False or {KV_Q!r}; got {split!r}")
    cfg.setdefault("TRANS", False)
    cfg.pop("TAIL_G", None)  # the one-kernel layouts take no tail groups
    cfg.pop("TAIL_GW", None)
    cfg.pop("TAIL_GS", None)
    cfg.pop("TAIL_PRE", None)
    cfg.pop("TAIL_FIRST", None)
    bn = cfg["BLOCK_N"]
    if split:
        mode = 1
    elif maxn <= bn:
        mode, cfg["TAIL_N"] = 0, bn  # the whole sequence is one key tile: no scratch, delta inline
    else:
        mode = 2
    if mode == 0:
        delta, acc, sa = lse, q, sq  # unused
    else:
        delta = torch.empty_like(lse)
        _attn_bwd_delta[(cdiv(maxn, 64), B * H)](
            o, do, delta, cu, *so, *sdo, *sl, H, N,
            HEAD_DIM=D, VARLEN=packed, BLOCK_M=64, BLOCK_D=bd, num_warps=4,
        )
        acc = (torch.zeros if split else torch.empty)(q.shape, device=q.device, dtype=torch.float32)
        sa = _as_bhnd(acc, packed)[1]
    grid = (_n_tiles(maxn, bn, cfg["TAIL_N"], packed), B * H) if split else (B * H,)
    align, strides = _align(sq, sk, sv, so, sdo, sdq, sdk, sdv, sa)
    _attn_bwd[grid](
        q, k, v, o, do, dq, dk, dv, acc, lse, delta, cu, *strides, *sl,
        H, N, scale * LOG2E, scale,
        HEAD_DIM=D, VARLEN=packed, ALIGN=align, BLOCK_D=bd, EVEN_D=bd == D, SPLIT=split, DQ_MODE=mode, **cfg,
    )
    if split:
        dq.copy_(acc.mul_(scale))
    return dq, dk, dv


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, cu_seqlens, max_seqlen, fwd_config, bwd_config):
        o, lse = attention_fwd(q, k, v, scale, cu_seqlens, max_seqlen, fwd_config)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.scale, ctx.max_seqlen, ctx.bwd_config = scale, max_seqlen, bwd_config
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, ctx.scale, cu_seqlens, ctx.max_seqlen, ctx.bwd_config)
        return dq, dk, dv, None, None, None, None, None


class _TritonAttentionQKV(torch.autograd.Function):
    """Attention on one packed qkv [B, N, 3, H, D] (timm's layout): the gradient comes back as one
    [B, N, 3, H, D] tensor written in place by the kernel, so no stack/permute copies follow."""

    @staticmethod
    def forward(ctx, qkv, scale, fwd_config, bwd_config):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o, lse = attention_fwd(q, k, v, scale, None, None, fwd_config)
        ctx.save_for_backward(qkv, o, lse)
        ctx.scale, ctx.bwd_config = scale, bwd_config
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, o, lse = ctx.saved_tensors
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
        grads = dqkv.permute(2, 0, 3, 1, 4).unbind(0)
        attention_bwd(do, q, k, v, o, lse, ctx.scale, None, None, ctx.bwd_config, out=grads)
        return dqkv, None, None, None


# torch.library custom ops: the default-config path. torch.compile (e.g. `block.compile()` in the
# engine) sees them as opaque ops with known output shapes instead of tracing into the launcher.


@torch.library.custom_op("vfm::attn_fwd", mutates_args=())
def _op_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cu_seqlens: Optional[torch.Tensor],
            max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_fwd(q, k, v, scale, cu_seqlens, max_seqlen or None)


@_op_fwd.register_fake
def _(q, k, v, scale, cu_seqlens, max_seqlen):
    if cu_seqlens is None:
        B, H, N, D = q.shape
        return q.new_empty(B, N, H, D).transpose(1, 2), q.new_empty((B, H, N), dtype=torch.float32)
    T, H, D = q.shape
    return q.new_empty(q.shape), q.new_empty((H, T), dtype=torch.float32)


@torch.library.custom_op("vfm::attn_bwd", mutates_args=())
def _op_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, scale: float, cu_seqlens: Optional[torch.Tensor],
            max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(do, q, k, v, o, lse, scale, cu_seqlens, max_seqlen or None)


@_op_bwd.register_fake
def _(do, q, k, v, o, lse, scale, cu_seqlens, max_seqlen):
    packed = cu_seqlens is not None
    return tuple(_empty_out(x, packed) for x in (q, k, v))


def _op_setup(ctx, inputs, output):
    q, k, v, scale, cu_seqlens, max_seqlen = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.scale, ctx.max_seqlen = scale, max_seqlen
    # the row LSE takes no gradient: without this autograd fills a zero [B, H, N] fp32 tensor for it every backward
    ctx.set_materialize_grads(False)


def _op_backward(ctx, do, dlse):
    if do is None:  # the output took no gradient (only the LSE was used)
        return None, None, None, None, None, None
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _op_bwd(do, q, k, v, o, lse, ctx.scale, cu_seqlens, ctx.max_seqlen)
    return dq, dk, dv, None, None, None


_op_fwd.register_autograd(_op_backward, setup_context=_op_setup)


def _qkv_views(qkv):
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


@torch.library.custom_op("vfm::attn_qkv_fwd", mutates_args=())
def _op_qkv_fwd(qkv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _qkv_views(qkv)
    return attention_fwd(q, k, v, scale)


@_op_qkv_fwd.register_fake
def _(qkv, scale):
    B, N, _, H, D = qkv.shape
    return qkv.new_empty(B, N, H, D).transpose(1, 2), qkv.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("vfm::attn_qkv_bwd", mutates_args=())
def _op_qkv_bwd(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    # one [B, N, 3, H, D] gradient written in place by the kernel: no stack/permute copies follow
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    q, k, v = _qkv_views(qkv)
    attention_bwd(do, q, k, v, o, lse, scale, out=_qkv_views(dqkv))
    return dqkv


@_op_qkv_bwd.register_fake
def _(do, qkv, o, lse, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _op_qkv_setup(ctx, inputs, output):
    qkv, scale = inputs
    ctx.save_for_backward(qkv, output[0], output[1])
    ctx.scale = scale
    ctx.set_materialize_grads(False)  # no zero-filled LSE gradient (as _op_setup)


def _op_qkv_backward(ctx, do, dlse):
    if do is None:
        return None, None
    qkv, o, lse = ctx.saved_tensors
    return _op_qkv_bwd(do, qkv, o, lse, ctx.scale), None


_op_qkv_fwd.register_autograd(_op_qkv_backward, setup_context=_op_qkv_setup)


def _group_spans(counts, lengths):
    """(first token, count, length) of each non-empty group of sequences packed end to end."""
    s = 0
    for c, n in zip(counts, lengths):
        if c * n:
            yield s, c, n
        s += c * n


def _group_view(x: torch.Tensor, s: int, c: int, n: int) -> torch.Tensor:
    """Tokens [s, s + c n) of a packed [T, ...] tensor as [c, n, ...] (a view: splitting one dim needs no copy)."""
    return x[s:s + c * n].view(c, n, *x.shape[1:])


def _group_lse(lse: torch.Tensor, s: int, c: int, n: int, H: int) -> torch.Tensor:
    """A group's rows of the grouped LSE buffer [T * H] as the dense [c, H, n] the kernels read and write."""
    return lse[s * H:(s + c * n) * H].view(c, H, n)


def _bhnd(x: torch.Tensor) -> torch.Tensor:
    """[c, n, H, D] -> [c, H, n, D] (a view)."""
    return x.transpose(1, 2)


def attention_groups_fwd(qkv, counts, lengths, scale):
    """(o [T, H, D], lse [T * H] fp32) for qkv [T, 3, H, D] packed as groups of equal-length sequences: one dense
    forward launch per group (its default config), writing into its slice of o and lse."""
    T, _, H, D = qkv.shape
    o = torch.empty(T, H, D, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(T * H, device=qkv.device, dtype=torch.float32)
    for s, c, n in _group_spans(counts, lengths):
        q, k, v = _qkv_views(_group_view(qkv, s, c, n))
        attention_fwd(q, k, v, scale, out=(_bhnd(_group_view(o, s, c, n)), _group_lse(lse, s, c, n, H)))
    return o, lse


def attention_groups_bwd(do, qkv, o, lse, counts, lengths, scale):
    """dqkv [T, 3, H, D] for attention_groups_fwd: one dense backward per group, writing into its slice of dqkv
    (tokens of no group, if any, get zeros)."""
    T, _, H, D = qkv.shape
    spans = list(_group_spans(counts, lengths))
    covered = sum(c * n for _, c, n in spans)
    dqkv = (torch.empty if covered == T else torch.zeros)(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    for s, c, n in spans:
        q, k, v = _qkv_views(_group_view(qkv, s, c, n))
        attention_bwd(_bhnd(_group_view(do, s, c, n)), q, k, v, _bhnd(_group_view(o, s, c, n)),
                      _group_lse(lse, s, c, n, H), scale, out=_qkv_views(_group_view(dqkv, s, c, n)))
    return dqkv


@torch.library.custom_op("vfm::attn_groups_fwd", mutates_args=())
def _op_groups_fwd(qkv: torch.Tensor, counts: list[int], lengths: list[int],
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_groups_fwd(qkv, counts, lengths, scale)


@_op_groups_fwd.register_fake
def _(qkv, counts, lengths, scale):
    T, _, H, D = qkv.shape
    return qkv.new_empty(T, H, D), qkv.new_empty(T * H, dtype=torch.float32)


@torch.library.custom_op("vfm::attn_groups_bwd", mutates_args=())
def _op_groups_bwd(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, counts: list[int],
                   lengths: list[int], scale: float) -> torch.Tensor:
    return attention_groups_bwd(do, qkv, o, lse, counts, lengths, scale)


@_op_groups_bwd.register_fake
def _(do, qkv, o, lse, counts, lengths, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _op_groups_setup(ctx, inputs, output):
    qkv, counts, lengths, scale = inputs
    ctx.save_for_backward(qkv, output[0], output[1])
    ctx.groups, ctx.scale = (counts, lengths), scale
    ctx.set_materialize_grads(False)  # no zero-filled LSE gradient (as _op_setup)


def _op_groups_backward(ctx, do, dlse):
    if do is None:
        return None, None, None, None
    qkv, o, lse = ctx.saved_tensors
    return _op_groups_bwd(do, qkv, o, lse, *ctx.groups, ctx.scale), None, None, None


_op_groups_fwd.register_autograd(_op_groups_backward, setup_context=_op_groups_setup)


def _attention_groups(qkv, seq_groups, scale, impl):
    """attention_qkv(qkv [T, 3, H, D], seq_groups=...): checks, then our grouped op or `impl` group by group."""
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"with seq_groups, qkv must be [T, 3, H, D]; got {tuple(qkv.shape)}")
    try:
        counts, lengths = [int(c) for c, _ in seq_groups], [int(n) for _, n in seq_groups]
    except (TypeError, ValueError):
        raise ValueError(f"seq_groups must be (count, length) pairs; got {seq_groups!r}") from None
    if any(c < 0 or n < 0 for c, n in zip(counts, lengths)):
        raise ValueError(f"seq_groups counts and lengths must be >= 0; got {seq_groups!r}")
    covered = sum(c * n for c, n in zip(counts, lengths))
    if covered != qkv.shape[0]:
        raise ValueError(f"seq_groups {seq_groups!r} cover {covered} tokens; qkv has {qkv.shape[0]}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if _triton_fits(qkv, max(lengths, default=0)) else "sdpa"
    if impl == "triton":
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        scale = qkv.shape[-1] ** -0.5 if scale is None else float(scale)
        return _op_groups_fwd(qkv, counts, lengths, scale)[0]
    H, D = qkv.shape[2:]
    outs = [_bhnd(attention(*_qkv_views(_group_view(qkv, s, c, n)), scale=scale, impl=impl)).reshape(c * n, H, D)
            for s, c, n in _group_spans(counts, lengths)]
    return torch.cat(outs) if outs else qkv.new_empty(0, H, D)


def attention_qkv(qkv, *, scale=None, impl="auto", fwd_config=None, bwd_config=None, seq_groups=None):
    """Attention on a packed qkv [B, N, 3, H, D] (timm's `qkv(x).reshape(B, N, 3, H, D)`); -> [B, H, N, D].

    With `seq_groups`, a list of (count, length) pairs: qkv is [T, 3, H, D], the tokens of `count` sequences of
    `length` tokens each, group after group (T = sum of count x length; DINOv2's crops packed end to end, each crop
    attending only to itself); -> [T, H, D]. Each group runs as one dense batch (views of qkv, no copies), so every
    group gets the kernels tuned for its length: at DINOv2's crops (2 x 261 + 8 x 54 tokens a sample) that is 2.2x
    faster on an H200 than one varlen launch over `cu_seqlens`, whose programs are shaped for the longest sequence
    (kernels/README.md)."""
    if seq_groups is not None:
        if fwd_config is not None or bwd_config is not None:
            raise ValueError("attention_qkv(seq_groups=...) takes no explicit block configs")
        return _attention_groups(qkv, seq_groups, scale, impl)
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be [B, N, 3, H, D]; got {tuple(qkv.shape)}")
    if impl == "auto":
        impl = "triton" if _triton_fits(qkv, qkv.shape[1]) else "sdpa"
    if impl != "triton":
        q, k, v = _qkv_views(qkv)
        return attention(q, k, v, scale=scale, impl=impl)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    scale = qkv.shape[-1] ** -0.5 if scale is None else float(scale)
    if fwd_config is None and bwd_config is None:
        return _op_qkv_fwd(qkv, scale)[0]
    return _TritonAttentionQKV.apply(qkv, scale, fwd_config, bwd_config)


def attention_triton(q, k, v, *, scale=None, cu_seqlens=None, max_seqlen=None, fwd_config=None, bwd_config=None):
    """Our kernels; explicit block configs (tests, tuning) go through a plain autograd.Function."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if cu_seqlens is not None and max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    if fwd_config is None and bwd_config is None:
        return _op_fwd(q, k, v, scale, cu_seqlens, int(max_seqlen or 0))[0]
    return _TritonAttention.apply(q, k, v, scale, cu_seqlens, max_seqlen, fwd_config, bwd_config)


# "auto" uses our kernel up to the longest sequence where it measured at least as fast as the best SDPA backend
# (H200, fwd+bwd; bench/results/kernels-nvidia-h200-2026-11-29-triton36-defaults-2.json under Triton 3.6,
# ...-triton38-defaults-2.json under 3.8): 1.67-1.68x at N = 50, 1.27 at 197 (1.63-1.67 for the MAE ViT-L decoder's
# d = 32), 1.46-1.47 at 257 / 261, 1.20-1.23 at d = 80 / 88, 1.01-1.04 at N = 1374 (parity); 0.54x at N = 4096 with
# d = 128, where cuDNN's backward is faster, so longer sequences go to SDPA. Until 2026-11-29 this was 128 (set when
# N = 197 ran 0.89x, before the two-pass backward), which sent the MAE decoder and DINOv2's N = 257 crops to SDPA.
AUTO_TRITON_MAX_SEQLEN = 1374


def _triton_fits(x: torch.Tensor, seqlen: int | None = None) -> bool:
    """What "auto" sends to our kernel: CUDA (or meta under triton_version.planning()), half/bfloat16/float32, head
    dim <= 128, sequences up to AUTO_TRITON_MAX_SEQLEN, a Triton the kernels were verified with
    (kernels/triton_version.py)."""
    return (triton_version.on_cuda(x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and x.shape[-1] <= 128 and (seqlen is None or seqlen <= AUTO_TRITON_MAX_SEQLEN)
            and triton_version.auto_ok())


def _xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        return False
    return True


def attention(q, k, v, *, scale=None, cu_seqlens=None, max_seqlen=None, impl="auto"):
    """Scaled-dot-product attention over [B, H, N, D] or packed [total, H, D] + cu_seqlens.

    impl: "triton" (our kernels), "sdpa" (torch's fused SDPA), "torch" (fp32 reference),
    "xformers" (memory_efficient_attention), "auto" = triton on CUDA for head dim <= 128 and
    N <= AUTO_TRITON_MAX_SEQLEN (where it measured at least as fast on the GPU), SDPA otherwise.
    Eagerly (no CUDA graphs) each fwd+bwd costs 0.6-1 ms of CPU against SDPA's 0.15-0.35 ms on an H200's host
    (kernels/README.md): a CPU-bound eager loop may be faster with "sdpa"; under torch.compile with CUDA graphs none
    of it is paid.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if cu_seqlens is None and q.dim() != 4:
        raise ValueError(f"q must be [B, H, N, D] (or packed [T, H, D] with cu_seqlens); got {tuple(q.shape)}")
    if cu_seqlens is not None and q.dim() != 3:
        raise ValueError(f"packed q must be [T, H, D]; got {tuple(q.shape)}")
    if impl == "auto":
        n = q.shape[2] if cu_seqlens is None else (max_seqlen or AUTO_TRITON_MAX_SEQLEN)
        impl = "triton" if _triton_fits(q, n) else "sdpa"
    if impl == "triton":
        return attention_triton(q, k, v, scale=scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    if impl == "sdpa":
        return attention_sdpa(q, k, v, scale=scale, cu_seqlens=cu_seqlens)
    if impl == "xformers":
        return attention_xformers(q, k, v, scale=scale, cu_seqlens=cu_seqlens)
    return attention_reference(q, k, v, scale=scale, cu_seqlens=cu_seqlens)


def attention_flops(batch_heads_n2: float, d: int, backward: bool = True) -> float:
    """FLOPs of attention for sum over sequences of H * N^2: fwd 4*N^2*D, bwd 2.5x that."""
    f = 4.0 * batch_heads_n2 * d
    return f * 3.5 if backward else f
