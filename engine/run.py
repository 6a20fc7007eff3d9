"""Train a recipe: `python -m engine.run RECIPE [key.sub=value ...] [--dry-run]`.

Outputs go to the run directory (default runs/<recipe name>, or run.dir=PATH):
config.yaml (the resolved recipe), metrics.jsonl, tensorboard/, checkpoints/.
Running the same command again resumes from the newest checkpoint there.
Multi-GPU: `torchrun --nproc_per_node=N -m engine.run RECIPE`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from engine.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.run",
        description="Pretrain a vision foundation model from a recipe (YAML under recipes/).",
        epilog="Examples:\n"
        "  python -m engine.run recipes/quickstart.yaml\n"
        "  python -m engine.run recipes/vit_b_mae.yaml data.shards=/data/shards train.batch_size=2048\n"
        "  python -m engine.run recipes/vit_g_mae.yaml --dry-run\n"
        "  python -m engine.run recipes/vit_g_mae.yaml --dry-run model.ac_every=2 --gpus 1 2 8\n"
        "  python -m engine.run recipes/vit_b_mae.yaml recipes/data/us_only.yaml   # an overlay\n"
        "Override any key as section.key=value (values are YAML: 1e-4, true, [0.9, 0.95]).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="recipe YAML file (e.g. recipes/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value | overlay.yaml",
                   help="recipe overrides, and overlay recipes applied in order (e.g. recipes/data/ladder_2m.yaml)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (parameters, FLOPs/image, memory per GPU with the largest micro batch and "
                        "the lightest activation checkpointing that fit, steps, data) and exit; needs no GPU and "
                        "no data")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8], metavar="N",
                   help="GPU counts for the --dry-run memory estimate (default: 1 8)")
    p.add_argument("--stop-after-steps", type=int, default=None, metavar="K",
                   help="stop with a checkpoint after K steps of this invocation (for job time limits); "
                        "the same command resumes")
    return p


def _gpu_counts_last(argv: list[str]) -> list[str]:
    """Move `--gpus N [N ...]` (its integers only) to the end, so that an override after it is not read as a count."""
    head, tail, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--gpus":
            tail.append(argv[i])
            i += 1
            while i < len(argv) and argv[i].isdigit():
                tail.append(argv[i])
                i += 1
        else:
            head.append(argv[i])
            i += 1
    return head + tail


def main(argv: list[str] | None = None) -> int:
    # intermixed: overrides may follow the options too (`RECIPE --dry-run model.x=1 --gpus 1 8 train.y=2`)
    args = build_parser().parse_intermixed_args(_gpu_counts_last(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        overlays = [a for a in args.overrides if "=" not in a and a.endswith((".yaml", ".yml"))]
        overrides = [a for a in args.overrides if a not in overlays]
        cfg = load_config(args.recipe, overrides, overlays)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from engine.plan import format_plan, gpu_label, lighter_checkpointing, make_plan

        try:
            plan = make_plan(cfg, world=1)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(format_plan(cfg, plan, tuple(args.gpus)))
        lighter = lighter_checkpointing(cfg, plan, tuple(args.gpus))
        if lighter:  # each checkpointed block runs its forward twice: where less checkpointing fits, it is faster
            print("lighter checkpointing that also fits (each checkpointed block's forward runs twice; faster):")
            for n, text in lighter.items():
                print(f"  {gpu_label(n)}  {text}")
        return 0

    import torch

    from loaders import prepare_cuda

    prepare_cuda()  # 32 CUDA hardware queues (unless set): the GPU decoders' syncs stop queueing behind the step
    from engine.train import Trainer, TrainingStopped, teardown_distributed

    run_dir = Path(cfg.run.dir or Path("runs") / (cfg.run.name or "run"))
    world, capacity = _gpu_memory(cfg)
    if capacity and int(os.environ.get("RANK", 0)) == 0:
        notice = _memory_notice(cfg, world, capacity)
        if notice:
            print(notice, file=sys.stderr)
    try:
        trainer = Trainer(cfg, run_dir)
        if trainer.dist.main:
            print(f"run directory {run_dir}  device {trainer.device}  steps {trainer.total_steps:,}", file=sys.stderr)
        trainer.fit(stop_after=args.stop_after_steps)
    except (TrainingStopped, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError as e:
        advice = _advice(cfg, world, capacity, failed=True) or "CUDA ran out of memory."
        print(f"error: {advice} The run resumes from its newest checkpoint in {run_dir} with the same command "
              f"(and any of these overrides).\n({str(e).splitlines()[0] if str(e) else 'torch.OutOfMemoryError'})",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    del trainer  # its FSDP2 modules freed before the process group ends (teardown_distributed)
    teardown_distributed()
    return 0


def _gpu_memory(cfg) -> tuple[int, float | None]:
    """(GPUs in this run, bytes of this rank's GPU), or (world, None) when the run is not on CUDA."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        return world, None
    try:
        return world, float(torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory)
    except Exception:  # noqa: BLE001 - the advice is optional; the trainer reports device problems itself
        return world, None


def _advice(cfg, world: int, capacity: float | None, failed: bool = False) -> str | None:
    """engine.plan.memory_advice, or None if the plan cannot be made (the advice must never stop a run)."""
    from engine.plan import memory_advice

    try:
        return memory_advice(cfg, world, capacity, failed=failed)
    except Exception:  # noqa: BLE001
        return None


def _memory_notice(cfg, world: int, capacity: float) -> str | None:
    """Before a GPU run: a warning where the plan's estimate may not fit this card (engine.plan.memory_advice), else,
    with activation checkpointing on, a note naming a lighter setting that fits (engine.plan.lighter_checkpointing),
    from one plan; None otherwise, or if the plan cannot be made (a notice must never stop a run)."""
    from engine.plan import USABLE_FRACTION, lighter_checkpointing, make_plan, memory_advice

    try:
        plan = make_plan(cfg, world)
        advice = memory_advice(cfg, world, capacity, plan=plan)
        if advice:
            return f"warning: {advice}"
        if not cfg.model.activation_checkpointing:
            return None
        lighter = lighter_checkpointing(cfg, plan, (world,), capacity * USABLE_FRACTION).get(world)
    except Exception:  # noqa: BLE001
        return None
    return (f"note: activation checkpointing is on, but on this {capacity / 2**30:.0f} GiB GPU the plan also fits "
            f"{lighter} (each checkpointed block's forward runs twice, so that is faster)") if lighter else None


if __name__ == "__main__":
    sys.exit(main())
