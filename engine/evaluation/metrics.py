"""AUC, accuracy and bootstrap confidence intervals, the way MedMNIST reports them.

AUC is the Mann–Whitney statistic P(score_pos > score_neg) + ½·P(tie), computed exactly
from one sort per column. It takes per-sample weights, so a bootstrap resample is a weight
vector (how many times each sample was drawn) and B resamples cost B weighted sums instead
of B re-sorts. Multi-class: macro one-vs-rest over the classes present in the split;
multi-label (chestmnist): mean over labels. A column whose split holds only one class has
no AUC: it is left out of the mean with a warning, and a split with none left gives NaN.
Accuracy: argmax for multi-class, score > 0.5 per label (mean over labels) for multi-label.
"""
from __future__ import annotations

import math
import warnings

import torch


def weighted_auc(scores: torch.Tensor, positive: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """AUC of one score column. scores, positive: [N]; weights: [B, N] (or None = all ones).

    Returns [B] (or a scalar without weights), NaN where positives or negatives weigh zero.
    """
    squeeze = weights is None
    if weights is None:
        weights = torch.ones(1, scores.numel(), dtype=torch.float64, device=scores.device)
    order = torch.argsort(scores)
    s = scores[order]
    pos = positive[order].to(torch.float64)
    w = weights[:, order].to(torch.float64)
    # ties share a group; negatives below a group count 1, inside it ½
    new_group = torch.ones_like(s, dtype=torch.bool)
    new_group[1:] = s[1:] != s[:-1]
    gid = torch.cumsum(new_group.to(torch.int64), 0) - 1
    groups = int(gid[-1].item()) + 1 if s.numel() else 0
    wpos = torch.zeros(w.shape[0], groups, dtype=torch.float64, device=s.device).index_add_(1, gid, w * pos)
    wneg = torch.zeros_like(wpos).index_add_(1, gid, w * (1 - pos))
    below = torch.cumsum(wneg, 1) - wneg
    num = (wpos * (below + 0.5 * wneg)).sum(1)
    den = wpos.sum(1) * wneg.sum(1)
    auc = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.nan))
    return auc[0] if squeeze else auc


def _columns(scores: torch.Tensor, labels: torch.Tensor, multilabel: bool):
    """(score column, positive mask) per class/label."""
    if multilabel:
        for c in range(scores.shape[1]):
            yield c, scores[:, c], labels[:, c] > 0.5
    else:
        for c in range(scores.shape[1]):
            yield c, scores[:, c], labels == c


def correct(scores: torch.Tensor, labels: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Per-sample accuracy in [0, 1]: argmax hit, or the fraction of labels right at 0.5."""
    if multilabel:
        return ((scores > 0.5) == (labels > 0.5)).to(torch.float64).mean(1)
    return (scores.argmax(1) == labels).to(torch.float64)


def task_metrics(
    scores: torch.Tensor,
    labels: torch.Tensor,
    multilabel: bool,
    *,
    bootstrap: int = 0,
    seed: int = 0,
    chunk: int = 64,
    name: str = "",
) -> dict[str, float | list[float]]:
    """AUC and accuracy of probabilities `scores` [N, C] against `labels` ([N] classes or [N, C] binary).

    With `bootstrap=B`, adds `auc_ci` and `acc_ci`: the 2.5 / 97.5 percentiles over B resamples.
    """
    scores = scores.detach().to(torch.float64)
    labels = labels.detach().to(scores.device)
    n = scores.shape[0]
    valid, skipped = [], []
    for c, col, pos in _columns(scores, labels, multilabel):
        npos = int(pos.sum().item())
        (valid if 0 < npos < n else skipped).append(c)
    if skipped:
        kind = "labels" if multilabel else "classes"
        warnings.warn(
            f"{name or 'task'}: AUC undefined for {kind} {skipped} (only one class present in this split); "
            + ("left out of the mean" if valid else "AUC is NaN"),
            stacklevel=2,
        )
    cols = {c: (col, pos) for c, col, pos in _columns(scores, labels, multilabel)}
    per = [weighted_auc(*cols[c]) for c in valid]
    auc = float(torch.stack(per).mean().item()) if per else math.nan
    hits = correct(scores, labels, multilabel)
    out: dict[str, float | list[float]] = {"auc": auc, "acc": float(hits.mean().item()) if n else math.nan}
    if bootstrap and n:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        aucs, accs = [], []
        for start in range(0, bootstrap, chunk):
            b = min(chunk, bootstrap - start)
            idx = torch.randint(0, n, (b, n), generator=gen).to(scores.device)
            w = torch.zeros(b, n, dtype=torch.float64, device=scores.device).scatter_add_(
                1, idx, torch.ones(b, n, dtype=torch.float64, device=scores.device)
            )
            accs.append((w @ hits) / n)
            if valid:
                per_b = torch.stack([weighted_auc(*cols[c], w) for c in valid], 1)  # [b, C]
                aucs.append(torch.nanmean(per_b, 1))
        acc_all = torch.cat(accs)
        out["acc_ci"] = _percentiles(acc_all)
        out["auc_ci"] = _percentiles(torch.cat(aucs)) if aucs else [math.nan, math.nan]
    return out


def _percentiles(x: torch.Tensor) -> list[float]:
    x = x[~torch.isnan(x)]
    if x.numel() == 0:
        return [math.nan, math.nan]
    q = torch.quantile(x.cpu(), torch.tensor([0.025, 0.975], dtype=x.dtype))
    return [float(q[0]), float(q[1])]


def auc_score(scores: torch.Tensor, labels: torch.Tensor, multilabel: bool = False) -> float:
    """Macro AUC of one split (NaN when undefined); used for early stopping."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(task_metrics(scores, labels, multilabel)["auc"])
