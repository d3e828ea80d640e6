"""Reliability: resume after SIGKILL / SIGINT / SIGTERM, run status, bad input, safe checkpoints,
determinism. See docs/reliability.md for the guarantees these tests stand behind.

Runs are tiny (32 px, 3-4 epochs, small timm backbones) and on the CPU. Subprocesses run
``python -m qgseg`` exactly as a user would; the runs they leave are compared with uninterrupted
runs of the same seed made in this process.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from qgseg import engine as E
from qgseg.cli import app
from qgseg.config import dumps_toml, load_config
from qgseg.errors import InputError, TrainingDiverged
from qgseg.runs import Run, create_run, start_run

REPO = Path(__file__).resolve().parents[1]
# summary keys that legitimately differ between two runs of the same seed
VOLATILE = {"run", "train_seconds"}

QUALITY = ["data.image_size=32", "corrupt.k=3", "corrupt.eval_k=2", "corrupt.p_weak=0", "quality.epochs=4",
           "quality.batch_size=8", "quality.patience=10", "quality.backbone=test_resnet", "seed=7", "device=cpu"]
WEAK = ["data.image_size=32", "weak.encoder=tu-test_resnet", "weak.epochs_at=[1, 2, 3]", "weak.batch_size=4",
        "seed=7", "device=cpu"]
SSL = ["data.image_size=32", "model.arch=unet", "model.encoder=tu-test_resnet", "train.epochs=3",
       "train.steps_per_epoch=2", "train.batch_size=4", "train.batch_size_unlabeled=4", "train.patience=10",
       "ssl.warmup=0", "ssl.rampup=1", "seed=7", "device=cpu"]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def sets(items) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def common(root: Path) -> list[str]:
    """Where runs and the data cache go (also for runs made in this process)."""
    return sets([f"runs_root={root / 'runs'}", f"data.cache_dir={root / 'cache'}"])


def quality_args(data: Path, root: Path) -> list[str]:
    return ["train-quality", "--labeled", str(data / "labeled"), *sets(QUALITY), *common(root)]


def weak_args(data: Path, root: Path) -> list[str]:
    return ["train-weak", "--labeled", str(data / "labeled"), *sets(WEAK), *common(root)]


def ssl_args(data: Path, root: Path, quality: Path) -> list[str]:
    return ["ssl", "--method", "mt", "--qw", "--quality", str(quality), "--labeled", str(data / "labeled"),
            "--unlabeled", str(data / "unlabeled"), *sets(SSL), *common(root)]


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(res) -> dict:
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def metrics(run: Path) -> list[dict[str, str]]:
    """metrics.csv rows without the wall-clock column."""
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def stable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in VOLATILE}


def env(root: Path) -> dict[str, str]:
    return dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_WAIT_POLICY="PASSIVE",
                QGSEG_CACHE=str(root / "cache"),
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))


def spawn(args: list[str], root: Path) -> subprocess.Popen:
    """``python -m qgseg ARGS`` in ``root``; SIGINT acts as Ctrl-C even if this process ignores it."""
    with open(root / "stdout.txt", "wb") as out, open(root / "stderr.txt", "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "qgseg", *map(str, args)], cwd=root, env=env(root),
                                stdout=out, stderr=err,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stderr_of(root: Path) -> str:
    return (root / "stderr.txt").read_text(errors="replace")


class Interrupted:
    """A ``python -m qgseg`` subprocess that a watcher thread signals as soon as its run has a
    metrics.csv row (mid-training). Started early, so its start-up (imports) overlaps other tests."""

    def __init__(self, args: list[str], root: Path, pattern: str, sig: int, timeout: float = 300):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.pattern, self.sig = root, pattern, sig
        self.run: Path | None = None
        self.proc = spawn(args, root)
        self._thread = threading.Thread(target=self._watch, args=(timeout,), daemon=True)
        self._thread.start()

    def _watch(self, timeout: float) -> None:
        end = time.time() + timeout
        while time.time() < end and self.proc.poll() is None:
            for m in self.root.glob(self.pattern + "/metrics.csv"):
                try:
                    rows = len(m.read_text().strip().splitlines()) - 1
                except OSError:
                    continue
                if rows >= 1:
                    self.run = m.parent
                    self.proc.send_signal(self.sig)
                    return
            time.sleep(0.01)
        self.proc.kill()

    def result(self, timeout: float = 300) -> tuple[Path, int]:
        """(run directory, exit status) once the process is gone."""
        self._thread.join(timeout)
        rc = self.proc.wait(timeout)
        if self.run is None:
            pytest.fail(f"qgseg exited ({rc}) before a metrics.csv row: {stderr_of(self.root)[-2000:]}")
        return self.run, rc


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("qgseg: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# runs shared by several tests (module scope)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def background(request, synth_data, tmp_path_factory) -> dict[str, Interrupted]:
    """Runs interrupted by a real signal, started before any other test of this module so that
    their start-up overlaps the reference runs: train-quality killed with SIGKILL (its run folder
    named by the CLI itself) and train-weak stopped with SIGINT (Ctrl-C). Only those the selected
    tests use are started."""
    selected = " ".join(item.name for item in request.session.items)
    procs: dict[str, Interrupted] = {}
    if "test_sigkill" in selected:
        root = tmp_path_factory.mktemp("sigkill")
        procs["sigkill"] = Interrupted(quality_args(synth_data, root), root, "runs/train-quality/*", signal.SIGKILL)
    if "test_sigint" in selected:
        root = tmp_path_factory.mktemp("sigint")
        procs["sigint"] = Interrupted([*weak_args(synth_data, root), "--out", root / "weak"], root, "weak",
                                      signal.SIGINT)
    yield procs
    for p in procs.values():
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


@pytest.fixture(scope="module")
def quality_ref(synth_data, tmp_path_factory) -> Path:
    """An uninterrupted train-quality run (also the g of the ssl runs)."""
    root = tmp_path_factory.mktemp("quality-ref")
    ok(cli(*quality_args(synth_data, root), "--out", root / "ref", "--json"))
    return root / "ref"


@pytest.fixture(scope="module")
def ssl_ref(synth_data, quality_ref, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ssl-ref")
    ok(cli(*ssl_args(synth_data, root, quality_ref), "--out", root / "ref", "--json"))
    return root / "ref"


@pytest.fixture(scope="module")
def sigterm_ssl(synth_data, quality_ref, tmp_path_factory) -> Interrupted:
    """An ssl mt --qw run stopped with SIGTERM (requested before ``ssl_ref`` so that they overlap)."""
    root = tmp_path_factory.mktemp("sigterm")
    return Interrupted([*ssl_args(synth_data, root, quality_ref), "--out", root / "ssl"], root, "ssl",
                       signal.SIGTERM)


def assert_same_run(run: Path, ref: Path) -> None:
    assert stable(json.loads((run / "summary.json").read_text())) == stable(
        json.loads((ref / "summary.json").read_text()))
    assert metrics(run) == metrics(ref)
    assert Run(run).status == "completed"


# ---------------------------------------------------------------------------------------------
# 5. determinism
# ---------------------------------------------------------------------------------------------
def test_train_quality_same_seed_same_metrics(synth_data, quality_ref, tmp_path):
    ok(cli(*quality_args(synth_data, tmp_path), "--out", tmp_path / "again", "--json"))
    assert_same_run(tmp_path / "again", quality_ref)
    assert len(metrics(quality_ref)) == 4
    # and another seed does give other numbers (the comparison can fail)
    ok(cli(*quality_args(synth_data, tmp_path), "--set", "seed=8", "--set", "quality.epochs=1",
           "--out", tmp_path / "seed8", "--json"))
    assert metrics(tmp_path / "seed8")[0] != metrics(quality_ref)[0]


def test_ssl_mt_qw_same_seed_same_metrics(sigterm_ssl, synth_data, quality_ref, ssl_ref, tmp_path):
    ok(cli(*ssl_args(synth_data, tmp_path, quality_ref), "--out", tmp_path / "again", "--json"))
    assert_same_run(tmp_path / "again", ssl_ref)
    summary = json.loads((ssl_ref / "summary.json").read_text())
    assert summary["method"] == "mt" and summary["qw"] is True and summary["epochs_run"] == 3


# ---------------------------------------------------------------------------------------------
# 1. + 2. kill, interrupt, resume
# ---------------------------------------------------------------------------------------------
def test_sigkill_mid_training_then_plain_resume_matches_uninterrupted(background, quality_ref):
    run, rc = background["sigkill"].result()
    root = background["sigkill"].root
    assert rc == -signal.SIGKILL
    killed_rows = len(metrics(run))
    assert 1 <= killed_rows < 4, "the run finished before it was killed"
    assert Run(run).status == "running"  # nobody could mark it
    last = E.load_checkpoint(run / "checkpoints" / "last.pt")
    assert last["epoch"] >= killed_rows and len(last["history"]) == last["epoch"]

    # plain --resume finds the newest unfinished train-quality run by itself
    summary = ok(cli("train-quality", "--resume", "--json", *common(root)))
    assert Path(summary["run"]) == run
    assert_same_run(run, quality_ref)
    assert Run(run).meta["resumed"] == 1 and Run(run).meta["reason"] == ""
    assert not list(run.rglob(".*.tmp"))


def test_sigint_exits_130_and_resume_matches_uninterrupted(background, synth_data, tmp_path):
    run, rc = background["sigint"].result()
    err = stderr_of(background["sigint"].root)
    assert rc == 130, err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    meta = Run(run).meta
    assert meta["status"] == "interrupted" and "interrupted" in meta["reason"]
    last = E.load_checkpoint(run / "checkpoints" / "last.pt")  # the resumable checkpoint
    assert 1 <= last["epoch"] < 3 and len(metrics(run)) == last["epoch"]

    # a row beyond the checkpoint (an epoch cut short after its row was written) is dropped
    with open(run / "metrics.csv", "a") as f:
        f.write("99,0.5,0.5,0.001,1.0\n")
    ok(cli("train-weak", "--resume", "--out", run, "--json"))
    ref = tmp_path / "ref"
    ok(cli(*weak_args(synth_data, tmp_path), "--out", ref, "--json"))
    assert_same_run(run, ref)
    assert (run / "checkpoints.csv").read_text() == (ref / "checkpoints.csv").read_text()


def test_sigterm_exits_130_and_ssl_resume_restores_everything(sigterm_ssl, ssl_ref):
    run, rc = sigterm_ssl.result()
    assert rc == 130, stderr_of(sigterm_ssl.root)
    assert "Traceback" not in stderr_of(sigterm_ssl.root)
    assert Run(run).status == "interrupted"
    last = E.load_checkpoint(run / "checkpoints" / "last.pt")
    assert {"model", "teacher"} <= set(last["modules"]) and last["optimizer"]["state"]
    assert last["scheduler"]["last_epoch"] == last["epoch"]
    assert last["task"]["ema_updates"]["teacher"] == 2 * last["epoch"]  # steps_per_epoch = 2

    summary = ok(cli("ssl", "--resume", "--out", run, "--json"))
    assert summary["method"] == "mt" and summary["qw"] is True
    assert_same_run(run, ssl_ref)
    # the teacher (not only the student) ends where the uninterrupted run's did
    a = E.load_checkpoint(run / "checkpoints" / "last.pt")["modules"]["teacher"]
    b = E.load_checkpoint(ssl_ref / "checkpoints" / "last.pt")["modules"]["teacher"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# 2. run status: guard, meta.json
# ---------------------------------------------------------------------------------------------
def _run(tmp_path: Path) -> Run:
    return create_run(tmp_path / "r", "ssl", dumps_toml(load_config(cwd=tmp_path).config))


@pytest.mark.parametrize("exc", [SystemExit(0), SystemExit(None), typer.Exit(0)])
def test_guard_leaves_status_alone_on_exit_0(tmp_path, exc):
    run = _run(tmp_path)
    with pytest.raises(type(exc)):
        with run.guard():
            raise exc
    assert run.status == "running" and run.meta["reason"] == ""


@pytest.mark.parametrize("exc, status, reason", [
    (SystemExit(2), "failed", "exit 2"), (typer.Exit(1), "failed", "exit 1"),
    (typer.Exit(130), "interrupted", "exit 130"), (InputError("--labeled x: no such\nfolder"), "failed",
                                                   "InputError: --labeled x: no such folder")])
def test_guard_marks_nonzero_exits_and_errors(tmp_path, exc, status, reason):
    run = _run(tmp_path)
    with pytest.raises(type(exc)):
        with run.guard():
            raise exc
    assert run.status == status and reason in run.meta["reason"] and run.meta["finished"]


def test_damaged_meta_is_never_overwritten(tmp_path):
    run = _run(tmp_path)
    (run.path / "meta.json").write_text('{"stage": "ssl", "status": "runn')  # cut short
    damaged = (run.path / "meta.json").read_text()
    with pytest.raises(InputError, match="meta.json: unreadable"):
        run.update_meta(epoch=3)
    with pytest.raises(ValueError, match="original"):  # the error being handled is not hidden
        with run.guard():
            raise ValueError("original")
    assert (run.path / "meta.json").read_text() == damaged
    loaded = load_config(sets=[f"runs_root={tmp_path}"], cwd=tmp_path)
    with pytest.raises(InputError, match="meta.json: unreadable"):
        start_run("ssl", loaded, run.path, resume=True)


def test_resume_skips_a_run_whose_process_is_alive(tmp_path):
    loaded = load_config(sets=[f"runs_root={tmp_path}"], cwd=tmp_path)
    old, _, _ = start_run("ssl", loaded, tmp_path / "ssl" / "old")
    old.set_status("interrupted")
    busy, _, _ = start_run("ssl", loaded, tmp_path / "ssl" / "busy")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from qgseg.runs import _process_start

        busy.update_meta(pid=sleeper.pid, pid_start=_process_start(sleeper.pid))
        run, _, _ = start_run("ssl", loaded, None, resume=True)  # newest unfinished, not the live one
        assert run.path == old.path
        with pytest.raises(InputError, match=r"still in progress \(process"):
            start_run("ssl", loaded, busy.path, resume=True)
    finally:
        sleeper.kill()
        sleeper.wait()
    run, _, _ = start_run("ssl", loaded, busy.path, resume=True)  # its process is gone: resumable
    assert run.path == busy.path and run.meta["pid"] == os.getpid()


# ---------------------------------------------------------------------------------------------
# 3. bad input: one line naming what was wrong, exit 2 (1 for a runtime failure), no traceback
# ---------------------------------------------------------------------------------------------
def _quality_run(root: Path, size: int = 32, status: str = "completed", backbone: str = "test_resnet",
                 spec_backbone: str = "test_resnet") -> Path:
    from qgseg.quality import build_quality_net

    cfg = load_config(sets=[f"data.image_size={size}"], cwd=root).config
    run = create_run(root / f"q-{size}-{status}-{backbone}-{spec_backbone}", "train-quality", dumps_toml(cfg))
    net = build_quality_net(backbone)
    E.save_checkpoint(run.checkpoints / "best.pt", {"modules": {"g": net.state_dict()},
                                                    "specs": {"g": {"backbone": spec_backbone}}})
    run.write_summary({})
    if status != "running":
        run.set_status(status)
    return run.path


@pytest.mark.parametrize("args, names", [
    (["ssl", "--method", "nope"], "ssl.method"),
    (["ssl", "--arch", "nope"], "model.arch"),
    (["ssl", "--arch", "unet", "--encoder", "nope"], "model.encoder"),
    (["ssl", "--arch", "pan", "--image-size", "64"], "data.image_size"),
    (["ssl", "--image-size", "48"], "data.image_size"),
    (["ssl", "--method", "sup", "--qw"], "--qw"),
    (["train-weak", "--set", "weak.arch=pan", "--image-size", "64"], "data.image_size"),
    (["train-quality", "--backbone", "nope"], "quality.backbone"),
    (["train-quality", "--weak", "{root}/nope"], "--weak"),
    (["ssl", "--method", "mt", "--qw", "--quality", "{root}/nope"], "--quality"),
    (["ssl", "--method", "mt", "--qw", "--quality", "{running}"], "run is running"),
    (["ssl", "--method", "pl", "--qw", "--quality", "{size64}"], "64 px"),
])
def test_bad_usage_exits_2_with_one_line_and_no_run_directory(synth_data, tmp_path, args, names):
    fill = {"root": tmp_path, "running": _quality_run(tmp_path, status="running") if "{running}" in args else "",
            "size64": _quality_run(tmp_path, 64) if "{size64}" in args else ""}
    args = [a.format(**fill) for a in args]
    data = ["--labeled", synth_data / "labeled"] + (["--unlabeled", synth_data / "unlabeled"] if args[0] == "ssl" else [])
    res = cli(*args, *data, *common(tmp_path))
    assert res.exit_code == 2, res.stderr
    assert names in one_error_line(res.stderr)
    assert not (tmp_path / "runs").exists()  # refused before a run directory was made


def test_debug_shows_the_traceback(tmp_path):
    res = cli("ssl", "--arch", "nope", "--labeled", tmp_path, "--debug", *common(tmp_path))  # data folders come first
    assert res.exit_code == 2 and "Traceback" in res.stderr and "model.arch" in res.stderr


def test_quality_checkpoint_of_another_architecture(synth_data, tmp_path):
    """best.pt whose weights are not those of the architecture its spec names: exit 2, run failed."""
    q = _quality_run(tmp_path, backbone="test_efficientnet", spec_backbone="test_resnet")
    res = cli(*ssl_args(synth_data, tmp_path, q), "--out", tmp_path / "s")
    assert res.exit_code == 2
    line = one_error_line(res.stderr)
    assert str(q) in line and "do not fit" in line
    meta = Run(tmp_path / "s").meta
    assert meta["status"] == "failed" and "do not fit" in meta["reason"]


def test_resume_with_a_checkpoint_of_another_architecture(synth_data, quality_ref, tmp_path):
    """A run whose last.pt holds another g than its config builds: refused, not half-loaded."""
    import shutil

    run = tmp_path / "q"
    shutil.copytree(quality_ref, run)
    Run(run).set_status("interrupted")
    text = (run / "config.toml").read_text()
    assert 'backbone = "test_resnet"' in text
    (run / "config.toml").write_text(text.replace('backbone = "test_resnet"', 'backbone = "test_efficientnet"'))
    res = cli("train-quality", "--resume", "--out", run)
    assert res.exit_code == 2
    line = one_error_line(res.stderr)
    assert "last.pt" in line and "'g'" in line and "do not fit" in line
    assert Run(run).status == "failed"


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(synth_data, tmp_path):
    res = cli(*quality_args(synth_data, tmp_path), "--set", "quality.lr=1e30", "--out", tmp_path / "q")
    assert res.exit_code == 1, res.stderr
    line = one_error_line(res.stderr)
    assert "non-finite" in line or "loss became nan" in line, line
    assert "quality.lr" in line and "last.pt" in line
    run = Run(tmp_path / "q")
    assert run.status == "failed" and "TrainingDiverged" in run.meta["reason"]
    last = E.load_checkpoint(run.checkpoints / "last.pt")
    assert all(torch.isfinite(t).all() for t in last["modules"]["g"].values() if t.is_floating_point())
    assert len(last["history"]) == last["epoch"]
    assert not (run.path / "summary.json").exists()


class _Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)


class _PoisonTask(E.Task):
    """Two steps per epoch; step 2 (the epoch's last) leaves inf weights behind a finite loss."""

    monitor, mode, best_modules = "val", "min", ("m",)

    def __init__(self):
        self.m = _Lin()
        self.modules = {"m": self.m}

    def steps_per_epoch(self):
        return 2

    def batches(self, epoch, generator):
        for _ in range(2):
            yield torch.randn(4, 2, generator=generator)

    def loss(self, batch, epoch, step):
        loss = self.m.lin(batch).pow(2).mean()
        return loss, {"loss": float(loss.detach())}

    def after_step(self, step):
        if step == 4:  # epoch 2, last step
            with torch.no_grad():
                self.m.lin.weight.fill_(float("inf"))

    def evaluate(self, epoch):
        return {"val": 1.0 / epoch}


def test_engine_never_checkpoints_non_finite_weights(tmp_path):
    run = _run(tmp_path)
    task = _PoisonTask()
    opt = torch.optim.SGD(task.m.parameters(), lr=0.01)
    engine = E.Engine(run, task, opt, None, E.FitSettings(epochs=3, patience=5, seed=0), torch.device("cpu"))
    with pytest.raises(TrainingDiverged, match=r"epoch 2 \(m.lin.weight\).*last.pt \(epoch 1\)"):
        engine.fit()
    last = E.load_checkpoint(run.checkpoints / "last.pt")
    assert last["epoch"] == 1 and torch.isfinite(last["modules"]["m"]["lin.weight"]).all()
    assert len(metrics(run.path)) == 1


# ---------------------------------------------------------------------------------------------
# 4. safe checkpoints
# ---------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": 1, "epoch": 1, "modules": {"g": {"w": torch.zeros(1)}}, "evil": _Payload(marker)}, path)
    return path


def test_crafted_checkpoint_is_refused_by_load_checkpoint(tmp_path):
    ck = _crafted(tmp_path / "evil.pt", tmp_path / "pwned")
    with pytest.raises(InputError, match="weights_only=True"):
        E.load_checkpoint(ck)
    assert not (tmp_path / "pwned").exists()
    # the file is really malicious: an unsafe load runs it (the control that makes this test meaningful)
    control = _crafted(tmp_path / "control.pt", tmp_path / "control-ran")
    torch.load(control, weights_only=False)
    assert (tmp_path / "control-ran").exists()


def test_crafted_best_pt_via_ssl_quality_is_refused(synth_data, tmp_path):
    q = _quality_run(tmp_path)
    _crafted(q / "checkpoints" / "best.pt", tmp_path / "pwned")
    res = cli(*ssl_args(synth_data, tmp_path, q), "--out", tmp_path / "s")
    assert res.exit_code == 2
    assert "weights_only" in one_error_line(res.stderr)
    assert not (tmp_path / "pwned").exists()


def test_crafted_last_pt_via_resume_is_refused(synth_data, quality_ref, tmp_path):
    import shutil

    run = tmp_path / "q"
    shutil.copytree(quality_ref, run)
    Run(run).set_status("interrupted")
    _crafted(run / "checkpoints" / "last.pt", tmp_path / "pwned")
    res = cli("train-quality", "--resume", "--out", run)
    assert res.exit_code == 2
    assert "last.pt" in one_error_line(res.stderr)
    assert not (tmp_path / "pwned").exists()
    assert Run(run).status == "failed"


# ---------------------------------------------------------------------------------------------
# 6. one process per run: the run lock
# ---------------------------------------------------------------------------------------------
# What `qgseg <stage> --resume --out RUN` does up to training, in a process that imports no torch:
# take the run (start_run), then hold it until the test says so (a stand-in for the epochs).
_RESUMER = """
import sys, time
from pathlib import Path
from qgseg.config import Config, Loaded
from qgseg.errors import InputError
from qgseg.runs import start_run
run_dir, release = Path(sys.argv[1]), Path(sys.argv[2])
loaded = Loaded(Config(runs_root=str(run_dir.parent)), {})  # what --resume --out RUN needs (no method, no torch)
try:
    run, _, resuming = start_run("ssl", loaded, run_dir, resume=True)
    assert "torch" not in sys.modules
except InputError as e:
    print(f"qgseg: error: {e}", file=sys.stderr)
    sys.exit(2)
with run.guard():
    run.log("training")
    end = time.time() + 60
    while not release.exists() and time.time() < end:
        time.sleep(0.01)
    run.set_status("completed")
"""


def _interrupted_run(path: Path) -> Run:
    from qgseg.runs import release_lock

    loaded = load_config(sets=[f"runs_root={path.parent}"], cwd=path.parent)
    run, _, _ = start_run("ssl", loaded, path)
    run.set_status("interrupted")
    release_lock(run.path)
    return run


def test_two_concurrent_resumes_one_trains_the_other_exits_2(tmp_path):
    """20 trials, each two processes started together on one interrupted run (all trials at once)."""
    trials = []
    for i in range(20):
        run = _interrupted_run(tmp_path / f"r{i}")
        release = tmp_path / f"release{i}"
        procs = [subprocess.Popen([sys.executable, "-c", _RESUMER, str(run.path), str(release)], env=env(tmp_path),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        trials.append((run, release, procs))
    for run, release, procs in trials:
        first = None
        end = time.time() + 120
        while first is None and time.time() < end:  # the loser stops at once; the winner waits for release
            first = next((p for p in procs if p.poll() is not None), None)
            time.sleep(0.01)
        release.touch()
        codes = sorted(p.wait(60) for p in procs)
        errors = [p.stderr.read() for p in procs]
        assert codes == [0, 2], errors
        line = one_error_line(next(e for e in errors if e))
        assert str(run.path) in line, line
        assert "in use by process" in line or "still in progress (process" in line, line
        assert run.status == "completed"
        assert (run.path / "log.txt").read_text().count("training") == 1  # trained once, never twice


def test_two_concurrent_cli_resumes_of_a_real_run(quality_ref, tmp_path):
    """End to end: two `qgseg train-quality --resume --out RUN` started together on a run with two
    epochs left. One trains them (exit 0), the other exits 2 naming the holder; each epoch is
    trained and logged once."""
    import shutil

    run = tmp_path / "q"
    shutil.copytree(quality_ref, run)
    (run / "summary.json").unlink()
    Run(run).set_status("interrupted")
    text = (run / "config.toml").read_text()
    (run / "config.toml").write_text(text.replace("epochs = 4", "epochs = 6", 1))
    procs = []
    for i in range(2):
        root = tmp_path / f"p{i}"
        root.mkdir()
        procs.append((root, spawn(["train-quality", "--resume", "--out", run], root)))
    codes = sorted(p.wait(300) for _, p in procs)
    errors = [stderr_of(root) for root, _ in procs]
    assert codes == [0, 2], errors
    loser = next(e for (root, p), e in zip(procs, errors) if p.returncode == 2)
    line = one_error_line(loser)
    assert "process" in line and str(run) in line
    assert Run(run).status == "completed"
    log = (run / "log.txt").read_text()
    assert log.count("epoch 5:") == 1 and log.count("epoch 6:") == 1
    assert len(metrics(run)) == 6


# ---------------------------------------------------------------------------------------------
# 7. finished means defined: no NaN in JSON, undefined key metrics are a warning and exit 3
# ---------------------------------------------------------------------------------------------
def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _empty_masks(tiny_labeled, n: int = 12) -> Path:
    import cv2
    import numpy as np

    root = tiny_labeled(n, size=32, name="empty")
    for m in (root / "masks").iterdir():
        cv2.imwrite(str(m), np.zeros((32, 32), np.uint8))
    return root


def test_undefined_key_metrics_warn_exit_3_and_json_stays_strict(tiny_labeled, tmp_path):
    data = _empty_masks(tiny_labeled)
    res = cli("train-quality", "--labeled", data, *sets(QUALITY), "--set", "quality.epochs=1", *common(tmp_path),
              "--out", tmp_path / "q", "--json")
    assert res.exit_code == 3, res.stderr
    summary = _strict_json(res.stdout)
    written = _strict_json((tmp_path / "q" / "summary.json").read_text())
    assert summary == written
    assert summary["test_pearson"] is None and "test_pearson" in summary["key_metrics_undefined"]
    assert "every mask is empty" in summary["undefined"]["test_pearson"]
    assert any("test_pearson" in w for w in summary["warnings"])
    assert "qgseg: warning:" in res.stderr and "exit code 3" in res.stderr
    assert Run(tmp_path / "q").status == "completed"  # it did finish; the warning says what is missing


def test_json_output_never_holds_nan(tmp_path, capsys):
    from qgseg.report import print_json
    from qgseg.runs import read_json, write_json

    obj = {"a": float("nan"), "b": [float("inf"), 1.0], "c": {"d": -float("inf")}}
    write_json(tmp_path / "x.json", obj)
    assert _strict_json((tmp_path / "x.json").read_text()) == {"a": None, "b": [None, 1.0], "c": {"d": None}}
    print_json(obj)
    assert _strict_json(capsys.readouterr().out) == read_json(tmp_path / "x.json")


# ---------------------------------------------------------------------------------------------
# 8. g's provenance: identity recorded, other data set warned, changed g refused on resume,
#    one automatic choice for ssl and evaluate
# ---------------------------------------------------------------------------------------------
def _copy_run(src: Path, dst: Path, newer: bool = False) -> Path:
    import shutil

    shutil.copytree(src, dst)
    (dst / ".lock").unlink(missing_ok=True)
    if newer:
        from qgseg.runs import _now

        Run(dst).update_meta(created=_now())
    return dst


def test_ssl_records_g_and_warns_when_g_was_trained_on_other_data(synth_data, quality_ref, tiny_labeled, tmp_path):
    from qgseg.quality import g_sha256

    other = tiny_labeled(12, size=32, name="other")
    res = cli("ssl", "--method", "mt", "--qw", "--quality", quality_ref, "--labeled", other,
              "--unlabeled", synth_data / "unlabeled", *sets(SSL), *common(tmp_path), "--out", tmp_path / "s", "--json")
    summary = ok(res)
    assert "was trained on" in res.stderr and str(other.resolve()) in res.stderr
    assert any("was trained on" in w for w in summary["warnings"])
    meta = Run(tmp_path / "s").meta
    assert meta["quality_sha256"] == summary["quality_sha256"] == g_sha256(quality_ref) != ""
    assert meta["quality_data"] == str((synth_data / "labeled").resolve())


def test_ssl_resume_refuses_when_g_changed(quality_ref, ssl_ref, tmp_path):
    q = _copy_run(quality_ref, tmp_path / "q")
    run = _copy_run(ssl_ref, tmp_path / "s")
    (run / "summary.json").unlink()
    Run(run).update_meta(quality_run=str(q))
    Run(run).set_status("interrupted")
    ck = E.load_checkpoint(q / "checkpoints" / "best.pt")
    name = next(k for k, v in ck["modules"]["g"].items() if v.is_floating_point())
    ck["modules"]["g"][name] = ck["modules"]["g"][name] + 0.5
    E.save_checkpoint(q / "checkpoints" / "best.pt", ck)
    res = cli("ssl", "--resume", "--out", run)
    assert res.exit_code == 2, res.stderr
    line = one_error_line(res.stderr)
    assert "g changed" in line and str(q) in line
    assert Run(run).status == "interrupted"  # refused before anything changed


def test_ssl_stopped_before_it_recorded_g_resumes_with_the_g_a_new_run_takes(synth_data, quality_ref, ssl_ref,
                                                                             tmp_path, monkeypatch):
    # Ctrl-C while g loads (seconds on a GPU: CUDA starts then): meta.json has no quality_run yet
    import qgseg.ssl as S

    real = S._load_quality

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "_load_quality", stopped)
    run = tmp_path / "root" / "s"
    res = cli(*ssl_args(synth_data, tmp_path / "root", quality_ref), "--out", run)
    assert res.exit_code == 130, res.stderr
    assert Run(run).status == "interrupted" and "quality_run" not in Run(run).meta
    monkeypatch.setattr(S, "_load_quality", real)
    summary = ok(cli("ssl", "--resume", "--out", run, "--json"))
    assert summary["quality_run"] == str(quality_ref) and Run(run).meta["quality_run"] == str(quality_ref)
    assert_same_run(run, ssl_ref)  # nothing was trained before the stop: the same run as one never stopped


def test_automatic_g_is_the_newest_compatible_one_in_ssl_evaluate_and_predict(quality_ref, ssl_ref, tmp_path):
    from qgseg.predict import g_for
    from qgseg.quality import compatible_quality_runs
    from qgseg.ssl import find_quality

    root = tmp_path / "runs"
    fits = _copy_run(quality_ref, root / "train-quality" / "fits", newer=True)
    _quality_run(root / "train-quality", 64)  # newer still, but at 64 px
    assert Run(root / "train-quality" / next(p.name for p in (root / "train-quality").iterdir()
                                             if p.name.startswith("q-64"))).meta["created"] > Run(fits).meta["created"]
    cfg = load_config(sets=[f"runs_root={root}", "data.image_size=32", "ssl.method=mt", "ssl.qw=true"],
                      cwd=tmp_path).config
    assert find_quality(cfg) == str(fits)
    assert str(compatible_quality_runs([root], 32)[0].path) == str(fits)
    # predict and select score a run that records no g of its own with the same choice
    seg = _copy_run(ssl_ref, tmp_path / "elsewhere" / "ssl" / "s")
    Run(seg).update_meta(quality_run="")
    g, note = g_for(Run(seg), None, root, 32, torch.device("cpu"))
    assert Path(g.source).resolve() == fits.resolve() and note == ""


def test_ssl_without_a_fitting_g_names_what_needs_it_not_a_quality_option(synth_data, tmp_path):
    _quality_run(tmp_path / "runs" / "train-quality", 64)
    res = cli("ssl", "--method", "mt", "--qw", "--labeled", synth_data / "labeled", "--unlabeled",
              synth_data / "unlabeled", *sets(SSL), *common(tmp_path))
    assert res.exit_code == 2
    line = one_error_line(res.stderr)
    assert line.startswith("qgseg: error: --qw:") and "64 px" in line and "32 px" in line
    assert not (tmp_path / "runs" / "ssl").exists()


def test_evaluate_of_an_ssl_run_uses_the_g_it_was_trained_with(quality_ref, ssl_ref, tmp_path):
    run = _copy_run(ssl_ref, tmp_path / "s")
    _copy_run(quality_ref, tmp_path / "runs" / "train-quality" / "newer", newer=True)
    res = cli("evaluate", run, *common(tmp_path), "--json")
    summary = ok(res)
    assert summary["quality_run"] == str(quality_ref)


# ---------------------------------------------------------------------------------------------
# 9. no run folder for a failed usage check, answered before torch loads; corrupt --resume
# ---------------------------------------------------------------------------------------------
_NO_TORCH = """
import sys, time
t0 = time.time()
from qgseg.cli import main
sys.argv = ["qgseg"] + sys.argv[1:]
try:
    main()
except SystemExit as e:
    code = e.code
print("torch" in sys.modules, code, round(time.time() - t0, 2), file=sys.stdout)
"""


@pytest.mark.parametrize("args, expected", [
    (["ssl", "--method", "nope"], "ssl.method"),
    (["ssl", "--labeled", "{root}/nope"], "--labeled {root}/nope: folder not found"),
    (["train-quality", "--labeled", "{root}/nope"], "--labeled {root}/nope: folder not found"),
    (["ssl", "--method", "mt", "--labeled", "{root}"], "--unlabeled: no unlabeled data folder given"),
])
def test_usage_errors_answer_before_torch_loads_and_leave_no_run(tmp_path, args, expected):
    args = [a.format(root=tmp_path) for a in args]
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", _NO_TORCH, *args, *common(tmp_path)], cwd=tmp_path,
                         env=env(tmp_path), capture_output=True, text=True, timeout=120)
    seconds = time.time() - t0
    torch_loaded, code, _ = res.stdout.split()
    assert code == "2", res.stderr
    assert expected.format(root=tmp_path) in one_error_line(res.stderr)
    assert torch_loaded == "False"  # what made errors take 7-12 s
    assert seconds < 10, seconds  # < 2 s on an idle machine (docs/reliability.md); generous under load
    assert not (tmp_path / "runs").exists()


def test_corrupt_resume_redoes_an_interrupted_run(synth_data, tmp_path):
    args = ["corrupt", "--labeled", synth_data / "labeled", *sets(QUALITY), *common(tmp_path)]
    ref = ok(cli(*args, "--out", tmp_path / "ref", "--json"))
    run = tmp_path / "c"
    ok(cli(*args, "--out", run, "--json"))
    (run / "summary.json").unlink()
    (run / "dq_test.npz").unlink()  # cut short before the end
    Run(run).set_status("interrupted")
    res = cli(*args, "--out", run)
    assert res.exit_code == 2 and "--resume" in one_error_line(res.stderr)  # the advice given ...
    summary = ok(cli("corrupt", "--resume", "--out", run, "--json"))  # ... works
    assert stable(summary) == stable(ref) and (run / "dq_test.npz").is_file()
    assert Run(run).status == "completed"


# ---------------------------------------------------------------------------------------------
# 10. unclear or wrong answers (issue 17, list item 5)
# ---------------------------------------------------------------------------------------------
def test_truncated_last_pt_says_damaged_keeps_status_and_points_to_best_pt(quality_ref, tmp_path):
    run = _copy_run(quality_ref, tmp_path / "q")
    (run / "summary.json").unlink()
    Run(run).set_status("interrupted")
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    res = cli("train-quality", "--resume", "--out", run)
    assert res.exit_code == 2
    line = one_error_line(res.stderr)
    assert "damaged or incomplete" in line and "last.pt" in line and "weights_only" not in line
    assert "best.pt (epoch" in line and "is intact" in line
    assert line.rstrip().endswith("start a new run")  # not cut mid-sentence
    assert Run(run).status == "interrupted"  # still what it was: nothing was changed


def test_read_only_out_is_exit_2_naming_it(synth_data, tmp_path, monkeypatch):
    real_mkdir = Path.mkdir
    locked = tmp_path / "readonly"

    def mkdir(self, *a, **k):
        if str(self).startswith(str(locked)):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    res = cli(*quality_args(synth_data, tmp_path), "--out", locked / "q")
    assert res.exit_code == 2, res.stderr
    line = one_error_line(res.stderr)
    assert f"--out {locked / 'q'}" in line and "Permission denied" in line


def test_inspect_is_not_usable_with_fewer_pairs_than_training_needs(tiny_labeled):
    res = cli("inspect", tiny_labeled(2), "--json")
    assert res.exit_code == 2
    doc = json.loads(res.stdout)
    assert doc["usable"] is False and doc["pairs"] == 2 and "at least 3" in doc["problems"][0]


def test_inspect_with_one_broken_file_still_shows_layout_and_pairs(tiny_labeled):
    root = tiny_labeled(6)
    (root / "images" / "case03.png").write_bytes(b"not a png")
    res = cli("inspect", root, "--json")
    assert res.exit_code == 2
    doc = json.loads(res.stdout)
    assert doc["pairs"] == 6 and doc["layout"] == "images/masks" and doc["usable"] is False
    assert "case03.png" in doc["problems"][0]


def test_evaluate_with_a_broken_best_pt_leaves_no_eval_folder(ssl_ref, tmp_path):
    run = _copy_run(ssl_ref, tmp_path / "s")
    best = run / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])
    res = cli("evaluate", run, *common(tmp_path))
    assert res.exit_code == 2
    assert "damaged or incomplete" in one_error_line(res.stderr)
    assert not (run / "eval").exists()


def test_toml_with_a_byte_order_mark_is_read(tmp_path):
    f = tmp_path / "run.toml"
    f.write_bytes("\ufeff[train]\nepochs = 7\n".encode("utf-8"))
    assert load_config(config_file=f, cwd=tmp_path).config.train.epochs == 7


@pytest.mark.parametrize("args, source", [
    (["--method", "mt", "--set", "train.epochs=0"], "--set: train.epochs = 0"),
    (["--epochs", "0"], "--epochs: train.epochs = 0"),
    (["--method", "nope"], "--method: ssl.method = 'nope' is out of range"),
])
def test_out_of_range_value_names_its_source(tmp_path, args, source):
    res = cli("ssl", *args, *common(tmp_path))
    assert res.exit_code == 2
    assert source in one_error_line(res.stderr)


# ---------------------------------------------------------------------------------------------
# 11. hidden traps, plots, tables, progress (issue 17, list items 6 and 8)
# ---------------------------------------------------------------------------------------------
def test_ssl_schedule_that_never_reaches_the_unlabeled_term_warns(synth_data, tmp_path):
    res = cli("ssl", "--method", "mt", "--labeled", synth_data / "labeled", "--unlabeled", synth_data / "unlabeled",
              *sets(SSL), "--set", "ssl.warmup=5", *common(tmp_path), "--out", tmp_path / "s")
    assert res.exit_code == 0, res.stderr
    assert "ssl.warmup = 5 >= train.epochs = 3" in res.stderr and "never switches on" in res.stderr
    assert "ssl: 3 epochs of 2 steps" in res.stderr  # not "6 steps", which read like epochs
    assert "unlabeled term never on" in res.stdout  # the table does not claim "mt" quietly
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["unlabeled_term_epochs"] == 0 and any("never switches on" in w for w in summary["warnings"])
    log = (tmp_path / "s" / "log.txt").read_text()
    assert "epoch 1:" in log and "nan" not in log  # inactive terms are left out, not printed as nan


def test_every_training_run_has_learning_curves(quality_ref, ssl_ref):
    for run in (quality_ref, ssl_ref):
        png = run / "plots" / "learning_curves.png"
        assert png.is_file() and png.stat().st_size > 10_000


def test_learning_curves_show_the_ssl_schedule(tmp_path):
    from qgseg import plots

    history = [{"epoch": e, "sup": 1.0 / e, "unsup": float("nan") if e < 2 else 0.1, "lambda": 0.1 * e,
                "qw_mean": 0.5, "val_dsc": 0.1 * e, "lr": 1e-3} for e in range(1, 5)]
    assert plots.learning_curves(history, tmp_path / "c.png").is_file()
    assert plots.learning_curves([], tmp_path / "none.png") is None


def test_corrupt_contact_sheet_has_several_cases_and_every_category(synth_data, tmp_path, monkeypatch):
    from qgseg import plots
    from qgseg.corrupt import CATEGORIES

    seen = {}
    real = plots.corruption_examples

    def spy(image, gt, cs, path, per_category=4, categories=None):
        seen.update(gt=gt, cs=cs, categories=categories)
        return real(image, gt, cs, path, per_category, categories)

    monkeypatch.setattr(plots, "corruption_examples", spy)
    ok(cli("corrupt", "--labeled", synth_data / "labeled", *sets(QUALITY), *common(tmp_path), "--out",
           tmp_path / "c", "--json"))
    assert seen["gt"].ndim == 3 and len(set(seen["cs"].case.tolist())) > 5  # many cases, not one
    assert set(CATEGORIES) <= set(seen["categories"])  # a row per category, even one not drawn
    assert (tmp_path / "c" / "plots" / "examples.png").is_file()


def test_train_quality_table_is_readable(synth_data, quality_ref, tmp_path):
    from qgseg.report import kv_table, stdout_console

    summary = json.loads((quality_ref / "summary.json").read_text())
    con = stdout_console()
    with con.capture() as cap:
        con.print(kv_table("g", summary))
    text = cap.get()
    assert "test MAE" in text and "test_mae" not in text and "train_seconds" not in text
    assert f"{summary['train_seconds']:.1f} s" in text


def test_corrupt_reports_progress(synth_data, tmp_path):
    res = cli("corrupt", "--labeled", synth_data / "labeled", *sets(QUALITY), *common(tmp_path))
    assert res.exit_code == 0, res.stderr
    assert "corrupt:" in res.stderr and "masks to draw" in res.stderr


# ---------------------------------------------------------------------------------------------
# 12. the CLI people expect: --version, config show, defaults in --help, --quiet, shared options
# ---------------------------------------------------------------------------------------------
def test_version():
    import qgseg

    res = cli("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"qgseg {qgseg.__version__}"


def test_config_show_prints_the_resolved_toml_with_sources(tmp_path):
    import tomllib

    f = tmp_path / "run.toml"
    f.write_text("[data]\nimage_size = 64\n")
    res = cli("config", "show", "--preset", "cpu", "--config", f, "--method", "qar", "--set", "train.epochs=5")
    assert res.exit_code == 0, res.stderr
    text = res.stdout
    assert "epochs = 5  # --set" in text and f"image_size = 64  # config file {f}" in text
    assert 'method = "qar"  # option' in text and "qar_weight = 0.01  # default of method qar" in text
    assert 'arch = "unet"  # preset cpu' in text and "seed = 0  # default" in text
    assert tomllib.loads(text)["train"]["epochs"] == 5  # valid TOML: a run file to start from
    doc = json.loads(cli("config", "show", "--preset", "cpu", "--json").stdout)
    assert doc["sources"]["model.arch"] == "preset cpu" and doc["config"]["model"]["arch"] == "unet"


def _help(*args: str) -> str:
    """--help of a command as one line of words (wide, without the boxes' borders)."""
    res = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.stdout
    return " ".join(res.stdout.replace("│", " ").split())


def test_help_shows_the_defaults_and_the_cpu_presets():
    text = _help("ssl")
    assert "default: 200 (train.epochs); cpu preset:" in text
    assert "default: unetpp (model.arch); cpu preset: unet" in text and "default: sup (ssl.method)" in text
    top = _help()
    assert "paper's GPU budget" in top and "--preset cpu" in top


def test_quiet_prints_no_table_but_json_still_prints(tmp_path):
    res = cli("synth", "--out", tmp_path / "s", "--n-labeled", "3", "--n-unlabeled", "0", "--size", "32", "--quiet")
    assert res.exit_code == 0 and res.stdout == ""
    res = cli("synth", "--out", tmp_path / "t", "--n-labeled", "3", "--n-unlabeled", "0", "--size", "32", "--quiet",
              "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)


def _readme_shared_options() -> list[tuple[list[str], list[str]]]:
    """(options, commands) of the README's shared-options table."""
    import re

    text = (REPO / "README.md").read_text()
    table = text.split("| option | commands |", 1)[1].split("\n\n", 1)[0]
    rows = []
    for line in table.strip().splitlines()[1:]:
        opt, cmds = [c.strip() for c in line.strip().strip("|").split(" | ")]
        options = re.findall(r"`(--[a-z-]+)", opt)
        everything = ["synth", "inspect", "corrupt", "train-weak", "train-quality", "ssl", "evaluate", "predict",
                      "qc", "select", "ablate", "demo", "config show"]
        if cmds.startswith("every command but"):
            commands = [c for c in everything if c not in cmds]
        elif cmds == "every command":
            commands = everything
        else:
            commands = [c.strip() for c in cmds.split(",")]
        rows.append((options, commands))
    return rows


def test_readme_shared_options_are_what_the_commands_take():
    rows = _readme_shared_options()
    assert len(rows) >= 6
    for options, commands in rows:
        for command in commands:
            text = _help(*command.split())
            for option in options:
                assert f" {option} " in f" {text} ", f"README: `qgseg {command}` takes {option}, but its --help lacks it"


def test_evaluate_out_and_ablate_resume(ssl_ref, tmp_path):
    run = _copy_run(ssl_ref, tmp_path / "s")
    summary = ok(cli("evaluate", run, *common(tmp_path), "--out", tmp_path / "ev", "--json"))
    assert summary["out"] == str(tmp_path / "ev") and (tmp_path / "ev" / "summary.json").is_file()
    assert not (run / "eval").exists()
    res = cli("ablate", "k", "--resume", *common(tmp_path))
    assert res.exit_code == 2 and "--resume: no k ablation" in one_error_line(res.stderr)


def test_torch_free_method_facts_agree_with_the_registry():
    """qgseg/checks.py knows without torch which methods read unlabeled images; the registry
    (which imports torch) is the truth."""
    from qgseg import checks
    from qgseg.methods import get_method, method_names

    for name in method_names():
        m = get_method(name)
        assert (m.unlabeled is None) == (name in checks._NO_UNLABELED_LOSS), name
        uses_unlabeled = m.unlabeled is not None or name == "qar"
        assert uses_unlabeled == (name not in checks._NO_UNLABELED), name
