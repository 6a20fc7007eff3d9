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


# A DINOv2 small enough for CPU tests (overrides on recipes/quickstart_dinov2.yaml).
DINOV2_TINY = [
    "objective.dinov2.dino_prototypes=32", "objective.dinov2.ibot_prototypes=16",
    "objective.dinov2.head_hidden_dim=32", "objective.dinov2.head_bottleneck_dim=16",
    "objective.dinov2.encoder_kwargs={embed_dim: 32, depth: 2, num_heads: 2}",
    "data.multicrop.local_crops=2", "data.multicrop.global_size=16", "data.multicrop.local_size=8",
    "model.img_size=16", "model.patch_size=4",
]
