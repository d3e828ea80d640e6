"""mt (mean teacher): MSE between the student's and the EMA teacher's probabilities.

The teacher sees the image plus clipped Gaussian noise. Under ``--qw`` g judges the teacher's
thresholded prediction (prob > 0.5).
"""
from __future__ import annotations

import torch

from qgseg.losses import mse_prob_loss
from qgseg.methods.common import Context, Method, Part, Step, ema_teacher, hard, noisy, probs_of


def unlabeled(ctx: Context, x: torch.Tensor) -> Step:
    p_t = probs_of(ctx.modules["teacher"], noisy(x))
    logits = ctx.model(x)
    return Step([Part(mse_prob_loss(logits, p_t), hard(p_t), x)], student=[(x, logits)])


METHOD = Method("mt", "mean teacher: MSE to noisy-input EMA-teacher probabilities", unlabeled,
                build=lambda model, cfg: {"teacher": ema_teacher(model, cfg)})
