"""`qgseg qc`: score masks from any tool with g; --truth match report; --fail-below exit code."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import synth_world
from typer.testing import CliRunner

from qgseg.cli import app
from qgseg.config import load_config
from qgseg.metrics import aurc

runner = CliRunner()
TINY = ["data.image_size=32", "corrupt.k=2", "corrupt.eval_k=2", "corrupt.p_weak=0.0", "quality.epochs=1",
        "quality.batch_size=8"]


@pytest.fixture(scope="module")
def g_run(tmp_path_factory):
    """A tiny train-quality run and a folder of masks of varying quality for 12 images."""
    from qgseg.train_quality import run_train_quality

    with synth_world(tmp_path_factory, "qc", n_labeled=12, n_unlabeled=2, size=48, seed=1) as (root, opts):
        run, _ = run_train_quality(load_config(options=opts, sets=TINY, cwd=root))
        truth = root / "data" / "labeled" / "masks"
        tool = root / "tool"  # another tool's masks: some exact, some eroded, some empty, named <stem>_mask.png
        tool.mkdir()
        for i, p in enumerate(sorted(truth.glob("*.png"))):
            m = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
            if i % 3 == 1:
                m = cv2.erode(m, np.ones((7, 7), np.uint8))
            elif i % 3 == 2:
                m = np.zeros_like(m)
            cv2.imwrite(str(tool / f"{p.stem}_mask.png"), m)
        yield {"root": root, "run": run.path, "images": root / "data" / "labeled" / "images", "masks": tool,
               "truth": truth}


def _qc(g_run, *extra, images=None):
    old = os.getcwd()
    os.chdir(g_run["root"])
    try:
        return runner.invoke(app, ["qc", "--quality", str(g_run["run"]), "--images", str(images or g_run["images"]),
                                   *map(str, extra), "--json"], catch_exceptions=False)
    finally:
        os.chdir(old)


def test_aurc_is_lowest_when_failures_come_last():
    dice = np.array([0.9, 0.2, 0.8, 0.3])
    best = aurc(np.array([4, 1, 3, 2.0]), dice, 0.5)  # failures scored lowest
    worst = aurc(np.array([1, 4, 2, 3.0]), dice, 0.5)  # failures scored highest
    # accepted in order: good, good, fail, fail -> risks 0, 0, 1/3, 2/4
    assert best == pytest.approx((0 + 0 + 1 / 3 + 2 / 4) / 4)
    assert worst == pytest.approx((1 + 1 + 2 / 3 + 2 / 4) / 4)
    assert math.isnan(aurc([], [], 0.5))
    assert aurc([0.5, np.nan], [0.1, 0.9], 0.5) == pytest.approx(1.0)  # NaN pairs dropped


def test_qc_scores_sorts_flags_and_reports_the_match_with_truth(g_run, tmp_path):
    out = tmp_path / "qc"
    res = _qc(g_run, "--masks", g_run["masks"], "--truth", g_run["truth"], "--out", out, "--flag-below", "0.6")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    table = pd.read_csv(out / "qc.csv")
    assert len(table) == 12 and s["scored"] == 12
    assert table["quality"].is_monotonic_increasing  # worst first
    assert (table["flag"] == (table["quality"] < 0.6)).all() and s["flagged"] == int(table["flag"].sum())
    # true Dice at the original size: exact masks 1, empty ones 0, eroded ones in between
    by_stem = table.set_index("stem")["true_dice"]
    stems = sorted(by_stem.index)
    assert by_stem[stems[0]] == pytest.approx(1.0) and by_stem[stems[2]] == 0.0 and 0 < by_stem[stems[1]] < 1
    m = s["match"]
    assert m["cases"] == 12 and m["failures"] == 4 + int((by_stem[stems[1::3]] < 0.6).sum())
    assert m["pairwise_same_image"] is None and -1 <= m["spearman"] <= 1
    assert m["aurc"] == pytest.approx(aurc(table["quality"], table["true_dice"], 0.6))
    for name in ("lowest.png", "histogram.png", "scatter.png", "summary.json"):
        assert (out / name).stat().st_size > 0


def test_qc_fail_below_sets_exit_code_4(g_run, tmp_path):
    res = _qc(g_run, "--masks", g_run["masks"], "--out", tmp_path / "a", "--fail-below", "1.0")
    assert res.exit_code == 4
    assert "below --fail-below 1" in res.stderr
    assert json.loads(res.stdout)["below_fail"] == 12  # the report is complete before the exit
    res = _qc(g_run, "--masks", g_run["masks"], "--out", tmp_path / "b", "--fail-below", "0.0")
    assert res.exit_code == 0 and json.loads(res.stdout)["below_fail"] == 0


@pytest.mark.parametrize("case", ["mask without image", "size mismatch", "missing truth", "no g"])
def test_qc_bad_input_is_exit_2(g_run, tmp_path, case):
    masks = tmp_path / "masks"
    shutil.copytree(g_run["masks"], masks)
    extra: list = []
    if case == "mask without image":
        shutil.copy(next(masks.iterdir()), masks / "stranger_mask.png")
    elif case == "size mismatch":
        p = sorted(masks.iterdir())[0]
        cv2.imwrite(str(p), np.zeros((10, 10), np.uint8))
    elif case == "missing truth":
        truth = tmp_path / "truth"
        shutil.copytree(g_run["truth"], truth)
        sorted(truth.iterdir())[0].unlink()
        extra = ["--truth", truth]
    if case == "no g":
        res = runner.invoke(app, ["qc", "--quality", str(tmp_path / "none"), "--images", str(g_run["images"]),
                                  "--masks", str(masks)])
    else:
        res = _qc(g_run, "--masks", masks, "--out", tmp_path / "out", *extra)
    assert res.exit_code == 2, res.output
    assert len([x for x in res.stderr.splitlines() if x.startswith("qgseg: error:")]) == 1
    assert not (tmp_path / "out" / "qc.csv").exists()


def test_qc_on_ph2_with_a_weak_models_masks(ph2, g_run, tmp_path):
    """Real images: masks thresholded from a crude intensity rule, scored and matched with the truth."""
    imgs, truth, masks = tmp_path / "images", tmp_path / "truth", tmp_path / "masks"
    for d in (imgs, truth, masks):
        d.mkdir()
    for p in sorted((ph2 / "images").iterdir())[:10]:
        shutil.copy(p, imgs / p.name)
        shutil.copy(ph2 / "masks" / f"{p.stem}.png", truth / f"{p.stem}.png")
        grey = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(masks / f"{p.stem}.png"), ((grey < np.median(grey)) * 255).astype(np.uint8))
    res = _qc(g_run, "--masks", masks, "--truth", truth, "--out", tmp_path / "out", images=imgs)
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "out" / "qc.csv")
    assert len(table) == 10 and table["true_dice"].between(0, 1).all()
    assert Path(json.loads(res.stdout)["csv"]).is_file()
