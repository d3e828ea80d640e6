"""The ssl stage end to end through the CLI on tiny synthetic data (32 px, 2 epochs)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qgseg.cli import app
from qgseg.config import Config, dumps_toml
from qgseg.engine import load_checkpoint, save_checkpoint
from qgseg.models import count_parameters
from qgseg.quality import build_quality_net
from qgseg.runs import Run, create_run

ENCODER = "tu-mobilenetv3_small_050"  # a small timm encoder keeps the smp U-Net fast at 32 px
TOML = f"""
[data]
labeled = "data/labeled"
unlabeled = "data/unlabeled"
image_size = 32

[model]
arch = "unet"
encoder = "{ENCODER}"

[train]
epochs = 2
steps_per_epoch = 1
batch_size = 4
batch_size_unlabeled = 4

[ssl]
warmup = 0
rampup = 1
"""
COLUMNS = ["epoch", "sup", "unsup", "qar", "total", "lambda", "lambda_qar", "qw_mean", "qw_nonzero", "q_mean", "q_std",
           "val_dsc", "val_iou", "val_quality", "val_quality_corr", "lr"]


def make_data(root: Path) -> None:
    try:
        from qgseg.synth import generate
    except ImportError:  # pragma: no cover - synth is written in parallel
        generate = None
    if generate is not None:
        generate(root, n_labeled=10, n_unlabeled=6, size=32, seed=0)
        return
    import numpy as np  # pragma: no cover
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("labeled/images", "labeled/masks", "unlabeled/images"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(16):
        img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 6 + i % 8:22] = 255
        if i < 10:
            Image.fromarray(img).save(root / f"labeled/images/c{i}.png")
            Image.fromarray(mask).save(root / f"labeled/masks/c{i}.png")
        else:
            Image.fromarray(img).save(root / f"unlabeled/images/u{i}.png")


def make_quality_run(runs_root: Path, image_size: int = 32, tta_views: int = 1) -> Run:
    """A completed train-quality run holding a tiny random g (what train-quality would write)."""
    cfg = Config().replace(**{"data.image_size": image_size})
    run = create_run(runs_root / "train-quality" / "20260101-000000", "train-quality", dumps_toml(cfg))
    torch.manual_seed(0)
    net = build_quality_net("resnet18", tta_views=tta_views)
    save_checkpoint(run.checkpoints / "best.pt", {"modules": {"g": net.state_dict()}, "specs": {"g": net.spec}})
    run.write_summary({})
    run.set_status("completed")
    return run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ssl-data")
    make_data(root / "data")
    return root / "data"


@pytest.fixture
def workdir(tmp_path, data_dir, monkeypatch) -> Path:
    """A project folder: qgseg.toml naming the data, a private data cache, runs/ beside it."""
    (tmp_path / "data").symlink_to(data_dir, target_is_directory=True)
    (tmp_path / "qgseg.toml").write_text(TOML)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QGSEG_CACHE", str(tmp_path / "cache"))
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(app, ["ssl", *args], catch_exceptions=False)


def test_mt_qw_end_to_end(workdir):
    quality = make_quality_run(workdir / "runs", tta_views=2)
    res = invoke("--method", "mt", "--qw", "--json", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    run = Path(summary["run"])
    assert run.parent == Path("runs") / "ssl"
    assert summary["method"] == "mt" and summary["qw"] is True and summary["qw_rule"] == "power"
    assert Path(summary["quality_run"]).resolve() == quality.path.resolve()  # found by itself
    assert summary["quality_views"] == 2  # g scores with the views saved with it
    for name in ("config.toml", "meta.json", "splits.json", "metrics.csv", "summary.json", "test_cases.csv",
                 "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "completed" and meta["stage"] == "ssl"
    assert meta["parameters"]["model"] == summary["parameters"] > 100_000
    assert json.loads((run / "summary.json").read_text()) == summary
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert set(COLUMNS) <= set(rows[0]), set(COLUMNS) - set(rows[0])
    assert [float(r["lambda"]) for r in rows] == [0.25, 0.25]
    for r in rows:
        for c in ("sup", "unsup", "total", "val_dsc", "val_iou", "val_quality", "qw_mean", "qw_nonzero", "q_mean"):
            assert float(r[c]) == float(r[c]), c  # not NaN
        assert 0.0 <= float(r["qw_nonzero"]) <= 1.0
    splits = json.loads((run / "splits.json").read_text())
    assert summary["n_test"] == len(splits["test"]) == summary["test_cases"]
    with open(run / "test_cases.csv", newline="") as f:
        cases = list(csv.DictReader(f))
    assert [c["stem"] for c in cases] == splits["test"]
    assert {"dsc", "iou", "hd95", "pred_quality"} <= set(cases[0])
    for key in ("test_dsc", "test_dsc_se", "test_iou", "test_iou_se"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert "test_hd95" in summary
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert set(best["modules"]) == {"model"} and best["specs"]["model"]["encoder"] == ENCODER
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert {"model", "teacher"} <= set(last["modules"]) and last["epoch"] == 2
    assert last["task"]["ema_updates"]["teacher"] == 2
    from qgseg.models import build_segmenter

    assert count_parameters(build_segmenter("unet", ENCODER)) == summary["parameters"]


def test_ssl_quality_views_overrides_the_views_saved_with_g(workdir):
    from qgseg.ssl import _load_quality

    quality = make_quality_run(workdir / "runs", tta_views=4)
    image, mask = torch.randn(2, 3, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    saved = _load_quality(str(quality.path), Config().replace(**{"data.image_size": 32}))
    one = _load_quality(str(quality.path), Config().replace(**{"data.image_size": 32, "ssl.quality_views": 1}))
    assert saved.net.spec["tta_views"] == 4 and one.net.spec["tta_views"] == 1
    rotated = torch.stack([one.score(torch.rot90(image, k, (2, 3)), torch.rot90(mask, k, (2, 3))) for k in range(4)])
    assert torch.allclose(saved.score(image, mask), rotated.mean(0), atol=1e-5)
    assert not torch.allclose(one.score(image, mask), rotated.mean(0), atol=1e-4)


def test_qw_refused_for_sup_and_qar(workdir):
    for method in ("sup", "qar"):
        res = invoke("--method", method, "--qw", "--json")
        assert res.exit_code == 2, (method, res.stderr)
        assert "--qw" in res.stderr and "Traceback" not in res.stderr
    assert not (workdir / "runs" / "ssl").exists()  # refused before a run directory was made


def test_qw_without_quality_run_is_a_usage_error(workdir):
    res = invoke("--method", "pl", "--qw")
    assert res.exit_code == 2 and "--quality" in res.stderr
    make_quality_run(workdir / "runs", image_size=64)  # g at another image size does not fit
    res = invoke("--method", "qar")
    assert res.exit_code == 2 and "64 px" in res.stderr
    assert not (workdir / "runs" / "ssl").exists()


def test_sup_runs_without_quality_or_unlabeled(workdir):
    """Baselines never need g; sup does not even read the unlabeled folder."""
    (workdir / "qgseg.toml").write_text(TOML.replace('unlabeled = "data/unlabeled"\n', ""))
    res = invoke("--method", "sup", "--epochs", "1", "--json", "--out", "runs/ssl/sup")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["quality_run"] == "" and summary["n_unlabeled"] == 0
    rows = list(csv.DictReader(open(workdir / "runs/ssl/sup/metrics.csv", newline="")))
    assert len(rows) == 1 and "val_quality" not in rows[0]
    assert rows[0]["unsup"] == "nan" and float(rows[0]["lambda"]) == 0.0
    assert Run(workdir / "runs/ssl/sup").status == "completed"


def test_interrupt_and_resume(workdir, monkeypatch):
    """Ctrl-C after epoch 1 leaves a resumable run (exit 130); --resume finishes it."""
    import functools

    import qgseg.ssl
    from qgseg.engine import FitSettings

    with monkeypatch.context() as m:
        m.setattr(qgseg.ssl, "FitSettings", functools.partial(FitSettings, stop_after_epoch=1))
        res = invoke("--method", "pl", "--out", "runs/ssl/pl", "--json")
    assert res.exit_code == 130, res.stderr
    run = Run(workdir / "runs/ssl/pl")
    assert run.status == "interrupted"
    assert load_checkpoint(run.checkpoints / "last.pt")["task"]["ema_updates"]["teacher"] == 1
    res = invoke("--resume", "--out", "runs/ssl/pl", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["method"] == "pl"
    assert run.status == "completed" and run.meta["resumed"] == 1
    rows = list(csv.DictReader(open(run.path / "metrics.csv", newline="")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert load_checkpoint(run.checkpoints / "last.pt")["task"]["ema_updates"]["teacher"] == 2


def test_unused_as_unlabeled_uses_the_left_out_training_cases(workdir):
    """data.unused_as_unlabeled: the training cases data.max_labeled leaves out are the unlabeled
    images (alone without a folder, added to the folder's images with one); never both labeled and unlabeled."""
    (workdir / "qgseg.toml").write_text(TOML.replace('unlabeled = "data/unlabeled"\n', ""))
    res = invoke("--method", "mt", "--epochs", "1", "--json", "--out", "runs/ssl/in-domain",
                 "--set", "data.max_labeled=3", "--set", "data.unused_as_unlabeled=true")
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    splits = json.loads((workdir / "runs/ssl/in-domain/splits.json").read_text())
    assert summary["n_train"] == 3 and len(splits["unused"]) > 0
    assert summary["n_unlabeled"] == len(splits["unused"])
    assert not set(splits["unused"]) & set(splits["train"] + splits["val"] + splits["test"])
    res = invoke("--method", "mt", "--epochs", "1", "--json", "--out", "runs/ssl/both", "--unlabeled", "data/unlabeled",
                 "--set", "data.max_labeled=3", "--set", "data.unused_as_unlabeled=true")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["n_unlabeled"] == len(splits["unused"]) + 6  # the folder's 6 images too


def test_qw_mechanism_benchmark_reads_an_in_domain_mt_run(workdir):
    """benchmarks/qw_mechanism.py on a finished in-domain mt run: one row per unused image, and
    shares that add up (the zeroed images' loss share is 0 exactly when QW zeroes none)."""
    import importlib.util

    make_quality_run(workdir / "runs")
    res = invoke("--method", "mt", "--epochs", "1", "--json", "--out", "runs/ssl/mech",
                 "--set", "data.max_labeled=3", "--set", "data.unused_as_unlabeled=true")
    assert res.exit_code == 0, res.stderr
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "qw_mechanism.py"
    spec = importlib.util.spec_from_file_location("qw_mechanism", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.measure(workdir / "runs/ssl/mech")
    unused = json.loads((workdir / "runs/ssl/mech/splits.json").read_text())["unused"]
    assert out["images"] == len(unused) > 0
    for key in ("share_zeroed", "loss_share_of_zeroed", "loss_share_of_rejected_quarter", "dice_kept"):
        assert 0.0 <= out[key] <= 1.0, key
    assert (out["loss_share_of_zeroed"] == 0) == (out["share_zeroed"] == 0)
    assert out["weighted_over_plain_loss"] > 0


def test_unused_as_unlabeled_needs_max_labeled(workdir):
    res = invoke("--method", "mt", "--epochs", "1", "--out", "runs/ssl/bad", "--set", "data.unused_as_unlabeled=true")
    assert res.exit_code == 2
    assert "data.unused_as_unlabeled" in res.stderr and "data.max_labeled > 0" in res.stderr
    assert not (workdir / "runs/ssl/bad").exists()
