"""Checkpoints: the encoder as a plain timm state dict (safetensors) plus the training state.

Layout under the run directory:
    checkpoints/step_00001234/encoder.safetensors   timm VisionTransformer state dict (full)
    checkpoints/step_00001234/sharded/              model + optimizer, torch.distributed.checkpoint
    checkpoints/step_00001234/train_state.pt        step, loader position, config, counters
    checkpoints/step_00001234/rng_rank{R}.pt        each rank's RNG
    checkpoints/LATEST                              name of the newest complete checkpoint

Model and optimizer go through torch.distributed.checkpoint, so a checkpoint saved by N
ranks (FSDP2 shards) loads on M ranks, one process included. Everything is written into a
temporary folder that rank 0 renames into place before replacing LATEST, so an
interrupted save leaves the previous checkpoint intact.
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
SHARDED_DIR = "sharded"


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
    """The encoder (unsharded, one process) as a timm-loadable safetensors file."""
    from safetensors.torch import save_file

    save_file(encoder_state_dict(encoder), str(path))


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def full_encoder_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's full state dict on every rank's CPU (gathers FSDP2 shards: collective)."""
    if _dist() is None:
        return encoder_state_dict(encoder)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(encoder, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return encoder_state_dict(_Holder(sd))


class _Holder(nn.Module):
    def __init__(self, sd):
        super().__init__()
        self._sd = sd

    def state_dict(self, *a, **k):  # type: ignore[override]
        return self._sd


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model: nn.Module, optimizer, encoder: nn.Module,
                    state: dict[str, Any], keep: int = 2) -> Path | None:
    """Collective when distributed: every rank calls it. Returns the folder (rank 0) or None."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    dist = _dist()
    rank = dist.get_rank() if dist else 0
    ckpt_root = Path(run_dir) / "checkpoints"
    name = f"step_{step:08d}"
    final, tmp = ckpt_root / name, ckpt_root / f".{name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist:
        dist.barrier()
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / SHARDED_DIR))
        enc = full_encoder_state(encoder)
        torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
        if rank == 0:
            from safetensors.torch import save_file

            save_file(enc, str(tmp / ENCODER_FILE))
            torch.save(state, tmp / STATE_FILE)
        if dist:
            dist.barrier()
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank != 0:
        return None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(ckpt_root / "LATEST", name + "\n")
    for old in sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer) -> dict[str, Any]:
    """Load model + optimizer (resharding to the current ranks) and this rank's RNG if it was
    saved by a rank of the same number; returns the train state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(sd, checkpoint_id=str(path / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    rng_file = path / f"rng_rank{rank}.pt"
    if state.get("world", 1) == world and rng_file.is_file():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
        state["rng_restored"] = True
    else:  # another number of ranks: a fresh, deterministic stream per rank
        seed = state.get("seed", 0) * 1_000_003 + state["step"] * 1009 + rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        state["rng_restored"] = False
    return state


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


