"""Tiny recipes and data for engine tests (CPU, seconds)."""
from __future__ import annotations

from pathlib import Path

TINY = [
    "model.name=vit_tiny_patch16_224",
    "model.img_size=32",
    "model.patch_size=8",
    "objective.mae.decoder_dim=32",
    "objective.mae.decoder_depth=1",
    "objective.mae.decoder_heads=2",
    "data.backend=cpu",
    "data.workers=1",
    "train.batch_size=8",
    "train.steps=6",
    "optim.warmup_steps=2",
    "log.every_steps=2",
    "log.progress=false",
    "log.tensorboard=false",
    "checkpoint.every_steps=3",
]


def phantom_shards(root: Path, per_modality: int = 6) -> str:
    from loaders.synthetic import write_phantom_shards

    out = root / "phantoms"
    if not (out / "index.json").is_file():
        write_phantom_shards(out, per_modality=per_modality, size=48)
    return str(out)
