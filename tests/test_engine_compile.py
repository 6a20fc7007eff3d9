"""Regional torch.compile: identical blocks share one graph (no per-block recompiles), and the
compiled DINOv2 step computes what the eager one does."""
from __future__ import annotations

import copy
import random

import pytest
import torch
from torch._dynamo.utils import counters

from engine.config import load_config
from engine.models import DropPath, create_encoder
from tests.engine_helpers import DINOV2_TINY


def test_drop_path_is_timm_compatible_and_drops_at_its_rate():
    import timm

    enc = create_encoder("vit_tiny_patch16_224", img_size=32, patch_size=8, drop_path=0.3)
    drops = [m for m in enc.modules() if isinstance(m, DropPath)]
    assert len(drops) == 22  # 12 blocks x 2 branches, block 0 has p = 0 (Identity)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8)
    ref.load_state_dict(enc.state_dict())  # no extra keys: the probability is not persistent
    d = DropPath(0.3).train()
    y = d(torch.ones(40000, 3))
    assert (y[:, 0] == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.allclose(y[y > 0], torch.tensor(1 / 0.7))
    assert torch.equal(d.eval()(y), y)


def test_blocks_with_different_drop_path_share_one_compiled_graph():
    torch._dynamo.reset()
    enc = create_encoder("vit_tiny_patch16_224", img_size=32, patch_size=8, drop_path=0.3).train()
    for block in enc.blocks:
        block.compile(backend="eager")
    counters.clear()
    x = torch.randn(2, 17, 192)
    for block in enc.blocks:
        x = block(x)
    # block 0 (no drop path) and blocks 1-11; timm's float probabilities gave one graph per block
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def test_dinov2_compiled_regions_match_eager():
    from engine.objectives import build_objective

    torch._dynamo.reset()
    cfg = load_config("recipes/quickstart_dinov2.yaml", DINOV2_TINY + ["train.device=cpu", "model.drop_path=0.2"])
    torch.manual_seed(0)
    eager = build_objective(cfg, torch.device("cpu"))
    compiled = copy.deepcopy(eager)
    compiled.compile_regions(backend="eager")
    batch = eager.synthetic_batch(4, "cpu")
    out = []
    for model in (eager, compiled):
        torch.manual_seed(1)
        random.seed(1)
        loss = model(batch)["loss"]
        loss.backward()
        out.append((loss.detach(), model.encoder.blocks[1].mlp.fc1.weight.grad.clone()))
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-5)
    assert torch.allclose(out[0][1], out[1][1], rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()
