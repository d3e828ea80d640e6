"""cps (cross pseudo supervision): two networks, each learns l_seg on the other's hard pseudolabel.

The peer is a second, independently initialised network of the same architecture (and weights
file). Both learn the labeled loss (the supervised term is their sum). Under ``--qw`` the loss of
net j on the pseudolabel of net k is weighted by w_{j,k} = g(x, pseudolabel of net k).
Evaluation and best.pt use the first network.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from qgseg.losses import seg_loss
from qgseg.methods.common import Context, Method, Part, Step, hard

if TYPE_CHECKING:  # annotations only: config.py reads the method registry
    from qgseg.config import Config


def build(model: nn.Module, cfg: Config) -> dict[str, nn.Module]:
    from qgseg.models import build_segmenter

    spec = dict(getattr(model, "spec", {}))
    device = next(model.parameters()).device
    # same builder and weights file as f; a fresh draw of the random initialisation
    peer = build_segmenter(spec["arch"], spec.get("encoder", ""), cfg.model.weights_file)
    if cfg.train.channels_last:
        peer = peer.to(memory_format=torch.channels_last)
    return {"peer": peer.to(device)}


def supervised(model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return seg_loss(model(x), y) + seg_loss(modules["peer"](x), y)


def unlabeled(ctx: Context, x: torch.Tensor) -> Step:
    a = ctx.model(x)
    b = ctx.modules["peer"](x)
    pl_a = hard(torch.sigmoid(a.detach().float()))
    pl_b = hard(torch.sigmoid(b.detach().float()))
    return Step([Part(seg_loss(a, pl_b), pl_b, x), Part(seg_loss(b, pl_a), pl_a, x)],
                student=[(x, a), (x, b)],
                terms={"agreement": (pl_a == pl_b).float().mean()})


METHOD = Method("cps", "cross pseudo supervision between two networks", unlabeled, build=build,
                trained=("peer",), supervised=supervised)
