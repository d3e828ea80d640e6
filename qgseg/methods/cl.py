"""cl: l_seg to the EMA teacher's pseudolabel + 0.1 * a local (pixel) contrastive loss.

A projection head (1x1 conv, ReLU, 1x1 conv, L2 normalisation) embeds the student's decoder
features; maps larger than 64 px are average-pooled to at most 64 px per side to bound the cost.
Class prototypes are the normalised mean embeddings of the background and foreground pixels
of the batch under the (resized) pseudolabel, detached. Each pixel's loss is the cross-entropy
of its cosine similarities to the two prototypes (temperature 0.1) against its pseudolabel
class; a class absent from the batch is left out. Under ``--qw`` g's weight multiplies both
terms.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from qgseg.losses import seg_loss
from qgseg.methods.common import Context, Method, Part, Step, ema_teacher, hard, probs_of

if TYPE_CHECKING:  # annotations only: config.py reads the method registry
    from qgseg.config import Config

WEIGHT = 0.1
TAU = 0.1
EMBED = 32
MAX_SIDE = 64


class ProjectionHead(nn.Module):
    """1x1 conv -> ReLU -> 1x1 conv, L2-normalised per pixel."""

    def __init__(self, channels: int, dim: int = EMBED):
        super().__init__()
        self.spec = {"channels": channels, "dim": dim}
        self.net = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True), nn.Conv2d(channels, dim, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(feats).float(), dim=1)


def local_contrastive(z: torch.Tensor, label: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Per-sample prototype contrastive loss of pixel embeddings z (B,D,h,w) vs labels (B,1,H,W)."""
    h, w = z.shape[-2:]
    if max(h, w) > MAX_SIDE:
        k = math.ceil(max(h, w) / MAX_SIDE)
        z = F.normalize(F.avg_pool2d(z, k, ceil_mode=True), dim=1)
        h, w = z.shape[-2:]
    y = F.interpolate(label.float(), size=(h, w), mode="area") > 0.5  # (B,1,h,w)
    protos, present = [], []
    for cls in (~y, y):  # background, foreground
        n = cls.sum()
        mean = (z.detach() * cls).sum((0, 2, 3)) / n.clamp_min(1)
        protos.append(F.normalize(mean, dim=0))
        present.append(n > 0)
    sims = torch.einsum("bdhw,cd->bchw", z, torch.stack(protos)) / tau  # (B,2,h,w)
    absent = ~torch.stack(present).view(1, 2, 1, 1)
    sims = sims.masked_fill(absent, -1e4)
    ce = F.cross_entropy(sims, y[:, 0].long(), reduction="none")  # (B,h,w)
    return ce.flatten(1).mean(1)


def build(model: nn.Module, cfg: Config) -> dict[str, nn.Module]:
    device = next(model.parameters()).device
    return {"teacher": ema_teacher(model, cfg), "proj": ProjectionHead(int(model.feature_channels)).to(device)}


def unlabeled(ctx: Context, x: torch.Tensor) -> Step:
    pl = hard(probs_of(ctx.modules["teacher"], x))
    logits, feats = ctx.model.forward_features(x)
    contrast = local_contrastive(ctx.modules["proj"](feats), pl)
    loss = seg_loss(logits, pl) + WEIGHT * contrast
    return Step([Part(loss, pl, x)], student=[(x, logits)], terms={"contrast": contrast.mean().detach()})


METHOD = Method("cl", "EMA-teacher pseudolabels + local prototype contrastive loss", unlabeled,
                build=build, trained=("proj",))
