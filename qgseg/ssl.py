"""Phase 2, the ``ssl`` stage: train a segmenter f on labeled + unlabeled images, guided by g.

The task combines, per step,

    total = sup + lambda(e) * reduce(w * unlabeled) + lambda_qar(e) * mean(1 - g(x_u, sigmoid(f(x_u))))

where ``unlabeled`` is the method's per-sample loss (``qgseg/methods``), w is made from
q = g(x_u, pseudolabel) under ``--qw`` by ``ssl.qw_rule`` (detached; quality.qw_weights, ``reduce`` =
quality.weighted_mean) and the QAR term is on when
``ssl.qar_weight`` > 0 (method ``qar``, or ``--qar-weight`` with any method). g is frozen. The
engine does epochs, AdamW + cosine, clipping, autocast, early stopping on val DSC, checkpoints
and resume; at the end the best checkpoint is evaluated on the test split.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qgseg import data as D
from qgseg import distributed
from qgseg.config import Config
from qgseg.engine import FitSettings, Task, epoch_seed, fit_and_restore_best, fused_optimizer, infinite, resolve_device
from qgseg.errors import InputError, ResumeRefused
from qgseg.methods import Context, Method, get_method, qw_methods, ramp_weight
from qgseg.methods.common import EMATeacher
from qgseg.predict import evaluate_predictions, predict_probs, summarise
from qgseg.quality import (
    QualityPredictor,
    g_dataset,
    qw_reduction,
    qw_weights,
    same_dataset,
    weighted_mean,
    weights_sha256,
)
from qgseg.report import Reporter
from qgseg.runs import Run, json_ready, read_json, resolve_link, start_run, write_json

log = logging.getLogger("qgseg")
STAGE = "ssl"
ETA_MIN = 1e-6
NAN = float("nan")
UNLABELED_SALT = 3  # the unlabeled batches' generator: epoch_seed(epoch generator's seed, epoch, 3)


# ---------------------------------------------------------------------------------------------
# checks and links
# ---------------------------------------------------------------------------------------------
def check_config(cfg: Config) -> Method:
    """Usage checks before a run directory is made: method, --qw, image size vs architecture."""
    from qgseg.models import check_image_size

    method = get_method(cfg.ssl.method)
    if cfg.ssl.qw and not method.pseudolabel:
        raise InputError(f"--qw: method {method.name} has no pseudolabels for g to weight; --qw works with "
                         + ", ".join(qw_methods()) + (f" ({method.qw_note})" if method.qw_note else ""))
    check_image_size(cfg.model.arch, cfg.data.image_size)
    return method


def needs_quality(cfg: Config) -> bool:
    return bool(cfg.ssl.qw or cfg.ssl.qar_weight > 0)


def find_quality(cfg: Config) -> str:
    """The train-quality run g comes from, "" for none (checked before a run directory is made).

    An explicit ``ssl.quality`` / ``--quality`` must be a completed run at this image size.
    Otherwise the automatic choice (:func:`qgseg.quality.compatible_quality_runs`, the same as
    ``evaluate``'s) takes the newest completed g at this image size, preferring one trained on
    this data set. --qw and QAR need one; without them g only adds the val/test quality columns.
    """
    from qgseg.config import load_run_config
    from qgseg.quality import compatible_quality_runs, no_compatible_g

    size = cfg.data.image_size
    if cfg.ssl.quality:
        run = resolve_link(cfg.ssl.quality, cfg.runs_root, "train-quality", "--quality")
        g_size = load_run_config(run.path).data.image_size
        if g_size != size:
            raise InputError(f"--quality {run.path}: g was trained at {g_size} px but this run uses "
                             f"data.image_size = {size}; use the same image size or pass another --quality RUN")
        return str(run.path)
    found = compatible_quality_runs([Path(cfg.runs_root)], size, cfg.data.labeled or None)
    if found:
        return str(found[0].path)
    if needs_quality(cfg):
        need = "--qw" if cfg.ssl.qw else ("--method qar" if cfg.ssl.method == "qar" else "--qar-weight")
        raise InputError(f"{need}: needs a quality predictor g, but there is {no_compatible_g([Path(cfg.runs_root)], size)}; "
                         f"run `qgseg train-quality` at {size} px first or pass --quality RUN")
    return ""


# ---------------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------------
class SSLTask(Task):
    """Engine task of the ssl stage (see the module docstring for the loss)."""

    monitor = "val_dsc"
    mode = "max"
    best_modules = ("model",)

    def __init__(self, method: Method, model: nn.Module, extras: dict[str, nn.Module], cfg: Config,
                 train: D.LabeledData, val: D.LabeledData, unlabeled: np.ndarray | None,
                 quality: QualityPredictor | None, device: torch.device):
        self.method = method
        self.model = model
        self.extras = extras
        self.modules: dict[str, nn.Module] = {"model": model, **extras}
        self.cfg = cfg
        self.s = cfg.ssl
        self.val_set = val
        self.quality = quality
        self.device = device
        self.lab_images = torch.from_numpy(train.images)
        self.lab_masks = torch.from_numpy(train.masks)
        self.unl_images = torch.from_numpy(unlabeled) if unlabeled is not None else None
        self.bs_l = min(cfg.train.batch_size, len(train))
        self.bs_u = min(cfg.train.batch_size_unlabeled, len(unlabeled)) if unlabeled is not None else 0
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        if quality is None and needs_quality(cfg):
            raise InputError("--quality: --qw and QAR need a quality predictor g (a train-quality run)")

    # -- schedules ----------------------------------------------------------------------------
    def lambda_unsup(self, epoch: int) -> float:
        if self.method.unlabeled is None:
            return 0.0
        return ramp_weight(epoch, self.s.lambda_final, self.s.warmup, self.s.rampup)

    def lambda_qar(self, epoch: int) -> float:
        return ramp_weight(epoch, self.s.qar_weight, self.s.qar_warmup, self.s.qar_rampup)

    # -- data ---------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        """``train.steps_per_epoch`` when > 0; else ``train.labeled_passes`` passes over the labeled
        set when > 0, else max(labeled, unlabeled) batches; at least ``train.min_steps_per_epoch``."""
        t = self.cfg.train
        if t.steps_per_epoch > 0:
            return t.steps_per_epoch
        world = distributed.world_size()  # under torchrun each rank does its share of the epoch
        if t.labeled_passes > 0:
            steps = math.ceil(t.labeled_passes * len(self.lab_images) / (self.bs_l * world))
        else:
            n_l = max(1, len(self.lab_images) // (self.bs_l * world))
            n_u = max(1, len(self.unl_images) // (self.bs_u * world)) if self.unl_images is not None else 0
            steps = max(n_l, n_u)
        return max(1, steps, t.min_steps_per_epoch)

    def _images(self, u8: torch.Tensor) -> torch.Tensor:
        return D.to_float_images(u8.to(self.device, non_blocking=True))

    def batches(self, epoch: int, generator: torch.Generator):
        """(x_l, y_l, x_u or None) per step; each loader cycles through fresh permutations.

        The unlabeled batches (order and flips) come from a generator of their own, derived from
        the epoch's: every method sees the labeled batches ``sup`` sees at the same seed, so a
        paired difference to ``sup`` measures the unlabeled term, not another data order.
        """
        lab = infinite(lambda g: D.index_batches(len(self.lab_images), self.bs_l, g), generator)
        unl_gen = torch.Generator().manual_seed(epoch_seed(generator.initial_seed(), epoch, UNLABELED_SALT))
        unl = (infinite(lambda g: D.index_batches(len(self.unl_images), self.bs_u, g), unl_gen)
               if self.unl_images is not None else None)
        mf = self.memory_format
        for _ in range(self.steps_per_epoch()):
            il = next(lab)
            x = self._images(self.lab_images[il])
            y = D.to_float_masks(self.lab_masks[il].to(self.device, non_blocking=True))
            x, y = D.random_flip_rot(x, y, generator=generator)
            xu = None
            if unl is not None:
                xu = D.random_flip_rot(self._images(self.unl_images[next(unl)]), generator=unl_gen)
                xu = xu.contiguous(memory_format=mf)
            yield x.contiguous(memory_format=mf), y, xu

    # -- loss ---------------------------------------------------------------------------------
    def loss(self, batch: Any, epoch: int, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The step's loss and its terms (0-d tensors or floats; the engine reads them back lazily)."""
        x, y, xu = batch
        lam, lam_q = self.lambda_unsup(epoch), self.lambda_qar(epoch)
        sup = self.method.supervised_loss(self.model, self.extras, x, y)
        total = sup
        terms: dict[str, Any] = {"sup": sup.detach(), "unsup": NAN, "qar": NAN, "lambda": lam,
                                   "lambda_qar": lam_q, "qw_mean": NAN, "qw_nonzero": NAN, "q_mean": NAN,
                                   "q_std": NAN}
        out = None
        if lam > 0 and xu is not None:
            ramp = lam / self.s.lambda_final
            assert self.method.unlabeled is not None
            out = self.method.unlabeled(Context(self.model, self.extras, self.cfg, epoch, ramp), xu)
            unsup, weights, scores = self._reduce(out.parts)
            total = total + lam * unsup
            terms["unsup"] = unsup.detach()
            if weights is not None:
                terms["qw_mean"] = weights.detach().mean()
                terms["qw_nonzero"] = (weights > 0).float().mean()
                terms["q_mean"], terms["q_std"] = scores.mean(), scores.std(correction=0)
            terms.update(out.terms)
        if lam_q > 0 and xu is not None:
            assert self.quality is not None
            pairs = out.student if out is not None and out.student is not None else [(xu, self.model(xu))]
            qar = torch.stack([self.quality.qar_loss(img, torch.sigmoid(logits.float())).mean()
                               for img, logits in pairs]).mean()
            total = total + lam_q * qar
            terms["qar"] = qar.detach()
        terms["total"] = total.detach()
        return total, terms

    def _reduce(self, parts) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Sum over parts of reduce(w * loss), w from g's scores q = g(image, pseudolabel) under --qw
        by ``ssl.qw_rule`` (quality.qw_weights); returns it with the weights and scores (None without --qw)."""
        total, weights, scores = 0.0, [], []
        s = self.s
        for part in parts:
            w = None
            if s.qw:
                assert self.quality is not None
                q = self.quality.score(part.image.detach(), part.pseudolabel.detach()).clone()
                w = qw_weights(q, s.qw_rule, s.qw_form, s.qw_temperature, s.qw_threshold, s.qw_reject)
                weights.append(w)
                scores.append(q)
            total = total + weighted_mean(part.loss.float(), w, qw_reduction(s.qw_rule, s.qw_form))
        if not parts:
            total = torch.zeros((), device=self.device)
        if not weights:
            return total, None, None
        return total, torch.cat(weights), torch.cat(scores)

    def after_step(self, step: int) -> None:
        for m in self.extras.values():
            if isinstance(m, EMATeacher):
                m.update(self.model)

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, epoch: int) -> dict[str, float]:
        probs = predict_probs(self.model, self.val_set.images, self.device, batch_size=self.cfg.train.batch_size)
        df = evaluate_predictions(self.val_set, probs, quality=self.quality, device=self.device, with_hd95=False)
        out = {"val_dsc": float(df["dsc"].mean()), "val_iou": float(df["iou"].mean())}
        if "pred_quality" in df:
            out["val_quality"] = float(df["pred_quality"].mean())
            q, d = df["pred_quality"].to_numpy(float), df["dsc"].to_numpy(float)
            out["val_quality_corr"] = (float(np.corrcoef(q, d)[0, 1]) if len(df) > 2 and q.std() > 0 and d.std() > 0
                                       else NAN)
        return out

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # AveragedModel's update count is not part of the checkpointed inner network
        return {"ema_updates": {k: int(m.n_averaged) for k, m in self.extras.items() if isinstance(m, EMATeacher)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, n in (state or {}).get("ema_updates", {}).items():
            if isinstance(self.extras.get(k), EMATeacher):
                self.extras[k].n_averaged.fill_(int(n))


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def build_optimizer(task: SSLTask, cfg: Config) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over f and the method's trained extras; cosine over train.epochs (eta_min 1e-6)."""
    trained = [task.model] + [task.extras[k] for k in task.method.trained]
    opt = torch.optim.AdamW([p for m in trained for p in m.parameters() if p.requires_grad], lr=cfg.train.lr,
                            weight_decay=cfg.train.weight_decay, **fused_optimizer(task.device))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.train.epochs, eta_min=ETA_MIN)
    return opt, sched


def _splits(run: Run, data: D.LabeledData, cfg: Config) -> dict[str, list[str]]:
    path = run.path / "splits.json"
    if path.is_file():  # a resumed run keeps its splits
        return read_json(path)
    splits = D.run_splits(data.stems, cfg.data.split_seed, data.root, cfg.data.max_labeled)
    write_json(path, splits)
    return splits


def ramps_end(method: Method, cfg: Config) -> int:
    """The epoch from which every loss term of the run is at full weight (0 for sup): early
    stopping waits ``train.patience`` epochs past it, so a semi-supervised run is never judged
    (and stopped) before its unlabeled term has been fully on for that long."""
    ends = [0]
    if method.unlabeled is not None and cfg.ssl.lambda_final > 0:
        ends.append(cfg.ssl.warmup + cfg.ssl.rampup)
    if cfg.ssl.qar_weight > 0:
        ends.append(cfg.ssl.qar_warmup + cfg.ssl.qar_rampup)
    return max(ends)


def _unlabeled_images(cfg: Config, data: D.LabeledData, splits: dict[str, list[str]]) -> np.ndarray:
    """The unlabeled images: data.unlabeled's folder (data.max_unlabeled applies to it) and, with
    data.unused_as_unlabeled, the labeled training cases data.max_labeled left out (masks unread)."""
    parts = []
    if cfg.data.unlabeled or not cfg.data.unused_as_unlabeled:
        parts.append(D.load_unlabeled(cfg.data.unlabeled, cfg.data.image_size, cfg.data.cache_dir,
                                      limit=cfg.data.max_unlabeled, seed=cfg.seed).images)
    if cfg.data.unused_as_unlabeled:
        unused = splits.get("unused", [])
        if not unused:
            raise InputError(f"data.unused_as_unlabeled: data.max_labeled = {cfg.data.max_labeled} keeps every one of "
                             f"the {len(splits['train'])} training cases, so none is left to use as unlabeled; "
                             "set data.max_labeled below the training split's size")
        parts.append(data.subset(unused).images)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _unlabeled_source(cfg: Config) -> str:
    """The run's unlabeled images in words (meta.json)."""
    rest = f"{cfg.data.labeled} (training cases left out by data.max_labeled)" if cfg.data.unused_as_unlabeled else ""
    return " + ".join(x for x in (str(cfg.data.unlabeled) if cfg.data.unlabeled else "", rest) if x)


def _load_quality(link: str, cfg: Config, option: str = "--quality") -> QualityPredictor | None:
    """Load g; a g that is only wanted for the quality columns may fail to load (then: none)."""
    if not link:
        return None
    try:
        g = QualityPredictor.from_run(link, cfg.data.image_size, option=option)
    except InputError as e:
        if needs_quality(cfg) or cfg.ssl.quality:
            raise
        log.warning("val/test quality columns off: %s", e)
        return None
    return g.with_views(cfg.ssl.quality_views) if cfg.ssl.quality_views else g


def _build_model(cfg: Config) -> nn.Module:
    from qgseg.models import build_segmenter

    torch.manual_seed(cfg.seed)
    return build_segmenter(cfg.model.arch, cfg.model.encoder, cfg.model.weights_file)


def _test(run: Run, task: SSLTask, test: D.LabeledData, fit: Any, facts: dict[str, Any]) -> dict[str, Any]:
    """The best f on the test split: ``test_cases.csv`` and the run's summary (``facts``: parameters and g)."""
    cfg, model = task.cfg, task.model
    probs = predict_probs(model, test.images, task.device, batch_size=cfg.train.batch_size)
    cases = evaluate_predictions(test, probs, quality=task.quality, device=task.device, with_hd95=True)
    cases.to_csv(run.path / "test_cases.csv", index=False)
    summary: dict[str, Any] = {
        "run": str(run.path), "stage": STAGE, "method": task.method.name, "qw": cfg.ssl.qw,
        "qw_rule": cfg.ssl.qw_rule if cfg.ssl.qw else "",
        "qar_weight": cfg.ssl.qar_weight, "arch": model_spec(model)["arch"], "encoder": model_spec(model)["encoder"],
        "parameters": facts["parameters"], "image_size": cfg.data.image_size, "quality_run": facts["quality_run"],
        "quality_views": facts["quality_views"], "quality_sha256": facts["quality_sha256"],
        "quality_data": facts["quality_data"],
        "n_train": len(task.lab_images), "n_val": len(task.val_set), "n_test": len(test),
        "n_unlabeled": 0 if task.unl_images is None else len(task.unl_images),
        "best_epoch": fit.best_epoch, "best_val_dsc": fit.best_value, "epochs_run": fit.epochs_run,
        "stopped_early": fit.stopped_early, "train_seconds": round(fit.seconds, 2),
    }
    summary.update(summarise(cases, "test"))
    summary["test_hd95_undefined"] = int(cases["hd95"].isna().sum())
    return json_ready(summary)


def run_ssl(loaded, out: Path | str | None = None, resume: bool = False,
            reporter: Reporter | None = None) -> tuple[Run, dict[str, Any]]:
    """Train f with an SSL method (``ssl.method``, ``ssl.qw``, ``ssl.qar_weight``); evaluate on test.

    ``resume`` continues the unfinished run at ``out`` (default: the newest unfinished ssl run)
    with its saved configuration and the g it started with.
    """
    from qgseg.models import count_parameters

    distributed.setup(loaded.config.device)
    quality_run, model = "", None
    warnings: list[str] = []
    if not resume:  # usage errors (method, --qw, g, architecture) before a run directory exists
        check_config(loaded.config)
        from qgseg.checks import schedule_warnings

        warnings = schedule_warnings(loaded.config)
        for w in warnings:
            log.warning("%s", w)
        quality_run = find_quality(loaded.config)
        model = _build_model(loaded.config)
    device = distributed.local_device(resolve_device(loaded.config.device))
    run, cfg, resuming = start_run(STAGE, loaded, out, resume, device=str(device),
                                   name=loaded.config.ssl.method + ("-qw" if loaded.config.ssl.qw else ""))
    with run.guard():
        method = check_config(cfg)
        option = "--quality" if cfg.ssl.quality else "g (the newest compatible train-quality run)"
        if resuming and "quality_run" in run.meta:  # the g the run started with, not a newer one
            quality_run, option = run.meta["quality_run"], f"g of {run.path} (recorded in meta.json)"
        elif resuming:  # stopped before it recorded g, so nothing was trained with one: choose as a new run does
            quality_run = find_quality(cfg)
        quality = _load_quality(quality_run, cfg, option)
        quality_run = quality.source if quality is not None else ""
        quality_views = quality.net.views if quality is not None else 0
        quality_sha = weights_sha256(quality.net.state_dict()) if quality is not None else ""
        recorded = run.meta.get("quality_sha256", "") if resuming else ""
        if recorded and quality_sha != recorded:
            raise ResumeRefused(f"--resume {run.path}: g changed since the run started ({quality_run or 'gone'}: "
                                f"weights sha256 {quality_sha[:12] or '-'}, the run started with {recorded[:12]}); "
                                "resuming with another g would mix two runs: restore that g or start a new run")
        run.update_meta(quality_run=quality_run, quality_views=quality_views, quality_sha256=quality_sha,
                        quality_data=g_dataset(quality_run) if quality_run else "")
        if quality is None and needs_quality(cfg):
            raise InputError(f"--resume {run.path}: the run records no quality predictor g")
        quality = quality.to(device) if quality is not None else None
        data = D.load_labeled(cfg.data.labeled, cfg.data.image_size, cfg.data.cache_dir)
        g_warning = ""
        if quality_run and same_dataset(quality_run, data.root, data.stems) is False:
            g_warning = (f"g ({quality_run}) was trained on {g_dataset(quality_run)}, this run uses {data.root}: "
                         "its quality scores may not transfer to this data set")
            log.warning("%s", g_warning)
        splits = _splits(run, data, cfg)
        train, val, test = (data.subset(splits[k]) for k in ("train", "val", "test"))
        unlabeled = None
        if method.unlabeled is not None or cfg.ssl.qar_weight > 0:
            unlabeled = _unlabeled_images(cfg, data, splits)

        model = (model if model is not None else _build_model(cfg)).to(device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        extras = method.build_modules(model, cfg)
        params = {"model": count_parameters(model)}
        params.update({k: count_parameters(m) for k, m in extras.items() if k in method.trained})
        run.update_meta(parameters=params, parameters_trained=sum(params.values()), method=method.name,
                        qw=cfg.ssl.qw, qar_weight=cfg.ssl.qar_weight, arch=model.spec["arch"],
                        encoder=model.spec["encoder"], data=str(data.root),
                        unlabeled=_unlabeled_source(cfg) if unlabeled is not None else "")
        if cfg.train.compile:
            model = torch.compile(model)
        task = SSLTask(method, model, extras, cfg, train, val, unlabeled, quality, device)
        opt, sched = build_optimizer(task, cfg)
        settings = FitSettings(epochs=cfg.train.epochs, patience=cfg.train.patience, seed=cfg.seed,
                               grad_clip=cfg.train.grad_clip, precision=cfg.train.precision,
                               min_epochs=ramps_end(method, cfg) + cfg.train.patience if cfg.train.stop_after_ramps else 0)
        fit = fit_and_restore_best(run, task, opt, sched, settings, device, reporter, resuming)
        if fit is None:
            return run, {}  # rank 0 evaluates on test and writes the summary
        summary = _test(run, task, test, fit, {"parameters": params["model"], "quality_run": quality_run,
                                               "quality_views": quality_views, "quality_sha256": quality_sha,
                                               "quality_data": g_dataset(quality_run) if quality_run else ""})
        summary["unlabeled_term_epochs"] = sum(1 for r in fit.history if float(r.get("lambda", 0) or 0) > 0)
        summary["qar_term_epochs"] = sum(1 for r in fit.history if float(r.get("lambda_qar", 0) or 0) > 0)
        warnings += [g_warning] if g_warning else []
        if warnings:
            summary["warnings"] = warnings
        summary = run.write_summary(summary, key_metrics=("test_dsc", "best_val_dsc"))
        run.set_status("completed")
    return run, summary


def model_spec(model: nn.Module) -> dict:
    from qgseg.models import uncompiled

    return dict(getattr(uncompiled(model), "spec", {}))
