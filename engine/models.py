"""Encoders: timm ViTs by name, with our attention plugged in through timm's `attn_layer`."""
from __future__ import annotations

import torch
import timm
from torch import nn


def use_triton(kernels: str, device: torch.device | str) -> bool:
    """`model.kernels`: auto means our Triton kernels on CUDA (under a Triton they were verified with:
    kernels/triton_version.py) and torch/SDPA elsewhere."""
    if kernels == "auto":
        if torch.device(device).type != "cuda":
            return False
        from kernels import triton_version

        return triton_version.auto_ok()
    return kernels == "triton"


def attention_layer(kernels: str, device: torch.device | str):
    """The `attn_layer` for timm blocks, or None for timm's own (SDPA) attention."""
    if not use_triton(kernels, device):
        return None
    from engine.attention import KernelAttention

    return KernelAttention


def create_encoder(name: str, *, img_size: int = 224, patch_size: int | None = None, drop_path: float = 0.0,
                   attn_layer=None, **kwargs) -> nn.Module:
    """A timm ViT with no classifier head (num_classes=0). Its state dict loads unchanged into
    `timm.create_model(name, num_classes=0, img_size=..., patch_size=...)`."""
    if name not in timm.list_models():
        vits = [n for n in timm.list_models("vit_*") if "patch" in n][:12]
        raise ValueError(f"unknown timm model {name!r}; e.g. {', '.join(vits)} (see timm.list_models('vit_*'))")
    extra = dict(kwargs)
    if patch_size is not None:
        extra["patch_size"] = patch_size
    if attn_layer is not None:
        extra["attn_layer"] = attn_layer
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, drop_path_rate=drop_path,
                              **extra)
    tensor_drop_paths(model)
    return model


class DropPath(nn.Module):
    """Stochastic depth like timm's DropPath (drop a sample's residual branch with probability
    p, scale kept ones by 1 / (1 - p)), with p held in a tensor: timm's float p differs per
    block (the linear schedule), and torch.compile specializes on module floats, so the
    identical blocks would each compile again (past the recompile limit: the rest ran eager)."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = float(drop_prob)  # for code outside compiled regions (e.g. DINOv2 packing)
        self.register_buffer("keep_prob", torch.tensor(1.0 - self.drop_prob), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = self.keep_prob
        mask = (torch.rand(shape, device=x.device, dtype=torch.float32) < keep).float() / keep
        return x * mask.to(x.dtype)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def tensor_drop_paths(model: nn.Module) -> int:
    """Replace timm DropPath modules (p > 0) by `DropPath` above; returns how many. State
    dicts are unchanged (the tensor is a non-persistent buffer)."""
    from timm.layers import DropPath as TimmDropPath

    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, TimmDropPath) and child.drop_prob > 0]
    for parent, name, child in swaps:
        setattr(parent, name, DropPath(child.drop_prob))
    return len(swaps)


def sincos_pos_embed(dim: int, grid: int, prefix_tokens: int = 1) -> torch.Tensor:
    """Fixed 2-D sine-cosine positional embedding [1, prefix + grid*grid, dim] (prefix rows zero),
    half of the channels encoding the row and half the column, as in the MAE paper."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)
    table = torch.cat([torch.zeros(prefix_tokens, dim, dtype=torch.float64), table], dim=0)
    return table.float().unsqueeze(0)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
