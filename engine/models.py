"""Encoders: timm ViTs by name, with our attention plugged in through timm's `attn_layer`."""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerScale
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
                   attn_layer=None, patch_matmul: bool = False, fold_layerscale: bool = False,
                   **kwargs) -> nn.Module:
    """A timm ViT with no classifier head (num_classes=0). Its state dict loads unchanged into
    `timm.create_model(name, num_classes=0, img_size=..., patch_size=...)`. patch_matmul: its patch
    embedding runs as one matrix product over the patches (PatchMatmul), not as a convolution. fold_layerscale: each
    block's LayerScale is applied by the linear layer before it (`fold_layer_scale`)."""
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
    if patch_matmul:
        matmul_patch_embed(model)
    if fold_layerscale:
        fold_layer_scale(model)
    return model


class PatchMatmul(nn.Conv2d):
    """A ViT's patch embedding: a Conv2d whose kernel is its stride, without padding, dilation or groups. With
    `matmul` (a bool the step may flip) it runs as what it is, one matrix product of the [patches, C x p x q] pixels
    with the [C x p x q, dim] weight, plus the bias; the output is the convolution's [B, dim, H / p, W / q], as a
    channels-last view, so timm's flatten / permute after it copy nothing. cuDNN picked a generic kernel for these
    shapes on an H200 (implicit_convolve_sgemm, bf16: 2.7 ms a call at DINOv2 ViT-S's 512 global crops, 22 TFLOP/s;
    bench/results/profiles/vit_s_dinov2-1gpu-prof-s-factored.txt). Rows and columns past the last whole patch are
    dropped, as the convolution drops them. Parameters and state dict are the Conv2d's."""

    matmul: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.matmul:
            return super().forward(x)
        B, C, H, W = x.shape
        p, q = self.kernel_size
        h, w = H // p, W // q
        x = x[:, :, :h * p, :w * q]
        dev = x.device.type  # meta tensors (engine.plan's counts) have no autocast state to ask for
        if dev != "meta" and torch.is_autocast_enabled(dev):  # cast before the patch copy, not after: half the bytes
            x = x.to(torch.get_autocast_dtype(dev))
        patches = x.reshape(B, C, h, p, w, q).permute(0, 2, 4, 1, 3, 5).reshape(B * h * w, C * p * q)
        out = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)
        return out.view(B, h, w, self.out_channels).permute(0, 3, 1, 2)


def matmul_patch_embed(model: nn.Module) -> int:
    """Every patch-embedding convolution of `model` (kernel = stride, no padding / dilation / groups) as PatchMatmul,
    running as a matrix product; returns how many. The modules keep their parameters (state dicts unchanged); others
    are left as they are."""
    n = 0
    for m in model.modules():
        if (isinstance(m, nn.Conv2d) and m.kernel_size == m.stride and m.padding in ((0, 0), "valid")
                and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"):
            m.__class__ = PatchMatmul
            m.matmul = True
            n += 1
    return n


class FoldedLayerScale(nn.Module):
    """Marker base of the two halves of a LayerScale folded into the linear layer before it (`fold_layer_scale`)."""

    fold_layerscale: bool = True


class LayerScaleLinear(nn.Linear, FoldedLayerScale):
    """A block's last linear layer (attention's proj, the MLP's fc2) with the block's LayerScale gamma folded in:
    with `fold_layerscale` (a bool the step may flip) it computes x W'^T + b' with W' = gamma W (row-wise) and
    b' = gamma b, which is LayerScale(Linear(x)) exactly in real arithmetic. The gradient of gamma then comes from
    [out, in] weight-sized products (sum of dW' * W over a row, plus db' * b) instead of a reduction of
    dy * Linear(x) over every token, and the [tokens, C] multiply by gamma goes. Gamma stays the LayerScale's
    parameter (read through `_scale`, not registered here), so parameters and state dicts are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fold_layerscale:
            return super().forward(x)
        g = self._scale.gamma
        w = self.weight * g.to(self.weight.dtype).unsqueeze(1)
        b = None if self.bias is None else self.bias * g.to(self.bias.dtype)
        return F.linear(x, w, b)


class LayerScaleFolded(FoldedLayerScale, LayerScale):
    """timm's LayerScale whose gamma a LayerScaleLinear applies: the identity while `fold_layerscale` is on, the
    plain multiply when off (its class is swapped in place, so `gamma` and `inplace` are the module's own)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold_layerscale:
            return x
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


def fold_layer_scale(model: nn.Module) -> int:
    """Fold every block's LayerScale (timm's ls1 / ls2, as in the DINOv2 ViTs) into the linear layer before it:
    ls1 into the attention's proj, ls2 into the MLP's fc2 (what follows them, dropout, commutes with a per-channel
    scale). Returns how many were folded; blocks without LayerScale or without those layers are left as they are.
    Parameters, their names and state dicts are unchanged; deepcopy keeps each copy's pair together. The step's
    switch: `fold_layerscale` on the modules (bench ab --switch fold_layerscale)."""
    n = 0
    for block in getattr(model, "blocks", []):
        for ls_name, owner, lin_name in (("ls1", getattr(block, "attn", None), "proj"),
                                         ("ls2", getattr(block, "mlp", None), "fc2")):
            ls = getattr(block, ls_name, None)
            lin = getattr(owner, lin_name, None)
            if type(ls) is not LayerScale or type(lin) is not nn.Linear or ls.gamma.shape != (lin.out_features,):
                continue
            ls.__class__ = LayerScaleFolded
            lin.__class__ = LayerScaleLinear
            lin.__dict__["_scale"] = ls  # a plain attribute: gamma stays registered under the LayerScale only
            n += 1
    return n


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
