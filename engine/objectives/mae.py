"""Masked autoencoder (He et al., 2022) on a timm ViT, read top to bottom.

The encoder sees only the visible 25 % of the patches; a light decoder fills in mask tokens
and predicts the pixels of every patch; the loss is the MSE against per-patch normalized
pixels, on masked patches only. Masking, unmasking and the loss are fused kernels
(`kernels.mae_mask`, `kernels.mae_unmask`, `kernels.mae_loss`) on CUDA, and their torch
references elsewhere, chosen by `model.kernels`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from timm.models.vision_transformer import Block

import kernels
from engine.models import attention_layer, create_encoder, sincos_pos_embed, use_triton
from engine.objectives import register_objective
from loaders.augment import AugmentSpec


class MaskedAutoencoder(nn.Module):
    def __init__(self, encoder: nn.Module, *, mask_ratio: float = 0.75, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, norm_pix_loss: bool = True,
                 impl: str = "torch", attn_layer=None, augment: AugmentSpec | None = None, pred_layout: str = "cpq"):
        super().__init__()
        if getattr(encoder, "num_reg_tokens", 0) or getattr(encoder, "no_embed_class", False):
            raise ValueError("MAE expects a plain ViT (class token with position embedding, no registers)")
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.pred_layout = pred_layout  # pred's order within a patch: "pqc" (MAE's) or "cpq" (channel-major)
        self.impl = impl  # "triton" or "torch" for masking and loss
        self.patch_size = encoder.patch_embed.patch_size[0]
        grid = encoder.patch_embed.grid_size[0]
        num_patches = encoder.patch_embed.num_patches
        embed_dim = encoder.embed_dim
        self.augment = augment or AugmentSpec(size=encoder.patch_embed.img_size[0])

        # Fixed 2-D sin-cos position embeddings, as in the paper: the timm parameter keeps its
        # name and shape (so the state dict stays timm's) but is frozen.
        with torch.no_grad():
            encoder.pos_embed.copy_(sincos_pos_embed(embed_dim, grid, encoder.num_prefix_tokens))
        encoder.pos_embed.requires_grad_(False)

        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(decoder_dim, grid, 1), persistent=False)
        block_kw = {"attn_layer": attn_layer} if attn_layer is not None else {}
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, **block_kw) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * 3)
        self.num_patches = num_patches
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_norm, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def encode(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.encoder
        tokens = enc.patch_embed(imgs)  # [B, N, C]
        pos = enc.pos_embed
        visible, ids_keep, mask = kernels.mae_mask(tokens, pos[:, 1:], self.mask_ratio, impl=self.impl)
        cls = (enc.cls_token + pos[:, :1]).expand(visible.shape[0], -1, -1)
        x = enc.norm_pre(torch.cat([cls, visible], dim=1))
        for block in enc.blocks:
            x = block(x)
        return enc.norm(x), ids_keep, mask

    def decode(self, latent: torch.Tensor, ids_keep: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.decoder_embed(latent)
        pos = self.decoder_pos_embed.to(x.dtype)
        # mask (encode's, for these ids_keep): the unmask kernel's fast path, which needs no search of ids_keep
        patches = kernels.mae_unmask(x[:, 1:], ids_keep, self.mask_token.to(x.dtype), pos[:, 1:], mask=mask,
                                     impl=self.impl)
        x = torch.cat([x[:, :1] + pos[:, :1], patches], dim=1)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # [B, N, p*p*3], class token dropped

    def forward(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        latent, ids_keep, mask = self.encode(imgs)
        pred = self.decode(latent, ids_keep, mask)
        # pred in the decoder's dtype (bf16 under autocast): both implementations compute in fp32 from it (the
        # kernel reads the sliced bf16 rows in place), so an fp32 copy of pred would only add traffic and memory
        loss = kernels.mae_loss(imgs, pred, mask, self.patch_size, norm_pix=self.norm_pix_loss,
                                impl=self.impl, layout=self.pred_layout)
        return {"loss": loss}

    def synthetic_batch(self, batch_size: int, device, dtype=torch.float32) -> torch.Tensor:
        size = self.encoder.patch_embed.img_size
        return torch.randn(batch_size, 3, *size, device=device, dtype=dtype)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """No weight decay on biases, norms, tokens and position embeddings."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(("token", "pos_embed")) else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@register_objective("mae")
def build_mae(cfg, device) -> MaskedAutoencoder:
    m, o = cfg.model, cfg.objective.mae
    attn = attention_layer(m.kernels, device)
    encoder = create_encoder(m.name, img_size=m.img_size, patch_size=m.patch_size, drop_path=m.drop_path,
                             attn_layer=attn, patch_matmul=m.patch_matmul,
                             fold_layerscale=m.fold_layerscale)
    a = cfg.data.augment
    augment = AugmentSpec(size=m.img_size, scale=tuple(a.scale), ratio=tuple(a.ratio), hflip=a.hflip,
                          mean=tuple(a.mean), std=tuple(a.std))
    return MaskedAutoencoder(encoder, mask_ratio=o.mask_ratio, decoder_dim=o.decoder_dim,
                             decoder_depth=o.decoder_depth, decoder_heads=o.decoder_heads,
                             norm_pix_loss=o.norm_pix_loss, impl="triton" if use_triton(m.kernels, device) else "torch",
                             attn_layer=attn, augment=augment, pred_layout=o.pred_layout)
