"""pl-t: BCE to the student's own thresholded prediction on its confident pixels only.

A pixel counts when max(p, 1 - p) > ssl.confidence (0.9); p comes from the same forward pass,
detached. Under ``--qw`` g judges the thresholded self prediction.
"""
from __future__ import annotations

import torch

from qgseg.losses import bce_loss
from qgseg.methods.common import Context, Method, Part, Step, hard


def unlabeled(ctx: Context, x: torch.Tensor) -> Step:
    logits = ctx.model(x)
    p = torch.sigmoid(logits.detach().float())
    pl = hard(p)
    confident = torch.maximum(p, 1 - p) > ctx.cfg.ssl.confidence
    loss = bce_loss(logits, pl, valid=confident)
    return Step([Part(loss, pl, x)], student=[(x, logits)],
                terms={"confident_frac": confident.float().mean()})


METHOD = Method("pl-t", "self pseudolabels, BCE on confident pixels", unlabeled)
