"""`qgseg demo` end to end at a tiny scale (32 px, one epoch, one step per epoch)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qgseg.cli import app
from qgseg.demo import DEMO_ROWS
from qgseg.metrics import mean_se
from qgseg.runs import Run

ENCODER = "tu-mobilenetv3_small_050"
TINY = ["data.image_size=32", "corrupt.k=2", "corrupt.eval_k=2", "quality.epochs=1", "quality.batch_size=8",
        "weak.epochs_at=[1]", "weak.batch_size=4", "weak.encoder=" + ENCODER, "model.encoder=" + ENCODER,
        "train.epochs=1", "train.steps_per_epoch=1", "train.batch_size=4", "train.batch_size_unlabeled=4"]


def _demo(out: Path):
    args = ["demo", "--out", str(out), "--n-labeled", "16", "--n-unlabeled", "6", "--json"]
    return CliRunner().invoke(app, args + sum([["--set", s] for s in TINY], []), catch_exceptions=False)


def test_demo_runs_the_whole_pipeline_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land outside --out
    out = tmp_path / "demo"
    res = _demo(out)
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["out"] == str(out.resolve()) and s["image_size"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    assert sorted(p.name for p in (out / "data" / "labeled" / "images").iterdir())[0] == "case_000.png"
    assert len(list((out / "data" / "unlabeled" / "images").iterdir())) == 6

    weak, quality = Run(out / "train-weak" / "weak"), Run(out / "train-quality" / "g")
    assert weak.status == quality.status == "completed"
    assert quality.meta["weak_run"] == str(weak.path.resolve())  # Type 2 masks from the demo's weak U-Net
    assert s["quality_run"] == str(quality.path.resolve())

    assert [(r["method"], r["qw"]) for r in s["rows"]] == list(DEMO_ROWS)
    # the few-label regime: 8 of the 11 training images (the demo preset's data.max_labeled)
    assert s["n_train"] == 8 and s["n_test"] == len(json.loads((Path(s["rows"][0]["run"]) / "splits.json").read_text())["test"])
    sup = {r["stem"]: float(r["dsc"]) for r in csv.DictReader(open(Path(s["rows"][0]["run"]) / "test_cases.csv"))}
    for r in s["rows"][1:]:  # each row's DSC minus sup's on the same test images
        mine = {c["stem"]: float(c["dsc"]) for c in csv.DictReader(open(Path(r["run"]) / "test_cases.csv"))}
        d, se = mean_se([mine[k] - sup[k] for k in sup])
        assert r["d_dsc"] == pytest.approx(d) and r["d_dsc_se"] == pytest.approx(se)
    assert s["rows"][0]["d_dsc"] is None  # Supervised is the reference
    assert s["reading"].startswith("What the numbers mean:") and "noise" in s["reading"]
    for r in s["rows"]:
        run = Run(r["run"])
        summ = run.summary
        assert run.status == "completed" and run.stage == "ssl"
        assert (summ["method"], summ["qw"]) == (r["method"], r["qw"])
        assert summ["quality_run"] == str(quality.path.resolve())  # every ssl run is guided by that g
        assert (summ["qar_weight"] > 0) == (r["method"] == "qar")
        ev = json.loads((run.path / "eval" / "test" / "summary.json").read_text())
        assert r["dsc"] == pytest.approx(ev["dsc"]) == pytest.approx(summ["test_dsc"])
        assert r["iou"] == pytest.approx(ev["iou"]) and ev["quality_run"] == s["quality_run"]
        assert (run.path / "eval" / "test" / "cases.csv").is_file()
        assert (run.path / "eval" / "test" / "plots" / "overlays.png").is_file()
    # the demo folder is a runs root: evaluate finds the demo's g by itself
    res = CliRunner().invoke(app, ["evaluate", s["rows"][0]["run"], "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["quality_run"] == s["quality_run"], res.output
    table = (out / "table.md").read_text()
    assert table.count("| ssl/") == len(DEMO_ROWS) and "| MT | ✓ |" in table and s["reading"] in table
    assert (out / "table.csv").read_text().count("\n") == len(DEMO_ROWS) + 1

    # a second demo on the same folder reuses every completed run (nothing is trained again)
    ck = out / "ssl" / "mt-qw" / "checkpoints" / "best.pt"
    before = ck.stat().st_mtime_ns
    res = _demo(out)
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout)
    assert ck.stat().st_mtime_ns == before
    assert [r["dsc"] for r in again["rows"]] == [r["dsc"] for r in s["rows"]]
    # other settings on the same folder are refused instead of mixing runs
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--n-labeled", "16", "--n-unlabeled", "6",
                                   "--set", "data.image_size=32", "--set", "train.epochs=2"])
    assert res.exit_code == 2 and "other settings" in res.stderr
