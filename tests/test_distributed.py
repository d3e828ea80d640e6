"""Multi-process training: a real 2-process torchrun job on the CPU (gloo), and batch sharding."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from qgseg import data as D
from qgseg import distributed
from qgseg.engine import load_checkpoint
from qgseg.models import build_segmenter
from qgseg.predict import evaluate_predictions, predict_probs
from qgseg.runs import Run

TINY = ["data.image_size=32", "model.arch=unet", "train.epochs=2", "train.batch_size=4",
        "train.batch_size_unlabeled=4", "ssl.warmup=0", "ssl.rampup=1"]


def test_index_batches_shards_each_global_batch(monkeypatch):
    n, bs, world = 22, 3, 2
    full = D.index_batches(n, bs * world, torch.Generator().manual_seed(5))
    shards = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
        shards.append(D.index_batches(n, bs, torch.Generator().manual_seed(5)))
    assert len(shards[0]) == len(shards[1]) == len(full) == n // (bs * world)
    for b, (a, c) in enumerate(zip(*shards)):
        assert len(a) == len(c) == bs
        assert set(a.tolist()).isdisjoint(c.tolist())
        assert sorted(a.tolist() + c.tolist()) == sorted(full[b].tolist())  # rank slices = global batch


def test_mean_over_processes_is_identity_in_one_process():
    assert distributed.mean_over_processes({"a": 1.5, "b": float("nan")})["a"] == 1.5
    assert not distributed.active()


def test_torchrun_two_processes_ssl(synth_data, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", NO_ALBUMENTATIONS_UPDATE="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "qgseg", "ssl", "--method", "mt", "--labeled", str(synth_data / "labeled"),
           "--unlabeled", str(synth_data / "unlabeled"), "--device", "cpu", "--out", str(out), "--json",
           *sum([["--set", s] for s in TINY + [f"runs_root={tmp_path / 'runs'}"]], [])]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)  # exactly one JSON document: rank 0 alone prints
    run = Run(out)
    assert run.status == "completed"
    for name in ("config.toml", "meta.json", "splits.json", "metrics.csv", "summary.json", "test_cases.csv",
                 "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.tmp"))
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2]
    # the metrics are those of the whole test split, evaluated once by rank 0
    splits = json.loads((out / "splits.json").read_text())
    cases = pd.read_csv(out / "test_cases.csv")
    assert sorted(cases["stem"]) == sorted(splits["test"]) and summary["n_test"] == len(splits["test"])
    assert summary["test_dsc"] == pytest.approx(cases["dsc"].mean())
    # ... and they are what best.pt gives on the whole test split in one process
    ck = load_checkpoint(out / "checkpoints" / "best.pt")
    model = build_segmenter(**ck["specs"]["model"])
    model.load_state_dict(ck["modules"]["model"])
    test = D.load_labeled(synth_data / "labeled", 32).subset(splits["test"])
    df = evaluate_predictions(test, predict_probs(model, test.images, torch.device("cpu")), with_hd95=False)
    assert np.allclose(df["dsc"].to_numpy(), cases["dsc"].to_numpy(), atol=1e-6)


def test_torchrun_nan_on_one_process_stops_every_process(tmp_path):
    """Rank 1 alone sees a NaN loss: both ranks raise at the same step instead of rank 0 hanging."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", NO_ALBUMENTATIONS_UPDATE="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    worker = os.path.join(os.path.dirname(__file__), "dist_nan_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
           str(tmp_path)]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    files = [tmp_path / f"outcome-{rank}.txt" for rank in (0, 1)]
    outcomes = [f.read_text() if f.is_file() else "no outcome" for f in files]
    assert outcomes == ["diverged True", "diverged True"], res.stderr[-3000:]
    # Both ranks raised at the step and wrote their outcome. Under heavy machine load gloo's
    # teardown (destroy_process_group after the outcome is written) was once seen to abort one
    # rank ("terminate called without an active exception"); that is torch's teardown, not the
    # divergence handling this test is about, so it is the one non-zero exit accepted here.
    teardown_abort = "terminate called without an active exception" in res.stderr
    assert res.returncode == 0 or teardown_abort, res.stderr[-3000:]
