"""Prediction: a segmenter's probabilities on images, per-case metrics, and ``qgseg predict``.

The helpers are used by training (ssl's validation and test, train-weak's stored predictions),
by ``qgseg evaluate``, ``qgseg select`` and ``qgseg qc``; :func:`run_predict` is ``qgseg
predict``: segment a folder of new images with a trained f and score each prediction without
ground truth (g's predicted Dice, the segmenter's confidence, its agreement under flips and
rotations).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch

from qgseg.config import load_run_config
from qgseg.data import LabeledData, resize_image, resize_mask, to_float_images, to_float_masks
from qgseg.errors import InputError, QgsegError
from qgseg.metrics import dice_per_sample, hd95_per_sample, iou_per_sample, mean_se
from qgseg.quality import choose_g, quality_roots, quality_scores
from qgseg.runs import atomic_write_bytes, atomic_write_text, json_ready, read_json, write_json


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


@torch.no_grad()
def predict_with_signals(model: torch.nn.Module, images: np.ndarray, device: torch.device,
                         batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A segmenter's thresholded predictions and two quality signals that need no g.

    Returns (masks (N, H, W) uint8, confidence (N,), agreement (N,)). confidence: :func:`confidence`
    of the plain prediction (the one definition predict, qc and select use too). agreement: the
    mean Dice between the prediction and the model's re-predictions of the horizontally and
    vertically flipped image (flipped back); 1 when all are empty (predict_views' agreement with
    these two views).
    """
    from qgseg.engine import autocast

    model.eval()
    masks, conf, agree = [], [], []
    for i in range(0, len(images), batch_size):
        x = to_float_images(torch.from_numpy(images[i:i + batch_size]).to(device))
        n = len(x)
        with autocast(device):
            logits = model(torch.cat((x, x.flip(-1), x.flip(-2))))
        p = torch.sigmoid(logits.float())[:, 0]
        p0, again = p[:n], (p[n:2 * n].flip(-1), p[2 * n:].flip(-2))
        m = p0 > 0.5
        a = torch.stack([dice_per_sample(m, q > 0.5) for q in again]).mean(0)
        masks.append(m.to(torch.uint8).cpu().numpy())
        conf.append(confidence(p0.cpu().numpy()))
        agree.append(a.cpu().numpy())
    if not masks:
        empty = np.zeros(0, np.float64)
        return np.zeros((0,) + images.shape[1:3], np.uint8), empty, empty
    return np.concatenate(masks), np.concatenate(conf).astype(np.float64), np.concatenate(agree).astype(np.float64)


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


# ---------------------------------------------------------------------------------------------
# per-image signals: flip / rotation test-time augmentation, confidence, agreement, g's score
# ---------------------------------------------------------------------------------------------
PREDICT_VIEWS = (1, 2, 4, 8)


def undo_views(y: torch.Tensor, views: int) -> torch.Tensor:
    """Outputs (views*B, C, H, W) for ``dihedral_views`` inputs -> (views, B, C, H, W), each view
    turned back to the original orientation."""
    v = y.view(views, -1, *y.shape[1:])
    if views == 1:
        return v
    if views == 2:
        return torch.stack((v[0], v[1].flip(-1)))
    return torch.stack([torch.rot90(v[i].flip(-1) if i >= 4 else v[i], -(i % 4), (-2, -1)) for i in range(views)])


@torch.no_grad()
def predict_views(model: torch.nn.Module, images: np.ndarray, device: torch.device, views: int = 1,
                  batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (N, H, W) averaged over ``views`` flips / rotations of uint8 images (N, H, W, 3),
    and each image's agreement: the mean Dice between the plain view's mask and each other view's
    mask (NaN when ``views`` is 1). The images must be square for 4 or 8 views."""
    from qgseg.engine import autocast
    from qgseg.quality import dihedral_views

    if views not in PREDICT_VIEWS:
        raise InputError(f"--tta {views}: expected one of {', '.join(map(str, PREDICT_VIEWS))}")
    model.eval()
    probs, agree = [], []
    for i in range(0, len(images), batch_size):
        x = to_float_images(torch.from_numpy(images[i:i + batch_size]).to(device))
        with autocast(device):
            logits = model(dihedral_views(x, views) if views > 1 else x)
        p = undo_views(torch.sigmoid(logits.float()), views)[:, :, 0]  # (views, B, H, W)
        probs.append(p.mean(0).cpu().numpy())
        if views > 1:
            plain = p[0] > 0.5
            agree.append(torch.stack([dice_per_sample(p[v] > 0.5, plain) for v in range(1, views)]).mean(0).cpu().numpy())
        else:
            agree.append(np.full(len(x), np.nan))
    if not probs:
        return np.zeros((0,) + images.shape[1:3], np.float32), np.zeros(0)
    return np.concatenate(probs).astype(np.float32), np.concatenate(agree).astype(float)


CONFIDENCE_FLOOR = 0.1


def confidence(probs: np.ndarray) -> np.ndarray:
    """The segmenter's confidence per image, in [0, 1]: the mean margin |2p - 1| over the pixels it
    gives p >= 0.1 (its object and the uncertain rim around it); 1 when there are none (a confident
    empty prediction). Probabilities (N, H, W) -> (N,)."""
    p = np.asarray(probs, np.float64).reshape(len(probs), -1)
    region = p >= CONFIDENCE_FLOOR
    margin = np.abs(2 * p - 1) * region
    n = region.sum(1)
    return np.where(n > 0, margin.sum(1) / np.maximum(n, 1), 1.0)




def score_images(model: torch.nn.Module, images: np.ndarray, device: torch.device, g: Any = None,
                 views: int = 4, batch_size: int = 16) -> tuple[np.ndarray, pd.DataFrame]:
    """Segment square uint8 images (N, S, S, 3) and score each prediction without ground truth.

    Returns the probabilities (N, S, S) and a table with one row per image: ``quality`` (g's
    predicted Dice of the mask; NaN without g), ``confidence``, ``agreement`` (NaN with one
    view) and ``foreground`` (the mask's share of the image). The mask is the mean
    probability over ``views`` flips / rotations, thresholded at 0.5.
    """
    probs, agree = predict_views(model, images, device, views, batch_size)
    masks = (probs > 0.5).astype(np.uint8)
    table = pd.DataFrame({
        "quality": quality_scores(g, images, masks, device) if g is not None else np.full(len(images), np.nan),
        "confidence": confidence(probs),
        "agreement": agree,
        "foreground": masks.reshape(len(masks), -1).mean(1) if len(masks) else np.zeros(0),
    })
    return probs, table


# ---------------------------------------------------------------------------------------------
# loading what a run trained
# ---------------------------------------------------------------------------------------------
SEGMENTATION_STAGES = ("ssl", "train-weak")

def segmentation_checkpoint(run_path: Path, stage: str, checkpoint: str) -> Path:
    """best.pt / last.pt of an ssl run; the last stored weak_eNNN.pt of a train-weak run."""
    ck_dir = run_path / "checkpoints"
    if stage == "train-weak":
        weak = sorted(ck_dir.glob("weak_e*.pt"))
        if not weak:
            raise InputError(f"RUN {run_path}: no weak checkpoints (checkpoints/weak_eNNN.pt) yet")
        return weak[-1]
    path = ck_dir / f"{checkpoint}.pt"
    if not path.is_file():
        raise InputError(f"--checkpoint {checkpoint}: {path} does not exist")
    return path



def load_segmenter(run_dir: str | Path, checkpoint: str = "best", option: str = "RUN") -> tuple[Any, Any, Path]:
    """(f, its run, the checkpoint file) of an ssl or train-weak run, f in eval mode on the CPU."""
    from qgseg.engine import load_modules, saved_module
    from qgseg.models import build_segmenter
    from qgseg.runs import Run

    run = Run(run_dir)
    if not run.meta_path.is_file():
        raise InputError(f"{option} {run_dir}: not a qgseg run directory (no meta.json)")
    if run.stage not in SEGMENTATION_STAGES:
        raise InputError(f"{option} {run_dir}: is a {run.stage or 'unknown'} run; expected an ssl or train-weak "
                         "run (a trained segmenter)")
    if checkpoint not in ("best", "last"):
        raise InputError(f"--checkpoint {checkpoint}: expected best or last")
    ck_path = segmentation_checkpoint(run.path, run.stage, checkpoint)
    ck, spec = saved_module(ck_path, "model", "segmentation model")
    model = build_segmenter(spec["arch"], spec.get("encoder", ""))
    load_modules({"model": model}, ck["modules"], str(ck_path))
    return model.eval(), run, ck_path


def g_for(run: Any, quality: str | None, runs_root: str | Path, image_size: int, device: torch.device) -> tuple[Any, str]:
    """g for scoring a segmentation run's predictions (predict, select): :func:`qgseg.quality.choose_g`
    with the runs root and the folder the run sits in, preferring g trained on the run's data.
    (g or None, a note)."""
    from qgseg.config import load_run_config

    g, _, note = choose_g(quality, quality_roots(runs_root, run.path), image_size, device, evaluated=run,
                          data_root=load_run_config(run.path).data.labeled or None, any_size=True)
    return g, note


# ---------------------------------------------------------------------------------------------
# `qgseg predict RUN --images DIR --out DIR`
# ---------------------------------------------------------------------------------------------
ROWS_FILE = ".predict-rows.jsonl"  # one JSON row per finished image: the record a rerun resumes from
SHEET_CASES = 8


def _write_png(path: Path, array: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", array)
    if not ok:  # pragma: no cover - cv2 encodes any uint8 array
        raise QgsegError(f"{path}: cannot encode PNG")
    atomic_write_bytes(path, buf.tobytes())


def _read_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of finished images; a line cut short by a kill is ignored (that image is redone)."""
    rows: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                rows[row["stem"]] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return rows


def _settings_check(out: Path, settings: dict[str, Any]) -> None:
    """A rerun into the same --out must predict with the same model and settings."""
    path = out / "predict.json"
    if not path.is_file():
        return
    try:
        old = read_json(path)
    except (OSError, json.JSONDecodeError):
        return
    differ = [k for k in ("run", "checkpoint", "image_size", "tta", "quality_run") if old.get(k) != settings.get(k)]
    if differ:
        k = differ[0]
        raise InputError(f"--out {out}: holds predictions made with {k} = {old.get(k)!r}, not {settings.get(k)!r}; "
                         "choose another folder (or delete it) to predict with other settings")


def _image_files(images_dir: str | Path) -> list[Path]:
    """The images of a folder (or of its images/), each named once, each with a readable header:
    a file that is not an image is reported before anything is written."""
    from PIL import Image, UnidentifiedImageError

    from qgseg.data import discover_unlabeled

    folder = Path(images_dir)
    if not folder.is_dir():
        raise InputError(f"--images {folder}: {'folder not found' if not folder.exists() else 'not a folder'}")
    files = discover_unlabeled(folder)
    for f in files:
        try:
            with Image.open(f) as im:
                im.size  # noqa: B018 - the header is read here
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise InputError(f"--images {f}: unreadable or corrupt image ({e})") from None
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise InputError(f"--images {images_dir}: two images named {f.stem} ({seen[f.stem].name}, {f.name}); "
                             "masks are named after the image, so stems must be unique")
        seen[f.stem] = f
    return files


def run_predict(loaded: Any, run_dir: str | Path, images_dir: str | Path, out: str | Path,
                checkpoint: str = "best", quality: str | None = None, tta: int = 4, probs: bool = False,
                flag_below: float = 0.7, batch_size: int = 16,
                reporter: Any = None) -> dict[str, Any]:
    """Segment every image of ``images_dir`` with the trained f of ``run_dir`` into ``out``.

    Writes ``out/masks/<stem>.png`` ({0, 255}, each image's original size), optionally
    ``out/probs/<stem>.png`` (probability x 255), ``predictions.csv`` (per image: quality g,
    confidence, agreement, foreground share, flag = quality < ``flag_below``), an overlay sheet of
    the lowest-scored images and ``summary.json``. A rerun skips images whose mask is written.
    """
    from qgseg.engine import resolve_device
    from qgseg.report import Reporter

    if not 0.0 <= flag_below <= 1.0:
        raise InputError(f"--flag-below {flag_below}: expected a number in [0, 1]")
    if tta not in PREDICT_VIEWS:
        raise InputError(f"--tta {tta}: expected one of {', '.join(map(str, PREDICT_VIEWS))}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file, not a folder")
    files = _image_files(images_dir)
    model, run, ck_path = load_segmenter(run_dir, checkpoint)
    size = load_run_config(run.path).data.image_size
    device = resolve_device(loaded.config.device)
    model.to(device)
    g, note = g_for(run, quality, loaded.config.runs_root, size, device)
    settings = {"run": str(run.path), "checkpoint": ck_path.name, "image_size": size, "tta": tta,
                "quality_run": g.source if g is not None else "", "images": str(Path(images_dir))}
    _settings_check(out, settings)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    if probs:
        (out / "probs").mkdir(exist_ok=True)
    write_json(out / "predict.json", settings)

    rows_path = out / ROWS_FILE
    rows = _read_rows(rows_path)
    todo = [f for f in files if not (f.stem in rows and (out / "masks" / f"{f.stem}.png").is_file()
                                     and (not probs or (out / "probs" / f"{f.stem}.png").is_file()))]
    skipped = len(files) - len(todo)
    if todo:  # nothing may look complete while images are missing
        for name in ("predictions.csv", "summary.json"):
            (out / name).unlink(missing_ok=True)
    with (reporter or Reporter(enabled=False)) as rep, open(rows_path, "a", encoding="utf-8") as rec:
        rep.start("predict", total=len(files), completed=skipped)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            for row in _predict_chunk(model, g, chunk, size, tta, device, out, probs):
                rec.write(json.dumps(row) + "\n")
                rec.flush()
                rows[row["stem"]] = row
            rep.advance(len(chunk))
    table = _table(rows, files, flag_below)
    sheet = _lowest_sheet(table, out, files)
    atomic_write_text(out / "predictions.csv", table.to_csv(index=False))
    q = table["quality"].astype(float)
    summary: dict[str, Any] = {
        **settings, "out": str(out), "images_total": len(files), "predicted": len(todo), "skipped": skipped,
        "flag_below": flag_below, "flagged": int(table["flag"].sum()) if g is not None else None,
        "quality_mean": float(q.mean()) if g is not None and len(q) else None,
        "confidence_mean": float(table["confidence"].mean()) if len(table) else None,
        "agreement_mean": float(table["agreement"].astype(float).mean()) if tta > 1 and len(table) else None,
        "lowest": table.sort_values(_sort_key(table), kind="stable")["stem"].head(SHEET_CASES).tolist(),
        "sheet": str(sheet) if sheet else "", "predictions": str(out / "predictions.csv"),
    }
    if note:
        summary["note"] = note
    summary = json_ready(summary)  # strict JSON: an undefined metric is null
    write_json(out / "summary.json", summary)
    return summary


def _predict_chunk(model: torch.nn.Module, g: Any, files: list[Path], size: int, tta: int, device: torch.device,
                   out: Path, probs: bool) -> list[dict[str, Any]]:
    """Predict, write and score a few images; their rows for predictions.csv."""
    from qgseg.data import read_image

    originals = [read_image(f) for f in files]
    p, agree = predict_views(model, np.stack([resize_image(im, size) for im in originals]), device, tta, len(files))
    fulls = [cv2.resize(pr, (im.shape[1], im.shape[0]), interpolation=cv2.INTER_LINEAR)
             if im.shape[:2] != pr.shape else pr for im, pr in zip(originals, p)]
    masks = [(full > 0.5).astype(np.uint8) for full in fulls]
    qs: list[float | None] = [None] * len(files)
    if g is not None:  # g sees image and mask at its own image size, as it was trained
        qs = quality_scores(g, np.stack([resize_image(im, g.image_size) for im in originals]),
                            np.stack([resize_mask(m, g.image_size) for m in masks]), device).tolist()
    rows = []
    for f, im, pr, ag, full, mask, q in zip(files, originals, p, agree, fulls, masks, qs):
        if probs:
            _write_png(out / "probs" / f"{f.stem}.png", np.clip(np.rint(full * 255), 0, 255).astype(np.uint8))
        _write_png(out / "masks" / f"{f.stem}.png", mask * 255)
        rows.append({"stem": f.stem, "image": f.name, "height": im.shape[0], "width": im.shape[1], "quality": q,
                     "confidence": float(confidence(pr[None])[0]),
                     "agreement": None if np.isnan(ag) else float(ag), "foreground": float(mask.mean())})
    return rows


def _table(rows: dict[str, dict[str, Any]], files: list[Path], flag_below: float) -> pd.DataFrame:
    """predictions.csv: one row per image in folder order, with the mask's path and the flag."""
    table = pd.DataFrame([rows[f.stem] for f in files])
    table["mask"] = ["masks/" + f"{s}.png" for s in table["stem"]]
    table["flag"] = [bool(q is not None and not pd.isna(q) and q < flag_below) for q in table["quality"]]
    return table[["stem", "image", "mask", "height", "width", "quality", "confidence", "agreement",
                  "foreground", "flag"]]


def _sort_key(table: pd.DataFrame) -> str:
    """Lowest-scored first by g when there is one, else by the segmenter's confidence."""
    return "quality" if table["quality"].notna().any() else "confidence"


def _lowest_sheet(table: pd.DataFrame, out: Path, files: list[Path]) -> Path | None:
    """Overlay sheet of the lowest-scored images (their masks red), read back from disk."""
    from qgseg import plots
    from qgseg.data import read_image, read_mask

    if not len(table):
        return None
    key = _sort_key(table)
    worst = table.sort_values(key, kind="stable").head(SHEET_CASES)
    by_stem = {f.stem: f for f in files}
    side = 192
    ims = np.stack([resize_image(read_image(by_stem[s]), side) for s in worst["stem"]])
    ms = np.stack([resize_mask(read_mask(out / "masks" / f"{s}.png")[0], side) for s in worst["stem"]])
    labels = [f"{s}\n{key} {v:.3f}" for s, v in zip(worst["stem"], worst[key].astype(float))]
    return plots.overlay_montage(ims, np.zeros_like(ms), ms, labels, out / "lowest.png", per_row=4,
                                 title=f"lowest {key} first (red: predicted mask)")
