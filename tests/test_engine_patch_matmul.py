"""model.patch_matmul: the patch embedding as one matrix product (engine.models.PatchMatmul) gives the convolution's
output and gradients, keeps timm's state dict, and runs through both objectives."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from engine.config import load_config
from engine.models import PatchMatmul, create_encoder, matmul_patch_embed
from engine.objectives import build_objective
from tests.engine_helpers import DINOV2_TINY, TINY

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize("H,W,p,q", [(32, 32, 8, 8), (30, 45, 14, 14), (16, 24, 4, 8)])
def test_patch_matmul_is_the_convolution(H, W, p, q):
    """Images of whole patches and with a remainder (dropped as the convolution drops it), square and oblong patches;
    values, the weight's and bias's gradients, and the input's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 24, (p, q), stride=(p, q))
    mm = nn.Conv2d(3, 24, (p, q), stride=(p, q))
    mm.load_state_dict(conv.state_dict())
    assert matmul_patch_embed(mm) == 1 and type(mm) is PatchMatmul and mm.matmul
    x = torch.randn(2, 3, H, W, requires_grad=True)
    a, b = conv(x), mm(x)
    assert a.shape == b.shape == (2, 24, H // p, W // q)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(a)
    ga = torch.autograd.grad(a, (x, conv.weight, conv.bias), g)
    gb = torch.autograd.grad(b, (x, mm.weight, mm.bias), g)
    for u, v in zip(gb, ga):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
    mm.matmul = False  # the switch: back to the convolution itself
    assert torch.equal(mm(x), a)


def test_bf16_autocast_casts_before_the_patch_copy():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 4, stride=4)
    x = torch.randn(2, 3, 16, 16)
    ref = conv(x)
    matmul_patch_embed(conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


def test_only_patch_convolutions_are_swapped():
    m = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 2, stride=1),
                      nn.Conv2d(8, 8, 2, stride=2, groups=2))
    assert matmul_patch_embed(m) == 1
    assert [type(c) for c in m] == [PatchMatmul, nn.Conv2d, nn.Conv2d, nn.Conv2d]


def test_encoder_state_dict_is_timms_and_outputs_match():
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny_patch16_224", img_size=32, patch_size=8, patch_matmul=True).eval()
    assert type(enc.patch_embed.proj) is PatchMatmul
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8).eval()
    ref.load_state_dict(enc.state_dict())  # strict: same keys and shapes
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc(x), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe,extra", [("quickstart.yaml", TINY), ("quickstart_dinov2.yaml", DINOV2_TINY)])
def test_objectives_take_the_setting(recipe, extra):
    """MAE and DINOv2 (student and teacher) built with model.patch_matmul=true: the same loss as the convolution."""
    losses = []
    for on in ("true", "false"):
        cfg = load_config(RECIPES / recipe, list(extra) + [f"model.patch_matmul={on}"])
        torch.manual_seed(0)
        model = build_objective(cfg, torch.device("cpu"))
        swapped = [m for m in model.modules() if isinstance(m, PatchMatmul)]
        assert len(swapped) == (0 if on == "false" else 2 if cfg.objective.name == "dinov2" else 1)
        batch = model.synthetic_batch(2, "cpu")
        torch.manual_seed(1)
        losses.append(model(batch)["loss"])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)


def test_compiles_whole_under_autocast():
    """The whole-model MAE step is compiled as one graph (CUDA graphs on a GPU): PatchMatmul, autocast query and cast
    included, must trace without a graph break."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 4, stride=4)
    ref = nn.Conv2d(3, 16, 4, stride=4)
    ref.load_state_dict(conv.state_dict())
    matmul_patch_embed(conv)
    x = torch.randn(2, 3, 16, 16)
    fn = torch.compile(lambda t: conv(t).flatten(2).transpose(1, 2), fullgraph=True, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(x)
        want = ref(x).flatten(2).transpose(1, 2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_meta_tensors_and_the_default():
    """engine.plan counts FLOPs on meta tensors, which have no autocast state: PatchMatmul runs there with the
    convolution's shape and FLOPs. The setting is on by default (timed on an H200, engine/config.py)."""
    from torch.utils.flop_counter import FlopCounterMode

    conv = nn.Conv2d(3, 16, 4, stride=4, device="meta")
    x = torch.empty(2, 3, 18, 17, device="meta")
    with FlopCounterMode(display=False) as fc_conv:
        want = conv(x)
    matmul_patch_embed(conv)
    with FlopCounterMode(display=False) as fc_mm:
        out = conv(x)
    assert out.shape == want.shape == (2, 16, 4, 4)
    assert fc_mm.get_total_flops() == fc_conv.get_total_flops() > 0
    assert load_config(RECIPES / "quickstart.yaml").model.patch_matmul is True
