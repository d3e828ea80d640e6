"""Matplotlib figures written as PNG files (Agg backend, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from qgseg.corrupt import CorruptedSet

_CATEGORY_ORDER = ["identity", "single", "chained", "cross_image", "heavy", "catastrophic", "blob", "weak"]
_GT_RGB = (0, 200, 0)
_PRED_RGB = (230, 30, 30)


def _ordered_categories(categories: list[str]) -> list[str]:
    present = set(categories)
    known = [c for c in _CATEGORY_ORDER if c in present]
    return known + sorted(present - set(known))


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _overlay(image: np.ndarray | None, gt: np.ndarray, mask: np.ndarray, scale: int) -> np.ndarray:
    """RGB panel: image (or dark background) with the gt contour green and the mask's red."""
    h, w = gt.shape
    if image is None:
        base = np.full((h, w, 3), 30, np.uint8)
        base[gt != 0] = 60  # faint fill so an empty corrupted mask still shows where the lesion is
    else:
        base = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    base = cv2.resize(base, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
    for m, color in ((gt, _GT_RGB), (mask, _PRED_RGB)):
        big = cv2.resize((m != 0).astype(np.uint8), (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(big, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(base, contours, -1, color, thickness=max(1, scale // 2 + 1))
    return base


def corruption_examples(image_or_none: np.ndarray | None, gt: np.ndarray, cs: CorruptedSet, path: Path,
                        per_category: int = 4, categories: list[str] | None = None) -> Path:
    """Contact sheet of corrupted masks, one row per category, up to `per_category` columns.

    ``gt`` is either one (H,W) ground truth used for every sample or the (N,H,W) ground truths
    indexed by ``cs.case``; ``image_or_none`` likewise (H,W,3), (N,H,W,3) or None. Within a row the
    examples are spread over the category's Dice range. Ground truth contour green, corrupted mask
    red, Dice and operations in each title.
    """
    gt = np.asarray(gt)
    image = None if image_or_none is None else np.asarray(image_or_none)
    cats = _ordered_categories(list(cs.category) + list(categories or []))
    cat_arr = np.asarray(cs.category)
    n_rows, n_cols = max(1, len(cats)), max(1, per_category)
    h, w = cs.masks.shape[1:]
    scale = max(1, int(np.ceil(192 / max(h, w))))
    panel, title_band, head = 2.0, 0.42, 0.35  # inches
    fig_w, fig_h = 0.45 + n_cols * panel * 1.05, head + n_rows * (panel + title_band) + 0.05
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(fig_w, fig_h), squeeze=False)
    # fixed margins: constrained layout costs about a second per sheet
    fig.subplots_adjust(left=0.45 / fig_w, right=1 - 0.02 / fig_w, bottom=0.05 / fig_h,
                        top=1 - (head + title_band) / fig_h, wspace=0.05, hspace=title_band / panel)
    for ax in axes.ravel():
        ax.axis("off")
    for r, cat in enumerate(cats):
        idx = np.flatnonzero(cat_arr == cat)
        if not len(idx):  # a category the draw did not produce: say so instead of leaving the row out
            axes[r, 0].text(0.5, 0.5, "none drawn", transform=axes[r, 0].transAxes, ha="center", va="center",
                            fontsize=8, color="grey")
        idx = idx[np.argsort(cs.dice[idx], kind="stable")]
        pick = idx[np.unique(np.linspace(0, len(idx) - 1, min(n_cols, len(idx))).round().astype(int))]
        for c, m in enumerate(pick):
            case = int(cs.case[m])
            g = gt if gt.ndim == 2 else gt[case]
            img = None if image is None else (image if image.ndim == 3 else image[case])
            ax = axes[r, c]
            ax.imshow(_overlay(img, g, cs.masks[m], scale), interpolation="nearest")
            ops = cs.ops[m] or "-"
            if len(ops) > 28:
                ops = ops[:27] + "…"
            ax.set_title(f"Dice {cs.dice[m]:.3f}\n{ops}", fontsize=7)
        axes[r, 0].text(-0.05, 0.5, cat, transform=axes[r, 0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=9, fontweight="bold")
    fig.suptitle("Corrupted masks (green: ground truth, red: corrupted)", fontsize=10, y=1 - 0.08 / fig_h, va="top")
    return _save(fig, path)


def dice_histogram(dice: np.ndarray, path: Path, by_category: list[str] | None = None) -> Path:
    """Histogram of Dice targets over [0, 1], stacked by category when ``by_category`` is given."""
    dice = np.asarray(dice, np.float64)
    bins = np.linspace(0.0, 1.0, 41)
    bins[-1] = 1.0 + 1e-9  # Dice 1.0 (identity) falls in the last bin
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    if by_category is None:
        ax.hist(dice, bins=bins, color="tab:blue", histtype="stepfilled")
    else:
        cat_arr = np.asarray(by_category)
        if len(cat_arr) != len(dice):
            raise ValueError(f"by_category has {len(cat_arr)} entries for {len(dice)} Dice values")
        cats = _ordered_categories(list(cat_arr))
        # stepfilled draws one polygon per category instead of one patch per bar (much faster)
        ax.hist([dice[cat_arr == c] for c in cats], bins=bins, stacked=True, histtype="stepfilled",
                label=[f"{c} ({np.mean(cat_arr == c):.0%})" for c in cats])
        ax.legend(fontsize=8, loc="upper left")
    n = max(1, len(dice))
    ax.set_xlabel("Dice to ground truth")
    ax.set_ylabel("masks")
    ax.set_xlim(0, 1.0)
    ax.set_title(f"{len(dice)} masks: {np.sum(dice < 0.5) / n:.0%} below 0.5, "
                 f"{np.sum(dice > 0.9) / n:.0%} above 0.9, median {np.median(dice) if len(dice) else float('nan'):.3f}",
                 fontsize=9)
    return _save(fig, path)


def score_histogram(scores: np.ndarray, path: Path, threshold: float | None = None, title: str = "",
                    xlabel: str = "predicted quality g") -> Path:
    """Histogram of scores in [0, 1], with the flag threshold as a dashed line."""
    scores = np.asarray(scores, np.float64)
    scores = scores[np.isfinite(scores)]
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    ax.hist(scores, bins=np.linspace(0.0, 1.0 + 1e-9, 41), color="tab:blue", histtype="stepfilled")
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", ls="--", lw=1.2, label=f"flag below {threshold:g}")
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xlim(0, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("masks")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def quality_scatter(true: np.ndarray, pred: np.ndarray, path: Path, categories: list[str] | None = None,
                    title: str = "", xlabel: str = "true Dice", ylabel: str = "predicted quality g") -> Path:
    """Predicted vs true Dice with the identity line, coloured by category when given."""
    fig, ax = plt.subplots(figsize=(5.2, 5))
    if categories is None:
        ax.scatter(true, pred, s=6, alpha=0.5, color="tab:blue")
    else:
        cats = np.asarray(categories)
        for c in _ordered_categories(list(categories)):
            sel = cats == c
            ax.scatter(np.asarray(true)[sel], np.asarray(pred)[sel], s=6, alpha=0.5, label=f"{c} ({sel.sum()})")
        ax.legend(fontsize=7, markerscale=2, loc="upper left")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def quality_dice_scatter(dsc: np.ndarray, pred_quality: np.ndarray, path: Path, title: str = "") -> Path:
    """Predicted quality g(x, prediction) against the true DSC of each case (like the paper's Fig. 2).

    Identity line dashed, least-squares fit solid; Pearson r with its p-value, Spearman rho and
    MAE in the legend box.
    """
    from scipy import stats

    d, q = np.asarray(dsc, np.float64), np.asarray(pred_quality, np.float64)
    ok = np.isfinite(d) & np.isfinite(q)
    d, q = d[ok], q[ok]
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.scatter(d, q, s=22, alpha=0.75, color="tab:blue", edgecolor="white", linewidth=0.4, zorder=3)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="identity")
    lines = [f"n = {len(d)}"]
    if len(d) > 2 and np.ptp(d) > 0 and np.ptp(q) > 0:
        r, p = stats.pearsonr(d, q)
        rho = stats.spearmanr(d, q).statistic
        slope, icpt = np.polyfit(d, q, 1)
        xs = np.array([d.min(), d.max()])
        ax.plot(xs, slope * xs + icpt, color="tab:red", lw=1.5, label="least-squares fit")
        lines += [f"Pearson r = {r:.3f} (p = {p:.2g})", f"Spearman ρ = {rho:.3f}"]
    if len(d):
        lines.append(f"MAE |g - DSC| = {np.abs(q - d).mean():.3f}")
    ax.text(0.03, 0.97, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=8,
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"})
    ax.legend(fontsize=8, loc="lower right")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("true DSC of the prediction")
    ax.set_ylabel("predicted quality g(x, prediction)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def overlay_montage(images: np.ndarray, gts: np.ndarray, preds: np.ndarray, labels: list[str], path: Path,
                    row_names: list[str] | None = None, per_row: int = 4, title: str = "") -> Path:
    """Grid of cases: each image with the ground-truth contour green and the prediction's red.

    Cases fill rows of ``per_row`` panels in order; ``row_names`` label the rows (e.g. best, worst).
    """
    n = len(images)
    per_row = max(1, min(per_row, n)) if n else 1
    n_rows = max(1, -(-n // per_row))
    h, w = np.asarray(gts).shape[1:3] if n else (1, 1)
    scale = max(1, int(np.ceil(192 / max(h, w))))
    panel, band, head, left = 2.0, 0.45, 0.4, 0.35 if row_names else 0.05
    fig_w, fig_h = left + per_row * panel * 1.04, head + n_rows * (panel + band)
    fig, axes = plt.subplots(n_rows, per_row, figsize=(fig_w, fig_h), squeeze=False)
    fig.subplots_adjust(left=left / fig_w, right=1 - 0.02 / fig_w, bottom=0.03 / fig_h,
                        top=1 - (head + band) / fig_h, wspace=0.04, hspace=band / panel)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        ax = axes[i // per_row, i % per_row]
        ax.imshow(_overlay(images[i], gts[i], preds[i], scale), interpolation="nearest")
        ax.set_title(labels[i] if i < len(labels) else "", fontsize=7)
    for r, name in enumerate(row_names or []):
        if r < n_rows:
            axes[r, 0].text(-0.04, 0.5, name, transform=axes[r, 0].transAxes, rotation=90, ha="right",
                            va="center", fontsize=9, fontweight="bold")
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.06 / fig_h, va="top")
    return _save(fig, path)


def grounding_scatter(true: np.ndarray, pred: np.ndarray, pred_shuffled: np.ndarray, pred_zero: np.ndarray,
                      path: Path) -> Path:
    """Three panels: g with each mask's own image, with another case's image, with a zeroed image."""
    true = np.asarray(true, np.float64)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.9), sharey=True)
    for ax, p, name in zip(axes, (pred, pred_shuffled, pred_zero),
                           ("own image", "another case's image", "zeroed image")):
        p = np.asarray(p, np.float64)
        mae = np.abs(p - true).mean() if len(true) else float("nan")
        ax.scatter(true, p, s=6, alpha=0.5, color="tab:blue")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("true Dice")
        ax.set_title(f"{name}: MAE {mae:.3f}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("predicted quality g")
    fig.suptitle("Grounding check: does g use the image?", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# metrics.csv columns by panel of the learning curves; anything else numeric goes to "other"
_CURVE_PANELS = (
    ("training losses", ("loss", "total", "sup", "unsup", "qar", "cls", "cons", "contrast")),
    ("validation", ("val_",)),
    ("loss weights (ramp)", ("lambda", "lambda_qar")),
    ("QW weights of unlabeled samples", ("qw_",)),
)


def _panel_of(col: str) -> str:
    for title, keys in _CURVE_PANELS:
        if any(col == k or (k.endswith("_") and col.startswith(k)) for k in keys):
            return title
    return "other"


def learning_curves(history: list[dict], path: Path, title: str = "") -> Path | None:
    """Per-epoch curves of a run (nnU-Net's progress.png): training losses, validation metrics,
    the loss-weight ramps and, for --qw, the spread of QW weights. Columns that are never finite
    (a loss term that was never on) are left out. None when there is nothing to draw."""
    if not history:
        return None
    epochs = np.array([float(r.get("epoch", i + 1)) for i, r in enumerate(history)])
    skip = {"epoch", "seconds", "step"}
    panels: dict[str, list[tuple[str, np.ndarray]]] = {}
    for col in dict.fromkeys(k for r in history for k in r):
        if col in skip:
            continue
        try:
            y = np.array([float(r.get(col, np.nan)) for r in history])
        except (TypeError, ValueError):
            continue
        if not np.isfinite(y).any():
            continue
        panels.setdefault("learning rate" if col == "lr" else _panel_of(col), []).append((col, y))
    order = [t for t, _ in _CURVE_PANELS] + ["learning rate", "other"]
    shown = [t for t in order if t in panels]
    if not shown:
        return None
    fig, axes = plt.subplots(len(shown), 1, figsize=(9, 2.1 * len(shown) + 0.5), squeeze=False, sharex=True)
    for ax, t in zip(axes[:, 0], shown):
        for col, y in panels[t]:
            ok = np.isfinite(y)
            ax.plot(epochs[ok], y[ok], marker="o" if ok.sum() < 30 else None, ms=3, label=col)
        ax.set_title(t, fontsize=9, loc="left")
        if t == "learning rate":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    axes[-1, 0].set_xlabel("epoch")
    axes[-1, 0].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
