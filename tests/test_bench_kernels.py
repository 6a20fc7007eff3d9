"""bench kernels' variant sweeps (--tune-regs, --tune-ws, --tune-split, --tune-tma, --tune-tail-groups,
--tune-lean, --tune-blocks, --tune-occupancy, --tune-tail-step): the variants it times are the shape's current configs
with only the knob swept changed; the MAE variants (--mae-variants) set and restore their settings."""
import itertools

import pytest

from bench.kernels import REG_CAPS, register_variants, ws_variants
from kernels import attn


def _without_cap(cfg):
    return {k: v for k, v in cfg.items() if k != "maxnreg"}


def test_register_variants_of_the_two_pass_backward():
    fwds, bwds = register_variants(1374, 64)
    base_fwd, base_bwd = attn._fwd_config(1374, 64), attn._bwd_config(1374, 64)
    assert [f.get("maxnreg") for f in fwds] == list(REG_CAPS)
    assert all(_without_cap(f) == _without_cap(base_fwd) for f in fwds)
    # every (dK/dV cap, dQ cap) pair once, blocks untouched on both passes
    assert sorted(((b.get("maxnreg") or 0), (b["DQ"].get("maxnreg") or 0)) for b in bwds) == sorted(
        ((a or 0), (c or 0)) for a, c in itertools.product(REG_CAPS, REG_CAPS))
    for b in bwds:
        assert _without_cap({k: v for k, v in b.items() if k != "DQ"}) == _without_cap(
            {k: v for k, v in base_bwd.items() if k != "DQ"})
        assert _without_cap(b["DQ"]) == _without_cap(attn._kv_q_dq_config(base_bwd))


def test_register_variants_of_the_one_pass_backward():
    fwds, bwds = register_variants(50, 64)  # one key tile: the fused single-pass backward
    assert [b.get("maxnreg") for b in bwds] == list(REG_CAPS)
    assert all(b["SPLIT"] is False and "DQ" not in b for b in bwds)
    assert len(fwds) == len(REG_CAPS)


def test_ws_variants():
    fwds, bwds = ws_variants(197, 64)  # two-pass backward: WS off/on on each pass
    assert [f["WS"] for f in fwds] == [False, True]
    assert sorted((b["WS"], b["DQ"]["WS"]) for b in bwds) == [(False, False), (False, True), (True, False),
                                                            (True, True)]
    fwds, bwds = ws_variants(50, 64)  # the one-pass backward has no such knob: only its own config
    assert bwds == [attn._bwd_config(50, 64)]


def test_mae_variant_combinations_set_and_restore(monkeypatch):
    """--mae-variants: a variant is one setting or a tuple of them; make() runs with all of them set, the row
    is named after all, and every setting is back to its default afterwards (also the LAUNCH entries)."""
    import bench.kernels as bk
    from kernels import masking

    seen, rows = [], []
    monkeypatch.setattr(bk, "_mae_row", lambda rows, op, impl, *a: rows.append(impl))

    def make():
        seen.append((masking.UNMASK_HOIST, masking.LAUNCH["unmask"], masking.WALK_PROGRAMS))
        return None, None

    before = (masking.UNMASK_HOIST, dict(masking.LAUNCH), masking.WALK_PROGRAMS)
    hoist = ("masking", "UNMASK_HOIST", False)
    bk._variant_rows(rows, "op", "shape", 1, [hoist, (hoist, ("masking", "unmask", (4, 4)),
                                                      ("masking", "WALK_PROGRAMS", 7))], make)
    assert seen == [(False, before[1]["unmask"], before[2]), (False, (4, 4), 7)]
    assert rows == ["triton:UNMASK_HOIST=False", "triton:UNMASK_HOIST=False,unmask=4x4,WALK_PROGRAMS=7"]
    assert (masking.UNMASK_HOIST, masking.LAUNCH, masking.WALK_PROGRAMS) == before


def test_mae_variants_flag_rejects_unknown_ops(capsys):
    import bench.kernels as bk

    with pytest.raises(SystemExit):
        bk.main(["--mae-variants", "mask,attention"])
    assert "--mae-variants takes mask, unmask, loss" in capsys.readouterr().err


def test_split_variants():
    """--tune-split: for d = 88 the current configs without and with SPLIT_D first, then neighbours that all carry
    it (the two-pass backward); for a power-of-two head dim only the current configs."""
    from bench.kernels import split_variants

    fwds, bwds = split_variants(257, 88)
    assert fwds[0] == attn._fwd_config(257, 88) and fwds[1] == fwds[0] | {"SPLIT_D": True}
    assert bwds[0] == attn._bwd_config(257, 88) and bwds[1] == bwds[0] | {"SPLIT_D": True}
    assert all(c.get("SPLIT_D") for c in fwds[1:] + bwds[1:]) and len(fwds) > 2 and len(bwds) > 2
    assert all(c["SPLIT"] == attn.KV_Q for c in bwds[2:])
    assert split_variants(197, 64) == ([attn._fwd_config(197, 64)], [attn._bwd_config(197, 64)])


def test_tma_variants():
    """--tune-tma: the current configs first, then TMA off/on on each backward pass at the current and 3-stage
    depths (blocks untouched); the forward with and without TMA, except for a split head dim (no TMA forward)."""
    from bench.kernels import tma_variants

    fwds, bwds = tma_variants(197, 64)
    base = attn._bwd_config(197, 64)
    assert fwds[0] == attn._fwd_config(197, 64) and fwds[1]["TMA"] and len(fwds) == 2
    combos = {(b["TMA"], b["DQ"]["TMA"], b["num_stages"], b["DQ"]["num_stages"]) for b in bwds}
    assert len(combos) == len(bwds) and {(a, c) for a, c, *_ in combos} == set(itertools.product((0, 1), (0, 1)))
    assert (base.get("TMA", False), attn._kv_q_dq_config(base).get("TMA", False), base["num_stages"],
            attn._kv_q_dq_config(base)["num_stages"]) in combos
    blocks = ("BLOCK_M", "BLOCK_N", "TAIL_M", "TAIL_N", "num_warps")
    assert all({k: b[k] for k in blocks} == {k: base[k] for k in blocks} for b in bwds)
    fwds, _ = tma_variants(257, 88)
    assert fwds == [attn._fwd_config(257, 88)]
    assert tma_variants(50, 64)[1] == [attn._bwd_config(50, 64)]  # the one-pass backward has no TMA path


def test_tail_group_variants():
    """--tune-tail-groups: the current configs without tail groups first; then each G on the forward, bare and under
    the 128-register cap; on the backward every pair of a dK/dV-pass option (no groups, G bare, G under 128) and a
    dQ-pass option (no groups, G bare, under 96, under 128), each once; blocks untouched. The one-pass backward
    (N <= 64) has no tail groups."""
    from bench.kernels import TAIL_GROUPS, tail_group_variants

    def strip(c):
        return {k: v for k, v in c.items() if k not in ("TAIL_G", "TAIL_GW", "maxnreg", "DQ")}

    n, d = 257, 88  # current configs without register caps
    base_fwd, base_bwd = attn._fwd_config(n, d), attn._bwd_config(n, d)
    fwds, bwds = tail_group_variants(n, d)
    assert "TAIL_G" not in fwds[0] and strip(fwds[0]) == strip(base_fwd)
    assert [(f.get("TAIL_G"), f.get("maxnreg")) for f in fwds[1:]] == [(g, c) for g in TAIL_GROUPS for c in (None, 128)]
    assert all(strip(f) == strip(base_fwd) for f in fwds)
    assert "TAIL_G" not in bwds[0] and "TAIL_G" not in bwds[0]["DQ"]
    kv = {(0, None)} | {(g, c) for g in TAIL_GROUPS for c in (None, 128)}
    dq = {(0, None)} | {(g, c) for g in TAIL_GROUPS for c in (None, 96, 128)}
    pairs = [((b.get("TAIL_G", 0), b.get("maxnreg")), (b["DQ"].get("TAIL_G", 0), b["DQ"].get("maxnreg"))) for b in bwds]
    assert len(pairs) == len(set(pairs)) and set(pairs) == {(a, c) for a in kv for c in dq}
    assert all(strip(b) == strip(base_bwd) and strip(b["DQ"]) == strip(attn._kv_q_dq_config(base_bwd)) for b in bwds)
    # where the current config already has the cap, bare and capped coincide: each variant still once
    fwds, bwds = tail_group_variants(261, 64)
    assert all(a != b for i, a in enumerate(bwds) for b in bwds[i + 1:])
    assert tail_group_variants(50, 64)[1] == [attn._bwd_config(50, 64)]


def test_lean_variants():
    """--tune-lean: the current forward config with the plain softmax, then with LEAN, blocks untouched; the backward
    as it is."""
    from bench.kernels import lean_variants

    for n, d in ((261, 64), (257, 88), (50, 64)):
        fwds, bwds = lean_variants(n, d)
        base = attn._fwd_config(n, d)
        assert [f["LEAN"] for f in fwds] == [False, True]
        assert all({k: v for k, v in f.items() if k != "LEAN"} == base for f in fwds)
        assert bwds == [attn._bwd_config(n, d)]


def test_block_variants():
    """--tune-blocks: the current configs first, then only blocks, warps and depth changed (every other knob kept):
    the forward's neighbours; the dK/dV pass's with the dQ pass as it is, then the dQ pass's with the dK/dV pass as
    it is."""
    from bench.kernels import NEIGHBOUR_BLOCKS, block_variants

    knobs = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
    rest = lambda c: {k: v for k, v in c.items() if k not in knobs + ("DQ",)}
    four = lambda c: tuple(c[k] for k in knobs)
    fwd, bwd = attn._fwd_config(261, 64), attn._bwd_config(261, 64)
    dq = attn._kv_q_dq_config(bwd)
    fwds, bwds = block_variants(261, 64)
    assert fwds[0] == fwd and [four(f) for f in fwds[1:]] == NEIGHBOUR_BLOCKS["fwd"]
    assert all(rest(f) == rest(fwd) for f in fwds)
    assert rest(bwds[0]) == rest(bwd) and bwds[0]["DQ"] == dq
    assert all(rest(b) == rest(bwd) and rest(b["DQ"]) == rest(dq) for b in bwds)
    kv_moved = [four(b) for b in bwds if b["DQ"] == dq and four(b) != four(bwd)]
    dq_moved = [four(b["DQ"]) for b in bwds if b["DQ"] != dq]
    assert kv_moved == NEIGHBOUR_BLOCKS["kv"] and dq_moved == NEIGHBOUR_BLOCKS["dq"]
    assert all(four(b) == four(bwd) for b in bwds if b["DQ"] != dq)
    assert block_variants(50, 64)[1] == [attn._bwd_config(50, 64)]


@pytest.mark.parametrize("groups", [True, False])
def test_occupancy_variants(monkeypatch, groups):
    """--tune-occupancy: the current configs first; the forward at each OCCUPANCY depth and cap, with and without its
    tail groups (where the current config has them: under Triton 3.6, not 3.8); the dQ pass at each, the dK/dV pass
    untouched; nothing else changed."""
    from bench.kernels import OCCUPANCY, occupancy_variants

    monkeypatch.setattr(attn, "POW2_TAIL_GROUPS", groups)
    fwd, bwd = attn._fwd_config(261, 64), attn._bwd_config(261, 64)
    dq = attn._kv_q_dq_config(bwd)
    fwds, bwds = occupancy_variants(261, 64)
    knobs = ("num_stages", "maxnreg", "TAIL_G")
    rest = lambda c: {k: v for k, v in c.items() if k not in knobs}
    assert fwds[0] == fwd and all(rest(f) == rest(fwd) for f in fwds)
    assert [(f["num_stages"], f["maxnreg"], f.get("TAIL_G")) for f in fwds[1:]] == \
        [(st, cap, 4 if groups else None) for st, cap in OCCUPANCY["fwd"]] + \
        ([(st, cap, None) for st, cap in OCCUPANCY["fwd"]] if groups else [])
    assert bwds[0] == bwd
    assert [(b["DQ"]["num_stages"], b["DQ"]["maxnreg"]) for b in bwds[1:]] == OCCUPANCY["dq"]
    assert all({k: v for k, v in b.items() if k != "DQ"} == {k: v for k, v in bwd.items() if k != "DQ"} and
               rest(b["DQ"]) == rest(dq) for b in bwds)
    assert occupancy_variants(50, 64)[1] == [attn._bwd_config(50, 64)]


@pytest.mark.parametrize("defaults", [False, True])
def test_tail_step_variants(monkeypatch, defaults):
    """--tune-tail-step: the current configs, the same without TAIL_PRE / TAIL_FIRST (one config where the defaults
    carry neither), then from the latter: TAIL_PRE (at the forward's cap and under the other one) and TAIL_FIRST on
    the forward; each on the dK/dV pass, on the dQ pass (TAIL_PRE also capped) and on both; nothing else changed. A
    split head dim (whose blocks ignore both keys) gets the current configs only."""
    from bench.kernels import TAIL_PRE_CAPS, TAIL_STEP_KEYS, tail_step_variants

    monkeypatch.setattr(attn, "TAIL_STEP_DEFAULTS", defaults)
    fwd, bwd = attn._fwd_config(261, 64), attn._bwd_config(261, 64)
    dq = attn._kv_q_dq_config(bwd)
    fwds, bwds = tail_step_variants(261, 64)
    step = lambda c: tuple(k for k in TAIL_STEP_KEYS if c.get(k))
    assert fwds[0] == fwd and [step(f) for f in fwds] == [(), ("TAIL_PRE",), ("TAIL_PRE",), ("TAIL_FIRST",)]
    other = None if fwd.get("maxnreg") == TAIL_PRE_CAPS["fwd"] else TAIL_PRE_CAPS["fwd"]
    assert [f.get("maxnreg") for f in fwds[1:]] == [fwd.get("maxnreg"), other, fwd.get("maxnreg")]
    drop = lambda c: {k: v for k, v in c.items() if k not in TAIL_STEP_KEYS + ("DQ", "maxnreg")}
    assert all(drop(f) == drop(fwd) for f in fwds)
    assert bwds[0] == bwd | {"DQ": dq} and bool(bwd.get("TAIL_FIRST")) == defaults
    cap = dq.get("maxnreg")
    pre, first = ("TAIL_PRE",), ("TAIL_FIRST",)
    assert [(step(b), step(b["DQ"]), b["DQ"].get("maxnreg")) for b in bwds] == \
        ([(first, (), cap), ((), (), cap), (pre, (), cap)] if defaults else
         [((), (), cap), (pre, (), cap), (first, (), cap)]) + \
        [((), pre, cap), ((), pre, TAIL_PRE_CAPS["dq"]), ((), first, cap), (pre, pre, cap), (first, first, cap)]
    assert all(drop(b) == drop(bwd) and b.get("maxnreg") == bwd.get("maxnreg") and drop(b["DQ"]) == drop(dq)
               for b in bwds)
    assert tail_step_variants(257, 88) == ([attn._fwd_config(257, 88)], [attn._bwd_config(257, 88)])


def test_launched_kernels_records_each_launch():
    """launched_kernels: one entry per attention kernel launched inside the block (the forward: 1; the two-pass
    backward: 2), and JITFunction.run restored after it."""
    import torch

    from bench.kernels import launched_kernels

    q, k, v = (torch.randn(1, 2, 40, 32) for _ in range(3))
    cfg = dict(BLOCK_M=32, BLOCK_N=32, TAIL_M=16, TAIL_N=16, num_warps=4, num_stages=1)
    with launched_kernels() as fwd:
        o, lse = attn.attention_fwd(q, k, v, 32 ** -0.5, config=cfg)
    with launched_kernels() as bwd:
        attn.attention_bwd(torch.randn_like(q), q, k, v, o.transpose(1, 2).contiguous().transpose(1, 2), lse,
                           32 ** -0.5, config=cfg | {"SPLIT": attn.KV_Q})
    assert len(fwd) == 1 and len(bwd) == 2 and set(fwd[0]) == {"regs", "spills", "shared"}
    assert "run" not in vars(attn._attn_fwd) and "run" not in vars(attn._attn_bwd_kv_q)


def test_every_variant_sweep_has_its_flag():
    """VARIANT_FLAGS: one --tune-* flag per VARIANT_SWEEPS entry, each a distinct option of `bench kernels`."""
    from bench.kernels import VARIANT_FLAGS, VARIANT_SWEEPS

    keys = [k for _, k, _ in VARIANT_FLAGS]
    assert sorted(keys) == sorted(VARIANT_SWEEPS) and len(set(f for f, _, _ in VARIANT_FLAGS)) == len(keys)


def test_bench_packed_rows(monkeypatch):
    """bench kernels' DINOv2 packed-crops rows, on CPU tensors through Triton's interpreter (fp16: its bf16 products
    are wrong) with a stand-in timer: every candidate timed, the ratios from those times, the grouped op's error
    against the fp32 reference small."""
    import torch
    import torch.nn.functional as F

    import bench.kernels as bk

    times = iter(range(1, 1000))
    timed = []

    def fake_time(fn):
        fn()  # runs: a broken candidate fails here as it would on the GPU
        t = float(next(times))
        timed.append(t)
        return t + 0.5, t  # (eager, graphed)

    monkeypatch.setattr(bk, "DEV", "cpu")
    monkeypatch.setattr(bk, "time_ms", fake_time)
    monkeypatch.setattr(bk, "PACKED_SHAPES", {"tiny": (2, 2, 16)})
    monkeypatch.setattr(bk, "attention_candidates", lambda n: {"sdpa-a": F.scaled_dot_product_attention,
                                                               "sdpa-b": F.scaled_dot_product_attention,
                                                               "sdpa-math": None, "triton": None})
    rows, errors = [], {}
    bk.bench_packed(["tiny"], rows, errors, crops=((1, 20), (3, 7)), dtype=torch.float16)
    (row,) = rows
    assert row["tokens"] == 2 * (20 + 21) and row["crops"] == "1x20 + 3x7"
    # grouped fwd+bwd 1, its forward 2, varlen 3 / 4, then per crop size SDPA a and b: 5, 6 (N = 20), 7, 8 (N = 7)
    assert (row["grouped_ms"], row["grouped_fwd_ms"], row["varlen_ms"], row["varlen_fwd_ms"]) == (1, 2, 3, 4)
    assert row["grouped_eager_ms"] == 1.5
    assert (row["sdpa-a_n20_ms"], row["sdpa-b_n20_ms"], row["sdpa-a_n7_ms"], row["sdpa-b_n7_ms"]) == (5, 6, 7, 8)
    assert row["best_sdpa_ms"] == 5 + 7 and row["ratio_vs_best_sdpa"] == 12.0 and row["grouped_vs_varlen"] == 3.0
    assert set(errors["tiny"]["grouped"]) == {"out", "dqkv"} and row["max_rel_err"] < 2e-3, errors


def _stand_in_timer(monkeypatch, bk, times):
    """bench.kernels on CPU tensors, each time_ms call running its function once and answering the next of `times`
    (graphed; eager 0.5 more)."""
    times = iter(times)

    def fake_time(fn):
        fn()
        t = next(times)
        return t + 0.5, t

    monkeypatch.setattr(bk, "DEV", "cpu")
    monkeypatch.setattr(bk, "time_ms", fake_time)


def test_bench_soft_ce_rows(monkeypatch):
    """bench kernels' iBOT cross-entropy rows on CPU tensors (interpreted kernel, fp16, a stand-in timer): both
    implementations timed, GB/s from the fused kernels' bytes, the error against fp32 small."""
    import torch

    import bench.kernels as bk
    from kernels import soft_ce

    # triton fwd+bwd, its forward; torch's; then the three Sinkhorn + cross-entropy plans: triton, triton-dense, torch;
    # then the same three under softmax centering
    _stand_in_timer(monkeypatch, bk, [2.0, 1.0, 6.0, 3.0, 4.0, 8.0, 12.0, 2.0, 5.0, 10.0])
    monkeypatch.setitem(soft_ce.LAUNCH, "block", 32)
    from kernels import sinkhorn
    monkeypatch.setattr(sinkhorn, "LAUNCH", dict(sinkhorn.LAUNCH, row_block=32, col_bk=32, col_bm=4, chunk_rows=2))
    rows, errors = [], {}
    bk.bench_soft_ce(["tiny"], rows, errors, shapes={"tiny": (5, 70)}, dtype=torch.float16)
    tri, tor, *sk = rows
    sk, sm = sk[:3], sk[3:]
    assert [r["impl"] for r in sk] == [r["impl"] for r in sm] == ["triton", "triton-dense", "torch"]
    assert all(r["op"] == "softmax+ce tiny" for r in sm) and [r["ms"] for r in sm] == [2.0, 5.0, 10.0]
    assert sm[0]["GB/s"] == 5 * 70 * (4 * 2 + 3 * 2) / 2.0 / 1e6
    assert set(errors["softmax+ce tiny"]) == {"ce", "dscores"} and sm[0]["max_rel_err"] < 1e-3, errors
    assert all(r["op"] == "sinkhorn+ce tiny" for r in sk) and [r["ms"] for r in sk] == [4.0, 8.0, 12.0]
    assert sk[0]["GB/s"] == 5 * 70 * (9 * 2 + 3 * 2) / 4.0 / 1e6
    assert set(errors["sinkhorn+ce tiny"]) == {"ce", "dscores"} and sk[0]["max_rel_err"] < 1e-3, errors
    assert (tri["impl"], tor["impl"]) == ("triton", "torch") and tri["op"] == tor["op"] == "soft_ce tiny"
    assert (tri["ms"], tri["fwd_ms"], tri["bwd_ms"], tor["ms"]) == (2.0, 1.0, 1.0, 6.0)
    moved = 5 * 70 * (2 + 4) * 2 + 5 * 70 * 2  # scores and targets read each way, d scores written
    assert tri["GB/s"] == moved / 2.0 / 1e6 and tri["GB/s"] / tor["GB/s"] == 3.0
    assert set(errors["tiny"]) == {"ce", "dscores"} and tri["max_rel_err"] < 2e-3, errors


def test_bench_patch_embed_rows(monkeypatch):
    """bench kernels' patch-embedding rows on CPU (fp32, no autocast, a stand-in timer): the three implementations,
    TFLOP/s from the product's FLOPs, the speedup against the better convolution, a small error."""
    import bench.kernels as bk

    _stand_in_timer(monkeypatch, bk, [3.0, 2.0, 0.5])  # conv, conv-benchmark, matmul
    rows, errors = [], {}
    bk.bench_patch_embed(["tiny"], rows, errors, shapes={"tiny": (3, 20, 4, 8)})
    assert [r["impl"] for r in rows] == ["conv", "conv-benchmark", "matmul"]
    flops = 2 * 3 * 3 * 25 * 3 * 16 * 8
    assert rows[2]["tflops"] == flops / 0.5 / 1e9 and rows[2]["speedup_vs_best_conv"] == 4.0
    assert rows[0]["speedup_vs_best_conv"] == 2.0 / 3.0
    assert set(errors["patch_embed tiny"]) == {"out", "dweight"} and rows[2]["max_rel_err"] < 1e-5, errors


def test_bench_dino_ce_rows(monkeypatch):
    """bench kernels' DINO class-token rows on CPU tensors (interpreted kernels, fp16, a stand-in timer): the three
    plans timed in order, GB/s from the fused path's bytes, the fused loss and its gradient close to the objective's
    torch dino_loss."""
    import torch

    import bench.kernels as bk
    from kernels import sinkhorn, soft_ce

    _stand_in_timer(monkeypatch, bk, [3.0, 6.0, 9.0])
    monkeypatch.setitem(soft_ce.LAUNCH, "block", 32)
    monkeypatch.setattr(sinkhorn, "LAUNCH", dict(sinkhorn.LAUNCH, row_block=32, col_bk=32, col_bm=4, chunk_rows=2))
    rows, errors = [], {}
    bk.bench_dino_ce(["tiny"], rows, errors, shapes={"tiny": (2, 4, 3, 50)}, dtype=torch.float16)
    assert [r["impl"] for r in rows] == ["triton", "triton-dense", "torch"]
    assert all(r["op"] == "dino-ce tiny" and r["shape"] == "2x4x3x50" for r in rows)
    assert [r["ms"] for r in rows] == [3.0, 6.0, 9.0]
    assert rows[0]["GB/s"] == (4 * 3 * 50 * 3 * 2 + 2 * 3 * 50 * 9 * 2) / 3.0 / 1e6
    assert set(errors["dino-ce tiny"]) == {"loss", "dscores"} and rows[0]["max_rel_err"] < 1e-3, errors


def test_mae_plot_series_draws_every_plan():
    """The PNG beside bench kernels' masking / loss / cross-entropy table has a bar series for every implementation
    timed, triton-dense included (it once drew triton and torch only), with 0 where an op lacks one."""
    import bench.kernels as bk

    rows = [{"op": "dino-ce b", "impl": "triton", "GB/s": 3.0},
            {"op": "dino-ce b", "impl": "triton-dense", "GB/s": 2.0},
            {"op": "dino-ce b", "impl": "torch", "GB/s": 1.0}, {"op": "mae_loss", "impl": "triton", "GB/s": 5.0},
            {"op": "mae_loss", "impl": "torch", "GB/s": 0.5}]
    ops, series = bk.mae_plot_series(rows)
    assert ops == ["dino-ce b", "mae_loss"]
    assert series == {"triton": [3.0, 5.0], "triton-dense": [2.0, 0.0], "torch": [1.0, 0.5]}


def test_bench_mae_rows_at_a_second_batch(monkeypatch):
    """bench kernels' MAE rows on CPU tensors (interpreted kernels, a stand-in timer) as main() takes a batch size
    after the first: every op name and error key carries the suffix, the shapes the batch; errors small."""
    import bench.kernels as bk

    _stand_in_timer(monkeypatch, bk, [1.0] * 30)
    rows, errors = [], {}
    bk.bench_mae(rows, errors, B=1, suffix=" B1")
    ops = ["mae_mask", "mae_mask fixed-pos", "mae_unmask", "mae_unmask fixed-pos", "mae_loss"]
    assert sorted({r["op"] for r in rows}) == sorted(op + " B1" for op in ops)
    assert [r["impl"] for r in rows if r["op"] == "mae_unmask B1"] == ["triton", "torch", "triton:ids"]
    assert all(r["shape"].startswith("B1 ") for r in rows) and len(rows) == 13
    assert set(errors) == {"mae_mask B1", "mae_unmask B1", "mae_loss B1", "mae_loss cpq B1"}
    assert errors["mae_mask B1"]["ids_equal"] and max(errors["mae_unmask B1"].values()) < 1e-2, errors


def test_mae_batch_flag_rejects_repeats(capsys):
    import bench.kernels as bk

    with pytest.raises(SystemExit):
        bk.main(["--mae-batch", "256", "256"])
    assert "--mae-batch takes distinct positive sizes" in capsys.readouterr().err


def test_result_files_name_the_command_that_wrote_them(monkeypatch, tmp_path):
    """bench.common.write_result: `python -m bench <suite> ...` (or the suite the command line named), or for a probe
    run as a module of its own (`module`), `python -m <module> ...` with no suite in it."""
    import json

    from bench import common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    read = lambda p: json.loads(p.read_text())["command"]
    assert read(common.write_result("kernels", {}, ["--quick"], tag="a")) == "python -m bench kernels --quick"
    assert read(common.write_result("train-scaling", {}, ["--gpus", "2"], tag="b", command_suite="train")) == \
        "python -m bench train --gpus 2"
    assert read(common.write_result("kernels-probe", {}, ["--tag", "s 1"], tag="c", module="bench._probe_tail_bound")) \
        == "python -m bench._probe_tail_bound --tag 's 1'"


def test_tail_split_variants():
    """--tune-tail-split: the current configs first, then per-head, padded and split tail groups of 2 and 4 on the
    forward, and every such choice on the dK/dV pass crossed with every one on the dQ pass (that pass also under a
    168-register cap), nothing else changed; shapes whose full blocks hold the head dim whole: the current configs."""
    from bench.kernels import tail_split_variants

    fwds, bwds = tail_split_variants(257, 88)
    fwd, bwd = attn._fwd_config(257, 88), attn._bwd_config(257, 88)
    assert fwds[0] == fwd and bwds[0] == bwd
    knobs = lambda c: (c.get("TAIL_G", 0), c.get("TAIL_GS", False))
    # (each variant once: the current config also stands among them where it has no cap of its own)
    assert {knobs(f) for f in fwds} == {(0, False), (2, False), (2, True), (4, False), (4, True)}
    combos = [(knobs(b), knobs(b["DQ"]), b["DQ"].get("maxnreg")) for b in bwds]
    assert len(set(combos)) == len(combos) == 5 * 9 and set(combos) == {
        (a, q, cap) for a in {(0, False), (2, False), (2, True), (4, False), (4, True)}
        for q, cap in [((0, False), None)] + [(g, c) for g in [(2, False), (2, True), (4, False), (4, True)]
                                                for c in (None, 168)]}
    rest = lambda c: {k: v for k, v in c.items() if k not in ("TAIL_G", "TAIL_GW", "TAIL_GS", "DQ", "maxnreg")}
    assert all(rest(f) == rest(fwd) for f in fwds) and all(rest(b) == rest(bwd) for b in bwds)
    assert tail_split_variants(197, 64) == ([attn._fwd_config(197, 64)], [attn._bwd_config(197, 64)])
