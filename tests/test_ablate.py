"""`qgseg ablate`: points as child processes, the table, resume/skip, failures, --print-commands."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qgseg.ablate import SWEEPS, Point, gather, parse_values, point_sets, point_state, slug, table_rows
from qgseg.cli import app
from qgseg.config import Config
from qgseg.metrics import mean_se
from qgseg.runs import Run, create_run

runner = CliRunner()
# tiny train-quality points: 32 px, K = 2, one epoch of a few steps
TOML = """
[data]
labeled = "data/labeled"
image_size = 32

[corrupt]
k = 2
eval_k = 2
p_weak = 0.0

[quality]
epochs = 1
batch_size = 8
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from qgseg.synth import generate

    root = tmp_path_factory.mktemp("ablate")
    generate(root / "data", n_labeled=12, n_unlabeled=0, size=32, seed=0)
    (root / "qgseg.toml").write_text(TOML)
    return root


def _ablate(root: Path, *args: str):
    old = os.getcwd()
    os.chdir(root)
    try:
        return runner.invoke(app, ["ablate", *map(str, args)], catch_exceptions=False)
    finally:
        os.chdir(old)


def _mtimes(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_print_commands_run_gather_failure_and_rerun(env):
    adir = env / "runs" / "ablate" / "k"
    # one self-contained shell line per point, nothing run yet
    res = _ablate(env, "k", "--values", "0,2", "--seeds", "2", "--print-commands")
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 4 and all(" train-quality " in ln and "--out" in ln for ln in lines)
    assert sorted((ln.split("corrupt.k=")[1][0], ln.split("--seed ")[1][0]) for ln in lines) == [
        ("0", "0"), ("0", "1"), ("2", "0"), ("2", "1")]
    assert not (adir / "points" / "2").exists()
    # run one of them (as a cluster job would, from another folder); again it is a no-op
    line = next(ln for ln in lines if "corrupt.k=2" in ln and "--seed 0" in ln)
    done = subprocess.run(["bash", "-c", line], cwd=env / "data", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    first = adir / "points" / "2" / "seed0"
    assert Run(first).status == "completed"
    before = _mtimes(first)
    assert subprocess.run(["bash", "-c", line], cwd=env).returncode == 0
    assert _mtimes(first) == before

    # a plain ablate gathers that point and runs the rest: k = 0 is out of range, so those two
    # points exit 2 (they run first, one at a time), and k = 2 seed 1 still runs and completes
    res = _ablate(env, "k", "--values", "0,2", "--seeds", "2", "--jobs", "1", "--json")
    assert res.exit_code == 1, res.output
    assert "2 of 4 points did not complete" in res.stderr
    out = json.loads(res.stdout)
    assert out["run"] == str(adir.resolve()) and out["failed"] == 2
    assert {(f["value"], f["seed"]) for f in out["failures"]} == {("0", 0), ("0", 1)}
    assert all("corrupt.k" in f["reason"] for f in out["failures"])
    points = [adir / "points" / "2" / f"seed{s}" for s in (0, 1)]
    assert all(Run(p).status == "completed" and Run(p).stage == "train-quality" for p in points)
    assert _mtimes(first) == before
    assert "k = 2" in (points[1] / "config.toml").read_text() and "seed = 1" in (points[1] / "config.toml").read_text()
    # the table is the mean and standard error over the seeds' summaries
    sums = [json.loads((p / "summary.json").read_text()) for p in points]
    with open(adir / "table.csv", newline="") as f:
        rows = {r["value"]: r for r in csv.DictReader(f)}
    for key, col in (("test_mae", "MAE"), ("test_pearson", "Pearson")):
        m, se = mean_se([s[key] for s in sums])
        assert se > 0
        assert float(rows["2"][f"{col}_mean"]) == pytest.approx(m)
        assert float(rows["2"][f"{col}_se"]) == pytest.approx(se)
    assert rows["2"]["status"] == "ok" and rows["0"]["status"] == "2 failed" and rows["0"]["seeds"] == "0"
    md = (adir / "table.md").read_text()
    assert f"{mean_se([s['test_mae'] for s in sums])[0]:.4f} ±" in md and "failed" in md

    # rerunning the completed part runs nothing: no new run folders, no file touched
    before, n_runs = _mtimes(adir / "points"), len(list((adir / "points").rglob("meta.json")))
    res = _ablate(env, "k", "--values", "2", "--seeds", "2")
    assert res.exit_code == 0, res.output
    assert "±" in res.stdout and "ok" in res.stdout
    assert _mtimes(adir / "points") == before
    assert len(list((adir / "points").rglob("meta.json"))) == n_runs
    res = _ablate(env, "k", "--values", "2", "--seeds", "2", "--print-commands")
    assert res.exit_code == 0 and res.stdout.strip() == ""  # nothing left to print
    # a changed configuration may not reuse these points
    res = _ablate(env, "k", "--values", "2", "--seeds", "2", "--set", "quality.epochs=3")
    assert res.exit_code == 2 and "another configuration" in res.stderr

    # a phase 2 sweep hands every ssl point the same g (here: a completed train-quality point)
    res = _ablate(env, "method", "--values", "sup,pl+qw,qar", "--seeds", "2", "--print-commands",
                  "--quality", first, "--out", env / "methods", "--set", "data.unlabeled=data/labeled/images")
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 6
    assert all(f"--quality {first.resolve()}" in ln and " ssl " in ln for ln in lines)
    assert sum("ssl.qw=true" in ln for ln in lines) == 2
    assert sum("ssl.method=qar" in ln and "ssl.qar_weight=0.01" in ln for ln in lines) == 2


def test_unknown_sweep_and_bad_options(env):
    res = _ablate(env, "dropout")
    assert res.exit_code == 2 and "lambda-qar" in res.stderr
    res = _ablate(env, "k", "--values", "2,2")
    assert res.exit_code == 2 and "twice" in res.stderr


def test_value_translation():
    cfg = Config()
    n = lambda: 40  # noqa: E731 - unlabeled folder size
    assert point_sets(SWEEPS["lambda-qar"], "0.1", cfg, {}, n) == ["ssl.method=qar", "ssl.qar_weight=0.1"]
    assert point_sets(SWEEPS["lambda-qar"], "0.1", cfg, {"ssl.method": "option"}, n) == ["ssl.qar_weight=0.1"]
    assert point_sets(SWEEPS["lambda-qw"], "0.5", cfg, {}, n) == ["ssl.method=pl", "ssl.qw=true",
                                                                  "ssl.lambda_final=0.5"]
    assert point_sets(SWEEPS["unlabeled-size"], "25%", cfg, {}, n)[-1] == "data.max_unlabeled=10"
    assert point_sets(SWEEPS["unlabeled-size"], "100%", cfg, {}, n)[-1] == "data.max_unlabeled=0"
    assert point_sets(SWEEPS["arch"], "unet:resnet18", cfg, {}, n)[-2:] == ["model.arch=unet", "model.encoder=resnet18"]
    assert point_sets(SWEEPS["method"], "mt+qw", cfg, {}, n) == ["ssl.method=mt", "ssl.qw=true", "ssl.qar_weight=0.0"]
    assert point_sets(SWEEPS["backbone"], "resnet34", cfg, {}, n) == ["quality.backbone=resnet34"]
    rows = SWEEPS["method"].default
    assert rows[0] == "sup" and rows[-1] == "qar" and "pl+qw" in rows and "cps+qw" in rows and len(rows) == 18
    assert slug("25%") == "25pct" and parse_values(None, SWEEPS["k"]) == list(SWEEPS["k"].default)


def test_e_val96_from_the_points_metrics(tmp_path):
    """unlabeled-size: e_val96 = first epoch reaching 96% of the run's best val DSC, mean +- s.e."""
    sweep = SWEEPS["unlabeled-size"]
    points = []
    curves = {("10", 0): [0.5, 0.9, 1.0], ("10", 1): [0.97, 0.5, 1.0], ("20", 0): [0.2, 0.3, 0.4, 0.8]}
    for (value, seed), curve in curves.items():
        p = Point(value, seed, tmp_path / value / f"seed{seed}", [f"data.max_unlabeled={value}"])
        run = create_run(p.path, "ssl", "")
        (p.path / "metrics.csv").write_text("epoch,val_dsc\n" + "".join(f"{i + 1},{v}\n" for i, v in enumerate(curve)))
        run.write_summary({"test_dsc": 0.5 + seed / 10, "test_iou": 0.4, "n_unlabeled": int(value)})
        run.set_status("completed")
        gather(p, sweep)
        points.append(p)
    points.append(Point("20", 1, tmp_path / "missing", []))
    points[-1].status, points[-1].reason = "failed", "exit 1: boom"
    rows = {r["value"]: r for r in table_rows(sweep, ["10", "20"], points)}
    assert rows["10"]["e_val96_mean"] == pytest.approx(2.0) and rows["10"]["e_val96_se"] == pytest.approx(1.0)
    assert rows["10"]["DSC_mean"] == pytest.approx(0.55) and rows["10"]["M"] == 10
    assert rows["20"]["e_val96_mean"] == 4.0 and rows["20"]["status"] == "1 failed" and rows["20"]["seeds"] == 1
    assert "boom" in rows["20"]["failures"]
    assert math.isnan(table_rows(sweep, ["30"], [])[0]["DSC_mean"])


def test_point_states(tmp_path):
    """fresh -> (run) -> completed; interrupted / failed / killed (dead pid) -> resumable; live pid -> running."""
    p = Point("1", 0, tmp_path / "p", [])
    assert point_state(p) == "fresh"
    run = create_run(p.path, "train-quality", "")
    assert point_state(p) == "running"  # this process made it and is alive
    run.update_meta(pid=2 ** 22 + 12345)  # no such process: killed outright, still says running
    assert point_state(p) == "resumable"
    for status in ("interrupted", "failed"):
        run.set_status(status)
        assert point_state(p) == "resumable"
    run.set_status("completed")
    assert point_state(p) == "resumable"  # completed without a summary is not a result
    run.write_summary({"test_mae": 0.1})
    assert point_state(p) == "completed"
