"""g on real predictions: the segmenters' own signals, out-of-fold predictions (never from a
model that trained on the image), the real-prediction report and the ranking term's batches."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from qgseg.config import load_config

TINY = [
    "data.image_size=32", "corrupt.k=3", "corrupt.eval_k=2", "quality.epochs=1", "quality.batch_size=8",
    "weak.epochs_at=[1, 2]", "weak.batch_size=4",
]


def _loaded(synth_data, tmp_path, extra=()):
    return load_config(options={"data.labeled": str(synth_data / "labeled"), "runs_root": str(tmp_path / "runs")},
                       sets=TINY + list(extra), cwd=tmp_path)


# --------------------------------------------------------------------------- segmenter signals
class _LeftHalf(torch.nn.Module):
    """Logit +4 on the left half of every image, -4 on the right: not flip-equivariant."""

    def forward(self, x):
        out = torch.full((len(x), 1) + x.shape[-2:], -4.0)
        out[..., : x.shape[-1] // 2] = 4.0
        return out


def test_predict_with_signals_known_answers():
    from qgseg.predict import predict_with_signals

    images = np.zeros((3, 8, 8, 3), np.uint8)
    masks, conf, agree = predict_with_signals(_LeftHalf(), images, torch.device("cpu"))
    assert masks.shape == (3, 8, 8) and masks[:, :, :4].all() and not masks[:, :, 4:].any()
    # predict.confidence: the margin |2p - 1| over the pixels with p >= 0.1 (the left half)
    assert conf == pytest.approx([2 * torch.sigmoid(torch.tensor(4.0)).item() - 1] * 3)
    # horizontal flip, flipped back: the right half (Dice 0); vertical flip: the left half again (1)
    assert agree == pytest.approx([0.5] * 3)


# --------------------------------------------------------------------------- folds
def test_fold_assignment_keeps_videos_together():
    from qgseg.weak import fold_assignment

    stems = [f"s{i}" for i in range(10)]
    groups = {s: f"v{i // 3}" for i, s in enumerate(stems)}  # videos of 3, 3, 3 and 1 frames
    fold = fold_assignment(stems, 2, seed=0, groups=groups)
    for v in set(groups.values()):
        assert len({int(fold[i]) for i, s in enumerate(stems) if groups[s] == v}) == 1
    assert sorted(np.bincount(fold).tolist()) == [4, 6]
    assert (fold_assignment(stems, 2, 0, groups) == fold).all()
    plain = fold_assignment(stems, 3, seed=1)
    assert sorted(np.bincount(plain).tolist()) == [3, 3, 4]


def test_fold_predictions_never_come_from_a_model_that_trained_on_the_image(synth_data, tmp_path, monkeypatch):
    from qgseg import weak as W

    trained_on: dict[str, set[int]] = {}
    init = W.WeakTask.__init__

    def spy(self, model, data, train_idx, *args, **kwargs):
        init(self, model, data, train_idx, *args, **kwargs)
        trained_on[kwargs.get("pred_prefix", "")] = {int(i) for i in self.train_idx}

    monkeypatch.setattr(W.WeakTask, "__init__", spy)
    run, summary = W.run_train_weak(_loaded(synth_data, tmp_path, ["weak.folds=2", "weak.fold_epochs_at=[1, 2]"]))
    assert run.status == "completed" and summary["folds"] == 2 and len(summary["fold_checkpoints"]) == 4
    stems = json.loads((run.path / "stems.json").read_text())
    splits = json.loads((run.path / "splits.json").read_text())
    assert set(trained_on) == {"", "folds/f0_", "folds/f1_"}
    assert trained_on[""] == {stems.index(s) for s in splits["train"]}
    assignment = json.loads((run.path / "folds.json").read_text())
    for f in (0, 1):
        held = {stems.index(s) for s, k in assignment.items() if k == f}
        assert held and not held & trained_on[f"folds/f{f}_"]
        assert trained_on[f"folds/f{f}_"] | held == trained_on[""]
    # every out-of-fold mask of a training case is the prediction of the model that held it out
    fold = W.load_fold_predictions(run, splits["train"], 32)
    assert fold.shape == (2, len(splits["train"]), 32, 32)
    for i, s in enumerate(splits["train"]):
        f = assignment[s]
        for c, e in enumerate((1, 2)):
            with np.load(run.path / "predictions" / "folds" / f"f{f}_e{e:03d}.npz") as z:
                rows = z["rows"].tolist()
                assert not z["trained"][rows.index(stems.index(s))]
                full = np.unpackbits(z["packed"], axis=-1, count=32).reshape(tuple(z["shape"]))
            assert (fold[c, i] == full[rows.index(stems.index(s))]).all()
            assert stems.index(s) not in trained_on[f"folds/f{f}_"]
    # real predictions of the test cases: every checkpoint (none trained on them), with signals
    real = W.load_real_predictions(run, splits["test"], 32)
    assert len(real) == len(splits["test"]) * (2 + 4)
    assert np.isfinite(real.confidence).all() and np.isfinite(real.agreement).all()
    assert sorted(set(real.source)) == ["fold0_e001", "fold0_e002", "fold1_e001", "fold1_e002",
                                        "weak_e001", "weak_e002"]
    # a training case's real predictions come from its own fold model only
    own = W.load_real_predictions(run, splits["train"][:1], 32)
    assert set(own.source) == {f"fold{assignment[splits['train'][0]]}_e001", f"fold{assignment[splits['train'][0]]}_e002"}


def test_train_quality_with_folds_reports_real_predictions(synth_data, tmp_path):
    from qgseg.train_quality import run_train_quality
    from qgseg.weak import run_train_weak

    run_train_weak(_loaded(synth_data, tmp_path, ["weak.folds=2"]))
    run, summary = run_train_quality(_loaded(synth_data, tmp_path, ["corrupt.p_fold=0.5", "quality.resample=true",
                                                                    "quality.epochs=2"]))
    assert run.status == "completed"
    for split in ("val", "test"):
        for signal in ("", "confidence_", "agreement_"):
            for metric in ("pearson", "spearman", "pairwise_accuracy", "aurc"):
                assert f"{split}_real_{signal}{metric}" in summary
        assert summary[f"{split}_real_masks"] == summary[f"{split}_real_images"] * 6
    table = __import__("pandas").read_csv(run.path / "test_real_predictions.csv")
    assert {"stem", "source", "dice", "pred", "confidence", "agreement"} <= set(table.columns)
    assert 0 <= summary["test_real_failure_rate"] <= 1


def test_grouped_order_runs_of_one_case():
    from qgseg.train_quality import grouped_order

    case = torch.tensor([0] * 8 + [1] * 8 + [2] * 4)
    order = grouped_order(case, 4, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(20))
    runs = case[order].view(5, 4)
    assert (runs == runs[:, :1]).all()  # every run of 4 is one case
    again = grouped_order(case, 4, torch.Generator().manual_seed(0))
    assert (order == again).all()
    assert not (order == grouped_order(case, 4, torch.Generator().manual_seed(1))).all()


def test_train_quality_with_rank_loss(synth_data, tmp_path):
    from qgseg.train_quality import run_train_quality

    run, summary = run_train_quality(_loaded(synth_data, tmp_path, ["quality.rank_weight=1.0", "corrupt.p_weak=0",
                                                                    "corrupt.k=8"]))
    assert run.status == "completed"
    header = (run.path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"fit_loss", "rank_loss"} <= set(header)
    assert summary["real_note"].startswith("no train-weak run")


def test_evaluate_scores_real_predictions_of_another_weak_run(synth_data, tmp_path):
    from qgseg.evaluate import run_evaluate
    from qgseg.train_quality import run_train_quality
    from qgseg.weak import run_train_weak

    qrun, _ = run_train_quality(_loaded(synth_data, tmp_path, ["corrupt.p_weak=0"]), out=tmp_path / "q")
    wrun, _ = run_train_weak(_loaded(synth_data, tmp_path, ["weak.folds=2", "weak.epochs_at=[1]",
                                                            "weak.fold_epochs_at=[1]"]), out=tmp_path / "w")
    loaded = _loaded(synth_data, tmp_path)
    _, summary = run_evaluate(loaded, qrun.path, split="val", weak=str(wrun.path))
    assert summary["real_weak_run"] == str(wrun.path)
    assert summary["real_masks"] == summary["real_images"] * 3  # the weak checkpoint and two fold models
    assert {"real_spearman", "real_confidence_spearman", "real_agreement_aurc", "real_aurc_oracle"} <= set(summary)
    assert (qrun.path / "eval" / "val" / "real_predictions.csv").is_file()
    # the Rich table sets g beside the two baselines
    from typer.testing import CliRunner

    from qgseg.cli import app

    res = CliRunner().invoke(app, ["evaluate", str(qrun.path), "--split", "val", "--weak", str(wrun.path)],
                             env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "agreement" in res.output and "AURC, failure = Dice < 0.8" in res.output


def test_corrupt_dataset_draws_out_of_fold_masks():
    from qgseg.corrupt import corrupt_dataset

    masks = np.zeros((3, 16, 16), np.uint8)
    masks[:, 4:12, 4:12] = 1
    fold = np.zeros((2, 3, 16, 16), np.uint8)
    fold[0, :, 4:12, 4:8] = 1  # Dice 2 * 32 / (32 + 64) = 2 / 3
    fold[1, :, 0:4, 0:4] = 1  # Dice 0
    cs = corrupt_dataset(masks, 6, seed=3, fold=fold, p_fold=1.0)
    assert set(cs.category) == {"fold"}
    for m, c, op, d in zip(cs.masks, cs.case, cs.ops, cs.dice):
        assert (m == fold[int(op[-1]), c]).all()
        assert d == pytest.approx(2 / 3 if op == "fold_ckpt0" else 0.0)
    plain = corrupt_dataset(masks, 6, seed=3)
    off = corrupt_dataset(masks, 6, seed=3, fold=fold, p_fold=0.0)  # exactly the draws made without it
    assert (plain.masks == off.masks).all() and plain.ops == off.ops


def test_a_weak_run_from_before_the_signals_still_gives_its_real_predictions(synth_data, tmp_path):
    """Prediction files written before this change hold every row, no `trained`, no signals: the
    reader takes the weak model's predictions of non-training images, and the baselines are NaN."""
    from qgseg.quality import real_metrics
    from qgseg.weak import load_real_predictions, run_train_weak

    run, _ = run_train_weak(_loaded(synth_data, tmp_path, ["weak.epochs_at=[1]"]))
    path = run.path / "predictions" / "e001.npz"
    with np.load(path) as z:
        old = {k: z[k] for k in ("packed", "shape", "dice")}
    np.savez(path, **old)  # the old format
    splits = json.loads((run.path / "splits.json").read_text())
    real = load_real_predictions(run, splits["test"], 32)
    assert len(real) == len(splits["test"]) and np.isnan(real.confidence).all()
    with pytest.raises(Exception, match="no stored prediction"):
        load_real_predictions(run, splits["train"], 32)  # the weak model trained on these
    m = real_metrics({"": real.dice, "confidence_": real.confidence}, real.dice, real.case)
    assert math.isnan(m["confidence_spearman"]) and math.isnan(m["confidence_aurc"])
