"""The engine's optimizer: torch's fused AdamW, stepped on each FSDP2 parameter's local shard.

Under FSDP2 the parameters, their gradients and AdamW's moments are DTensors, and `torch.optim.AdamW(fused=True)` runs
its one fused op through DTensor's dispatch. In torch 2.10 and 2.11 that dispatch keeps one `DTensorSpec` alive per
parameter per step (pytorch/pytorch#188174): host memory grows without bound, and Python's full collections, which
walk every one of them, grow longer step after step (DINOv2 ViT-L under FSDP2 on two H200s, torch 2.11: 22 ms at step
49 to 250 ms at step 283, `bench/results/train-scaling-...-s30-leak-torch.json`; none of 1 ms or more with this module,
`...-s30-leak-fixed.json`). Measured on the CPU under two gloo ranks
(`bench/results/train-probe-cpu-2026-11-30-s29-dtensor-leak.json`, 20 parameters): torch 2.11 fused +20 specs a
step, foreach and torch 2.14 none. Its foreach ops over DTensors (clip_grad_norm_, DINOv2's teacher EMA) keep each
call's argument specs in tuples; `clip_grad_norm` and `paired_locals` below run those on the shards too.

AdamW is elementwise, so the same fused kernel over the local shards is the same update, bit for bit, with no DTensor
dispatch at all. `ShardLocalAdamW` does that when its parameters are DTensors and is torch's AdamW otherwise. Its state
(step, exp_avg, exp_avg_sq; the moments DTensors like the parameters) is torch's, so state dicts and sharded
checkpoints are unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor


try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed: no DTensors to meet
    DTensor = None


def _is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    """A DTensor's shard on this rank (the same storage, so in-place updates reach the DTensor); a tensor as it is."""
    return t.to_local() if _is_dtensor(t) else t


def paired_locals(a: list[Tensor], b: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Two lists of tensors for an elementwise foreach op between them (e.g. DINOv2's teacher EMA): their local shards
    where every pair is DTensors of one shape, mesh and placements (FSDP2 shards both alike), so that the op runs no
    DTensor dispatch (torch 2.11's keeps each call's argument specs alive); otherwise the lists as they are."""
    if not any(_is_dtensor(x) for x in a):
        return a, b
    if all(_is_dtensor(x) and _is_dtensor(y) and x.shape == y.shape and x.device_mesh == y.device_mesh
           and x.placements == y.placements for x, y in zip(a, b, strict=True)):
        return [x.to_local() for x in a], [y.to_local() for y in b]
    return a, b


class ShardLocalAdamW(torch.optim.AdamW):
    """torch.optim.AdamW (fused by default) whose step, when any parameter is a DTensor (FSDP2), runs the fused kernel
    on the local shards instead of through DTensor's dispatch. The `grad_scale` and `found_inf` attributes act as in
    torch's fused step (found_inf = 1 leaves parameters, moments and step count as they were). Options the fused
    kernel does not take (amsgrad, maximize, differentiable, foreach / plain loops, a closure) go to torch's step."""

    def __init__(self, params, **kwargs):
        kwargs.setdefault("fused", True)
        super().__init__(params, **kwargs)
        self._sharded: bool | None = None  # decided at the first step: FSDP2 shards the parameters before it

    def _takes_local_step(self) -> bool:
        if self._sharded is None:
            self._sharded = any(_is_dtensor(p) for g in self.param_groups for p in g["params"])
        return self._sharded and all(
            g.get("fused") and not g.get("amsgrad") and not g.get("maximize") and not g.get("differentiable")
            for g in self.param_groups)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None or not self._takes_local_step():
            return super().step(closure)
        self.step_local()
        return None

    @torch.no_grad()
    def step_local(self) -> None:
        """The fused AdamW step over the parameters' local tensors (any parameters: tests call it on plain ones)."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            by_device: dict[tuple, tuple[list, list, list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:  # as torch's fused AdamW lays it out
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                local = _local(p)
                if state["step"].device != local.device:  # as torch's load_state_dict puts it for a fused step
                    state["step"] = state["step"].to(device=local.device, dtype=torch.float32)
                lists = by_device.setdefault((local.device, local.dtype), ([], [], [], [], []))
                for dest, t in zip(lists, (local, _local(p.grad), _local(state["exp_avg"]),
                                           _local(state["exp_avg_sq"]), state["step"])):
                    dest.append(t)
            beta1, beta2 = (float(b) for b in group["betas"])
            for (device, _), (params, grads, exp_avgs, exp_avg_sqs, steps) in by_device.items():
                scale = grad_scale.to(device, non_blocking=True) if grad_scale is not None else None
                inf = found_inf.to(device, non_blocking=True) if found_inf is not None else None
                lr = group["lr"]
                if isinstance(lr, Tensor) and lr.device.type != "cpu":
                    lr = lr.to(device, non_blocking=True)
                torch._foreach_add_(steps, 1)
                torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=lr,
                                    beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                                    maximize=False, grad_scale=scale, found_inf=inf)
                if inf is not None:  # a skipped step does not count
                    torch._foreach_sub_(steps, [inf] * len(steps))


def clip_grad_norm(params, max_norm: float) -> Tensor:
    """torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True), for FSDP2's DTensor gradients computed on the
    local shards: the squared norms of this rank's shards summed, one all-reduce over the mesh dimensions the
    gradients are sharded on, the same clip coefficient (max_norm / (norm + 1e-6), at most 1) applied in place.
    Returns the total norm as a plain tensor. torch 2.11's foreach ops over DTensors keep each call's argument specs
    alive (9 tuples a step in the engine's DINOv2 under FSDP2); this runs no DTensor op. Gradients that are not all
    DTensors sharded on one mesh (or replicated) go to torch's own."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = all(_is_dtensor(g) for g in grads)
    if sharded:
        from torch.distributed.tensor import Replicate, Shard

        mesh, placements = grads[0].device_mesh, grads[0].placements
        sharded = all(g.device_mesh == mesh and g.placements == placements for g in grads) and all(
            isinstance(pl, (Shard, Replicate)) for pl in placements)
    if not sharded:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return norm.full_tensor() if _is_dtensor(norm) else norm
    local = [g.to_local() for g in grads]
    by_device: dict[tuple, list[Tensor]] = {}
    for t in local:
        by_device.setdefault((t.device, t.dtype), []).append(t)
    device = local[0].device
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for ts in by_device.values():
        norms = torch._foreach_norm(ts)
        squares = squares + torch.stack([n.to(device=device, dtype=torch.float32) for n in norms]).square().sum()
    for dim, pl in enumerate(placements):
        if isinstance(pl, Shard):
            torch.distributed.all_reduce(squares, group=mesh.get_group(dim))
    total = squares.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for (dev, _), ts in by_device.items():
        torch._foreach_mul_(ts, coef.to(dev))
    return total
