"""``qgseg train-quality``: learn the quality predictor g ~ Dice on D_Q (see corrupt.py for D_Q).

Epoch 1 trains on D_Q's training masks (from ``--corrupt RUN`` or made here), later epochs on
fresh draws under ``quality.resample``; g's val loss picks best.pt (or the last epoch), and the
best g is tested on the test split's corrupted masks with the grounding checks, and on the val
and test images' real predictions by segmenters that never saw them (see quality.real_report).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qgseg import data as D
from qgseg import distributed
from qgseg.config import Config, QualityConfig, load_run_config
from qgseg.corrupt import CorruptedSet, build_dq, corrupt_dataset, labeled_and_splits, load_dq
from qgseg.engine import FitSettings, Task, fit_and_restore_best, fused_optimizer, resolve_device
from qgseg.losses import pairwise_ranking_loss
from qgseg.metrics import correlation_undefined_reason, regression_metrics
from qgseg.quality import grounding_checks, mae_by_category, predict_quality, quality_report, real_report
from qgseg.report import Reporter
from qgseg.runs import Run, resolve_link, start_run
from qgseg.weak import find_weak_run, load_real_predictions, weak_predictions


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
    fold: np.ndarray | None = None  # (C', N, H, W) out-of-fold masks of the same cases, or None
    p_fold: float = 0.0

    def draw(self, epoch: int) -> CorruptedSet:
        from qgseg.engine import epoch_seed

        k = self.k
        if self.max_masks:
            k = min(k, -(-self.max_masks // len(self.masks)))
        return corrupt_dataset(self.masks, k, epoch_seed(self.seed, epoch, 2), weak=self.weak, p_weak=self.p_weak,
                               fold=self.fold, p_fold=self.p_fold)


RANK_GROUP = 4  # with quality.rank_weight, training batches hold runs of this many masks of one image


def grouped_order(case: torch.Tensor, group: int, generator: torch.Generator) -> torch.Tensor:
    """A seeded order of the masks in which runs of ``group`` masks of the same case follow each
    other (a case's masks in random order, cut into runs; the runs in random order)."""
    n = len(case)
    perm = torch.randperm(n, generator=generator)
    perm = perm[torch.argsort(case[perm], stable=True)]
    c = case[perm].long()
    pos = torch.arange(n) - torch.searchsorted(c, c, side="left")  # place within its case
    _, run = torch.unique(c * n + pos // group, return_inverse=True)
    priority = torch.randperm(int(run.max()) + 1 if n else 0, generator=generator)[run]
    return perm[torch.argsort(priority * n + pos, stable=True)]


class QualityTask(Task):
    """Engine task of train-quality: SmoothL1 of g(x, m) to Dice on D_Q's training masks (plus,
    with ``quality.rank_weight``, a pairwise ranking term over masks of one image); val loss, MAE,
    Pearson and the grounding checks each epoch. ``q`` is the run's [quality] section."""

    monitor = "val_loss"
    mode = "min"
    best_modules = ("g",)

    def __init__(self, g, data: D.LabeledData, case_index: dict[str, np.ndarray],
                 sets: dict[str, CorruptedSet], q: QualityConfig, device: torch.device, *,
                 resample: Resample | None = None):
        self.g = g
        if q.select == "last":  # best.pt follows the newest epoch: the end of the schedule is the model kept
            self.monitor, self.mode = "epoch", "max"
        self.select = q.select
        self.beta = q.loss_beta  # SmoothL1's beta: 1.0 (torch's default, the paper's loss) is MSE / 2 on [0, 1]
        self.masks_per_epoch = q.masks_per_epoch  # 0 = every training mask each epoch
        self.modules = {"g": g}
        self.images = torch.from_numpy(data.images)
        self.case_index = case_index  # split -> data row of each case of the split
        self.sets = sets
        self.resample = resample
        self.p_lesion_free = q.p_lesion_free
        self.color_jitter = q.color_jitter
        self.rank_weight = q.rank_weight
        if q.p_lesion_free:  # the training images with their lesions painted out (their true mask is empty)
            from qgseg.corrupt import remove_lesions
            train = case_index["train"]
            free = data.images.copy()
            free[train] = remove_lesions(data.images[train], data.masks[train])
            self.free_images = torch.from_numpy(free)
        self._use(sets["train"])
        self.bs = min(q.batch_size, len(sets["train"]))
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
        for b in self._index_batches(generator):
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
            y = y.to(self.device, non_blocking=True)
            if not self.rank_weight:
                yield x, m, y
                continue
            # the ranking term compares masks of one image: a lesion-free image counts as another
            image = rows + (len(self.images) * free.long() if self.p_lesion_free else 0)
            yield x, m, y, image.to(self.device, non_blocking=True)

    def _index_batches(self, generator: torch.Generator) -> list[torch.Tensor]:
        if not self.rank_weight:
            return D.index_batches(len(self.train_rows), self.bs, generator)[:self.steps_per_epoch()]
        order = grouped_order(self.train_rows, RANK_GROUP, generator)
        world, rank = distributed.world_size(), distributed.rank()
        glob = self.bs * world
        return [order[i + rank * self.bs:i + (rank + 1) * self.bs]
                for i in range(0, len(order) - glob + 1, glob)][:self.steps_per_epoch()]

    def loss(self, batch, epoch: int, step: int):
        x, m, y = batch[:3]
        pred = self.g(x, m).float()
        fit = F.smooth_l1_loss(pred, y, beta=self.beta)
        if not self.rank_weight:
            return fit, {"loss": fit.detach()}
        rank = pairwise_ranking_loss(pred, y, batch[3])
        loss = fit + self.rank_weight * rank
        return loss, {"loss": loss.detach(), "fit_loss": fit.detach(), "rank_loss": rank.detach()}

    def evaluate(self, epoch: int) -> dict[str, float]:
        if self.select == "last":  # the val metrics only inform: one view keeps them cheap
            from qgseg.quality import scoring_views

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


def _build_g(cfg: Config) -> torch.nn.Module:
    """g, seeded by ``cfg.seed`` (its initial weights do not depend on anything else)."""
    from qgseg.quality import build_quality_net

    q = cfg.quality
    torch.manual_seed(cfg.seed)
    return build_quality_net(q.backbone, pretrained=q.pretrained, weights_file=q.weights_file,
                             input_size=q.input_size, tta_views=q.tta_views)


def _dq(cfg: Config, data: D.LabeledData, splits: dict[str, list[str]], weak_explicit: bool
        ) -> tuple[dict[str, CorruptedSet], str, dict[str, np.ndarray], Resample | None]:
    """(D_Q's sets, the weak run of its Type 2 masks, data rows per split, the per-epoch resampler or None).

    D_Q comes from ``--corrupt RUN`` (whose K, p_weak, p_fold and weak run the resampler then uses)
    or is made here from the newest fitting / the explicit weak run.
    """
    k, p_weak, p_fold = cfg.corrupt.k, cfg.corrupt.p_weak, cfg.corrupt.p_fold
    if cfg.corrupt.run:
        src = resolve_link(cfg.corrupt.run, cfg.runs_root, "corrupt", "--corrupt")
        sets, weak_run = load_dq(src, cfg, splits), src.summary.get("weak_run", "")
        src_cfg = load_run_config(src.path)
        k, p_weak, p_fold = src_cfg.corrupt.k, src_cfg.corrupt.p_weak, src_cfg.corrupt.p_fold
        weak = fold = None
        if cfg.quality.resample and weak_run and (p_weak > 0 or p_fold > 0):  # later epochs: the same weak run
            from qgseg.weak import load_fold_predictions, load_weak_predictions
            wrun = resolve_link(weak_run, cfg.runs_root, "train-weak", f"--corrupt {src.path}: its weak run")
            if p_weak > 0:
                weak, _ = load_weak_predictions(wrun, data.stems, data.image_size, "--corrupt")
            if p_fold > 0:
                fold = load_fold_predictions(wrun, splits["train"], data.image_size, "--corrupt")
    else:
        weak, fold, weak_run = weak_predictions(cfg, data, weak_explicit, splits["train"])
        sets = build_dq(cfg, data, splits, weak, fold=fold)
    pos = D.positions(data.stems)
    rows = {s: np.array([pos[x] for x in v]) for s, v in splits.items()}
    resample = None
    if cfg.quality.resample:
        resample = Resample(data.masks[rows["train"]], weak[:, rows["train"]] if weak is not None else None,
                            k, p_weak, cfg.seed, cfg.quality.masks_per_epoch, fold, p_fold)
    return sets, weak_run, rows, resample


def _test(run: Run, cfg: Config, task: QualityTask, data: D.LabeledData, test_stems: list[str],
          fit: Any) -> dict[str, Any]:
    """The best g on the test split's corrupted masks: per-mask table, per-category MAE, scatter plot, summary."""
    from qgseg import plots

    q = cfg.quality
    metrics, table = quality_report(task.g, data, task.case_index["test"], task.sets["test"], task.device, test_stems)
    table.to_csv(run.path / "test_predictions.csv", index=False)
    per_cat = mae_by_category(table)
    per_cat.to_csv(run.path / "test_mae_by_category.csv")
    plots.quality_scatter(table["dice"].to_numpy(), table["pred"].to_numpy(), run.plots / "scatter.png",
                          categories=table["category"].tolist(),
                          title=f"g on test: MAE {metrics['mae']:.3f}, Pearson {metrics['pearson']:.3f}")
    why = correlation_undefined_reason(table["pred"].to_numpy(), table["dice"].to_numpy(), "test masks")
    return {"run": str(run.path), "stage": "train-quality", "image_size": cfg.data.image_size,
            "backbone": q.backbone, "g_input_size": q.input_size or cfg.data.image_size,
            "g_tta_views": q.tta_views,
            "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
            "stopped_early": fit.stopped_early, "train_seconds": round(fit.seconds, 1),
            "train_masks_seen": fit.epochs_run * task.steps_per_epoch() * task.bs * distributed.world_size(),
            **{f"test_{k}": v for k, v in metrics.items()},
            "test_mae_by_category": {k: float(v) for k, v in per_cat["mae"].items()},
            "_reasons": {k: why for k in ("test_pearson", "test_spearman")} if why else {}}


def _real(run: Run, cfg: Config, task: QualityTask, data: D.LabeledData, splits: dict[str, list[str]],
          weak_run: str) -> dict[str, Any]:
    """The best g on the val and test images' real predictions (``qgseg.quality.real_report``) from
    D_Q's train-weak run, else the newest of this data: ``<split>_real_*`` keys and tables."""
    source = Run(weak_run) if weak_run else find_weak_run(cfg, data, False)
    if source is None:
        return {"real_note": "no train-weak run of this data: no real predictions to score"}
    out: dict[str, Any] = {"real_weak_run": str(source.path)}
    for split in ("val", "test"):
        real = load_real_predictions(source, splits[split], data.image_size, "train-weak run")
        metrics, table = real_report(task.g, data, task.case_index[split], splits[split], real, task.device)
        table.to_csv(run.path / f"{split}_real_predictions.csv", index=False)
        out.update({f"{split}_real_{k}": v for k, v in metrics.items()})
    return out


def run_train_quality(loaded, out: Path | str | None = None, resume: bool = False,
                      reporter: Reporter | None = None) -> tuple[Run, dict[str, Any]]:
    """Train the quality predictor g and evaluate it on the test split's corrupted masks."""
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
        data, splits = labeled_and_splits(cfg, run)
        sets, weak_run, rows, resample = _dq(cfg, data, splits, "weak.run" in loaded.explicit)
        q = cfg.quality
        g = (g if g is not None else _build_g(cfg)).to(device)
        if cfg.train.channels_last:
            g = g.to(memory_format=torch.channels_last)
        run.update_meta(parameters={"g": count_parameters(g)}, data=str(data.root), weak_run=weak_run,
                        dq={s: len(c) for s, c in sets.items()})
        task = QualityTask(g, data, rows, sets, q, device, resample=resample)
        opt = torch.optim.AdamW(g.parameters(), lr=q.lr, weight_decay=q.weight_decay, **fused_optimizer(device))
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10, T_mult=2, eta_min=1e-6)
        settings = FitSettings(epochs=q.epochs, patience=q.patience, seed=cfg.seed, grad_clip=q.grad_clip,
                               precision=cfg.train.precision, lr_key="quality.lr")
        fit = fit_and_restore_best(run, task, opt, sched, settings, device, reporter, resuming)
        if fit is None:
            return run, {}  # rank 0 evaluates on test and writes the summary
        summary = _test(run, cfg, task, data, splits["test"], fit)
        summary.update(_real(run, cfg, task, data, splits, weak_run))
        reasons = summary.pop("_reasons")
        summary = run.write_summary(summary, key_metrics=("test_mae", "test_pearson"), reasons=reasons)
        run.set_status("completed")
    return run, summary
