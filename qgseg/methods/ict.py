"""ict (interpolation consistency): l_seg of f(mix(x_a, x_b)) to the mix of teacher probabilities.

x_b is x_a shuffled within the batch; each sample has its own mixing factor from Beta(1, 1).
Under ``--qw`` g judges the mixed target thresholded at 0.5, on the mixed image. QAR (if on)
scores f on the unmixed images, so the task runs f(x_u) for it.
"""
from __future__ import annotations

import torch

from qgseg.losses import seg_loss
from qgseg.methods.common import Context, Method, Part, Step, ema_teacher, hard, probs_of

ALPHA = 1.0


def unlabeled(ctx: Context, x: torch.Tensor) -> Step:
    b = x.shape[0]
    perm = torch.randperm(b, device=x.device)
    lam = torch.distributions.Beta(ALPHA, ALPHA).sample((b,)).to(x.device).view(b, 1, 1, 1)
    p_t = probs_of(ctx.modules["teacher"], x)
    x_mix = lam * x + (1 - lam) * x[perm]
    target = lam * p_t + (1 - lam) * p_t[perm]
    logits = ctx.model(x_mix)
    return Step([Part(seg_loss(logits, target), hard(target), x_mix)])


METHOD = Method("ict", "interpolation consistency with an EMA teacher, Beta(1, 1) mixing", unlabeled,
                build=lambda model, cfg: {"teacher": ema_teacher(model, cfg)})
