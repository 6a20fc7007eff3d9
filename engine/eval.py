"""Evaluate a frozen encoder on the 12 MedMNIST tasks: linear probe and/or kNN.

    python -m engine.eval RUN_DIR --data DIR [--tasks pathmnist chestmnist ...] [--method linear|knn|both]
    python -m engine.eval weights.safetensors --model vit_base_patch16_224 --data DIR

RUN_DIR is a training run (config.yaml + checkpoints/LATEST); a step directory or a bare
`.safetensors`/`.pth` state dict of any timm ViT works too (`--model` then names it).
Features are extracted once (bf16 on CUDA, fp32 on CPU), cached under OUT/cache and reused;
results go to OUT (default RUN_DIR/eval/) as `<method>[_<step>].json` and `.md`.

From the trainer: `evaluate_encoder(encoder, data_dir, tasks)` → {task: {"auc", "acc"}}.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from engine.evaluation.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureCache,
    cache_key,
    extract_features,
    file_fingerprint,
    weights_fingerprint,
)
from engine.evaluation.medmnist import (
    ALL_TASKS,
    SPLITS,
    MissingDataError,
    check_available,
    load_images,
    load_task,
    subsample,
)
from engine.evaluation.metrics import task_metrics
from engine.evaluation.probe import ProbeConfig, knn_predict, predict, train_linear_probe

METHODS = ("linear", "knn")


# ----------------------------------------------------------------------------- checkpoints


class CheckpointError(ValueError):
    """The checkpoint argument cannot be turned into a model (e.g. no --model for a bare file)."""


@dataclass
class Checkpoint:
    weights: Path
    model: str
    img_size: int | None
    patch_size: int | None = None
    run_dir: Path | None = None
    step: str | None = None
    objective: str | None = None
    config: dict = field(default_factory=dict)


def _read_config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}


def resolve_checkpoint(
    path: str | Path,
    *,
    model: str | None = None,
    img_size: int | None = None,
    patch_size: int | None = None,
    step: str | None = None,
) -> Checkpoint:
    """A run dir, a step dir or a weights file → what to load and how."""
    path = Path(path)
    run_dir: Path | None = None
    if path.is_dir() and (path / "config.yaml").is_file():
        run_dir = path
        ckpts = path / "checkpoints"
        if step is None:
            latest = ckpts / "LATEST"
            if not latest.is_file():
                raise FileNotFoundError(f"{run_dir} has no checkpoints/LATEST: no checkpoint written yet?")
            step = latest.read_text().strip()
        elif step.isdigit():
            step = f"step_{int(step):08d}"
        weights = ckpts / step / "encoder.safetensors"
    elif path.is_dir():
        weights = path / "encoder.safetensors"
        step = path.name
        if (path.parent.parent / "config.yaml").is_file():
            run_dir = path.parent.parent
    elif path.is_file():
        weights = path
        if path.name == "encoder.safetensors" and (path.parent.parent.parent / "config.yaml").is_file():
            run_dir, step = path.parent.parent.parent, path.parent.name
    else:
        raise FileNotFoundError(f"{path}: no such run directory, step directory or weights file")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist")
    config = _read_config(run_dir) if run_dir is not None else {}
    mcfg = config.get("model", {}) or {}
    name = model or mcfg.get("name")
    if not name:
        raise CheckpointError(f"{path} is not inside a run directory: pass --model with the timm model name")
    size = img_size or mcfg.get("img_size") or (224 if run_dir is not None else None)
    objective = (config.get("objective", {}) or {}).get("name")
    patch = patch_size or mcfg.get("patch_size")
    return Checkpoint(
        weights, name, int(size) if size else None, int(patch) if patch else None, run_dir, step, objective, config
    )


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "encoder"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def create_encoder(name: str, img_size: int | None = None, patch_size: int | None = None) -> torch.nn.Module:
    """The timm model without classifier; `img_size`/`patch_size` as the recipe's `model` section."""
    import timm

    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0}
    if img_size:
        kwargs["img_size"] = img_size
    if patch_size:
        kwargs["patch_size"] = patch_size
    return timm.create_model(name, **kwargs)


def load_encoder(ckpt: Checkpoint) -> torch.nn.Module:
    """timm model + state dict; position embeddings resampled if the stored size differs."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    model = create_encoder(ckpt.model, ckpt.img_size, ckpt.patch_size)
    sd = _load_state_dict(ckpt.weights)
    if isinstance(model, VisionTransformer):
        sd = checkpoint_filter_fn(sd, model)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not (k.startswith("head.") and k not in own)}  # classifier of a full model
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"{ckpt.weights} does not fit {ckpt.model}: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    return model.eval()


def model_img_size(model: torch.nn.Module, default: int = 224) -> int:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if isinstance(size, (tuple, list)):
        return int(size[0])
    return int(size) if size else default


def config_mean_std(config: dict) -> tuple[tuple, tuple] | None:
    """The normalization the trainer used: the first `mean`/`std` pair under the `data` section."""

    def walk(node):
        if isinstance(node, dict):
            if "mean" in node and "std" in node:
                return tuple(map(float, node["mean"])), tuple(map(float, node["std"]))
            for v in node.values():
                found = walk(v)
                if found:
                    return found
        return None

    return walk(config.get("data", {}))


# ----------------------------------------------------------------------------- core


@contextmanager
def frozen(module: torch.nn.Module):
    """eval() for the duration, then every submodule's own train/eval flag back.

    An FSDP2 root is unsharded for the duration: `forward_features` bypasses the root's
    forward hooks (which would gather patch_embed, pos_embed, norm); the blocks, sharded
    on their own, still gather themselves.
    """
    modes = [(m, m.training) for m in module.modules()]
    fsdp = callable(getattr(module, "unshard", None)) and callable(getattr(module, "reshard", None))
    module.eval()
    if fsdp:
        module.unshard()
    try:
        yield module
    finally:
        if fsdp:
            module.reshard()
        for m, mode in modes:
            m.training = mode


def _encoder_device(encoder: torch.nn.Module) -> torch.device:
    for p in encoder.parameters():
        return p.device
    return torch.device("cpu")


def _to_labels(arr, multilabel: bool, device) -> torch.Tensor:
    t = torch.from_numpy(arr)
    return t.to(device, torch.float32 if multilabel else torch.int64)


def evaluate_tasks(
    encoder: torch.nn.Module,
    data_dir: str | Path,
    tasks: Iterable[str],
    *,
    methods: Iterable[str] = ("linear",),
    img_size: int = 224,
    device: torch.device | None = None,
    batch_size: int = 256,
    cache: FeatureCache | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    size: int | str = "auto",
    max_train: int | None = None,
    max_eval: int | None = None,
    probe: ProbeConfig = ProbeConfig(),
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    bootstrap: int = 0,
    progress: bool = True,
    log=print,
) -> dict[str, dict[str, dict[str, Any]]]:
    """The shared core: {method: {task: metrics and timings}}. Files are checked before any work."""
    tasks = list(tasks)
    methods = list(methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    files = check_available(data_dir, tasks, size)
    enc_device = _encoder_device(encoder)
    device = torch.device(device) if device is not None else enc_device
    results: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in methods}
    with frozen(encoder):
        for task in tasks:
            path, found = files[task]
            t0 = time.perf_counter()
            data = load_task(data_dir, task, found, with_images=False)  # images only for splits not cached
            load_s = time.perf_counter() - t0
            info = data.info
            feats, labels, extract_s, cached, extracted = {}, {}, 0.0, True, 0
            for split in SPLITS:
                limit = max_train if split == "train" else max_eval
                keep = subsample(len(data.labels[split]), limit)
                labs = data.labels[split] if keep is None else data.labels[split][keep]
                key = cache_key(file=file_fingerprint(path), n=len(labs), max=limit)
                cpath = cache.path(task, found, split, key) if cache else None
                arr = cache.load(cpath) if cache else None
                if arr is not None and len(arr) == len(labs):
                    f = torch.from_numpy(arr).to(device)
                else:
                    cached = False
                    t1 = time.perf_counter()
                    imgs = load_images(path, split, len(data.labels[split]))
                    imgs = imgs if keep is None else imgs[keep]
                    load_s += time.perf_counter() - t1
                    if enc_device.type == "cuda":
                        torch.cuda.synchronize(enc_device)
                    t1 = time.perf_counter()
                    f = extract_features(
                        encoder, imgs, img_size=img_size, device=enc_device, batch_size=batch_size,
                        mean=mean, std=std, desc=f"{task}/{split}", progress=progress,
                    )
                    if enc_device.type == "cuda":
                        torch.cuda.synchronize(enc_device)
                    extract_s += time.perf_counter() - t1
                    extracted += len(imgs)
                    del imgs
                    if cache:
                        cache.save(cpath, f)
                    f = f.to(device)
                feats[split] = f
                labels[split] = _to_labels(labs, info.multilabel, device)
            common = {
                "n_train": len(feats["train"]), "n_val": len(feats["val"]), "n_test": len(feats["test"]),
                "data_size": found, "cached": cached, "load_s": round(load_s, 3), "extract_s": round(extract_s, 3),
                "extract_img_per_s": round(extracted / extract_s, 1) if extract_s > 0 else None,
            }
            for method in methods:
                t2 = time.perf_counter()
                if method == "linear":
                    head, fit = train_linear_probe(
                        feats["train"], labels["train"], feats["val"], labels["val"],
                        num_classes=info.num_classes, multilabel=info.multilabel, cfg=probe,
                    )
                    scores = predict(head, feats["test"], info.multilabel)
                else:
                    scores = knn_predict(
                        feats["train"], labels["train"], feats["test"], num_classes=info.num_classes,
                        multilabel=info.multilabel, k=knn_k, temperature=knn_temperature,
                    )
                    fit = {}
                if scores.is_cuda:
                    torch.cuda.synchronize(scores.device)
                fit_s = time.perf_counter() - t2
                m = task_metrics(scores, labels["test"], info.multilabel, bootstrap=bootstrap, name=f"{task}/test")
                results[method][task] = {**m, **fit, **common, "fit_s": round(fit_s, 3)}
                ci = m.get("auc_ci")
                log(
                    f"{task:15s} {method:6s} AUC {m['auc']:.4f}"
                    + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
                    + f"  ACC {m['acc']:.4f}  (features {'cached' if cached else f'{extract_s:.1f}s'}, "
                      f"fit {fit_s:.1f}s)"
                )
    return results


def evaluate_encoder(
    encoder: torch.nn.Module,
    data_dir: str | Path,
    tasks: Iterable[str] = ALL_TASKS,
    *,
    method: str = "linear",
    img_size: int = 224,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    cache_dir: str | Path | None = None,
    max_train: int | None = None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    size: int | str = "auto",
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Periodic evaluation from the trainer: {task: {"auc": test AUC, "acc": test accuracy}}.

    The encoder is used as it is, on its own device (no copy, no weight change); its
    train/eval flags are restored on return and the global RNG state is left alone.
    `method="both"` adds "knn_auc"/"knn_acc". `device` is where the probe trains (default:
    the encoder's device). With `cache_dir`, features are cached under a fingerprint of the
    current weights (useful when the same weights are evaluated twice). Under FSDP every rank
    must call this (the forward is collective); each gets the same numbers.
    """
    methods = ["linear", "knn"] if method == "both" else [method]
    cache = None
    if cache_dir is not None:
        key = cache_key(
            weights=weights_fingerprint(encoder), cls=type(encoder).__name__, img_size=img_size,
            mean=mean, std=std, bf16=_encoder_device(encoder).type == "cuda",
        )
        cache = FeatureCache(cache_dir, key)
    res = evaluate_tasks(
        encoder, data_dir, tasks, methods=methods, img_size=img_size, device=device, batch_size=batch_size,
        cache=cache, mean=mean, std=std, size=size, max_train=max_train, progress=progress, log=lambda *_: None,
    )
    out: dict[str, dict[str, float]] = {}
    for task, m in res[methods[0]].items():
        out[task] = {"auc": float(m["auc"]), "acc": float(m["acc"])}
        if method == "both":
            out[task]["knn_auc"] = float(res["knn"][task]["auc"])
            out[task]["knn_acc"] = float(res["knn"][task]["acc"])
    return out


# ----------------------------------------------------------------------------- output


def json_safe(x):
    """NaN/inf -> null, recursively, so the JSON stays standard."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown_table(record: dict) -> str:
    head = f"### {record['method']} probe — {record['model']}"
    if record.get("step"):
        head += f" @ {record['step']}"
    lines = [head, "", "| task | AUC | AUC 95% CI | ACC | ACC 95% CI | n test |", "|---|---|---|---|---|---|"]
    def ci(pair) -> str:
        if not pair or any(v is None or math.isnan(v) for v in pair):
            return "n/a" if pair else ""
        return f"{pair[0]:.3f}–{pair[1]:.3f}"

    for task, m in record["tasks"].items():
        lines.append(
            f"| {task} | {_fmt(m['auc'])} | {ci(m.get('auc_ci'))} | {_fmt(m['acc'])} | {ci(m.get('acc_ci'))} "
            f"| {m['n_test']} |"
        )
    lines.append(f"| **mean** | **{_fmt(record['mean_auc'])}** | | **{_fmt(record['mean_acc'])}** | | |")
    return "\n".join(lines) + "\n"


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="run directory, step directory, or .safetensors/.pth file")
    p.add_argument("--data", required=True, help="folder with the MedMNIST .npz files")
    p.add_argument("--tasks", nargs="+", default=["all"], help=f"tasks (default all 12: {' '.join(ALL_TASKS)})")
    p.add_argument("--method", choices=["linear", "knn", "both"], default="linear")
    p.add_argument("--model", help="timm model name (required for a bare weights file)")
    p.add_argument("--img-size", type=int, help="model input size (default: recipe's model.img_size, else the model's)")
    p.add_argument(
        "--patch-size", type=int, help="patch size if not the model name's (default: recipe's model.patch_size)"
    )
    p.add_argument("--step", help="step directory name or number in a run dir (default: checkpoints/LATEST)")
    p.add_argument(
        "--size", default="auto", help="MedMNIST image size to read: 28, 64, 128, 224, or auto (largest present)"
    )
    p.add_argument("--out", help="output folder (default RUN_DIR/eval, or <file>_eval beside a weights file)")
    p.add_argument("--cache-dir", help="feature cache (default OUT/cache)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (CUDA)")
    p.add_argument("--mean", type=float, nargs=3, help="normalization mean (default: the recipe's, else ImageNet)")
    p.add_argument("--std", type=float, nargs=3, help="normalization std (default: the recipe's, else ImageNet)")
    p.add_argument("--lr", type=float, default=1e-2, help="linear probe learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=100, help="linear probe max epochs")
    p.add_argument("--patience", type=int, default=10, help="epochs without better val AUC before stopping")
    p.add_argument("--probe-batch-size", type=int, default=1024)
    p.add_argument("--k", type=int, default=20, help="kNN neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the test CIs (0: none)")
    p.add_argument("--max-train", type=int, help="use a fixed random subset of the train split")
    p.add_argument("--max-eval", type=int, help="use a fixed random subset of val and test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (MissingDataError, FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    tasks = list(ALL_TASKS) if args.tasks in (["all"], ["ALL"]) else args.tasks
    methods = ["linear", "knn"] if args.method == "both" else [args.method]
    size = args.size if args.size == "auto" else int(args.size)
    ckpt = resolve_checkpoint(
        args.checkpoint, model=args.model, img_size=args.img_size, patch_size=args.patch_size, step=args.step
    )
    check_available(args.data, tasks, size)  # fail before loading a large model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = load_encoder(ckpt).to(device)
    img_size = ckpt.img_size or model_img_size(encoder)
    if args.compile and device.type == "cuda":
        encoder.forward_features = torch.compile(encoder.forward_features)
    norm = config_mean_std(ckpt.config)
    mean = tuple(args.mean) if args.mean else (norm[0] if norm else IMAGENET_MEAN)
    std = tuple(args.std) if args.std else (norm[1] if norm else IMAGENET_STD)

    if args.out:
        out = Path(args.out)
    elif ckpt.run_dir is not None:
        out = ckpt.run_dir / "eval"
    else:
        out = ckpt.weights.parent / f"{ckpt.weights.stem}_eval"
    out.mkdir(parents=True, exist_ok=True)
    cache = None
    if not args.no_cache:
        key = cache_key(
            weights=file_fingerprint(ckpt.weights), model=ckpt.model, img_size=img_size, patch=ckpt.patch_size,
            mean=mean, std=std, bf16=device.type == "cuda", pool="mean-patch-tokens",
        )
        meta = {"weights": str(ckpt.weights), "model": ckpt.model, "img_size": img_size, "mean": mean, "std": std}
        cache = FeatureCache(Path(args.cache_dir) if args.cache_dir else out / "cache", key, meta)

    params = sum(p.numel() for p in encoder.parameters())
    print(f"{ckpt.model} ({params / 1e6:.1f}M params) from {ckpt.weights} at {img_size}px on {device}", file=sys.stderr)
    t0 = time.perf_counter()
    probe = ProbeConfig(
        lr=args.lr, weight_decay=args.weight_decay, epochs=args.epochs, batch_size=args.probe_batch_size,
        patience=args.patience, seed=args.seed,
    )
    results = evaluate_tasks(
        encoder, args.data, tasks, methods=methods, img_size=img_size, device=device, batch_size=args.batch_size,
        cache=cache, mean=mean, std=std, size=size, max_train=args.max_train, max_eval=args.max_eval, probe=probe,
        knn_k=args.k, knn_temperature=args.temperature, bootstrap=args.bootstrap, progress=not args.no_progress,
    )
    total_s = time.perf_counter() - t0
    suffix = f"_{ckpt.step}" if ckpt.step else ""
    for method, per_task in results.items():
        record = {
            "method": method,
            "model": ckpt.model,
            "objective": ckpt.objective,
            "params": params,
            "img_size": img_size,
            "checkpoint": str(ckpt.weights),
            "run_dir": str(ckpt.run_dir) if ckpt.run_dir else None,
            "step": ckpt.step,
            "data_dir": str(args.data),
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "mean": list(mean),
            "std": list(std),
            "bootstrap": args.bootstrap,
            "settings": asdict(probe) if method == "linear" else {"k": args.k, "temperature": args.temperature},
            "max_train": args.max_train,
            "max_eval": args.max_eval,
            "total_s": round(total_s, 2),
            "tasks": per_task,
            "mean_auc": _nanmean([m["auc"] for m in per_task.values()]),
            "mean_acc": _nanmean([m["acc"] for m in per_task.values()]),
        }
        (out / f"{method}{suffix}.json").write_text(json.dumps(json_safe(record), indent=2) + "\n")
        table = markdown_table(record)
        (out / f"{method}{suffix}.md").write_text(table)
        print("\n" + table)
    print(f"wrote {out} ({total_s:.1f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        sys.exit(main())
