"""Self-supervised objectives. Each is an `nn.Module` the training loop drives the same way:

- `forward(images) -> dict`: must hold a scalar "loss"; other scalar tensors are logged.
- `encoder`: the timm ViT being pretrained (what checkpoints export).
- `augment`: the loader's augmentation spec (AugmentSpec, or a multi-crop spec).
- `synthetic_batch(batch_size, device, dtype)`: images shaped as the loader would give them.
- `param_groups(weight_decay)`: optimizer groups; a group's optional "lr_scale" multiplies
  the scheduled lr (layer-wise decay).
- optional hooks for objectives with schedules or an EMA teacher:
  `on_step_start(step, total_steps, optimizer)` (e.g. a weight-decay schedule),
  `on_after_backward(step, total_steps)` (e.g. cancel the last layer's gradients early on),
  `on_step_end(step, total_steps)` (e.g. the EMA teacher update).
- optional `export_encoder`: the module checkpoints export as the timm encoder when it is not
  `encoder` (DINOv2 exports its teacher).

Objectives are looked up by `objective.name` in OBJECTIVES.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

OBJECTIVES: dict[str, Callable[..., nn.Module]] = {}


def register_objective(name: str):
    def wrap(builder):
        OBJECTIVES[name] = builder
        return builder

    return wrap


def build_objective(cfg, device) -> nn.Module:
    import importlib

    name = cfg.objective.name
    if name not in OBJECTIVES:
        try:
            importlib.import_module(f"engine.objectives.{name}")
        except ImportError as e:
            raise ValueError(f"objective {name!r} is not available: {e}") from e
    return OBJECTIVES[name](cfg, device)
