"""`qgseg evaluate` on tiny ssl, train-weak and train-quality runs (32 px, one epoch)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import synth_world
from typer.testing import CliRunner

from qgseg.cli import app
from qgseg.config import load_config
from qgseg.metrics import mean_se

runner = CliRunner()
ENCODER = "tu-mobilenetv3_small_050"  # keeps the U-Net fast at 32 px
TINY = ["data.image_size=32", "corrupt.k=2", "corrupt.eval_k=2", "corrupt.p_weak=0.0", "quality.epochs=1",
        "quality.batch_size=8", "weak.epochs_at=[1]", "weak.batch_size=4", "weak.encoder=" + ENCODER,
        "model.arch=unet", "model.encoder=" + ENCODER, "train.epochs=1", "train.steps_per_epoch=1",
        "train.batch_size=4", "train.batch_size_unlabeled=4", "ssl.warmup=0", "ssl.rampup=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A train-quality, an ssl (mt + QW) and a train-weak run on 32 px synthetic data."""
    from qgseg.ssl import run_ssl
    from qgseg.train_quality import run_train_quality
    from qgseg.weak import run_train_weak

    with synth_world(tmp_path_factory, "eval", n_labeled=16, n_unlabeled=8, size=32, seed=0,
                     unlabeled=True) as (root, opts):
        q_run, q_sum = run_train_quality(load_config(options=opts, sets=TINY, cwd=root))
        s_run, s_sum = run_ssl(load_config(options=opts, sets=TINY + ["ssl.method=mt", "ssl.qw=true"], cwd=root))
        w_run, _ = run_train_weak(load_config(options=opts, sets=TINY, cwd=root))
        yield {"root": root, "quality": q_run.path, "q_sum": q_sum, "ssl": s_run.path, "s_sum": s_sum,
               "weak": w_run.path}


def _evaluate(*args: str, cwd: Path):
    import os

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, ["evaluate", *map(str, args), "--json"], catch_exceptions=False)
    finally:
        os.chdir(old)


def test_evaluate_ssl_run_writes_cases_summary_and_plots(runs):
    summary_before = (runs["ssl"] / "summary.json").read_bytes()
    res = _evaluate(runs["ssl"], "--quality", runs["quality"], cwd=runs["root"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    out = runs["ssl"] / "eval" / "test"
    assert Path(s["out"]) == out and s["checkpoint"] == "best.pt" and s["quality_run"] == str(runs["quality"])
    cases = pd.read_csv(out / "cases.csv")
    assert list(cases.columns) == ["stem", "dsc", "iou", "hd95", "pred_quality"]
    splits = json.loads((runs["ssl"] / "splits.json").read_text())
    assert sorted(cases["stem"]) == sorted(splits["test"]) and s["cases"] == len(cases)
    for col in ("dsc", "iou", "pred_quality"):
        m, se = mean_se(cases[col].to_numpy(float))
        assert s[col] == pytest.approx(m) and s[f"{col}_se"] == pytest.approx(se)
    assert ((cases["dsc"] >= 0) & (cases["dsc"] <= 1)).all()
    from scipy import stats

    r, p = stats.pearsonr(cases["pred_quality"], cases["dsc"])
    assert s["quality_pearson"] == pytest.approx(r) and s["quality_pearson_p"] == pytest.approx(p)
    # the same best checkpoint, the same test cases: the ssl run's own test DSC
    assert s["dsc"] == pytest.approx(runs["s_sum"]["test_dsc"])
    assert json.loads((out / "summary.json").read_text())["dsc"] == pytest.approx(s["dsc"])
    for png in ("scatter.png", "overlays.png"):
        assert (out / "plots" / png).stat().st_size > 5000
    assert (runs["ssl"] / "summary.json").read_bytes() == summary_before  # the run itself is untouched


def test_evaluate_other_dataset_last_checkpoint(runs, tiny_labeled):
    other = tiny_labeled(5, size=48, name="other-set")
    res = _evaluate(runs["ssl"], "--data", other, "--checkpoint", "last", "--quality", runs["quality"],
                    cwd=runs["root"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    out = runs["ssl"] / "eval" / "other-set"
    assert s["checkpoint"] == "last.pt" and s["split"] is None and s["cases"] == 5
    assert len(pd.read_csv(out / "cases.csv")) == 5


def test_evaluate_without_g_skips_the_column(runs, tmp_path):
    # no train-quality run under the runs root of this folder, nor beside the weak run: a note, no column
    import shutil

    lone = tmp_path / "r" / "train-weak" / "w"
    shutil.copytree(runs["weak"], lone)
    res = _evaluate(lone, cwd=tmp_path)
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["checkpoint"] == "weak_e001.pt" and s["quality_run"] == "" and "predicted-quality" in s["note"]
    assert "pred_quality" not in pd.read_csv(lone / "eval" / "test" / "cases.csv").columns
    assert not (lone / "eval" / "test" / "plots" / "scatter.png").exists()
    assert (lone / "eval" / "test" / "plots" / "overlays.png").is_file()


def test_evaluate_quality_run_reproduces_its_test_metrics(runs):
    res = _evaluate(runs["quality"], "--split", "test", cwd=runs["root"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    out = runs["quality"] / "eval" / "test"
    # the same D_Q test masks (seeded by the split) and the same best g: the same numbers
    for k in ("mae", "pearson", "mae_shuffled_image", "zero_image_mae_increase"):
        want = runs["q_sum"][f"test_{k}"]
        assert (s[k] is None and math.isnan(want)) or s[k] == pytest.approx(want)
    masks = pd.read_csv(out / "masks.csv")
    assert {"stem", "category", "dice", "pred", "pred_zero_image", "pred_shuffled_image"} <= set(masks.columns)
    assert len(masks) == s["masks"] == 2 * s["cases"]
    assert np.isclose(masks["abs_error"].mean(), s["mae"])
    assert (out / "plots" / "scatter.png").is_file() and (out / "plots" / "grounding.png").is_file()


def test_evaluate_bad_input_is_exit_2(runs, tmp_path):
    assert _evaluate(tmp_path, cwd=tmp_path).exit_code == 2  # not a run
    res = _evaluate(runs["ssl"], "--checkpoint", "middle", cwd=runs["root"])
    assert res.exit_code == 2 and "--checkpoint" in res.stderr
    res = _evaluate(runs["ssl"], "--split", "holdout", cwd=runs["root"])
    assert res.exit_code == 2 and "--split" in res.stderr
