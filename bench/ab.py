"""In-process A/B of a runtime switch of the training step: one Trainer on a recipe (synthetic batch, the engine's
own train_step), a boolean attribute of its objective flipped between blocks of timed steps.

    python -m bench ab --recipe recipes/vit_l_dinov2.yaml --batch 32 --switch fused_ce

Separate `bench train` processes, one per setting, spread by about +-4 % on an H200 at DINOv2 ViT-L (compile, clocks,
allocator state differ from process to process); a 2 % change hides in that. Here both settings share the process,
the compiled blocks and the batch. After --warmup steps with each setting, --blocks rounds time --steps steps with
each, the order alternating from round to round (true first, then false first), each block after one untimed step.
The result has every block's mean step time, the means and the ratio (off / on: > 1 means the switch on is faster),
and how many blocks of one setting were faster than every block of the other. JSON + PNG under bench/results/.
The switch must be a bool attribute that the objective or its modules read at every step (DINOv2's fused_ce, fused_dino,
pack_crops; PatchMatmul's matmul, there unless model.patch_matmul=false); every module holding it is set.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import torch

from bench.common import card_name, print_table, write_result


def interleave(step: Callable[[], None], set_switch: Callable[[bool], None], blocks: int, steps: int, warmup: int,
               sync: Callable[[], None]) -> dict[bool, list[float]]:
    """Mean step time (ms) of each block, per setting: `warmup` steps with each setting first (compiles both), then
    `blocks` rounds of one untimed and `steps` timed steps per setting, the order alternating round by round."""
    for value in (True, False):
        set_switch(value)
        for _ in range(warmup):
            step()
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(blocks):
        for value in ((True, False) if r % 2 == 0 else (False, True)):
            set_switch(value)
            step()
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            times[value].append((time.perf_counter() - t0) / steps * 1e3)
    return times


def summarize(times: dict[bool, list[float]], batch: int) -> dict[str, Any]:
    on, off = times[True], times[False]
    mean_on, mean_off = sum(on) / len(on), sum(off) / len(off)
    return {"on_block_ms": on, "off_block_ms": off, "on_step_ms": mean_on, "off_step_ms": mean_off,
            "on_img_s": batch / mean_on * 1e3, "off_img_s": batch / mean_off * 1e3, "speedup_on": mean_off / mean_on,
            # blocks of each setting faster than every block of the other: a separation no spread explains
            "on_blocks_beating_all_off": sum(t < min(off) for t in on),
            "off_blocks_beating_all_on": sum(t < min(on) for t in off)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--batch", type=int, default=None, help="per-GPU batch (default: the recipe's micro_batch)")
    ap.add_argument("--switch", required=True,
                    help="a bool attribute of the objective or of its modules, set on every one that has it (e.g. "
                         "DINOv2's fused_ce or fused_dino; matmul, the PatchMatmul patch embeddings' "
                         "(model.patch_matmul, default true))")
    ap.add_argument("--blocks", type=int, default=6, help="rounds; each times one block per setting")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per block")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps per setting before the rounds")
    ap.add_argument("--kernels", default="auto", choices=("auto", "triton", "torch"), help="model.kernels")
    ap.add_argument("--override", nargs="*", default=[], help="recipe overrides (key=value)")
    ap.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)  # tests: the Trainer's run folder
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    if min(args.blocks, args.steps) < 1 or args.warmup < 0:
        ap.error("--blocks and --steps take positive counts, --warmup a count >= 0")

    from bench.train import synthetic_trainer
    from engine.config import load_config

    cfg = load_config(args.recipe, args.override)
    batch = args.batch or cfg.train.micro_batch or cfg.train.batch_size
    cfg.model.kernels = args.kernels
    trainer = synthetic_trainer(cfg, batch, args.out_dir or "/tmp/bench-ab-unused")
    model = trainer.model
    holders = [m for m in model.modules() if isinstance(getattr(m, args.switch, None), bool)]
    if not holders:
        ap.error(f"--switch {args.switch!r}: neither the {cfg.objective.name} objective nor any of its modules has a "
                 "bool attribute of that name")
    start = [getattr(m, args.switch) for m in holders]
    batch0 = next(trainer.batches())

    def step():
        trainer.set_lr()
        trainer.train_step([batch0])

    def set_switch(value: bool):
        for m in holders:
            setattr(m, args.switch, value)

    cuda = trainer.device.type == "cuda"
    times = interleave(step, set_switch, args.blocks, args.steps, args.warmup,
                       torch.cuda.synchronize if cuda else (lambda: None))
    for m, value in zip(holders, start):
        setattr(m, args.switch, value)
    row = {"recipe": args.recipe, "model": cfg.model.name, "batch": batch, "switch": args.switch,
           "modules_switched": len(holders), "kernels": args.kernels, **summarize(times, batch)}
    print_table([row], ["model", "batch", "switch", "on_img_s", "off_img_s", "speedup_on", "on_blocks_beating_all_off",
                        "off_blocks_beating_all_on"])
    path = write_result("ab", {"device": str(trainer.device), "blocks": args.blocks, "steps": args.steps,
                               "warmup": args.warmup, "rows": [row]}, argv if argv is not None else [],
                        tag=f"{Path(args.recipe).stem}-{args.switch}" + (f"-{args.tag}" if args.tag else ""))
    _plot(path.with_suffix(".png"), times, f"{cfg.model.name} batch {batch}: {args.switch} on / off, {card_name()}")
    return 0


def _plot(path: Path, times: dict[bool, list[float]], title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for value, marker in ((True, "o"), (False, "s")):
        ax.plot(range(1, len(times[value]) + 1), times[value], marker=marker, label=f"{'on' if value else 'off'}")
    ax.set_xlabel("round")
    ax.set_ylabel("ms / step (block mean)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
