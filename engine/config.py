"""Recipes: YAML -> typed, validated config objects, with `key.sub=value` overrides.

A recipe is pure YAML with the sections below. A recipe may start with `base: other.yaml`
(a path relative to itself) to be an overlay on another recipe. Every key can be
overridden on the command line; an unknown key or a value of the wrong type is an error
that names the key and what is valid.
"""
from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not validate; the message says what is valid."""


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


def resolve_compile_mode(mode: str | None, *, compiled: bool, whole_model: bool, world: int,
                         device_type: str) -> str | None:
    """model.compile_mode as torch.compile gets it: "auto" is "reduce-overhead" (CUDA graphs) for a
    compiled whole-model step on one CUDA device (with or without gradient accumulation), else None
    (torch's default); any other value is kept."""
    if mode != "auto":
        return mode
    eligible = compiled and whole_model and world == 1 and device_type == "cuda"
    return "reduce-overhead" if eligible else None


def compile_kwargs(mode: str | None, tuning: bool) -> dict:
    """torch.compile's keywords for a resolved model.compile_mode and model.compile_tuning: {"mode": mode}, or with
    tuning the mode's own inductor options plus coordinate_descent_tuning (torch.compile takes a mode or options,
    not both; the max-autotune modes tune that way already)."""
    if not tuning:
        return {"mode": mode}
    import torch._inductor

    options = dict(torch._inductor.list_mode_options(mode or "default"))
    if options.get("coordinate_descent_tuning"):
        return {"mode": mode}
    return {"options": {**options, "coordinate_descent_tuning": True}}


@dataclass
class ModelConfig:
    name: str = "vit_base_patch16_224"  # a timm ViT name
    img_size: int = 224
    patch_size: int | None = None  # None: the timm model's own
    drop_path: float = 0.0
    kernels: Literal["auto", "triton", "torch"] = "auto"  # auto: triton on CUDA, torch elsewhere
    compile: bool = False  # torch.compile: the whole model (MAE, 1 GPU) or per block (FSDP, DINOv2)
    # torch.compile mode; "reduce-overhead" replays the whole-model MAE step as CUDA graphs (one GPU; with
    # gradient accumulation each micro-batch's gradients are copied out of the graphs' memory). "auto" (the
    # default) picks it where it applies (MAE, compiled, one CUDA device) and torch's default mode elsewhere:
    # in engine.run on an H200 (ViT-B, batch 256, dali) it took the data stall from 18.8 % to -0.1 % and
    # the synthetic-data rate from 5,020 to 5,208 img/s; with 2 micro-batches per step, from 8.9 % to 1.5 %
    # and from 5,132 to 5,273 img/s (README)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs",
                          "auto"] | None = "auto"
    # Inductor's coordinate-descent tuning of its generated kernels' launch configs (block sizes, warps) on top of
    # compile_mode, without max-autotune's GEMM search; only with model.compile. Costs compile time once (kept in
    # inductor's cache). H200, in one process, two rounds each: DINOv2 ViT-S b256 163.5 / 164.4 vs 168.7 / 167.8 ms
    # a step (1.026x; first compile 136 s vs 34 s), so the DINOv2 recipes turn it on; MAE ViT-L b256, CUDA graphs,
    # 80.25 / 80.32 vs 80.96 / 80.88 ms (1.008x; 356 s vs 76 s), so off by default
    compile_tuning: bool = False
    # The patch embedding as one matrix product over the patches (engine.models.PatchMatmul) instead of cuDNN's
    # convolution, which ran a generic kernel on an H200; same parameters and checkpoints. On an H200 (K73) the op
    # fwd+bwd took 1.55 vs 5.01 ms at DINOv2 ViT-S's global crops and 0.865 vs 4.13 at MAE ViT-L's batch (3.2-4.8x),
    # and a step 1.04x at both (bench ab --switch matmul: DINOv2 ViT-S b256 1,423 vs 1,364 img/s, MAE ViT-L b256
    # 3,112 vs 2,982, every block of one setting beating every block of the other)
    patch_matmul: bool = True
    # Each block's LayerScale (the DINOv2 ViTs') applied by the linear layer before it, gamma folded into its weight
    # and bias (engine.models.fold_layer_scale): the same function and parameters, and gamma's gradient comes from
    # weight-sized products instead of a reduction over every token. No effect on models without LayerScale. On an
    # H200 (bench ab --switch fold_layerscale, compile tuning off): DINOv2 ViT-S b256 1,576 vs 1,546 img/s (1.02x, 5
    # of 6 blocks on faster than every block off), ViT-L b64 213 vs 211 (1.01x, 3 of 4)
    fold_layerscale: bool = True
    activation_checkpointing: bool = False
    # Which blocks and what they keep: every k-th encoder block is checkpointed (1: all), and
    # "full" recomputes the whole block in backward while "save_matmuls" (selective) keeps the
    # outputs of matmuls and attention and recomputes only norms, activations and adds.
    ac_every: int = 1
    ac_policy: Literal["full", "save_matmuls"] = "full"


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    # Order of the decoder's pixel predictions within a patch (its last layer's rows): "pqc", MAE's patchify
    # (pixel-major, channel fastest), or "cpq" (channel-major, rows as in the image), which lets the Triton
    # loss read the image in 16-byte vectors instead of 2-byte gathers (kernels/README.md): on an H200 at MAE-L
    # the loss runs 0.102 ms fwd+bwd in cpq vs 0.135 in pqc. The model learns the same function either way; a
    # run keeps the order it started with (its decoder head is in it): resuming with the other one is an error.
    pred_layout: Literal["pqc", "cpq"] = "cpq"


@dataclass
class DINOv2Config:
    # Heads: MLP (layers, hidden, bottleneck) then an L2-normalized prototype layer.
    dino_prototypes: int = 65536
    ibot_prototypes: int = 65536
    ibot_separate_head: bool = True  # False: the iBOT loss shares the DINO head
    head_layers: int = 3
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    # Temperatures and teacher centering.
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_temp_start: float = 0.04  # warmed up linearly to teacher_temp ...
    teacher_temp_warmup: float = 0.3  # ... over this fraction of training
    centering: Literal["sinkhorn", "softmax"] = "sinkhorn"  # either kept as factors under fused_ce (never written)
    sinkhorn_iters: int = 3
    center_momentum: float = 0.9  # running center, centering: softmax
    # EMA teacher: momentum follows a cosine from momentum_start to momentum_end.
    momentum_start: float = 0.992
    momentum_end: float = 1.0
    # Loss weights.
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    # iBOT block-wise masking of the student's global crops.
    mask_probability: float = 0.5  # share of global crops that are masked
    mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])  # per-crop ratio, uniform in range
    # Optimization schedule (lr and the starting weight decay come from `optim`).
    weight_decay_end: float = 0.2  # cosine from optim.weight_decay to this
    freeze_last_layer: float = 0.01  # fraction of training with the prototype layers frozen
    layer_decay: float = 0.9  # lr x layer_decay^(depth - layer) per block
    patch_embed_lr_scale: float = 0.2
    pack_crops: bool = True  # one student pass over all crops (attention per crop size; Triton kernels only)
    # With our kernels (model.kernels): iBOT's Sinkhorn targets kept as factors (kernels.sinkhorn_knopp) and its
    # cross-entropy by kernels.soft_cross_entropy, the [masked patches, prototypes] targets never written; DINO's
    # class-token loss likewise by kernels.crop_cross_entropy over every pair of crops; the torch form otherwise.
    # H200, DINOv2 ViT-S batch 256: the step 1.28x with iBOT's (bench ab --switch fused_ce), 1.04x more with DINO's
    # (bench ab --switch fused_dino). Under centering: softmax the targets are factors too (kernels.softmax_targets):
    # 1.21x a ViT-S step
    fused_ce: bool = True
    # The teacher's pass over the global crops replayed as a CUDA graph (engine.cuda_graphs.GraphedForward) on one
    # CUDA device (not under FSDP2): no gradient, fixed shapes, so its compiled-block calls cost no host time. For
    # steps bound by the host (small batches, slow CPUs). On an H200 with 16 cores it gained little: DINOv2 ViT-L b32
    # 1.01x, ViT-S b256 0.99x (bench ab --switch teacher_graph), so it stays off by default
    teacher_graph: bool = False
    encoder_kwargs: Any = None  # extra timm.create_model kwargs (e.g. {reg_tokens: 4}); a mapping


@dataclass
class ObjectiveConfig:
    name: Literal["mae", "dinov2"] = "mae"  # selects the sub-section below that applies
    mae: MAEConfig = field(default_factory=MAEConfig)
    dinov2: DINOv2Config = field(default_factory=DINOv2Config)


@dataclass
class AugmentConfig:
    scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    hflip: float = 0.5
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class MultiCropConfig:
    """DINOv2 crops (objective dinov2); ratio, hflip, mean and std come from data.augment."""
    global_size: int = 224
    local_size: int = 96  # a multiple of the patch size (98 for /14 models)
    global_crops: int = 2
    local_crops: int = 8
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    color_jitter: float = 0.8  # probability of brightness/contrast/saturation/hue jitter
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.2
    blur: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])  # p for global 1, other globals, locals
    solarize: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.0])  # same layout


@dataclass
class DataConfig:
    # A shard folder, a remote URI, "builtin:quickstart", "synthetic" (random tensors, for
    # benchmarks), or a list of {path, proportion} streams.
    shards: Any = "builtin:quickstart"
    backend: str = "auto"  # auto | cpu | nvjpeg | dali | ffcv
    workers: int | None = None  # loader worker processes (None: up to 8)
    num_samples: int | None = None  # corpus size, for --dry-run when shards are not reachable
    cache_dir: str | None = None
    num_canonical_nodes: int | None = None
    # per-backend loader settings, passed to the backend in use, e.g. {dali: {hw_decoder_load: 0.65,
    # max_ahead: 3}, nvjpeg: {max_ahead: 2}}; see each backend's constructor
    options: Any = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    multicrop: MultiCropConfig = field(default_factory=MultiCropConfig)


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch / 256
    lr: float | None = None  # absolute lr; overrides base_lr scaling
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None  # overrides warmup_epochs
    clip_grad: float | None = None  # max global grad norm; None: no clipping


@dataclass
class TrainConfig:
    batch_size: int = 4096  # global, across GPUs and accumulation steps
    micro_batch: int | None = None  # per GPU per forward; accumulation = batch_size / (GPUs x micro_batch)
    accum_steps: int = 1  # used when micro_batch is null
    epochs: float = 800.0
    steps: int | None = None  # overrides epochs
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    max_nonfinite: int = 20  # consecutive non-finite losses that stop training
    # FSDP2 (torchrun, > 1 GPU): gradient reduce-scatter precision, and whether each block
    # frees its gathered parameters after forward (False: more memory, one all-gather less).
    # fsdp_blocks_per_group > 1 shards consecutive blocks as one group: fewer, larger
    # collectives and less per-group host work (eager FSDP2 spends ~1-3 ms of CPU per group).
    fsdp_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    fsdp_reshard_after_forward: bool = True
    fsdp_blocks_per_group: int = 1
    # CUDA caching allocator: "expandable" maps memory into segments that grow, so blocks of ever new sizes reuse it;
    # "default" is torch's. auto: expandable for DINOv2 without the teacher graph (its iBOT tensors change size every
    # step: DINOv2 ViT-S b256 on an H200 held 85.5 GiB at 48.6 allocated with the default, growing ~7.5 GiB every
    # other step, and 49.1 expandable, at the same speed: 1,483 / 1,432 vs 1,480 / 1,422 img/s, crosswise on two
    # GPUs), the default elsewhere (MAE's shapes are fixed and its step replays CUDA graphs). A PYTORCH_CUDA_ALLOC_CONF
    # or PYTORCH_ALLOC_CONF naming expandable_segments wins.
    allocator: Literal["auto", "expandable", "default"] = "auto"
    # Python's garbage collector: after this many steps of a process (compilation and CUDA graph recording done), one
    # collection, then gc.freeze() of what is left, so that the collector's full (generation-2) passes no longer walk
    # the millions of objects that compiling leaves alive. Without it, DINOv2 ViT-L on two H200s under FSDP2 paused
    # 260-420 ms every ~60 steps on each rank, 2-4 % of its throughput. null: 3 on CUDA, off on the CPU; 0: off.
    gc_freeze_after: int | None = None


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep: int = 2  # newest checkpoints kept


@dataclass
class LogConfig:
    every_steps: int = 20
    tensorboard: bool = True
    progress: bool = True


@dataclass
class EvalConfig:
    """Periodic linear-probe evaluation on MedMNIST tasks during pretraining (engine.eval)."""

    data: str | None = None  # folder with the official MedMNIST .npz files; null: no periodic eval
    every_epochs: float | None = None
    every_steps: int | None = None  # overrides every_epochs
    tasks: list[str] = field(default_factory=lambda: ["pathmnist", "dermamnist", "bloodmnist"])
    method: Literal["linear", "knn", "both"] = "knn"  # knn is cheap enough to run often
    max_train: int | None = 20000  # training samples per task for the probe (null: all)


@dataclass
class RunConfig:
    name: str | None = None  # default: the recipe file's stem
    dir: str | None = None  # default: runs/<name>


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- validation
def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: {value!r} is not valid; valid: {', '.join(map(repr, get_args(tp)))}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in valid]
    if unknown:
        where = f"section {prefix!r}" if prefix else "the recipe"
        full = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown key {full!r} in {where}; valid keys: {', '.join(valid)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _check(cfg: Config) -> None:
    def bad(key: str, why: str) -> None:
        raise ConfigError(f"{key}: {why}")

    mae = cfg.objective.mae
    if not 0.0 <= mae.mask_ratio < 1.0:
        bad("objective.mae.mask_ratio", f"must be in [0, 1), got {mae.mask_ratio}")
    if mae.decoder_dim % mae.decoder_heads:
        bad("objective.mae.decoder_dim", "must be divisible by objective.mae.decoder_heads")
    if cfg.objective.name == "dinov2":
        _check_dinov2(cfg, bad)
    if cfg.train.batch_size <= 0 or cfg.train.accum_steps <= 0:
        bad("train.batch_size", "batch_size and accum_steps must be positive")
    if cfg.train.micro_batch is not None and cfg.train.micro_batch <= 0:
        bad("train.micro_batch", "must be positive or null")
    if cfg.train.device not in ("auto", "cpu", "cuda") and not cfg.train.device.startswith("cuda:"):
        bad("train.device", f"{cfg.train.device!r} is not valid; valid: 'auto', 'cpu', 'cuda', 'cuda:N'")
    if cfg.optim.clip_grad is not None and cfg.optim.clip_grad <= 0:
        bad("optim.clip_grad", "must be positive or null")
    if len(cfg.optim.betas) != 2:
        bad("optim.betas", "needs two values")
    if cfg.model.img_size <= 0:
        bad("model.img_size", "must be positive")
    if cfg.model.compile_mode not in (None, "auto") and not cfg.model.compile:
        bad("model.compile_mode", "needs model.compile: true")
    if cfg.model.compile_mode in CUDA_GRAPH_MODES and cfg.objective.name != "mae":
        bad("model.compile_mode", f"{cfg.model.compile_mode} (CUDA graphs) is for the whole-model MAE step")
    opts = cfg.data.options
    if opts is not None:
        from loaders.loader import KNOWN_BACKENDS

        if not isinstance(opts, dict) or not all(isinstance(v, dict) for v in opts.values()):
            bad("data.options", f"must map a backend to its settings, e.g. {{dali: {{max_ahead: 3}}}}; got {opts!r}")
        unknown = sorted(set(opts) - set(KNOWN_BACKENDS))
        if unknown:
            bad("data.options", f"unknown backend {unknown[0]!r}; valid: {', '.join(KNOWN_BACKENDS)}")
    if cfg.checkpoint.every_steps <= 0 or cfg.log.every_steps <= 0:
        bad("checkpoint.every_steps", "checkpoint and log intervals must be positive")


def _check_dinov2(cfg: Config, bad) -> None:
    d, mc = cfg.objective.dinov2, cfg.data.multicrop
    if d.dino_prototypes <= 0 or d.ibot_prototypes <= 0 or d.head_layers < 1:
        bad("objective.dinov2.dino_prototypes", "prototype counts and head_layers must be positive")
    if len(d.mask_ratio) != 2 or not 0.0 <= d.mask_ratio[0] <= d.mask_ratio[1] < 1.0:
        bad("objective.dinov2.mask_ratio", f"needs [lo, hi] with 0 <= lo <= hi < 1, got {d.mask_ratio}")
    if not 0.0 <= d.mask_probability <= 1.0:
        bad("objective.dinov2.mask_probability", f"is a probability, got {d.mask_probability}")
    if not 0.0 <= d.momentum_start <= d.momentum_end <= 1.0:
        bad("objective.dinov2.momentum_start", "needs 0 <= momentum_start <= momentum_end <= 1")
    if min(d.student_temp, d.teacher_temp, d.teacher_temp_start) <= 0:
        bad("objective.dinov2.teacher_temp", "temperatures must be positive")
    if d.encoder_kwargs is not None and not isinstance(d.encoder_kwargs, dict):
        bad("objective.dinov2.encoder_kwargs", f"must be a mapping of timm kwargs, got {d.encoder_kwargs!r}")
    if mc.global_crops < 1 or mc.local_crops < 0 or mc.global_crops + mc.local_crops < 2:
        bad("data.multicrop.global_crops", "needs at least 1 global crop and 2 crops in all")
    if mc.global_size <= 0 or mc.local_size <= 0:
        bad("data.multicrop.global_size", "crop sizes must be positive")
    if len(mc.blur) != 3 or len(mc.solarize) != 3:
        bad("data.multicrop.blur", "blur and solarize take 3 probabilities: [global 1, other globals, locals]")


# ----------------------------------------------------------------------------- loading
def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe(path: str | Path, _seen: tuple = ()) -> dict[str, Any]:
    """The recipe as a plain dict, with `base:` overlays resolved."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} not found")
    if path.resolve() in _seen:
        raise ConfigError(f"recipe {path} includes itself through 'base'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections")
    base = data.pop("base", None)
    if base:
        data = _merge(read_recipe(path.parent / base, _seen + (path.resolve(),)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def split_entry(entry: str) -> tuple[str, list[str]]:
    """A recipe entry as bench train's `--recipes` and its result rows write it, `PATH` or `PATH::key=value::...`, as
    (the recipe's path, its own overrides)."""
    path, *own = str(entry).split("::")
    return path, own


def load_config(recipe: str | Path | None, overrides: list[str] = (), overlays: list[str | Path] = ()) -> Config:
    """Recipe, then overlay recipes in order (e.g. a data-size or modality variant), then
    `key.sub=value` overrides."""
    data = read_recipe(recipe) if recipe else {}
    for overlay in overlays:
        data = _merge(data, read_recipe(overlay))
    for text in overrides:
        apply_override(data, *parse_override(text))
    cfg = _build(Config, data)
    if cfg.run.name is None and recipe:
        cfg.run.name = "+".join(Path(r).stem for r in [recipe, *overlays])
    _check(cfg)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
