"""DINOv2 objective: loss terms on hand-checked cases, masking, the EMA teacher, schedules,
parameter groups, dry-run on every recipe, resume exactness and timm-loadable checkpoints."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (the packed test needs it)

import math
import random
from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.objectives import build_objective
from engine.objectives import dinov2 as D
from tests.engine_helpers import DINOV2_TINY

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TINY = DINOV2_TINY


def tiny_model(*extra: str):
    torch.manual_seed(0)
    cfg = load_config(RECIPES / "quickstart_dinov2.yaml", TINY + list(extra))
    return build_objective(cfg, torch.device("cpu")), cfg


# ----------------------------------------------------------------------------- loss terms
def test_sinkhorn_rows_and_columns():
    torch.manual_seed(0)
    logits = torch.randn(12, 5)
    q = D.sinkhorn_knopp(logits, temp=0.5, iters=3)
    torch.testing.assert_close(q.sum(1), torch.ones(12))  # every sample: a distribution
    q = D.sinkhorn_knopp(logits, temp=0.5, iters=200)
    torch.testing.assert_close(q.sum(0), torch.full((5,), 12 / 5), atol=1e-4, rtol=0)  # prototypes balanced
    # Hand-checked: exp(logits) = [[2, 1], [1, 2]] is already doubly stochastic up to scale.
    q = D.sinkhorn_knopp(torch.tensor([[math.log(2), 0.0], [0.0, math.log(2)]]), temp=1.0, iters=1)
    torch.testing.assert_close(q, torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]]))
    # Skewed scores are pushed toward the uniform marginal, unlike a plain softmax.
    skew = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    assert D.sinkhorn_knopp(skew, 1.0, 50)[:, 1].sum() > torch.softmax(skew, -1)[:, 1].sum() + 0.5


def test_sinkhorn_matches_the_explicit_alternation():
    """The vector form (targets = diag(b) E diag(a)) against Sinkhorn-Knopp written out, normalising a new matrix at
    every step; bf16 scores in, contiguous fp32 [M, K] targets out."""
    torch.manual_seed(0)
    scores = torch.randn(40, 300).to(torch.bfloat16)
    temp = torch.tensor(0.07)
    q = torch.exp(scores.float() / temp - (scores.float() / temp).max())
    q = q / q.sum()
    for _ in range(3):
        q = q / q.sum(0, keepdim=True) / 300
        q = q / q.sum(1, keepdim=True) / 40
    got = D.sinkhorn_knopp(scores, temp, iters=3)
    assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == (40, 300)
    torch.testing.assert_close(got, q * 40, rtol=1e-5, atol=1e-7)


def test_softmax_centering_and_center_update():
    logits = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    center = torch.tensor([[0.5, 0.5]])
    torch.testing.assert_close(D.softmax_center(logits, center, 0.5), torch.softmax((logits - 0.5) / 0.5, -1))
    D.update_center(center, logits, momentum=0.9)
    torch.testing.assert_close(center, torch.tensor([[0.9 * 0.5 + 0.1 * 2.0, 0.9 * 0.5 + 0.1 * 1.0]]))


def test_koleo_on_known_points():
    def at(*degrees):
        r = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
        return torch.stack([r.cos(), r.sin()], 1) * 3.0  # scale: normalized inside

    # 0, 90, 180 degrees: every nearest neighbor is sqrt(2) away
    torch.testing.assert_close(D.koleo_loss(at(0, 90, 180)).double(), torch.tensor(-math.log(math.sqrt(2)),
                                                                                  dtype=torch.float64),
                               atol=1e-6, rtol=0)
    # 0, 60, 180 degrees: distances 1, 1, sqrt(3)
    torch.testing.assert_close(D.koleo_loss(at(0, 60, 180)).double(), torch.tensor(-math.log(3) / 6,
                                                                                  dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert D.koleo_loss(torch.randn(1, 4)).item() == 0.0


def test_dino_loss_pairs_different_crops_only():
    torch.manual_seed(0)
    G, V, B, K = 2, 4, 3, 5
    teacher = torch.softmax(torch.randn(G, B, K), -1)
    student = torch.randn(V, B, K)
    ref, pairs = 0.0, 0
    for g in range(G):
        for v in range(V):
            if v == g:
                continue
            for b in range(B):
                ref -= sum(teacher[g, b, k] * torch.log_softmax(student[v, b] / 0.1, -1)[k] for k in range(K)) / B
            pairs += 1
    torch.testing.assert_close(D.dino_loss(student, teacher, 0.1), ref / pairs)
    assert pairs == 6


def test_ibot_loss_averages_masked_tokens_per_crop():
    torch.manual_seed(0)
    crops, N, K = 3, 4, 6
    student = torch.randn(crops, N, K)
    teacher = torch.softmax(torch.randn(crops, N, K), -1)
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    ce = -(teacher * torch.log_softmax(student / 0.1, -1)).sum(-1)
    ref = ((ce[0, 0] + ce[0, 2]) / 2 + (ce[2, 0] + ce[2, 1] + ce[2, 2]) / 3) / crops  # crop 1: no mask, counts 0
    crop_of = torch.arange(crops).repeat_interleave(N)[mask.flatten()]
    got = D.ibot_loss(student[mask], teacher[mask], crop_of, crops, 0.1)
    torch.testing.assert_close(got, ref)
    student2 = student.clone()
    student2[~mask] += 5.0  # unmasked tokens do not enter
    torch.testing.assert_close(D.ibot_loss(student2[mask], teacher[mask], crop_of, crops, 0.1), ref)


def test_fused_ibot_cross_entropy_matches(monkeypatch):
    """objective.dinov2.fused_ce (on by default with our kernels): iBOT's cross-entropy by kernels.soft_cross_entropy
    against Sinkhorn's targets kept as factors, and DINO's class-token loss by kernels.crop_cross_entropy likewise (the
    Triton kernels forced here, interpreted on CPU), give the torch form's losses and gradients, through the whole
    objective too."""
    import functools

    import kernels

    monkeypatch.setattr(kernels, "soft_cross_entropy", functools.partial(kernels.soft_cross_entropy, impl="triton"))
    crop_calls = []

    def crop_cross_entropy(*args, **kw):  # forced onto the Triton kernels, and counted
        crop_calls.append(1)
        return real_crop(*args, impl="triton", **kw)

    real_crop = kernels.crop_cross_entropy
    monkeypatch.setattr(kernels, "crop_cross_entropy", crop_cross_entropy)
    real_sk, factored = kernels.sinkhorn_knopp, []

    def sinkhorn_knopp(*args, impl="auto", **kw):  # the Triton passes where the engine says auto
        factored.append(kw.get("factored", False))
        return real_sk(*args, impl="triton" if impl == "auto" else impl, **kw)

    monkeypatch.setattr(kernels, "sinkhorn_knopp", sinkhorn_knopp)
    torch.manual_seed(0)
    student = torch.randn(9, 50, requires_grad=True)
    teacher = torch.softmax(torch.randn(9, 50), -1)
    crop_of = torch.tensor([0, 0, 0, 2, 2, 2, 2, 3, 3])
    a, b = (D.ibot_loss(student, teacher, crop_of, 4, 0.1, fused=f) for f in (True, False))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(*(torch.autograd.grad(x, student)[0] for x in (a, b)))

    # The flag takes effect only with our kernels (model.kernels): the torch variant keeps the torch form.
    assert tiny_model("model.kernels=torch")[0].fused_ce is False
    assert tiny_model("objective.dinov2.fused_ce=false", "model.kernels=triton")[0].fused_ce is False
    assert tiny_model("model.kernels=triton")[0].fused_ce is True  # the default with our kernels
    assert tiny_model("model.kernels=triton")[0].fused_dino is True
    assert tiny_model("model.kernels=torch")[0].fused_dino is False
    out, grads, dino_grads = [], [], []
    for fused in (True, False):
        model, _ = tiny_model("objective.dinov2.mask_probability=1.0")
        model.fused_ce = model.fused_dino = fused
        glob, loc = model.synthetic_batch(2, "cpu")
        torch.manual_seed(1)
        res = model([glob, loc])
        res["loss"].backward()
        out.append(res)
        grads.append(model.ibot_head.prototypes.weight.grad.clone() if model.ibot_head is not None
                     else model.dino_head.prototypes.weight.grad.clone())
        dino_grads.append(model.dino_head.prototypes.weight.grad.clone())
    assert out[0]["ibot"] > 0
    # per step: the class tokens' targets and iBOT's, both factored (fused) or both written out (torch form); DINO's
    # loss through kernels.crop_cross_entropy in the fused step only
    assert factored == [True, True, False, False], factored
    assert len(crop_calls) == 1
    torch.testing.assert_close(out[0]["dino"], out[1]["dino"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dino_grads[0], dino_grads[1], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out[0]["ibot"], out[1]["ibot"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_block_masks():
    rng = random.Random(0)
    for ratio in (0.1, 0.3, 0.5):
        m = D.block_mask(14, 14, ratio, rng)
        assert 0.5 * ratio * 196 <= m.sum() <= round(ratio * 196)
    torch.manual_seed(0)
    assert not D.sample_masks(8, 6, 6, 0.0, (0.1, 0.5)).any()
    masks = D.sample_masks(8, 6, 6, 1.0, (0.3, 0.3))
    assert masks.shape == (8, 36) and (masks.sum(1) > 0).all() and (masks.sum(1) <= 11).all()


def _block_mask_by_cells(h, w, ratio, rng, min_block=4, aspect=(0.3, 1 / 0.3)):
    """The block masking written cell by cell (what block_mask did before its rows became bit masks)."""
    mask, target, count, misses = [False] * (h * w), int(round(ratio * h * w)), 0, 0
    while count < target and misses < 20:
        left_over = target - count
        area = rng.uniform(min(min_block, left_over), left_over)
        a = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
        bh = min(h, max(1, int(round(math.sqrt(area * a)))))
        bw = min(w, max(1, int(round(math.sqrt(area / a)))))
        top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
        cells = [r * w + c for r in range(top, top + bh) for c in range(left, left + bw)]
        new = sum(not mask[i] for i in cells)
        if new == 0 or new > left_over:
            misses += 1
            continue
        for i in cells:
            mask[i] = True
        count += new
    return torch.tensor(mask).view(h, w)


@pytest.mark.parametrize("h,w", [(16, 16), (14, 14), (37, 37), (5, 70), (3, 1), (8, 62), (8, 63)])
def test_block_masks_as_row_bits_match_the_cell_by_cell_draw(h, w):
    """block_mask draws on row bit masks: the same masks, from the same random numbers, as the cell-by-cell draw
    (so seeded runs and resumed checkpoints mask as before), on both unpack paths (w < 63 vectorized, wider by rows)."""
    for seed in range(40):
        ratio = random.Random(seed + 1000).uniform(0.05, 0.6)
        a, b = random.Random(seed), random.Random(seed)
        assert torch.equal(D.block_mask(h, w, ratio, a), _block_mask_by_cells(h, w, ratio, b)), (seed, ratio)
        assert a.random() == b.random()  # as many draws taken
    torch.manual_seed(3)
    got = D.sample_masks(40, h, w, 0.5, (0.1, 0.5))
    torch.manual_seed(3)
    rng = random.Random(int(torch.randint(0, 2**62, (1,))))
    want = torch.stack([_block_mask_by_cells(h, w, rng.uniform(0.1, 0.5), rng).flatten() if rng.random() < 0.5
                        else torch.zeros(h * w, dtype=torch.bool) for _ in range(40)])
    assert got.shape == (40, h * w) and got.dtype == torch.bool and torch.equal(got, want)
    assert 0 < got.any(1).sum() < 40 and D.sample_masks(0, h, w, 0.5, (0.1, 0.5)).shape == (0, h * w)


def test_forward_feeds_the_ibot_head_exactly_the_masked_tokens(monkeypatch):
    model, _ = tiny_model()
    G, B, grid = 2, 3, 4
    masks = torch.zeros(G * B, grid * grid, dtype=torch.bool)
    masks[0, [1, 5, 6]] = True
    masks[4, [0, 15]] = True
    monkeypatch.setattr(D, "sample_masks", lambda *a, **k: masks.clone())
    seen = {}

    def spy(name, head):
        inner = head.forward
        head.forward = lambda x: (seen.setdefault(name, x.detach().clone()), inner(x))[1]

    spy("student", model.ibot_head)
    spy("teacher", model.teacher["ibot_head"])
    images = model.synthetic_batch(B, "cpu")
    out = model(images)
    assert seen["student"].shape[0] == seen["teacher"].shape[0] == 5
    prefix = model.encoder.num_prefix_tokens
    with torch.no_grad():
        t = model.forward_dense(model.teacher["encoder"], images[0])[:, prefix:].flatten(0, 1)
        torch.testing.assert_close(seen["teacher"], t[masks.flatten()])
        s = model.forward_dense(model.encoder, images[0], masks.view(G * B, grid, grid))[:, prefix:].flatten(0, 1)
        torch.testing.assert_close(seen["student"], s[masks.flatten()])
        # the student's embedding holds the mask token exactly at the masked positions
        e = model.embed(model.encoder, images[0], masks)[:, prefix:]
        e0 = model.embed(model.encoder, images[0])[:, prefix:]
        pos = e0 - model.encoder.patch_embed(images[0]).flatten(1, 2)
        expect = torch.where(masks.unsqueeze(-1), model.mask_token.view(1, 1, -1) + pos, e0)
        torch.testing.assert_close(e, expect)
    assert set(out) == {"loss", "dino", "ibot", "koleo"} and torch.isfinite(out["loss"])


# ----------------------------------------------------------------------------- teacher, schedules
def test_teacher_gets_no_gradients_and_follows_the_ema():
    model, _ = tiny_model()
    out = model(model.synthetic_batch(4, "cpu"))
    out["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    student = [p for n, p in model.named_parameters() if not n.startswith("teacher.")]
    assert all(p.grad is not None for p in student)
    # the teacher starts as a copy of the student
    for (n, s), t in zip(model.encoder.named_parameters(), model.teacher["encoder"].parameters()):
        assert torch.equal(s, t), n
    with torch.no_grad():
        for p in student:
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.teacher.parameters()]
    pairs = list(model.encoder.parameters()) + list(model.dino_head.parameters()) + list(model.ibot_head.parameters())
    total = 100
    m = model.momentum(11, total)
    assert model.momentum(0, total) == pytest.approx(0.992) and model.momentum(total, total) == pytest.approx(1.0)
    assert 0.992 < m < 1.0
    model.on_step_end(10, total)
    for s, t0, t in zip(pairs, before, model.teacher.parameters()):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s)


def test_schedules_weight_decay_teacher_temp_and_frozen_prototypes():
    model, cfg = tiny_model()
    groups = model.param_groups(0.04)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    total = 100
    model.on_step_start(0, total, opt)
    assert float(model.teacher_temp_now) == pytest.approx(0.04)
    assert {round(g["weight_decay"], 6) for g in opt.param_groups} == {0.0, 0.04}
    model.on_step_start(15, total, opt)
    assert float(model.teacher_temp_now) == pytest.approx(0.04 + 0.5 * 0.03)
    model.on_step_start(total, total, opt)
    assert float(model.teacher_temp_now) == pytest.approx(0.07)
    assert {round(g["weight_decay"], 6) for g in opt.param_groups} == {0.0, 0.2}
    out = model(model.synthetic_batch(2, "cpu"))
    out["loss"].backward()
    model.on_after_backward(0, total)  # first 1 % of training: prototypes frozen
    assert model.dino_head.prototypes.weight.grad is None and model.ibot_head.prototypes.weight.grad is None
    assert model.dino_head.mlp[0].weight.grad is not None
    out = model(model.synthetic_batch(2, "cpu"))
    out["loss"].backward()
    model.on_after_backward(1, total)
    assert model.dino_head.prototypes.weight.grad is not None


def test_param_groups_layer_decay_and_no_decay():
    model, cfg = tiny_model("objective.dinov2.layer_decay=0.5", "objective.dinov2.patch_embed_lr_scale=0.2")
    groups = model.param_groups(0.04)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    depth = len(model.encoder.blocks)  # 2: scales 0.5^(3 - layer)
    assert by_param[id(named["encoder.patch_embed.proj.weight"])]["lr_scale"] == pytest.approx(0.5**3 * 0.2)
    assert by_param[id(named["encoder.cls_token"])]["lr_scale"] == pytest.approx(0.5**3)
    assert by_param[id(named["encoder.blocks.0.attn.qkv.weight"])]["lr_scale"] == pytest.approx(0.5**2)
    assert by_param[id(named[f"encoder.blocks.{depth - 1}.mlp.fc1.weight"])]["lr_scale"] == pytest.approx(0.5)
    assert by_param[id(named["dino_head.prototypes.weight"])]["lr_scale"] == 1.0
    for n in ("encoder.cls_token", "encoder.reg_token", "encoder.pos_embed", "mask_token",
              "encoder.blocks.0.ls1.gamma", "encoder.blocks.0.attn.qkv.bias", "encoder.norm.weight"):
        assert by_param[id(named[n])]["weight_decay"] == 0.0, n
    assert by_param[id(named["encoder.blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.04
    assert not any(n.startswith("teacher.") for n, p in named.items() if id(p) in by_param)


# ----------------------------------------------------------------------------- recipes and the loop
@pytest.mark.parametrize("size", ["s", "b", "l", "h", "g"])
def test_dry_run_every_recipe(size, capsys):
    from engine.run import main

    assert main([str(RECIPES / f"vit_{size}_dinov2.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "objective dinov2" in out and "FLOPs / image" in out


def test_local_size_must_fit_the_patch():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_model("data.multicrop.local_size=10")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from loaders.synthetic import write_phantom_shards

    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_shards(out, per_modality=3, size=40)
    return str(out)


def _trainer(run_dir, shards, steps):
    from engine.train import Trainer

    cfg = load_config(RECIPES / "quickstart_dinov2.yaml", TINY + [
        f"data.shards={shards}", "data.workers=0", f"train.steps={steps}", "train.batch_size=4",
        "checkpoint.every_steps=1000", "log.every_steps=1", "log.tensorboard=false", "log.progress=false",
        "optim.warmup_steps=1", "objective.dinov2.freeze_last_layer=0.25", f"run.dir={run_dir}",
        "model.drop_path=0.2",
    ])
    return Trainer(cfg, run_dir, out=open(os.devnull, "w"))


def test_resume_is_exact_and_checkpoint_loads_into_timm(tmp_path, shards):
    import timm
    from safetensors.torch import load_file

    full = _trainer(tmp_path / "full", shards, 4)
    full.fit()
    half = _trainer(tmp_path / "half", shards, 4)
    half.fit(stop_after=2)
    resumed = _trainer(tmp_path / "half", shards, 4)
    resumed.fit()
    assert resumed.step == 4 and resumed.resumed_from is not None
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    fresh = _trainer(tmp_path / "fresh", shards, 4)  # the run moved the weights at all
    assert not torch.equal(fresh.model.state_dict()["encoder.blocks.0.attn.qkv.weight"],
                           a["encoder.blocks.0.attn.qkv.weight"])

    # the exported encoder is the teacher, a plain timm ViT
    path = sorted((tmp_path / "full" / "checkpoints").glob("step_*"))[-1] / "encoder.safetensors"
    sd = load_file(str(path))
    for k, v in full.model.teacher["encoder"].state_dict().items():
        assert torch.equal(sd[k], v), k
    net = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=16,
                            patch_size=4, embed_dim=32, depth=2, num_heads=2)
    net.load_state_dict(sd, strict=True)
    net = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=True, num_classes=0, img_size=16,
                            patch_size=4, embed_dim=32, depth=2, num_heads=2,
                            pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(net.pos_embed, sd["pos_embed"])


def test_compiled_forward_does_not_recompile_per_step():
    """The trainer compiles the whole objective on one GPU: per-step values (teacher
    temperature, mask counts) must not force a recompile every step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, _ = tiny_model("model.drop_path=0.1")
    opt = torch.optim.AdamW(model.param_groups(0.04), lr=1e-3)
    model.train()
    model.compile(backend="eager")
    images = model.synthetic_batch(3, "cpu")
    for step in range(6):
        model.on_step_start(step, 20, opt)
        model(images)["loss"].backward()
        model.on_step_end(step, 20)
    assert counters["frames"]["ok"] <= 4, dict(counters["frames"])  # first graphs + one dynamic-shape recompile
    torch._dynamo.reset()


def test_compile_mode_reaches_the_per_block_compile(tmp_path, monkeypatch):
    """model.compile_mode reaches DINOv2's per-block torch.compile (it was dropped there: a max-autotune setting ran
    torch's default mode), every block of student and teacher; so does model.compile_tuning, as inductor options."""
    from torch import nn

    from engine.train import Trainer

    seen = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: seen.append((type(self).__name__, repr(kw))))
    tuned = {"options": {"coordinate_descent_tuning": True}}
    for mode, tuning, want in (("max-autotune-no-cudagraphs", True, {"mode": "max-autotune-no-cudagraphs"}),
                               ("auto", True, tuned),  # the DINOv2 recipes' model.compile_tuning
                               ("auto", False, {"mode": None}), ("default", False, {"mode": "default"})):
        seen.clear()
        run = tmp_path / f"{mode}-{tuning}"
        cfg = load_config(RECIPES / "quickstart_dinov2.yaml", TINY + [
            "data.shards=synthetic", "train.steps=1", "train.batch_size=2", "log.tensorboard=false",
            "log.progress=false", "model.compile=true", f"model.compile_mode={mode}",
            f"model.compile_tuning={str(tuning).lower()}", f"run.dir={run}"])
        Trainer(cfg, run, out=open(os.devnull, "w"))
        depth = cfg.objective.dinov2.encoder_kwargs["depth"]
        assert depth >= 2 and len(seen) == 2 * depth and {m for _, m in seen} == {repr(want)}, seen
    assert load_config(RECIPES / "quickstart_dinov2.yaml", []).model.compile_tuning is True  # from _dinov2.yaml


def test_fused_losses_with_softmax_centering(monkeypatch):
    """centering: softmax. Fused, the class-token and iBOT targets are FactoredTargets (kernels.softmax_targets, its
    Triton row pass forced and interpreted) and both cross-entropies run on the Triton kernels; the losses, the heads'
    gradients and the running centers match the torch form's, which writes the targets out."""
    import functools

    import kernels

    for name in ("crop_cross_entropy", "soft_cross_entropy"):
        monkeypatch.setattr(kernels, name, functools.partial(getattr(kernels, name), impl="triton"))
    real, factored = kernels.softmax_targets, []

    def softmax_targets(*args, **kw):
        factored.append(kw.get("factored", False))
        return real(*args, impl="triton", **kw)

    monkeypatch.setattr(kernels, "softmax_targets", softmax_targets)
    out, grads, centers = [], [], []
    for fused in (True, False):
        model, _ = tiny_model("objective.dinov2.centering=softmax", "objective.dinov2.mask_probability=1.0")
        model.fused_ce = model.fused_dino = fused
        glob, loc = model.synthetic_batch(2, "cpu")
        for step in range(2):  # the second step centers by a running center that is no longer zero
            torch.manual_seed(1 + step)
            res = model([glob, loc])
        res["loss"].backward()
        out.append(res)
        grads.append([h.prototypes.weight.grad.clone() for h in (model.dino_head, model._student_ibot_head())])
        centers.append([model.dino_center.clone(), model.ibot_center.clone()])
    assert factored == [True, True, True, True], factored  # class tokens and masked patches, two steps, fused only
    assert out[0]["dino"] > 0 and out[0]["ibot"] > 0 and centers[0][0].abs().sum() > 0
    for key in ("dino", "ibot", "loss"):
        torch.testing.assert_close(out[0][key], out[1][key], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[0] + centers[0], grads[1] + centers[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
