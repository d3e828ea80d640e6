"""pl-c: l_seg to the student's own pseudolabel, weighted by the sample's confidence.

Sample confidence c = mean over pixels of max(p, 1 - p) (p detached, same forward pass); the
sample weight is c^T * [c >= ssl.confidence] with T = 2 and threshold 0.9, so unsure samples
drop out and sure ones count more. Under ``--qw`` g judges the same pseudolabel.
"""
from __future__ import annotations

import torch

from qgseg.losses import seg_loss
from qgseg.methods.common import Context, Method, Part, Step, hard

TEMPERATURE = 2.0


def unlabeled(ctx: Context, x: torch.Tensor) -> Step:
    logits = ctx.model(x)
    p = torch.sigmoid(logits.detach().float())
    pl = hard(p)
    conf = torch.maximum(p, 1 - p).flatten(1).mean(1)
    w = conf.pow(TEMPERATURE) * (conf >= ctx.cfg.ssl.confidence).float()
    loss = w * seg_loss(logits, pl)
    return Step([Part(loss, pl, x)], student=[(x, logits)],
                terms={"sample_conf": conf.mean(), "conf_kept": (w > 0).float().mean()})


METHOD = Method("pl-c", "self pseudolabels, l_seg weighted by sample confidence", unlabeled)
