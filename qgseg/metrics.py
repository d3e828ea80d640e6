"""Evaluation metrics: per-sample overlap (torch), HD95 (numpy + scipy), summaries (numpy).

`dice_per_sample` / `iou_per_sample` take torch tensors (any device) and return torch tensors;
`hd95_per_sample` takes numpy arrays; the summary functions take any float sequence.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage, stats

__all__ = ["dice_per_sample", "iou_per_sample", "hd95_per_sample", "mean_se", "regression_metrics", "aurc", "e_val",
           "correlation_undefined_reason", "spearman", "pairwise_ranking_accuracy"]

_CROSS = ndimage.generate_binary_structure(2, 1)


def _binary(x: torch.Tensor) -> torch.Tensor:
    """(B,1,H,W) or (B,H,W) -> (B, H*W) float {0,1}; non-bool inputs are binarised with > 0.5."""
    if x.dtype != torch.bool:
        x = x > 0.5
    return x.reshape(x.shape[0], -1).float()


def _overlap(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p, t = _binary(pred), _binary(target)
    if p.shape != t.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return (p * t).sum(1), p.sum(1), t.sum(1)


def dice_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice 2|P&T| / (|P|+|T|) of binary masks (B,1,H,W) or (B,H,W) -> (B,); 1 when both are empty."""
    inter, p, t = _overlap(pred, target)
    denom = p + t
    return torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom))


def iou_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU |P & T| / |P or T| of binary masks -> (B,); 1 when both are empty."""
    inter, p, t = _overlap(pred, target)
    union = p + t - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def _boundary(mask: np.ndarray) -> np.ndarray:
    # Pixels on the image border count as boundary (erosion pads with background).
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


def _hd95_one(pred: np.ndarray, target: np.ndarray) -> float:
    has_p, has_t = bool(pred.any()), bool(target.any())
    if not has_p and not has_t:
        return 0.0
    if has_p != has_t:
        return math.nan
    bp, bt = _boundary(pred), _boundary(target)
    # Distance from each boundary pixel of one mask to the nearest boundary pixel of the other.
    d_pt = ndimage.distance_transform_edt(~bt)[bp]
    d_tp = ndimage.distance_transform_edt(~bp)[bt]
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


def hd95_per_sample(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """95th-percentile symmetric Hausdorff distance in pixels, (B,H,W) (or (B,1,H,W)) -> (B,).

    Boundary-to-boundary Euclidean distances (boundary = mask minus its 4-connected erosion),
    max of the two directed 95th percentiles, as in MONAI / medpy. Both empty -> 0; exactly one
    empty -> NaN (undefined; `mean_se` ignores NaNs, so report how many there were).
    Non-bool inputs are binarised with > 0.5.
    """
    p, t = np.asarray(pred), np.asarray(target)
    if p.ndim == 4:
        p, t = p[:, 0], t[:, 0]
    if p.shape != t.shape or p.ndim != 3:
        raise ValueError(f"hd95 needs two (B,H,W) arrays of the same shape, got {p.shape} and {t.shape}")
    p = p if p.dtype == bool else p > 0.5
    t = t if t.dtype == bool else t > 0.5
    return np.array([_hd95_one(a, b) for a, b in zip(p, t)], dtype=np.float64)


def mean_se(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and standard error (sample std with ddof=1 over sqrt(n)), NaNs ignored.

    One value -> se 0; no (finite) values -> (nan, nan).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan
    if v.size == 1:
        return float(v[0]), 0.0
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


def regression_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, Pearson and Spearman correlation (with p-values) of predicted vs true values.

    Pairs with a NaN are dropped. Correlations are NaN (not an error) for constant input or fewer
    than 2 pairs. Keys: n, mae, rmse, pearson, pearson_p, spearman, spearman_p.
    """
    p, t = _pairs(pred, true, names=("pred", "true"))
    out = {"n": int(p.size), "mae": math.nan, "rmse": math.nan}
    out |= {"pearson": math.nan, "pearson_p": math.nan, "spearman": math.nan, "spearman_p": math.nan}
    if p.size == 0:
        return out
    err = p - t
    out["mae"] = float(np.abs(err).mean())
    out["rmse"] = float(np.sqrt((err**2).mean()))
    if p.size >= 2 and np.ptp(p) > 0 and np.ptp(t) > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = stats.pearsonr(p, t)
            s = stats.spearmanr(p, t)
        out["pearson"], out["pearson_p"] = float(r.statistic), float(r.pvalue)
        out["spearman"], out["spearman_p"] = float(s.statistic), float(s.pvalue)
    return out


def correlation_undefined_reason(pred: np.ndarray, true: np.ndarray, what: str = "masks") -> str:
    """Why the correlation of ``pred`` with ``true`` is undefined ("" when it is defined)."""
    p, t = _pairs(pred, true, names=("pred", "true"))
    if p.size < 2:
        return f"fewer than 2 {what} with a finite value ({p.size})"
    if np.ptp(t) == 0:
        return (f"the true Dice is {t[0]:g} for every one of the {t.size} {what} (e.g. every mask is empty): a "
                "constant has no correlation")
    if np.ptp(p) == 0:
        return f"the prediction is {p[0]:g} for every one of the {p.size} {what}: a constant has no correlation"
    return ""


def aurc(scores: Sequence[float] | np.ndarray, true_dice: Sequence[float] | np.ndarray,
         fail_below: float = 0.7) -> float:
    """Area under the risk-coverage curve of a quality score: lower is better.

    Cases are accepted from the highest score down (ties in input order); after accepting k of
    n, the risk is the share of failures (true Dice < ``fail_below``) among them; AURC is the mean
    risk over k = 1..n. A score that ranks every failure last reaches the lowest possible value,
    a random order about the failure rate. Pairs with a NaN are dropped; NaN when none remain.
    """
    s, d = _pairs(scores, true_dice, names=("scores", "true_dice"))
    if s.size == 0:
        return math.nan
    fail = (d[np.argsort(-s, kind="stable")] < fail_below).astype(np.float64)
    return float((np.cumsum(fail) / np.arange(1, s.size + 1)).mean())


def e_val(val_dsc: Sequence[float], fraction: float = 0.96) -> int:
    """First epoch (1-based) whose validation DSC reaches `fraction` x the best; NaNs ignored.

    0 when there is no finite value.
    """
    v = np.asarray(val_dsc, dtype=np.float64).ravel()
    if v.size == 0 or np.isnan(v).all():
        return 0
    reached = np.nan_to_num(v, nan=-np.inf) >= fraction * np.nanmax(v)
    return int(np.argmax(reached)) + 1


def spearman(score: Sequence[float] | np.ndarray, true: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation of two sequences; pairs with a NaN are dropped.

    NaN (not an error) for fewer than 2 pairs or a constant input.
    """
    s, t = _pairs(score, true)
    if s.size < 2 or np.ptp(s) == 0 or np.ptp(t) == 0:
        return math.nan
    return float(stats.spearmanr(s, t).statistic)


def pairwise_ranking_accuracy(score: Sequence[float] | np.ndarray, true: Sequence[float] | np.ndarray,
                              groups: Sequence | np.ndarray, min_gap: float = 0.01) -> float:
    """Share of same-group pairs that ``score`` orders like ``true``.

    Only pairs of the same group (e.g. several masks of one image) whose true values differ by at
    least ``min_gap`` count; a tie in ``score`` counts half. NaN when there is no such pair.
    """
    s, t = _pairs(score, true, keep_nan=True)
    g = np.asarray(groups).ravel()
    if g.shape != s.shape:
        raise ValueError(f"groups and scores differ in length: {g.size} vs {s.size}")
    ok = ~(np.isnan(s) | np.isnan(t))
    s, t, g = s[ok], t[ok], g[ok]
    right, pairs = 0.0, 0
    _, inverse = np.unique(g, return_inverse=True)
    for k in range(int(inverse.max()) + 1 if inverse.size else 0):
        sel = inverse == k
        ds = s[sel][:, None] - s[sel][None, :]
        dt = t[sel][:, None] - t[sel][None, :]
        use = dt >= min_gap if min_gap > 0 else dt > 0  # each unordered pair once: the truly better one first
        pairs += int(use.sum())
        right += float((ds[use] > 0).sum() + 0.5 * (ds[use] == 0).sum())
    return right / pairs if pairs else math.nan


def _pairs(a, b, keep_nan: bool = False, names: tuple[str, str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Two sequences as flat float64 arrays of equal length, pairs with a NaN dropped (unless ``keep_nan``)."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        what = f"{names[0]} and {names[1]}" if names else "the two sequences"
        raise ValueError(f"{what} differ in length: {x.size} vs {y.size}")
    if keep_nan:
        return x, y
    ok = ~(np.isnan(x) | np.isnan(y))
    return x[ok], y[ok]
