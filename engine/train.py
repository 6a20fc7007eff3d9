"""The training loop shared by every objective.

One step = `accum_steps` micro-batches forward/backward, gradient clipping, one fused AdamW
update. Nothing inside a step waits for the GPU: the loss, the gradient norm and the
non-finite counters stay on the device and are read every `log.every_steps` steps. A
non-finite loss or gradient skips the update through the fused optimizer's `found_inf`
input (the way AMP's GradScaler skips steps), so skipping costs no host sync either.
"""
from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from engine import checkpoint as ckpt
from engine.config import Config, dump_config
from engine.optim import ShardLocalAdamW, clip_grad_norm
from engine.plan import batch_geometry, estimate_samples, learning_rate, schedule_lengths


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. a run of non-finite losses); the message says why."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def teardown_distributed() -> None:
    """End the process group (after a barrier), so no rank exits while another still talks to it:
    a gloo process group left to interpreter exit can abort its process ("terminate called
    without an active exception"). A full collection first (after undoing train.gc_freeze_after's freeze): FSDP2
    modules sit in reference cycles (their hooks), so without it they, and the communication state they hold, may be
    freed only at interpreter exit. That is the likely path of one abort of tests/optim_worker.py in CI on 2026-11-30,
    after its barrier and destroy_process_group; 20 runs here did not reproduce it. Callers drop their references to
    models and optimizers before calling this."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.unfreeze()
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def pick_device(cfg: Config, d: Dist) -> torch.device:
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingStopped("train.device is cuda but no CUDA device is visible")
        index = d.local_rank if want == "cuda" else int(want.split(":")[1])
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def expandable_segments_wanted(cfg: Config) -> bool:
    """train.allocator resolved: expandable segments for DINOv2 without the teacher graph under "auto"."""
    mode = cfg.train.allocator
    if mode != "auto":
        return mode == "expandable"
    return cfg.objective.name == "dinov2" and not cfg.objective.dinov2.teacher_graph


def set_allocator(cfg: Config, device: torch.device) -> bool | None:
    """Set the CUDA caching allocator's expandable segments as train.allocator says (both ways: a process may build
    several trainers, as bench train does); None where that is not ours to set (not CUDA, the user's environment names
    expandable_segments, or a torch without the setter), else the setting taken."""
    if device.type != "cuda":
        return None
    env = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")
    # torch's own setter; torch.cuda.memory._set_allocator_settings calls it with a FutureWarning (torch 2.11 on)
    setter = (getattr(torch._C, "_accelerator_setAllocatorSettings", None)
              or getattr(torch.cuda.memory, "_set_allocator_settings", None))
    if "expandable_segments" in env or setter is None:
        return None
    want = expandable_segments_wanted(cfg)
    setter(f"expandable_segments:{want}")
    return want


def memory_since_last_line(device: torch.device) -> dict[str, float]:
    """For a log line on CUDA: the allocator's peak hold (gpu_mem_gib: what the card must hold for this run, the CUDA
    graphs' pools and cached blocks included) and the peak of live tensors (gpu_alloc_gib) since the last line, in GiB;
    then a fresh peak for the next line. Empty elsewhere. The hold is what to compare with the card and with the dry
    run's estimate; a hold that keeps growing at a steady allocation is fragmentation (see train.allocator)."""
    if device.type != "cuda":
        return {}
    out = {"gpu_mem_gib": torch.cuda.max_memory_reserved(device) / 2**30,
           "gpu_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    torch.cuda.reset_peak_memory_stats(device)
    return out


def cosine_lr(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def synthetic_batches(model: nn.Module, batch_size: int, device: torch.device, dtype: torch.dtype) -> Iterator:
    """Endless identical random batches: measures the model with data loading taken out."""
    from loaders import Batch

    images = model.synthetic_batch(batch_size, device, dtype)
    tags = ["synthetic"] * batch_size
    while True:
        yield Batch(images, tags, tags, tags)


def _matmul_ops() -> set:
    ops = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
    for name in ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_cudnn_attention"):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            ops.add(op.default)
    for name in ("attn_fwd", "attn_qkv_fwd"):  # our Triton attention (kernels.attn custom ops)
        try:
            ops.add(getattr(torch.ops.vfm, name).default)
        except (AttributeError, RuntimeError):
            pass
    return ops


def checkpoint_context(policy: str):
    """The `context_fn` of torch.utils.checkpoint for `model.ac_policy` (None for "full")."""
    if policy == "full":
        return None
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    keep = _matmul_ops()

    def decide(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return lambda: create_selective_checkpoint_contexts(decide)


def checkpoint_blocks(blocks, every: int = 1, policy: str = "full") -> int:
    """Activation checkpointing per transformer block: the activations of every `every`-th block
    are recomputed in backward instead of kept (all of them, or all but the matmul and attention
    outputs with policy "save_matmuls"). Patches `forward` so parameter names stay timm's.
    Returns how many blocks were wrapped."""
    from torch.utils.checkpoint import checkpoint

    if every < 1:
        raise ValueError(f"model.ac_every must be >= 1 (checkpoint every k-th block), got {every}")
    context = checkpoint_context(policy)
    kw = {"context_fn": context} if context is not None else {}
    n = 0
    for i, block in enumerate(blocks):
        if i % every:
            continue
        inner = block.forward
        block.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **kw, **k)
        n += 1
    return n


class GcPauses:
    """Python's cyclic collections while active (a context manager over `gc.callbacks`): their total and longest time
    since the last `take()`, a count per generation, and each of at least min_ms as (step, generation, ms), the step
    being `self.step` when it ran (the caller counts its steps there). A generation-2 pass over a process that has
    just compiled a model's graphs can stall a step by hundreds of ms (`train.gc_freeze_after`)."""

    def __init__(self, min_ms: float = 1.0):
        self.step, self.min_ms = 0, min_ms
        self.pauses: list[tuple[int, int, float]] = []
        self.counts = [0, 0, 0]
        self.total_ms = self.max_ms = 0.0
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        ms = (time.perf_counter() - self._t0) * 1e3
        self.counts[info["generation"]] += 1
        self.total_ms += ms
        self.max_ms = max(self.max_ms, ms)
        if ms >= self.min_ms:
            self.pauses.append((self.step, info["generation"], round(ms, 2)))

    def take(self) -> tuple[float, float]:
        """(total ms, longest ms) of the collections since the last take, and start counting anew."""
        out = (self.total_ms, self.max_ms)
        self.total_ms = self.max_ms = 0.0
        return out

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)


def freeze_gc() -> None:
    """One full collection, then every object Python's collector still tracks moved to its permanent generation
    (gc.freeze), where its passes no longer walk them. Called once a run's graphs are compiled (train.gc_freeze_after):
    a full pass over what torch.compile leaves alive took 260-420 ms on a DINOv2 ViT-L rank (H200 host, 2026-11-30),
    and ran every ~60 steps. Collecting first keeps the garbage of compilation out of the frozen set; what is frozen
    and dies later is still freed by reference counting, only cycles among it stay."""
    gc.collect()
    gc.freeze()


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, *, out=sys.stderr):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.out = out
        self.dist = setup_distributed("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
        self.device = pick_device(cfg, self.dist)
        self.expandable_segments = set_allocator(cfg, self.device)
        precision = cfg.train.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        torch.manual_seed(cfg.train.seed + self.dist.rank)

        from engine.objectives import build_objective

        self.model = build_objective(cfg, self.device).to(self.device)
        if cfg.model.activation_checkpointing:
            checkpoint_blocks(self.model.encoder.blocks, cfg.model.ac_every, cfg.model.ac_policy)
        self.micro_batch, self.accum_steps = batch_geometry(cfg, self.dist.world)
        from engine.config import CUDA_GRAPH_MODES, compile_kwargs, resolve_compile_mode

        regions = getattr(self.model, "compile_regions", None)
        self.compile_mode = resolve_compile_mode(
            cfg.model.compile_mode, compiled=cfg.model.compile, whole_model=regions is None and self.dist.world == 1,
            world=self.dist.world, device_type=self.device.type)
        if cfg.model.compile:  # model.compile_mode reaches every path (CUDA graph modes: validated MAE-only, 1 GPU)
            kw = compile_kwargs(self.compile_mode, cfg.model.compile_tuning)  # and model.compile_tuning
            if regions is not None:  # the objective says what to compile (e.g. DINOv2: per block)
                regions(**kw)
            elif self.dist.world == 1:
                self.model.compile(**kw)  # one graph: fuses masking, embeddings and loss too
            else:
                for block in self._blocks():  # per block, so FSDP2 can hook between blocks
                    block.compile(**kw)
        self.graphs = cfg.model.compile and self.compile_mode in CUDA_GRAPH_MODES
        if self.graphs and self.dist.world > 1:
            raise ValueError(f"model.compile_mode={cfg.model.compile_mode} (CUDA graphs) runs the whole-model step on "
                             f"one GPU; this run has {self.dist.world} ranks")
        self._grad_acc: list[torch.Tensor] | None = None  # CUDA graphs + accumulation: see _take_grads
        self._grad_seen: list[bool] = []  # which parameters got a gradient this step (the others keep None)
        self._wrap_distributed()
        self.loader = self._build_loader()
        num_samples = estimate_samples(cfg)
        if num_samples is None and self.loader is not None:
            num_samples = len(self.loader) * self.micro_batch * self.dist.world
        self.total_steps, self.steps_per_epoch, self.warmup_steps = schedule_lengths(cfg, num_samples)
        self.peak_lr = learning_rate(cfg)
        groups = self.model.param_groups(cfg.optim.weight_decay)
        # torch's fused AdamW; under FSDP2 stepped on the local shards (engine.optim: torch 2.10 / 2.11 leak a
        # DTensorSpec per parameter per step through DTensor's dispatch of the fused op)
        self.optimizer = ShardLocalAdamW(groups, lr=self.peak_lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                         fused=True)
        self.params = [p for g in groups for p in g["params"]]
        self.step = 0
        self.steps_here = 0  # steps taken by this process (a resumed run counts from its resumed step)
        freeze = cfg.train.gc_freeze_after
        self.gc_freeze_after = (3 if self.device.type == "cuda" else 0) if freeze is None else freeze
        if self.gc_freeze_after < 0:
            raise ValueError(f"train.gc_freeze_after={freeze}: a count of steps (0 = off, null = auto)")
        self.nonfinite_total = torch.zeros((), device=self.device)
        self.nonfinite_run = torch.zeros((), device=self.device)  # consecutive, current
        self.nonfinite_run_max = torch.zeros((), device=self.device)  # longest run since last log
        self.resumed_from: Path | None = None
        self.resumed_world = self.dist.world
        self.terms: dict[str, torch.Tensor] = {}  # extra loss terms summed since the last log line

    # ------------------------------------------------------------------ setup helpers
    def _block_stacks(self) -> list[list[nn.Module]]:
        stacks = [list(self.model.encoder.blocks), list(getattr(self.model, "decoder_blocks", []))]
        return [s for s in stacks if s]

    def _blocks(self) -> list[nn.Module]:
        return [b for stack in self._block_stacks() for b in stack]

    def _wrap_distributed(self) -> nn.Module:
        """FSDP2 across ranks: each transformer block is its own shard group, then the root.
        Parameters gather in bf16 on CUDA; gradients reduce in fp32 (train.fsdp_reduce_dtype)."""
        if self.dist.world == 1:
            return self.model
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        t = self.cfg.train
        bf16 = self.autocast_dtype is not None
        reduce = torch.bfloat16 if t.fsdp_reduce_dtype == "bf16" else torch.float32
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=reduce)
        k = max(1, t.fsdp_blocks_per_group)
        for stack in self._block_stacks():  # groups never straddle two stacks (encoder, decoder)
            for i in range(0, len(stack), k):
                group = stack[i:i + k]
                fully_shard(group if len(group) > 1 else group[0], mp_policy=mp,
                            reshard_after_forward=t.fsdp_reshard_after_forward)
        fully_shard(self.model, mp_policy=mp)
        return self.model

    def _build_loader(self):
        data = self.cfg.data
        if data.shards == "synthetic":
            return None
        from loaders import build_loader
        from loaders.loader import resolve_backend

        backend = resolve_backend(data.backend, self.device)
        options = dict((data.options or {}).get(backend) or {})
        shards = data.shards
        if shards == "builtin:quickstart":
            from loaders.synthetic import quickstart_streams

            shards = quickstart_streams(data.cache_dir) if self.dist.main else None
            if self.dist.world > 1:  # rank 0 builds the cache once, the others wait and read it
                box = [shards]
                torch.distributed.broadcast_object_list(box, src=0)
                shards = box[0]
        try:
            return build_loader(shards, backend=backend, batch_size=self.micro_batch, augment=self.model.augment,
                                device=self.device, dtype=torch.float32, seed=self.cfg.train.seed,
                                num_workers=data.workers, cache_dir=data.cache_dir,
                                num_canonical_nodes=data.num_canonical_nodes, **options)
        except TypeError as e:
            if options and "unexpected keyword" in str(e):
                raise ValueError(f"data.options.{backend}: {e}") from None
            raise

    def batches(self) -> Iterator:
        """Micro-batches forever, epoch after epoch (the loader keeps its own position)."""
        if self.loader is None:
            yield from synthetic_batches(self.model, self.micro_batch, self.device, torch.float32)
        while True:
            empty = True
            for batch in self.loader:
                empty = False
                yield batch
            if empty and len(self.loader) == 0:
                raise TrainingStopped("the data set yields no full batch: lower train.batch_size or add data")

    # ------------------------------------------------------------------ state
    def train_state(self) -> dict[str, Any]:
        """What the checkpoint keeps beside the model and optimizer (rank 0 writes it)."""
        return {
            "step": self.step,
            "world": self.dist.world,
            "seed": self.cfg.train.seed,
            "loader": self.loader.state_dict() if self.loader is not None else None,
            "nonfinite_total": float(self.nonfinite_total),
            "config": self.cfg.to_dict(),
        }

    def save(self) -> Path | None:
        """Collective: every rank calls it; rank 0 returns the checkpoint folder."""
        export = getattr(self.model, "export_encoder", self.model.encoder)  # e.g. DINOv2's teacher
        return ckpt.save_checkpoint(self.run_dir, self.step, model=self.model, optimizer=self.optimizer,
                                    encoder=export, state=self.train_state(), keep=self.cfg.checkpoint.keep)

    def maybe_resume(self) -> bool:
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            return False
        state = ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer)
        self._check_resumed_config(path, state.get("config") or {})
        if self.loader is not None and state.get("loader"):
            self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.nonfinite_total.fill_(state.get("nonfinite_total", 0.0))
        self.resumed_from = path
        self.resumed_world = state.get("world", 1)
        return True

    def _check_resumed_config(self, path: Path, saved: dict[str, Any]) -> None:
        """Settings that give the saved weights their meaning must not change on resume: MAE's pred_layout (the
        decoder head's row order; a checkpoint from before the setting was saved is in MAE's "pqc")."""
        objective = saved.get("objective") or {}
        if self.cfg.objective.name != "mae" or objective.get("name", "mae") != "mae":
            return
        was = (objective.get("mae") or {}).get("pred_layout", "pqc")
        now = self.cfg.objective.mae.pred_layout
        if was != now:
            raise ValueError(f"{path} was trained with objective.mae.pred_layout={was} (its decoder head predicts "
                             f"pixels in that order), the config says {now}: resume with "
                             f"objective.mae.pred_layout={was}, or start a new run.dir")

    # ------------------------------------------------------------------ the step
    def set_lr(self) -> float:
        lr = cosine_lr(self.step, self.total_steps, self.warmup_steps, self.peak_lr, self.cfg.optim.min_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # objectives may scale groups (layer-wise decay)
        return lr

    def _take_grads(self, first: bool) -> None:
        """CUDA graphs with gradient accumulation: move this micro-batch's gradients out of the graphs'
        memory into our own buffers (copied on the first micro-batch, added after) and clear .grad.
        A replayed backward writes the gradients into memory its graph owns; left in .grad, the next
        micro-batch's replay would overwrite the sum in place of adding to it."""
        if self._grad_acc is None:
            self._grad_acc = [torch.zeros_like(p) for p in self.params]
        grads = [p.grad for p in self.params]
        if first:
            self._grad_seen = [g is not None for g in grads]
            unseen = [acc for acc, g in zip(self._grad_acc, grads) if g is None]
            if unseen:
                torch._foreach_zero_(unseen)
        else:
            self._grad_seen = [s or g is not None for s, g in zip(self._grad_seen, grads)]
        accs = [acc for acc, g in zip(self._grad_acc, grads) if g is not None]
        grads = [g for g in grads if g is not None]
        if grads:  # one multi-tensor kernel per call, not one per parameter
            (torch._foreach_copy_ if first else torch._foreach_add_)(accs, grads)
        for p in self.params:
            p.grad = None

    def train_step(self, micro_batches: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (loss or 0 if skipped, 1 or 0 for taken/skipped, grad norm) on the device."""
        accum = len(micro_batches)
        # CUDA graphs: each replay may overwrite the last one's outputs, so every micro-batch starts a new
        # graph step, after everything of the last one was read (the loss; the gradients, see _take_grads)
        graph_accum = self.graphs and accum > 1
        if self.graphs and not graph_accum:
            torch.compiler.cudagraph_mark_step_begin()
        loss_sum = torch.zeros((), device=self.device)
        hooks = getattr(self.model, "on_step_start", None)
        if hooks:
            hooks(self.step, self.total_steps, self.optimizer)
        phase = torch.profiler.record_function  # labels for `python -m bench train --profile`
        for i, batch in enumerate(micro_batches):
            if self.dist.world > 1:  # reduce-scatter gradients once, on the last micro-batch
                self.model.set_requires_gradient_sync(i == accum - 1)
            if graph_accum:
                torch.compiler.cudagraph_mark_step_begin()
            with phase("train_step/forward"), torch.autocast(self.device.type, dtype=self.autocast_dtype or
                                                             torch.float32, enabled=self.autocast_dtype is not None):
                out = self.model(batch.images)
                loss = out["loss"].float()
            with phase("train_step/backward"):
                (loss / accum).backward()
            loss_sum = loss_sum + loss.detach()
            for key, value in out.items():  # other scalar terms (e.g. DINOv2's dino/ibot/koleo), logged
                if key != "loss" and torch.is_tensor(value) and value.numel() == 1:
                    acc = self.terms.get(key)
                    self.terms[key] = value.detach().float() / accum + (acc if acc is not None else 0.0)
            if graph_accum:
                self._take_grads(first=i == 0)
        if graph_accum:  # the sums go back to .grad for clipping and the optimizer
            for p, acc, seen in zip(self.params, self._grad_acc, self._grad_seen):
                p.grad = acc if seen else None
        loss = loss_sum / accum
        hooks = getattr(self.model, "on_after_backward", None)
        if hooks:
            hooks(self.step, self.total_steps)
        clip = self.cfg.optim.clip_grad
        with phase("train_step/grad_norm"):
            # torch's clip_grad_norm_ (under FSDP2 on the local shards, engine.optim)
            grad_norm = clip_grad_norm(self.params, clip if clip else float("inf"))
        bad = (~torch.isfinite(loss) | ~torch.isfinite(grad_norm)).float()
        self.optimizer.grad_scale = None
        self.optimizer.found_inf = bad  # fused AdamW skips the update where this is 1
        with phase("train_step/optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_total += bad
        self.nonfinite_run = (self.nonfinite_run + 1) * bad
        torch.maximum(self.nonfinite_run_max, self.nonfinite_run, out=self.nonfinite_run_max)
        hooks = getattr(self.model, "on_step_end", None)
        if hooks:
            hooks(self.step, self.total_steps)
        self.step += 1
        self.steps_here += 1
        if self.steps_here == self.gc_freeze_after:
            freeze_gc()
        return torch.where(bad > 0, torch.zeros_like(loss), loss), 1.0 - bad, grad_norm

    # ------------------------------------------------------------------ periodic evaluation
    def eval_every_steps(self) -> int | None:
        e = self.cfg.eval
        if not e.data:
            return None
        if e.every_steps:
            return e.every_steps
        if e.every_epochs and self.steps_per_epoch:
            return max(1, round(e.every_epochs * self.steps_per_epoch))
        return None

    def eval_due(self) -> bool:
        every = self.eval_every_steps()
        return bool(every) and (self.step % every == 0 or self.step == self.total_steps)

    def evaluate(self, metrics=None, writer=None) -> dict[str, dict[str, float]]:
        """Probe the exported encoder on the recipe's MedMNIST tasks; logged as eval/<task>/<metric>."""
        from engine.eval import evaluate_encoder

        e, a = self.cfg.eval, self.cfg.data.augment
        encoder = getattr(self.model, "export_encoder", self.model.encoder)
        results = evaluate_encoder(encoder, e.data, e.tasks, method=e.method, img_size=self.cfg.model.img_size,
                                   max_train=e.max_train, mean=tuple(a.mean), std=tuple(a.std),
                                   cache_dir=None)
        if self.dist.main:
            row = {"step": self.step}
            for task, values in results.items():
                for name, value in values.items():
                    row[f"eval/{task}/{name}"] = value
                    if writer:
                        writer.add_scalar(f"eval/{task}/{name}", value, self.step)
            if metrics:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            summary = "  ".join(f"{t} {v.get('auc', v.get('knn_auc', float('nan'))):.3f}" for t, v in results.items())
            print(f"\neval at step {self.step:,}: AUC {summary}", file=self.out)
        return results

    # ------------------------------------------------------------------ the loop
    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        cfg = self.cfg
        main = self.dist.main
        resumed = self.maybe_resume()  # before config.yaml is (re)written: a refused resume leaves the run as it was
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        if resumed and main and self.step < self.total_steps:
            print(f"resuming from {self.resumed_from} (step {self.step:,} of {self.total_steps:,})"
                  + (f", saved by {self.resumed_world} ranks, now {self.dist.world}"
                     if self.resumed_world != self.dist.world else ""), file=self.out)
        if self.step >= self.total_steps:
            if main:
                print(f"run already complete ({self.step:,} steps) in {self.run_dir}; nothing to do", file=self.out)
            return {"step": self.step, "complete": True}
        writer = None
        if main and cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        metrics = open(self.run_dir / "metrics.jsonl", "a") if main else None
        bar = None
        if main and cfg.log.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=cfg.run.name or "train", unit="step",
                       file=self.out, dynamic_ncols=True, smoothing=0.1)
        data = self.batches()
        last = None
        stop_at = self.total_steps if stop_after is None else min(self.total_steps, self.step + stop_after)
        loss_acc = torch.zeros((), device=self.device)
        good_acc = torch.zeros((), device=self.device)
        images_since, t_log, t_start = 0, time.perf_counter(), time.perf_counter()
        last_log_step = self.step
        # host time in next(batch) per step, less the GPU loaders' max_ahead sleeps (the GPU still had
        # queued steps then): the time the loop waited for data
        meter = getattr(self.loader, "meter", None)
        throttle_seen = meter.throttle_s if meter is not None else 0.0
        data_wait = 0.0
        gc_clock = GcPauses(min_ms=float("inf")).__enter__()  # time in Python's collector, per log line
        try:
            self.model.train()
            while self.step < stop_at:
                lr = self.set_lr()
                t_data = time.perf_counter()
                micro = [next(data) for _ in range(self.accum_steps)]
                data_wait += time.perf_counter() - t_data
                loss, good, grad_norm = self.train_step(micro)
                loss_acc += loss
                good_acc += good
                images_since += sum(len(b) for b in micro) * self.dist.world
                if bar:
                    bar.update(1)
                if self.step % cfg.log.every_steps == 0 or self.step == stop_at:
                    # The one host sync: read what the last steps left on the device.
                    now = time.perf_counter()
                    n_good = float(good_acc)
                    row = {
                        "step": self.step,
                        "epoch": self.loader.epoch + self.loader.batches_in_epoch / max(1, len(self.loader))
                        if self.loader is not None else None,
                        "loss": float(loss_acc) / n_good if n_good else float("nan"),
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "img_per_s": images_since / (now - t_log),
                        "nonfinite_total": int(self.nonfinite_total),
                        "time": now - t_start,
                    }
                    if meter is not None:
                        data_wait -= meter.throttle_s - throttle_seen
                        throttle_seen = meter.throttle_s
                    row["data_wait_ms"] = max(0.0, data_wait) * 1e3 / max(1, self.step - last_log_step)
                    data_wait = 0.0
                    gc_total, gc_longest = gc_clock.take()
                    row["gc_ms"] = gc_total / max(1, self.step - last_log_step)
                    row["gc_max_ms"] = gc_longest
                    if self.loader is not None:
                        row["skipped_samples"] = self.loader.skipped
                    row.update(memory_since_last_line(self.device))
                    for key, total in self.terms.items():  # mean over the steps since the last line
                        row[key] = float(total) / max(1, self.step - last_log_step)
                    self.terms.clear()
                    last_log_step = self.step
                    run = int(self.nonfinite_run_max)
                    loss_acc.zero_()
                    good_acc.zero_()
                    self.nonfinite_run_max.copy_(self.nonfinite_run)
                    images_since, t_log = 0, now
                    last = row
                    if main:
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                        if writer:
                            for k, v in row.items():
                                if k not in ("step", "epoch", "time") and isinstance(v, (int, float)):
                                    writer.add_scalar(f"train/{k}", v, self.step)
                        if bar:
                            mem = {"mem": f"{row['gpu_mem_gib']:.1f}G"} if "gpu_mem_gib" in row else {}
                            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}",
                                            img_s=f"{row['img_per_s']:,.0f}", **mem)
                    if run >= cfg.train.max_nonfinite:
                        self.save()
                        raise TrainingStopped(
                            f"stopped at step {self.step:,}: {run} consecutive steps had a non-finite loss or "
                            f"gradient ({row['nonfinite_total']} in all; their updates were skipped). Lower "
                            f"optim.lr or base_lr, set optim.clip_grad, or check the data; the last checkpoint "
                            f"is in {self.run_dir / 'checkpoints'}")
                if self.step % cfg.checkpoint.every_steps == 0 and self.step < stop_at:
                    self.save()
                if self.eval_due():
                    self.evaluate(metrics, writer)
        except KeyboardInterrupt:
            if main:
                print(f"\ninterrupted at step {self.step:,}; saving a checkpoint to resume from", file=self.out)
            self.save()
            raise
        finally:
            gc_clock.__exit__()
            if self.loader is not None:
                self.loader.close()  # persistent decode workers (nvjpeg, dali) end with the run
            if bar:
                bar.close()
            if metrics:
                metrics.close()
            if writer:
                writer.close()
        path = self.save()
        if main and path:
            done = "finished" if self.step >= self.total_steps else "paused"
            print(f"{done} at step {self.step:,}; checkpoint {path}", file=self.out)
        return {"step": self.step, "complete": self.step >= self.total_steps, "last": last}
