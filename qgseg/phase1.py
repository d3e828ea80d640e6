"""Phase 1 stages: ``corrupt`` (materialise D_Q) and ``train-quality`` (learn g ~ Dice).

D_Q pairs each training image with K corrupted versions of its mask (Type 1 synthetic
corruptions and, with probability p_weak, Type 2 weak-model predictions) and their Dice to the
ground truth. Validation and test sets are corruptions of the val and test images with a seed
fixed by the split seed, so every g trained on the same split is judged on the same masks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from qgseg import data as D
from qgseg import distributed
from qgseg.config import Config, load_run_config
from qgseg.corrupt import CorruptedSet, corrupt_dataset, load_set, save_set
from qgseg.engine import Engine, FitSettings, fused_optimizer, load_checkpoint, load_modules, resolve_device
from qgseg.errors import InputError
from qgseg.metrics import regression_metrics
from qgseg.report import Reporter
from qgseg.runs import Run, find_runs, read_json, resolve_link, start_run, write_json

log = logging.getLogger("qgseg")

SPLIT_SALT = {"train": 0, "val": 1, "test": 2}


# ---------------------------------------------------------------------------------------------
# D_Q
# ---------------------------------------------------------------------------------------------
def weak_predictions(cfg: Config, data: D.LabeledData, explicit: bool) -> tuple[np.ndarray | None, str]:
    """Type 2 masks (C, N, H, W) for every labeled case from a train-weak run, or None.

    An explicit ``--weak RUN`` must fit the data; without one, the newest completed train-weak
    run of the same data and image size is used, and Type 2 masks are skipped if there is none.
    """
    from qgseg.weak import load_weak_predictions

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


def build_dq(cfg: Config, data: D.LabeledData, splits: dict[str, list[str]],
             weak: np.ndarray | None) -> dict[str, CorruptedSet]:
    """Corrupted sets for train (K per image, seed = cfg.seed) and val / test (eval_k per image,
    seeds fixed by data.split_seed)."""
    pos = {s: i for i, s in enumerate(data.stems)}
    out = {}
    for split in ("train", "val", "test"):
        idx = np.array([pos[s] for s in splits[split]])
        if split == "train":
            k, seed = cfg.corrupt.k, cfg.seed
        else:
            k, seed = cfg.corrupt.eval_k, 1_000_003 * (SPLIT_SALT[split]) + cfg.data.split_seed
        w = weak[:, idx] if weak is not None else None
        out[split] = corrupt_dataset(data.masks[idx], k, seed, weak=w, p_weak=cfg.corrupt.p_weak)
    return out


def dq_summary(cs: CorruptedSet) -> dict[str, Any]:
    d = cs.dice.astype(float)
    cats = pd.Series(cs.category).value_counts()
    q = np.quantile(d, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]) if len(d) else np.zeros(7)
    return {
        "masks": int(len(cs)),
        "categories": {k: int(v) for k, v in cats.items()},
        "dice_quantiles": dict(zip(["min", "q10", "q25", "median", "q75", "q90", "max"], map(float, q))),
        "share_below_0.5": float((d < 0.5).mean()) if len(d) else 0.0,
        "share_above_0.9": float((d > 0.9).mean()) if len(d) else 0.0,
    }


def _labeled_and_splits(cfg: Config, run: Run) -> tuple[D.LabeledData, dict[str, list[str]]]:
    data = D.load_labeled(cfg.data.labeled, cfg.data.image_size, cfg.data.cache_dir)
    splits = D.run_splits(data.stems, cfg.data.split_seed, data.root, cfg.data.max_labeled)
    write_json(run.path / "splits.json", splits)
    return data, splits


def run_corrupt(loaded, out: Path | str | None = None, resume: bool = False,
                reporter: Reporter | None = None) -> tuple[Run, dict[str, Any]]:
    """Materialise D_Q into a run directory (sets, index table, plots)."""
    from qgseg import plots

    run, cfg, _ = start_run("corrupt", loaded, out, resume)
    with run.guard():
        data, splits = _labeled_and_splits(cfg, run)
        weak, weak_run = weak_predictions(cfg, data, "weak.run" in loaded.explicit)
        sets = build_dq(cfg, data, splits, weak)
        frames = []
        for split, cs in sets.items():
            save_set(cs, run.path / f"dq_{split}.npz")
            f = cs.index_frame(splits[split])
            f.insert(0, "split", split)
            frames.append(f)
        pd.concat(frames).to_csv(run.path / "index.csv", index=False)
        tr = sets["train"]
        pos = {s: i for i, s in enumerate(data.stems)}
        first = pos[splits["train"][0]]
        plots.corruption_examples(data.images[first], data.masks[first], _one_case(tr, 0),
                                  run.plots / "examples.png")
        plots.dice_histogram(tr.dice, run.plots / "dice_hist.png", by_category=tr.category)
        summary = {"run": str(run.path), "stage": "corrupt", "image_size": cfg.data.image_size,
                   "k": cfg.corrupt.k, "weak_run": weak_run, **dq_summary(tr)}
        run.write_summary(summary)
        run.set_status("completed")
    return run, summary


def _one_case(cs: CorruptedSet, case: int) -> CorruptedSet:
    sel = np.nonzero(cs.case == case)[0]
    return CorruptedSet(cs.case[sel], cs.masks[sel], cs.dice[sel], [cs.category[i] for i in sel],
                        [cs.ops[i] for i in sel])


def load_dq(run: Run, cfg: Config, splits: dict[str, list[str]]) -> dict[str, CorruptedSet]:
    """D_Q from a corrupt run; it must be of the same image size and split."""
    rcfg = load_run_config(run.path)
    if rcfg.data.image_size != cfg.data.image_size:
        raise InputError(f"--corrupt {run.path}: made at {rcfg.data.image_size} px, this run uses "
                         f"{cfg.data.image_size} px")
    if read_json(run.path / "splits.json") != splits:
        raise InputError(f"--corrupt {run.path}: made from another train/val/test split "
                         "(different data or data.split_seed)")
    return {s: load_set(run.path / f"dq_{s}.npz") for s in ("train", "val", "test")}


# ---------------------------------------------------------------------------------------------
# g training
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Resample:
    """Fresh corruptions of the training masks for every epoch after the first (quality.resample):
    the same K, p_weak and weak-model masks as D_Q, seeded by (seed, epoch) so a resumed run
    draws the same sets."""
    masks: np.ndarray  # (N, H, W) ground truth of the training cases, in D_Q's case order
    weak: np.ndarray | None  # (C, N, H, W) Type 2 masks of the same cases, or None
    k: int
    p_weak: float
    seed: int
    max_masks: int = 0  # quality.masks_per_epoch: draw no more than K per case an epoch can use

    def draw(self, epoch: int) -> CorruptedSet:
        from qgseg.engine import epoch_seed

        k = self.k
        if self.max_masks:
            k = min(k, -(-self.max_masks // len(self.masks)))
        return corrupt_dataset(self.masks, k, epoch_seed(self.seed, epoch, 2), weak=self.weak, p_weak=self.p_weak)


class QualityTask:
    monitor = "val_loss"
    mode = "min"
    best_modules = ("g",)

    def __init__(self, g, data: D.LabeledData, case_index: dict[str, np.ndarray],
                 sets: dict[str, CorruptedSet], batch_size: int, device: torch.device, *,
                 resample: Resample | None = None, beta: float = 1.0, masks_per_epoch: int = 0,
                 p_lesion_free: float = 0.0, color_jitter: float = 0.0, select: str = "val_loss"):
        self.g = g
        if select == "last":  # best.pt follows the newest epoch: the end of the schedule is the model kept
            self.monitor, self.mode = "epoch", "max"
        self.select = select
        self.beta = beta  # SmoothL1's beta: 1.0 (torch's default, the paper's loss) is MSE / 2 on [0, 1]
        self.masks_per_epoch = masks_per_epoch  # 0 = every training mask each epoch
        self.modules = {"g": g}
        self.images = torch.from_numpy(data.images)
        self.case_index = case_index  # split -> data row of each case of the split
        self.sets = sets
        self.resample = resample
        self.p_lesion_free = p_lesion_free
        self.color_jitter = color_jitter
        if p_lesion_free:  # the training images with their lesions painted out (their true mask is empty)
            from qgseg.corrupt import remove_lesions
            train = case_index["train"]
            free = data.images.copy()
            free[train] = remove_lesions(data.images[train], data.masks[train])
            self.free_images = torch.from_numpy(free)
        self._use(sets["train"])
        self.bs = min(batch_size, len(sets["train"]))
        self.device = device

    def _use(self, cs: CorruptedSet) -> None:
        self.train_masks = torch.from_numpy(cs.masks)
        self.train_dice = torch.from_numpy(cs.dice.astype(np.float32))
        self.train_rows = torch.from_numpy(self.case_index["train"][cs.case])

    def steps_per_epoch(self) -> int:
        n = len(self.sets["train"])
        if self.masks_per_epoch:  # a fixed budget: larger data sets see a random share each epoch
            n = min(n, self.masks_per_epoch)
        return max(1, n // (self.bs * distributed.world_size()))

    def batches(self, epoch: int, generator: torch.Generator):
        if self.resample is not None:  # epoch 1 trains on D_Q itself, later epochs on fresh draws
            self._use(self.sets["train"] if epoch == 1 else self.resample.draw(epoch))
        for b in D.index_batches(len(self.train_rows), self.bs, generator)[:self.steps_per_epoch()]:
            # uint8 to the device, then float and flips there (4x fewer bytes over the bus)
            rows, y = self.train_rows[b], self.train_dice[b]
            images = self.images[rows]
            if self.p_lesion_free:  # a share of masks on the lesion-free image: Dice vs an empty mask
                free = torch.rand(len(b), generator=generator) < self.p_lesion_free
                images = torch.where(free[:, None, None, None], self.free_images[rows], images)
                y = torch.where(free, (self.train_masks[b].flatten(1).amax(1) == 0).float(), y)
            x = D.to_float_images(images.to(self.device, non_blocking=True))
            m = D.to_float_masks(self.train_masks[b].to(self.device, non_blocking=True))
            x, m = D.random_flip_rot(x, m, generator=generator)
            if self.color_jitter:
                x = D.random_color(x, self.color_jitter, generator)
            yield x, m, y.to(self.device, non_blocking=True)

    def loss(self, batch, epoch: int, step: int):
        x, m, y = batch
        loss = F.smooth_l1_loss(self.g(x, m).float(), y, beta=self.beta)
        return loss, {"loss": loss.detach()}

    def after_step(self, step: int) -> None:
        pass

    def evaluate(self, epoch: int) -> dict[str, float]:
        if self.select == "last":  # the val metrics only inform: one view keeps them cheap
            from qgseg.models import scoring_views

            with scoring_views(self.g, 1):
                return self._val_metrics(epoch)
        return self._val_metrics(epoch)  # they pick best.pt: score as g will

    def _val_metrics(self, epoch: int) -> dict[str, float]:
        pred = predict_quality(self.g, self.images, self.case_index["val"], self.sets["val"], self.device)
        true = self.sets["val"].dice.astype(np.float64)
        loss = float(F.smooth_l1_loss(torch.from_numpy(pred), torch.from_numpy(true), beta=self.beta))
        r = regression_metrics(pred, true)
        ground = grounding_checks(self.g, self.images, self.case_index["val"], self.sets["val"], self.device, true)
        out = {"epoch": epoch} if self.select == "last" else {}
        return {**out, "val_loss": loss, "val_mae": r["mae"], "val_pearson": r["pearson"],
                "val_zero_image_mae_increase": ground["mae_zero_image"] - r["mae"],
                "val_shuffled_image_mae_increase": ground["mae_shuffled_image"] - r["mae"]}


@torch.no_grad()
def predict_quality(g, images: torch.Tensor, case_rows: np.ndarray, cs: CorruptedSet,
                    device: torch.device, image_mode: str = "normal", seed: int = 0,
                    batch_size: int = 128) -> np.ndarray:
    """g's predictions for every mask of a corrupted set.

    image_mode: "normal" (each mask with its own image), "zero" (the normalised image set to 0,
    i.e. a mean-grey image), or "shuffled" (each mask with another case's image: a seeded
    derangement of the cases).
    """
    from qgseg.engine import autocast

    g.eval()
    rows = case_rows[cs.case]
    if image_mode == "shuffled":
        n = len(case_rows)
        perm = np.random.default_rng(seed).permutation(n)
        other = np.empty(n, np.int64)
        other[perm] = np.roll(perm, 1)  # a cycle through all cases: nobody keeps its own image
        rows = case_rows[other[cs.case]]
    out = []
    masks = torch.from_numpy(cs.masks)
    for i in range(0, len(cs), batch_size):
        x = D.to_float_images(images[torch.from_numpy(rows[i:i + batch_size])]).to(device)
        if image_mode == "zero":
            x = torch.zeros_like(x)
        m = D.to_float_masks(masks[i:i + batch_size]).to(device)
        with autocast(device):
            out.append(g(x, m).float().cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def grounding_checks(g, images: torch.Tensor, rows: np.ndarray, cs: CorruptedSet, device: torch.device,
                     true: np.ndarray) -> dict[str, Any]:
    """g's MAE with the image zeroed and with each mask on another case's image, and those predictions."""
    zero = predict_quality(g, images, rows, cs, device, "zero")
    shuf = predict_quality(g, images, rows, cs, device, "shuffled", seed=1)
    return {"mae_zero_image": float(np.abs(zero - true).mean()),
            "mae_shuffled_image": float(np.abs(shuf - true).mean()), "zero": zero, "shuffled": shuf}


def quality_report(g, data: D.LabeledData, rows: np.ndarray, cs: CorruptedSet, device: torch.device,
                   stems: list[str]) -> tuple[dict[str, float], pd.DataFrame]:
    """Test metrics of g plus the contextual-grounding checks, and a per-mask table."""
    images = torch.from_numpy(data.images)
    true = cs.dice.astype(np.float64)
    pred = predict_quality(g, images, rows, cs, device)
    ground = grounding_checks(g, images, rows, cs, device, true)
    zero, shuf = ground["zero"], ground["shuffled"]
    r = regression_metrics(pred, true)
    out = {k: r[k] for k in ("mae", "rmse", "pearson", "spearman")}
    out["mae_zero_image"], out["mae_shuffled_image"] = ground["mae_zero_image"], ground["mae_shuffled_image"]
    out["zero_image_mae_increase"] = out["mae_zero_image"] - out["mae"]
    out["shuffled_image_mae_increase"] = out["mae_shuffled_image"] - out["mae"]
    hi = true >= 0.7
    if hi.sum() > 2:
        rh = regression_metrics(pred[hi], true[hi])
        out["pearson_dice_ge_0.7"], out["spearman_dice_ge_0.7"] = rh["pearson"], rh["spearman"]
        out["mae_dice_ge_0.7"] = rh["mae"]
    out["masks"] = int(len(cs))
    table = cs.index_frame(stems)
    table["pred"], table["pred_zero_image"], table["pred_shuffled_image"] = pred, zero, shuf
    table["abs_error"] = np.abs(pred - true)
    return out, table


def _build_g(cfg: Config) -> torch.nn.Module:
    """g, seeded by ``cfg.seed`` (its initial weights do not depend on anything else)."""
    from qgseg.models import build_quality_net

    q = cfg.quality
    torch.manual_seed(cfg.seed)
    return build_quality_net(q.backbone, pretrained=q.pretrained, weights_file=q.weights_file,
                             input_size=q.input_size, tta_views=q.tta_views)


def run_train_quality(loaded, out: Path | str | None = None, resume: bool = False,
                      reporter: Reporter | None = None) -> tuple[Run, dict[str, Any]]:
    """Train the quality predictor g and evaluate it on the test split's corrupted masks."""
    from qgseg import plots
    from qgseg.models import count_parameters

    distributed.setup(loaded.config.device)
    device = distributed.local_device(resolve_device(loaded.config.device))
    g = None
    if not resume:  # usage errors (backbone, weights file, --corrupt / --weak links) before a run directory
        g = _build_g(loaded.config)
        for link, stage, option in ((loaded.config.corrupt.run, "corrupt", "--corrupt"),
                                    (loaded.config.weak.run, "train-weak", "--weak")):
            if link:
                resolve_link(link, loaded.config.runs_root, stage, option)
    run, cfg, resuming = start_run("train-quality", loaded, out, resume, device=str(device))
    with run.guard():
        data, splits = _labeled_and_splits(cfg, run)
        k, p_weak = cfg.corrupt.k, cfg.corrupt.p_weak
        if cfg.corrupt.run:
            src = resolve_link(cfg.corrupt.run, cfg.runs_root, "corrupt", "--corrupt")
            sets, weak_run = load_dq(src, cfg, splits), src.summary.get("weak_run", "")
            src_cfg = load_run_config(src.path)
            k, p_weak = src_cfg.corrupt.k, src_cfg.corrupt.p_weak
            weak = None
            if cfg.quality.resample and weak_run and p_weak > 0:  # later epochs draw from the same weak run
                from qgseg.weak import load_weak_predictions
                wrun = resolve_link(weak_run, cfg.runs_root, "train-weak", f"--corrupt {src.path}: its weak run")
                weak, _ = load_weak_predictions(wrun, data.stems, data.image_size, "--corrupt")
        else:
            weak, weak_run = weak_predictions(cfg, data, "weak.run" in loaded.explicit)
            sets = build_dq(cfg, data, splits, weak)
        pos = {s: i for i, s in enumerate(data.stems)}
        rows = {s: np.array([pos[x] for x in v]) for s, v in splits.items()}
        resample = None
        if cfg.quality.resample:
            resample = Resample(data.masks[rows["train"]], weak[:, rows["train"]] if weak is not None else None,
                                k, p_weak, cfg.seed, cfg.quality.masks_per_epoch)
        q = cfg.quality
        g = (g if g is not None else _build_g(cfg)).to(device)
        if cfg.train.channels_last:
            g = g.to(memory_format=torch.channels_last)
        run.update_meta(parameters={"g": count_parameters(g)}, data=str(data.root), weak_run=weak_run,
                        dq={s: len(c) for s, c in sets.items()})
        task = QualityTask(g, data, rows, sets, q.batch_size, device, resample=resample, beta=q.loss_beta,
                           masks_per_epoch=q.masks_per_epoch, p_lesion_free=q.p_lesion_free,
                           color_jitter=q.color_jitter, select=q.select)
        opt = torch.optim.AdamW(g.parameters(), lr=q.lr, weight_decay=q.weight_decay, **fused_optimizer(device))
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10, T_mult=2, eta_min=1e-6)
        settings = FitSettings(epochs=q.epochs, patience=q.patience, seed=cfg.seed, grad_clip=q.grad_clip,
                               precision=cfg.train.precision, lr_key="quality.lr")
        with (reporter or Reporter(enabled=False)) as rep:
            fit = Engine(run, task, opt, sched, settings, device, rep).fit(resume=resuming)
        distributed.barrier()
        if not distributed.is_main_process():
            return run, {}  # rank 0 evaluates on test and writes the summary
        best = load_checkpoint(run.checkpoints / "best.pt")
        load_modules({"g": g}, best["modules"], "best.pt")
        metrics, table = quality_report(g, data, rows["test"], sets["test"], device, splits["test"])
        table.to_csv(run.path / "test_predictions.csv", index=False)
        per_cat = (table.groupby("category")["abs_error"].agg(["mean", "count"])
                   .rename(columns={"mean": "mae", "count": "masks"}))
        per_cat.to_csv(run.path / "test_mae_by_category.csv")
        plots.quality_scatter(table["dice"].to_numpy(), table["pred"].to_numpy(), run.plots / "scatter.png",
                              categories=table["category"].tolist(),
                              title=f"g on test: MAE {metrics['mae']:.3f}, Pearson {metrics['pearson']:.3f}")
        summary = {"run": str(run.path), "stage": "train-quality", "image_size": cfg.data.image_size,
                   "backbone": q.backbone, "g_input_size": q.input_size or cfg.data.image_size,
                   "g_tta_views": q.tta_views,
                   "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
                   "stopped_early": fit.stopped_early, "train_seconds": round(fit.seconds, 1),
                   "train_masks_seen": fit.epochs_run * task.steps_per_epoch() * task.bs * distributed.world_size(),
                   **{f"test_{k}": v for k, v in metrics.items()},
                   "test_mae_by_category": {k: float(v) for k, v in per_cat["mae"].items()}}
        run.write_summary(summary)
        run.set_status("completed")
    return run, summary
