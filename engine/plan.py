"""What a recipe will do, computed without a GPU or data: `--dry-run` prints this."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from dataclasses import dataclass

import torch

from engine.config import Config
from engine.models import count_params

# What the activations take at a step's peak, as a multiple of the bytes saved for backward that the trace counts: the
# backward's own working set (activation gradients, a checkpointed block's recompute) and the allocator's rounding and
# fragmentation. Measured on an H200 (bench._probe_memory, 2026-11-30: the peak the allocator held, less weights,
# gradients, AdamW moments and a graphed step's gradient sums, over the traced bytes): MAE ViT-B b1024 1.11, ViT-L b256
# 1.09, ViT-L b512 1.10, ViT-g b256 1.09 (CUDA graphs, the private pool included); DINOv2 ViT-g b32 checkpointing every
# 3rd block 1.16. The peak allocated (fragmentation excluded) of the DINOv2 recipes over their traced bytes: 1.02
# (ViT-S b256) to 1.13 (ViT-g b16).
ACTIVATION_WORKING_SET = 1.12
# The same under FSDP2: the allocator keeps more cached (freed all-gather and reduce-scatter buffers, blocks tied to the
# communication streams). On 2 H200s (2026-11-30): MAE ViT-g b256 1.19, DINOv2 ViT-g b32 every 3rd block 1.22, where
# their peaks allocated stayed under the one-GPU factor's estimate.
FSDP_ACTIVATION_WORKING_SET = 1.22


@dataclass
class Plan:
    model: str
    encoder_params: int
    total_params: int
    trainable_params: int
    flops_per_image: float  # forward + backward, training
    act_bytes_per_image: float  # saved for backward per image, at fp32 on the meta device
    global_batch: int
    world: int
    micro_batch: int
    accum_steps: int
    steps: int
    steps_per_epoch: int | None
    epochs: float | None
    num_samples: int | None
    lr: float
    warmup_steps: int
    sources: list[str]
    act_bytes_fixed: float = 0.0  # saved for backward whatever the batch (e.g. weight-normed head weights), fp32

    def activation_bytes(self, micro: int, bf16: bool = True, world: int = 1) -> float:
        """Bytes the activations take at a step's peak at a micro batch on `world` GPUs: those saved for backward (the
        per-image part times the batch plus the part that does not grow with it, halved for bf16 autocast) times
        ACTIVATION_WORKING_SET (one GPU) or FSDP_ACTIVATION_WORKING_SET."""
        factor = ACTIVATION_WORKING_SET if world <= 1 else FSDP_ACTIVATION_WORKING_SET
        return (self.act_bytes_fixed + self.act_bytes_per_image * micro) * (0.5 if bf16 else 1.0) * factor

    def memory_per_gpu(self, world: int | None = None, bf16: bool = True,
                       sharded: bool | None = None) -> dict[str, float]:
        """Bytes per GPU: fp32 weights + grads + AdamW moments (sharded over `world` under FSDP)
        plus the activations the micro batch keeps for backward (halved for bf16 autocast)."""
        world = world or self.world
        sharded = world > 1 if sharded is None else sharded
        shard = world if sharded else 1
        states = (self.total_params * 4 + self.trainable_params * (4 + 8)) / shard
        acts = self.activation_bytes(self.micro_batch, bf16, world)
        return {"states": states, "activations": acts, "total": states + acts}


def batch_geometry(cfg: Config, world: int) -> tuple[int, int]:
    """(micro batch per GPU, accumulation steps) that keep the global batch for `world` GPUs."""
    gb, micro = cfg.train.batch_size, cfg.train.micro_batch
    if micro is None:
        accum = cfg.train.accum_steps
        if gb % (world * accum):
            raise ValueError(f"train.batch_size {gb} is not divisible by {world} GPUs x {accum} accumulation steps")
        return gb // (world * accum), accum
    micro = min(micro, max(1, gb // world))
    if gb % (world * micro):
        raise ValueError(f"train.batch_size {gb} is not divisible by {world} GPUs x train.micro_batch {micro}")
    return micro, gb // (world * micro)


def _sources(cfg: Config) -> list[str]:
    shards = cfg.data.shards
    if isinstance(shards, list):
        out = []
        for s in shards:
            if isinstance(s, dict):
                extra = ", ".join(f"{k} {v}" for k, v in s.items() if k != "path" and v is not None)
                out.append(f"{s.get('path')}" + (f" ({extra})" if extra else ""))
            else:
                out.append(str(s))
        return out
    return [str(shards)]


def estimate_samples(cfg: Config) -> int | None:
    if cfg.data.num_samples:
        return cfg.data.num_samples
    shards = cfg.data.shards
    if shards in ("builtin:quickstart", "synthetic"):
        return None
    try:
        from loaders import count_samples

        return count_samples(shards)
    except Exception:
        return None


def schedule_lengths(cfg: Config, num_samples: int | None) -> tuple[int, int | None, int]:
    """(total steps, steps per epoch or None, warmup steps)."""
    gb = cfg.train.batch_size
    spe = max(1, num_samples // gb) if num_samples else None
    if cfg.train.steps is not None:
        steps = cfg.train.steps
    elif spe is not None:
        steps = max(1, math.ceil(cfg.train.epochs * spe))
    else:
        raise ValueError("train.steps is not set and the data size is unknown: set train.steps or data.num_samples")
    if cfg.optim.warmup_steps is not None:
        warmup = cfg.optim.warmup_steps
    else:
        warmup = int(cfg.optim.warmup_epochs * spe) if spe else 0
    return steps, spe, min(warmup, steps)


def learning_rate(cfg: Config) -> float:
    return cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.base_lr * cfg.train.batch_size / 256


def _dynamo_cleared(fn):
    """Clear dynamo's caches after `fn` (a planning entry point that may trace _partitioned_blocks): the planning
    backend's cache entries would otherwise count against the recompile limit of the run's own compile of the same
    block code."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            import torch._dynamo

            torch._dynamo.reset()
    return wrapper


@_dynamo_cleared
def measure_model(cfg: Config) -> dict[str, float]:
    """Parameters, training FLOPs per image and saved activations, on the meta device (no memory, no GPU). The
    activations are traced at batch 2 and 3: act_bytes is the per-image part (their difference), act_fixed_bytes what
    does not grow with the batch (e.g. the heads' weight-normed last layers, 128 MiB at 65,536 prototypes): taken
    per image, that part was counted once per image of the micro batch (16 GiB too many at DINOv2 ViT-S batch 256).
    The activations are traced as a GPU run keeps them (_activation_model); the FLOPs on the torch path.
    With model.activation_checkpointing, a checkpointed block keeps only its input, and one block's activations are
    rebuilt at a time in backward (the largest is counted; policy "save_matmuls" is counted as "full")."""
    from engine.objectives import build_objective

    with torch.device("meta"):
        model = build_objective(cfg, torch.device("cpu"))
    m = cfg.model
    ac = (m.ac_every, m.ac_policy) if m.activation_checkpointing else None
    # FLOPs on the torch path (the counter does not see inside our kernels' custom ops), without the recomputation
    # (MFU counts the model's)
    flops = _trace(model, 1, count_flops=True)[0]
    # The activations as a GPU run keeps them: where model.kernels takes our kernels on CUDA, the model is built for
    # CUDA and traced through their custom ops (attention keeps q, k, v, o and the LSE, not the probabilities; the
    # fused cross-entropies keep no [rows, prototypes] fp32 copies), and with model.compile each block runs as the
    # compiler partitions it (_partitioned_blocks). These are the saved bytes; Plan.activation_bytes scales them by the
    # backward's working set (ACTIVATION_WORKING_SET, FSDP_ACTIVATION_WORKING_SET), measured against what an H200
    # held (README).
    model, context = _activation_model(cfg)
    per_image, fixed = _activation_parts(model, context, ac, compiled=m.compile)
    return {
        "encoder_params": count_params(model.encoder),
        "total_params": count_params(model),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "flops": flops,
        "act_bytes": per_image,
        "act_fixed_bytes": fixed,
    }


def _activation_parts(model, context, ac: tuple[int, str] | None, compiled: bool = False) -> tuple[float, float]:
    """(bytes saved for backward per image, bytes that do not grow with the batch), fp32 on the meta device, from
    traces at batch 2 and 3 (not 1 and 2: at batch 1 some views share a base, a single image's expand, and the trace
    is not yet linear in the batch). compiled: each encoder block runs as torch.compile partitions it for backward
    (_partitioned_blocks), which is what a compiled run saves."""
    def parts(blocks) -> tuple[float, float]:
        with context(), blocks:
            two, three = (_trace(model, b, ac=ac)[1] for b in (2, 3))
        return float(max(0, three - two)), float(max(0, 3 * two - 2 * three))

    if compiled:
        try:
            return parts(_partitioned_blocks(model))
        except Exception:  # noqa: BLE001 - a block the compiler cannot take: the eager trace (it errs high)
            pass
    return parts(contextlib.nullcontext())


@contextlib.contextmanager
def _partitioned_blocks(model):
    """The encoder's blocks compiled with the "aot_eager_decomp_partition" backend while inside: the forward and
    backward graphs split by the min-cut partitioner that inductor uses, run eagerly (on the meta device too), so the
    trace counts what a compiled block saves for backward. Eager timm blocks save more where the compiler recomputes
    cheap pointwise work in backward instead: a SwiGLU MLP's gate (DINOv2 ViT-g at micro 16 without checkpointing:
    the saved bytes, states included, came to 59.0 GiB eager and 52.6 partitioned); GELU blocks save a few per cent
    less.
    The callers clear dynamo's caches when done (_dynamo_cleared), so that a run's own compile afterwards (engine.run
    plans first) starts clean; several traces in between share the compiled blocks."""
    blocks = list(getattr(getattr(model, "encoder", None), "blocks", []))
    for block in blocks:
        block.forward = torch.compile(block.forward, backend="aot_eager_decomp_partition", dynamic=True)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def _activation_model(cfg: Config):
    """(model on the meta device, a factory of the context to trace it under) for measure_model's activation traces:
    built for CUDA and traced under kernels.triton_version.planning() where model.kernels takes our kernels on CUDA,
    else the torch path as built for the CPU."""
    from engine.models import use_triton
    from engine.objectives import build_objective
    from kernels import triton_version

    gpu = use_triton(cfg.model.kernels, "cuda")
    with torch.device("meta"):
        model = build_objective(cfg, torch.device("cuda" if gpu else "cpu"))
    return model, triton_version.planning if gpu else contextlib.nullcontext


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    """(an identity of the tensor's storage, its bytes): views share their base's. Where a tensor has no storage to
    ask (a subclass), its base tensor stands in."""
    try:
        storage = t.untyped_storage()
        return storage._cdata, storage.nbytes()
    except Exception:  # noqa: BLE001
        base = t._base if t._base is not None else t
        return id(base), base.numel() * base.element_size()


def _trace(model, batch: int, count_flops: bool = False, ac: tuple[int, str] | None = None) -> tuple[float, int]:
    """(training FLOPs of one step at `batch` images, or 0 without count_flops; bytes the step saves for backward)
    on the meta device, random draws seeded (DINOv2's iBOT masks). ac: (every, policy) of activation checkpointing
    on the encoder's blocks, as the trainer applies it: a checkpointed block counts its input, and the largest of
    those blocks' own saved tensors once (the one being recomputed in backward)."""
    import random

    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        x = model.synthetic_batch(batch, "meta")
    saved = 0
    params = {_storage_key(p)[0] for p in model.parameters()} | {_storage_key(b)[0] for b in model.buffers()}
    seen: set[int] = set()

    def counter_hook(add):
        def pack(t: torch.Tensor):
            # Count activations only, each storage once: weights saved by linear layers (or views of them) are not,
            # and a view shares its base's bytes (a compiled graph saves views such as q, k, v of one qkv buffer)
            key, nbytes = _storage_key(t)
            if key not in params and key not in seen:
                seen.add(key)
                add(nbytes)
            return t
        return pack

    def add_saved(n: int) -> None:
        nonlocal saved
        saved += n

    recompute = 0
    patched = []
    if ac:
        every = ac[0]
        for i, block in enumerate(model.encoder.blocks):
            if i % every:
                continue

            def forward(*a, _inner=block.forward, **k):
                nonlocal recompute
                x_in = a[0] if a else None
                if torch.is_tensor(x_in) and x_in.requires_grad:
                    add_saved(x_in.numel() * x_in.element_size())
                own = [0]
                with torch.autograd.graph.saved_tensors_hooks(counter_hook(lambda n: own.__setitem__(0, own[0] + n)),
                                                              lambda t: t):
                    out = _inner(*a, **k)
                recompute = max(recompute, own[0])
                return out

            patched.append((block, block.__dict__.get("forward")))
            block.forward = forward
    state = random.getstate()  # data-dependent parts (DINOv2's iBOT masks) drawn the same every time
    random.seed(0)
    counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
    try:
        with torch.random.fork_rng(devices=[]), counter:
            torch.manual_seed(0)
            with torch.autograd.graph.saved_tensors_hooks(counter_hook(add_saved), lambda t: t):
                out = model(x)
            out["loss"].backward()
    finally:
        random.setstate(state)
        for block, forward in patched:
            if forward is None:
                del block.forward
            else:
                block.forward = forward
    return (float(counter.get_total_flops()) if count_flops else 0.0), saved + recompute


def make_plan(cfg: Config, world: int = 1) -> Plan:
    m = measure_model(cfg)
    samples = estimate_samples(cfg)
    steps, spe, warmup = schedule_lengths(cfg, samples)
    micro, accum = batch_geometry(cfg, world)
    return Plan(
        model=cfg.model.name, encoder_params=m["encoder_params"], total_params=m["total_params"],
        trainable_params=m["trainable_params"], flops_per_image=m["flops"], act_bytes_per_image=m["act_bytes"],
        act_bytes_fixed=m["act_fixed_bytes"],
        global_batch=cfg.train.batch_size, world=world,
        micro_batch=micro, accum_steps=accum, steps=steps, steps_per_epoch=spe,
        epochs=steps / spe if spe else None, num_samples=samples, lr=learning_rate(cfg), warmup_steps=warmup,
        sources=_sources(cfg),
    )


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}"


def _gpu_compile_mode(cfg: Config, world: int) -> str | None:
    """model.compile_mode as a GPU run on `world` GPUs resolves it (MAE compiles the whole step, DINOv2 per block)."""
    from engine.config import resolve_compile_mode

    return resolve_compile_mode(cfg.model.compile_mode, compiled=cfg.model.compile,
                                whole_model=cfg.objective.name == "mae", world=world, device_type="cuda")


def _compile_note(cfg: Config, plan: Plan) -> str:
    """The compile mode a GPU run of this plan gets (model.compile_mode auto resolved), and whether
    its step replays CUDA graphs (which is what keeps the data stall near zero)."""
    from engine.config import CUDA_GRAPH_MODES

    if not cfg.model.compile:
        return ""
    mode = _gpu_compile_mode(cfg, plan.world)
    auto = "auto -> " if cfg.model.compile_mode == "auto" else ""
    tuned = ", coordinate-descent tuning" if cfg.model.compile_tuning else ""
    if mode in CUDA_GRAPH_MODES:
        return f" ({auto}{mode}: CUDA graphs{tuned})"
    why = "; auto uses CUDA graphs for a compiled MAE step on one GPU" if auto else ""
    return f" ({auto}{mode or 'default'}{tuned}{why})"


def format_plan(cfg: Config, plan: Plan, gpu_counts: tuple[int, ...] = (1, 8)) -> str:
    gib = 1024**3
    lines = [
        f"recipe          {cfg.run.name}   objective {cfg.objective.name}",
        f"model           {plan.model}  img {cfg.model.img_size}  patch {cfg.model.patch_size or 'timm default'}"
        f"  kernels {cfg.model.kernels}  compile {cfg.model.compile}" + _compile_note(cfg, plan),
        f"parameters      encoder {plan.encoder_params / 1e6:,.1f} M ({plan.encoder_params / 1e9:.3f} B)"
        f"   total {plan.total_params / 1e6:,.1f} M   trainable {plan.trainable_params / 1e6:,.1f} M",
        f"FLOPs / image   {_human(plan.flops_per_image, 'FLOP')} (forward + backward, training step)",
        f"batch           global {plan.global_batch} = {plan.world} GPU x {plan.micro_batch} micro x "
        f"{plan.accum_steps} accumulation",
        f"schedule        {plan.steps:,} steps"
        + (f" = {plan.epochs:,.1f} epochs of {plan.steps_per_epoch:,} steps" if plan.epochs else "")
        + f"; lr {plan.lr:.3g} (peak), warmup {plan.warmup_steps:,} steps, cosine to {cfg.optim.min_lr:g}",
        f"total compute   {_human(plan.flops_per_image * plan.global_batch * plan.steps, 'FLOP')}",
        f"data            {', '.join(plan.sources)}  backend {cfg.data.backend}"
        + (f"  ({plan.num_samples:,} samples)" if plan.num_samples else ""),
        "memory / GPU    (fp32 weights+grads+AdamW, bf16 activations at the micro batch with backward's working set"
        + ((", blocks checkpointed" if cfg.model.ac_every == 1 else f", every {_ordinal(cfg.model.ac_every)} block "
            "checkpointed") if cfg.model.activation_checkpointing else "") + ")",
    ]
    for n in gpu_counts:
        try:
            micro = batch_geometry(cfg, n)[0]
        except ValueError as e:
            lines.append(f"  {n} GPUs: {e}")
            continue
        mem = plan.memory_per_gpu(world=n, sharded=n > 1)
        acts = plan.activation_bytes(micro, world=n)
        gathered = _gathered_bytes(cfg, plan, n)
        sums = _graph_sum_bytes(cfg, plan, n, micro)
        total = mem["states"] + acts + gathered + sums
        fits = "fits" if total < H100_USABLE else "does NOT fit"  # module attribute: tests may lower it
        best = largest_micro_batch(cfg, plan, n)
        hint = (f"; largest micro batch that fits: {best}" if best and best != micro else
                "; no micro batch fits" if not best else "")
        lines.append(f"  {gpu_label(n)}  states "
                     f"{mem['states'] / gib:6.1f} GiB + activations {acts / gib:7.1f} GiB (micro {micro})"
                     + (f" + gathered bf16 params {gathered / gib:.1f} GiB" if gathered else "")
                     + (f" + gradient sums {sums / gib:.1f} GiB" if sums else "") + " = "
                     f"{total / gib:7.1f} GiB -> {fits} on an 80 GB H100{hint}")
    return "\n".join(lines)


def _checkpointed_parts(cfg: Config, plan: Plan, model, context):
    """c -> (bytes saved per image, fixed bytes) with c of the encoder's blocks checkpointed (c >= 1), for the model
    of `cfg` traced as _activation_parts does. Each checkpointed block swaps its own saved tensors for its input, and
    one block's own are rebuilt at a time in backward, so both parts are linear in c over equal blocks: the plan's
    trace (the recipe's setting) and one more (every block, or every 2nd where the recipe checkpoints every block)
    give every count. The second trace runs on the first call that needs it."""
    depth, m = len(model.encoder.blocks), cfg.model
    c_r, r = len(range(0, depth, m.ac_every)), (plan.act_bytes_per_image, plan.act_bytes_fixed)
    k_x = 1 if m.ac_every != 1 else 2
    c_x, x = len(range(0, depth, k_x)), []

    def parts(c: int) -> tuple[float, float]:
        if c == c_r:
            return r
        if not x:
            x.extend(_activation_parts(model, context, (k_x, m.ac_policy), compiled=m.compile))
        if c_x == c_r:  # one block: nothing to fit a line through
            return tuple(x)
        return tuple(vr + (c - c_r) * (vx - vr) / (c_x - c_r) for vr, vx in zip(r, x))
    return parts


@_dynamo_cleared
def lighter_checkpointing(cfg: Config, plan: Plan, gpu_counts: tuple[int, ...] = (1,),
                          budget: float | None = None) -> dict[int, str]:
    """With model.activation_checkpointing on: for each GPU count where a lighter setting's estimate also fits
    `budget` bytes (default: an 80 GB H100's usable part) at the recipe's micro batch, the lightest such (none at all,
    else checkpointing every k-th block, for each count of checkpointed blocks below the recipe's the largest k that
    gives it), as a phrase naming the estimate and the override. Each checkpointed block runs its forward twice, so a
    lighter setting is faster where it fits (on an H200, 2026-11-30: MAE ViT-g / ViT-H 1.48x / 1.44x without it,
    DINOv2 ViT-g 1.12x at every 2nd block instead of every block, 1.05x more at every 3rd). Empty when checkpointing
    is off or nothing lighter fits. Traces "none" on the meta device (a few seconds for a ViT-g), then, where that does
    not fit, the every-k settings through _checkpointed_parts (one more trace for all of them)."""
    m = cfg.model
    if not m.activation_checkpointing:
        return {}
    model, context = _activation_model(cfg)
    depth = len(model.encoder.blocks)
    todo = {}
    for n in gpu_counts:
        try:
            todo[n] = batch_geometry(cfg, n)[0]
        except ValueError:
            continue
    by_count: dict[int, int] = {}  # checkpointed blocks -> the largest k that checkpoints that many
    recipe_count = len(range(0, depth, m.ac_every))
    for k in range(depth - 1, m.ac_every, -1):
        count = len(range(0, depth, k))
        if count < recipe_count:  # a larger k can checkpoint as many blocks as the recipe's: not lighter
            by_count.setdefault(count, k)
    checkpointed = _checkpointed_parts(cfg, plan, model, context)
    found: dict[int, str] = {}
    for c in [0] + sorted(by_count):  # lightest first
        if not todo:
            break
        if c == 0:
            per_image, fixed = _activation_parts(model, context, None, compiled=m.compile)
        else:
            per_image, fixed = checkpointed(c)
        lighter = dataclasses.replace(plan, act_bytes_per_image=per_image, act_bytes_fixed=fixed)
        for n, micro in list(todo.items()):
            total = _batch_free_bytes(cfg, plan, n) + lighter.activation_bytes(micro, world=n)
            if total < (H100_USABLE if budget is None else budget):
                k = by_count.get(c)
                setting = ("without checkpointing: model.activation_checkpointing=false" if c == 0 else
                           f"checkpointing every {_ordinal(k)} block ({c} of {depth}): model.ac_every={k}")
                found[n] = f"{total / 1024**3:.1f} GiB at micro {micro} {setting}"
                del todo[n]
    return dict(sorted(found.items()))


def gpu_label(n: int) -> str:
    """The dry run's name for a GPU count, padded so that its memory lines align: "1 GPU       ", "8 GPUs (FSDP)"."""
    return f"{n} GPU{'s' if n > 1 else ' '}{' (FSDP)' if n > 1 else '       '}"


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


# Of a card's memory, what the plan lets a run take; the rest for the CUDA context, NCCL's buffers and run-to-run
# spread (the allocator's fragmentation and workspaces are in ACTIVATION_WORKING_SET since 2026-11-30).
USABLE_FRACTION = 0.92
H100_MEMORY = 81559 * 2**20  # what an "80 GB" H100 (HBM3) has: 81,559 MiB in nvidia-smi, 79.6 GiB
H100_USABLE = H100_MEMORY * USABLE_FRACTION


def _gathered_bytes(cfg: Config, plan: Plan, n: int) -> float:
    """FSDP with train.fsdp_reshard_after_forward false keeps every group's gathered bf16 parameters from forward to
    backward: a full bf16 copy of the model per GPU."""
    return plan.total_params * 2 if n > 1 and not cfg.train.fsdp_reshard_after_forward else 0


def _graph_sum_bytes(cfg: Config, plan: Plan, n: int, micro: int | None = None) -> float:
    """A step replayed as CUDA graphs (model.compile_mode resolving to a graph mode: a compiled MAE step on one GPU)
    with more than one micro-batch copies each micro-batch's gradients out of the graphs' memory into sums of its own
    (Trainer._take_grads): one more fp32 copy of the trainable parameters. Measured (bench._probe_memory, MAE ViT-L at
    micro 256 on an H200, 2026-11-30): held 23.5 GiB at two micro-batches a step against 22.3 at one, where the
    parameters take 1.2 GiB. micro: the micro batch (default: the recipe's on n GPUs)."""
    from engine.config import CUDA_GRAPH_MODES

    if _gpu_compile_mode(cfg, n) not in CUDA_GRAPH_MODES or n > 1:
        return 0.0
    micro = batch_geometry(cfg, n)[0] if micro is None else micro
    return plan.trainable_params * 4.0 if cfg.train.batch_size // n > micro else 0.0


def _batch_free_bytes(cfg: Config, plan: Plan, n: int, micro: int | None = None) -> float:
    """Bytes per GPU on n GPUs that do not grow with the micro batch: weights, gradients and optimizer state (sharded
    under FSDP), plus the gathered bf16 copy where it is kept, plus the gradient sums of a graphed step that
    accumulates (micro: the micro batch, default the recipe's)."""
    return (plan.memory_per_gpu(world=n, sharded=n > 1)["states"] + _gathered_bytes(cfg, plan, n)
            + _graph_sum_bytes(cfg, plan, n, micro))


def largest_micro_batch(cfg: Config, plan: Plan, n: int, budget: float | None = None) -> int | None:
    """The largest micro batch per GPU on n GPUs that keeps the global batch (it divides train.batch_size / n) and
    whose estimated memory stays under `budget` bytes (default H100_USABLE); None when not even 1 does (or n does not
    divide the batch)."""
    budget = H100_USABLE if budget is None else budget
    if cfg.train.batch_size % n:
        return None
    per_gpu = cfg.train.batch_size // n
    fitting = [m for m in range(1, per_gpu + 1)
               if per_gpu % m == 0 and _batch_free_bytes(cfg, plan, n, m) + plan.activation_bytes(m, world=n) < budget]
    return max(fitting) if fitting else None


# ----------------------------------------------------------------------------- memory advice for a run
@_dynamo_cleared
def memory_advice(cfg: Config, world: int, capacity: float | None, *, failed: bool = False,
                  plan: Plan | None = None) -> str | None:
    """What to tell a user whose run at `world` GPUs of `capacity` bytes each will not fit (failed=False: a warning
    before training, None when the plan's estimate fits) or ran out of memory (failed=True: always a message). It
    names the estimate, the largest micro batch the estimate fits on this card (keeping the global batch),
    activation checkpointing where it is off, and checkpointing every block where only every k-th is and that fits.
    The estimate came within -3 to +2 % of what an H200 held (README), so a warning is a warning only. plan: the
    plan for `world` GPUs where the caller has made it already."""
    plan = plan or make_plan(cfg, world)
    micro = plan.micro_batch
    states = _batch_free_bytes(cfg, plan, world)
    need = states + plan.activation_bytes(micro, world=world)
    budget = capacity * USABLE_FRACTION if capacity else None
    if not failed and (budget is None or need < budget):
        return None
    gib = 2**30
    card = f"{capacity / gib:.0f} GiB GPU" if capacity else "GPU"
    head = (f"CUDA ran out of memory at micro batch {micro} on a {card}"
            if failed else f"micro batch {micro} may not fit this {card}")
    sums = " with the graphed step's gradient sums" if _graph_sum_bytes(cfg, plan, world) else ""
    text = f"{head}: the plan estimates {need / gib:.1f} GiB per GPU ({states / gib:.1f} of weights, gradients and " \
           f"optimizer state{sums}, {plan.activation_bytes(micro, world=world) / gib:.1f} of activations)."
    hints = []
    best = largest_micro_batch(cfg, plan, world, budget) if budget else None
    if best and best < micro:
        hints.append(f"train.micro_batch={best} (the largest the estimate fits here; the global batch stays "
                     f"{cfg.train.batch_size} through accumulation)")
    if not cfg.model.activation_checkpointing:
        hints.append("model.activation_checkpointing=true")
    elif cfg.model.ac_every > 1 and budget:  # checkpointing only every k-th block: every block may fit
        model, context = _activation_model(cfg)
        per_image, fixed = _activation_parts(model, context, (1, cfg.model.ac_policy), compiled=cfg.model.compile)
        every = states + dataclasses.replace(plan, act_bytes_per_image=per_image,
                                             act_bytes_fixed=fixed).activation_bytes(micro, world=world)
        if every < budget:
            hints.append(f"model.ac_every=1 (checkpointing every block: {every / gib:.1f} GiB at micro {micro})")
    if world == 1:
        hints.append("more GPUs (torchrun: FSDP2 shards the weights and optimizer state)")
    return text + (" Try " + ", or ".join(hints) + "." if hints else "")


# ----------------------------------------------------------------------------- recipe table
def _row_objective(row: dict) -> str | None:
    """The objective of a bench train row: recorded in `train` rows; for `train-scaling` rows, the recipe's with the
    entry's own overrides (`PATH::key=value`)."""
    if row.get("objective"):
        return row["objective"]
    try:
        from engine.config import load_config, split_entry

        return load_config(*split_entry(row["recipe"])).objective.name
    except Exception:  # a recipe renamed or removed since: the row cannot be attributed
        return None


def _measured_throughput(results_glob: str) -> tuple[dict[tuple[str, str, int], float], str | None, float | None]:
    """img/s by (objective, timm model name, micro batch per GPU) from bench train results (best engine variant
    of one GPU), the card, and the mean MFU. Keyed so that a model two objectives share (MAE's and DINOv2's ViT-H)
    and a recipe measured at several micro batches are told apart."""
    import glob
    import json

    best: dict[tuple[str, str, int], float] = {}
    card, mfus = None, []

    def keep(row: dict, batch, img_s: float) -> None:
        objective = _row_objective(row)
        if objective and batch:
            key = (objective, row["model"], int(batch))
            best[key] = max(img_s, best.get(key, 0.0))

    for path in sorted(glob.glob(results_glob)):
        data = json.loads(open(path).read())
        if data.get("suite") == "train-scaling":  # its 1-GPU rows are single-GPU throughput too
            for row in data.get("rows", []):
                if row.get("gpus") == 1 and row.get("img_s"):
                    keep(row, row.get("batch_per_gpu"), row["img_s"])
                    mfus += [row["mfu"]] if row.get("mfu") else []
            continue
        if data.get("suite") != "train":
            continue
        card = data.get("card", card)
        for row in data.get("rows", []):
            vals = [row.get(k) for k in ("engine-triton_img_s", "engine-torch_img_s", "engine_img_s") if row.get(k)]
            if vals:
                keep(row, row.get("batch"), max(vals))
                mfu = [row.get(k) for k in ("engine-triton_mfu", "engine-torch_mfu", "engine_mfu") if row.get(k)]
                mfus += mfu
    return best, card, (sum(mfus) / len(mfus) if mfus else None)


def recipe_table(recipes: list[str], results_glob: str = "bench/results/train-*.json",
                 peak: float = 989e12) -> str:
    """Markdown table of recipes: parameters, FLOPs/image, total compute, GPU-hours at the
    throughput measured by `bench train` for the recipe's objective, model and micro batch on one GPU (the best
    such row), or, where none was measured, at the mean measured MFU."""
    measured, card, mfu = _measured_throughput(results_glob)
    head = ("| recipe | objective | model | encoder params | FLOPs / image (train) | images seen | total FLOP "
            "| img/s / GPU | GPU-hours |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for recipe in recipes:
        cfg = load_config_for_table(recipe)
        plan = make_plan(cfg)
        images = plan.global_batch * plan.steps
        key = (cfg.objective.name, plan.model, batch_geometry(cfg, 1)[0])  # measured at the recipe's micro batch
        if key in measured:
            rate, how = measured[key], "measured"
        elif mfu:
            rate, how = mfu * peak / plan.flops_per_image, "est."
        else:
            rate, how = None, ""
        hours = f"{images / rate / 3600:,.0f}" if rate else "—"
        rate_s = f"{rate:,.0f} ({how})" if rate else "—"
        lines.append(f"| `{Path(recipe).name}` | {cfg.objective.name} | {plan.model} | "
                     f"{plan.encoder_params / 1e6:,.1f} M "
                     f"| {_human(plan.flops_per_image, 'FLOP')} | {images / 1e6:,.0f} M | "
                     f"{_human(plan.flops_per_image * images, 'FLOP')} | {rate_s} | {hours} |")
    note = (f"\nThroughput: `python -m bench train` on {card}" + (f", mean MFU {mfu:.1%}" if mfu else "")
            + "; 'est.' rows assume that MFU at the card's dense bf16 peak.\n") if card else ""
    return "\n".join(lines) + "\n" + note


def load_config_for_table(recipe: str):
    from engine.config import load_config

    return load_config(recipe)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m engine.plan",
                                 description="Markdown table of recipes (parameters, FLOPs, GPU-hours).")
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--results", default="bench/results/train-*.json", help="bench train result files")
    args = ap.parse_args(argv)
    print(recipe_table(args.recipes, args.results))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

