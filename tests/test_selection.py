"""`qgseg select`: strategies on synthetic data (with an exact oracle g) and the simulated loop."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import synth_world
from typer.testing import CliRunner

from qgseg.cli import app
from qgseg.config import load_config
from qgseg.selection import pick, rank

runner = CliRunner()
ENCODER = "tu-mobilenetv3_small_050"
TINY = ["data.image_size=32", "model.arch=unet", "model.encoder=" + ENCODER, "train.epochs=1",
        "train.steps_per_epoch=2", "train.batch_size=4", "corrupt.k=2", "corrupt.eval_k=2", "corrupt.p_weak=0.0",
        "quality.epochs=1", "quality.batch_size=8"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic data at 32 px and a sup run trained on it briefly (its predictions vary in quality)."""
    from qgseg.ssl import run_ssl

    with synth_world(tmp_path_factory, "select", n_labeled=20, n_unlabeled=10, size=32, seed=2) as (root, opts):
        s_run, _ = run_ssl(load_config(options=opts, sets=TINY + ["ssl.method=sup"], cwd=root))
        yield {"root": root, "ssl": s_run.path, "labeled": root / "data" / "labeled",
               "unlabeled": root / "data" / "unlabeled"}


class Oracle:
    """An exact g: the true Dice of a mask, found by recognising its image among known ones."""

    def __init__(self, images: np.ndarray, masks: np.ndarray):
        from qgseg.data import to_float_images

        self.image_size = images.shape[1]
        self.images = to_float_images(torch.from_numpy(images)).flatten(1)
        self.masks = torch.from_numpy(masks.astype(bool))
        self.source = "oracle"

    def score(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        from qgseg.metrics import dice_per_sample

        idx = torch.cdist(x.flatten(1), self.images).argmin(1)
        return dice_per_sample(m[:, 0] > 0.5, self.masks[idx])


def test_rank_orders_lowest_score_first_and_random_is_seeded():
    t = pd.DataFrame({"quality": [0.9, 0.2, 0.5, 0.2], "confidence": [0.1, 0.3, 0.2, 0.9],
                      "agreement": [np.nan] * 4})
    assert list(rank(t, "quality")) == [1, 3, 2, 0]  # ties keep table order
    assert list(pick(t, "confidence", 2)) == [0, 2]
    r1, r2 = rank(t, "random", seed=5), rank(t, "random", seed=5)
    assert sorted(r1) == [0, 1, 2, 3] and list(r1) == list(r2)
    assert any(list(rank(t, "random", seed=s)) != list(r1) for s in range(6, 12))
    from qgseg.errors import InputError

    with pytest.raises(InputError, match="agreement"):
        rank(t, "agreement")
    with pytest.raises(InputError, match="--strategy"):
        rank(t, "entropy")


def test_quality_with_an_exact_g_picks_the_worst_predictions(world):
    from qgseg.data import load_labeled
    from qgseg.metrics import dice_per_sample
    from qgseg.predict import load_segmenter, score_images

    data = load_labeled(world["labeled"], 32)
    model, _, _ = load_segmenter(world["ssl"])
    probs, table = score_images(model, data.images, torch.device("cpu"), Oracle(data.images, data.masks), views=2)
    true = dice_per_sample(torch.from_numpy(probs > 0.5), torch.from_numpy(data.masks.astype(bool))).numpy()
    assert np.allclose(table["quality"], true, atol=1e-6)  # the oracle is exact
    assert np.ptp(true) > 0.05  # the predictions differ in quality, so the test can fail
    picks = pick(table, "quality", 3)
    assert sorted(true[picks]) == sorted(np.sort(true)[:3])
    assert true[picks[0]] == true.min()


def test_select_cli_writes_ranked_csv_and_sheet(world, tmp_path):
    old = os.getcwd()
    os.chdir(world["root"])
    try:
        res = runner.invoke(app, ["select", "--model", str(world["ssl"]), "--unlabeled", str(world["unlabeled"]),
                                  "--budget", "3", "--strategy", "agreement", "--out", str(tmp_path / "s"),
                                  "--json"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        s = json.loads(res.stdout)
        table = pd.read_csv(tmp_path / "s" / "selection.csv")
        assert len(table) == 10 and table["picked"].sum() == 3 and list(table["rank"]) == list(range(1, 11))
        assert table["agreement"].is_monotonic_increasing and s["picked"] == table["stem"][:3].tolist()
        assert (tmp_path / "s" / "picks.png").stat().st_size > 0
        # the quality strategy needs a g: none exists under this runs root
        res = runner.invoke(app, ["select", "--model", str(world["ssl"]), "--unlabeled", str(world["unlabeled"]),
                                  "--budget", "3", "--out", str(tmp_path / "q")])
        assert res.exit_code == 2 and "--strategy quality" in res.stderr
        res = runner.invoke(app, ["select", "--unlabeled", str(world["unlabeled"]), "--budget", "3"])
        assert res.exit_code == 2 and "--model" in res.stderr
    finally:
        os.chdir(old)


def test_simulate_adds_budget_per_round_and_resumes(world, tmp_path):
    from qgseg.selection import run_simulation

    loaded = load_config(options={"runs_root": str(tmp_path / "runs")}, sets=TINY, cwd=tmp_path)
    out = tmp_path / "sim"
    s = run_simulation(loaded, world["labeled"], out=out, initial=3, budget=2, rounds=2, seeds=1,
                       strategies=["confidence", "random", "quality"], tta=2)
    frame = pd.read_csv(out / "results.csv")
    assert len(frame) == 3 * 3  # 3 strategies x rounds 0..2
    assert sorted(frame["labeled"].unique()) == [3, 5, 7]
    assert frame[frame["round"] == 0]["test_dsc"].nunique() == 1  # one shared start
    for strategy in ("confidence", "random", "quality"):
        picks1 = pd.read_csv(out / "seed0" / strategy / "round1" / "picks.csv")
        picks2 = pd.read_csv(out / "seed0" / strategy / "round2" / "picks.csv")
        assert picks1["picked"].sum() == 2 and picks2["picked"].sum() == 2
        assert len(picks2) == len(picks1) - 2  # picked images left the pool
        assert not set(picks1.loc[picks1["picked"], "stem"]) & set(picks2["stem"])
        if strategy == "confidence":
            assert picks1.loc[picks1["picked"], "confidence"].max() <= picks1.loc[~picks1["picked"], "confidence"].min()
        splits = pd.read_csv(out / "seed0" / strategy / "round2" / "data" / "splits.csv")
        assert (splits["split"] == "train").sum() == 7
    assert [r["strategy"] for r in s["table"]][:3] == ["confidence", "random", "quality"]
    assert set(s["gain_over_random"]) == {"confidence", "quality"}
    assert (out / "seed0" / "g" / "run" / "summary.json").is_file()
    # a rerun trains nothing again and gives the same table
    stamp = (out / "seed0" / "random" / "round2" / "run" / "summary.json").stat().st_mtime_ns
    again = run_simulation(loaded, world["labeled"], out=out, initial=3, budget=2, rounds=2, seeds=1,
                           strategies=["confidence", "random", "quality"], tta=2)
    assert again["table"] == s["table"]
    assert (out / "seed0" / "random" / "round2" / "run" / "summary.json").stat().st_mtime_ns == stamp
    from qgseg.errors import InputError

    with pytest.raises(InputError, match="--out"):
        run_simulation(loaded, world["labeled"], out=out, initial=4, budget=2, rounds=2, seeds=1)
    with pytest.raises(InputError, match="training split"):
        run_simulation(loaded, world["labeled"], out=tmp_path / "big", initial=10, budget=5, rounds=2, seeds=1)


def test_simulate_cli_needs_labeled_data(tmp_path):
    res = runner.invoke(app, ["select", "--simulate", "--budget", "2"], env={"QGSEG_CACHE": str(tmp_path)})
    assert res.exit_code == 2 and "--labeled" in res.stderr


def test_simulate_cli_table(world, tmp_path):
    res = runner.invoke(app, ["select", "--simulate", "--labeled", str(world["labeled"]), "--initial", "3",
                              "--budget", "2", "--rounds", "1", "--seeds", "1", "--strategies", "random",
                              "--out", str(tmp_path / "sim"), *sum((["--set", x] for x in TINY), []),
                              "--set", f"runs_root={tmp_path / 'runs'}"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "random" in res.stdout and "test DSC" in res.stdout
    assert Path(tmp_path / "sim" / "summary.json").is_file()
