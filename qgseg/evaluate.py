"""``qgseg evaluate RUN``: a stored run on a split of its own data or on another labeled data set."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from qgseg.data import LabeledData
from qgseg.errors import InputError
from qgseg.predict import evaluate_predictions, predict_probs, segmentation_checkpoint, summarise

EVAL_STAGES = ("ssl", "train-weak", "train-quality")
SPLITS = ("train", "val", "test")
_GENERIC_DIR_NAMES = {"labeled", "images", "data", "train", "test", "val"}


def dataset_name(folder: str | Path) -> str:
    """Folder name used for ``RUN/eval/<name>``: ``data/ham/labeled`` -> ``ham-labeled``."""
    p = Path(folder).resolve()
    name = p.name if p.name.lower() not in _GENERIC_DIR_NAMES or not p.parent.name else f"{p.parent.name}-{p.name}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "data"


def _eval_data(run_path: Path, rcfg: Any, data_dir: str | Path | None, split: str,
               cache_dir: str) -> tuple[LabeledData, np.ndarray, str]:
    """(labeled data, rows of the evaluated cases, output name)."""
    from qgseg import data as D
    from qgseg.runs import read_json

    size = rcfg.data.image_size
    if data_dir:
        data = D.load_labeled(data_dir, size, cache_dir, option="--data")
        return data, np.arange(len(data)), dataset_name(data_dir)
    if split not in SPLITS:
        raise InputError(f"--split {split}: expected one of {', '.join(SPLITS)}")
    if not rcfg.data.labeled:
        raise InputError(f"{run_path / 'config.toml'}: data.labeled is empty; pass --data DIR")
    data = D.load_labeled(rcfg.data.labeled, size, cache_dir, option=f"{run_path / 'config.toml'} data.labeled")
    path = run_path / "splits.json"
    splits = read_json(path) if path.is_file() else D.make_splits(data.stems, rcfg.data.split_seed, data.root)
    stems = splits.get(split) or []
    if not stems:
        raise InputError(f"--split {split}: the run has no {split} cases")
    pos = D.positions(data.stems)
    missing = [s for s in stems if s not in pos]
    if missing:
        raise InputError(f"{rcfg.data.labeled}: case {missing[0]} of the run's {split} split is gone "
                         f"({len(missing)} missing); the data changed since the run")
    return data, np.array([pos[s] for s in stems], dtype=np.int64), split


def run_evaluate(loaded: Any, run_dir: str | Path, data_dir: str | Path | None = None, split: str = "test",
                 checkpoint: str = "best", quality: str | None = None, out: str | Path | None = None,
                 weak: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Evaluate a stored run into ``RUN/eval/<split or data set name>/`` (the run itself is not changed).

    ssl / train-weak runs: per-case DSC, IoU, HD95 and predicted quality g(x, prediction)
    (``cases.csv``), mean +- s.e., g's correlation with the true DSC, a scatter plot and an overlay
    montage of the best and worst cases. train-quality runs: g's metrics and grounding checks on
    corrupted masks of the cases (``masks.csv``) and scatter plots, and on the cases' real
    predictions stored in a train-weak run (``weak``, default the one recorded with g) by models
    that never trained on them (``real_*`` keys, ``real_predictions.csv``). ``data_dir``
    evaluates on all cases of another labeled data set.
    """
    import logging

    from qgseg.config import load_run_config
    from qgseg.engine import resolve_device
    from qgseg.quality import quality_roots
    from qgseg.runs import Run, finish_summary, write_json

    log = logging.getLogger("qgseg")
    run_path = Path(run_dir)
    run = Run(run_path)
    if not run.meta_path.is_file():
        raise InputError(f"RUN {run_dir}: not a qgseg run directory (no meta.json)")
    stage = run.stage
    if stage not in EVAL_STAGES:
        raise InputError(f"RUN {run_dir}: is a {stage or 'unknown'} run; evaluate takes ssl, train-weak and "
                         "train-quality runs")
    if checkpoint not in ("best", "last"):
        raise InputError(f"--checkpoint {checkpoint}: expected best or last")
    if not data_dir and split not in SPLITS:
        raise InputError(f"--split {split}: expected one of {', '.join(SPLITS)}")
    if run.status != "completed":
        log.warning("%s is %s, not completed: evaluating its %s checkpoint", run_path, run.status or "unfinished",
                    checkpoint)
    rcfg = load_run_config(run_path)
    device = resolve_device(loaded.config.device)
    data, rows, name = _eval_data(run_path, rcfg, data_dir, split, loaded.config.data.cache_dir)
    out_dir = Path(out) if out else run_path / "eval" / name
    if out_dir.is_file():
        raise InputError(f"--out {out_dir}: is a file, not a folder")
    made = [p for p in ((out_dir,) if out else (run_path / "eval", out_dir)) if not p.exists()]  # removed on failure
    out_dir.mkdir(parents=True, exist_ok=True)
    base: dict[str, Any] = {"run": str(run_path), "stage": stage, "dataset": name, "data": str(data.root),
                            "split": None if data_dir else split, "image_size": rcfg.data.image_size,
                            "out": str(out_dir)}
    try:
        if stage == "train-quality":
            summary = _evaluate_quality(run, rcfg, data, rows, bool(data_dir), split, checkpoint, device, out_dir,
                                        weak, loaded.config.runs_root)
        else:
            roots = quality_roots(loaded.config.runs_root, run_path)
            summary = _evaluate_segmentation(run, stage, data, rows, checkpoint, quality, roots, device, out_dir)
    except BaseException:
        import shutil

        for p in reversed(made):  # no empty or half-written eval folder that looks like a result
            shutil.rmtree(p, ignore_errors=True)
        raise
    key = ("mae", "pearson") if stage == "train-quality" else ("dsc",)
    reasons = summary.pop("_reasons", None)
    summary = finish_summary({**base, **summary}, key, reasons)
    write_json(out_dir / "summary.json", summary)
    return out_dir, summary


def _evaluate_segmentation(run: Any, stage: str, data: LabeledData, rows: np.ndarray, checkpoint: str,
                           quality: str | None, roots: list[Path], device: torch.device,
                           out_dir: Path) -> dict[str, Any]:
    from qgseg import plots
    from qgseg.engine import load_modules, saved_module
    from qgseg.metrics import regression_metrics
    from qgseg.models import build_segmenter
    from qgseg.quality import choose_g

    ck_path = segmentation_checkpoint(run.path, stage, checkpoint)
    ck, spec = saved_module(ck_path, "model", "segmentation model")
    model = build_segmenter(spec["arch"], spec.get("encoder", ""))
    load_modules({"model": model}, ck["modules"], str(ck_path))
    model.to(device)
    g, g_run, note = choose_g(quality, roots, data.image_size, device, evaluated=run, data_root=data.root)
    if g is None:
        note += " (the predicted-quality column is skipped)"
    sub = data.subset([data.stems[i] for i in rows])
    probs = predict_probs(model, sub.images, device)
    df = evaluate_predictions(sub, probs, quality=g, device=device, with_hd95=True)
    df.to_csv(out_dir / "cases.csv", index=False)
    summary: dict[str, Any] = {"checkpoint": ck_path.name, "epoch": ck.get("epoch"), "arch": spec["arch"],
                               "encoder": spec.get("encoder", ""), "quality_run": g_run}
    if note:
        summary["note"] = note
    summary.update(summarise(df, ""))
    summary["hd95_undefined"] = int(df["hd95"].isna().sum())
    pred_bin = (probs > 0.5).astype(np.uint8)
    if g is not None:
        r = regression_metrics(df["pred_quality"].to_numpy(float), df["dsc"].to_numpy(float))
        summary.update({"quality_spearman": r["spearman"], "quality_spearman_p": r["spearman_p"],
                        "quality_mae": r["mae"]})
        plots.quality_dice_scatter(df["dsc"].to_numpy(float), df["pred_quality"].to_numpy(float),
                                   out_dir / "plots" / "scatter.png",
                                   title=f"{run.path.name} on {out_dir.name}: predicted quality vs DSC")
    order = np.argsort(df["dsc"].to_numpy(float), kind="stable")
    n_show = min(4, max(1, len(order) // 2))
    best, worst = order[::-1][:n_show], order[:n_show]
    pick = np.concatenate([best, worst])
    labels = [f"{sub.stems[i]}\nDSC {df['dsc'].iat[i]:.3f}" + (f", g {df['pred_quality'].iat[i]:.3f}"
                                                                 if g is not None else "") for i in pick]
    plots.overlay_montage(sub.images[pick], sub.masks[pick], pred_bin[pick], labels, out_dir / "plots" / "overlays.png",
                          row_names=["best", "worst"], per_row=n_show,
                          title=f"{run.path.name} on {out_dir.name} (green: ground truth, red: prediction)")
    return summary


def _evaluate_quality(run: Any, rcfg: Any, data: LabeledData, rows: np.ndarray, foreign: bool, split: str,
                      checkpoint: str, device: torch.device, out_dir: Path, weak_link: str | None = None,
                      runs_root: str = "runs") -> dict[str, Any]:
    """g on corrupted masks of the cases: the same D_Q val/test sets train-quality made for a split;
    and (on the run's own data) on the cases' real predictions of a train-weak run."""
    from qgseg import plots
    from qgseg.corrupt import FOREIGN_SALT, SPLIT_SALT, corrupt_dataset, eval_seed
    from qgseg.engine import load_modules, saved_module
    from qgseg.metrics import correlation_undefined_reason, regression_metrics
    from qgseg.quality import QualityNet, mae_by_category, quality_report
    from qgseg.runs import Run

    ck_path = run.checkpoints / f"{checkpoint}.pt"
    ck, spec = saved_module(ck_path, "g", "quality predictor")
    g = QualityNet(**spec)  # the architecture as saved
    load_modules({"g": g}, ck["modules"], str(ck_path))
    g.to(device).eval()
    weak, note = None, ""
    weak_run = run.meta.get("weak_run", "")
    if not foreign and rcfg.corrupt.p_weak > 0 and weak_run:
        from qgseg.weak import load_weak_predictions

        try:
            preds, _ = load_weak_predictions(Run(weak_run), data.stems, data.image_size)
            weak = preds[:, rows]
        except (InputError, OSError, KeyError, ValueError) as e:
            note = f"Type 2 masks left out: train-weak run {weak_run} is not usable ({e})"
    if foreign and rcfg.corrupt.p_weak > 0:
        note = "another data set: Type 1 corruptions only (the weak models were not trained on it)"
    salt = FOREIGN_SALT if foreign else SPLIT_SALT[split]
    cs = corrupt_dataset(data.masks[rows], rcfg.corrupt.eval_k, eval_seed(salt, rcfg.data.split_seed),
                         weak=weak, p_weak=rcfg.corrupt.p_weak if weak is not None else 0.0)
    stems = [data.stems[i] for i in rows]
    metrics, table = quality_report(g, data, rows, cs, device, stems)
    table.to_csv(out_dir / "masks.csv", index=False)
    per_cat = mae_by_category(table)
    per_cat.to_csv(out_dir / "mae_by_category.csv")
    r = regression_metrics(table["pred"].to_numpy(float), table["dice"].to_numpy(float))
    summary: dict[str, Any] = {"checkpoint": ck_path.name, "epoch": ck.get("epoch"), "backbone": spec["backbone"],
                               "cases": len(rows), "masks_per_case": rcfg.corrupt.eval_k,
                               "type2_masks": weak is not None}
    if note:
        summary["note"] = note
    summary.update(metrics)
    summary["pearson_p"], summary["spearman_p"] = r["pearson_p"], r["spearman_p"]
    summary["mae_by_category"] = {k: float(v) for k, v in per_cat["mae"].items()}
    why = correlation_undefined_reason(table["pred"].to_numpy(), table["dice"].to_numpy())
    if why:
        summary["_reasons"] = {k: why for k in ("pearson", "spearman", "pearson_p", "spearman_p")}
    true, pred = table["dice"].to_numpy(float), table["pred"].to_numpy(float)
    plots.quality_scatter(true, pred, out_dir / "plots" / "scatter.png", categories=table["category"].tolist(),
                          title=f"g on {out_dir.name}: MAE {metrics['mae']:.3f}, Pearson {metrics['pearson']:.3f}")
    plots.grounding_scatter(true, pred, table["pred_shuffled_image"].to_numpy(float),
                            table["pred_zero_image"].to_numpy(float), out_dir / "plots" / "grounding.png")
    if not foreign:
        summary.update(_real_predictions(run, g, data, rows, weak_link, runs_root, device, out_dir))
    return summary


def _real_predictions(run: Any, g: Any, data: LabeledData, rows: np.ndarray, weak_link: str | None,
                      runs_root: str, device: torch.device, out_dir: Path) -> dict[str, Any]:
    """g on the cases' real predictions (``qgseg.quality.real_report``): ``real_*`` keys."""
    from qgseg.quality import real_report
    from qgseg.runs import Run, resolve_link
    from qgseg.weak import load_real_predictions

    if weak_link:
        source, option = resolve_link(weak_link, runs_root, "train-weak", "--weak"), "--weak"
    else:
        done = (run.path / "summary.json").is_file()
        path = (run.summary.get("real_weak_run", "") if done else "") or run.meta.get("weak_run", "")
        if not path:
            return {"real_note": "no train-weak run recorded with g: pass --weak RUN to score real predictions"}
        source, option = Run(path), "the train-weak run recorded with g"
    try:
        stems = [data.stems[i] for i in rows]
        real = load_real_predictions(source, stems, data.image_size, option)
        metrics, table = real_report(g, data, rows, stems, real, device)
    except (InputError, OSError) as e:
        return {"real_note": f"real predictions left out: {e}"}
    table.to_csv(out_dir / "real_predictions.csv", index=False)
    return {"real_weak_run": str(source.path), **{f"real_{k}": v for k, v in metrics.items()}}
