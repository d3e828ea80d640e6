"""``qgseg qc``: score existing masks from any tool with g, without ground truth.

Each mask in ``--masks`` is paired with its image in ``--images`` by stem (mask suffixes
``_mask``, ``_segmentation``, ``_lesion`` are understood), resized with its image to g's image
size and scored: g's predicted Dice. The table is sorted from the worst score; masks below
``flag_below`` are flagged. With ``--truth`` the true Dice of each mask is computed at the
original resolution and the report says how well g's scores matched it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qgseg.errors import InputError

log = logging.getLogger("qgseg")
FAIL_EXIT_CODE = 4  # `--fail-below T` and some mask scored below T (3 is "a key metric is undefined")
SHEET_CASES = 8
BATCH = 32


def _by_stem(folder: Path, option: str, masks: bool) -> dict[str, Path]:
    from qgseg.data import _images_in, _mask_stem

    if not folder.is_dir():
        raise InputError(f"{option} {folder}: {'folder not found' if not folder.exists() else 'not a folder'}")
    out: dict[str, Path] = {}
    for p in _images_in(folder):
        stem = _mask_stem(p.stem) if masks else p.stem
        if stem in out:
            raise InputError(f"{option} {folder}: two files for the stem '{stem}' ({out[stem].name}, {p.name})")
        out[stem] = p
    if not out:
        raise InputError(f"{option} {folder}: no images found")
    return out


def pair_masks(images: str | Path, masks: str | Path, truth: str | Path | None = None
               ) -> tuple[list[str], dict[str, Path], dict[str, Path], dict[str, Path], list[str]]:
    """(stems, image of each, mask of each, truth of each, images without a mask)."""
    from qgseg.data import discover_unlabeled

    img_files = discover_unlabeled(Path(images))
    imgs: dict[str, Path] = {}
    for p in img_files:
        if p.stem in imgs:
            raise InputError(f"--images {images}: two images named {p.stem} ({imgs[p.stem].name}, {p.name})")
        imgs[p.stem] = p
    msk = _by_stem(Path(masks), "--masks", masks=True)
    missing = [s for s in msk if s not in imgs]
    if missing:
        raise InputError(f"--masks {msk[missing[0]]}: no image named {missing[0]}.* in {images} "
                         f"({len(missing)} masks without an image)")
    stems = sorted(msk)
    tru: dict[str, Path] = {}
    if truth is not None:
        tru = _by_stem(Path(truth), "--truth", masks=True)
        lost = [s for s in stems if s not in tru]
        if lost:
            raise InputError(f"--truth {truth}: no ground-truth mask for {lost[0]} ({len(lost)} of {len(stems)} "
                             "masks have none)")
    return stems, imgs, msk, tru, sorted(set(imgs) - set(msk))


def truth_report(quality: np.ndarray, dice: np.ndarray, fail_below: float) -> dict[str, Any]:
    """How well g's scores match the true Dice: Pearson, Spearman, Spearman among masks with true
    Dice >= 0.8, MAE, AURC (failure: true Dice < ``fail_below``) and how many failures g flagged."""
    from qgseg.metrics import aurc, regression_metrics

    r = regression_metrics(quality, dice)
    good = dice >= 0.8
    top = regression_metrics(quality[good], dice[good])
    fail = dice < fail_below
    flagged = quality < fail_below
    out = {"cases": int(len(dice)), "true_dice_mean": float(dice.mean()) if len(dice) else None,
           "mae": r["mae"], "pearson": r["pearson"], "pearson_p": r["pearson_p"], "spearman": r["spearman"],
           "spearman_dice_ge_0.8": top["spearman"], "cases_dice_ge_0.8": int(good.sum()),
           "pairwise_same_image": None,  # one mask per image here: no same-image pairs to rank
           "failure_threshold": fail_below, "failures": int(fail.sum()),
           "aurc": aurc(quality, dice, fail_below), "aurc_random": float(fail.mean()) if len(dice) else None,
           "aurc_optimal": aurc(dice, dice, fail_below),
           "failures_flagged": int((fail & flagged).sum()), "flagged_not_failures": int((flagged & ~fail).sum())}
    return out


def run_qc(loaded: Any, images: str | Path, masks: str | Path, quality: str | None = None,
           out: str | Path | None = None, truth: str | Path | None = None, flag_below: float = 0.7,
           fail_below: float | None = None) -> dict[str, Any]:
    """Score every mask of ``masks`` with g; write qc.csv, lowest.png, histogram.png, summary.json."""
    from qgseg import plots
    from qgseg.engine import resolve_device
    from qgseg.quality import QualityPredictor
    from qgseg.runs import atomic_write_text, json_ready, new_run_dir, resolve_link, write_json

    for name, t in (("--flag-below", flag_below), ("--fail-below", fail_below)):
        if t is not None and not 0.0 <= t <= 1.0:
            raise InputError(f"{name} {t}: expected a number in [0, 1]")
    cfg = loaded.config
    g_run = resolve_link(quality or "", cfg.runs_root, "train-quality", "--quality")
    stems, imgs, msk, tru, unscored = pair_masks(images, masks, truth)
    device = resolve_device(cfg.device)
    g = QualityPredictor.from_run(g_run).to(device)
    table = score_masks(g, stems, imgs, msk, tru, device)
    table["flag"] = table["quality"] < flag_below
    cols = ["stem", "image", "mask", "quality", "flag", "foreground"] + (["true_dice"] if tru else [])
    table = table[cols].sort_values("quality", kind="stable").reset_index(drop=True)
    out = Path(out) if out else new_run_dir(cfg.runs_root, "qc")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "qc.csv", table.to_csv(index=False))
    _lowest_sheet(table, imgs, msk, tru, out / "lowest.png")
    plots.score_histogram(table["quality"].to_numpy(float), out / "histogram.png", flag_below,
                          title=f"g on {len(table)} masks ({int(table['flag'].sum())} below {flag_below:g})")
    below_fail = int((table["quality"] < fail_below).sum()) if fail_below is not None else None
    summary: dict[str, Any] = {
        "out": str(out), "quality_run": str(g_run.path), "g_image_size": g.image_size, "images": str(images),
        "masks": str(masks), "scored": len(table), "images_without_mask": len(unscored),
        "quality_mean": float(table["quality"].mean()), "quality_min": float(table["quality"].min()),
        "flag_below": flag_below, "flagged": int(table["flag"].sum()),
        "lowest": table["stem"].head(SHEET_CASES).tolist(), "fail_below": fail_below, "below_fail": below_fail,
        "csv": str(out / "qc.csv"),
    }
    if unscored:
        log.warning("%d images in %s have no mask in %s (first: %s); they are not scored", len(unscored), images,
                    masks, unscored[0])
    if tru:
        summary["truth"] = str(truth)
        summary["match"] = truth_report(table["quality"].to_numpy(float), table["true_dice"].to_numpy(float),
                                        flag_below)
        plots.quality_dice_scatter(table["true_dice"].to_numpy(float), table["quality"].to_numpy(float),
                                   out / "scatter.png", title=f"g on {len(table)} masks vs their true Dice")
    summary = json_ready(summary)  # strict JSON: an undefined metric is null
    write_json(out / "summary.json", summary)
    return summary


def score_masks(g: Any, stems: list[str], imgs: dict[str, Path], msk: dict[str, Path], tru: dict[str, Path],
                device: Any) -> pd.DataFrame:
    """g's score of each mask (and its true Dice at the original size when ``tru`` has truths), in
    batches; a mask of another size than its image (or than its truth) is an InputError."""
    import torch

    from qgseg.data import read_image, read_mask, resize_image, resize_mask
    from qgseg.metrics import dice_per_sample
    from qgseg.quality import quality_scores

    rows: list[dict[str, Any]] = []
    for i in range(0, len(stems), BATCH):
        ims, ms = [], []
        for s in stems[i:i + BATCH]:
            im, (m, _) = read_image(imgs[s]), read_mask(msk[s])
            if im.shape[:2] != m.shape:
                raise InputError(f"--masks {msk[s]}: mask size {m.shape[1]}x{m.shape[0]} differs from its image "
                                 f"{imgs[s].name} ({im.shape[1]}x{im.shape[0]}, width x height)")
            row: dict[str, Any] = {"stem": s, "image": imgs[s].name, "mask": msk[s].name,
                                   "foreground": float(m.mean())}
            if tru:
                t, _ = read_mask(tru[s])
                if t.shape != m.shape:
                    raise InputError(f"--truth {tru[s]}: size {t.shape[1]}x{t.shape[0]} differs from the mask "
                                     f"{msk[s].name} ({m.shape[1]}x{m.shape[0]})")
                row["true_dice"] = float(dice_per_sample(torch.from_numpy(m[None] > 0),
                                                         torch.from_numpy(t[None] > 0))[0])
            ims.append(resize_image(im, g.image_size))
            ms.append(resize_mask(m, g.image_size))
            rows.append(row)
        for row, q in zip(rows[i:], quality_scores(g, np.stack(ims), np.stack(ms), device)):
            row["quality"] = float(q)
    return pd.DataFrame(rows)


def _lowest_sheet(table: pd.DataFrame, imgs: dict[str, Path], msk: dict[str, Path], tru: dict[str, Path],
                  path: Path) -> Path:
    """Overlay sheet of the lowest-scored masks (red), with their truth (green) when given."""
    from qgseg import plots
    from qgseg.data import read_image, read_mask, resize_image, resize_mask

    worst, side = table.head(SHEET_CASES), 192
    ims = np.stack([resize_image(read_image(imgs[s]), side) for s in worst["stem"]])
    ms = np.stack([resize_mask(read_mask(msk[s])[0], side) for s in worst["stem"]])
    gts = np.stack([resize_mask(read_mask(tru[s])[0], side) for s in worst["stem"]]) if tru else np.zeros_like(ms)
    labels = [f"{r.stem}\ng {r.quality:.3f}" + (f", Dice {r.true_dice:.3f}" if tru else "") for r in worst.itertuples()]
    return plots.overlay_montage(ims, gts, ms, labels, path, per_row=4,
                                 title="lowest predicted quality first (red: mask" + (", green: truth)" if tru else ")"))
