"""Checkpoints: the encoder as a plain timm state dict (safetensors) plus the training state.

Layout under the run directory:
    checkpoints/step_00001234/encoder.safetensors   timm VisionTransformer state dict
    checkpoints/step_00001234/train_state.pt        model, optimizer, schedule, loader, RNG
    checkpoints/LATEST                              name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, then LATEST is
replaced atomically, so an interrupted save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ENCODER_FILE = "encoder.safetensors"
STATE_FILE = "train_state.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def encoder_state_dict(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors on the CPU, keys exactly timm's (no compile/FSDP prefixes)."""
    sd = encoder.state_dict()
    out = {}
    for k, v in sd.items():
        k = k.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
        if hasattr(v, "full_tensor"):  # a DTensor shard (FSDP2)
            v = v.full_tensor()
        out[k] = v.detach().to("cpu").contiguous()
    return out


def save_encoder(encoder: nn.Module, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    save_file(encoder_state_dict(encoder), str(path))


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | os.PathLike, step: int, encoder: nn.Module, state: dict[str, Any],
                    keep: int = 2) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = ckpt_root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=ckpt_root))
    try:
        save_encoder(encoder, tmp / ENCODER_FILE)
        torch.save(state, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _atomic_write_text(ckpt_root / "LATEST", name + "\n")
    for old in sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    ckpt_root = Path(run_dir) / "checkpoints"
    latest = ckpt_root / "LATEST"
    if latest.is_file():
        path = ckpt_root / latest.read_text().strip()
        if (path / STATE_FILE).is_file() and (path / ENCODER_FILE).is_file():
            return path
    # LATEST missing or stale: fall back to the newest complete folder.
    done = sorted(p for p in ckpt_root.glob("step_*") if (p / STATE_FILE).is_file() and (p / ENCODER_FILE).is_file())
    return done[-1] if done else None


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=False)
