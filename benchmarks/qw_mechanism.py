"""Which unlabeled images carry mean teacher's consistency loss, and which does QW drop?

For finished ``qgseg ssl --method mt`` runs trained with in-domain unlabeled images
(``data.unused_as_unlabeled = true``, so every unlabeled image has a mask), over those images:

- l_i: mt's consistency loss (``losses.mse_prob_loss``: student vs noisy-input teacher probabilities),
- q_i: the run's own g (its recorded views) scoring the teacher's pseudolabel (prob > 0.5),
- w_i: the paper's QW weight q^2 [q >= 0.5] (``quality.qw_weights``, reference form),
- d_i: the true Dice of the pseudolabel,
- the reject rule's cut: the quarter of the images g scores lowest (``quality.qw_weights`` with
  ``ssl.qw_rule = "reject"``, here over all the unlabeled images rather than per batch).

Student and teacher come from the run's ``last.pt`` (the state at the end of training), both in
eval mode; the teacher's input noise is seeded. One JSON line per run:

    python benchmarks/qw_mechanism.py runs/ssl/mt-s0 runs/ssl/mt-s1
"""
from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from qgseg.config import load_run_config  # noqa: E402
from qgseg.data import load_labeled, to_float_images, to_float_masks  # noqa: E402
from qgseg.engine import load_checkpoint, load_modules  # noqa: E402
from qgseg.losses import mse_prob_loss  # noqa: E402
from qgseg.methods.common import hard, noisy  # noqa: E402
from qgseg.metrics import dice_per_sample, spearman  # noqa: E402
from qgseg.models import build_segmenter  # noqa: E402
from qgseg.quality import QualityPredictor, qw_weights  # noqa: E402


def measure(run: Path, batch: int = 32) -> dict:
    meta = json.loads((run / "meta.json").read_text())
    cfg = load_run_config(run)
    stems = json.loads((run / "splits.json").read_text()).get("unused") or []
    if not stems or not meta.get("quality_run"):
        raise SystemExit(f"{run}: needs an mt run with in-domain unlabeled images (splits.json 'unused') and a g")
    ck = load_checkpoint(run / "checkpoints" / "last.pt", "checkpoint")
    nets = {k: build_segmenter(**ck["specs"][k]) for k in ("model", "teacher")}
    load_modules(nets, ck["modules"], str(run / "checkpoints" / "last.pt"))
    g = QualityPredictor.from_run(meta["quality_run"]).with_views(meta.get("quality_views", 1))
    data = load_labeled(cfg.data.labeled, cfg.data.image_size).subset(stems)
    torch.manual_seed(0)
    parts: dict[str, list[torch.Tensor]] = {"l": [], "q": [], "d": []}
    with torch.no_grad():
        for i in range(0, len(data), batch):
            x = to_float_images(torch.from_numpy(data.images[i:i + batch]))
            m = to_float_masks(torch.from_numpy(data.masks[i:i + batch]))
            p_t = torch.sigmoid(nets["teacher"].eval()(noisy(x)).float())
            parts["l"].append(mse_prob_loss(nets["model"].eval()(x), p_t))
            parts["q"].append(g.score(x, hard(p_t)).flatten())
            parts["d"].append(dice_per_sample(hard(p_t), m))
    l, q, d = (torch.cat(parts[k]).double().numpy() for k in ("l", "q", "d"))
    w = qw_weights(torch.from_numpy(q)).double().numpy()
    zero = w == 0
    rejected = qw_weights(torch.from_numpy(q), "reject").numpy() == 0
    r = lambda v: round(float(v), 3)  # noqa: E731
    return {"run": str(run), "images": len(l), "pseudolabel_dice": r(d.mean()), "q_mean": r(q.mean()),
            "share_zeroed": r(zero.mean()), "spearman_q_dice": r(spearman(q, d)),
            "spearman_q_loss": r(spearman(q, l)), "spearman_dice_loss": r(spearman(d, l)),
            "loss_share_of_zeroed": r(l[zero].sum() / l.sum()),
            "loss_share_of_rejected_quarter": r(l[rejected].sum() / l.sum()),
            "dice_rejected_quarter": r(d[rejected].mean()),
            "weighted_over_plain_loss": r((w * l).sum() / w.sum() / l.mean()) if w.sum() > 0 else None,
            "dice_zeroed": r(d[zero].mean()) if zero.any() else None,
            "dice_kept": r(d[~zero].mean()) if (~zero).any() else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished mt run directories")
    for run in ap.parse_args().runs:
        print(json.dumps(measure(run)), flush=True)


if __name__ == "__main__":
    main()
