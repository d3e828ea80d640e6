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

from qgseg.ablate import (
    SWEEPS,
    Point,
    gather,
    labels_sets,
    needs_g,
    parse_values,
    point_sets,
    point_state,
    slug,
    table_rows,
)
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
    # seed-major, so a sweep stopped part-way leaves complete seed pairs
    assert [(ln.split("corrupt.k=")[1][0], ln.split("--seed ")[1][0]) for ln in lines] == [
        ("0", "0"), ("2", "0"), ("0", "1"), ("2", "1")]
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


SSL_TINY = ["data.unlabeled=data/labeled/images", "model.arch=unet", "model.encoder=tu-mobilenetv3_small_050",
            "train.epochs=1", "train.steps_per_epoch=1", "train.batch_size=4", "train.batch_size_unlabeled=4",
            "ssl.warmup=0", "ssl.rampup=0", "ssl.qar_warmup=0", "ssl.qar_rampup=0"]


def _sets(items: list[str]) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def test_labels_grid_and_zero_points_end_to_end(env):
    """ablate labels: budgets x methods x seeds as points/<budget>/<method>/seed<k>, no g trained
    when no point needs one, resumable; lambda-qar runs its 0 point (sup) beside a QAR point."""
    out = env / "labels"
    args = ["labels", "--values", "4", "--methods", "sup,pl", "--seeds", "1", "--out", out, "--json",
            *_sets(SSL_TINY + ["runs_root=runs-labels"])]
    res = _ablate(env, *args)
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["methods"] == ["sup", "pl"] and s["failed"] == 0 and s["quality_run"] == ""
    assert not (out / "prereq").exists()  # sup and pl need no g
    for m in ("sup", "pl"):
        summ = json.loads((out / "points" / "4" / m / "seed0" / "summary.json").read_text())
        assert summ["method"] == m and summ["n_train"] == 4  # data.max_labeled = 4
    rows = {(r["value"], r["method"]): r for r in s["rows"]}
    assert set(rows) == {("4", "sup"), ("4", "pl")} and rows[("4", "pl")]["pairs"] == 1
    sup_dsc = json.loads((out / "points" / "4" / "sup" / "seed0" / "summary.json").read_text())["test_dsc"]
    pl_dsc = json.loads((out / "points" / "4" / "pl" / "seed0" / "summary.json").read_text())["test_dsc"]
    assert rows[("4", "pl")]["dDSC_mean"] == pytest.approx(pl_dsc - sup_dsc)
    with open(out / "table.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["value"], r["method"], r["pairs"]) for r in table] == [("4", "sup", "0"), ("4", "pl", "1")]
    assert "Δ DSC vs sup" in (out / "table.md").read_text()
    # the same command again runs nothing
    before = _mtimes(out / "points")
    res = _ablate(env, *args)
    assert res.exit_code == 0 and _mtimes(out / "points") == before, res.output

    # lambda-qar with its 0 point: sup without QAR beside qar at 0.01 (which needs g: trained once)
    out = env / "lqar"
    res = _ablate(env, "lambda-qar", "--values", "0,0.01", "--seeds", "1", "--out", out, "--json",
                  *_sets(SSL_TINY + ["quality.epochs=1", "runs_root=runs-lqar"]))
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    zero = json.loads((out / "points" / "0" / "seed0" / "summary.json").read_text())
    qar = json.loads((out / "points" / "0.01" / "seed0" / "summary.json").read_text())
    assert (zero["method"], zero["qar_weight"]) == ("sup", 0.0) and (qar["method"], qar["qar_weight"]) == ("qar", 0.01)
    assert s["quality_run"] and Path(s["quality_run"]) == (out / "prereq" / "train-quality").resolve()
    assert s["rows"][1]["dDSC_mean"] == pytest.approx(qar["test_dsc"] - zero["test_dsc"])
    assert "0 (sup)" in (out / "table.md").read_text()


def test_method_grid_at_a_label_budget(env):
    """ablate method --set data.max_labeled=N: every point runs at that budget (through the ablate's
    config.toml), and the table pairs each row with sup."""
    out = env / "method14"
    res = _ablate(env, "method", "--values", "sup,mt", "--seeds", "2", "--print-commands", "--out", out,
                  *_sets(SSL_TINY + ["data.max_labeled=14", "runs_root=runs-method14"]))
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 4 and all(f"--config {out.resolve() / 'config.toml'}" in ln for ln in lines)
    assert "max_labeled = 14" in (out / "config.toml").read_text()
    assert not (out / "prereq").exists()  # sup and mt need no g


def test_unknown_sweep_and_bad_options(env):
    res = _ablate(env, "dropout")
    assert res.exit_code == 2 and "lambda-qar" in res.stderr
    res = _ablate(env, "k", "--values", "2,2")
    assert res.exit_code == 2 and "twice" in res.stderr
    res = _ablate(env, "k", "--methods", "sup,pl")
    assert res.exit_code == 2 and "--methods" in res.stderr and "labels" in res.stderr
    res = _ablate(env, "labels", "--methods", "sup,sup")
    assert res.exit_code == 2 and "--methods" in res.stderr and "twice" in res.stderr


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


def test_zero_points_and_labels_translation():
    """The weight sweeps' 0 point is the base method with the term off; labels points set a budget."""
    cfg, n = Config(), (lambda: 40)
    assert SWEEPS["lambda-qar"].default[0] == "0" and SWEEPS["lambda-qw"].default[0] == "0"
    assert point_sets(SWEEPS["lambda-qar"], "0", cfg, {}, n) == ["ssl.method=sup", "ssl.qar_weight=0.0"]
    mt = cfg.replace(**{"ssl.method": "mt"})
    assert point_sets(SWEEPS["lambda-qar"], "0.0", mt, {"ssl.method": "option"}, n) == ["ssl.method=mt",
                                                                                        "ssl.qar_weight=0.0"]
    qar = cfg.replace(**{"ssl.method": "qar"})
    assert point_sets(SWEEPS["lambda-qar"], "0", qar, {"ssl.method": "option"}, n)[0] == "ssl.method=sup"
    assert point_sets(SWEEPS["lambda-qw"], "0", cfg, {}, n) == ["ssl.method=sup", "ssl.qw=false",
                                                                "ssl.lambda_final=0.0"]
    assert point_sets(SWEEPS["lambda-qw"], "0.25", cfg, {}, n)[-1] == "ssl.lambda_final=0.25"
    assert labels_sets("14", "pl+qw", cfg) == ["ssl.method=pl", "ssl.qw=true", "ssl.qar_weight=0.0",
                                               "data.max_labeled=14"]
    assert labels_sets("28", "qar", cfg) == ["ssl.method=qar", "ssl.qw=false", "ssl.qar_weight=0.01",
                                             "data.max_labeled=28"]
    assert SWEEPS["labels"].default == ("14", "28", "70") and SWEEPS["labels"].methods == ("sup", "pl", "mt")
    # g is trained for a sweep only when a point needs it
    assert not needs_g(labels_sets("14", "mt", cfg), cfg) and needs_g(labels_sets("14", "mt+qw", cfg), cfg)
    assert needs_g(["ssl.qar_weight=0.01"], cfg) and not needs_g(["ssl.qar_weight=0.0"], cfg)
    assert needs_g(["ssl.qar_weight=lots"], cfg)


def _done(tmp_path: Path, value: str, method: str, seed: int, dsc: float, sets=()) -> Point:
    p = Point(value, seed, tmp_path / value / method / f"seed{seed}", list(sets), method=method)
    p.status, p.summary = "completed", {"test_dsc": dsc, "test_iou": dsc - 0.1}
    return p


def test_paired_differences_in_the_tables(tmp_path):
    """labels: each method's DSC per budget and its difference to sup at the same budget and seed;
    method: to the sup row; lambda sweeps: to the 0 row. Unpaired seeds are left out."""
    dsc = {("14", "sup"): [0.60, 0.70, 0.65], ("14", "pl"): [0.66, 0.71, None], ("28", "sup"): [0.80, 0.82, 0.81],
           ("28", "pl"): [0.79, 0.84, 0.81]}
    points = []
    for (v, m), values in dsc.items():
        for seed, d in enumerate(values):
            if d is None:
                points.append(Point(v, seed, tmp_path / "x", [], status="failed", reason="exit 1: boom", method=m))
            else:
                points.append(_done(tmp_path, v, m, seed, d))
    rows = {(r["value"], r["method"]): r for r in table_rows(SWEEPS["labels"], ["14", "28"], points)}
    assert list(rows) == [("14", "sup"), ("14", "pl"), ("28", "sup"), ("28", "pl")]
    assert rows[("14", "pl")]["dDSC_mean"] == pytest.approx(0.035) and rows[("14", "pl")]["pairs"] == 2
    assert rows[("14", "pl")]["dDSC_se"] == pytest.approx(mean_se([0.06, 0.01])[1])
    assert rows[("14", "pl")]["status"] == "1 failed" and rows[("14", "pl")]["DSC_mean"] == pytest.approx(0.685)
    assert rows[("28", "pl")]["dDSC_mean"] == pytest.approx(mean_se([-0.01, 0.02, 0.0])[0])
    assert rows[("14", "sup")]["pairs"] == 0 and math.isnan(rows[("14", "sup")]["dDSC_mean"])
    from qgseg.ablate import display_rows

    head, body = display_rows(SWEEPS["labels"], list(rows.values()))
    assert head[:3] == ["labels", "method", "seeds"] and head[-2] == "Δ DSC vs sup (paired)"
    assert body[1][-2] == "+0.0350 ± 0.0250 (2)" and body[0][-2] == "-"

    # the method sweep pairs with its sup row, the lambda sweeps with their 0 row ("0 (sup)")
    pts = [Point(v, s, tmp_path / v, [], method="") for v in ("sup", "mt") for s in (0, 1)]
    for p, d in zip(pts, (0.5, 0.6, 0.55, 0.62)):
        p.status, p.summary = "completed", {"test_dsc": d}
    rows = table_rows(SWEEPS["method"], ["sup", "mt"], pts)
    assert rows[1]["dDSC_mean"] == pytest.approx(0.035) and rows[0]["pairs"] == 0
    zero = [Point(v, 0, tmp_path / v, ["ssl.method=sup"] if v == "0" else ["ssl.method=qar"]) for v in ("0", "0.01")]
    for p, d in zip(zero, (0.5, 0.53)):
        p.status, p.summary = "completed", {"test_dsc": d}
    rows = table_rows(SWEEPS["lambda-qar"], ["0", "0.01"], zero)
    assert rows[1]["dDSC_mean"] == pytest.approx(0.03) and rows[0]["label"] == "0 (sup)"
    assert display_rows(SWEEPS["lambda-qar"], rows)[1][0][0] == "0 (sup)"
    # without its baseline in the grid a sweep has no pairs
    assert table_rows(SWEEPS["lambda-qar"], ["0.01"], zero[1:])[0]["pairs"] == 0


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
