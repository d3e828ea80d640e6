"""Segmentation losses, all per sample and unreduced: shape (B,), so the engine can weight samples.

Inputs are logits (B,1,H,W) and targets of the same shape; targets may be soft (probabilities,
e.g. ICT's mixed teacher predictions). `valid` is an optional (B,1,H,W) pixel mask (bool or
{0,1} float) of the pixels that count. Losses are computed in float32 even under autocast.
smp's DiceLoss is not used because it pools the batch into one value; these are a few lines of
torch on top of `F.binary_cross_entropy_with_logits`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["soft_dice_loss", "bce_loss", "seg_loss", "mse_prob_loss", "dice_only_loss", "pairwise_ranking_loss"]


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.float().reshape(x.shape[0], -1)


def _valid(valid: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if valid is None:
        return torch.ones_like(like)
    return _flat(valid).expand_as(like)


def _masked_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over the valid pixels of each sample; 0 for a sample with no valid pixel."""
    if valid is None:
        return values.mean(1)
    w = _valid(valid, values)
    return (values * w).sum(1) / w.sum(1).clamp_min(1.0)


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, eps: float = 1.0
) -> torch.Tensor:
    """1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps) per sample, p = sigmoid(logits),
    over the valid pixels. Both empty gives 0."""
    p, t = torch.sigmoid(_flat(logits)), _flat(target)
    w = _valid(valid, p)
    p, t = p * w, t * w
    dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return 1 - dice


def bce_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean binary cross-entropy with logits over the (valid) pixels of each sample."""
    bce = F.binary_cross_entropy_with_logits(_flat(logits), _flat(target), reduction="none")
    return _masked_mean(bce, valid)


def seg_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """l_seg = 0.5 * BCE + 0.5 * (1 - soft Dice), per sample."""
    return 0.5 * bce_loss(logits, target, valid) + 0.5 * soft_dice_loss(logits, target, valid)


def mse_prob_loss(
    logits_student: torch.Tensor, prob_teacher: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error of sigmoid(student logits) vs teacher probabilities over (valid) pixels."""
    diff = torch.sigmoid(_flat(logits_student)) - _flat(prob_teacher)
    return _masked_mean(diff * diff, valid)


def dice_only_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss alone (eps 1), per sample: the weak U-Nets' loss (Type 2 masks)."""
    return soft_dice_loss(logits, target)


def pairwise_ranking_loss(pred: torch.Tensor, target: torch.Tensor, group: torch.Tensor,
                          min_gap: float = 0.0) -> torch.Tensor:
    """Ranking term for g over masks of the same image (scalar).

    For every pair (i, j) of the same ``group`` with target_i - target_j > ``min_gap``, the
    predicted gap pred_i - pred_j should be at least the true gap:
    relu((target_i - target_j) - (pred_i - pred_j)), averaged over those pairs. A pair ordered
    the wrong way costs more than its true gap; a pair ordered right with a wide enough gap
    costs nothing. 0 (still differentiable) when the batch holds no such pair.
    """
    p, t = pred.float().reshape(-1), target.float().reshape(-1)
    same = group.reshape(-1)[:, None] == group.reshape(-1)[None, :]
    dt = t[:, None] - t[None, :]
    use = same & (dt > min_gap)
    if not bool(use.any()):
        return p.sum() * 0.0
    gap = (dt - (p[:, None] - p[None, :]))[use]
    return F.relu(gap).mean()
