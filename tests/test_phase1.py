"""Phase 1 stages end to end on tiny synthetic data, and the grounding checks."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from qgseg.cli import app
from qgseg.config import QualityConfig, load_config
from qgseg.corrupt import CorruptedSet, load_set, run_corrupt
from qgseg.quality import predict_quality, quality_report
from qgseg.runs import Run
from qgseg.train_quality import run_train_quality
from qgseg.weak import load_weak_predictions, run_train_weak

TINY = [
    "data.image_size=32", "corrupt.k=3", "corrupt.eval_k=2", "quality.epochs=2", "quality.batch_size=8",
    "quality.patience=5", "weak.epochs_at=[1, 2]", "weak.batch_size=4",
]


def _loaded(synth_data, tmp_path, extra=()):
    return load_config(options={"data.labeled": str(synth_data / "labeled"), "runs_root": str(tmp_path / "runs")},
                       sets=TINY + list(extra), cwd=tmp_path)


def test_train_weak_then_quality_with_type2(synth_data, tmp_path):
    run, summary = run_train_weak(_loaded(synth_data, tmp_path))
    assert run.status == "completed"
    assert [c["epoch"] for c in summary["checkpoints"]] == [1, 2]
    assert (run.checkpoints / "weak_e001.pt").is_file() and (run.checkpoints / "weak_e002.pt").is_file()
    stems = json.loads((run.path / "stems.json").read_text())
    preds, epochs = load_weak_predictions(run, stems, 32)
    assert preds.shape == (2, len(stems), 32, 32) and epochs == [1, 2]
    assert set(np.unique(preds)) <= {0, 1}

    # p_weak = 1: every training mask of D_Q is a weak prediction, found by itself (newest weak run)
    crun, csum = run_corrupt(_loaded(synth_data, tmp_path, ["corrupt.p_weak=1.0"]))
    assert csum["weak_run"] == str(run.path)
    assert set(csum["categories"]) == {"weak"}
    tr = load_set(crun.path / "dq_train.npz")
    index = pd.read_csv(crun.path / "index.csv")
    sizes = {s: len(load_set(crun.path / f"dq_{s}.npz")) for s in ("train", "val", "test")}
    assert len(tr) == 3 * len(json.loads((crun.path / "splits.json").read_text())["train"])
    assert index["split"].value_counts().to_dict() == sizes
    assert (crun.plots / "examples.png").is_file() and (crun.plots / "dice_hist.png").is_file()


def test_train_weak_honours_max_labeled(synth_data, tmp_path):
    """A user with N labels has no others: the weak U-Net trains on the same capped subset as ssl."""
    run, _ = run_train_weak(_loaded(synth_data, tmp_path, ["data.max_labeled=4", "weak.epochs_at=[1]"]))
    splits = json.loads((run.path / "splits.json").read_text())
    assert len(splits["train"]) == 4 and len(splits["unused"]) > 0
    assert not set(splits["train"]) & set(splits["unused"])


def test_corrupt_is_reproducible(synth_data, tmp_path):
    r1, s1 = run_corrupt(_loaded(synth_data, tmp_path, ["corrupt.p_weak=0.0"]), out=tmp_path / "a")
    r2, s2 = run_corrupt(_loaded(synth_data, tmp_path, ["corrupt.p_weak=0.0"]), out=tmp_path / "b")
    for split in ("train", "val", "test"):
        assert (r1.path / f"dq_{split}.npz").read_bytes() == (r2.path / f"dq_{split}.npz").read_bytes()
    assert s1["dice_quantiles"] == s2["dice_quantiles"]


def test_train_quality_cli_end_to_end(synth_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["train-quality", "--labeled", str(synth_data / "labeled"), "--json",
                                   "--out", str(tmp_path / "q"), *sum([["--set", s] for s in TINY], [])])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    run = Run(tmp_path / "q")
    assert run.status == "completed"
    for key in ("test_mae", "test_rmse", "test_pearson", "test_spearman", "test_mae_zero_image",
                "test_mae_shuffled_image", "test_zero_image_mae_increase", "test_shuffled_image_mae_increase"):
        assert key in summary and isinstance(summary[key], float)
    assert summary["test_zero_image_mae_increase"] == pytest.approx(
        summary["test_mae_zero_image"] - summary["test_mae"])
    rows = (run.path / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,") and len(rows) == 3
    assert {"val_loss", "val_zero_image_mae_increase", "val_shuffled_image_mae_increase"} <= set(rows[0].split(","))
    assert (run.plots / "scatter.png").is_file()
    table = pd.read_csv(run.path / "test_predictions.csv")
    assert {"stem", "category", "dice", "pred", "pred_zero_image", "pred_shuffled_image"} <= set(table.columns)
    assert np.allclose(table["abs_error"].mean(), summary["test_mae"])
    for name in ("best.pt", "last.pt"):
        assert (run.checkpoints / name).is_file()


class _MeanImage(torch.nn.Module):
    """A fake g whose output is the mean of the image's first channel (so we see which image it got)."""

    def forward(self, x, m):
        return x[:, 0].mean(dim=(1, 2))


def _set(cases, h=4):
    n = len(cases)
    return CorruptedSet(case=np.array(cases, np.int32), masks=np.zeros((n, h, h), np.uint8),
                        dice=np.linspace(0, 1, n).astype(np.float32), category=["x"] * n, ops=[""] * n)


def test_grounding_checks_feed_the_right_images():
    n = 5
    images = torch.zeros((n, 4, 4, 3), dtype=torch.uint8)
    for i in range(n):
        images[i] = 40 * i  # each case has its own brightness
    rows = np.arange(n)
    cs = _set([0, 1, 2, 3, 4, 0])
    g = _MeanImage()
    normal = predict_quality(g, images, rows, cs, torch.device("cpu"))
    assert np.all(np.diff(normal[:5]) > 0) and normal[5] == normal[0]  # own image: brightness order
    zero = predict_quality(g, images, rows, cs, torch.device("cpu"), "zero")
    assert np.allclose(zero, 0.0)
    shuf = predict_quality(g, images, rows, cs, torch.device("cpu"), "shuffled", seed=3)
    # every mask got another case's image, and masks of one case all got the same other image
    assert not np.any(np.isclose(shuf[:5], normal[:5]))
    assert shuf[5] == shuf[0]
    assert sorted(np.round(shuf[:5], 5)) == sorted(np.round(normal[:5], 5))  # a permutation of the cases


def test_quality_report_metrics_match_hand_computation():
    class _Const(torch.nn.Module):
        def forward(self, x, m):
            return m.mean(dim=(1, 2, 3)) * 0 + 0.5

    n = 4
    from qgseg.data import LabeledData

    data = LabeledData(root=None, layout="x", stems=[f"c{i}" for i in range(n)],
                       images=np.zeros((n, 4, 4, 3), np.uint8), masks=np.zeros((n, 4, 4), np.uint8),
                       orig_sizes=np.zeros((n, 2), np.int32))
    cs = _set([0, 1, 2, 3])
    out, table = quality_report(_Const(), data, np.arange(n), cs, torch.device("cpu"), data.stems)
    true = cs.dice.astype(float)
    assert out["mae"] == pytest.approx(np.abs(0.5 - true).mean())
    assert out["mae_zero_image"] == pytest.approx(out["mae"])  # g ignores the image: no increase
    assert out["zero_image_mae_increase"] == pytest.approx(0.0)
    assert np.isnan(out["pearson"])  # constant prediction
    assert list(table["stem"]) == data.stems


def test_resample_draws_fresh_seeded_sets_and_keeps_dq_for_epoch_1():
    from qgseg.corrupt import corrupt_dataset, dice
    from qgseg.train_quality import Resample

    rng = np.random.default_rng(0)
    masks = np.zeros((3, 24, 24), np.uint8)
    for i in range(3):
        masks[i, 4 + i:16 + i, 5:18 - i] = 1
    weak = (rng.random((2, 3, 24, 24)) > 0.5).astype(np.uint8)
    r = Resample(masks, weak, k=4, p_weak=0.3, seed=7)
    e2, e2_again, e3 = r.draw(2), r.draw(2), r.draw(3)
    assert np.array_equal(e2.masks, e2_again.masks) and np.array_equal(e2.dice, e2_again.dice)
    assert not np.array_equal(e2.masks, e3.masks)  # a new draw each epoch
    assert len(e2) == 12 and list(e2.case) == [0] * 4 + [1] * 4 + [2] * 4
    for j in range(len(e2)):  # every label is the Dice of its own mask against its own case
        assert e2.dice[j] == pytest.approx(dice(e2.masks[j], masks[e2.case[j]]))
    # D_Q itself (seed 7) is not one of the later epochs' draws
    assert not np.array_equal(corrupt_dataset(masks, 4, 7, weak=weak, p_weak=0.3).masks, e2.masks)
    # under a masks_per_epoch cap an epoch draws only the corruptions per case it can use
    capped = Resample(masks, weak, k=4, p_weak=0.3, seed=7, max_masks=5).draw(2)
    assert list(capped.case) == [0, 0, 1, 1, 2, 2]
    assert len(Resample(masks, weak, k=4, p_weak=0.3, seed=7, max_masks=100).draw(2)) == 12


def test_train_quality_resample_trains_on_new_masks(synth_data, tmp_path, monkeypatch):
    from qgseg import train_quality as phase1

    seen = []
    orig = phase1.QualityTask._use

    def spy(self, cs):
        seen.append(cs.masks.copy())
        return orig(self, cs)

    monkeypatch.setattr(phase1.QualityTask, "_use", spy)
    run, summary = run_train_quality(_loaded(synth_data, tmp_path, ["quality.resample=true", "corrupt.p_weak=0.0",
                                                                     "quality.epochs=3"]))
    assert run.status == "completed" and summary["epochs_run"] == 3
    # __init__ and epoch 1 use D_Q; epochs 2 and 3 each get their own draw of the same size
    assert len(seen) == 4 and np.array_equal(seen[0], seen[1])
    assert seen[2].shape == seen[0].shape and not np.array_equal(seen[2], seen[0])
    assert not np.array_equal(seen[3], seen[2])


def test_train_quality_input_size_and_tta_views_travel_with_g(synth_data, tmp_path):
    from qgseg.quality import QualityNet, QualityPredictor

    run, summary = run_train_quality(_loaded(synth_data, tmp_path, ["data.image_size=64", "quality.input_size=32",
                                                                     "quality.tta_views=4", "corrupt.p_weak=0.0",
                                                                     "quality.epochs=1"]))
    assert run.status == "completed"
    assert summary["image_size"] == 64 and summary["g_input_size"] == 32 and summary["g_tta_views"] == 4
    n_train = len(json.loads((run.path / "splits.json").read_text())["train"])
    assert summary["train_masks_seen"] == 3 * n_train // 8 * 8  # 1 epoch of K = 3 masks per case, batch 8
    table = pd.read_csv(run.path / "test_predictions.csv")
    assert table["pred"].between(0, 1).all()
    # ssl and evaluate at the data's 64 px get a g that resizes to 32 px itself
    g = QualityPredictor.from_run(run, 64)
    assert g.net.input_size == 32 and g.image_size == 64
    x, m = torch.randn(2, 3, 64, 64), torch.ones(2, 1, 64, 64)
    assert torch.allclose(g.score(x, m), g.score(F.avg_pool2d(x, 2), F.avg_pool2d(m, 2)), atol=1e-6)
    # ... and scores as the mean over the four rotations, like train-quality's report did
    one = QualityNet(**{**g.net.spec, "tta_views": 1}).eval()
    one.load_state_dict(g.net.state_dict())
    x, m = torch.randn(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.5).float()
    rotated = torch.stack([one(torch.rot90(x, k, (2, 3)), torch.rot90(m, k, (2, 3))) for k in range(4)])
    assert torch.allclose(g.score(x, m), rotated.mean(0), atol=1e-5)


def _bare_task(images, gt, masks, dice, batch_size, **options):
    """A QualityTask over hand-made cases (all of them training cases, K masks each) with g = identity."""
    from qgseg.train_quality import QualityTask

    n = len(images)
    k = len(masks) // n
    cs = CorruptedSet(case=np.repeat(np.arange(n), k).astype(np.int32), masks=masks, dice=dice,
                      category=["single"] * len(masks), ops=[""] * len(masks))
    data = type("Data", (), {"images": images, "masks": gt})()
    resample = options.pop("resample", None)
    q = QualityConfig(batch_size=batch_size, **options)
    return QualityTask(torch.nn.Identity(), data, {"train": np.arange(n)}, {"train": cs}, q,
                       torch.device("cpu"), resample=resample)


def test_masks_per_epoch_caps_the_steps_and_draws_a_new_share_each_epoch():
    n, h = 6, 16  # 6 cases, 4 masks each, every image one grey level that tells its case
    images = np.repeat(40 * np.arange(n, dtype=np.uint8), h * h * 3).reshape(n, h, h, 3)

    def task(**options):
        return _bare_task(images, np.ones((n, h, h), np.uint8), np.ones((4 * n, h, h), np.uint8),
                          np.ones(4 * n, np.float32), 4, **options)

    full = task()
    assert full.steps_per_epoch() == 6 and len(list(full.batches(1, torch.Generator().manual_seed(0)))) == 6
    capped, gen = task(masks_per_epoch=8), torch.Generator().manual_seed(0)
    epochs = []
    for epoch in (1, 2):
        batches = list(capped.batches(epoch, gen))
        assert capped.steps_per_epoch() == 2 and len(batches) == 2 and all(len(b[2]) == 4 for b in batches)
        epochs.append(torch.cat([b[0][:, 0, 0, 0] for b in batches]))  # the grey level tells the case
    assert not torch.equal(epochs[0], epochs[1])


def test_p_lesion_free_shows_a_share_of_masks_on_lesion_free_images_with_target_dice_vs_empty():
    n, h, k = 4, 32, 50
    yy, xx = np.mgrid[:h, :h]
    gt = np.stack([((yy - 16) ** 2 + (xx - 12 - 2 * i) ** 2 < 64).astype(np.uint8) for i in range(n)])
    images = np.full((n, h, h, 3), 200, np.uint8)
    images[gt == 1] = 40  # dark lesions on bright skin
    masks = np.repeat(gt, k, axis=0)
    masks[::5] = 0  # every fifth training mask is empty: Dice vs the empty truth is 1 there
    dice = np.full(n * k, 0.8, np.float32)
    task = _bare_task(images, gt, masks, dice, 20, p_lesion_free=0.3)
    x, m, y = (torch.cat(t) for t in zip(*task.batches(1, torch.Generator().manual_seed(0))))
    dark = (x.mean(1) < -1).flatten(1).any(1)  # the lesion's dark pixels are still in the image
    free = ~dark
    assert 0.2 < free.float().mean() < 0.4  # about p_lesion_free of the masks
    empty = m.flatten(1).amax(1) == 0
    assert torch.equal(y[dark], torch.full_like(y[dark], 0.8))  # normal masks keep their Dice
    assert torch.equal(y[free], empty[free].float())  # lesion-free: 0, or 1 for an empty mask
    assert (y[free] == 1).any() and (y[free] == 0).any()
    # off by default: no lesion-free images, and the generator's draws are those of before
    plain = _bare_task(images, gt, masks, dice, 20)
    _, _, y0 = (torch.cat(t) for t in zip(*plain.batches(1, torch.Generator().manual_seed(0))))
    assert torch.equal(y0, torch.full_like(y0, 0.8))


def test_train_quality_with_lesion_free_images_end_to_end(synth_data, tmp_path, monkeypatch):
    from qgseg import corrupt

    seen = []
    orig = corrupt.remove_lesions
    monkeypatch.setattr(corrupt, "remove_lesions", lambda im, m: seen.append(len(im)) or orig(im, m))
    run, summary = run_train_quality(_loaded(synth_data, tmp_path, ["quality.p_lesion_free=0.5", "corrupt.p_weak=0.0",
                                                                     "quality.epochs=1"]))
    assert run.status == "completed" and np.isfinite(summary["test_mae"])
    assert seen == [len(json.loads((run.path / "splits.json").read_text())["train"])]  # the training cases only


def test_color_jitter_changes_only_the_training_images():
    n, h = 4, 16
    rng = np.random.default_rng(0)
    images, masks = rng.integers(0, 256, (n, h, h, 3), dtype=np.uint8), rng.integers(0, 2, (2 * n, h, h), dtype=np.uint8)
    dice = rng.random(2 * n).astype(np.float32)

    def batch(**options):
        task = _bare_task(images, np.ones((n, h, h), np.uint8), masks, dice, 8, **options)
        return next(iter(task.batches(1, torch.Generator().manual_seed(0))))

    (x0, m0, y0), (x1, m1, y1) = batch(), batch(color_jitter=0.3)
    assert torch.equal(m0, m1) and torch.equal(y0, y1)  # same masks, flips and targets
    assert (x0 - x1).abs().flatten(1).mean(1).min() > 0.01  # every image got its own colour change


def test_each_epoch_reports_the_val_grounding_checks():
    from qgseg.train_quality import QualityTask

    n, h = 4, 8
    images = np.repeat(60 * np.arange(n, dtype=np.uint8), h * h * 3).reshape(n, h, h, 3)
    val = _set([0, 1, 2, 3], h)
    data = type("Data", (), {"images": images, "masks": np.ones((n, h, h), np.uint8)})()
    task = QualityTask(_MeanImage(), data, {"train": np.arange(n), "val": np.arange(n)},
                       {"train": _set([0, 1, 2, 3], h), "val": val}, QualityConfig(batch_size=2), torch.device("cpu"))
    row = task.evaluate(1)
    true = val.dice.astype(float)
    from qgseg.data import to_float_images

    own = np.array([to_float_images(torch.from_numpy(images[i:i + 1]))[0, 0].mean().item() for i in range(n)])
    mae = np.abs(own - true).mean()
    assert row["val_mae"] == pytest.approx(mae)
    assert row["val_zero_image_mae_increase"] == pytest.approx(np.abs(0 - true).mean() - mae)  # g gives 0 on zeros
    # shuffled: every mask on another case's image, so g's answers are the own ones under a derangement
    deranged = [np.abs(own[list(p)] - true).mean() - mae for p in itertools.permutations(range(n))
                if all(p[i] != i for i in range(n))]
    assert any(row["val_shuffled_image_mae_increase"] == pytest.approx(v) for v in deranged)


def test_select_last_keeps_the_final_epoch_as_best(synth_data, tmp_path):
    from qgseg.engine import load_checkpoint

    run, summary = run_train_quality(_loaded(synth_data, tmp_path, ["quality.select=last", "corrupt.p_weak=0.0",
                                                                     "quality.epochs=3"]))
    assert summary["best_epoch"] == summary["epochs_run"] == 3
    best, last = (load_checkpoint(run.checkpoints / f"{n}.pt") for n in ("best", "last"))
    assert best["epoch"] == 3
    for k, v in last["modules"]["g"].items():
        assert torch.equal(v, best["modules"]["g"][k]), k
    # the val loss is still reported every epoch, only not used to pick best.pt
    metrics = pd.read_csv(run.path / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3] and metrics["val_loss"].notna().all()


def test_select_last_scores_the_per_epoch_val_metrics_with_one_view():
    from qgseg.quality import build_quality_net, scoring_views
    from qgseg.train_quality import QualityTask

    n, h = 4, 32
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, h, h, 3), dtype=np.uint8)
    val = CorruptedSet(case=np.arange(n, dtype=np.int32), masks=rng.integers(0, 2, (n, h, h), dtype=np.uint8),
                       dice=np.linspace(0, 1, n).astype(np.float32), category=["x"] * n, ops=[""] * n)
    data = type("Data", (), {"images": images, "masks": np.ones((n, h, h), np.uint8)})()
    torch.manual_seed(0)
    g = build_quality_net("resnet18", tta_views=4).eval()

    def task(select):
        return QualityTask(g, data, {"train": np.arange(n), "val": np.arange(n)}, {"train": val, "val": val},
                           QualityConfig(batch_size=2, select=select), torch.device("cpu"))

    four = task("val_loss").evaluate(1)  # picks best.pt: scores as g will, with its four views
    last = task("last").evaluate(1)
    assert g.spec["tta_views"] == 4  # restored afterwards
    with scoring_views(g, 1):
        one = task("val_loss").evaluate(1)
    assert last["val_mae"] == pytest.approx(one["val_mae"]) and last["epoch"] == 1
    assert last["val_zero_image_mae_increase"] == pytest.approx(one["val_zero_image_mae_increase"])
    assert four["val_mae"] != pytest.approx(one["val_mae"], abs=1e-6)


def test_select_monitors_the_epoch_or_the_val_loss():
    n, h = 2, 8
    images = np.zeros((n, h, h, 3), np.uint8)
    task = _bare_task(images, np.ones((n, h, h), np.uint8), np.ones((2 * n, h, h), np.uint8),
                      np.ones(2 * n, np.float32), 2, select="last")
    assert (task.monitor, task.mode) == ("epoch", "max")
    plain = _bare_task(images, np.ones((n, h, h), np.uint8), np.ones((2 * n, h, h), np.uint8),
                       np.ones(2 * n, np.float32), 2)
    assert (plain.monitor, plain.mode) == ("val_loss", "min")
