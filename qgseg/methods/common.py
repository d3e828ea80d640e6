"""Machinery shared by the SSL methods: the method record, EMA teacher, input noise, ramps.

A method (one file in this package) supplies only what differs between methods: its
per-sample unlabeled loss, the pseudolabel g judges under ``--qw``, and its extra modules.
The ssl task (``qgseg/ssl.py``) does the rest: supervised loss, QW weighting and reduction,
QAR, lambda ramps, EMA updates, optimisation, evaluation and checkpoints.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from qgseg.losses import seg_loss

if TYPE_CHECKING:  # annotations only: config.py reads the method registry
    from qgseg.config import Config

EMA_RAMP_UPDATES = 1000  # the teacher's decay ramps 0.5 -> ssl.ema_decay over this many updates
NOISE_STD, NOISE_CLIP = 0.1, 0.2  # teacher input noise (normalised image units), as in UA-MT


# ---------------------------------------------------------------------------------------------
# what a method hands the task
# ---------------------------------------------------------------------------------------------
@dataclass
class Part:
    """One per-sample unlabeled loss and the pseudolabel (with its image) that g judges for it.

    With ``--qw`` the task weights ``loss`` by w = g(image, pseudolabel) (detached). Most methods
    return one part; CPS returns one per network (w_{j,k} = g(x, pseudolabel of net k)).
    """

    loss: torch.Tensor  # (B,) per-sample unlabeled loss
    pseudolabel: torch.Tensor  # (B,1,H,W) {0,1}
    image: torch.Tensor  # (B,3,H,W) normalised: what the pseudolabel segments


@dataclass
class Step:
    """A method's unlabeled output for one batch."""

    parts: list[Part] = field(default_factory=list)
    # (image, student logits) pairs QAR can reuse; None = the task runs f(x_u) itself
    student: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    terms: dict[str, Any] = field(default_factory=dict)  # extra logged values (floats or 0-d tensors)


@dataclass
class Context:
    """What a method's ``unlabeled`` function may use."""

    model: nn.Module  # the student f
    modules: dict[str, nn.Module]  # the extra modules the method built (teacher, peer, proj)
    cfg: Config  # the whole run configuration (methods read cfg.ssl)
    epoch: int
    ramp: float  # 0..1 position of the unlabeled-weight ramp (lambda(e) / lambda_final)


@dataclass(frozen=True)
class Method:
    """An SSL method: everything the package knows about it. Register it in ``qgseg/methods/__init__.py``.

    name: ``ssl.method`` / ``--method`` value; label: its name in tables (default: NAME in capitals).
    description: one line for help texts and docs.
    unlabeled(ctx, x_u) -> Step: the per-sample unlabeled loss(es) and pseudolabel(s) for a
        batch of normalised, augmented unlabeled images (B,3,H,W). None = no unlabeled term.
    build(model, cfg) -> dict of extra modules, given the student (already on its device) and the
        run's Config.
    trained: which extra modules the optimiser trains (the rest, e.g. an EMA teacher, are only
        checkpointed).
    supervised(model, modules, x_l, y_l) -> (B,) labeled loss; default l_seg of f.
    pseudolabel: whether g can judge its pseudolabels (``--qw`` allowed); qw_note says why not.
    defaults: config values this method brings (``{"ssl.qar_weight": 0.01}``), used where the
        configuration leaves the key at its built-in default.
    positive: config keys that must be > 0 with this method.
    """

    name: str
    description: str
    unlabeled: Callable[[Context, torch.Tensor], Step] | None = None
    build: Callable[[nn.Module, Config], dict[str, nn.Module]] | None = None
    trained: tuple[str, ...] = ()
    supervised: Callable[[nn.Module, dict[str, nn.Module], torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    pseudolabel: bool = True
    label: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)
    positive: tuple[str, ...] = ()
    qw_note: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", self.name.upper())

    def build_modules(self, model: nn.Module, cfg: Config) -> dict[str, nn.Module]:
        return dict(self.build(model, cfg)) if self.build is not None else {}

    def supervised_loss(self, model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor,
                        y: torch.Tensor) -> torch.Tensor:
        """Mean labeled loss (a scalar)."""
        if self.supervised is not None:
            return self.supervised(model, modules, x, y).mean()
        return seg_loss(model(x), y).mean()


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------
def ramp_weight(epoch: int, final: float, warmup: int, rampup: int) -> float:
    """Weight of a loss term at (1-based) ``epoch``.

    lambda(e) = 0 for e <= warmup; then it rises linearly, lambda(e) = final * (e - warmup) /
    rampup, until it reaches ``final`` at e = warmup + rampup, and stays there. rampup = 0 jumps
    to ``final`` right after the warm-up.
    """
    if epoch <= warmup or final == 0:
        return 0.0
    if rampup <= 0:
        return float(final)
    return float(final) * min(1.0, (epoch - warmup) / rampup)


def ema_decay_at(updates: int, final: float, ramp_updates: int = EMA_RAMP_UPDATES) -> float:
    """EMA decay after ``updates`` teacher updates: linear 0.5 -> ``final`` over ``ramp_updates``."""
    return 0.5 + (final - 0.5) * min(1.0, updates / ramp_updates)


# ---------------------------------------------------------------------------------------------
# EMA teacher
# ---------------------------------------------------------------------------------------------
class EMATeacher(AveragedModel):
    """Exponential moving average of the student's parameters; BatchNorm buffers are copied.

    ``n_averaged`` counts updates (the first update copies the student). The engine checkpoints
    the inner network (``.module``); the update count travels in the ssl task's state.
    ``n_averaged`` stays a CPU tensor and :meth:`update` reads it there: AveragedModel's own
    ``update_parameters`` copies it to the GPU and reads it back, a device sync every step.
    """

    def __init__(self, student: nn.Module, decay: float):
        super().__init__(student, use_buffers=False)
        self.decay = decay
        self.module.requires_grad_(False)
        self.eval()

    @property
    def spec(self) -> dict:
        return dict(getattr(self.module, "spec", {}) or {})

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """teacher <- lerp(teacher, student, 1 - decay(n)) (a copy at n = 0); buffers copied."""
        from qgseg.models import uncompiled

        student = uncompiled(student)
        n = int(self.n_averaged)
        mine = [p.detach() for p in self.module.parameters()]
        theirs = [p.detach() for p in student.parameters()]
        if len(mine) != len(theirs):
            raise ValueError(f"EMA teacher has {len(mine)} parameters, the student {len(theirs)}")
        if n == 0:
            torch._foreach_copy_(mine, theirs)
        elif mine:
            torch._foreach_lerp_(mine, theirs, 1.0 - ema_decay_at(n, self.decay))
        for b_t, b_s in zip(self.module.buffers(), student.buffers(), strict=True):
            b_t.copy_(b_s)
        self.n_averaged += 1

    def train(self, mode: bool = True) -> "EMATeacher":
        """The teacher always predicts in eval mode (BatchNorm uses the copied running stats)."""
        return super().train(False)


def ema_teacher(model: nn.Module, cfg: Config) -> EMATeacher:
    """A fresh EMA teacher of ``model`` (a ``build`` helper)."""
    from qgseg.models import uncompiled

    return EMATeacher(uncompiled(model), cfg.ssl.ema_decay)


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def noisy(x: torch.Tensor, std: float = NOISE_STD, clip: float = NOISE_CLIP) -> torch.Tensor:
    """x plus clipped Gaussian noise (uses torch's global generator, which the engine seeds)."""
    return x + torch.clamp(torch.randn_like(x) * std, -clip, clip)


@torch.no_grad()
def probs_of(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sigmoid probabilities (float32, no autograd) of a network's logits."""
    return torch.sigmoid(net(x).float())


def hard(p: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """{0, 1} float pseudolabel of probabilities."""
    return (p > threshold).float()


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of Bernoulli(p); max ln 2 at p = 0.5."""
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


LN2 = math.log(2.0)
