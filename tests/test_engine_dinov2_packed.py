"""DINOv2's one-pass student: all crops packed into one sequence through the Triton attention (one dense launch
per crop size, or one varlen launch; TRITON_INTERPRET=1, fp32) give the same tokens, loss and gradients as one
pass per crop size through SDPA."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: run the kernels on CPU tensors

from pathlib import Path

import pytest
import torch

import kernels
from engine.config import load_config
from engine.objectives import build_objective
from tests.engine_helpers import DINOV2_TINY

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TINY = DINOV2_TINY + ["model.kernels=triton"]


@pytest.mark.parametrize("attention", ["grouped", "varlen"])
def test_packed_student_pass_matches_one_pass_per_crop_size(monkeypatch, attention):
    """"grouped": the packed attention as one dense launch per crop size (kernels.attention_qkv(seq_groups=...), the
    default); "varlen": one launch over cu_seqlens (what blocks with q/k norms take)."""
    import engine.objectives.dinov2 as dinov2

    torch.manual_seed(0)
    model = build_objective(load_config(RECIPES / "quickstart_dinov2.yaml", TINY), torch.device("cpu"))
    assert model.attn_impl == "triton" and model.pack_crops
    glob, loc = model.synthetic_batch(2, "cpu")
    enc = model.encoder

    packed_calls = []
    inner = model.forward_packed
    monkeypatch.setattr(model, "forward_packed", lambda *a: (packed_calls.append(1), inner(*a))[1])
    launches = {"grouped": 0, "varlen": 0}
    qkv_fn, attn_fn = kernels.attention_qkv, kernels.attention
    monkeypatch.setattr(kernels, "attention_qkv", lambda *a, **k: (
        launches.__setitem__("grouped", launches["grouped"] + (k.get("seq_groups") is not None)), qkv_fn(*a, **k))[1])
    monkeypatch.setattr(kernels, "attention", lambda *a, **k: (
        launches.__setitem__("varlen", launches["varlen"] + (k.get("cu_seqlens") is not None)), attn_fn(*a, **k))[1])
    if attention == "varlen":
        block_fn = dinov2.packed_block
        monkeypatch.setattr(dinov2, "packed_block", lambda *a: block_fn(*a[:7]))  # no seq_groups

    def run(impl: str):
        model.attn_impl = impl  # "sdpa": one pass per crop size through timm's blocks
        for block in list(enc.blocks) + list(model.teacher["encoder"].blocks):
            block.attn.impl = "triton" if impl == "triton" else "sdpa"
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # same masks
        out = model([glob, loc])
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    packed, g_packed = run("triton")
    assert packed_calls == [1]
    other = "varlen" if attention == "grouped" else "grouped"
    assert launches[attention] == len(enc.blocks) and launches[other] == 0, launches
    dense, g_dense = run("sdpa")
    assert packed_calls == [1]
    for k in ("loss", "dino", "ibot", "koleo"):
        torch.testing.assert_close(packed[k], dense[k], atol=1e-5, rtol=1e-5)
    assert g_packed.keys() == g_dense.keys() and "encoder.blocks.0.attn.qkv.weight" in g_packed
    for n in g_packed:
        scale = g_dense[n].abs().max().clamp(min=1.0)
        torch.testing.assert_close(g_packed[n] / scale, g_dense[n] / scale, atol=1e-4, rtol=1e-4, msg=n)

    # the tokens themselves, crop by crop
    with torch.no_grad():
        a_glob, a_loc = model.forward_packed(enc, [model.embed(enc, glob), model.embed(enc, loc)])
        torch.testing.assert_close(a_glob, model.forward_dense(enc, glob), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a_loc, model.forward_dense(enc, loc), atol=1e-5, rtol=1e-5)


def test_packed_drop_path_drops_whole_crops():
    torch.manual_seed(0)
    cfg = load_config(RECIPES / "quickstart_dinov2.yaml", TINY + ["model.drop_path=0.5"])
    model = build_objective(cfg, torch.device("cpu")).train()
    keep = model._keep(model.encoder, 64, torch.zeros(1))  # [depth, 2 branches, crops], one draw for all
    assert keep.shape == (2, 2, 64)
    assert torch.equal(keep[0], torch.ones(2, 64))  # block 0 drops nothing (timm's rates rise from 0 to 0.5)
    for branch in keep[1]:  # per crop: dropped or 1 / (1 - p)
        assert set(branch.tolist()) <= {0.0, 2.0} and 0 < branch.count_nonzero() < 64
    model.encoder.blocks[1].drop_path2.drop_prob = 0.0  # a changed rate is taken, not the cached probabilities
    assert torch.equal(model._keep(model.encoder, 64, torch.zeros(1))[1, 1], torch.ones(64))
    model.eval()
    assert model._keep(model.encoder, 64, torch.zeros(1)) is None
    no_drop = build_objective(load_config(RECIPES / "quickstart_dinov2.yaml", TINY + ["model.drop_path=0.0"]),
                              torch.device("cpu")).train()
    assert no_drop._keep(no_drop.encoder, 64, torch.zeros(1)) is None  # no branch drops: no multipliers at all


def test_packing_tensors_are_kept_for_the_next_step():
    """cu_seqlens and the crop lengths are built once per packing (crop counts and sizes) and reused: on a GPU a
    fresh copy from pageable host memory would wait for the queued work every step."""
    model = build_objective(load_config(RECIPES / "quickstart_dinov2.yaml", TINY), torch.device("cpu"))
    groups, lengths = [(2, 5), (3, 2)], [5, 5, 2, 2, 2]
    cu, seq_len = model._packing_tensors(groups, "cpu")
    assert cu.tolist() == [0, 5, 10, 12, 14, 16] and cu.dtype == torch.int32 and seq_len.tolist() == lengths
    again = model._packing_tensors(groups, "cpu")
    assert again[0] is cu and again[1] is seq_len
    other = model._packing_tensors([(1, 5)], "cpu")
    assert other[0].tolist() == [0, 5] and other[0] is not cu


def test_compiled_packed_block_with_grouped_attention():
    """The engine compiles each block (torch.compile, per-block regions): the packed call with `seq_groups` compiles
    without graph breaks, also as the crop count changes (a dynamic-shape graph then), and matches the eager block
    on the reference attention."""
    import timm
    import torch._dynamo

    from engine.objectives.dinov2 import make_packable, packed_block

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    block = timm.models.vision_transformer.Block(32, 2)
    make_packable(block)
    block.compile(backend="aot_eager")
    for crops in (2, 3, 4):
        groups = [(crops, 9), (2 * crops, 4)]
        lens = [n for c, n in groups for _ in range(c)]
        cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
        x = torch.randn(sum(lens), 32, requires_grad=True)
        got = block(x, cu_seqlens=cu, max_seqlen=9, attn_impl="triton", seq_groups=groups)
        want = packed_block(block, x, cu, 9, None, None, "torch")
        (g,), (gw,) = torch.autograd.grad(got.sum(), x), torch.autograd.grad(want.sum(), x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g, gw, atol=1e-5, rtol=1e-5)
    assert not torch._dynamo.utils.counters["graph_break"]
    torch._dynamo.reset()

