"""train-weak: the weak U-Net whose early checkpoints give Type 2 (model-like) corrupted masks.

smp Unet with a randomly initialised ResNet-18 encoder, Adam 1e-3, batch 16, Dice loss. After
each epoch in ``weak.epochs_at`` the weights are saved and the thresholded predictions on every
labeled image (all splits) are stored with their Dice, so train-quality can draw Type 2 masks
for its training, validation and test sets.
"""
from __future__ import annotations

import io
import logging
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
from qgseg.predict import predict_probs
from qgseg.report import Reporter
from qgseg.runs import Run, atomic_write_bytes, read_json, start_run, write_json

if TYPE_CHECKING:
    from qgseg.config import Config

log = logging.getLogger("qgseg")


def _dice(pred: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per-case Dice (N,) float32 of (N,H,W) {0,1} masks; 1.0 where both are empty."""
    return dice_per_sample(torch.from_numpy(pred), torch.from_numpy(masks)).numpy()

STAGE = "train-weak"


class WeakTask(Task):
    monitor = "val_dsc"
    mode = "max"
    best_modules = ("model",)

    def __init__(self, model, data: D.LabeledData, train_idx: np.ndarray, val_idx: np.ndarray,
                 batch_size: int, device: torch.device, run: Run, epochs_at: tuple[int, ...]):
        self.model = model
        self.modules = {"model": model}
        self.data = data
        self.train_idx = train_idx
        self.val_idx = val_idx
        self.bs = min(batch_size, len(train_idx))
        self.device = device
        self.run = run
        self.epochs_at = set(epochs_at)
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
        save_checkpoint(self.run.checkpoints / f"weak_e{epoch:03d}.pt", {
            "format": 1, "epoch": epoch, "modules": {"model": self.model.state_dict()},
            "specs": {"model": dict(self.model.spec)}})
        probs = predict_probs(self.model, self.data.images, self.device)
        pred = (probs > 0.5).astype(np.uint8)
        buf = io.BytesIO()
        np.savez(buf, packed=np.packbits(pred, axis=-1), shape=np.array(pred.shape),
                 dice=_dice(pred, self.data.masks))
        atomic_write_bytes(self.run.path / "predictions" / f"e{epoch:03d}.npz", buf.getvalue())


def run_train_weak(loaded, out: Path | str | None = None, resume: bool = False,
                   reporter: Reporter | None = None) -> tuple[Run, dict[str, Any]]:
    """Train the weak U-Net and store its checkpoints' predictions."""
    device = resolve_device(loaded.config.device)
    # usage errors (architecture, encoder, image size) answer before a run directory exists
    model = None if resume else _build_model(loaded.config)
    run, cfg, resuming = start_run(STAGE, loaded, out, resume, device=str(device))
    with run.guard():
        w = cfg.weak
        if model is None:
            model = _build_model(cfg)
        data = D.load_labeled(cfg.data.labeled, cfg.data.image_size, cfg.data.cache_dir)
        splits = D.make_splits(data.stems, cfg.data.split_seed, data.root)
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
        table = weak_table(run, data.stems, splits)
        table.to_csv(run.path / "checkpoints.csv", index=False)
        summary = {"run": str(run.path), "stage": STAGE, "image_size": cfg.data.image_size,
                   "checkpoints": table.to_dict(orient="records")}
        run.write_summary(summary)
        run.set_status("completed")
    return run, summary


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


def weak_predictions(cfg: Config, data: D.LabeledData, explicit: bool) -> tuple[np.ndarray | None, str]:
    """Type 2 masks (C, N, H, W) for every labeled case from a train-weak run, or None.

    An explicit ``--weak RUN`` must fit the data; without one, the newest completed train-weak
    run of the same data and image size is used, and Type 2 masks are skipped if there is none.
    """
    from qgseg.runs import find_runs, resolve_link

    if cfg.corrupt.p_weak <= 0:
        return None, ""
    if explicit or cfg.weak.run:
        run = resolve_link(cfg.weak.run, cfg.runs_root, "train-weak", "--weak")
        preds, _ = load_weak_predictions(run, data.stems, data.image_size)
        return preds, str(run.path)
    for run in reversed(find_runs(cfg.runs_root, "train-weak")):
        try:
            preds, _ = load_weak_predictions(run, data.stems, data.image_size)
            return preds, str(run.path)
        except (InputError, OSError, KeyError, ValueError):
            continue
    log.info("no completed train-weak run for this data and image size: D_Q has Type 1 masks only "
             "(run `qgseg train-weak` first to add Type 2 masks)")
    return None, ""
