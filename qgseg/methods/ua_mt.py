"""ua-mt (uncertainty-aware mean teacher): mt restricted to pixels the teacher is sure about.

The teacher runs 8 passes with independent input noise; uncertainty = binary entropy of the
mean probability. Pixels with uncertainty < (0.75 + 0.25 r) ln 2 count, r in [0, 1] being the
position on the unlabeled-weight ramp, so the mask loosens as training goes on. The target is
the first noisy pass (as in Yu et al.); under ``--qw`` g judges it thresholded at 0.5.
"""
from __future__ import annotations

import torch

from qgseg.losses import mse_prob_loss
from qgseg.methods.common import LN2, Context, Method, Part, Step, binary_entropy, ema_teacher, hard, noisy, probs_of

PASSES = 8


def unlabeled(ctx: Context, x: torch.Tensor) -> Step:
    teacher = ctx.modules["teacher"]
    passes = torch.stack([probs_of(teacher, noisy(x)) for _ in range(PASSES)])
    p_t = passes[0]
    uncertainty = binary_entropy(passes.mean(0))
    certain = uncertainty < (0.75 + 0.25 * ctx.ramp) * LN2
    logits = ctx.model(x)
    return Step([Part(mse_prob_loss(logits, p_t, valid=certain), hard(p_t), x)], student=[(x, logits)],
                terms={"certain_frac": certain.float().mean()})


METHOD = Method("ua-mt", "uncertainty-aware mean teacher (8 noisy teacher passes)", unlabeled,
                build=lambda model, cfg: {"teacher": ema_teacher(model, cfg)})
