"""The quality predictor g(x, m) ~ Dice(m, y) in one place: the network, loading it from a
checkpoint or a train-quality run, and scoring with it (flip / rotation views, the frozen
predictor phase 2 uses for QAR and QW weights, g's metrics on corrupted masks, and on real
predictions next to the segmenter's own confidence and flip agreement).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from torch import nn

from qgseg.config import QW_RULES
from qgseg.data import LabeledData, resize_image, resize_mask, to_float_images, to_float_masks
from qgseg.engine import autocast, saved_module
from qgseg.errors import InputError, QgsegError
from qgseg.metrics import regression_metrics
from qgseg.models import HEAD_PREFIXES, load_into, read_state_dict
from qgseg.runs import Run

if TYPE_CHECKING:
    from collections.abc import Mapping

    from qgseg.corrupt import CorruptedSet


# ---------------------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------------------
class QualityNet(nn.Module):
    """g(x, m): predicted Dice of mask m for image x.

    timm backbone by name with `in_chans` (= 4) inputs (normalised RGB + {0,1} mask), global
    pooling, Dropout(0.15) -> Linear(F,256) -> ReLU -> Dropout(0.075) -> Linear(256,1) -> sigmoid.
    The head keeps PyTorch's default Linear init: Kaiming fan-out init saturates the sigmoid from
    random init and g collapses to a constant.
    `input_size` > 0 resizes image and mask to that side length first (area averaging down,
    bilinear up), so g can work at a lower resolution than the data: a mask becomes the share
    of each coarse pixel it covers. `tta_views` > 1: in eval mode g averages its score over that
    many flips / rotations of image and mask together (2: identity and horizontal flip; 4: the four
    90-degree rotations; 8: those and their flips); training (train mode) always sees one view.
    `QualityNet(**spec)` rebuilds the architecture.
    """

    def __init__(self, backbone: str = "resnet18", in_chans: int = 4, input_size: int = 0,
                 tta_views: int = 1) -> None:
        super().__init__()
        _check_timm_backbone(backbone)
        self.spec = {"backbone": backbone, "in_chans": in_chans, "input_size": input_size, "tta_views": 1}
        self.views = tta_views
        self.backbone = timm.create_model(backbone, in_chans=in_chans, num_classes=0, pretrained=False)
        # the pooled width is not always num_features (MobileNetV3's conv head widens it): measure it
        with torch.no_grad():
            width = int(self.backbone.eval()(torch.zeros(1, in_chans, 64, 64)).shape[1])
        self.backbone.train()
        self.head = nn.Sequential(
            nn.Dropout(0.15), nn.Linear(width, 256), nn.ReLU(inplace=True), nn.Dropout(0.075), nn.Linear(256, 1)
        )

    @property
    def input_size(self) -> int:
        return self.spec["input_size"]

    @property
    def views(self) -> int:
        """Flip / rotation views g averages when it scores (saved in the spec as tta_views)."""
        return self.spec["tta_views"]

    @views.setter
    def views(self, views: int) -> None:
        if views not in TTA_VIEWS:
            raise ValueError(f"tta_views must be one of {TTA_VIEWS}, got {views}")
        self.spec["tta_views"] = views

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) normalised image, (B,1,H,W) mask in [0,1] -> (B,) predicted Dice in (0,1)."""
        x = torch.cat((image, mask.to(image.dtype)), dim=1)
        if self.input_size and x.shape[-2:] != (self.input_size, self.input_size):
            down = x.shape[-1] > self.input_size
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="area" if down else "bilinear")
        views = 1 if self.training else self.views
        if views == 1:
            return torch.sigmoid(self.head(self.backbone(x))).squeeze(1)
        scores = torch.sigmoid(self.head(self.backbone(dihedral_views(x, views)))).squeeze(1)
        return scores.view(views, len(x)).mean(0)


TTA_VIEWS = (1, 2, 4, 8)


@contextmanager
def scoring_views(net: QualityNet, views: int):
    """Within the block g scores with `views` views; its own number is restored afterwards."""
    saved, net.views = net.views, views
    try:
        yield net
    finally:
        net.views = saved


def dihedral_views(x: torch.Tensor, views: int) -> torch.Tensor:
    """(B,C,H,W) -> (views*B,C,H,W): the batch under `views` of the square's 8 flips / rotations."""
    if views == 2:
        return torch.cat((x, x.flip(-1)))
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation views need square inputs, got {tuple(x.shape[-2:])}")
    rotations = [torch.rot90(x, k, (-2, -1)) for k in range(4)]
    return torch.cat(rotations if views == 4 else rotations + [r.flip(-1) for r in rotations])


def _check_timm_backbone(backbone: str) -> None:
    if not timm.is_model(backbone):
        raise InputError(
            f"quality.backbone: unknown timm model '{backbone}'; e.g. resnet18, resnet34, resnet50, "
            "efficientnet_b0, convnext_tiny; list all with python -c \"import timm; print(timm.list_models())\""
        )


def build_quality_net(
    backbone: str = "resnet18", pretrained: bool = False, weights_file: str = "", in_chans: int = 4,
    input_size: int = 0, tta_views: int = 1,
) -> QualityNet:
    """Build g with a timm backbone (`timm.create_model(backbone, in_chans=4, num_classes=0)`).

    `weights_file`: a local state dict of the timm model with 3 input channels (or 4), or of a
    whole QualityNet. A 3-channel first conv is adapted by appending a mask channel whose filters
    are the mean of the RGB filters; classifier-head keys in the file are ignored and the g head
    keeps its fresh init. `pretrained=True` fetches timm's 3-channel weights from the hub (needs
    internet) and adapts them the same way. Unknown backbone -> InputError.
    """
    model = QualityNet(backbone, in_chans, input_size, tta_views)
    if pretrained:
        try:
            src = timm.create_model(backbone, pretrained=True, num_classes=0)
        except Exception as exc:  # network / hub errors come in many types
            raise QgsegError(
                f"quality.pretrained: could not fetch pretrained weights for '{backbone}' ({type(exc).__name__}); "
                "offline machines should set quality.pretrained = false and use quality.weights_file"
            ) from None
        load_into(model.backbone, _adapt_first_conv(src.state_dict(), model.backbone), "timm hub", "quality.pretrained")
    if weights_file:
        state = read_state_dict(weights_file, "quality.weights_file")
        whole = len(state.keys() & model.state_dict().keys()) > len(state.keys() & model.backbone.state_dict().keys())
        target = model if whole else model.backbone
        state = _adapt_first_conv(state, target)
        load_into(target, state, weights_file, "quality.weights_file", () if whole else HEAD_PREFIXES)
    return model


def _adapt_first_conv(state: Mapping[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Append mean-of-RGB input filters where the file has 3 input channels and the model 4."""
    expected = target.state_dict()
    out = dict(state)
    for k, w in state.items():
        e = expected.get(k)
        if (
            e is not None
            and w.ndim == 4
            and e.ndim == 4
            and w.shape[1] == 3
            and e.shape[1] == 4
            and w.shape[0] == e.shape[0]
            and w.shape[2:] == e.shape[2:]
        ):
            out[k] = torch.cat((w, w.mean(dim=1, keepdim=True)), dim=1)
    return out


# ---------------------------------------------------------------------------------------------
# frozen g (phase 2)
# ---------------------------------------------------------------------------------------------
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

        run = run if isinstance(run, Run) else Run(run)
        if run.status != "completed":
            raise InputError(f"{option} {run.path}: run is {run.status or 'not a qgseg run'}, expected a "
                             "completed train-quality run")
        cfg = load_run_config(run.path)
        if image_size is not None and cfg.data.image_size != image_size:
            raise InputError(f"{option} {run.path}: g was trained at {cfg.data.image_size} px but this run "
                             f"uses data.image_size = {image_size}; use the same image size or train g at "
                             f"{image_size} px")
        ck, spec = saved_module(run.checkpoints / "best.pt", "g", "quality predictor", f"{option} checkpoint",
                                f"{option} {run.path}: best.pt")
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
                temperature: float = 2.0, threshold: float = 0.5, rule: str = "power",
                reject: float = 0.25) -> torch.Tensor:
        """QW weights per sample (detached): :func:`qw_weights` of g's scores of the pseudolabels."""
        return qw_weights(self.score(images, pseudolabels), rule, form, temperature, threshold, reject)


def qw_weights(q: torch.Tensor, rule: str = "power", form: str = "reference", temperature: float = 2.0,
               threshold: float = 0.5, reject: float = 0.25) -> torch.Tensor:
    """QW weights of one batch from g's scores ``q`` (B,) of its pseudolabels (``ssl.qw_rule``).

    power (the paper's): reference form w = q^T [q >= threshold] (the authors' code); plain form
        w = q (the paper's formula).
    rank: w_i = r_i / B, r_i the rank of q_i within the batch (1 = lowest score; tied scores share
        their mean rank): only g's ordering of the batch counts, not its calibration, so weights
        spread over (0, 1] even when g scores every pseudolabel near 0.93.
    reject: w_i = 0 for the floor(reject * B) lowest scores of the batch (a tie at the cut is
        broken by batch order), 1 for the rest.

    Ranks and rejection are within the batch (no state: a resumed run weights exactly as an
    uninterrupted one); the unlabeled batch is ``train.batch_size_unlabeled`` images.
    """
    q = q.detach().float().clone()
    if rule == "power":
        return q if form == "plain" else q.pow(temperature) * (q >= threshold).float()
    if rule == "rank":
        below = (q[None, :] < q[:, None]).sum(1)
        tied = (q[None, :] == q[:, None]).sum(1)  # itself included
        return (below + (tied + 1) / 2) / q.numel()
    if rule == "reject":
        w = torch.ones_like(q)
        w[torch.argsort(q, stable=True)[:math.floor(reject * q.numel() + 1e-9)]] = 0.0
        return w
    raise ValueError(f"unknown QW rule {rule!r}; expected one of {', '.join(QW_RULES)}")


def qw_reduction(rule: str, form: str) -> str:
    """How :func:`weighted_mean` reduces under a rule: rank and reject normalise by sum(w)."""
    return form if rule == "power" else "reference"


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None, form: str = "reference") -> torch.Tensor:
    """Reduce per-sample losses: plain mean, or QW-weighted (sum(w l) / sum(w) for reference)."""
    if weights is None:
        return losses.mean()
    weights = weights.to(losses.dtype).detach()
    if form == "plain":
        return (weights * losses).mean()
    return (weights * losses).sum() / weights.sum().clamp_min(1e-6)


# ---------------------------------------------------------------------------------------------
# g on corrupted masks (train-quality's validation and test, ``qgseg evaluate`` of a g run)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_quality(g, images: torch.Tensor, case_rows: np.ndarray, cs: CorruptedSet,
                    device: torch.device, image_mode: str = "normal", seed: int = 0,
                    batch_size: int = 128) -> np.ndarray:
    """g's predictions for every mask of a corrupted set.

    image_mode: "normal" (each mask with its own image), "zero" (the normalised image set to 0,
    i.e. a mean-grey image), or "shuffled" (each mask with another case's image: a seeded
    derangement of the cases).
    """
    g.eval()
    rows = case_rows[cs.case]
    if image_mode == "shuffled":
        n = len(case_rows)
        perm = np.random.default_rng(seed).permutation(n)
        other = np.empty(n, np.int64)
        other[perm] = np.roll(perm, 1)  # a cycle through all cases: nobody keeps its own image
        rows = case_rows[other[cs.case]]
    out = []
    masks = torch.from_numpy(cs.masks)
    for i in range(0, len(cs), batch_size):
        x = to_float_images(images[torch.from_numpy(rows[i:i + batch_size])]).to(device)
        if image_mode == "zero":
            x = torch.zeros_like(x)
        m = to_float_masks(masks[i:i + batch_size]).to(device)
        with autocast(device):
            out.append(g(x, m).float().cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def grounding_checks(g, images: torch.Tensor, rows: np.ndarray, cs: CorruptedSet, device: torch.device,
                     true: np.ndarray) -> dict[str, Any]:
    """g's MAE with the image zeroed and with each mask on another case's image, and those predictions."""
    zero = predict_quality(g, images, rows, cs, device, "zero")
    shuf = predict_quality(g, images, rows, cs, device, "shuffled", seed=1)
    return {"mae_zero_image": float(np.abs(zero - true).mean()),
            "mae_shuffled_image": float(np.abs(shuf - true).mean()), "zero": zero, "shuffled": shuf}


def quality_report(g, data: LabeledData, rows: np.ndarray, cs: CorruptedSet, device: torch.device,
                   stems: list[str]) -> tuple[dict[str, float], pd.DataFrame]:
    """Test metrics of g plus the contextual-grounding checks, and a per-mask table."""
    images = torch.from_numpy(data.images)
    true = cs.dice.astype(np.float64)
    pred = predict_quality(g, images, rows, cs, device)
    ground = grounding_checks(g, images, rows, cs, device, true)
    zero, shuf = ground["zero"], ground["shuffled"]
    r = regression_metrics(pred, true)
    out = {k: r[k] for k in ("mae", "rmse", "pearson", "spearman")}
    out["mae_zero_image"], out["mae_shuffled_image"] = ground["mae_zero_image"], ground["mae_shuffled_image"]
    out["zero_image_mae_increase"] = out["mae_zero_image"] - out["mae"]
    out["shuffled_image_mae_increase"] = out["mae_shuffled_image"] - out["mae"]
    hi = true >= 0.7
    if hi.sum() > 2:
        rh = regression_metrics(pred[hi], true[hi])
        out["pearson_dice_ge_0.7"], out["spearman_dice_ge_0.7"] = rh["pearson"], rh["spearman"]
        out["mae_dice_ge_0.7"] = rh["mae"]
    out["masks"] = int(len(cs))
    table = cs.index_frame(stems)
    table["pred"], table["pred_zero_image"], table["pred_shuffled_image"] = pred, zero, shuf
    table["abs_error"] = np.abs(pred - true)
    return out, table




def mae_by_category(table: pd.DataFrame) -> pd.DataFrame:
    """g's mean absolute error and mask count per corruption category of a :func:`quality_report` table."""
    return (table.groupby("category")["abs_error"].agg(["mean", "count"])
            .rename(columns={"mean": "mae", "count": "masks"}))
# g's identity and the automatic choice of g (one logic for ssl and evaluate)
# ---------------------------------------------------------------------------------------------
def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """A content hash of weights: every tensor's name, dtype, shape and bytes, in key order."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def g_sha256(run: Run | Path | str) -> str:
    """The content hash of the g in a train-quality run's best.pt ("" when it cannot be read)."""
    from qgseg.engine import load_checkpoint

    run = run if isinstance(run, Run) else Run(run)
    try:
        ck = load_checkpoint(run.checkpoints / "best.pt", "g checkpoint")
    except InputError:
        return ""
    g = (ck.get("modules") or {}).get("g")
    return weights_sha256(g) if g else ""


def g_dataset(run: Run | Path | str) -> str:
    """The labeled data folder a train-quality run trained g on (resolved), "" if unrecorded."""
    run = run if isinstance(run, Run) else Run(run)
    data = run.meta.get("data", "")
    return str(Path(data).resolve()) if data else ""


def same_dataset(run: Run | Path | str, data_root: Path | str, stems: list[str] | None = None) -> bool | None:
    """Whether g of ``run`` was trained on ``data_root`` (the same folder, or the same case names
    when ``stems`` is given); None when g's run does not record its data."""
    from qgseg.runs import read_json

    run = run if isinstance(run, Run) else Run(run)
    theirs = g_dataset(run)
    if not theirs:
        return None
    if theirs == str(Path(data_root).resolve()):
        return True
    if stems is not None:  # the same data set copied elsewhere
        try:
            splits = read_json(run.path / "splits.json")
            return sorted(s for v in splits.values() for s in v) == sorted(stems)
        except (OSError, ValueError, AttributeError):
            return False
    return False


def compatible_quality_runs(roots: list[Path], image_size: int, data_root: Path | str | None = None) -> list[Run]:
    """Completed train-quality runs under ``roots`` whose g fits ``image_size`` and has a best.pt,
    best first: those trained on ``data_root`` before others, newer before older.

    This is the one automatic choice of g: ``ssl`` (no ``--quality``) and ``evaluate`` both take
    the first.
    """
    from qgseg.config import load_run_config
    from qgseg.runs import find_runs

    found: dict[str, tuple[bool, str, Run]] = {}
    for root in roots:
        for r in find_runs(root, "train-quality"):
            key = str(r.path.resolve())
            if key in found or not (r.checkpoints / "best.pt").is_file():
                continue
            try:
                if load_run_config(r.path).data.image_size != image_size:
                    continue
            except (InputError, OSError):
                continue
            same = bool(data_root) and same_dataset(r, data_root) is True
            found[key] = (same, r.meta.get("created", ""), r)
    return [r for *_, r in sorted(found.values(), key=lambda t: (t[0], t[1]), reverse=True)]


def quality_roots(runs_root: str | Path, run_path: Path) -> list[Path]:
    """Where to look for g when scoring a run: the runs root, and the root the run itself sits in
    (a run made with another runs root, e.g. `qgseg demo --out DIR`, is <root>/<stage>/<name>)."""
    out: list[Path] = []
    for r in (Path(runs_root), Path(run_path).resolve().parent.parent):
        if r.resolve() not in [o.resolve() for o in out]:
            out.append(r)
    return out


def choose_g(quality: str | None, roots: list[Path], image_size: int, device: torch.device,
             evaluated: Any = None, data_root: Path | str | None = None,
             any_size: bool = False) -> tuple[Any, str, str]:
    """(g or None, its run, a note): the one choice of g for scoring a run's predictions
    (``evaluate``, ``predict``, ``select``).

    An explicit ``--quality`` wins (at ``image_size`` unless ``any_size``: scores are resized to
    g's size). A run is scored with the g it was trained with (its meta.json), while that g is
    still there with the same weights. Otherwise the automatic choice, the same as ssl's
    (:func:`compatible_quality_runs` under ``roots``).
    """
    from qgseg.runs import Run, resolve_link

    if quality:
        run = resolve_link(quality, roots[0], "train-quality", "--quality")
        return QualityPredictor.from_run(run, None if any_size else image_size).to(device), str(run.path), ""
    note = ""
    own = (evaluated.meta.get("quality_run") or "") if evaluated is not None else ""
    if own:
        what = f"g of {evaluated.path} (meta.json quality_run)"
        try:
            g = QualityPredictor.from_run(Run(own), image_size, option=what)
            recorded = evaluated.meta.get("quality_sha256", "")
            if not recorded or weights_sha256(g.net.state_dict()) == recorded:
                views = int(evaluated.meta.get("quality_views") or 0)
                return (g.with_views(views) if views else g).to(device), own, ""
            note = f"the g the run was trained with ({own}) has changed since (other weights); "
        except InputError as e:
            note = f"the g the run was trained with is not usable ({e}); "
    found = compatible_quality_runs(roots, image_size, data_root)
    if not found:
        return None, "", f"{note}{no_compatible_g(roots, image_size)}: pass --quality RUN"
    g = QualityPredictor.from_run(found[0], image_size, option="g (the newest compatible train-quality run)")
    return g.to(device), str(found[0].path), (f"{note}using {found[0].path} instead" if note else "")


def no_compatible_g(roots: list[Path], image_size: int) -> str:
    """Why the automatic choice found no g (for error messages and notes)."""
    from qgseg.config import load_run_config
    from qgseg.runs import find_runs

    where = " or ".join(str(Path(r) / "train-quality") for r in roots)
    sizes = []
    for root in roots:
        for r in find_runs(root, "train-quality"):
            try:
                sizes.append(load_run_config(r.path).data.image_size)
            except (InputError, OSError):
                continue
    other = f" (there are completed ones at {', '.join(f'{s} px' for s in sorted(set(sizes)))})" if sizes else ""
    return f"no completed train-quality run at {image_size} px under {where}{other}"


@torch.no_grad()
def quality_scores(g: Any, images: np.ndarray, masks: np.ndarray, device: torch.device,
                   batch_size: int = 32) -> np.ndarray:
    """g(image, mask) per pair: uint8 images (N, H, W, 3) and {0, 1} masks (N, H, W) of one size,
    resized to g's image size when they differ. ``g`` is a QualityPredictor (anything with
    ``image_size`` and ``score(images, masks)``)."""
    size = int(getattr(g, "image_size", 0) or images.shape[1])
    out = []
    for i in range(0, len(images), batch_size):
        im, m = images[i:i + batch_size], masks[i:i + batch_size]
        if im.shape[1:3] != (size, size):
            im = np.stack([resize_image(a, size) for a in im])
            m = np.stack([resize_mask(a, size) for a in m])
        x = to_float_images(torch.from_numpy(np.ascontiguousarray(im)).to(device))
        out.append(g.score(x, to_float_masks(torch.from_numpy(np.ascontiguousarray(m))).to(device)).float().cpu().numpy())
    return np.concatenate(out).astype(float) if out else np.zeros(0)


# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# g on real predictions, against the signals that need no g
# ---------------------------------------------------------------------------------------------
REAL_FAILURE_DICE = 0.8  # AURC: a real prediction with true Dice below this is a failure
REAL_HIGH_DICE = 0.8  # Spearman among the good predictions (true Dice >= this)
REAL_PAIR_GAP = 0.01  # pairwise accuracy: pairs of one image whose true Dice differ by at least this
REAL_SIGNALS = {"": "g", "confidence_": "segmenter confidence", "agreement_": "flip agreement"}


def real_metrics(scores: dict[str, np.ndarray], dice: np.ndarray, case: np.ndarray) -> dict[str, float]:
    """How well each score ranks real predictions by their true Dice.

    ``scores`` maps a key prefix ("" for g, "confidence_", "agreement_") to one score per mask.
    Per signal: Pearson, Spearman, Spearman among masks with true Dice >= REAL_HIGH_DICE,
    same-image pairwise ranking accuracy and AURC with failure = true Dice < REAL_FAILURE_DICE
    (risk-coverage: keep the most trusted masks first). Plus g's MAE and, to read AURC against,
    the failure rate (a random ranking's AURC) and the oracle's AURC (masks by true Dice).
    """
    from qgseg.metrics import aurc, pairwise_ranking_accuracy, spearman

    fail = (dice < REAL_FAILURE_DICE).astype(np.float64)
    hi = dice >= REAL_HIGH_DICE
    out: dict[str, float] = {"masks": int(len(dice)), "images": int(len(np.unique(case))),
                             "mean_dice": float(dice.mean()) if len(dice) else float("nan"),
                             "failure_rate": float(fail.mean()) if len(dice) else float("nan"),
                             "aurc_oracle": aurc(dice, dice, REAL_FAILURE_DICE)}
    for prefix, score in scores.items():
        r = regression_metrics(score, dice)
        out[f"{prefix}pearson"], out[f"{prefix}spearman"] = r["pearson"], r["spearman"]
        out[f"{prefix}spearman_dice_ge_{REAL_HIGH_DICE}"] = spearman(score[hi], dice[hi]) if hi.sum() > 2 else float("nan")
        out[f"{prefix}pairwise_accuracy"] = pairwise_ranking_accuracy(score, dice, case, REAL_PAIR_GAP)
        out[f"{prefix}aurc"] = aurc(score, dice, REAL_FAILURE_DICE) if np.isfinite(score).all() else float("nan")
        if prefix == "":
            out["mae"] = r["mae"]
    return out


def real_report(g, data: LabeledData, rows: np.ndarray, stems: list[str], real: Any,
                device: torch.device) -> tuple[dict[str, float], pd.DataFrame]:
    """g on real predictions of the cases ``stems`` (data rows ``rows``): ``real`` is a
    ``qgseg.weak.RealPredictions`` (masks of models that never trained on their image, from
    ``load_real_predictions``). g is set beside the segmenters' confidence and flip agreement;
    metrics (see :func:`real_metrics`) and a per-mask table."""
    pred = predict_quality(g, torch.from_numpy(data.images), rows, real, device)  # real has case, masks, len
    metrics = real_metrics({"": pred, "confidence_": real.confidence, "agreement_": real.agreement},
                           real.dice, real.case)
    table = pd.DataFrame({"stem": [stems[c] for c in real.case], "source": real.source, "dice": real.dice,
                          "pred": pred, "confidence": real.confidence, "agreement": real.agreement})
    return metrics, table
