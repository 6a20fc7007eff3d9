"""timm's `Attention` with our fused kernel inside: `timm.create_model(name, attn_layer=KernelAttention)`.

The parameters and state dict are timm's own (qkv, q_norm, k_norm, norm, proj), so checkpoints
stay plain timm ViTs. Only the softmax(q k^T) v core changes: `kernels.attention_qkv` on the
packed qkv tensor ("auto" = Triton on CUDA up to kernels.attn.AUTO_TRITON_MAX_SEQLEN tokens, SDPA
elsewhere). Cases the kernel does not cover (an attention mask, causal attention, attention dropout
while training) fall back to timm.
"""
from __future__ import annotations

import torch
from timm.layers import Attention

import kernels


class KernelAttention(Attention):
    """Drop-in for timm's Attention; `impl` picks the kernel ("auto", "triton", "sdpa", "torch")."""

    impl: str = "auto"

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False, **kw):
        if attn_mask is not None or is_causal or kw or (self.training and self.attn_drop.p > 0):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal, **kw)
        B, N, _ = x.shape
        gate = getattr(self, "gate", None)
        gate = gate(x).sigmoid() if gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        if isinstance(self.q_norm, torch.nn.Identity) and isinstance(self.k_norm, torch.nn.Identity):
            o = kernels.attention_qkv(qkv, scale=self.scale, impl=self.impl)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            o = kernels.attention(self.q_norm(q), self.k_norm(k), v, scale=self.scale, impl=self.impl)
        x = o.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def kernel_attention(impl: str = "auto") -> type[KernelAttention]:
    """A KernelAttention class bound to one implementation, for `attn_layer=`."""
    if impl not in kernels.attn.IMPLS:
        raise ValueError(f"impl must be one of {kernels.attn.IMPLS}, got {impl!r}")
    return type(f"KernelAttention_{impl}", (KernelAttention,), {"impl": impl})
