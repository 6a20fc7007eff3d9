"""The two read-outs of frozen features: a linear probe and a kNN classifier.

Linear probe (the paper's): BatchNorm1d without affine (standardizes the features, so one
learning rate fits every encoder) then Linear, trained with AdamW at lr 1e-2 by default,
cosine decay, early stopping on val AUC (best epoch kept). AdamW rather than SGD: tasks
range from 546 to 165k training images, i.e. from 1 to 160 steps per epoch; Adam's
per-weight steps converge within the few steps the small tasks give and stay stable on the
large ones with the same lr, where SGD at 1e-2 would need per-task tuning of epochs.
Cross-entropy for multi-class, BCE per label for multi-label (chestmnist).

kNN: cosine similarity to the training features, the k = 20 nearest vote with weights
exp(sim / T), T = 0.07; class scores are the normalized votes (for multi-label, the
weighted mean of each label), so they feed the same AUC.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.evaluation.metrics import auc_score


@dataclass
class ProbeConfig:
    lr: float = 1e-2
    weight_decay: float = 0.0
    epochs: int = 100
    batch_size: int = 1024
    patience: int = 10  # epochs without a better val AUC before stopping
    seed: int = 0


@contextmanager
def private_rng(device: torch.device, seed: int):
    """Seeded RNG for the probe that leaves the caller's (the trainer's) RNG state untouched.

    Only the CPU generator and the probe's own GPU are seeded and restored (torch.manual_seed
    would reseed, without restoring, every GPU of the host).
    """
    if device.type != "cuda":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index]), torch.cuda.device(index):
        torch.random.default_generator.manual_seed(seed)
        torch.cuda.manual_seed(seed)
        yield


def linear_head(dim: int, outputs: int) -> nn.Module:
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, outputs))


@torch.no_grad()
def predict(head: nn.Module, x: torch.Tensor, multilabel: bool, chunk: int = 65536) -> torch.Tensor:
    """Probabilities [N, C]: softmax for classes, sigmoid per label."""
    head.eval()
    logits = torch.cat([head(x[i : i + chunk]) for i in range(0, len(x), chunk)]) if len(x) else x.new_zeros(0, 1)
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)


def _loss(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, y) if multilabel else F.cross_entropy(logits, y)


def train_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    num_classes: int,
    multilabel: bool,
    cfg: ProbeConfig = ProbeConfig(),
) -> tuple[nn.Module, dict[str, float]]:
    """Train on (train_x, train_y), keep the epoch with the best val AUC.

    If val AUC is undefined (a val split with one class), the val loss decides instead.
    Returns the head (in eval mode) and {"best_epoch", "epochs_run", "val_auc"}.
    """
    device = train_x.device
    n, dim = train_x.shape
    with private_rng(device, cfg.seed):
        head = linear_head(dim, num_classes).to(device)  # initialized by the (seeded) CPU generator
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        bs = min(cfg.batch_size, n)
        steps_per_epoch = max(1, n // bs)  # drop the ragged last batch: BatchNorm needs > 1 sample
        total = steps_per_epoch * cfg.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        best, best_state, best_epoch, since, val_auc = -math.inf, None, 0, 0, math.nan
        epoch = 0
        for epoch in range(1, cfg.epochs + 1):
            head.train()
            perm = torch.randperm(n, device=device)
            for i in range(steps_per_epoch):
                idx = perm[i * bs : (i + 1) * bs]
                loss = _loss(head(train_x[idx]), train_y[idx], multilabel)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            probs = predict(head, val_x, multilabel)
            auc = auc_score(probs, val_y, multilabel) if len(val_x) else math.nan
            if math.isnan(auc):
                with torch.no_grad():
                    logits = (torch.logit(probs.clamp(1e-7, 1 - 1e-7)) if multilabel
                              else torch.log(probs.clamp_min(1e-12)))
                    score = -float(_loss(logits, val_y, multilabel)) if len(val_x) else -float(loss)
            else:
                score = auc
            if score > best:
                best, best_epoch, since, val_auc = score, epoch, 0, auc
                best_state = copy.deepcopy(head.state_dict())
            else:
                since += 1
                if since >= cfg.patience:
                    break
        if best_state is not None:
            head.load_state_dict(best_state)
    head.eval()
    return head, {"best_epoch": best_epoch, "epochs_run": epoch, "val_auc": val_auc}


@torch.no_grad()
def knn_predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    query_x: torch.Tensor,
    *,
    num_classes: int,
    multilabel: bool,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Scores [N, C] from the temperature-weighted votes of the k nearest (cosine) training samples."""
    bank = F.normalize(train_x.float(), dim=1)
    k = min(k, len(bank))
    targets = train_y.float() if multilabel else F.one_hot(train_y, num_classes).float()
    out = []
    for i in range(0, len(query_x), chunk):
        q = F.normalize(query_x[i : i + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        w = torch.softmax(sim / temperature, dim=1)  # exp(sim/T), normalized: votes sum to 1
        out.append(torch.einsum("nk,nkc->nc", w, targets[idx]))
    return torch.cat(out) if out else query_x.new_zeros(0, num_classes)
