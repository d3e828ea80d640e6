"""`qgseg predict` and the per-image signals (TTA, confidence, agreement, g) on tiny 32 px runs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import synth_world
from PIL import Image
from typer.testing import CliRunner

from qgseg.cli import app
from qgseg.config import load_config

runner = CliRunner()
ENCODER = "tu-mobilenetv3_small_050"  # keeps the U-Net fast at 32 px
TINY = ["data.image_size=32", "corrupt.k=2", "corrupt.eval_k=2", "corrupt.p_weak=0.0", "quality.epochs=1",
        "quality.batch_size=8", "model.arch=unet", "model.encoder=" + ENCODER, "train.epochs=1",
        "train.steps_per_epoch=2", "train.batch_size=4"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A train-quality run (g) and a sup ssl run (f) on 32 px synthetic data."""
    from qgseg.ssl import run_ssl
    from qgseg.train_quality import run_train_quality

    with synth_world(tmp_path_factory, "predict", n_labeled=16, n_unlabeled=12, size=48, seed=0) as (root, opts):
        q_run, _ = run_train_quality(load_config(options=opts, sets=TINY, cwd=root))
        s_run, _ = run_ssl(load_config(options=opts, sets=TINY + ["ssl.method=sup"], cwd=root))
        yield {"root": root, "quality": q_run.path, "ssl": s_run.path, "data": root / "data"}


def _invoke(args: list[str], cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


def _mixed_folder(folder: Path, n: int, seed: int = 0) -> dict[str, tuple[int, int]]:
    """n images of random sizes (height, width); every 3rd grey, every 5th RGBA, every 4th JPEG."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    sizes = {}
    for i in range(n):
        h, w = int(rng.integers(17, 90)), int(rng.integers(17, 90))
        a = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        cv2.circle(a, (w // 2, h // 2), max(2, min(h, w) // 4), (40, 30, 20), -1)
        im = Image.fromarray(a)
        if i % 3 == 0:
            im = im.convert("L")
        elif i % 5 == 0:
            im = im.convert("RGBA")
        ext = ".jpg" if i % 4 == 0 and im.mode != "RGBA" else ".png"
        im.save(folder / f"img{i:03d}{ext}")
        sizes[f"img{i:03d}"] = (h, w)
    return sizes


# ---------------------------------------------------------------------------------------------
# signals
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("views", [1, 2, 4, 8])
def test_undo_views_turns_every_view_back(views):
    from qgseg.predict import undo_views
    from qgseg.quality import dihedral_views

    x = torch.randn(3, 1, 6, 6)
    y = dihedral_views(x, views) if views > 1 else x
    back = undo_views(y, views)
    assert back.shape == (views, 3, 1, 6, 6)
    for v in range(views):
        assert torch.equal(back[v], x)


def test_predict_views_one_view_is_predict_probs_and_agreement_is_a_dice(trained):
    from qgseg.data import load_unlabeled
    from qgseg.predict import load_segmenter, predict_probs, predict_views

    model, _, _ = load_segmenter(trained["ssl"])
    images = load_unlabeled(trained["data"] / "unlabeled", 32).images
    p1, a1 = predict_views(model, images, torch.device("cpu"), 1)
    assert np.allclose(p1, predict_probs(model, images, torch.device("cpu")), atol=1e-6)
    assert np.isnan(a1).all()
    p4, a4 = predict_views(model, images, torch.device("cpu"), 4)
    assert p4.shape == p1.shape and ((a4 >= 0) & (a4 <= 1)).all()


def test_confidence_is_high_for_sure_maps_and_low_near_one_half():
    from qgseg.predict import confidence

    sure = np.zeros((1, 8, 8), np.float32)
    sure[0, 2:5, 2:5] = 1.0
    unsure = np.full((1, 8, 8), 0.5, np.float32)
    empty = np.full((1, 8, 8), 0.01, np.float32)
    mid = sure * 0.8 + 0.05
    c = confidence(np.concatenate([sure, unsure, empty, mid]))
    assert c[0] == pytest.approx(1.0) and c[1] == pytest.approx(0.0) and c[2] == pytest.approx(1.0)
    assert 0.0 < c[3] < 1.0


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def test_predict_100_mixed_images_writes_masks_at_their_size_and_resumes(trained, tmp_path):
    sizes = _mixed_folder(tmp_path / "imgs", 100)
    out = tmp_path / "pred"
    res = _invoke(["predict", trained["ssl"], "--images", tmp_path / "imgs", "--out", out, "--probs",
                   "--quality", trained["quality"], "--json"], trained["root"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["predicted"] == 100 and summary["skipped"] == 0 and summary["images_total"] == 100
    masks = sorted((out / "masks").glob("*.png"))
    assert len(masks) == 100
    for m in masks:
        a = np.asarray(Image.open(m))
        assert a.shape == sizes[m.stem] and set(np.unique(a)) <= {0, 255}
        assert np.asarray(Image.open(out / "probs" / m.name)).shape == sizes[m.stem]
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 100 and list(table["stem"]) == sorted(sizes)
    assert table["quality"].between(0, 1).all() and table["agreement"].between(0, 1).all()
    assert (table["flag"] == (table["quality"] < 0.7)).all()
    assert summary["flagged"] == int(table["flag"].sum())
    assert (out / "lowest.png").stat().st_size > 0
    # the stored mask is the prediction: foreground share matches the file
    first = table.iloc[0]
    assert first["foreground"] == pytest.approx((np.asarray(Image.open(out / first["mask"])) > 0).mean())

    # rerun: nothing to do; after losing three masks, only those three are predicted again
    res = _invoke(["predict", trained["ssl"], "--images", tmp_path / "imgs", "--out", out, "--probs", "--quality",
                   trained["quality"], "--json"], trained["root"])
    assert json.loads(res.stdout)["skipped"] == 100
    before = pd.read_csv(out / "predictions.csv")
    for m in masks[:3]:
        m.unlink()
    res = _invoke(["predict", trained["ssl"], "--images", tmp_path / "imgs", "--out", out, "--probs", "--quality",
                   trained["quality"], "--json"], trained["root"])
    s = json.loads(res.stdout)
    assert (s["predicted"], s["skipped"]) == (3, 97)
    after = pd.read_csv(out / "predictions.csv")
    pd.testing.assert_frame_equal(before, after, check_exact=False, atol=1e-5)


def test_predict_uses_the_runs_own_g_and_a_higher_flag_threshold_flags_more(trained, tmp_path):
    _mixed_folder(tmp_path / "imgs", 6)
    res = _invoke(["predict", trained["ssl"], "--images", tmp_path / "imgs", "--out", tmp_path / "a", "--tta", "1",
                   "--flag-below", "1.0", "--json"], trained["root"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    # the sup run recorded the newest g of its runs root for its val / test columns
    assert Path(s["quality_run"]).resolve() == Path(trained["quality"]).resolve()
    assert s["flagged"] == 6 and s["agreement_mean"] is None
    assert pd.read_csv(tmp_path / "a" / "predictions.csv")["agreement"].isna().all()


@pytest.mark.parametrize("case", ["missing run", "train-quality run", "unreadable image", "no images", "other tta"])
def test_predict_bad_input_is_one_line_and_exit_2(trained, tmp_path, case):
    imgs = tmp_path / "imgs"
    _mixed_folder(imgs, 3)
    run, out, extra = trained["ssl"], tmp_path / "out", []
    if case == "missing run":
        run = tmp_path / "nope"
    elif case == "train-quality run":
        run = trained["quality"]
    elif case == "unreadable image":
        (imgs / "broken.png").write_bytes(b"not an image")
    elif case == "no images":
        imgs = tmp_path / "empty"
        imgs.mkdir()
    else:
        assert _invoke(["predict", run, "--images", imgs, "--out", out, "--tta", "1"], trained["root"]).exit_code == 0
        extra = ["--tta", "2"]
    res = _invoke(["predict", run, "--images", imgs, "--out", out, *extra], trained["root"])
    assert res.exit_code == 2, res.output
    err = [line for line in res.stderr.splitlines() if line.startswith("qgseg: error:")]
    assert len(err) == 1, res.stderr
    if case == "unreadable image":
        assert "broken.png" in err[0] and not out.exists()  # checked before anything is written
    if case != "other tta":
        assert not (out / "predictions.csv").exists()


def test_predict_interrupted_keeps_finished_masks_and_a_rerun_completes(trained, tmp_path, monkeypatch):
    import qgseg.predict as P

    _mixed_folder(tmp_path / "imgs", 12)
    loaded = load_config(options={"runs_root": str(trained["root"] / "runs")}, cwd=tmp_path)
    real, calls = P.predict_views, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "predict_views", flaky)
    out = tmp_path / "pred"
    with pytest.raises(KeyboardInterrupt):
        P.run_predict(loaded, trained["ssl"], tmp_path / "imgs", out, quality=str(trained["quality"]), batch_size=4)
    assert len(list((out / "masks").glob("*.png"))) == 8
    assert not (out / "predictions.csv").exists() and not (out / "summary.json").exists()
    monkeypatch.setattr(P, "predict_views", real)
    s = P.run_predict(loaded, trained["ssl"], tmp_path / "imgs", out, quality=str(trained["quality"]), batch_size=4)
    assert (s["predicted"], s["skipped"]) == (4, 8)
    assert len(pd.read_csv(out / "predictions.csv")) == 12
