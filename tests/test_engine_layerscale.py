"""model.fold_layerscale: each block's LayerScale applied by the linear layer before it (engine.models.fold_layer_scale)
gives the same outputs and gradients as timm's blocks, keeps the parameters and state dict, and runs through DINOv2's
packed path and torch.compile."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import LayerScale
from torch import nn

from engine.config import load_config
from engine.models import FoldedLayerScale, LayerScaleFolded, LayerScaleLinear, create_encoder, fold_layer_scale
from engine.objectives import build_objective
from tests.engine_helpers import DINOV2_TINY, TINY

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SMALL = dict(img_size=28, embed_dim=48, depth=2, num_heads=3)


def _dinov2_vit(name="vit_small_patch14_reg4_dinov2", **kw):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=0, **{**SMALL, **kw})
    with torch.no_grad():  # gammas far from timm's 1e-5 and from each other, biases nonzero: the fold must carry them
        for mod in m.modules():
            if isinstance(mod, LayerScale):
                mod.gamma.normal_(0.0, 1.0)
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0.0, 0.5)
    return m


def _grads(model, x, g):
    out = model(x)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [p for _, p in model.named_parameters() if p.requires_grad], g)
    return out, dict(zip(names, grads))


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_giant_patch14_reg4_dinov2"])
def test_fold_gives_timms_outputs_and_gradients(name):
    """ViT-S/14 (Mlp) and ViT-g/14 (SwiGLU) with registers: outputs and every parameter's gradient, LayerScale's
    gamma included, as timm computes them; the switch off is timm's computation again."""
    ref = _dinov2_vit(name)
    model = copy.deepcopy(ref)
    assert fold_layer_scale(model) == 2 * len(model.blocks)
    for b in model.blocks:
        assert type(b.ls1) is LayerScaleFolded and type(b.attn.proj) is LayerScaleLinear
        assert type(b.ls2) is LayerScaleFolded and type(b.mlp.fc2) is LayerScaleLinear
        assert b.attn.proj._scale is b.ls1 and b.mlp.fc2._scale is b.ls2
    x = torch.randn(2, 3, 28, 28)
    g = torch.randn(2, ref.num_features)
    out_ref, g_ref = _grads(ref, x, g)
    out, g_fold = _grads(model, x, g)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    assert g_fold.keys() == g_ref.keys() and any(".ls1.gamma" in n for n in g_fold)
    for n in g_ref:
        torch.testing.assert_close(g_fold[n], g_ref[n], rtol=1e-4, atol=1e-5, msg=n)
    for mod in model.modules():  # the switch off, as bench ab sets it: every module that has it
        if isinstance(mod, FoldedLayerScale):
            mod.fold_layerscale = False
    torch.testing.assert_close(model(x), out_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("policy", ["full", "save_matmuls"])
def test_fold_under_activation_checkpointing(policy):
    """The folded blocks recomputed in backward (model.activation_checkpointing, every block, both policies): the
    outputs and every gradient as timm's blocks without checkpointing."""
    from engine.train import checkpoint_blocks

    ref = _dinov2_vit()
    model = copy.deepcopy(ref)
    fold_layer_scale(model)
    assert checkpoint_blocks(model.blocks, 1, policy) == len(model.blocks)
    x = torch.randn(2, 3, 28, 28)
    g = torch.randn(2, ref.num_features)
    out_ref, g_ref = _grads(ref, x, g)
    out, g_fold = _grads(model, x, g)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for n in g_ref:
        torch.testing.assert_close(g_fold[n], g_ref[n], rtol=1e-4, atol=1e-5, msg=n)


def test_parameters_state_dict_and_copies_are_unchanged():
    """The same parameter names and objects (gamma registered once, under its LayerScale), a state dict that loads
    strictly into timm's model, and a deepcopy (DINOv2's teacher) whose linear layers read their own copy's gamma."""
    ref = _dinov2_vit()
    model = copy.deepcopy(ref)
    before = list(model.named_parameters())
    fold_layer_scale(model)
    assert list(model.named_parameters()) == before
    assert "_scale" not in dict(model.blocks[0].attn.proj.named_children())
    timm_model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, **SMALL)
    timm_model.load_state_dict(model.state_dict())
    twin = copy.deepcopy(model)
    for b, t in zip(model.blocks, twin.blocks):
        assert t.attn.proj._scale is t.ls1 and t.mlp.fc2._scale is t.ls2
        assert t.ls1 is not b.ls1
    with torch.no_grad():
        twin.blocks[0].ls1.gamma.mul_(2.0)
    x = torch.randn(1, 3, 28, 28)
    assert not torch.allclose(twin(x), model(x))  # the copy's proj reads the copy's gamma, not the original's


def test_models_without_layerscale_are_left_alone():
    enc = create_encoder("vit_tiny_patch16_224", img_size=32, patch_size=8, fold_layerscale=True)
    assert not any(isinstance(m, FoldedLayerScale) for m in enc.modules())
    assert fold_layer_scale(nn.Sequential(nn.Linear(4, 4))) == 0


def test_compiles_without_a_graph_break():
    ref = _dinov2_vit()
    model = copy.deepcopy(ref)
    fold_layer_scale(model)
    fn = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(fn(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe,extra", [("quickstart_dinov2.yaml", DINOV2_TINY), ("quickstart.yaml", TINY)])
def test_objectives_take_the_setting(recipe, extra):
    """DINOv2 (student over packed crops, teacher dense) and MAE built with model.fold_layerscale on and off: the
    same loss. On is the default; MAE's ViTs have no LayerScale, so nothing is folded there."""
    losses = []
    for on in ("true", "false"):
        cfg = load_config(RECIPES / recipe, list(extra) + [f"model.fold_layerscale={on}"])
        torch.manual_seed(0)
        model = build_objective(cfg, torch.device("cpu"))
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, LayerScale):
                    mod.gamma.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
        folded = [m for m in model.modules() if isinstance(m, LayerScaleLinear)]
        depth = cfg.objective.dinov2.encoder_kwargs["depth"] if cfg.objective.name == "dinov2" else 0
        assert len(folded) == (0 if on == "false" else 2 * 2 * depth)  # student and teacher, two per block
        batch = model.synthetic_batch(2, "cpu")
        torch.manual_seed(1)
        losses.append(model(batch)["loss"])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    assert load_config(RECIPES / recipe).model.fold_layerscale is True
