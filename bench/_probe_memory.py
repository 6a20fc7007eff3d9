"""Where a training step's peak memory comes from: the engine's step (bench train's synthetic trainer) run step by
step, with the device's peak taken per step, against the dry run's estimate; on CUDA the allocator's history over the
whole run, replayed to the moment of the highest allocated total and grouped by where each live block was allocated.

    python -m bench._probe_memory recipes/vit_l_mae.yaml --batch 256 --accum 1 --steps 14 --out /tmp/mem.json
    torchrun --standalone --nproc-per-node 2 -m bench._probe_memory recipes/vit_g_mae.yaml --accum 4 --out m.json

Under torchrun (FSDP2) every rank runs the steps, the estimate is the dry run's for that many GPUs, and rank 0 reports
its own device (and writes --out).

Written to find why MAE steps replayed as CUDA graphs at one micro-batch a step peaked 5-12 % above the estimate
while the same steps at four micro-batches did not (session 25). On the CPU it runs the steps and prints the
estimate (a smoke run: the CPU has no peak to compare).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch

# Frames that say what a block is for: the first frame of a live block's stack (innermost first) whose file holds one
# of these names is its group.
OWNERS = ("/engine/", "/kernels/", "torch/optim/", "torch/nn/utils/clip_grad", "cudagraph_trees", "torch/autograd/",
          "/timm/", "/bench/")


def owner(frames: list[dict]) -> str:
    for f in frames:
        name = f.get("filename", "")
        if any(o in name for o in OWNERS):
            short = name.split("site-packages/")[-1].split("/work/")[-1]
            return f"{short}:{f.get('line')} {f.get('name')}"
    return frames[0].get("name", "?") if frames else "(no stack)"


def live_at_peak(snapshot: dict, device: int = 0) -> tuple[float, dict[str, float], int]:
    """Replay the allocator's trace (alloc / free_completed) to the highest allocated total: (that total in bytes,
    bytes live then per owner, the event's index)."""
    trace = snapshot["device_traces"][device]
    live: dict[int, tuple[int, str]] = {}
    total = best = 0
    best_live: dict[int, tuple[int, str]] = {}
    best_at = -1
    for i, ev in enumerate(trace):
        act = ev["action"]
        if act == "alloc":
            live[ev["addr"]] = (ev["size"], owner(ev.get("frames", [])))
            total += ev["size"]
            if total > best:
                best, best_live, best_at = total, dict(live), i
        elif act == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
    groups: dict[str, float] = defaultdict(float)
    for size, who in best_live.values():
        groups[who] += size
    return best, dict(sorted(groups.items(), key=lambda kv: -kv[1])), best_at


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--batch", type=int, default=None, help="micro batch (default: the recipe's)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches a step")
    p.add_argument("--steps", type=int, default=14, help="steps in all (CUDA graphs record in the first ~10)")
    p.add_argument("--override", nargs="*", default=[], help="key=value for the recipe")
    p.add_argument("--history", action=argparse.BooleanOptionalAction, default=True,
                   help="record the allocator's history (CUDA) and break the peak down")
    p.add_argument("--out", default=None, help="a JSON file for the figures")
    a = p.parse_args(argv)

    from bench.train import synthetic_trainer
    from engine.config import load_config
    from engine.plan import _batch_free_bytes, make_plan

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cfg = load_config(a.recipe, a.override)
    batch = a.batch or cfg.train.micro_batch or cfg.train.batch_size
    plan_cfg = load_config(a.recipe, a.override + [f"train.batch_size={batch * a.accum * world}",
                                                    f"train.micro_batch={batch}"])
    plan = make_plan(plan_cfg, world)
    states, acts = _batch_free_bytes(plan_cfg, plan, world), plan.activation_bytes(batch, world=world)
    gib = 2**30
    say = print if rank == 0 else (lambda *_, **__: None)
    say(f"estimate: {(states + acts) / gib:.2f} GiB = states {states / gib:.2f} + activations {acts / gib:.2f} "
        f"(micro {batch}, {a.accum} a step, {world} GPU{'s' if world > 1 else ''})")
    history = a.history and torch.cuda.is_available()
    if history:  # from before the trainer is built, so that the replay sees every block live at the peak
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                                 max_entries=3_000_000)
    trainer = synthetic_trainer(cfg, batch, "/tmp/probe-memory-unused", world=world, accum=a.accum)
    cuda = trainer.device.type == "cuda"
    data = trainer.batches()
    batch0 = next(data)
    rows = []
    for s in range(a.steps):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trainer.set_lr()
        trainer.train_step([batch0] * a.accum)
        if cuda:
            torch.cuda.synchronize()
            row = {"step": s, "peak_gib": torch.cuda.max_memory_allocated() / gib,
                   "allocated_after_gib": torch.cuda.memory_allocated() / gib,
                   "reserved_gib": torch.cuda.memory_reserved() / gib}
        else:
            row = {"step": s}
        rows.append(row)
        say(json.dumps(row))
    out = {"recipe": a.recipe, "overrides": a.override, "micro_batch": batch, "accum": a.accum, "world": world,
           "graphs": bool(trainer.graphs), "expandable_segments": trainer.expandable_segments,
           "estimate_gib": (states + acts) / gib, "estimate_states_gib": states / gib,
           "estimate_activations_gib": acts / gib, "params": plan.total_params,
           "fp32_params_gib": plan.total_params * 4 / gib, "steps": rows}
    if cuda:
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / gib
        torch.cuda.empty_cache()  # what is left held: live tensors and the CUDA graphs' private pools
        out["held_after_empty_cache_gib"] = torch.cuda.memory_reserved() / gib
        pools: dict[str, float] = defaultdict(float)
        for seg in torch.cuda.memory._snapshot()["segments"]:
            pool = seg.get("segment_pool_id", (0, 0))
            pools["default" if tuple(pool) == (0, 0) else f"private {tuple(pool)}"] += seg["total_size"] / gib
        out["segments_by_pool_gib"] = dict(pools)
        say(f"peak reserved {out['peak_reserved_gib']:.2f} GiB; held after empty_cache "
            f"{out['held_after_empty_cache_gib']:.2f} GiB: {dict(pools)}")
    if cuda and history:
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        best, groups, at = live_at_peak(snap, torch.cuda.current_device())
        out["history_peak_gib"] = best / gib
        out["history_peak_event"] = at
        out["live_at_peak_gib"] = {k: v / gib for k, v in list(groups.items())[:25]}
        say(f"history peak {best / gib:.2f} GiB at event {at}; live then, by owner:")
        for k, v in list(groups.items())[:25]:
            say(f"  {v / gib:8.3f} GiB  {k}")
    if cuda:
        out["card"] = torch.cuda.get_device_name(0)
    out["versions"] = {"torch": torch.__version__}
    args = argv if argv is not None else sys.argv[1:]
    out["command"] = "python -m bench._probe_memory " + " ".join(args)
    if a.out and rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    from engine.train import teardown_distributed

    teardown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
