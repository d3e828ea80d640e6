"""train-weak: the weak U-Net whose early checkpoints give Type 2 (model-like) corrupted masks,
and (``weak.folds``) the out-of-fold segmenters whose predictions are real errors.

smp Unet with a randomly initialised ResNet-18 encoder, Adam 1e-3, batch 16, Dice loss. After
each epoch in ``weak.epochs_at`` the weights are saved and the thresholded predictions on every
labeled image (all splits) are stored with their Dice, so train-quality can draw Type 2 masks
for its training, validation and test sets.

With ``weak.folds = F`` the training images are also split into F folds (by video where the data
lists its videos in ``sequences.csv``); one more U-Net per fold trains on the other F - 1 and,
after each epoch in ``weak.fold_epochs_at``, predicts the held-out fold and the val and test
images. Every prediction file records which images its model trained on (``trained``), so a
reader can take only predictions of images the model never saw. For the images a model did not
train on, each file also holds two quality signals that need no g (the model's confidence and
its flip agreement, see :func:`qgseg.predict.predict_with_signals`).
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from qgseg import data as D
from qgseg.engine import Engine, FitSettings, Task, fused_optimizer, resolve_device, save_checkpoint
from qgseg.errors import InputError
from qgseg.losses import dice_only_loss
from qgseg.metrics import dice_per_sample
from qgseg.models import build_segmenter, check_image_size, count_parameters
from qgseg.predict import predict_probs, predict_with_signals
from qgseg.report import Reporter
from qgseg.runs import Run, atomic_write_bytes, read_json, start_run, write_json

if TYPE_CHECKING:
    from qgseg.config import Config

log = logging.getLogger("qgseg")


def _dice(pred: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per-case Dice (N,) float32 of (N,H,W) {0,1} masks; 1.0 where both are empty."""
    return dice_per_sample(torch.from_numpy(pred), torch.from_numpy(masks)).numpy()


STAGE = "train-weak"
FOLD_DIR = "folds"  # RUN/folds/fN/: fold N's engine state; RUN/predictions/folds/fN_eNNN.npz: its predictions


class WeakTask(Task):
    monitor = "val_dsc"
    mode = "max"
    best_modules = ("model",)

    def __init__(self, model, data: D.LabeledData, train_idx: np.ndarray, val_idx: np.ndarray,
                 batch_size: int, device: torch.device, run: Run, epochs_at: tuple[int, ...], *,
                 predict_idx: np.ndarray | None = None, signal_idx: np.ndarray | None = None,
                 pred_prefix: str = "", save_weights: bool = True):
        self.model = model
        self.modules = {"model": model}
        self.data = data
        self.train_idx = train_idx
        self.val_idx = val_idx
        self.bs = min(batch_size, len(train_idx))
        self.device = device
        self.run = run  # where the predictions go (the train-weak run)
        self.epochs_at = set(epochs_at)
        self.predict_idx = np.arange(len(data)) if predict_idx is None else predict_idx
        # confidence and agreement for these rows (default: every row it does not train on)
        self.signal_idx = np.setdiff1d(np.arange(len(data)), train_idx) if signal_idx is None else signal_idx
        self.pred_prefix = pred_prefix  # "" for the weak model, "folds/fN_" for fold N
        self.save_weights = save_weights
        self.images = torch.from_numpy(data.images)
        self.masks = torch.from_numpy(data.masks)

    def steps_per_epoch(self) -> int:
        return max(1, len(self.train_idx) // self.bs)

    def batches(self, epoch: int, generator: torch.Generator):
        for b in D.index_batches(len(self.train_idx), self.bs, generator):
            idx = torch.from_numpy(self.train_idx)[b]
            x = D.to_float_images(self.images[idx])
            y = D.to_float_masks(self.masks[idx])
            x, y = D.random_flip_rot(x, y, generator=generator)
            yield x.to(self.device), y.to(self.device)

    def loss(self, batch, epoch: int, step: int):
        x, y = batch
        loss = dice_only_loss(self.model(x), y).mean()
        return loss, {"loss": loss.detach()}

    def evaluate(self, epoch: int) -> dict[str, float]:
        probs = predict_probs(self.model, self.data.images[self.val_idx], self.device)
        dsc = _dice((probs > 0.5).astype(np.uint8), self.data.masks[self.val_idx])
        return {"val_dsc": float(dsc.mean())}

    def on_epoch_end(self, epoch: int) -> None:
        if epoch not in self.epochs_at:
            return
        if self.save_weights:
            save_checkpoint(self.run.checkpoints / f"weak_e{epoch:03d}.pt", {
                "format": 1, "epoch": epoch, "modules": {"model": self.model.state_dict()},
                "specs": {"model": dict(self.model.spec)}})
        save_predictions(self.run.path / "predictions" / f"{self.pred_prefix}e{epoch:03d}.npz", self.model,
                         self.data, self.predict_idx, self.train_idx, self.signal_idx,
                         self.device)


def save_predictions(path: Path, model: torch.nn.Module, data: D.LabeledData, rows: np.ndarray,
                     trained_rows: np.ndarray, signal_rows: np.ndarray, device: torch.device) -> None:
    """A model's thresholded predictions of data rows ``rows`` with their Dice, which rows it
    trained on, and for ``signal_rows`` it did not train on its confidence and flip agreement
    (NaN elsewhere: they cost three forward passes an image)."""
    trained = np.isin(rows, trained_rows)
    signal = np.isin(rows, signal_rows) & ~trained
    pred = np.empty((len(rows),) + data.masks.shape[1:], np.uint8)
    conf = np.full(len(rows), np.nan)
    agree = np.full(len(rows), np.nan)
    if (~signal).any():
        pred[~signal] = (predict_probs(model, data.images[rows[~signal]], device) > 0.5)
    if signal.any():
        pred[signal], conf[signal], agree[signal] = predict_with_signals(model, data.images[rows[signal]], device)
    buf = io.BytesIO()
    np.savez(buf, packed=np.packbits(pred, axis=-1), shape=np.array(pred.shape), rows=rows.astype(np.int64),
             dice=_dice(pred, data.masks[rows]), trained=trained, confidence=conf, agreement=agree)
    atomic_write_bytes(path, buf.getvalue())


def fold_assignment(stems: list[str], folds: int, seed: int, groups: dict[str, str] | None = None) -> np.ndarray:
    """Fold number (0 .. folds - 1) of each stem: whole groups (videos) go to one fold, seeded,
    each to the fold with the fewest images so far (largest groups first)."""
    if folds < 2:
        raise InputError(f"weak.folds: expected 0 (off) or at least 2, got {folds}")
    keys = [groups.get(s, s) if groups else s for s in stems]
    uniq = sorted(set(keys))
    if len(uniq) < folds:
        raise InputError(f"weak.folds: {folds} folds need at least {folds} training "
                         f"{'videos' if groups else 'images'}, found {len(uniq)}")
    rng = np.random.default_rng([seed, 7919])
    uniq = [uniq[i] for i in rng.permutation(len(uniq))]
    size = {k: keys.count(k) for k in uniq}
    uniq.sort(key=lambda k: -size[k])  # stable: equal sizes keep the seeded order
    fold_of, load = {}, np.zeros(folds, np.int64)
    for k in uniq:
        f = int(np.argmin(load))
        fold_of[k] = f
        load[f] += size[k]
    return np.array([fold_of[k] for k in keys], np.int64)


def read_groups(root: Path) -> dict[str, str] | None:
    """stem -> video of a data set that lists them in ``sequences.csv`` (columns stem and
    video_sequence), or None."""
    path = Path(root) / "sequences.csv"
    if not path.is_file():
        return None
    table = pd.read_csv(path, comment="#", dtype=str)
    if not {"stem", "video_sequence"} <= set(table.columns):
        raise InputError(f"{path}: expected columns stem and video_sequence, found {', '.join(table.columns)}")
    return dict(zip(table["stem"].str.strip(), table["video_sequence"].str.strip()))


def run_train_weak(loaded, out: Path | str | None = None, resume: bool = False,
                   reporter: Reporter | None = None) -> tuple[Run, dict[str, Any]]:
    """Train the weak U-Net (and the fold models) and store their checkpoints' predictions."""
    device = resolve_device(loaded.config.device)
    # usage errors (architecture, encoder, image size) answer before a run directory exists
    model = None if resume else _build_model(loaded.config)
    run, cfg, resuming = start_run(STAGE, loaded, out, resume, device=str(device))
    with run.guard():
        w = cfg.weak
        if model is None:
            model = _build_model(cfg)
        data = D.load_labeled(cfg.data.labeled, cfg.data.image_size, cfg.data.cache_dir)
        # data.max_labeled caps the weak models' training images too: a user with N labels has no others
        splits = D.run_splits(data.stems, cfg.data.split_seed, data.root, cfg.data.max_labeled)
        write_json(run.path / "splits.json", splits)
        write_json(run.path / "stems.json", data.stems)  # row order of predictions/*.npz
        pos = D.positions(data.stems)
        train_idx = np.array([pos[s] for s in splits["train"]])
        val_idx = np.array([pos[s] for s in splits["val"]])
        model = model.to(device)
        run.update_meta(parameters={"model": count_parameters(model)}, data=str(data.root))
        task = WeakTask(model, data, train_idx, val_idx, w.batch_size, device, run, w.epochs_at)
        opt = torch.optim.Adam(model.parameters(), lr=w.lr, **fused_optimizer(device))
        epochs = max(w.epochs_at)
        settings = FitSettings(epochs=epochs, patience=epochs + 1, seed=cfg.seed, grad_clip=0.0,
                               precision=cfg.train.precision, lr_key="weak.lr")
        with (reporter or Reporter(enabled=False)) as rep:
            Engine(run, task, opt, None, settings, device, rep).fit(resume=resuming)
            if w.folds:
                _train_folds(cfg, run, data, splits, device, rep, resuming)
        table = weak_table(run, data.stems, splits)
        table.to_csv(run.path / "checkpoints.csv", index=False)
        summary = {"run": str(run.path), "stage": STAGE, "image_size": cfg.data.image_size,
                   "checkpoints": table.to_dict(orient="records")}
        if w.folds:
            folds = fold_table(run, data.stems, splits)
            folds.to_csv(run.path / "folds.csv", index=False)
            summary["folds"] = w.folds
            summary["fold_checkpoints"] = folds.to_dict(orient="records")
        run.write_summary(summary)
        run.set_status("completed")
    return run, summary


def _train_folds(cfg, run: Run, data: D.LabeledData, splits: dict[str, list[str]], device: torch.device,
                 rep: Reporter, resuming: bool) -> None:
    """One U-Net per fold of the training images, trained on the other folds; each predicts its
    held-out fold and the val and test images at the epochs of ``weak.fold_epochs_at``."""
    w = cfg.weak
    pos = D.positions(data.stems)
    train = np.array([pos[s] for s in splits["train"]])
    val = np.array([pos[s] for s in splits["val"]])
    held_out = np.concatenate([val, np.array([pos[s] for s in splits["test"]], np.int64)])
    fold = fold_assignment(splits["train"], w.folds, cfg.data.split_seed, read_groups(data.root))
    write_json(run.path / "folds.json", {s: int(f) for s, f in zip(splits["train"], fold)})
    epochs_at = tuple(w.fold_epochs_at) or tuple(w.epochs_at)
    for f in range(w.folds):
        sub = Run(run.path / FOLD_DIR / f"f{f}")
        sub.path.mkdir(parents=True, exist_ok=True)
        done = [run.path / "predictions" / FOLD_DIR / f"f{f}_e{e:03d}.npz" for e in epochs_at]
        if all(p.is_file() for p in done) and (sub.checkpoints / "last.pt").is_file():
            continue  # a resumed run: this fold is complete
        check_image_size(w.arch, cfg.data.image_size, "data.image_size")
        torch.manual_seed(cfg.seed + 1000 * (f + 1))
        model = build_segmenter(w.arch, w.encoder).to(device)
        task = WeakTask(model, data, train[fold != f], val, w.batch_size, device, run, epochs_at,
                        predict_idx=np.concatenate([train[fold == f], held_out]), signal_idx=held_out,
                        pred_prefix=f"{FOLD_DIR}/f{f}_", save_weights=False)
        opt = torch.optim.Adam(model.parameters(), lr=w.lr, **fused_optimizer(device))
        settings = FitSettings(epochs=max(epochs_at), patience=max(epochs_at) + 1, seed=cfg.seed + 1000 * (f + 1),
                               grad_clip=0.0, precision=cfg.train.precision, lr_key="weak.lr")
        Engine(sub, task, opt, None, settings, device, rep).fit(resume=resuming)


def _build_model(cfg) -> torch.nn.Module:
    """The weak U-Net, seeded by ``cfg.seed`` (its initial weights do not depend on anything else)."""
    check_image_size(cfg.weak.arch, cfg.data.image_size, "data.image_size")
    torch.manual_seed(cfg.seed)
    return build_segmenter(cfg.weak.arch, cfg.weak.encoder)


def weak_table(run: Run, stems: list[str], splits: dict[str, list[str]]) -> pd.DataFrame:
    """Mean Dice of each stored checkpoint's predictions, per split."""
    split_of = {s: k for k, v in splits.items() for s in v}
    rows = []
    for path in sorted((run.path / "predictions").glob("e*.npz")):
        with np.load(path) as z:
            dice = z["dice"]
        row: dict[str, Any] = {"epoch": int(path.stem[1:])}
        for sp in ("train", "val", "test"):
            sel = np.array([split_of.get(s) == sp for s in stems])
            row[f"{sp}_dice"] = float(dice[sel].mean()) if sel.any() else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def load_weak_predictions(run: Run, stems: list[str], image_size: int,
                          option: str = "--weak") -> tuple[np.ndarray, list[int]]:
    """Type 2 masks: (C, N, H, W) uint8 predictions of each weak checkpoint, rows in ``stems`` order."""
    weak_stems, _ = _check_weak_run(run, stems, image_size, option)
    files = sorted((run.path / "predictions").glob("e*.npz"))
    if not files:
        raise InputError(f"{option} {run.path}: no stored predictions")
    preds, epochs = [], []
    pos = D.positions(weak_stems)
    idx = np.array([pos[s] for s in stems])
    for f in files:
        with np.load(f) as z:
            shape = tuple(z["shape"])
            full = np.unpackbits(z["packed"], axis=-1, count=shape[-1]).reshape(shape)
        preds.append(full[idx])
        epochs.append(int(f.stem[1:]))
    return np.stack(preds).astype(np.uint8), epochs


def _read_prediction_file(path: Path, n_stems: int, train_rows: np.ndarray) -> dict[str, np.ndarray]:
    """One predictions/*.npz: rows (data rows in stems.json order), masks, dice, trained, confidence,
    agreement. Files of older runs hold every row, no signals (NaN), and their model trained on
    the run's training split."""
    with np.load(path) as z:
        shape = tuple(z["shape"])
        out = {"masks": np.unpackbits(z["packed"], axis=-1, count=shape[-1]).reshape(shape),
               "dice": z["dice"].astype(np.float64)}
        rows = z["rows"] if "rows" in z else np.arange(n_stems)
        out["rows"] = rows.astype(np.int64)
        out["trained"] = z["trained"].astype(bool) if "trained" in z else np.isin(rows, train_rows)
        for key in ("confidence", "agreement"):
            out[key] = z[key].astype(np.float64) if key in z else np.full(len(rows), np.nan)
    return out


def fold_table(run: Run, stems: list[str], splits: dict[str, list[str]]) -> pd.DataFrame:
    """Mean Dice of each fold model's checkpoints on its held-out fold and on val / test."""
    split_of = {s: k for k, v in splits.items() for s in v}
    rows = []
    for path in sorted((run.path / "predictions" / FOLD_DIR).glob("f*_e*.npz")):
        f = _read_prediction_file(path, len(stems), np.zeros(0, np.int64))
        fold, epoch = path.stem.split("_e")
        split = np.array([split_of.get(stems[r]) for r in f["rows"]])
        row: dict[str, Any] = {"fold": int(fold[1:]), "epoch": int(epoch)}
        for name, sel in (("held_out", (split == "train") & ~f["trained"]), ("val", split == "val"),
                          ("test", split == "test")):
            row[f"{name}_dice"] = float(f["dice"][sel].mean()) if sel.any() else float("nan")
            row[f"{name}_images"] = int(sel.sum())
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass
class RealPredictions:
    """Masks of segmenters that never trained on their image, one row per mask."""

    case: np.ndarray  # (M,) index into the stems asked for
    masks: np.ndarray  # (M, H, W) uint8
    dice: np.ndarray  # (M,) true Dice
    confidence: np.ndarray  # (M,) predict.confidence of the segmenter's prediction (NaN: not stored)
    agreement: np.ndarray  # (M,) Dice with its flipped re-predictions (NaN: not stored)
    source: list[str]  # the checkpoint: "weak_e003", "fold1_e005"

    def __len__(self) -> int:
        return len(self.case)


def _prediction_files(run: Run) -> list[tuple[str, Path]]:
    main = [(f"weak_{p.stem}", p) for p in sorted((run.path / "predictions").glob("e*.npz"))]
    folds = [("fold" + p.stem[1:], p)
             for p in sorted((run.path / "predictions" / FOLD_DIR).glob("f*_e*.npz"))]
    return main + folds


def _check_weak_run(run: Run, stems: list[str], image_size: int, option: str) -> tuple[list[str], np.ndarray]:
    from qgseg.config import load_run_config

    cfg = load_run_config(run.path)
    if cfg.data.image_size != image_size:
        raise InputError(f"{option} {run.path}: weak run used image size {cfg.data.image_size}, this run "
                         f"uses {image_size}")
    weak_stems = read_json(run.path / "stems.json")
    missing = sorted(set(stems) - set(weak_stems))
    if missing:
        raise InputError(f"{option} {run.path}: no weak predictions for {len(missing)} case(s) "
                         f"(e.g. {missing[0]}); was it trained on the same data?")
    pos = D.positions(weak_stems)
    train_rows = np.array([pos[s] for s in read_json(run.path / "splits.json")["train"]], np.int64)
    return weak_stems, train_rows


def load_real_predictions(run: Run, stems: list[str], image_size: int,
                          option: str = "--weak") -> RealPredictions:
    """Every stored prediction of ``stems`` by a checkpoint whose model did not train on that image
    (the weak model's on val / test images, each fold model's on its held-out fold and val / test)."""
    weak_stems, train_rows = _check_weak_run(run, stems, image_size, option)
    pos = D.positions(weak_stems)
    case_of = {pos[s]: i for i, s in enumerate(stems)}
    parts: dict[str, list] = {k: [] for k in ("case", "masks", "dice", "confidence", "agreement", "source")}
    for name, path in _prediction_files(run):
        f = _read_prediction_file(path, len(weak_stems), train_rows)
        keep = np.array([r in case_of for r in f["rows"]], bool) & ~f["trained"]
        if not keep.any():
            continue
        parts["case"].append(np.array([case_of[r] for r in f["rows"][keep]], np.int64))
        for key in ("masks", "dice", "confidence", "agreement"):
            parts[key].append(f[key][keep])
        parts["source"] += [name] * int(keep.sum())
    if not parts["case"]:
        raise InputError(f"{option} {run.path}: no stored prediction of these cases by a model that did not "
                         "train on them")
    return RealPredictions(np.concatenate(parts["case"]), np.concatenate(parts["masks"]).astype(np.uint8),
                           np.concatenate(parts["dice"]), np.concatenate(parts["confidence"]),
                           np.concatenate(parts["agreement"]), parts["source"])


def load_fold_predictions(run: Run, stems: list[str], image_size: int,
                          option: str = "--weak") -> np.ndarray:
    """Out-of-fold masks (C, N, H, W) of training cases ``stems``: for each case, the predictions
    of the fold model that held it out, one per kept epoch. Never a model that trained on it."""
    weak_stems, train_rows = _check_weak_run(run, stems, image_size, option)
    files = sorted((run.path / "predictions" / FOLD_DIR).glob("f*_e*.npz"))
    if not files:
        raise InputError(f"{option} {run.path}: no fold predictions (train it with weak.folds >= 2)")
    pos = D.positions(weak_stems)
    found: list[list[np.ndarray]] = [[] for _ in stems]
    for path in files:
        f = _read_prediction_file(path, len(weak_stems), train_rows)
        at = {int(r): k for k, r in enumerate(f["rows"]) if not f["trained"][k]}
        for i, s in enumerate(stems):
            k = at.get(pos[s])
            if k is not None:
                found[i].append(f["masks"][k])
    counts = {len(x) for x in found}
    if 0 in counts:
        lost = stems[[len(x) for x in found].index(0)]
        raise InputError(f"{option} {run.path}: no out-of-fold prediction of training case {lost}; "
                         "the weak run was made with another train split")
    if len(counts) > 1:
        raise InputError(f"{option} {run.path}: training cases have different numbers of out-of-fold "
                         f"predictions ({sorted(counts)}); the weak run's fold files are incomplete")
    return np.stack([np.stack(x) for x in found], axis=1).astype(np.uint8)


def find_weak_run(cfg: Config, data: D.LabeledData, explicit: bool) -> Run | None:
    """The train-weak run of this data: ``--weak RUN`` (it must fit the data), else the newest
    completed one of the same data and image size, else None."""
    from qgseg.runs import find_runs, resolve_link

    if explicit or cfg.weak.run:
        run = resolve_link(cfg.weak.run, cfg.runs_root, "train-weak", "--weak")
        load_weak_predictions(run, data.stems, data.image_size)  # fits the data, or a clear error
        return run
    for run in reversed(find_runs(cfg.runs_root, "train-weak")):
        try:
            load_weak_predictions(run, data.stems, data.image_size)
            return run
        except (InputError, OSError, KeyError, ValueError):
            continue
    return None


def weak_predictions(cfg: Config, data: D.LabeledData, explicit: bool,
                     train_stems: list[str] | None = None) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """Type 2 masks (C, N, H, W) for every labeled case and out-of-fold masks (C', N_train, H, W)
    of the training cases ``train_stems`` from a train-weak run, or None, and that run.

    Type 2 masks are skipped (with a note) when there is no train-weak run; out-of-fold masks
    (``corrupt.p_fold`` > 0) need a run trained with ``weak.folds``.
    """
    need_fold = cfg.corrupt.p_fold > 0 and train_stems is not None
    if cfg.corrupt.p_weak <= 0 and not need_fold:
        return None, None, ""
    run = find_weak_run(cfg, data, explicit)
    if run is None:
        if need_fold:
            raise InputError("corrupt.p_fold: out-of-fold masks need a train-weak run with weak.folds >= 2 "
                             "(run `qgseg train-weak --set weak.folds=2` first, or set corrupt.p_fold = 0)")
        log.info("no completed train-weak run for this data and image size: D_Q has Type 1 masks only "
                 "(run `qgseg train-weak` first to add Type 2 masks)")
        return None, None, ""
    weak = load_weak_predictions(run, data.stems, data.image_size)[0] if cfg.corrupt.p_weak > 0 else None
    fold = load_fold_predictions(run, train_stems, data.image_size, "corrupt.p_fold: train-weak run") if need_fold else None
    return weak, fold, str(run.path)
