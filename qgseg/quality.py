"""The frozen quality predictor g as phase 2 uses it: scores, the QAR loss and QW weights."""
from __future__ import annotations

from pathlib import Path

import torch

from qgseg.errors import InputError
from qgseg.runs import Run


class QualityPredictor:
    """A frozen g(x, m) ~ Dice(m, y). Parameters never change and BatchNorm stays in eval mode."""

    def __init__(self, net: torch.nn.Module, image_size: int, source: str = ""):
        self.net = net.eval()
        self.net.requires_grad_(False)
        self.image_size = image_size
        self.source = source

    def to(self, device: torch.device | str) -> "QualityPredictor":
        self.net.to(device)
        return self

    def train(self, mode: bool = True) -> "QualityPredictor":
        """g always stays in eval mode (BatchNorm statistics and dropout are frozen)."""
        self.net.eval()
        return self

    @classmethod
    def from_run(cls, run: Run | Path | str, image_size: int | None = None,
                 option: str = "--quality") -> "QualityPredictor":
        """Load g from a completed train-quality run (its best checkpoint)."""
        from qgseg.config import load_run_config
        from qgseg.engine import load_checkpoint
        from qgseg.models import QualityNet

        run = run if isinstance(run, Run) else Run(run)
        if run.status != "completed":
            raise InputError(f"{option} {run.path}: run is {run.status or 'not a qgseg run'}, expected a "
                             "completed train-quality run")
        cfg = load_run_config(run.path)
        if image_size is not None and cfg.data.image_size != image_size:
            raise InputError(f"{option} {run.path}: g was trained at {cfg.data.image_size} px but this run "
                             f"uses data.image_size = {image_size}; use the same image size or train g at "
                             f"{image_size} px")
        ck = load_checkpoint(run.checkpoints / "best.pt", f"{option} checkpoint")
        spec = ck.get("specs", {}).get("g")
        if not spec or "g" not in ck.get("modules", {}):
            raise InputError(f"{option} {run.path}: best.pt holds no quality predictor 'g'")
        net = QualityNet(**spec)  # the architecture as saved
        try:
            net.load_state_dict(ck["modules"]["g"])
        except RuntimeError as e:
            raise InputError(f"{option} {run.path}: weights do not fit {spec} ({str(e).splitlines()[0]})") from None
        return cls(net, cfg.data.image_size, str(run.path))

    def with_views(self, views: int) -> "QualityPredictor":
        """Score with `views` flips / rotations (see QualityNet's tta_views) instead of g's saved number."""
        self.net.views = views
        return self

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """g(x, m) with gradients to the inputs (for QAR); images normalised, masks in [0, 1]."""
        return self.net(images, masks)

    @torch.inference_mode()
    def score(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Predicted Dice per sample, no autograd."""
        return self.net(images, masks.float()).float()

    def qar_loss(self, images: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Per-sample QAR term 1 - g(x, sigmoid(f(x))); gradients flow through g into f."""
        return 1.0 - self.net(images, probs).float()

    def weights(self, images: torch.Tensor, pseudolabels: torch.Tensor, form: str = "reference",
                temperature: float = 2.0, threshold: float = 0.5) -> torch.Tensor:
        """QW weights per sample (detached).

        reference: w = q^T * [q >= threshold] (the authors' code; normalise the loss by sum(w));
        plain: w = q (the paper's formula; mean over the batch).
        """
        q = self.score(images, pseudolabels).clone()
        if form == "plain":
            return q
        return q.pow(temperature) * (q >= threshold).float()


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None, form: str = "reference") -> torch.Tensor:
    """Reduce per-sample losses: plain mean, or QW-weighted (sum(w l) / sum(w) for reference)."""
    if weights is None:
        return losses.mean()
    weights = weights.to(losses.dtype).detach()
    if form == "plain":
        return (weights * losses).mean()
    return (weights * losses).sum() / weights.sum().clamp_min(1e-6)
