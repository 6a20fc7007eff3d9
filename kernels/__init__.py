"""Triton kernels for ViT pretraining, each with its autograd wrapper and a plain torch reference.

Every op takes `impl=`: "triton" (our kernels; also runs on CPU tensors under TRITON_INTERPRET=1),
"torch" (the reference), and "auto" (triton on CUDA, the reference/SDPA elsewhere; attention takes triton up to
AUTO_TRITON_MAX_SEQLEN tokens, where it measured at least as fast as SDPA).
Files: attn.py (attention), masking.py (mae_mask / mae_unmask), loss.py (mae_loss), soft_ce.py (soft_cross_entropy:
DINOv2's iBOT cross-entropy against soft targets, dense or FactoredTargets; crop_cross_entropy: its DINO class-token
cross-entropy over every pair of crops), sinkhorn.py (sinkhorn_knopp: DINOv2's
centering, the targets written out or kept as FactoredTargets; softmax_targets: DINO's softmax centering, likewise).
"""
from kernels.attn import (
    attention,
    attention_flops,
    attention_qkv,
    attention_reference,
    attention_sdpa,
    attention_triton,
    attention_xformers,
)
from kernels.loss import mae_loss, mae_loss_reference, patchify
from kernels.masking import keep_count, mae_mask, mae_mask_reference, mae_unmask, mae_unmask_reference
from kernels.sinkhorn import sinkhorn_knopp, softmax_targets
from kernels.soft_ce import (
    FactoredTargets,
    crop_cross_entropy,
    crop_cross_entropy_reference,
    soft_cross_entropy,
    soft_cross_entropy_reference,
)

__all__ = [
    "FactoredTargets",
    "attention",
    "attention_flops",
    "attention_qkv",
    "attention_reference",
    "attention_sdpa",
    "attention_triton",
    "attention_xformers",
    "crop_cross_entropy",
    "crop_cross_entropy_reference",
    "keep_count",
    "mae_loss",
    "mae_loss_reference",
    "mae_mask",
    "mae_mask_reference",
    "mae_unmask",
    "mae_unmask_reference",
    "patchify",
    "sinkhorn_knopp",
    "softmax_targets",
    "soft_cross_entropy",
    "soft_cross_entropy_reference",
]
