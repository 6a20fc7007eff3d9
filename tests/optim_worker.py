"""Run under torchrun (2 gloo ranks) by tests/test_engine_optim.py: one FSDP2 model stepped by torch's fused AdamW
and a copy stepped by engine.optim.ShardLocalAdamW, from the same start, with a skipped step (found_inf) among them.
Rank 0 writes whether parameters, moments and step counts agree bit for bit, which tensors the fused op was given,
and the live DTensorSpec count after each optimizer's step; the gradient norms of torch's clip_grad_norm_ and
engine.optim.clip_grad_norm (no clipping in the steps, then one clip to 0.05 each), and DINOv2's EMA lerp over the
shards vs over the DTensors."""
import copy
import gc
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from engine.optim import ShardLocalAdamW, clip_grad_norm, paired_locals
from engine.train import teardown_distributed


def main(out: str) -> None:
    """The comparison, then the process group's end, with every FSDP2 module and optimizer of `compare` freed first
    (teardown_distributed collects their cycles while the interpreter is whole)."""
    dist.init_process_group("gloo")
    result = compare()
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    teardown_distributed()  # a barrier first: gloo aborts a rank that exits while the other still talks


def compare() -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(24, 24) for _ in range(4)], nn.LayerNorm(24))
    def sharded_copy():
        m = copy.deepcopy(base)
        for layer in m:
            fully_shard(layer)
        return fully_shard(m)

    models = [sharded_copy(), sharded_copy()]

    def groups(m):  # two groups, as the engine's (decay / no decay), the second at another lr
        ps = list(m.parameters())
        return [{"params": ps[::2], "weight_decay": 0.05}, {"params": ps[1::2], "weight_decay": 0.0, "lr": 3e-3}]

    ref = torch.optim.AdamW(groups(models[0]), lr=1e-3, betas=(0.9, 0.95), fused=True)
    ours = ShardLocalAdamW(groups(models[1]), lr=1e-3, betas=(0.9, 0.95), fused=True)
    seen = []
    real = torch._fused_adamw_

    def spy(params, *a, **k):
        seen.append(any(isinstance(t, DTensor) for t in params))
        return real(params, *a, **k)

    specs, norms = [], []
    torch.manual_seed(1 + dist.get_rank())
    for step in range(6):
        x = torch.randn(8, 24)
        for m, opt in zip(models, (ref, ours)):
            m(x).square().mean().backward()
            max_norm = float("inf")  # the norm, no clipping (a coefficient of exactly 1): AdamW compared alone
            if opt is ref:
                norms.append(float(torch.nn.utils.clip_grad_norm_(list(m.parameters()), max_norm,
                                                                  foreach=True).full_tensor()))
            else:
                norms.append(float(clip_grad_norm(list(m.parameters()), max_norm)))
            opt.found_inf = torch.ones(()) if step == 3 else torch.zeros(())
            torch._fused_adamw_ = spy if opt is ours else real
            opt.step()
            torch._fused_adamw_ = real
            opt.zero_grad(set_to_none=True)
            gc.collect()  # the live count after each optimizer's step: (after torch's, after ours)
            specs.append(sum(type(o).__name__ == "DTensorSpec" for o in gc.get_objects()))
    same = all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(*(m.parameters() for m in models)))
    state_same = True
    for pa, pb in zip(*(m.parameters() for m in models)):
        sa, sb = ref.state[pa], ours.state[pb]
        state_same &= sorted(sa) == sorted(sb) and float(sa["step"]) == float(sb["step"]) == 5.0
        state_same &= all(type(sa[k]) is type(sb[k]) and torch.equal(sa[k].full_tensor(), sb[k].full_tensor())
                          for k in ("exp_avg", "exp_avg_sq"))
    moved = any(not torch.equal(a, b.full_tensor()) for a, b in zip(base.parameters(), models[1].parameters()))
    # clipping: one more backward, clipped at 0.05 by torch's clip_grad_norm_ (models[0]) and ours (models[1])
    x = torch.randn(8, 24)
    for m in models:
        m(x).square().mean().backward()
    clip_ref = float(torch.nn.utils.clip_grad_norm_(list(models[0].parameters()), 0.05, foreach=True).full_tensor())
    clip_ours = float(clip_grad_norm(list(models[1].parameters()), 0.05))
    clipped = [(a.grad.full_tensor(), b.grad.full_tensor()) for a, b in zip(*(m.parameters() for m in models))]
    clip_close = all(torch.allclose(a, b, rtol=1e-5, atol=1e-9) for a, b in clipped)
    clipped_norm = float(torch.stack([b.norm() for _, b in clipped]).norm())
    # DINOv2's teacher EMA: lerp over the local shards vs over the DTensors
    teachers = [sharded_copy(), sharded_copy()]
    student = [p.detach() for p in models[1].parameters()]
    with torch.no_grad():  # as the objective's on_step_end
        torch._foreach_lerp_(list(teachers[0].parameters()), student, 0.3)
        t_local, s_local = paired_locals(list(teachers[1].parameters()), student)
        torch._foreach_lerp_(t_local, s_local, 0.3)
    ema_local = not any(isinstance(t, DTensor) for t in t_local + s_local)
    ema_same = all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(*(t.parameters() for t in teachers)))
    return {"params_equal": same, "state_equal": state_same, "moved": moved, "dtensor_args": seen,
            "specs": [specs[::2], specs[1::2]], "norms": [norms[::2], norms[1::2]],
            "clip": [clip_ref, clip_ours, clipped_norm], "clip_close": clip_close, "ema_local": ema_local,
            "ema_equal": ema_same}


if __name__ == "__main__":
    main(sys.argv[1])
