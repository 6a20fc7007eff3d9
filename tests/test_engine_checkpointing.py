"""Activation checkpointing knobs: which blocks (model.ac_every) and what they keep
(model.ac_policy: full recompute, or selective keeping matmul/attention outputs)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.models import create_encoder
from engine.train import checkpoint_blocks


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.n += 1
        return func(*args, **(kwargs or {}))


def run(every=None, policy="full"):
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny_patch16_224", img_size=32, patch_size=8)
    wrapped = checkpoint_blocks(enc.blocks, every, policy) if every else 0
    x = torch.randn(2, 3, 32, 32)
    loss = enc.forward_features(x).square().mean()
    with CountMatmuls() as counter:
        loss.backward()
    grads = torch.cat([p.grad.flatten() for p in enc.parameters()])
    return wrapped, counter.n, grads


def test_every_and_policy_keep_the_gradients_and_change_the_recompute():
    _, base_mm, base = run()
    wrapped, full_mm, full = run(every=1)
    assert wrapped == 12 and torch.allclose(full, base, atol=1e-6)
    # full recompute reruns each block's 6 forward matmuls (qkv, 2 in attention, proj, fc1, fc2)
    assert full_mm > base_mm
    wrapped, half_mm, half = run(every=2)
    assert wrapped == 6 and torch.allclose(half, base, atol=1e-6) and base_mm < half_mm < full_mm
    wrapped, sel_mm, sel = run(every=1, policy="save_matmuls")
    assert wrapped == 12 and torch.allclose(sel, base, atol=1e-6)
    assert sel_mm == base_mm  # selective: the matmul outputs were kept, none recomputed


def test_bad_every_is_an_error():
    enc = create_encoder("vit_tiny_patch16_224", img_size=32, patch_size=8)
    with pytest.raises(ValueError, match="ac_every"):
        checkpoint_blocks(enc.blocks, 0)
