"""DINOv2 (Oquab et al., 2023) on a timm ViT, read top to bottom.

A student and an EMA teacher see the multi-crop views of each image (loaders/multicrop.py):
the teacher only the global crops, the student all of them, its global crops partly masked.
- DINO loss: the student's class-token prototype scores of every crop against the teacher's
  of every *other* global crop.
- iBOT loss: the student's patch-token scores at the masked positions against the teacher's
  at the same positions of the unmasked crop.
- KoLeo: spreads the student's class tokens within the batch (nearest-neighbor log-distance).
Teacher scores are centered by Sinkhorn-Knopp (or softmax with a running center) at a
temperature warmed up from 0.04 to 0.07; the teacher follows the student with a momentum
going 0.992 -> 1 (cosine), the weight decay 0.04 -> 0.2, and the prototype layers stay frozen
for the first steps. Encoders are timm's `_dinov2` ViTs (LayerScale, registers, SwiGLU for g).

The student sees all crops in as few passes as possible: with the Triton kernels, one pass
over the tokens of every crop packed end to end, each crop attending only to itself
(`kernels.attention_qkv(..., seq_groups=...)`: one dense launch per crop size on views of the packed
qkv; blocks with q/k norms take `kernels.attention(..., cu_seqlens=...)`); otherwise one pass per crop size.
The exported encoder (`export_encoder`) is the teacher's, as in the paper.
"""
from __future__ import annotations

import array
import math
import random

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.cuda_graphs import GraphedForward
from engine.models import attention_layer, create_encoder, use_triton
from engine.objectives import register_objective
from engine.optim import paired_locals
from loaders.multicrop import MultiCropSpec


# ----------------------------------------------------------------------------- heads
class ProjectionHead(nn.Module):
    """MLP -> L2-normalized bottleneck -> cosine scores against L2-normalized prototypes
    (the weight-normalized last layer of DINO with its norm fixed to 1)."""

    def __init__(self, in_dim: int, prototypes: int, layers: int = 3, hidden: int = 2048, bottleneck: int = 256):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        mlp = []
        for i in range(layers):
            mlp.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mlp.append(nn.GELU())
        self.mlp = nn.Sequential(*mlp)
        self.prototypes = nn.Linear(bottleneck, prototypes, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return F.linear(z, F.normalize(self.prototypes.weight, dim=-1))


# ----------------------------------------------------------------------------- loss terms
def _all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) over ranks in place; the identity on one process."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and t.device.type != "meta":
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sinkhorn_knopp(logits: torch.Tensor, temp: float | torch.Tensor, iters: int = 3, *, fused: bool = False):
    """[M, K] teacher scores -> [M, K] targets: each row a distribution (sums to 1) while the
    K prototypes share the M samples (columns sum to M / K) as evenly as `iters`
    alternations allow. M and the sums span all ranks. kernels.sinkhorn_knopp: the torch path
    writes E = exp(scores / temp) once and rescales it by two vectors (targets = diag(b) E diag(a));
    fused (with the cross-entropy kernels) keeps the targets as those vectors and the scores
    (FactoredTargets, Triton passes on CUDA), never written out."""
    return kernels.sinkhorn_knopp(logits, temp, iters, all_reduce=_all_reduce, factored=fused,
                                  impl="auto" if fused else "torch")


def softmax_center(logits: torch.Tensor, center: torch.Tensor, temp: float | torch.Tensor, *, fused: bool = False):
    """DINO's centering: softmax((scores - running center) / temp). fused (with the cross-entropy kernels): the
    targets as FactoredTargets (kernels.softmax_targets: the row sums by one Triton pass on CUDA), never written out."""
    if fused:
        return kernels.softmax_targets(logits, center, temp, factored=True)
    return F.softmax((logits.float() - center) / temp, dim=-1)


@torch.no_grad()
def update_center(center: torch.Tensor, logits: torch.Tensor, momentum: float) -> None:
    batch = _all_reduce(logits.float().sum(0, keepdim=True))
    count = _all_reduce(torch.full((1,), float(logits.shape[0]), device=logits.device))
    center.mul_(momentum).add_(batch / count, alpha=1 - momentum)


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Cross-entropy between teacher targets [G, B, K] (G global crops) and student scores
    [V, B, K] (V crops, the first G of which are the same global crops), averaged over the
    (teacher crop, student crop) pairs of *different* crops and over the batch."""
    log_p = F.log_softmax(student.float() / student_temp, dim=-1)
    G, B = teacher.shape[:2]
    ce = -torch.einsum("gbk,vbk->gv", teacher, log_p) / B  # [G, V]
    different = ~torch.eye(G, student.shape[0], dtype=torch.bool, device=ce.device)
    return (ce * different).sum() / different.sum()


def dino_loss_fused(student: torch.Tensor, teacher: torch.Tensor | kernels.FactoredTargets,
                    student_temp: float) -> torch.Tensor:
    """dino_loss through kernels.crop_cross_entropy (Triton on CUDA): one pass over each student row forward and one
    backward instead of fp32 copies, log_softmax and an einsum over [V, B, K]. teacher: [G, B, K] targets, or
    Sinkhorn's FactoredTargets over the [G * B, K] rows (never written out)."""
    ce = kernels.crop_cross_entropy(student, teacher, student_temp)  # [G, V, B]
    different = ~torch.eye(ce.shape[0], ce.shape[1], dtype=torch.bool, device=ce.device)
    return (ce.mean(-1) * different).sum() / different.sum()


def ibot_loss(student: torch.Tensor, teacher: torch.Tensor | kernels.FactoredTargets, crop_of_token: torch.Tensor,
              num_crops: int, student_temp: float, fused: bool = False) -> torch.Tensor:
    """Cross-entropy on the masked patches only: student scores and teacher targets [M, K]
    for the M masked tokens, `crop_of_token` [M] the global crop each comes from. Each crop's
    tokens are averaged, then the crops (masked or not: `num_crops` in all) are averaged.
    fused: the cross-entropy by kernels.soft_cross_entropy (Triton on CUDA, one pass a row each way),
    which also takes the targets as kernels.FactoredTargets (Sinkhorn's, never written out)."""
    if fused:
        ce = kernels.soft_cross_entropy(student, teacher, student_temp)  # [M]
    else:
        ce = -(teacher * F.log_softmax(student.float() / student_temp, dim=-1)).sum(-1)  # [M]
    per_crop = torch.zeros(num_crops, device=ce.device, dtype=ce.dtype).index_add_(0, crop_of_token, ce)
    count = torch.zeros(num_crops, device=ce.device, dtype=ce.dtype).index_add_(0, crop_of_token,
                                                                                 torch.ones_like(ce))
    return (per_crop / count.clamp(min=1)).sum() / num_crops


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator on the unit sphere: -mean log(distance to the
    nearest other point). x: [B, C] (normalized here)."""
    if x.shape[0] < 2:
        return x.sum() * 0.0  # no neighbor to measure
    x = F.normalize(x.float(), dim=-1)
    with torch.no_grad():
        sim = x @ x.t()
        sim.fill_diagonal_(-2.0)  # never one's own neighbor
        nearest = sim.argmax(dim=1)
    dist = (x - x[nearest]).norm(dim=-1)
    return -torch.log(dist + eps).mean()


# ----------------------------------------------------------------------------- masking
def _block_rows(h: int, w: int, ratio: float, rng: random.Random, min_block: int = 4,
                aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> list[int]:
    """block_mask's draw, each row of the mask an int whose bit c is column c: a block is one bit range per row, its
    new cells counted by popcount, so a try costs a few int operations per row instead of a Python step per cell."""
    rows = [0] * h
    target = int(round(ratio * h * w))
    count, misses = 0, 0
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    while count < target and misses < 20:
        left_over = target - count
        area = rng.uniform(min(min_block, left_over), left_over)
        a = math.exp(rng.uniform(log_lo, log_hi))
        bh = min(h, max(1, int(round(math.sqrt(area * a)))))
        bw = min(w, max(1, int(round(math.sqrt(area / a)))))
        top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
        bits = ((1 << bw) - 1) << left
        new = bh * bw
        for r in range(top, top + bh):
            new -= (rows[r] & bits).bit_count()
        if new == 0 or new > left_over:
            misses += 1
            continue
        for r in range(top, top + bh):
            rows[r] |= bits
        count += new
    return rows


def _rows_to_bool(rows: list[int], w: int) -> torch.Tensor:
    """bool [len(rows), w] from row bit masks (bit c = column c)."""
    if not rows:
        return torch.zeros(0, w, dtype=torch.bool)
    if w < 63:  # one vectorized unpack through int64 (array: no per-element conversion by torch.tensor)
        return (torch.frombuffer(array.array("q", rows), dtype=torch.int64)[:, None] >> torch.arange(w)).bitwise_and_(
            1).bool()
    return torch.tensor([[(r >> c) & 1 for c in range(w)] for r in rows], dtype=torch.bool)


def block_mask(h: int, w: int, ratio: float, rng: random.Random, min_block: int = 4,
               aspect: tuple[float, float] = (0.3, 1 / 0.3)) -> torch.Tensor:
    """bool [h, w]: rectangles of random area and aspect added until about `ratio` of the
    patches are masked (a block is redrawn if it would overshoot; gives up after 20 misses).
    Plain Python on row bit masks (_block_rows): it runs on the host every step."""
    return _rows_to_bool(_block_rows(h, w, ratio, rng, min_block, aspect), w).view(h, w)


def sample_masks(num: int, h: int, w: int, probability: float, ratio: tuple[float, float]) -> torch.Tensor:
    """bool [num, h*w] iBOT masks on the CPU: each crop masked with `probability`, at a
    ratio uniform in `ratio`. Drawn from torch's CPU RNG, which checkpoints save. The host draws them while the GPU
    may have nothing queued (the start of a step): every crop's rows are drawn as bit masks and unpacked at once."""
    rng = random.Random(int(torch.randint(0, 2**62, (1,), device="cpu")))
    rows = []
    for _ in range(num):
        rows += _block_rows(h, w, rng.uniform(*ratio), rng) if rng.random() < probability else [0] * h
    return _rows_to_bool(rows, w).view(num, h * w)


# ----------------------------------------------------------------------------- the model
class DINOv2(nn.Module):
    def __init__(self, encoder: nn.Module, teacher_encoder: nn.Module, augment: MultiCropSpec, *,
                 dino_prototypes: int = 65536, ibot_prototypes: int = 65536, ibot_separate_head: bool = True,
                 head_layers: int = 3, head_hidden_dim: int = 2048, head_bottleneck_dim: int = 256,
                 student_temp: float = 0.1, teacher_temp: float = 0.07, teacher_temp_start: float = 0.04,
                 teacher_temp_warmup: float = 0.3, centering: str = "sinkhorn", sinkhorn_iters: int = 3,
                 center_momentum: float = 0.9, momentum_start: float = 0.992, momentum_end: float = 1.0,
                 dino_weight: float = 1.0, ibot_weight: float = 1.0, koleo_weight: float = 0.1,
                 mask_probability: float = 0.5, mask_ratio: tuple[float, float] = (0.1, 0.5),
                 weight_decay_end: float = 0.2, freeze_last_layer: float = 0.01, layer_decay: float = 0.9,
                 patch_embed_lr_scale: float = 0.2, attn_impl: str = "sdpa", pack_crops: bool = True,
                 fused_ce: bool = False, teacher_graph: bool = False):
        super().__init__()
        self.encoder = encoder  # the student backbone
        dim = encoder.embed_dim
        head = dict(layers=head_layers, hidden=head_hidden_dim, bottleneck=head_bottleneck_dim)
        self.dino_head = ProjectionHead(dim, dino_prototypes, **head)
        self.ibot_head = ProjectionHead(dim, ibot_prototypes, **head) if ibot_separate_head else None
        # timm's ViTs have no mask token: it lives here, so the encoder's state dict stays timm's.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)

        # The teacher: same architecture without drop path, never trained by gradients.
        teacher_encoder.load_state_dict(encoder.state_dict())
        self.teacher = nn.ModuleDict({"encoder": teacher_encoder,
                                      "dino_head": ProjectionHead(dim, dino_prototypes, **head)})
        self.teacher["dino_head"].load_state_dict(self.dino_head.state_dict())
        if self.ibot_head is not None:
            self.teacher["ibot_head"] = ProjectionHead(dim, ibot_prototypes, **head)
            self.teacher["ibot_head"].load_state_dict(self.ibot_head.state_dict())
        self.teacher.requires_grad_(False)
        self.register_buffer("dino_center", torch.zeros(1, dino_prototypes))
        self.register_buffer("ibot_center", torch.zeros(1, ibot_prototypes))

        self.augment = augment
        self.patch_size = encoder.patch_embed.patch_size[0]
        for name, size in (("global_size", augment.global_size), ("local_size", augment.local_size)):
            if size % self.patch_size:
                raise ValueError(f"data.multicrop.{name} {size} must be a multiple of the patch size "
                                 f"{self.patch_size} (e.g. {round(size / self.patch_size) * self.patch_size})")
        self.student_temp, self.teacher_temp, self.teacher_temp_start = student_temp, teacher_temp, teacher_temp_start
        self.teacher_temp_warmup, self.centering, self.sinkhorn_iters = teacher_temp_warmup, centering, sinkhorn_iters
        self.center_momentum, self.momentum_start, self.momentum_end = center_momentum, momentum_start, momentum_end
        self.dino_weight, self.ibot_weight, self.koleo_weight = dino_weight, ibot_weight, koleo_weight
        self.mask_probability, self.mask_ratio = mask_probability, tuple(mask_ratio)
        self.weight_decay_end, self.freeze_last_layer = weight_decay_end, freeze_last_layer
        self.layer_decay, self.patch_embed_lr_scale = layer_decay, patch_embed_lr_scale
        self.attn_impl, self.pack_crops, self.fused_ce = attn_impl, pack_crops, fused_ce
        # DINO's class-token loss by kernels.crop_cross_entropy, its Sinkhorn targets as factors: set with fused_ce,
        # a bool of its own so that bench ab --switch fused_dino can time it alone
        self.fused_dino = fused_ce
        self.teacher_graph = teacher_graph  # a bool the step reads: bench ab --switch teacher_graph
        self._teacher_graphed: GraphedForward | None = None
        # ((device, dtype, the rates), [depth, 2, 1] drop-path probabilities p, 1 - p): see _keep
        self._drop_probs: tuple | None = None
        # Set per step by on_step_start; a tensor, so a compiled forward does not recompile for it.
        self.register_buffer("teacher_temp_now", torch.tensor(teacher_temp_start), persistent=False)
        self.weight_decay_start: float | None = None  # set by param_groups

        for block in list(encoder.blocks) + list(teacher_encoder.blocks):
            make_packable(block)  # block(x, cu_seqlens=...) runs packed crops through the block's own call

    def compile_regions(self, **compile_kwargs) -> None:
        """torch.compile per transformer block (student and teacher), packed and dense calls
        alike: the blocks hold nearly all the FLOPs, the identical blocks share one compiled
        graph, so compiling takes seconds rather than the minutes a whole-model graph (two
        encoders, two crop sizes, data-dependent iBOT masks) would."""
        for block in list(self.encoder.blocks) + list(self.teacher["encoder"].blocks):
            block.compile(**compile_kwargs)

    @property
    def export_encoder(self) -> nn.Module:
        return self.teacher["encoder"]

    def _student_ibot_head(self) -> ProjectionHead:
        return self.ibot_head if self.ibot_head is not None else self.dino_head

    def _teacher_ibot_head(self) -> ProjectionHead:
        return self.teacher["ibot_head"] if self.ibot_head is not None else self.teacher["dino_head"]

    # ------------------------------------------------------------------ encoders
    def embed(self, enc: nn.Module, imgs: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Images -> tokens [B, prefix + patches, C]: patch embedding, mask tokens, (resampled)
        position embedding, class + register tokens; timm's own code for all but the masks."""
        x = enc.patch_embed(imgs)  # [B, h, w, C] (dynamic_img_size)
        if masks is not None:
            x = torch.where(masks.view(*x.shape[:3], 1), self.mask_token.to(x.dtype), x)
        return enc.norm_pre(enc.patch_drop(enc._pos_embed(x)))

    def forward_dense(self, enc: nn.Module, imgs: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """One crop size, [B, N, C] through timm's blocks (attention as built: SDPA or the kernel)."""
        x = self.embed(enc, imgs, masks)
        for block in enc.blocks:
            x = block(x)
        return enc.norm(x)

    def teacher_forward(self, glob: torch.Tensor) -> torch.Tensor:
        """The teacher encoder over the global crops (no gradient), replayed as a CUDA graph with teacher_graph on one
        CUDA device: its output is then the graph's, overwritten by the next step's replay."""
        enc = self.teacher["encoder"]
        if not (self.teacher_graph and _world() == 1):  # (GraphedForward runs non-CUDA inputs eagerly itself)
            return self.forward_dense(enc, glob)
        if self._teacher_graphed is None:
            self._teacher_graphed = GraphedForward(lambda x: self.forward_dense(enc, x), name="DINOv2 teacher",
                                                   option="objective.dinov2.teacher_graph")
        return self._teacher_graphed(glob)

    def forward_packed(self, enc: nn.Module, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        """Several crop sizes in one pass: groups of embedded tokens [n_i, L_i, C] are packed
        into one [sum n_i L_i, C] sequence; attention is block-diagonal per crop (packed_block),
        everything else is per token. Drop path stays per crop. Each block is called as a
        module (`block(x, cu_seqlens=...)`), so whatever wraps it applies to the packed pass
        too: FSDP2's gather and gradient reduction, torch.compile, activation checkpointing."""
        C = groups[0].shape[-1]
        seq_groups = [(g.shape[0], g.shape[1]) for g in groups]  # each crop size's crops: one dense attention launch
        cu, seq_len = self._packing_tensors(seq_groups, groups[0].device)
        crops = sum(n for n, _ in seq_groups)
        longest = max(L for n, L in seq_groups if n)
        x = torch.cat([g.reshape(-1, C) for g in groups])
        keep = self._keep(enc, crops, x)
        x = packed_stack(enc.blocks, enc.norm, x, keep, cu, seq_len, longest, seq_groups, self.attn_impl)
        out, start = [], 0
        for g in groups:
            n = g.shape[0] * g.shape[1]
            out.append(x[start:start + n].view(g.shape[0], g.shape[1], C))
            start += n
        return out

    def _packing_tensors(self, seq_groups, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cu_seqlens int32, per-crop lengths) on `device` for this packing ((crops, tokens) per crop size), kept
        for the next step: the crop sizes and counts repeat, and a copy from pageable host memory would wait for the
        GPU to drain every step."""
        key = (tuple(seq_groups), torch.device(device))
        cached = getattr(self, "_packing", None)
        if cached is None or cached[0] != key:
            lengths = [n for c, n in seq_groups for _ in range(c)]
            cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            seq_len = torch.tensor(lengths)
            if key[1].type == "cuda":  # pinned: queued behind the GPU's work, no sync
                cu, seq_len = (t.pin_memory().to(device, non_blocking=True) for t in (cu, seq_len))
            else:
                cu, seq_len = cu.to(device), seq_len.to(device)
            self._packing = cached = (key, cu, seq_len)
        return cached[1], cached[2]

    def _keep(self, enc: nn.Module, n: int, like: torch.Tensor) -> torch.Tensor | None:
        """Per-crop drop-path multipliers of every block's two branches, [depth, 2, n] (0 or 1 / keep probability; 1
        where a branch drops nothing), drawn at once; None when no branch drops or in eval mode."""
        probs = tuple(getattr(d, "drop_prob", 0.0) for b in enc.blocks for d in (b.drop_path1, b.drop_path2))
        if not self.training or not any(probs):
            return None
        key = (like.device, like.dtype, probs)
        if self._drop_probs is None or self._drop_probs[0] != key:  # rebuilt if a rate, the device or dtype changes
            p = torch.tensor(probs, dtype=torch.float32).view(-1, 2, 1)
            # the drop and keep probabilities (kept branches are divided by it, as timm's)
            pair = torch.stack([p, 1 - p])
            if like.device.type == "cuda":  # pinned: queued behind the GPU's work, no sync (once)
                pair = pair.pin_memory()
            pair = pair.to(like.device, non_blocking=True)
            self._drop_probs = (key, pair[0], pair[1].to(like.dtype))
        _, p, keep = self._drop_probs
        return torch.rand(p.shape[0], 2, n, device=like.device).ge(p).to(like.dtype) / keep

    # ------------------------------------------------------------------ the step
    def forward(self, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        glob, loc = images
        G, V = self.augment.global_crops, self.augment.num_crops
        B = glob.shape[0] // G
        masks, masked_at, crop_of_token = self.draw_masks(G * B, glob.shape[-1] // self.patch_size, glob.device)
        prefix = self.encoder.num_prefix_tokens
        # the masked patches as rows of the [G * B * tokens, C] outputs, prefix tokens included: gathered from the
        # outputs as they are (a flatten of [:, prefix:] would copy every patch token first, forward and backward)
        rows_at = masked_at + prefix * (crop_of_token + 1)

        # Teacher: global crops, unmasked; targets for the class token and the masked patches.
        with torch.no_grad():
            t = self.teacher_forward(glob)
            t_cls = self.teacher["dino_head"](t[:, 0])  # [G*B, K]
            t_patch = self._teacher_ibot_head()(t.flatten(0, 1)[rows_at])  # [M, K']
            temp = self.teacher_temp_now
            if self.centering == "sinkhorn":
                # with the fused cross-entropies: the targets as factors (Triton on CUDA), never written out
                t_cls_p = sinkhorn_knopp(t_cls, temp, self.sinkhorn_iters, fused=self.fused_dino)
                t_patch_p = sinkhorn_knopp(t_patch, temp, self.sinkhorn_iters, fused=self.fused_ce)
            else:
                t_cls_p = softmax_center(t_cls, self.dino_center, temp, fused=self.fused_dino)
                t_patch_p = softmax_center(t_patch, self.ibot_center, temp, fused=self.fused_ce)
                update_center(self.dino_center, t_cls, self.center_momentum)
                update_center(self.ibot_center, t_patch, self.center_momentum)

        # Student: every crop, the global ones masked.
        enc = self.encoder
        packed = self.pack_crops and self.attn_impl == "triton" and loc.shape[0] > 0 and glob.device.type != "meta"
        if packed:
            s_glob, s_loc = self.forward_packed(enc, [self.embed(enc, glob, masks), self.embed(enc, loc)])
        else:
            s_glob = self.forward_dense(enc, glob, masks)
            s_loc = self.forward_dense(enc, loc) if loc.shape[0] else s_glob[:0]
        s_cls_tokens = torch.cat([s_glob[:, 0], s_loc[:, 0]])  # [V*B, C], crop-major
        s_cls = self.dino_head(s_cls_tokens)
        s_patch = self._student_ibot_head()(s_glob.flatten(0, 1)[rows_at])

        if self.fused_dino:
            t_cls_g = t_cls_p if isinstance(t_cls_p, kernels.FactoredTargets) else t_cls_p.view(G, B, -1)
            dino = dino_loss_fused(s_cls.view(V, B, -1), t_cls_g, self.student_temp)
        else:
            dino = dino_loss(s_cls.view(V, B, -1), t_cls_p.view(G, B, -1), self.student_temp)
        ibot = ibot_loss(s_patch, t_patch_p, crop_of_token, G * B, self.student_temp, fused=self.fused_ce)
        koleo = sum(koleo_loss(c) for c in s_glob[:, 0].chunk(G))
        loss = self.dino_weight * dino + self.ibot_weight * ibot + self.koleo_weight * koleo
        return {"loss": loss, "dino": dino.detach(), "ibot": ibot.detach(), "koleo": koleo.detach()}

    @torch.compiler.disable  # host-side Python: a graph break under torch.compile
    def draw_masks(self, n: int, grid: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """iBOT masks for n crops: (bool [n, grid, grid], flat indices of the masked patches,
        the crop of each). Drawn on the CPU, so the count is known without a device sync."""
        masks = sample_masks(n, grid, grid, self.mask_probability, self.mask_ratio)
        masked_at = masks.flatten().nonzero().squeeze(1)
        crop_of_token = masked_at // (grid * grid)
        out = (masks.view(n, grid, grid), masked_at, crop_of_token)
        if torch.device(device).type == "cuda":  # pinned: the copies queue behind the GPU's work, no sync
            out = tuple(t.pin_memory().to(device, non_blocking=True) for t in out)
        else:
            out = tuple(t.to(device) for t in out)
        for t in out[1:]:  # the count changes every step: compile for any count at once
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return out

    def synthetic_batch(self, batch_size: int, device, dtype=torch.float32) -> list[torch.Tensor]:
        return self.augment.synthetic(batch_size, device, dtype)

    # ------------------------------------------------------------------ optimizer and schedules
    def param_groups(self, weight_decay: float) -> list[dict]:
        """Layer-wise lr decay (scale layer_decay^(depth + 1 - layer): embeddings are layer 0,
        block i layer i + 1, final norm and heads depth + 1), patch embedding lr x
        patch_embed_lr_scale; no weight decay on biases, norms, LayerScale, tokens and position
        embeddings. The teacher is not optimized."""
        self.weight_decay_start = weight_decay
        depth = len(self.encoder.blocks)
        groups: dict[tuple[float, bool], dict] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("encoder."):
                local = name[len("encoder."):]
                if local.startswith(("patch_embed.", "pos_embed", "cls_token", "reg_token")):
                    layer = 0
                elif local.startswith("blocks."):
                    layer = int(local.split(".")[1]) + 1
                else:
                    layer = depth + 1
            else:
                layer = 0 if name == "mask_token" else depth + 1
            scale = self.layer_decay ** (depth + 1 - layer)
            if "patch_embed." in name:
                scale *= self.patch_embed_lr_scale
            decay = not (p.ndim <= 1 or name.endswith(("token", "pos_embed")))
            g = groups.setdefault((scale, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": scale, "wd_schedule": decay})
            g["params"].append(p)
        return list(groups.values())

    def _progress(self, step: int, total: int) -> float:
        return min(1.0, step / max(1, total))

    def on_step_start(self, step: int, total: int, optimizer) -> None:
        warm = self.teacher_temp_warmup * total
        frac = min(1.0, step / warm) if warm > 0 else 1.0
        self.teacher_temp_now.fill_(self.teacher_temp_start + frac * (self.teacher_temp - self.teacher_temp_start))
        if self.weight_decay_start is not None:
            wd = cosine(self.weight_decay_start, self.weight_decay_end, self._progress(step, total))
            for g in optimizer.param_groups:
                if g.get("wd_schedule"):
                    g["weight_decay"] = wd

    def on_after_backward(self, step: int, total: int) -> None:
        if step < self.freeze_last_layer * total:
            for head in (self.dino_head, self.ibot_head):
                if head is not None:
                    head.prototypes.weight.grad = None  # AdamW skips a parameter without a gradient

    def momentum(self, step: int, total: int) -> float:
        return cosine(self.momentum_start, self.momentum_end, self._progress(step, total))

    @torch.no_grad()
    def on_step_end(self, step: int, total: int) -> None:
        """EMA: teacher <- m teacher + (1 - m) student, m from the cosine momentum schedule."""
        m = self.momentum(step + 1, total)
        student = [self.encoder, self.dino_head] + ([self.ibot_head] if self.ibot_head is not None else [])
        teacher = [self.teacher["encoder"], self.teacher["dino_head"]]
        teacher += [self.teacher["ibot_head"]] if self.ibot_head is not None else []
        s = [p for mod in student for p in mod.parameters()]
        t = [p for mod in teacher for p in mod.parameters()]
        t, s = paired_locals(t, [p.detach() for p in s])  # under FSDP2: each rank's shards, no DTensor dispatch
        torch._foreach_lerp_(t, s, 1.0 - m)


def cosine(start: float, end: float, progress: float) -> float:
    """start at progress 0 -> end at progress 1, along a half cosine."""
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * progress))


_PACKABLE: dict[type, type] = {}


def make_packable(block: nn.Module) -> None:
    """Give a timm block a packed mode: `block(x, cu_seqlens=cu, max_seqlen=n, keep1=..., keep2=...,
    attn_impl=...)` runs `packed_block`, `block(x)` the block's own forward. A subclass swap, not
    a patched attribute, so state dicts, deepcopy and FSDP2's own class swap keep working."""
    cls = type(block)
    if getattr(cls, "_packable", False):
        return
    sub = _PACKABLE.get(cls)
    if sub is None:
        def forward(self, x, *args, cu_seqlens=None, max_seqlen=None, keep1=None, keep2=None, attn_impl="triton",
                    seq_groups=None, **kwargs):
            if cu_seqlens is None:
                return cls.forward(self, x, *args, **kwargs)
            return packed_block(self, x, cu_seqlens, max_seqlen, keep1, keep2, attn_impl, seq_groups)

        sub = _PACKABLE[cls] = type(f"Packable{cls.__name__}", (cls,), {"forward": forward, "_packable": True})
    block.__class__ = sub


def packed_stack(blocks, norm, x, keep, cu, seq_len, longest, seq_groups, attn_impl):
    """The encoder's blocks and final norm over packed crops [T, C]; keep: [depth, 2, crops] drop-path multipliers of
    each block's two branches (DINOv2._keep) or None, spread to the crops' tokens here."""
    total = x.shape[0]
    for i, block in enumerate(blocks):
        k1 = k2 = None
        if keep is not None:
            k1, k2 = (keep[i, j].repeat_interleave(seq_len, output_size=total).unsqueeze(1) for j in (0, 1))
        x = block(x, cu_seqlens=cu, max_seqlen=longest, keep1=k1, keep2=k2, attn_impl=attn_impl, seq_groups=seq_groups)
    return norm(x)


def packed_block(block, x, cu, longest, keep1, keep2, attn_impl, seq_groups=None):
    """A timm block on packed tokens [T, C]: attention block-diagonal per crop, everything else per token;
    keep1/keep2 are per-token drop-path multipliers or None. With `seq_groups` ((crops, tokens) per crop size, in
    packing order) and no q/k norms, the attention runs one dense launch per crop size on views of the packed qkv
    (kernels.attention_qkv); otherwise one varlen launch over `cu`."""
    attn = block.attn
    h = block.norm1(x)
    T = h.shape[0]
    qkv = attn.qkv(h).view(T, 3, attn.num_heads, attn.head_dim)
    plain = isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
    if seq_groups is not None and plain:
        o = kernels.attention_qkv(qkv, scale=attn.scale, seq_groups=seq_groups, impl=attn_impl)
    else:
        q, k, v = qkv.unbind(1)
        o = kernels.attention(attn.q_norm(q), attn.k_norm(k), v, scale=attn.scale, cu_seqlens=cu,
                              max_seqlen=longest, impl=attn_impl)
    o = attn.norm(o.reshape(T, -1))
    gate = getattr(attn, "gate", None)
    o = block.ls1(attn.proj_drop(attn.proj(o if gate is None else o * gate(h).sigmoid())))
    x = x + (o if keep1 is None else o * keep1)
    m = block.ls2(block.mlp(block.norm2(x)))
    return x + (m if keep2 is None else m * keep2)


@register_objective("dinov2")
def build_dinov2(cfg, device) -> DINOv2:
    m, o, mc, a = cfg.model, cfg.objective.dinov2, cfg.data.multicrop, cfg.data.augment
    triton = use_triton(m.kernels, device)
    attn = attention_layer(m.kernels, device)
    kw = dict(img_size=m.img_size, patch_size=m.patch_size, attn_layer=attn, dynamic_img_size=True,
              patch_matmul=m.patch_matmul, fold_layerscale=m.fold_layerscale, **(o.encoder_kwargs or {}))
    encoder = create_encoder(m.name, drop_path=m.drop_path, **kw)
    teacher = create_encoder(m.name, drop_path=0.0, **kw)
    augment = MultiCropSpec(
        global_size=mc.global_size, local_size=mc.local_size, global_crops=mc.global_crops,
        local_crops=mc.local_crops, global_scale=tuple(mc.global_scale), local_scale=tuple(mc.local_scale),
        ratio=tuple(a.ratio), hflip=a.hflip, color_jitter=mc.color_jitter, brightness=mc.brightness,
        contrast=mc.contrast, saturation=mc.saturation, hue=mc.hue, grayscale=mc.grayscale, blur=tuple(mc.blur),
        solarize=tuple(mc.solarize), mean=tuple(a.mean), std=tuple(a.std))
    return DINOv2(
        encoder, teacher, augment, dino_prototypes=o.dino_prototypes, ibot_prototypes=o.ibot_prototypes,
        ibot_separate_head=o.ibot_separate_head, head_layers=o.head_layers, head_hidden_dim=o.head_hidden_dim,
        head_bottleneck_dim=o.head_bottleneck_dim, student_temp=o.student_temp, teacher_temp=o.teacher_temp,
        teacher_temp_start=o.teacher_temp_start, teacher_temp_warmup=o.teacher_temp_warmup, centering=o.centering,
        sinkhorn_iters=o.sinkhorn_iters, center_momentum=o.center_momentum, momentum_start=o.momentum_start,
        momentum_end=o.momentum_end, dino_weight=o.dino_weight, ibot_weight=o.ibot_weight,
        koleo_weight=o.koleo_weight, mask_probability=o.mask_probability, mask_ratio=tuple(o.mask_ratio),
        weight_decay_end=o.weight_decay_end, freeze_last_layer=o.freeze_last_layer, layer_decay=o.layer_decay,
        patch_embed_lr_scale=o.patch_embed_lr_scale, attn_impl="triton" if triton else "sdpa",
        pack_crops=o.pack_crops, fused_ce=o.fused_ce and triton, teacher_graph=o.teacher_graph,
        )
