"""Prediction helpers: a segmenter's probabilities on images, per-case metrics and their summary.

Used by training (ssl's validation and test, train-weak's stored predictions) and by
``qgseg evaluate``; the home of the coming ``predict`` command.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from qgseg.data import LabeledData, to_float_images, to_float_masks
from qgseg.metrics import dice_per_sample, hd95_per_sample, iou_per_sample, mean_se


@torch.no_grad()
def predict_probs(model: torch.nn.Module, images: np.ndarray, device: torch.device,
                  batch_size: int = 32) -> np.ndarray:
    """Sigmoid probabilities (N, H, W) float32 of a segmenter on uint8 images (N, H, W, 3)."""
    from qgseg.engine import autocast

    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_float_images(torch.from_numpy(images[i:i + batch_size]).to(device))
        with autocast(device):
            logits = model(x)
        out.append(torch.sigmoid(logits.float())[:, 0].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,) + images.shape[1:3], np.float32)


def evaluate_predictions(data: LabeledData, probs: np.ndarray, quality: Any = None,
                         device: torch.device | None = None, with_hd95: bool = True) -> pd.DataFrame:
    """Per-case table: stem, dsc, iou, hd95 and (when g is given) predicted quality g(x, prediction)."""
    pred = torch.from_numpy(probs > 0.5)
    gt = torch.from_numpy(data.masks.astype(bool))
    df = pd.DataFrame({
        "stem": data.stems,
        "dsc": dice_per_sample(pred, gt).numpy().astype(float),
        "iou": iou_per_sample(pred, gt).numpy().astype(float),
    })
    if with_hd95:
        df["hd95"] = hd95_per_sample(pred.numpy(), gt.numpy())
    if quality is not None:
        dev = device or torch.device("cpu")
        scores = []
        for i in range(0, len(data), 64):
            x = to_float_images(torch.from_numpy(data.images[i:i + 64]).to(dev))
            m = to_float_masks(pred[i:i + 64].to(torch.uint8)).to(dev)
            scores.append(quality.score(x, m).cpu().numpy())
        df["pred_quality"] = np.concatenate(scores).astype(float) if scores else []
    return df


def summarise(df: pd.DataFrame, prefix: str = "test") -> dict[str, float]:
    """Mean and standard error over cases of each metric column, plus g's correlation with DSC.

    Keys are ``<prefix>_dsc``, ``<prefix>_dsc_se``, ...; ``prefix=""`` gives ``dsc``, ``dsc_se``, ...
    """
    if not prefix:
        return {k.split("_", 1)[1]: v for k, v in summarise(df, "x").items()}
    out: dict[str, float] = {f"{prefix}_cases": int(len(df))}
    for col in ("dsc", "iou", "hd95", "pred_quality"):
        if col in df:
            m, se = mean_se(df[col].to_numpy(dtype=float))
            out[f"{prefix}_{col}"] = m
            out[f"{prefix}_{col}_se"] = se
    if "pred_quality" in df and len(df) > 2:
        from scipy import stats

        q, d = df["pred_quality"].to_numpy(float), df["dsc"].to_numpy(float)
        if np.std(q) > 0 and np.std(d) > 0:
            r, p = stats.pearsonr(q, d)
            out[f"{prefix}_quality_pearson"], out[f"{prefix}_quality_pearson_p"] = float(r), float(p)
        else:
            out[f"{prefix}_quality_pearson"], out[f"{prefix}_quality_pearson_p"] = float("nan"), float("nan")
    return out
