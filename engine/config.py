"""Recipes: YAML -> typed, validated config objects, with `key.sub=value` overrides.

A recipe is pure YAML with the sections below. A recipe may start with `base: other.yaml`
(a path relative to itself) to be an overlay on another recipe. Every key can be
overridden on the command line; an unknown key or a value of the wrong type is an error
that names the key and what is valid.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not validate; the message says what is valid."""


@dataclass
class ModelConfig:
    name: str = "vit_base_patch16_224"  # a timm ViT name
    img_size: int = 224
    patch_size: int | None = None  # None: the timm model's own
    drop_path: float = 0.0
    kernels: Literal["auto", "triton", "torch"] = "auto"  # auto: triton on CUDA, torch elsewhere
    compile: bool = False  # torch.compile each transformer block
    activation_checkpointing: bool = False


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True


@dataclass
class ObjectiveConfig:
    name: Literal["mae"] = "mae"  # selects the sub-section below that applies
    mae: MAEConfig = field(default_factory=MAEConfig)


@dataclass
class AugmentConfig:
    scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    hflip: float = 0.5
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


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
    augment: AugmentConfig = field(default_factory=AugmentConfig)


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
    if cfg.checkpoint.every_steps <= 0 or cfg.log.every_steps <= 0:
        bad("checkpoint.every_steps", "checkpoint and log intervals must be positive")


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


def load_config(recipe: str | Path | None, overrides: list[str] = ()) -> Config:
    data = read_recipe(recipe) if recipe else {}
    for text in overrides:
        apply_override(data, *parse_override(text))
    cfg = _build(Config, data)
    if cfg.run.name is None and recipe:
        cfg.run.name = Path(recipe).stem
    _check(cfg)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
