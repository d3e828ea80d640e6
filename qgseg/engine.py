"""The one training loop shared by train-weak, train-quality and ssl.

A stage supplies a :class:`Task` (its modules, batches, loss, evaluation); the engine does the
rest: epochs, autocast, gradient clipping, optimiser and scheduler steps, per-step hooks (EMA),
evaluation, early stopping, ``last.pt`` / ``best.pt`` checkpoints, metrics.csv and resume.

Determinism and resume: every epoch reseeds torch's global generator and the task's data
generator from ``(seed, epoch)``, so a run resumed from the checkpoint of epoch ``e`` continues
exactly as the uninterrupted run would have. Checkpoints hold only tensors and primitive types
and are loaded with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from qgseg import distributed
from qgseg.errors import CheckpointDamaged, InputError, QgsegError, ResumeRefused, TrainingDiverged
from qgseg.report import Reporter
from qgseg.runs import Run, atomic_write_bytes, atomic_write_text

log = logging.getLogger("qgseg")
CHECKPOINT_FORMAT = 1


# ---------------------------------------------------------------------------------------------
# devices, precision, seeding
# ---------------------------------------------------------------------------------------------
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available. Asking for CUDA without it is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    return torch.device("cpu")


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA by default; fp32 on the CPU unless asked otherwise."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    """A 63-bit seed derived from (seed, epoch, salt)."""
    return int(np.random.SeedSequence([seed, epoch, salt]).generate_state(2, np.uint32).astype(np.uint64)
               .dot(np.array([1, 1 << 31], dtype=np.uint64)) % (1 << 62))


# ---------------------------------------------------------------------------------------------
# the task protocol
# ---------------------------------------------------------------------------------------------
class Task:
    """What a stage gives the engine: subclass it, set the attributes, write the four methods
    that raise here; the hooks are no-ops unless a stage needs them."""

    modules: dict[str, nn.Module]  # everything checkpointed (trained or not, e.g. an EMA teacher)
    best_modules: tuple[str, ...]  # what best.pt keeps (e.g. ("model",))
    monitor: str  # key of evaluate()'s result used for early stopping and best.pt
    mode: str  # "max" or "min"

    def batches(self, epoch: int, generator: torch.Generator) -> Iterable[Any]:
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def loss(self, batch: Any, epoch: int, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def evaluate(self, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    # -- hooks ----------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        """Before an epoch's first batch (modules already in train mode)."""

    def after_step(self, step: int) -> None:
        """After each optimiser step (e.g. an EMA teacher's update)."""

    def on_epoch_end(self, epoch: int) -> None:
        """After an epoch's evaluation, before its checkpoints are written."""

    def state_dict(self) -> dict[str, Any]:
        """What the task itself needs to resume (saved in last.pt)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s result on resume."""


def fused_optimizer(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for torch's Adam / AdamW: the fused kernels on CUDA (one launch for all
    parameters); torch's default elsewhere (on the CPU the fused step measured no faster here)."""
    return {"fused": True} if device.type == "cuda" else {}


@dataclass
class FitSettings:
    epochs: int
    patience: int
    seed: int
    grad_clip: float = 1.0
    precision: str = "auto"
    scheduler_interval: str = "epoch"  # "epoch" or "step"
    stop_after_epoch: int = 0  # testing aid: raise KeyboardInterrupt after this epoch (0 = off)
    min_epochs: int = 0  # early stopping never ends the run before this epoch
    lr_key: str = "train.lr"  # the config key to name when training diverges


@dataclass
class FitResult:
    best_epoch: int
    best_value: float
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path | str, what: str = "checkpoint") -> dict[str, Any]:
    """Load with ``weights_only=True``: a checkpoint carrying code is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        text = " ".join(str(e).split()) or type(e).__name__
        if "weights_only" in text or "Weights only load failed" in text:  # it holds code or other objects
            first = text.split(" In PyTorch 2.6", 1)[0].split(" Re-running `torch.load`", 1)[0]
            raise InputError(f"{what} {path}: refused: it holds more than tensors and plain values ({first}); "
                             "only those are loaded (weights_only=True)") from None
        # a truncated or overwritten file: say so, with torch's whole first sentence
        first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
        raise CheckpointDamaged(f"{what} {path}: damaged or incomplete file ({type(e).__name__}: {first}), "
                                f"e.g. cut short by a full disk or a copy that did not finish") from None


def module_specs(modules: dict[str, nn.Module]) -> dict[str, dict]:
    return {k: dict(getattr(m, "spec", {}) or {}) for k, m in modules.items()}


def _unwrap(m: nn.Module) -> nn.Module:
    from qgseg.models import uncompiled

    m = uncompiled(m)
    return getattr(m, "module", m)  # DDP / AveragedModel


def load_modules(modules: dict[str, nn.Module], state: dict[str, dict], source: str) -> None:
    for name, m in modules.items():
        if name not in state:
            raise InputError(f"{source}: no weights for '{name}' in the checkpoint")
        try:
            _unwrap(m).load_state_dict(state[name])
        except RuntimeError as e:
            msg = str(e).splitlines()[0]
            raise InputError(f"{source}: weights for '{name}' do not fit this architecture ({msg[:200]})") from None


def saved_module(path: Path | str, name: str, label: str, what: str = "checkpoint",
                 where: str | None = None) -> tuple[dict[str, Any], dict]:
    """(checkpoint, saved spec of its module ``name``); InputError when the file holds no such module.

    ``label`` names the module in the message ("quality predictor"), ``where`` the file (default:
    its path and a colon); ``what`` is passed to :func:`load_checkpoint`.
    """
    ck = load_checkpoint(path, what)
    spec = (ck.get("specs") or {}).get(name)
    if not spec or name not in (ck.get("modules") or {}):
        raise InputError(f"{where or f'{path}:'} holds no {label} '{name}'")
    return ck, spec


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
class Engine:
    """Runs a Task for a number of epochs with checkpoints, early stopping and resume."""

    def __init__(self, run: Run, task: Task, optimizer: torch.optim.Optimizer,
                 scheduler: Any, settings: FitSettings, device: torch.device,
                 reporter: Reporter | None = None, is_main: bool | None = None):
        self.run = run
        self.task = task
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.s = settings
        self.device = device
        self.is_main = distributed.is_main_process() if is_main is None else is_main
        self.reporter = reporter if reporter is not None and self.is_main else Reporter(enabled=False, quiet=True)
        self.scaler = torch.amp.GradScaler(device.type) if settings.precision == "fp16" else None
        self.epoch = 0
        self.step = 0
        self.best = -math.inf if task.mode == "max" else math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.history: list[dict[str, float]] = []

    # -- state --------------------------------------------------------------------------------
    def _payload(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "step": self.step,
            "modules": {k: _unwrap(m).state_dict() for k, m in self.task.modules.items()},
            "specs": module_specs({k: _unwrap(m) for k, m in self.task.modules.items()}),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "best": float(self.best),
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "task": self.task.state_dict(),
        }

    def _restore(self, ck: dict[str, Any], source: str) -> None:
        load_modules(self.task.modules, ck["modules"], source)
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.scheduler is not None and ck.get("scheduler"):
            self.scheduler.load_state_dict(ck["scheduler"])
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        if ck.get("task") is not None:
            self.task.load_state_dict(ck["task"])
        self.epoch = int(ck["epoch"])
        self.step = int(ck["step"])
        self.best = float(ck["best"])
        self.best_epoch = int(ck["best_epoch"])
        self.bad_epochs = int(ck["bad_epochs"])
        self.history = list(ck["history"])

    def save_last(self) -> None:
        if self.is_main:
            save_checkpoint(self.run.checkpoints / "last.pt", self._payload())

    def save_best(self) -> None:
        if not self.is_main:
            return
        mods = {k: _unwrap(self.task.modules[k]) for k in self.task.best_modules}
        save_checkpoint(self.run.checkpoints / "best.pt", {
            "format": CHECKPOINT_FORMAT, "epoch": self.epoch, "monitor": self.task.monitor,
            "value": float(self.best), "modules": {k: m.state_dict() for k, m in mods.items()},
            "specs": module_specs(mods)})

    def plot_curves(self) -> None:
        """plots/learning_curves.png from the metrics history (best effort: a plot never fails a run)."""
        if not self.is_main or not self.history:
            return
        try:
            from qgseg import plots

            plots.learning_curves(self.history, self.run.plots / "learning_curves.png",
                                  title=f"{self.run.stage or 'run'} {self.run.path.name}")
        except Exception as e:  # noqa: BLE001
            log.warning("%s: learning curves not drawn (%s)", self.run.path, e)

    def write_metrics(self) -> None:
        if not self.is_main:
            return
        if not self.history:
            (self.run.path / "metrics.csv").unlink(missing_ok=True)
            return
        cols: list[str] = []
        for row in self.history:
            cols += [c for c in row if c not in cols]
        lines = [",".join(cols)]
        for row in self.history:
            lines.append(",".join(_csv(row.get(c, "")) for c in cols))
        atomic_write_text(self.run.path / "metrics.csv", "\n".join(lines) + "\n")

    # -- training ------------------------------------------------------------------------------
    def _patience_spent(self) -> bool:
        """Early stopping: ``patience`` epochs without a gain, and at least ``min_epochs`` run."""
        return self.bad_epochs >= self.s.patience and self.epoch >= self.s.min_epochs

    def fit(self, resume: bool = False) -> FitResult:
        last = self.run.checkpoints / "last.pt"
        if resume and last.is_file():
            try:
                ck = load_checkpoint(last, "resume checkpoint")
            except CheckpointDamaged as e:
                raise ResumeRefused(f"{e}; cannot resume from it. {self._best_note()}") from None
            self._restore(ck, str(last))
            # metrics.csv may hold rows of an epoch that was killed before its last.pt: the
            # checkpoint's history is the truth
            self.write_metrics()
            log.info("resuming %s after epoch %d", self.run.path, self.epoch)
            if self.epoch > 0:
                self.reporter.note(f"resumed after epoch {self.epoch} (best {self.task.monitor} "
                                   f"{self.best:.4f} at epoch {self.best_epoch})")
        else:
            for m in self.task.modules.values():  # every rank starts from rank 0's weights
                distributed.broadcast_module(m)
            self.save_last()  # epoch 0: the initial weights, so a resume always has a start
        t0 = time.time()
        stopped_early = self._patience_spent()
        total_steps = self.s.epochs * self.task.steps_per_epoch()
        self.reporter.start(self.run.stage or "train", total_steps, completed=self.epoch * self.task.steps_per_epoch(),
                            epochs=self.s.epochs)
        while self.epoch < self.s.epochs and not stopped_early:
            epoch = self.epoch + 1
            row = distributed.mean_over_processes(self._train_epoch(epoch))
            self._check_finite(epoch)
            for m in self.task.modules.values():
                distributed.broadcast_module(m, buffers_only=True)  # same BatchNorm stats on every rank
                m.eval()
            with torch.no_grad():
                row.update(self.task.evaluate(epoch))
            value = float(row[self.task.monitor])
            improved = value > self.best if self.task.mode == "max" else value < self.best
            if math.isnan(value):
                improved = False
            self.epoch = epoch
            self.task.on_epoch_end(epoch)
            if improved:
                self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
                self.save_best()
            else:
                self.bad_epochs += 1
            row = {"epoch": epoch, **row, "lr": self.optimizer.param_groups[0]["lr"],
                   "seconds": round(time.time() - t0, 3)}
            if self.scheduler is not None and self.s.scheduler_interval == "epoch":
                self.scheduler.step()
            self.history.append(row)
            self.save_last()
            self.write_metrics()
            # a term that is not on (NaN: e.g. the unlabeled loss during the warm-up) is left out
            shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                              if k not in ("epoch", "seconds", "lr") and isinstance(v, float) and math.isfinite(v))
            self.reporter.note(f"epoch {epoch}/{self.s.epochs}: {shown}")
            self.run.log(f"epoch {epoch}: {shown}")
            stopped_early = self._patience_spent()
            if self.s.stop_after_epoch and epoch == self.s.stop_after_epoch:
                raise KeyboardInterrupt
        if self.best_epoch == 0:
            # nothing improved (e.g. all NaN evaluations): keep the final weights as best
            self.save_best()
        self.plot_curves()
        return FitResult(self.best_epoch, self.best, self.epoch, stopped_early, self.history,
                         time.time() - t0)

    def _best_note(self) -> str:
        """What is still there when last.pt cannot be used: best.pt (weights only) and its epoch."""
        best = self.run.checkpoints / "best.pt"
        try:
            ck = load_checkpoint(best, "best checkpoint")
        except InputError:
            return "There is no readable best.pt either; start a new run"
        return (f"{best} (epoch {ck.get('epoch', '?')}) is intact: `qgseg evaluate {self.run.path}` uses it; to "
                "train further start a new run")

    def _check_finite(self, epoch: int) -> None:
        """Refuse to checkpoint non-finite weights: the loss of an epoch's last step can be finite
        while its update made the weights inf/NaN, and last.pt must stay the last good state."""
        for name, m in self.task.modules.items():
            for what, t in [*m.named_parameters(), *m.named_buffers()]:
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise TrainingDiverged(
                        f"weights became non-finite at epoch {epoch} ({name}.{what}); the last good checkpoint "
                        f"is {self.run.checkpoints / 'last.pt'} (epoch {self.epoch}); {self._lr_hint()}")

    def _lr_hint(self) -> str:
        group = self.optimizer.param_groups[0]
        lr = group.get("initial_lr", group["lr"])
        return f"start a new run with a lower {self.s.lr_key} (this run: {lr:g})"

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        torch.manual_seed(epoch_seed(self.s.seed, epoch, 1))
        gen = torch.Generator().manual_seed(epoch_seed(self.s.seed, epoch, 2))
        for m in self.task.modules.values():
            m.train()
        self.task.on_epoch_start(epoch)
        terms_log = TermLog(self.device)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for batch in self.task.batches(epoch, gen):
            with autocast(self.device, self.s.precision):
                loss, terms = self.task.loss(batch, epoch, self.step)
            terms_log.add(loss, terms)
            if terms_log.due():  # on CUDA every SYNC_EVERY steps, not every step
                self._check_loss(terms_log, epoch)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            distributed.average_gradients(params)
            if self.s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, self.s.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.step += 1
            if self.scheduler is not None and self.s.scheduler_interval == "step":
                self.scheduler.step()
            self.task.after_step(self.step)
            self.reporter.advance(1, info=terms_log.info(epoch))
        self._check_loss(terms_log, epoch)
        return terms_log.means()

    def _check_loss(self, terms_log: "TermLog", epoch: int) -> None:
        bad = terms_log.first_nonfinite()
        # under torchrun every process must stop at the same check, or the others would wait
        # forever in the next gradient all-reduce
        if distributed.any_process(bad is not None):
            step, value = bad if bad is not None else (self.step + 1, "non-finite on another process")
            raise TrainingDiverged(
                f"loss became {value} at epoch {epoch}, step {step}; the last good "
                f"checkpoint is {self.run.checkpoints / 'last.pt'} (epoch {self.epoch}); {self._lr_hint()}")


SYNC_EVERY = 25  # on CUDA, read the logged terms back to the host once every this many steps


class TermLog:
    """An epoch's per-step loss terms, kept as tensors on the device until they are needed.

    A task's terms may be floats or 0-d tensors. Reading a CUDA tensor back (``float(t)``) waits
    for the GPU, so on CUDA the terms are stacked and copied to the host once every SYNC_EVERY
    steps (and at the end of the epoch) instead of several times a step; the loss's finiteness is
    checked at the same points. On the CPU reading is free and the loss is checked every step.
    """

    def __init__(self, device: torch.device):
        self.lazy = device.type == "cuda"
        self.pending: list[tuple[int, torch.Tensor, dict[str, Any]]] = []
        self.sums: dict[str, float] = {}
        self.n = 0
        self.steps = 0
        self.last_loss = math.nan
        self.bad: tuple[int, float] | None = None

    def add(self, loss: torch.Tensor, terms: dict[str, Any]) -> None:
        self.steps += 1
        self.pending.append((self.steps, loss.detach(), terms))

    def due(self) -> bool:
        return not self.lazy or len(self.pending) >= SYNC_EVERY

    def _flush(self) -> None:
        if not self.pending:
            return
        # every pending tensor (each step's loss, then its tensor terms in dict order) in one copy
        flat = []
        for _, loss, terms in self.pending:
            flat.append(loss)
            flat += [v for v in terms.values() if torch.is_tensor(v)]
        values = iter(torch.stack([t.detach().float().reshape(()) for t in flat]).cpu().tolist())
        keys = sorted({k for _, _, t in self.pending for k in t})
        for step, _, terms in self.pending:
            loss = next(values)
            if self.bad is None and not math.isfinite(loss):
                self.bad = (step, loss)
            self.last_loss = loss
            got = {k: next(values) if torch.is_tensor(v) else float(v) for k, v in terms.items()}
            for k in keys:  # a term missing from a step makes its mean NaN
                self.sums[k] = self.sums.get(k, 0.0) + got.get(k, math.nan)
        self.n += len(self.pending)
        self.pending = []

    def first_nonfinite(self) -> tuple[int, float] | None:
        self._flush()
        return self.bad

    def info(self, epoch: int) -> str:
        if not self.lazy:
            self._flush()
        return f"epoch {epoch} loss {self.last_loss:.4f}"

    def means(self) -> dict[str, float]:
        self._flush()
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}


def _csv(v: Any) -> str:
    if isinstance(v, float):
        return repr(round(v, 6)) if math.isfinite(v) else ("nan" if math.isnan(v) else repr(v))
    return str(v)


def read_metrics(run_dir: Path | str) -> list[dict[str, str]]:
    import csv

    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def infinite(loader_fn, generator: torch.Generator) -> Iterator[Any]:
    """Cycle a finite batch iterator factory forever (the shorter loader of an SSL epoch)."""
    while True:
        empty = True
        for b in loader_fn(generator):
            empty = False
            yield b
        if empty:
            raise QgsegError("empty data loader")


def fit_and_restore_best(run: Run, task: Task, optimizer: torch.optim.Optimizer, scheduler: Any,
                         settings: FitSettings, device: torch.device, reporter: Reporter | None,
                         resume: bool) -> FitResult | None:
    """Fit the task, then load best.pt's ``best_modules`` back into it for the stage's test.

    Under torchrun every rank fits; afterwards only rank 0 goes on (the others get None and stop:
    rank 0 tests and writes the summary).
    """
    with (reporter or Reporter(enabled=False)) as rep:
        fit = Engine(run, task, optimizer, scheduler, settings, device, rep).fit(resume=resume)
    distributed.barrier()
    if not distributed.is_main_process():
        return None
    path = run.checkpoints / "best.pt"
    best = load_checkpoint(path, "best checkpoint")
    load_modules({k: task.modules[k] for k in task.best_modules}, best["modules"], str(path))
    return fit
