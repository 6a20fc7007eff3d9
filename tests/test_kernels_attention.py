"""kernels.attention: the Triton forward/backward under TRITON_INTERPRET=1 against the fp32 reference."""
import warnings

import pytest
import torch
import sys

from tests.kernel_helpers import interpreted_kernels, zero_fills

kernels = interpreted_kernels()
attn = sys.modules["kernels.attn"]

SMALL_FWD = dict(BLOCK_M=32, BLOCK_N=32, TAIL_M=16, TAIL_N=16, num_warps=4, num_stages=1)
FUSED_MULTI = dict(SPLIT=False, BLOCK_M=32, BLOCK_N=32, TAIL_M=16, TAIL_N=16, num_warps=4, num_stages=1)
SPLIT = dict(SPLIT=True, BLOCK_M=32, BLOCK_N=32, TAIL_M=16, TAIL_N=16, num_warps=4, num_stages=1)
# two-pass backward: dK/dV pass blocks at the top level, dQ pass blocks under "DQ" (or mirrored)
KV_Q = dict(SPLIT="kv+q", BLOCK_M=32, BLOCK_N=32, TAIL_M=16, TAIL_N=16, num_warps=4, num_stages=1,
            DQ=dict(BLOCK_M=32, BLOCK_N=64, TAIL_M=16, TAIL_N=32, num_warps=4, num_stages=1))
KV_Q_MIRRORED = dict(SPLIT="kv+q", BLOCK_M=16, BLOCK_N=32, TAIL_M=16, TAIL_N=16, num_warps=4, num_stages=1)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def run_both(q, k, v, **kw):
    fwd_config = kw.pop("fwd_config", None)
    bwd_config = kw.pop("bwd_config", None)
    out = attn.attention_triton(q, k, v, fwd_config=fwd_config, bwd_config=bwd_config, **kw)
    ref = kernels.attention_reference(q, k, v, **kw)
    do = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    return (out, *grads), (ref, *ref_grads)


def assert_close(got, want, tol=1e-5):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, name
        assert torch.isfinite(g).all(), name
        if w.abs().max() < 1e-6:  # e.g. dq, dk at N = 1: softmax over one key has no gradient
            assert g.abs().max() < 1e-5, name
        else:
            assert rel(g, w) < tol, (name, rel(g, w))


@pytest.mark.parametrize("n", [1, 50, 197, 257, 261])
@pytest.mark.parametrize("d", [32, 64, 88])
def test_dense_default_configs(n, d):
    q, k, v = (torch.randn(1, 2 if n <= 64 else 1, n, d, requires_grad=True) for _ in range(3))
    assert_close(*run_both(q, k, v))


@pytest.mark.parametrize("bwd", [FUSED_MULTI, SPLIT], ids=["fused-multiblock", "split-atomic"])
@pytest.mark.parametrize("n,d", [(50, 88), (197, 64), (70, 32)])
def test_dense_backward_layouts(bwd, n, d):
    q, k, v = (torch.randn(2, 1, n, d, requires_grad=True) for _ in range(3))
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD, bwd_config=bwd))


@pytest.mark.parametrize("n", [1, 50, 197, 257])
@pytest.mark.parametrize("d", [32, 64, 88])
def test_dense_kv_q_backward(n, d):
    # d = 32 rows live in a wider tensor: odd strides, so ALIGN = 1 (the others take ALIGN = 8)
    width = d + 3 if d == 32 else d
    q, k, v = (torch.randn(1, 2 if n <= 64 else 1, n, width, requires_grad=True)[..., :d] for _ in range(3))
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD, bwd_config=KV_Q))


@pytest.mark.parametrize("shape", sorted(attn.TUNED), ids=lambda s: f"tuned-n{s[0]}-d{s[1]}")
def test_tuned_configs(shape):
    """Every hand-kept TUNED config (register caps included) gives the reference result; each runs
    at N = 197 with the shape's head dim (N = 1374 is too slow for the interpreter), so every tail
    and full-tile path of its blocks is taken (with 4 heads where it groups tails: TAIL_G)."""
    fwd, bwd = attn.TUNED[shape]
    grouped = any(c.get("TAIL_G") for c in (fwd, bwd, bwd.get("DQ") or {}))  # 4 heads: their tail groups run
    q, k, v = (torch.randn(1, 4 if grouped else 1, 197, shape[1], requires_grad=True) for _ in range(3))
    assert_close(*run_both(q, k, v, fwd_config=fwd, bwd_config=bwd))


@pytest.mark.parametrize("shape", sorted(attn.TUNED_NEWER_TRITON), ids=lambda s: f"newer-n{s[0]}-d{s[1]}")
def test_newer_triton_configs(monkeypatch, shape):
    """TUNED_NEWER_TRITON: under Triton 3.7+ (NEWER_TRITON) the defaults take its configs where it has one and
    TUNED's elsewhere; under 3.6 TUNED's throughout. Each of its configs gives the reference result at N = 197."""
    n, d = shape
    newer = attn.TUNED_NEWER_TRITON[shape]
    for on in (True, False):
        monkeypatch.setattr(attn, "NEWER_TRITON", on)
        for i, (get, tuned) in enumerate(((attn._fwd_config, attn._fwd_tuned), (attn._bwd_config, attn._bwd_tuned))):
            want = newer[i] if on and newer[i] is not None else tuned(n, d)
            assert get(n, d) == attn._for_this_triton(want, d)
        for other in ((197, 64), (261, 64), (1374, 64), (50, 64)):  # shapes it does not list: unchanged
            assert attn._bwd_config(*other) == attn._for_this_triton(attn._bwd_tuned(*other), other[1])
    if shape == (257, 88):
        assert newer[1]["DQ"] != attn.TUNED[shape][1]["DQ"]  # d = 88: the dQ pass's blocks differ
    assert not any(c.get("TAIL_GS") for c in (newer[0] or {}, newer[1], newer[1].get("DQ") or {}))
    fwd = newer[0] or attn.TUNED[shape][0]
    q, k, v = (torch.randn(1, 1, 197, d, requires_grad=True) for _ in range(3))
    assert_close(*run_both(q, k, v, fwd_config=fwd, bwd_config=newer[1]))


def test_triton_version():
    from kernels.triton_version import parse

    assert parse("3.6.0") == (3, 6) and parse("3.8.0+git1a2b3c") == (3, 8)
    assert parse("3.10.1") == (3, 10) and parse("nightly") == (0, 0)


@pytest.mark.parametrize("version,ok", [((3, 5), False), ((3, 0), False), ((3, 6), True), ((3, 8), True)])
def test_auto_needs_a_verified_triton(monkeypatch, version, ok):
    """Under a Triton older than VERIFIED_FROM, "auto" (kernels' impl and the engine's model.kernels) runs the
    torch / SDPA paths and says so once; an explicit "triton" is left alone."""
    from types import SimpleNamespace

    from engine.models import use_triton
    from kernels import triton_version

    monkeypatch.setattr(triton_version, "TRITON", version)
    monkeypatch.setattr(triton_version, "_warned", False)
    cuda = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, shape=(2, 16, 197, 64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        picks = [attn._triton_fits(cuda, 197), triton_version.resolve("auto", cuda), use_triton("auto", "cuda")]
        use_triton("auto", "cuda")
    assert picks == ([True, "triton", True] if ok else [False, "torch", False])
    said = [w for w in caught if "verified with" in str(w.message)]
    assert len(said) == (0 if ok else 1) and (ok or "3.6" in str(said[0].message))
    assert use_triton("triton", "cuda") and triton_version.resolve("triton", cuda) == "triton"
    assert not use_triton("auto", "cpu")


@pytest.mark.parametrize("groups", [True, False])
def test_defaults_follow_the_triton_version(monkeypatch, groups):
    """POW2_TAIL_GROUPS (on under Triton < 3.7, where the TUNED tail groups were measured to win): the defaults are
    TUNED's as they are; off (Triton 3.8, where they lose at d = 32 / 64), the same configs without TAIL_G on any
    pass at power-of-two head dims, register caps and every other key kept; split head dims (d = 80) keep theirs."""
    monkeypatch.setattr(attn, "POW2_TAIL_GROUPS", groups)
    monkeypatch.setattr(attn, "TAIL_STEP_DEFAULTS", True)
    keys = lambda c: {k: v for k, v in c.items() if k not in ("TAIL_G", "TAIL_GW", "DQ")}
    for n, d in ((197, 64), (261, 64), (197, 32), (257, 64)):
        fwd, bwd = attn._fwd_config(n, d), attn._bwd_config(n, d)
        tf, tb = attn._fwd_tuned(n, d), attn._bwd_tuned(n, d)
        grouped = [c.get("TAIL_G") for c in (fwd, bwd, bwd.get("DQ") or {})]
        assert any(grouped) if groups else not any(grouped)
        assert keys(fwd) == keys(tf) and keys(bwd) == keys(tb) and keys(bwd["DQ"]) == keys(tb["DQ"])
        if groups:
            assert (fwd, bwd) == (tf, tb)
    assert attn._fwd_config(257, 80)["TAIL_G"] == 4 and attn._bwd_config(257, 80)["DQ"]["TAIL_G"] == 4
    assert attn._fwd_config(1374, 64) == attn.TUNED[(1374, 64)][0]  # nothing to drop


@pytest.mark.parametrize("newer", [False, True])
@pytest.mark.parametrize("on", [True, False])
def test_tail_step_defaults(monkeypatch, on, newer):
    """TAIL_STEP_DEFAULTS (on under every Triton: measured under 3.6 and 3.8): the d = 64 defaults up to
    TAIL_GROUP_MAX_N take the dK/dV pass's tail step first (not the dQ pass's, nor the forward's), the MAE decoder's
    (197, 32) loads its forward's first tail tile early, whether or not the Triton in use keeps the tail groups;
    off, no default carries either key on any pass, and nothing else changes."""
    assert attn.TAIL_STEP_DEFAULTS
    monkeypatch.setattr(attn, "NEWER_TRITON", newer)
    for knob in ("POW2_TAIL_GROUPS", "SPLIT_TAIL_GROUPS"):
        monkeypatch.setattr(attn, knob, not newer)
    monkeypatch.setattr(attn, "TAIL_STEP_DEFAULTS", on)
    keys = ("TAIL_PRE", "TAIL_FIRST")
    step = lambda c: [{k: x[k] for k in keys if k in x} for x in (c, c.get("DQ") or {})]
    rest = lambda c: {k: (rest(v) if k == "DQ" else v) for k, v in c.items() if k not in keys}
    for n, d in ((197, 64), (261, 64), (257, 64), (300, 64), (197, 32), (1374, 64), (257, 88)):
        fwd, bwd = attn._fwd_config(n, d), attn._bwd_config(n, d)
        monkeypatch.setattr(attn, "TAIL_STEP_DEFAULTS", True)
        assert rest(fwd) == rest(attn._fwd_config(n, d)) and rest(bwd) == rest(attn._bwd_config(n, d))
        if not newer:
            assert rest(fwd) == rest(attn._fwd_tuned(n, d)) and rest(bwd) == rest(attn._bwd_tuned(n, d))
        monkeypatch.setattr(attn, "TAIL_STEP_DEFAULTS", on)
        want_fwd = [{"TAIL_PRE": True} if on and (n, d) == (197, 32) else {}, {}]
        want_bwd = [{"TAIL_FIRST": True} if on and d == 64 and n <= attn.TAIL_GROUP_MAX_N else {}, {}]
        assert (step(fwd), step(bwd)) == (want_fwd, want_bwd), (n, d, newer)
        assert not newer or not any(c.get("TAIL_G") for c in (fwd, bwd, bwd.get("DQ") or {}) if d in (32, 64))


def test_grouped_tail_shared_order():
    """bench._shared_order, compiled offline for sm_90 (no GPU): the d = 64 forward's grouped tail has one resident Q
    tile, then pipelined K / V tiles, each with the head dim's columns fastest. Under Triton < 3.7 every one keeps a
    head's rows on consecutive lines; under 3.7+ (3.8 measured) some put the heads between the rows: the ldmatrix
    bank conflicts for which POW2_TAIL_GROUPS drops the tail groups there. Should a newer Triton keep the rows
    consecutive, this fails: re-time the tail groups under it (bench kernels --tune-tail-groups) and revisit
    POW2_TAIL_GROUPS."""
    import json
    import os
    import subprocess
    from pathlib import Path

    from kernels import triton_version

    env = dict(os.environ, TRITON_INTERPRET="0")  # compiled, not interpreted: in a process of its own
    out = subprocess.run([sys.executable, "-m", "bench._shared_order", "--json"], env=env, capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1], check=True)
    bufs = json.loads(out.stdout.strip().splitlines()[-1])["buffers"]
    assert bufs[0]["shape"] == [4, 16, 64] and len(bufs) >= 3
    assert all(b["shape"][1:] == [4, 16, 64] for b in bufs[1:]) and all(b["order"][0] == 2 for b in bufs)
    consecutive = [b["rows_consecutive"] for b in bufs]
    if triton_version.TRITON < (3, 7):
        assert all(consecutive) and attn.POW2_TAIL_GROUPS
    else:
        assert not all(consecutive) and not attn.POW2_TAIL_GROUPS


@pytest.mark.parametrize("newer", [False, True])
def test_split_tail_groups_follow_the_triton_version(monkeypatch, newer):
    """SPLIT_TAIL_GROUPS (on under Triton < 3.7, where split grouped tails were measured to win): under 3.6 the split
    head dims' defaults are TUNED's, split tails included; off (3.8, where they lose), no default carries TAIL_GS on
    any pass and the padded groups stay; under 3.8 the TUNED_NEWER_TRITON configs take over for those shapes."""
    monkeypatch.setattr(attn, "NEWER_TRITON", newer)
    monkeypatch.setattr(attn, "SPLIT_TAIL_GROUPS", not newer)
    gs = lambda c: [x.get("TAIL_GS", False) for x in (c, c.get("DQ") or {})]
    for shape in ((257, 88), (257, 80), (65, 88)):
        fwd, bwd = attn._fwd_config(*shape), attn._bwd_config(*shape)
        if newer:
            assert (fwd, bwd) == attn.TUNED_NEWER_TRITON[shape] and not any(gs(fwd) + gs(bwd))
        else:
            assert (fwd, bwd) == attn.TUNED[shape] and any(gs(fwd) + gs(bwd))
    monkeypatch.setattr(attn, "NEWER_TRITON", False)
    monkeypatch.setattr(attn, "SPLIT_TAIL_GROUPS", False)  # TUNED's configs with the split tails dropped
    fwd, bwd = attn._fwd_config(65, 88), attn._bwd_config(65, 88)
    assert not any(gs(fwd) + gs(bwd)) and fwd["TAIL_G"] == 2 and bwd["TAIL_G"] == bwd["DQ"]["TAIL_G"] == 4
    assert {k: v for k, v in fwd.items()} == {k: v for k, v in attn.TUNED[(65, 88)][0].items() if k != "TAIL_GS"}


def test_split_dims():
    """Which head dims the SPLIT_D knob splits: two power-of-two pieces narrower than one padded tile."""
    assert attn._split_dims(88) == (64, 32) and attn._split_dims(80) == (64, 16) and attn._split_dims(96) == (64, 32)
    assert attn._split_dims(72) == (64, 16) and attn._split_dims(48) == (32, 16) and attn._split_dims(40) == (32, 16)
    assert all(attn._split_dims(d) is None for d in (16, 32, 64, 128, 120, 112, 24))


@pytest.mark.parametrize("n", [1, 50, 197, 257])
@pytest.mark.parametrize("d", [88, 80, 48])
def test_split_head_dim(n, d):
    """SPLIT_D: the head dim in two pieces (d = 88 as 64 + 32 columns, 80 as 64 + 16, 48 as 32 + 16) in the
    forward and in both passes of the two-pass backward gives the reference result, full and tail tiles; the
    one-pass backward ignores the knob."""
    q, k, v = (torch.randn(1, 2 if n <= 64 else 1, n, d, requires_grad=True) for _ in range(3))
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD | {"SPLIT_D": True}, bwd_config=KV_Q | {"SPLIT_D": True}))
    if n == 50:
        assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD | {"SPLIT_D": True},
                               bwd_config=FUSED_MULTI | {"SPLIT_D": True}))


def test_split_head_dim_packed_and_qkv():
    """SPLIT_D with packed sequences of mixed lengths, and through timm's packed qkv (one gradient buffer)."""
    lens = [37, 1, 70, 16]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = (torch.randn(sum(lens), 2, 88, requires_grad=True) for _ in range(3))
    assert_close(*run_both(q, k, v, cu_seqlens=cu, fwd_config=SMALL_FWD | {"SPLIT_D": True},
                           bwd_config=KV_Q | {"SPLIT_D": True}))
    qkv = torch.randn(1, 45, 3, 2, 88, requires_grad=True)
    ref = kernels.attention_reference(*qkv.permute(2, 0, 3, 1, 4).unbind(0))
    do = torch.randn_like(ref)
    (gr,) = torch.autograd.grad(ref, qkv, do)
    out = kernels.attention_qkv(qkv, impl="triton", fwd_config=SMALL_FWD | {"SPLIT_D": True},
                                bwd_config=KV_Q | {"SPLIT_D": True})
    (g,) = torch.autograd.grad(out, qkv, do)
    assert rel(out, ref) < 1e-5 and rel(g, gr) < 1e-5


def test_warp_specialized_loops():
    """WS (Triton's warp specialization of the full-tile loops, a tuning knob) on the forward and on
    both passes of the two-pass backward gives the reference result."""
    q, k, v = (torch.randn(1, 2, 197, 64, requires_grad=True) for _ in range(3))
    bwd = KV_Q | {"WS": True, "DQ": KV_Q["DQ"] | {"WS": True}}
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD | {"WS": True}, bwd_config=bwd))


def _count_tma(monkeypatch):
    """Record, per _descs call, whether the launcher handed the kernels tensor descriptors (TMA on) or Nones."""
    seen, real = [], attn._descs

    def spy(*a, **kw):
        descs, on = real(*a, **kw)
        seen.append(on)
        return descs, on
    monkeypatch.setattr(attn, "_descs", spy)
    return seen


TMA_BWD = KV_Q | {"TMA": True, "DQ": KV_Q["DQ"] | {"TMA": True}}


@pytest.mark.parametrize("n,d", [(197, 64), (50, 32), (257, 88), (70, 80)])
def test_tma_loads(monkeypatch, n, d):
    """TMA (config key; tensor descriptors, whose out-of-range rows and columns read as zeros) on the forward and on
    each pass of the two-pass backward gives the reference result, with the head dim whole or in two pieces (the
    backward's second piece has descriptors of its own), and for timm's qkv strides; the descriptors are used."""
    seen = _count_tma(monkeypatch)
    q, k, v = (torch.randn(1, 2, n, d, requires_grad=True) for _ in range(3))
    split = attn._split_dims(d) is not None
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD | {"TMA": True, "SPLIT_D": split},
                           bwd_config=TMA_BWD | {"SPLIT_D": split}))
    # the forward takes TMA only with the head dim whole; both backward passes take it either way
    assert seen == [not split, True, True]
    seen.clear()
    qkv = torch.randn(1, n, 3, 2, d, requires_grad=True)
    assert_close(*run_both(*qkv.permute(2, 0, 3, 1, 4).unbind(0), fwd_config=SMALL_FWD | {"TMA": True},
                           bwd_config=TMA_BWD))
    assert seen == [True, True, True]
    seen.clear()
    # per pass: the top-level key drives the dK/dV pass, the DQ blocks' key the dQ pass (launch order: dQ first)
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD, bwd_config=KV_Q | {"TMA": True, "SPLIT_D": split}))
    assert seen == [False, False, True]


def test_tma_falls_back_where_descriptors_cannot_go(monkeypatch):
    """TMA is asked for but cannot be used: packed sequences, rows whose stride is not a multiple of 16 bytes. The
    pointer loads run instead, with the same result."""
    seen = _count_tma(monkeypatch)
    q, k, v = (torch.randn(1, 2, 70, 35, requires_grad=True)[..., :32] for _ in range(3))  # 140-byte rows
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD | {"TMA": True}, bwd_config=TMA_BWD))
    assert seen == [False, False, False]
    seen.clear()
    cu = torch.tensor([0, 37, 38, 108], dtype=torch.int32)
    q, k, v = (torch.randn(108, 2, 64, requires_grad=True) for _ in range(3))
    assert_close(*run_both(q, k, v, cu_seqlens=cu, fwd_config=SMALL_FWD | {"TMA": True}, bwd_config=TMA_BWD))
    assert not any(seen)



def _lean_used(monkeypatch):
    """Record the LEAN constexpr of every forward launch."""
    seen, real = [], attn._attn_fwd

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                seen.append(kw["LEAN"])
                return real[grid](*a, **kw)
            return launch
    monkeypatch.setattr(attn, "_attn_fwd", Spy())
    return seen


@pytest.mark.parametrize("n,d,extra", [(197, 64, {}), (50, 32, {}), (70, 88, {"SPLIT_D": True}),
                                       (197, 64, {"TAIL_G": 4}), (1, 64, {})])
def test_lean_forward(monkeypatch, n, d, extra):
    """LEAN (config key; FWD_LEAN the default): the row max of the raw scores, the scale folded into exp2's argument,
    the output normalised by a reciprocal. The reference result with full blocks and a 5-row tail, a sequence shorter
    than a block, a split head dim, tail groups, one token, packed sequences; a negative scale (the max of the raw
    scores is then the min of the scaled ones) runs the plain softmax instead."""
    seen = _lean_used(monkeypatch)
    q, k, v = (torch.randn(1, 4, n, d, requires_grad=True) for _ in range(3))
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD | extra | {"LEAN": True}, bwd_config=KV_Q))
    assert_close(*run_both(q, k, v, scale=-0.3, fwd_config=SMALL_FWD | extra | {"LEAN": True}, bwd_config=KV_Q))
    assert seen == [True, False]
    cu = torch.tensor([0, 37, 38, 108], dtype=torch.int32)
    qp, kp, vp = (torch.randn(108, 2, d, requires_grad=True) for _ in range(3))
    assert_close(*run_both(qp, kp, vp, cu_seqlens=cu, fwd_config=SMALL_FWD | extra | {"LEAN": True},
                           bwd_config=KV_Q))
    assert seen == [True, False, True]
    for default in (False, True):  # without the key: FWD_LEAN
        monkeypatch.setattr(attn, "FWD_LEAN", default)
        assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD | extra, bwd_config=KV_Q))
        assert seen[-1] == default

def _tail_groups_used(monkeypatch):
    """Record, per pass launched (forward, dQ, dK/dV), how many heads share a tail program (1: no groups)."""
    seen, real = [], attn._tail_group

    def spy(*a, **kw):
        group = real(*a, **kw)
        seen.append(group.get("TAIL_G", 1))
        return group
    monkeypatch.setattr(attn, "_tail_group", spy)
    return seen


TAIL_G_BWD = KV_Q | {"TAIL_G": 4, "DQ": KV_Q["DQ"] | {"TAIL_G": 4}}


@pytest.mark.parametrize("n,d,heads", [(197, 64, 4), (37, 32, 6), (21, 88, 4), (261, 64, 3), (50, 32, 8)])
def test_tail_groups(monkeypatch, n, d, heads):
    """TAIL_G (config key): the rows past the last full block of G heads in one program, on the forward and on each
    pass of the two-pass backward, give the reference result: tails of 5 rows, sequences shorter than a block (all
    tail tiles), padded head dims; G is cut to the largest power of two dividing B x H (6 heads: 2; 3: no groups)."""
    seen = _tail_groups_used(monkeypatch)
    q, k, v = (torch.randn(2 if heads == 3 else 1, heads, n, d, requires_grad=True) for _ in range(3))
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD | {"TAIL_G": 4}, bwd_config=TAIL_G_BWD))
    bh = q.shape[0] * heads
    assert seen == [4 if bh % 4 == 0 else 2 if bh % 2 == 0 else 1] * 3
    seen.clear()
    # per pass: the forward's own key, the top-level key for the dK/dV pass, the DQ blocks' key for the dQ pass
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD, bwd_config=KV_Q | {"TAIL_G": 2}))
    assert seen == [1, 1, 2]  # launch order: forward, dQ pass, dK/dV pass
    seen.clear()
    # timm's packed qkv: batch, head and row strides of one [B, N, 3, H, D] buffer (the engine's layout)
    qkv = torch.randn(q.shape[0], n, 3, heads, d, requires_grad=True)
    assert_close(*run_both(*qkv.permute(2, 0, 3, 1, 4).unbind(0), fwd_config=SMALL_FWD | {"TAIL_G": 4},
                           bwd_config=TAIL_G_BWD))
    assert len(seen) == 3 and seen[0] > 1


def test_tail_groups_fall_back_where_they_cannot_go(monkeypatch):
    """TAIL_G is asked for but the tails cannot be grouped: packed sequences (their tails differ), a length with no
    tail rows, an odd B x H. One tail program per head runs, with the same result."""
    seen = _tail_groups_used(monkeypatch)
    cu = torch.tensor([0, 37, 38, 108], dtype=torch.int32)
    q, k, v = (torch.randn(108, 4, 64, requires_grad=True) for _ in range(3))
    assert_close(*run_both(q, k, v, cu_seqlens=cu, fwd_config=SMALL_FWD | {"TAIL_G": 4}, bwd_config=TAIL_G_BWD))
    q, k, v = (torch.randn(1, 4, 64, 32, requires_grad=True) for _ in range(3))
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD | {"TAIL_G": 4}, bwd_config=TAIL_G_BWD))
    q, k, v = (torch.randn(1, 3, 40, 32, requires_grad=True) for _ in range(3))
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD | {"TAIL_G": 4}, bwd_config=TAIL_G_BWD))
    assert seen == [1] * 9


def test_tail_groups_with_a_split_head_dim(monkeypatch):
    """Where the full blocks hold the head dim in two pieces (SPLIT_D: d = 88 as 64 + 32, 80 as 64 + 16), the grouped
    tail holds it whole, padded (128 columns): the same result on the forward and both backward passes."""
    seen = _tail_groups_used(monkeypatch)
    for n, d in ((70, 88), (37, 80)):
        q, k, v = (torch.randn(1, 4, n, d, requires_grad=True) for _ in range(3))
        assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD | {"TAIL_G": 4, "SPLIT_D": True},
                               bwd_config=TAIL_G_BWD | {"SPLIT_D": True}))
    assert seen == [4] * 6


def _tail_group_pieces(monkeypatch):
    """Record, per pass launched, the grouped tail's head-dim columns (TAIL_GD, TAIL_GD2; () without groups)."""
    seen, real = [], attn._tail_group

    def spy(*a, **kw):
        group = real(*a, **kw)
        seen.append((group["TAIL_GD"], group.get("TAIL_GD2", 0)) if group else ())
        return group
    monkeypatch.setattr(attn, "_tail_group", spy)
    return seen


@pytest.mark.parametrize("n,d,heads", [(70, 88, 4), (37, 80, 4), (65, 88, 8), (21, 88, 2)])
def test_split_grouped_tails(monkeypatch, n, d, heads):
    """TAIL_GS (config key): where the full blocks split the head dim (SPLIT_D), the grouped tail splits it alike
    (d = 88: 64 + 32 columns, not 128; d = 80: 64 + 16) on the forward and on each backward pass: the reference
    result, tails of 6 / 5 / 1 rows and a sequence shorter than a block (all tail tiles); per pass as TAIL_G."""
    seen = _tail_group_pieces(monkeypatch)
    q, k, v = (torch.randn(1, heads, n, d, requires_grad=True) for _ in range(3))
    gs = {"TAIL_G": 4, "SPLIT_D": True, "TAIL_GS": True}
    bwd = KV_Q | gs | {"DQ": KV_Q["DQ"] | {"TAIL_G": 4, "TAIL_GS": True}}
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD | gs, bwd_config=bwd))
    assert seen == [(64, _pow2_split(d))] * 3
    seen.clear()
    # the split tail on the dQ pass only; the dK/dV pass's grouped tail padded; the forward's per head
    bwd = KV_Q | {"SPLIT_D": True, "TAIL_G": 4, "DQ": KV_Q["DQ"] | {"TAIL_G": 4, "TAIL_GS": True}}
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD | {"SPLIT_D": True}, bwd_config=bwd))
    assert seen == [(), (64, _pow2_split(d)), (128, 0)]


def _pow2_split(d):
    return attn._split_dims(d)[1]


@pytest.mark.parametrize("knob", ["TAIL_PRE", "TAIL_FIRST"])
@pytest.mark.parametrize("n,d,heads", [(197, 64, 2), (100, 32, 2), (21, 88, 2), (1, 64, 1)])
def test_tail_steps(knob, n, d, heads):
    """TAIL_PRE (each walk's first tail tile loaded before the full-tile loop) and TAIL_FIRST (its tail steps taken
    before the loop), config keys, on the forward and on each pass of the two-pass backward: the reference result
    with one tail step (197 = 6 x 32 + 5), several (100 = 64 + 36 walks two 32-key tail steps in the dQ pass), a
    sequence shorter than a block (all tail) and N = 1; dense, with tail groups beside it, and packed."""
    on = {knob: True}
    bwd = KV_Q | on | {"DQ": KV_Q["DQ"] | on}
    q, k, v = (torch.randn(1, heads, n, d, requires_grad=True) for _ in range(3))
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD | on, bwd_config=bwd))
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD | on | {"TAIL_G": 2}, bwd_config=bwd | {"TAIL_G": 2}))
    cu = torch.tensor([0, n, n + 37], dtype=torch.int32)
    q, k, v = (torch.randn(n + 37, heads, d, requires_grad=True) for _ in range(3))
    assert_close(*run_both(q, k, v, cu_seqlens=cu, fwd_config=SMALL_FWD | on, bwd_config=bwd))


def test_split_grouped_tail_needs_a_split_head_dim(monkeypatch):
    """TAIL_GS without SPLIT_D (or at a head dim that does not split) pads the grouped tail as before."""
    seen = _tail_group_pieces(monkeypatch)
    q, k, v = (torch.randn(1, 4, 70, 88, requires_grad=True) for _ in range(3))
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD | {"TAIL_G": 4, "TAIL_GS": True},
                           bwd_config=KV_Q | {"TAIL_G": 4, "TAIL_GS": True}))
    q, k, v = (torch.randn(1, 4, 37, 64, requires_grad=True) for _ in range(3))
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD | {"TAIL_G": 4, "TAIL_GS": True, "SPLIT_D": True},
                           bwd_config=KV_Q | {"TAIL_G": 4, "TAIL_GS": True, "SPLIT_D": True}))
    assert seen == [(128, 0), (), (128, 0), (64, 0), (), (64, 0)]
    assert attn._tail_group({"TAIL_G": 4, "TAIL_GS": True}, 257, 128, 64, 16, False, 88, True) == {
        "TAIL_G": 4, "TAIL_GW": 16, "TAIL_GD": 64, "TAIL_GD2": 32}
    assert attn._tail_group({"TAIL_G": 4, "TAIL_GS": True}, 256, 128, 64, 16, False, 88, True) == {}


def test_tail_group_launch_geometry():
    """_tail_group / _grid: G heads' full blocks, then their tail tiles, in one grid column per group; the grouped
    tail's walk step defaults to the full walk's bytes (walk / G rows, at least 16)."""
    cfg = {"TAIL_G": 4}
    assert attn._tail_group(cfg, 197, 64, 64, 32, False, 64) == {"TAIL_G": 4, "TAIL_GW": 16, "TAIL_GD": 64}
    assert "TAIL_G" not in cfg  # popped: the launcher passes the result instead
    assert attn._tail_group({"TAIL_G": 8, "TAIL_GW": 32}, 197, 64, 64, 24, False, 64) == {
        "TAIL_G": 8, "TAIL_GW": 32, "TAIL_GD": 64}
    assert attn._tail_group({"TAIL_G": 4}, 197, 64, 32, 6, False, 32)["TAIL_G"] == 2
    assert attn._tail_group({"TAIL_G": 3}, 197, 64, 128, 12, False, 64)["TAIL_GW"] == 64  # G = 2
    assert attn._tail_group({"TAIL_G": 4}, 257, 128, 64, 16, False, 88)["TAIL_GD"] == 128  # the tail pads d = 88
    assert attn._tail_group({"TAIL_G": 4}, 256, 64, 64, 32, False, 64) == {}  # no tail rows
    assert attn._tail_group({"TAIL_G": 4}, 197, 64, 64, 32, True, 64) == {}  # packed
    assert attn._tail_group({}, 197, 64, 64, 32, False, 64) == {}
    # N = 197 in 64-row blocks, 16-row tails, 2048 heads: 3 full blocks per head, then 1 tail tile per group of 4
    assert attn._grid(197, 64, 16, False, 2048, {"TAIL_G": 4}) == (3 * 4 + 1, 512)
    assert attn._grid(197, 64, 16, False, 2048, {}) == (4, 2048)
    assert attn._grid(50, 32, 16, False, 8, {"TAIL_G": 8}) == (8 + 2, 1)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf/NaN in padded-key rows that are never stored
def test_kv_q_backward_very_negative_scores():
    # every score far below 0 (log2 units < -128): a padded key's p = exp2(0 - lse) overflows; dQ must mask it
    q, k, v = (torch.randn(1, 1, 50, 32) for _ in range(3))
    q, k = (q * 0.1 + 4.5).requires_grad_(), (k * 0.1 - 4.5).requires_grad_()  # scores ~ -165
    v.requires_grad_()
    assert_close(*run_both(q, k, v, fwd_config=SMALL_FWD, bwd_config=KV_Q), tol=1e-3)  # fp32 rounding


def test_qkv_kv_q_backward(monkeypatch):
    # timm's packed qkv: one [B, N, 3, H, D] gradient written by both passes, through the explicit-config
    # autograd.Function and through the default-config custom op (vfm::attn_qkv_bwd)
    B, N, H, D = 1, 70, 2, 88
    qkv = torch.randn(B, N, 3, H, D, requires_grad=True)
    ref = kernels.attention_reference(*qkv.permute(2, 0, 3, 1, 4).unbind(0))
    do = torch.randn_like(ref)
    (gr,) = torch.autograd.grad(ref, qkv, do)
    out = kernels.attention_qkv(qkv, impl="triton", fwd_config=SMALL_FWD, bwd_config=KV_Q)
    (g,) = torch.autograd.grad(out, qkv, do)
    assert rel(out, ref) < 1e-5 and rel(g, gr) < 1e-5
    monkeypatch.setattr(attn, "_bwd_config", lambda n, d: KV_Q_MIRRORED)
    out = kernels.attention_qkv(qkv, impl="triton")
    (g,) = torch.autograd.grad(out, qkv, do)
    assert rel(out, ref) < 1e-5 and rel(g, gr) < 1e-5


def test_backward_fills_no_zero_lse_gradient():
    """The forward ops return the row LSE beside the output; it takes no gradient, and the backward must not have
    autograd fill a zero [B, H, N] tensor for it (a kernel every layer, every step): dense, packed-qkv and packed
    sequences."""
    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    qkv = torch.randn(1, 20, 3, 2, 16, requires_grad=True)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    qp, kp, vp = (torch.randn(20, 2, 16, requires_grad=True) for _ in range(3))
    cases = [(kernels.attention(q, k, v, impl="triton"), (q, k, v)),
             (kernels.attention_qkv(qkv, impl="triton"), (qkv,)),
             (kernels.attention(qp, kp, vp, cu_seqlens=cu, max_seqlen=13, impl="triton"), (qp, kp, vp))]
    for out, inputs in cases:
        assert zero_fills(lambda: torch.autograd.grad(out, inputs, torch.randn_like(out))) == []


def test_timm_layout_and_scale():
    # timm hands q, k, v as strided views of one qkv tensor [B, N, 3, H, D]
    B, N, H, D = 2, 37, 3, 32
    qkv = torch.randn(B, N, 3, H, D, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = kernels.attention(q, k, v, scale=0.3, impl="triton")
    ref = kernels.attention_reference(q, k, v, scale=0.3)
    do = torch.randn_like(ref)
    (g,) = torch.autograd.grad(out, qkv, do)
    (gr,) = torch.autograd.grad(ref, qkv, do)
    assert rel(out, ref) < 1e-5 and rel(g, gr) < 1e-5
    # the output is laid out [B, N, H, D] so that timm's transpose + reshape is free
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("bwd", [None, FUSED_MULTI, SPLIT, KV_Q, KV_Q_MIRRORED],
                         ids=["default", "fused-multiblock", "split-atomic", "kv+q", "kv+q-mirrored"])
@pytest.mark.parametrize("d", [64, 88])
def test_packed_mixed_lengths(bwd, d):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    lens = [int(x) for x in torch.randint(1, 70, (3,), generator=g)] + [1, 57]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    T, H = sum(lens), 1
    q, k, v = (torch.randn(T, H, d, requires_grad=True) for _ in range(3))
    got, want = run_both(q, k, v, cu_seqlens=cu, fwd_config=SMALL_FWD if bwd else None, bwd_config=bwd)
    assert_close(got, want)
    # packing is block-diagonal: each sequence alone gives the same answer
    s = 1
    lo, hi = cu[s].item(), cu[s + 1].item()
    alone = kernels.attention_reference(q[lo:hi].transpose(0, 1)[None], k[lo:hi].transpose(0, 1)[None],
                                        v[lo:hi].transpose(0, 1)[None])[0].transpose(0, 1)
    assert rel(got[0][lo:hi], alone) < 1e-5


def _per_sequence_reference(qkv, groups):
    """attention_qkv(qkv [T, 3, H, D], seq_groups=groups) sequence by sequence through the fp32 reference."""
    outs, s = [], 0
    for c, n in groups:
        for _ in range(c):
            q, k, v = (x.transpose(0, 1)[None] for x in qkv[s:s + n].unbind(1))
            outs.append(kernels.attention_reference(q, k, v)[0].transpose(0, 1))
            s += n
    return torch.cat(outs)


@pytest.mark.parametrize("d", [32, 64, 88])
def test_seq_groups_match_the_reference(d):
    """DINOv2's packing as groups of equal-length sequences (a dense launch per group, writing into slices of one
    output and one gradient): every token as its own sequence's attention, gradients included; empty groups and
    one-token sequences too."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    n1, n2 = (int(x) for x in torch.randint(2, 70, (2,), generator=g))
    groups = [(2, n1), (0, 9), (3, n2), (1, 1)]
    T, H = sum(c * n for c, n in groups), 2
    qkv = torch.randn(T, 3, H, d, requires_grad=True)
    out = kernels.attention_qkv(qkv, seq_groups=groups, impl="triton")
    ref = _per_sequence_reference(qkv, groups)
    assert out.shape == (T, H, d)
    do = torch.randn_like(ref)
    (grad,), (ref_grad,) = torch.autograd.grad(out, qkv, do), torch.autograd.grad(ref, qkv, do)
    assert rel(out, ref) < 1e-5 and rel(grad, ref_grad) < 1e-5, (rel(out, ref), rel(grad, ref_grad))
    for impl in ("sdpa", "torch"):
        assert rel(kernels.attention_qkv(qkv, seq_groups=groups, impl=impl), ref) < 1e-5, impl


def test_seq_groups_take_a_strided_qkv_and_check_their_input():
    qkv = torch.randn(2 * 5 + 7, 4, 2, 16)[:, 1:].requires_grad_()  # a view: [T, 3, H, D] inside a bigger buffer
    groups = [(2, 5), (1, 7)]
    out = kernels.attention_qkv(qkv, seq_groups=groups, scale=0.3, impl="triton")
    ref = kernels.attention_qkv(qkv, seq_groups=groups, scale=0.3, impl="torch")
    assert rel(out, ref) < 1e-5
    (grad,), (ref_grad,) = torch.autograd.grad(out.sum(), qkv), torch.autograd.grad(ref.sum(), qkv)
    assert rel(grad, ref_grad) < 1e-5
    with pytest.raises(ValueError, match="cover 16 tokens"):
        kernels.attention_qkv(qkv, seq_groups=[(2, 8)])
    with pytest.raises(ValueError, match=r"\[T, 3, H, D\]"):
        kernels.attention_qkv(qkv[None], seq_groups=groups)
    with pytest.raises(ValueError, match=">= 0"):
        kernels.attention_qkv(qkv, seq_groups=[(3, 5), (-1, 5), (1, 7)])
    with pytest.raises(ValueError, match="pairs"):
        kernels.attention_qkv(qkv, seq_groups=[17])
    with pytest.raises(ValueError, match="no explicit block configs"):
        kernels.attention_qkv(qkv, seq_groups=groups, fwd_config=SMALL_FWD)


def test_packed_sdpa_matches_reference():
    lens = [5, 9, 5, 3]
    cu = torch.tensor([0, 5, 14, 19, 22], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lens), 2, 16) for _ in range(3))
    a = kernels.attention(q, k, v, cu_seqlens=cu, impl="sdpa")
    b = kernels.attention(q, k, v, cu_seqlens=cu, impl="torch")
    assert rel(a, b) < 1e-5


def test_dispatch():
    q, k, v = (torch.randn(1, 2, 10, 16) for _ in range(3))
    ref = kernels.attention_reference(q, k, v)
    for impl in ("auto", "sdpa", "torch", "triton"):
        assert rel(kernels.attention(q, k, v, impl=impl), ref) < 1e-5, impl
    with pytest.raises(ValueError):
        kernels.attention(q, k, v, impl="cuda-magic")
    with pytest.raises(ValueError):
        kernels.attention(q[0], k[0], v[0])


def test_auto_takes_our_kernel_where_it_measured_at_least_as_fast():
    """"auto" sends CUDA tensors to our kernel up to AUTO_TRITON_MAX_SEQLEN tokens (N = 50 ... 1374 measured >= 1.0x
    the best SDPA backend on an H200) and head dims up to 128, SDPA beyond; CPU tensors never."""
    from types import SimpleNamespace

    cuda = lambda n, d=64, dtype=torch.bfloat16: SimpleNamespace(is_cuda=True, dtype=dtype, shape=(2, 16, n, d))
    assert all(attn._triton_fits(cuda(n), n) for n in (50, 197, 257, 261, 1374))
    assert attn._triton_fits(cuda(257, 88), 257) and attn._triton_fits(cuda(197, 32), 197)
    assert not attn._triton_fits(cuda(1375), 1375) and not attn._triton_fits(cuda(4096, 128), 4096)
    assert not attn._triton_fits(cuda(197, 160), 197) and not attn._triton_fits(cuda(197, dtype=torch.float64), 197)
    assert not attn._triton_fits(torch.randn(1, 2, 197, 64), 197)


def test_flops():
    assert kernels.attention_flops(2 * 3 * 10**2, 64, backward=False) == 4 * 600 * 64
    assert kernels.attention_flops(1, 1) == 14


def test_custom_ops_pass_opcheck():
    # schema, fake-tensor shapes/strides, autograd registration: what torch.compile relies on
    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    qkv = torch.randn(1, 20, 3, 2, 16, requires_grad=True)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    qp, kp, vp = (torch.randn(20, 2, 16, requires_grad=True) for _ in range(3))
    qkvp = torch.randn(20, 3, 2, 16, requires_grad=True)
    for op, args in [(attn._op_fwd, (q, k, v, 0.25, None, 0)), (attn._op_qkv_fwd, (qkv, 0.25)),
                     (attn._op_fwd, (qp, kp, vp, 0.25, cu, 13)), (attn._op_groups_fwd, (qkvp, [1, 1], [7, 13], 0.25))]:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result


def test_torch_compile_sees_one_graph():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    q, k, v = (torch.randn(2, 2, 40, 32, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return (kernels.attention(q * 1.5, k, v, impl="triton") * 2).sum()

    got = torch.compile(f, backend="aot_eager")(q, k, v)
    g = torch.autograd.grad(got, (q, k, v))
    want = (kernels.attention_reference(q * 1.5, k, v) * 2).sum()
    gr = torch.autograd.grad(want, (q, k, v))
    assert abs(got.item() - want.item()) < 1e-4 * abs(want.item()) + 1e-4
    assert all(rel(a, b) < 1e-5 for a, b in zip(g, gr))
    assert not torch._dynamo.utils.counters["graph_break"]


def test_probe_attn_smoke(capsys):
    """bench/_probe_attn.py (the Nsight Compute target) on CPU: ours at each named shape (B = H = 1) runs the forward
    and both backward passes and prints the dQ norm; an unknown shape is refused by argparse."""
    from bench import _probe_attn

    assert _probe_attn.main(["--device", "cpu", "--shapes", "mae-l-enc-n50-d64,mae-g-enc-n65-d88",
                             "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [l.split(":")[0] for l in lines] == ["mae-l-enc-n50-d64 ours", "mae-g-enc-n65-d88 ours"]
    assert all(0 < float(l.rsplit(" ", 1)[1]) < float("inf") for l in lines)
    with pytest.raises(SystemExit):
        _probe_attn.main(["--device", "cpu", "--shapes", "no-such-shape"])


def test_ensure_context_makes_one_current_once_per_thread(monkeypatch):
    """kernels/cuda_context.ensure_context against a stand-in driver: a thread without a current context gets the
    device's primary one; a second call in that thread asks nothing; a thread that has one is left as it is; a failing
    driver call raises; without libcuda it does nothing."""
    import ctypes
    import threading

    from kernels import cuda_context as cc

    calls = []

    class Driver:
        current = None

        def cuCtxGetCurrent(self, ref):
            calls.append("get")
            ref._obj.value = self.current
            return 0

        def cuDeviceGet(self, ref, ordinal):
            calls.append(("device", ordinal))
            ref._obj.value = 10 + ordinal
            return 0

        def cuDevicePrimaryCtxRetain(self, ref, dev):
            calls.append(("retain", dev.value))
            ref._obj.value = 1234
            return 0

        def cuCtxSetCurrent(self, ctx):
            calls.append(("set", ctx.value))
            self.current = ctx.value
            return 0

    driver = Driver()
    monkeypatch.setattr(cc, "_LIBCUDA", driver)
    monkeypatch.setattr(cc, "_THREAD", threading.local())
    cc.ensure_context(1)
    assert calls == ["get", ("device", 1), ("retain", 11), ("set", 1234)]
    cc.ensure_context(1)
    assert len(calls) == 4
    other = threading.Thread(target=cc.ensure_context, args=(1,))
    other.start()
    other.join()
    assert calls[4:] == ["get"]  # the (stand-in's) context is current there: nothing set
    driver.current = None
    driver.cuCtxSetCurrent = lambda ctx: 201  # CUDA_ERROR_INVALID_CONTEXT
    with pytest.raises(RuntimeError, match="device 2"):
        cc.ensure_context(2)

    def no_driver(name):
        raise OSError(name)

    monkeypatch.setattr(cc, "_LIBCUDA", None)
    monkeypatch.setattr(ctypes, "CDLL", no_driver)
    cc.ensure_context(3)
    assert cc._LIBCUDA is False


# the backward kernels loaded in the main thread (attention_bwd called directly), then run by autograd's thread
_THREAD_CASE = r"""
import torch
import kernels
from kernels import attn as A

torch.manual_seed(0)
B, H, N, D = 4, 16, 197, 64
qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
g = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
q, k, v = qkv.detach().permute(2, 0, 3, 1, 4).unbind(0)
o, lse = A.attention_fwd(q, k, v, D ** -0.5)
direct = A.attention_bwd(g, q, k, v, o, lse, D ** -0.5)
kernels.attention_qkv(qkv, impl="triton").backward(g)
assert all(torch.equal(a, b) for a, b in zip(qkv.grad.permute(2, 0, 3, 1, 4).unbind(0), direct))
print("OK")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled kernels, TMA on Hopper)")
def test_tma_descriptors_from_autograds_thread_on_gpu():
    """Host tensor descriptors built in autograd's backward thread after the kernel was loaded in the main thread:
    Triton encodes them before its launcher makes a CUDA context current, which failed there with "invalid device
    context" (H200, Triton 3.6) until kernels/cuda_context.py made one current. Compiled kernels and a fresh
    autograd thread: a subprocess without the interpreter. (A d = 32 forward recomputed under
    activation checkpointing did not fail without the fix: checkpointing's RNG-state calls make a context current.)"""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([sys.executable, "-c", _THREAD_CASE], env=env, cwd=root, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]
