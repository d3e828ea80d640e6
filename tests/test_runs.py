"""Run directories: creation, status, guard, lookup of the newest run, links, atomic writes, resume."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qgseg import runs as R
from qgseg.config import Config, dumps_toml, load_config
from qgseg.errors import InputError


def _mk(root: Path, stage: str, name: str, status: str = "completed") -> R.Run:
    run = R.create_run(root / stage / name, stage, dumps_toml(Config()), argv=["qgseg", stage])
    if status != "running":
        run.set_status(status)
    return run


def _no_tmp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


# ------------------------------------------------------------------------------ create
def test_create_run_writes_config_and_meta(tmp_path):
    cfg = Config().replace(**{"train.epochs": 3})
    run = R.create_run(tmp_path / "r", "ssl", dumps_toml(cfg), argv=["qgseg", "ssl"], device="cpu",
                       extra={"note": "x"})
    assert (run.path / "config.toml").is_file() and run.checkpoints.is_dir() and run.plots.is_dir()
    from qgseg.config import load_run_config

    assert load_run_config(run.path) == cfg
    meta = json.loads((run.path / "meta.json").read_text())
    assert meta["status"] == "running" and meta["stage"] == "ssl"
    assert meta["argv"] == ["qgseg", "ssl"] and meta["device"] == "cpu" and meta["note"] == "x"
    assert meta["created"] and meta["versions"]["python"] and "reason" in meta
    assert run.status == "running" and run.stage == "ssl"
    assert _no_tmp_files(run.path)


def test_create_run_in_an_existing_empty_folder(tmp_path):
    (tmp_path / "r").mkdir()
    assert R.create_run(tmp_path / "r", "corrupt", "").status == "running"


@pytest.mark.parametrize("status, match", [("completed", "completed run"), ("failed", "unfinished run"),
                                           ("interrupted", "--resume"), ("running", "unfinished run")])
def test_create_run_refuses_an_existing_run(tmp_path, status, match):
    run = _mk(tmp_path, "ssl", "r", status)
    before = (run.path / "meta.json").read_text()
    with pytest.raises(InputError, match=match) as e:
        R.create_run(run.path, "ssl", "")
    assert str(run.path) in str(e.value)
    assert (run.path / "meta.json").read_text() == before  # untouched


def test_create_run_refuses_a_foreign_folder_and_a_file(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(InputError, match="not a qgseg run"):
        R.create_run(tmp_path / "mine", "ssl", "")
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match=r"f: is a file"):
        R.create_run(tmp_path / "f", "ssl", "")


# ------------------------------------------------------------------------------ status
def test_set_status(tmp_path):
    run = _mk(tmp_path, "ssl", "r", "running")
    run.set_status("failed", "boom")
    assert run.status == "failed" and run.meta["reason"] == "boom" and run.meta["finished"]
    run.set_status("running")
    assert run.status == "running" and run.meta["reason"] == ""
    run.set_status("completed")
    assert run.status == "completed"
    with pytest.raises(AssertionError):
        run.set_status("done")
    assert run.update_meta(epoch=4)["epoch"] == 4 and run.meta["stage"] == "ssl"


def test_guard_interrupted_on_keyboard_interrupt(tmp_path):
    run = _mk(tmp_path, "ssl", "r", "running")
    with pytest.raises(KeyboardInterrupt):
        with run.guard():
            raise KeyboardInterrupt
    assert run.status == "interrupted" and "interrupted" in run.meta["reason"]
    assert "interrupted" in (run.path / "log.txt").read_text()


def test_guard_failed_with_reason_on_exception(tmp_path):
    run = _mk(tmp_path, "ssl", "r", "running")
    with pytest.raises(ValueError):
        with run.guard():
            raise ValueError("loss is nan")
    assert run.status == "failed" and run.meta["reason"] == "ValueError: loss is nan"
    assert "failed" in (run.path / "log.txt").read_text()


def test_guard_never_claims_completion(tmp_path):
    run = _mk(tmp_path, "ssl", "r", "running")
    with run.guard():
        run.write_summary({"dice": 0.9})
    assert run.status == "running"  # only the stage itself says completed
    assert run.summary == {"dice": 0.9}
    with run.guard():
        run.set_status("completed")
    assert run.status == "completed"


# ------------------------------------------------------------------------------ lookup
def test_find_runs_and_latest_order_by_creation(tmp_path):
    # created in the order c, a, b within the same second: names must not decide
    for name in ("c", "a", "b"):
        _mk(tmp_path, "train-quality", name)
    _mk(tmp_path, "train-quality", "d", "failed")
    _mk(tmp_path, "ssl", "e")
    (tmp_path / "train-quality" / "junk").mkdir()  # no meta.json: ignored
    names = [r.path.name for r in R.find_runs(tmp_path, "train-quality")]
    assert names == ["c", "a", "b"]
    assert R.latest(tmp_path, "train-quality").path.name == "b"
    assert [r.path.name for r in R.find_runs(tmp_path, "train-quality", status=None)] == ["c", "a", "b", "d"]
    assert R.latest(tmp_path, "train-quality", status="failed").path.name == "d"
    assert R.latest(tmp_path, "corrupt") is None and R.find_runs(tmp_path / "nope", "ssl") == []


def test_new_run_dir_is_fresh_each_time(tmp_path):
    paths = [R.new_run_dir(tmp_path, "ssl", "x") for _ in range(3)]
    assert len(set(paths)) == 3 and all(p.parent == tmp_path / "ssl" for p in paths)
    for p in paths:
        assert p.name.endswith("x") or p.name.split("-")[-1].isdigit()
        R.create_run(p, "ssl", "")  # usable by create_run


def test_resolve_link(tmp_path):
    q1 = _mk(tmp_path, "train-quality", "q1")
    q2 = _mk(tmp_path, "train-quality", "q2")
    _mk(tmp_path, "train-quality", "q3", "failed")
    assert R.resolve_link("", tmp_path, "train-quality", "--quality").path == q2.path
    assert R.resolve_link(str(q1.path), tmp_path, "train-quality", "--quality").path == q1.path


def test_resolve_link_errors(tmp_path):
    _mk(tmp_path, "train-quality", "q3", "failed")
    _mk(tmp_path, "train-quality", "q4", "running")
    w = _mk(tmp_path, "train-weak", "w1")
    opt = "--quality"
    with pytest.raises(InputError, match=r"--quality .*nope.*not a qgseg run"):
        R.resolve_link(str(tmp_path / "nope"), tmp_path, "train-quality", opt)
    with pytest.raises(InputError, match=r"q3: run is failed"):
        R.resolve_link(str(tmp_path / "train-quality" / "q3"), tmp_path, "train-quality", opt)
    with pytest.raises(InputError, match=r"q4: run is running"):
        R.resolve_link(str(tmp_path / "train-quality" / "q4"), tmp_path, "train-quality", opt)
    with pytest.raises(InputError, match=r"is a train-weak run, expected a train-quality run"):
        R.resolve_link(str(w.path), tmp_path, "train-quality", opt)
    with pytest.raises(InputError, match=r"--quality: no completed train-quality run"):
        R.resolve_link("", tmp_path, "train-quality", opt)  # failed/running ones do not count
    assert R.resolve_link("", tmp_path, "train-quality", opt, required=False) is None


# ------------------------------------------------------------------------ atomic writes
def test_atomic_writes_leave_no_tmp_files(tmp_path):
    run = _mk(tmp_path, "ssl", "r", "running")
    for i in range(5):
        run.update_meta(epoch=i)
        R.write_json(run.path / "summary.json", {"i": i})
        R.atomic_write_bytes(run.checkpoints / "last.pt", os.urandom(64))
    assert _no_tmp_files(run.path)
    assert R.read_json(run.path / "summary.json") == {"i": 4}


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    R.write_json(target, {"v": 1})

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(R.os, "replace", fail)
    with pytest.raises(OSError):
        R.write_json(target, {"v": 2})
    monkeypatch.undo()
    assert R.read_json(target) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_write_json_handles_numpy_and_paths(tmp_path):
    import numpy as np

    R.write_json(tmp_path / "s.json", {"a": np.float32(0.5), "b": np.arange(3), "p": Path("x/y")})
    assert R.read_json(tmp_path / "s.json") == {"a": 0.5, "b": [0, 1, 2], "p": "x/y"}


# ------------------------------------------------------------------------------ resume
def test_start_run_new_and_resume_newest_unfinished(tmp_path):
    loaded = load_config(sets=[f"runs_root={tmp_path}", "train.epochs=3"], cwd=tmp_path)
    r1, cfg1, resuming = R.start_run("ssl", loaded, None)
    assert not resuming and r1.path.parent == tmp_path / "ssl" and r1.status == "running"
    assert cfg1.train.epochs == 3
    r2, _, _ = R.start_run("ssl", loaded, tmp_path / "ssl" / "second")
    r3, _, _ = R.start_run("ssl", loaded, tmp_path / "ssl" / "third")
    r1.set_status("interrupted")
    r2.set_status("failed", "x")
    r3.set_status("completed")
    other = load_config(sets=[f"runs_root={tmp_path}", "train.epochs=9"], cwd=tmp_path)
    run, cfg, resuming = R.start_run("ssl", other, None, resume=True)
    assert resuming and run.path == r2.path  # newest unfinished, not the completed r3
    assert run.status == "running" and run.meta["resumed"] == 1
    assert cfg.train.epochs == 3  # the run's own saved configuration
    # a named run
    run, _, _ = R.start_run("ssl", other, r1.path, resume=True)
    assert run.path == r1.path and run.status == "running"
    with pytest.raises(InputError, match="already completed"):
        R.start_run("ssl", other, r3.path, resume=True)
    with pytest.raises(InputError, match="not a qgseg run"):
        R.start_run("ssl", other, tmp_path / "nope", resume=True)
    with pytest.raises(InputError, match=r"no unfinished corrupt run"):
        R.start_run("corrupt", other, None, resume=True)
    # a new run into an existing one is refused
    with pytest.raises(InputError, match="completed run"):
        R.start_run("ssl", other, r3.path)


def test_resume_of_another_stage_is_refused(tmp_path):
    loaded = load_config(sets=[f"runs_root={tmp_path}"], cwd=tmp_path)
    run, _, _ = R.start_run("train-weak", loaded, tmp_path / "w")
    run.set_status("interrupted")
    with pytest.raises(InputError, match="train-weak run, not ssl"):
        R.start_run("ssl", loaded, run.path, resume=True)
