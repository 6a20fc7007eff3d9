"""`python -m bench train`: training images/sec and MFU of the engine against the naive MAE
that users would otherwise write (timm blocks, argsort + gather masking, SDPA attention,
the whole model under torch.compile, bf16 autocast, fused AdamW), in the same process, on
the same synthetic batch.

    python -m bench train --recipes recipes/vit_b_mae.yaml recipes/vit_l_mae.yaml --batch 512 256

A recipe may carry overrides of its own after `::`, so that settings which cannot be switched at run time
(activation checkpointing, a micro batch) are compared in one process:

    python -m bench train --recipes recipes/vit_g_mae.yaml \
        "recipes/vit_g_mae.yaml::model.activation_checkpointing=false" --variants engine-triton
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import bar_plot, card_name, print_table, worker_error, write_result
from engine.config import split_entry

RESULTS_PROFILE_DIR = Path(__file__).parent / "results" / "profiles"

# Dense bf16 tensor-core peak by card (FLOP/s), for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "GH200": 989e12}


def load_entry(entry: str, overrides: list[str]):
    """A `--recipes` entry as a config: the shared --override first, then the entry's own."""
    from engine.config import load_config

    path, own = split_entry(entry)
    bad = [o for o in own if "=" not in o]
    if bad:
        raise SystemExit(f"error: {entry!r}: after '::' each part is key=value, not {bad[0]!r}")
    return load_config(path, list(overrides) + own)


def entry_label(entry: str, model: str) -> str:
    """The model name, with an entry's own overrides (last key part and value) a line each, for a plot's labels."""
    own = split_entry(entry)[1]
    return model + "".join(f"\n{o.split('=')[0].split('.')[-1]}={o.split('=', 1)[1]}" for o in own)


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


# ----------------------------------------------------------------------------- the baseline
class NaiveMAE(nn.Module):
    """MAE as commonly written: random masking by argsort of noise and gathers, mask tokens
    appended with cat and unshuffled with a gather, timm blocks with SDPA, loss by patchify."""

    def __init__(self, encoder: nn.Module, decoder_dim=512, decoder_depth=8, decoder_heads=16, mask_ratio=0.75):
        from timm.models.vision_transformer import Block

        super().__init__()
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.p = encoder.patch_embed.patch_size[0]
        n = encoder.patch_embed.num_patches
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.p**2 * 3)

    def forward(self, imgs):
        enc = self.encoder
        x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
        b, n, c = x.shape
        keep = int(n * (1 - self.mask_ratio))
        noise = torch.rand(b, n, device=x.device)
        shuffle = torch.argsort(noise, dim=1)
        restore = torch.argsort(shuffle, dim=1)
        ids_keep = shuffle[:, :keep]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, c))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, restore)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1)
        x = enc.norm(enc.blocks(torch.cat([cls, x], 1)))
        x = self.decoder_embed(x)
        d = x.shape[-1]
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(b, n - keep, -1)], 1)
        tokens = torch.gather(tokens, 1, restore.unsqueeze(-1).expand(-1, -1, d))
        x = torch.cat([x[:, :1], tokens], 1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        p = self.p
        h = imgs.shape[2] // p
        target = imgs.reshape(b, 3, h, p, h, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * h, p * p * 3)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(-1)
        return {"loss": (loss * mask).sum() / mask.sum()}


def _time_steps(step, steps: int, warmup: int, device: torch.device, each: list[float] | None = None) -> float:
    """Mean seconds a step over `steps` steps after `warmup`. each: filled with every timed step's milliseconds (on
    CUDA the device time between events recorded after consecutive steps, so that no step waits on the host to read
    its time; on the CPU the wall time), to tell a slow start from a slow run."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    marks = []
    t0 = time.perf_counter()
    if cuda and each is not None:
        marks.append(torch.cuda.Event(enable_timing=True))
        marks[0].record()
    last = t0
    for _ in range(steps):
        step()
        if each is not None:
            if cuda:
                marks.append(torch.cuda.Event(enable_timing=True))
                marks[-1].record()
            else:
                now = time.perf_counter()
                each.append((now - last) * 1e3)
                last = now
    if cuda:
        torch.cuda.synchronize()
    if marks:
        each.extend(a.elapsed_time(b) for a, b in zip(marks, marks[1:]))
    return (time.perf_counter() - t0) / steps


def run_naive(cfg, batch: int, steps: int, warmup: int, device: torch.device, compile_: bool) -> dict[str, Any]:
    from engine.models import create_encoder

    m, o = cfg.model, cfg.objective.mae
    reserved0 = torch.cuda.memory_reserved() if device.type == "cuda" else 0
    torch.manual_seed(0)
    enc = create_encoder(m.name, img_size=m.img_size, patch_size=m.patch_size)
    model = NaiveMAE(enc, o.decoder_dim, o.decoder_depth, o.decoder_heads, o.mask_ratio).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                            fused=True)
    fwd = torch.compile(model) if compile_ else model
    imgs = torch.randn(batch, 3, m.img_size, m.img_size, device=device)
    amp = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = fwd(imgs)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sec = _time_steps(step, steps, warmup, device)
    out = {"img_per_s": batch / sec, "step_ms": sec * 1e3}
    if device.type == "cuda":
        out.update(memory_figures(reserved0))
    return out


def memory_figures(reserved0: int) -> dict[str, float]:
    """The step's memory on CUDA since the last reset_peak_memory_stats: the peak of live tensors (peak_mem_gib) and
    the peak the allocator held from the card above `reserved0`, its hold when the variant began (peak_reserved_gib;
    start_reserved_gib is that hold). The second is what must fit on the card: a step replayed as CUDA graphs keeps
    the graphs' private pool, whose tensors stop counting as allocated once recorded (bench._probe_memory, MAE ViT-g
    at one micro-batch on an H200: 12.0 GiB allocated in every step after the recording, 56.5 GiB held). It is the
    variant's own hold only when the variant starts from an empty allocator: `release_memory` between variants."""
    return {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": (torch.cuda.max_memory_reserved() - reserved0) / 2**30,
            "start_reserved_gib": reserved0 / 2**30}


def release_memory(device: torch.device) -> None:
    """Between two variants in one process: free what the last one left held, so that the next one's memory figures
    are its own. torch.compile's cudagraph trees keep their memory pool (and the code caches their graphs) until
    torch._dynamo.reset(). With a plain empty_cache between them, the MAE ViT-L variant after another reported a
    peak_reserved_gib of 2.6 GiB for a step of 21.9 GiB allocated on an H200: only its growth past what the first had
    left held (`train-nvidia-h200-2026-11-30-large-s27-vitl.json`)."""
    import gc

    gc.collect()
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# Warm-up steps of an engine variant replaying CUDA graphs: with 3, MAE ViT-L with Triton kernels timed
# 1,123 img/s on an H200 (recording inside the timed steps), 2,977 with 12 (train-*-large-auto*.json)
GRAPH_WARMUP = 10


def synthetic_trainer(cfg, batch: int, run_dir: str, *, world: int = 1, accum: int = 1):
    """The engine's Trainer set up for timing its own step (bench train, bench ab): synthetic data, `batch` images per
    GPU and micro-batch, `accum` micro-batches a step over `world` ranks, no step limit, no TensorBoard, seeded."""
    from engine.train import Trainer

    cfg.data.shards = "synthetic"
    cfg.train.batch_size = batch * world * accum
    cfg.train.micro_batch = None
    cfg.train.accum_steps = accum
    cfg.train.steps = 10**9
    cfg.log.tensorboard = False
    torch.manual_seed(0)
    return Trainer(cfg, run_dir)


def run_engine(cfg, batch: int, steps: int, warmup: int, profile: str | None = None, accum: int = 1) -> dict[str, Any]:
    """The engine's own training step (Trainer.train_step) on a synthetic batch of `batch`
    per GPU; under torchrun every rank runs it (FSDP2) and images/s counts all ranks.
    profile: a text file for rank 0's torch.profiler tables over 3 more steps (phases of
    the step, top kernels by device time, top ops by host time). accum: micro-batches of `batch` per
    step (gradient accumulation), the same synthetic batch each time."""
    world = int(__import__("os").environ.get("WORLD_SIZE", 1))
    reserved0 = torch.cuda.memory_reserved() if torch.cuda.is_available() else 0
    trainer = synthetic_trainer(cfg, batch, "/tmp/bench-train-unused", world=world, accum=accum)
    data = trainer.batches()
    batch0 = next(data)
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    from engine.train import GcPauses

    gc_pauses = GcPauses()

    def step():
        trainer.set_lr()
        trainer.train_step([batch0] * accum)
        gc_pauses.step += 1

    if trainer.graphs:  # compile, cudagraph warm-up and recording must all fall before the clock starts
        warmup = max(warmup, GRAPH_WARMUP)
    each: list[float] = []
    with gc_pauses:
        sec = _time_steps(step, steps, warmup, trainer.device, each)
    # the collections of the timed steps (step counts from the first warm-up step, 1-based: warmup + 1 is the first
    # timed one) and how many of each generation ran in all
    gc_timed = [p for p in gc_pauses.pauses if p[0] >= warmup]
    out = {"img_per_s": batch * world * accum / sec, "step_ms": sec * 1e3, "step_ms_each": each,
           "gc_pauses": gc_timed, "gc_counts": gc_pauses.counts, "device": str(trainer.device),
           "world": world, "compile_mode": trainer.compile_mode if cfg.model.compile else "eager",
           "compile_tuning": bool(cfg.model.compile and cfg.model.compile_tuning), "warmup": warmup,
           "accum": accum}
    if trainer.device.type == "cuda":
        out.update(memory_figures(reserved0))
    if profile:
        out["profile"] = profile_steps(step, trainer.device, profile, f"{world} rank(s), batch {batch} per rank")
    if world > 1 and torch.distributed.is_initialized():  # every rank's figures: a rank that waits on another
        ranks: list[Any] = [None] * world  # shows long collectives, the one it waits on a busy device
        torch.distributed.all_gather_object(ranks, {k: out.get(k) for k in ("profile", "gc_pauses", "gc_counts")})
        out["ranks"] = ranks
    return out


def profile_steps(step, device: torch.device, path: str, title: str, n: int = 3) -> dict[str, float]:
    """Profile n steps; write the tables to `path` (rank 0) and return per-step milliseconds of
    wall time, device busy time, each train_step phase's host time and (CUDA) the device's idle time between kernels;
    the file also says which host ops the device waited on (device_gaps)."""
    import os

    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n
    events = prof.key_averages()
    summary = {"wall_ms": wall * 1e3}
    dev_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    host = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    if cuda:  # kernels count once, through the host op that launched them (user ranges repeat them)
        summary["device_busy_ms"] = sum(getattr(e, dev_attr) for e in host) / 1e3 / n
        summary["nccl_ms"] = sum(getattr(e, dev_attr) for e in events
                                 if e.device_type == torch.autograd.DeviceType.CUDA
                                 and e.key.lower().startswith("nccldevkernel")) / 1e3 / n
    for e in host:
        if e.key.startswith("train_step/"):
            summary[e.key.split("/")[1] + "_host_ms"] = e.cpu_time_total / 1e3 / n
    gaps = None
    rank0 = int(os.environ.get("RANK", 0)) == 0
    if cuda and rank0:  # where the device waits: idle gaps between kernels, by the host op that launched the kernel
        # after each (rank 0's trace only: the others' would be exported and parsed for nothing)
        import json
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            trace = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(trace)
            with open(trace) as f:
                gaps = device_gaps(json.load(f).get("traceEvents", []), n)
        summary["device_idle_ms"] = gaps["idle_ms"]
    if rank0:
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        with open(path, "w") as f:
            f.write(f"# {title}; per-step summary (ms): {summary}\n\n")
            if gaps is not None:
                f.write(gap_table(gaps) + "\n\n")
            f.write(events.table(sort_by=sort, row_limit=30) + "\n\n")
            f.write(events.table(sort_by="cpu_time_total", row_limit=30) + "\n")
    return summary


_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def device_gaps(events: list[dict], steps: int, min_gap_us: float = 5.0, top: int = 15) -> dict:
    """Idle time of the device from a profiler's chrome-trace events: the gaps (> min_gap_us) between one device
    activity's end (the latest so far) and the next one's start, each put down to the innermost host op that was running
    on the launching thread when that next activity was launched (matched through the trace's correlation ids, from
    runtime or driver launch events alike). Returns per-step milliseconds (span, busy, idle), the host ops with the
    most idle time after them, and the largest gaps."""
    import bisect
    import collections

    dev = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in _DEVICE_CATS), key=lambda e: e["ts"])
    launch = {e["args"]["correlation"]: e for e in events  # cuda_runtime, cuda_driver (Triton, cuBLAS launch there)
              if e.get("ph") == "X" and str(e.get("cat", "")).startswith("cuda_")
              and "correlation" in e.get("args", {})}
    host = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", "python_function"):
            host[e.get("tid")].append(e)
    for v in host.values():
        v.sort(key=lambda e: e["ts"])
    starts = {t: [e["ts"] for e in v] for t, v in host.items()}

    def innermost(tid, ts) -> str:
        ops, best = host.get(tid, []), None
        i = bisect.bisect_right(starts.get(tid, []), ts)
        for e in reversed(ops[max(0, i - 5000):i]):  # ops that began before ts; the shortest one still running
            if e["ts"] + e["dur"] >= ts and (best is None or e["dur"] < best["dur"]):
                best = e
        return best["name"] if best else "(no host op recorded)"

    if not dev:
        return {"span_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "by_host_op": [], "largest": []}
    end, gaps = dev[0]["ts"], []
    for e in dev:
        if e["ts"] > end + min_gap_us:
            src = launch.get(e.get("args", {}).get("correlation"))
            gaps.append({"gap_us": e["ts"] - end, "next": e["name"][:80],
                         "host_op": innermost(src.get("tid"), src["ts"])[:80] if src else "(launch not found)"})
        end = max(end, e["ts"] + e["dur"])
    by_op = collections.defaultdict(lambda: [0.0, 0])
    for g in gaps:
        by_op[g["host_op"]][0] += g["gap_us"]
        by_op[g["host_op"]][1] += 1
    per = 1e3 * steps
    return {"span_ms": (end - dev[0]["ts"]) / per, "busy_ms": sum(e["dur"] for e in dev) / per,
            "idle_ms": sum(g["gap_us"] for g in gaps) / per,
            "by_host_op": sorted(({"host_op": k, "idle_ms": v[0] / per, "gaps": v[1] / steps}
                                  for k, v in by_op.items()),
                                 key=lambda r: -r["idle_ms"])[:top],
            "largest": sorted(gaps, key=lambda g: -g["gap_us"])[:top]}


def gap_table(gaps: dict) -> str:
    """device_gaps as text: the per-step times, then where the idle time falls."""
    lines = [f"# device per step: span {gaps['span_ms']:.2f} ms, busy {gaps['busy_ms']:.2f} ms (overlaps counted "
             f"twice), idle {gaps['idle_ms']:.2f} ms in gaps between activities",
             "# idle ms/step  gaps/step  host op running when the activity after the gap was launched"]
    lines += [f"{r['idle_ms']:14.3f}  {r['gaps']:9.1f}  {r['host_op']}" for r in gaps["by_host_op"]]
    lines += ["# largest gaps (us, the activity after it, its host op)"]
    lines += [f"{g['gap_us']:14.1f}  {g['next']}  |  {g['host_op']}" for g in gaps["largest"]]
    return "\n".join(lines)


def recipe_stems(recipes: list[str]) -> list[str]:
    """Each recipe entry's file stem (`recipes/vit_l_mae.yaml::train.micro_batch=128` -> `vit_l_mae`)."""
    return [Path(split_entry(r)[0]).stem for r in recipes]


def profile_stem(recipes: list[str], i: int) -> str:
    """The profile table's file stem for the i-th recipe entry: the recipe file's stem, and where several entries share
    it (one recipe with different `::` overrides), its position too (1-based), so that no table overwrites another."""
    stems = recipe_stems(recipes)
    return stems[i] if stems.count(stems[i]) == 1 else f"{stems[i]}-{i + 1}"


def run_scaling(args, argv: list[str]) -> int:
    """Launch the engine on 1..N GPUs with torchrun (same per-GPU batch) and report images/s,
    MFU, peak memory and scaling efficiency = img/s(N) / (N x img/s(1))."""
    import json
    import os
    import subprocess
    import tempfile

    from engine.plan import measure_model

    rows = []
    for i, recipe in enumerate(args.recipes):
        cfg = load_entry(recipe, args.override)
        batch = args.batch[i] if args.batch else (cfg.train.micro_batch or cfg.train.batch_size)
        flops = measure_model(cfg)["flops"]
        base = None
        for n in args.gpus:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "r.json")
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                       "-m", "bench", "train", "--worker-json", out, "--recipes", recipe, "--batch", str(batch),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--variants", args.variants[0],
                       "--accum", str(args.accum),
                       "--override", *args.override, "--compile-mode", args.compile_mode] + (
                           ["--no-compile"] if args.no_compile else [])
                if args.profile:
                    cmd += ["--profile", "1"]
                r = subprocess.run(cmd, capture_output=True, text=True)
                row = {"recipe": recipe, "model": cfg.model.name, "gpus": n, "batch_per_gpu": batch,
                       "accum": args.accum, "variant": args.variants[0]}
                if r.returncode == 0 and os.path.exists(out):
                    res = json.load(open(out))
                    row.update(img_s=res["img_per_s"], step_ms=res["step_ms"], peak_mem_gib=res.get("peak_mem_gib"),
                               peak_reserved_gib=res.get("peak_reserved_gib"),
                               accum=res.get("accum"))  # as the workers ran it
                    row["step_ms_each"] = [round(t, 2) for t in res.get("step_ms_each", [])]
                    ranks = res.get("ranks") or [res]  # one rank: its own figures
                    row["gc_pauses_ranks"] = [r.get("gc_pauses") for r in ranks]
                    if res.get("profile"):
                        row["profile_ms"] = res["profile"]
                        row["profile_ms_ranks"] = [r.get("profile") for r in ranks]
                        text = out + ".prof.txt"
                        if os.path.exists(text):
                            name = f"{profile_stem(args.recipes, i)}-{n}gpu-{args.tag or 'default'}.txt"
                            dest = RESULTS_PROFILE_DIR / name
                            dest.parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy(text, dest)
                            row["profile_tables"] = str(dest)
                    peak = peak_flops()
                    if peak:
                        row["mfu"] = res["img_per_s"] * flops / (peak * n)
                    base = base or (row["img_s"] if n == 1 else None)
                    if base:
                        row["speedup"] = row["img_s"] / base
                        row["scaling_eff"] = row["img_s"] / (n * base)
                else:
                    row["error"] = worker_error(r.stderr or r.stdout)
                rows.append(row)
                lists = ("error", "step_ms_each", "profile_ms_ranks", "gc_pauses_ranks")
                print_table([row], [k for k in row if k not in lists])
                if "error" in row:
                    print(row["error"])
    tag = "+".join(recipe_stems(args.recipes)) + f"-{args.variants[0]}"
    tag += f"-{args.tag}" if args.tag else ""
    write_result("train-scaling", {"rows": rows, "compile": not args.no_compile, "overrides": args.override},
                 argv, tag=tag, command_suite="train")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["recipes/vit_b_mae.yaml", "recipes/vit_l_mae.yaml"],
                    help="recipe files, each optionally with overrides of its own: PATH::key=value::key=value")
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="per-GPU batch for each recipe (default: the recipe's micro_batch)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--accum", type=int, default=1,
                    help="engine variants: micro-batches of --batch per step (gradient accumulation; under --gpus "
                         "the gradients are reduced once a step, on the last, as in a run)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=["engine-triton", "engine-torch", "naive"],
                    help="engine-triton (our kernels), engine-torch (SDPA + torch masking/loss), naive")
    ap.add_argument("--no-compile", action="store_true", help="measure eager mode (all variants)")
    ap.add_argument("--compile-mode", default="auto",
                    choices=["auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                    help="the engine variants' model.compile_mode (auto, engine.run's default: CUDA graphs for the "
                         "whole-model MAE step on one GPU, torch's default mode under FSDP2)")
    ap.add_argument("--override", nargs="*", default=[], help="recipe overrides for every recipe (key=value)")
    ap.add_argument("--gpus", type=int, nargs="+", default=None,
                    help="scaling mode: run the first variant (engine-*) under torchrun on each GPU count")
    ap.add_argument("--profile", default=None, const="1", nargs="?",
                    help="also profile 3 steps per run (scaling mode): phase times, top kernels/ops and the "
                         "device's idle gaps by the host op it waited on, tables under bench/results/profiles/")
    ap.add_argument("--tag", default=None, help="name this run's result file apart (e.g. the overrides tried)")
    ap.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)  # internal: one torchrun worker
    argv = list(sys.argv[1:] if argv is None else argv)  # recorded with the results as the command
    args = ap.parse_args(argv)
    if args.accum < 1:
        ap.error("--accum takes a positive count of micro-batches per step")
    if args.gpus:
        return run_scaling(args, argv)
    if args.worker_json:
        import json
        import os

        cfg = load_entry(args.recipes[0], args.override)
        cfg.model.compile = not args.no_compile
        cfg.model.compile_mode = args.compile_mode
        cfg.model.kernels = "triton" if args.variants[0] == "engine-triton" else "torch"
        res = run_engine(cfg, args.batch[0], args.steps, args.warmup, accum=args.accum,
                         profile=args.worker_json + ".prof.txt" if args.profile else None)
        if int(os.environ.get("RANK", 0)) == 0:
            with open(args.worker_json, "w") as f:
                json.dump(res, f)
        from engine.train import teardown_distributed

        teardown_distributed()  # gloo left to interpreter exit can abort a rank after its work is done
        return 0

    from engine.plan import measure_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = peak_flops()
    rows = []
    for i, recipe in enumerate(args.recipes):
        base = load_entry(recipe, args.override)
        batch = args.batch[i] if args.batch else (base.train.micro_batch or base.train.batch_size)
        flops = measure_model(base)["flops"]
        row: dict[str, Any] = {"recipe": recipe, "model": base.model.name, "objective": base.objective.name,
                               "batch": batch, "flops_per_image": flops}
        if base.objective.name == "dinov2":
            from bench._dinov2 import bench_dinov2

            row.update(bench_dinov2(base, batch=batch, steps=args.steps, warmup=args.warmup, device=device,
                                    compile_=not args.no_compile, variants=args.variants,
                                    compile_mode=args.compile_mode))
        else:
            row["accum"] = args.accum  # the engine variants' micro-batches per step (DINOv2's bench has none)
            for variant in args.variants:
                cfg = load_entry(recipe, args.override)
                cfg.model.compile = not args.no_compile
                try:
                    if variant == "naive":
                        r = run_naive(cfg, batch, args.steps, args.warmup, device, not args.no_compile)
                    else:
                        cfg.model.kernels = "triton" if variant == "engine-triton" else "torch"
                        cfg.model.compile_mode = args.compile_mode
                        if cfg.model.kernels == "triton" and device.type != "cuda":
                            raise RuntimeError("Triton kernels need CUDA (the interpreter is for tests)")
                        r = run_engine(cfg, batch, args.steps, args.warmup, accum=args.accum)
                    row[f"{variant}_img_s"] = r["img_per_s"]
                    row[f"{variant}_step_ms"] = r["step_ms"]
                    if "compile_mode" in r:
                        row[f"{variant}_compile_mode"] = r["compile_mode"]
                    for key in ("peak_mem_gib", "peak_reserved_gib", "start_reserved_gib"):
                        if key in r:
                            row[f"{variant}_{key}"] = r[key]
                    if peak:
                        row[f"{variant}_mfu"] = r["img_per_s"] * flops / peak
                except Exception as e:  # one failing variant must not hide the others
                    row[f"{variant}_error"] = f"{type(e).__name__}: {str(e)[:400]}"
                release_memory(device)
        ours = [row.get(f"{v}_img_s") for v in ("engine-triton", "engine-torch") if row.get(f"{v}_img_s")]
        if ours and row.get("naive_img_s"):
            row["best_engine_vs_naive"] = max(ours) / row["naive_img_s"]
        rows.append(row)
        print_table([row], [k for k in row if not k.endswith("_error")])
        for k, v in row.items():
            if k.endswith("_error"):
                print(f"  {k}: {v}")
    cols = ["model", "batch"] + [f"{v}_img_s" for v in args.variants] + ["best_engine_vs_naive"]
    print()
    print_table(rows, cols)
    names = [r["model"].replace("vit_", "").split("_patch")[0] + ("-dinov2" if r["objective"] == "dinov2" else "")
             for r in rows]
    # each model once (rows of one recipe at several settings named it once a row: "giant-giant")
    tag = "+".join(dict.fromkeys(names)) + (f"-{args.tag}" if args.tag else "")
    path = write_result("train", {"device": str(device), "peak_bf16_flops": peak, "compile": not args.no_compile,
                                  "steps": args.steps, "rows": rows}, argv, tag=tag)
    several = len({r["batch"] for r in rows}) > 1  # then each label says its batch
    bar_plot(path.with_suffix(".png"),
             [entry_label(r["recipe"], r["model"]) + (f"\nbatch {r['batch']}" if several else "") for r in rows],
             {v: [r.get(f"{v}_img_s", 0.0) for r in rows] for v in args.variants}, "images / s",
             f"Training throughput on {card_name()}")
    return 0
