"""pl: l_seg to the EMA teacher's pseudolabel (teacher prob > 0.5). ``pl --qw`` is PL-QW."""
from __future__ import annotations

import torch

from qgseg.losses import seg_loss
from qgseg.methods.common import Context, Method, Part, Step, ema_teacher, hard, probs_of


def unlabeled(ctx: Context, x: torch.Tensor) -> Step:
    pl = hard(probs_of(ctx.modules["teacher"], x))
    logits = ctx.model(x)
    return Step([Part(seg_loss(logits, pl), pl, x)], student=[(x, logits)])


METHOD = Method("pl", "EMA-teacher pseudolabels, l_seg", unlabeled,
                build=lambda model, cfg: {"teacher": ema_teacher(model, cfg)})
