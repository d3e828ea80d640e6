"""Data layer: layouts, unlabeled folders, splits, cache, binarisation, batches, bad inputs."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import PH2, SYNTH_LABELED, SYNTH_SIZE, SYNTH_UNLABELED, needs_ph2
from PIL import Image

from qgseg import data as D
from qgseg.errors import InputError


def _case(size: int = 48, seed: int = 0, h: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image (H, W, 3) with an ellipse and its {0, 255} mask."""
    rng = np.random.default_rng(seed)
    h = h or size
    img = np.full((h, size, 3), 200, np.uint8)
    img = (img + rng.integers(0, 20, img.shape)).astype(np.uint8)
    mask = np.zeros((h, size), np.uint8)
    c = (size // 2 + int(rng.integers(-4, 4)), h // 2 + int(rng.integers(-4, 4)))
    cv2.ellipse(mask, c, (size // 4, h // 5), float(rng.uniform(0, 180)), 0, 360, 255, -1)
    img[mask > 0] = (90, 50, 30)
    return img, mask


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = array[..., ::-1] if array.ndim == 3 else array
    assert cv2.imwrite(str(path), np.ascontiguousarray(arr)), path
    return path


def _generic(root: Path, n: int, size: int = 48, img_ext: str = ".png", mask_suffix: str = "",
             mask_ext: str = ".png") -> Path:
    for i in range(n):
        img, m = _case(size, i)
        _write(root / "images" / f"c{i:02d}{img_ext}", img)
        _write(root / "masks" / f"c{i:02d}{mask_suffix}{mask_ext}", m)
    return root


def _assert_valid(data: D.LabeledData, n: int, size: int) -> None:
    assert len(data) == n and len(data.stems) == n
    assert data.images.shape == (n, size, size, 3) and data.images.dtype == np.uint8
    assert data.masks.shape == (n, size, size) and data.masks.dtype == np.uint8
    assert set(np.unique(data.masks)) <= {0, 1}
    cov = data.masks.reshape(n, -1).mean(1)
    assert (cov > 0.03).all() and (cov < 0.6).all()  # the ellipse survived, not empty or full
    # lesion pixels are darker than the skin in every case (masks line up with images)
    grey = data.images.mean(-1)
    for i in range(n):
        assert grey[i][data.masks[i] == 1].mean() < grey[i][data.masks[i] == 0].mean() - 40


# ------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("suffix", ["", "_mask", "_segmentation", "_lesion"])
def test_generic_layout_with_mask_suffixes(tmp_path, suffix):
    root = _generic(tmp_path / "ds", 4, mask_suffix=suffix)
    layout, pairs, problems = D.discover_labeled(root)
    assert layout == "images/masks" and not problems
    assert [p.stem for p in pairs] == ["c00", "c01", "c02", "c03"]
    assert all(p.mask.name == f"{p.stem}{suffix}.png" for p in pairs)
    data = D.load_labeled(root, 32)
    _assert_valid(data, 4, 32)
    assert data.layout == "images/masks"
    assert data.orig_sizes.tolist() == [[48, 48]] * 4


def test_tiny_labeled_fixture_and_synth_data(tiny_labeled, synth_data):
    root = tiny_labeled(5, size=32, mask_suffix="_mask")
    _assert_valid(D.load_labeled(root, 32), 5, 32)
    lab = D.load_labeled(synth_data / "labeled", SYNTH_SIZE)
    assert len(lab) == SYNTH_LABELED and lab.layout == "images/masks"
    assert lab.stems[0] == "case_000" and set(np.unique(lab.masks)) == {0, 1}
    unl = D.load_unlabeled(synth_data / "unlabeled", 32)
    assert unl.images.shape == (SYNTH_UNLABELED, 32, 32, 3)


def test_ph2_original_layout(tmp_path):
    root = tmp_path / "PH2Dataset" / "PH2 Dataset images"
    for i in (1, 2, 3):
        case = f"IMD{i:03d}"
        img, m = _case(48, i, h=40)
        _write(root / case / f"{case}_Dermoscopic_Image" / f"{case}.bmp", img)
        _write(root / case / f"{case}_lesion" / f"{case}_lesion.bmp", m)
        _write(root / case / f"{case}_roi" / f"{case}_R1_Label4.bmp", m)  # ignored
    (tmp_path / "PH2Dataset" / "PH2_dataset.txt").write_text("clinical diagnosis\n")
    data = D.load_labeled(tmp_path / "PH2Dataset", 32)
    assert data.layout == "ph2" and data.stems == ["IMD001", "IMD002", "IMD003"]
    _assert_valid(data, 3, 32)
    assert data.orig_sizes.tolist() == [[40, 48]] * 3


def test_isic_layout(tmp_path):
    root = tmp_path / "isic2018"
    for i in range(3):
        img, m = _case(48, i)
        _write(root / "ISIC2018_Task1-2_Training_Input" / f"ISIC_{i:07d}.jpg", img)
        _write(root / "ISIC2018_Task1_Training_GroundTruth" / f"ISIC_{i:07d}_segmentation.png", m)
    (root / "ISIC2018_Task1-2_Training_Input" / "LICENSE.txt").write_text("CC\n")
    data = D.load_labeled(root, 32)
    assert data.layout == "isic" and data.stems == [f"ISIC_{i:07d}" for i in range(3)]
    _assert_valid(data, 3, 32)


def test_isic_layout_single_folder(tmp_path):
    for i in range(3):
        img, m = _case(48, i)
        _write(tmp_path / "isic" / f"ISIC_{i:07d}.jpg", img)
        _write(tmp_path / "isic" / f"ISIC_{i:07d}_segmentation.png", m)
    data = D.load_labeled(tmp_path / "isic", 32)
    assert data.layout == "isic" and len(data) == 3


def test_kvasir_layout_with_jpeg_masks(tmp_path):
    root = tmp_path / "Kvasir-SEG"
    _generic(root, 3, img_ext=".jpg", mask_ext=".jpg")
    data = D.load_labeled(root, 32)
    assert data.layout == "kvasir-seg"
    _assert_valid(data, 3, 32)


def test_cvc_clinicdb_layout_with_tif(tmp_path):
    root = tmp_path / "CVC-ClinicDB"
    for i in (1, 2, 3):
        img, m = _case(48, i)
        _write(root / "Original" / f"{i}.tif", img)
        _write(root / "Ground Truth" / f"{i}.tif", m)
    data = D.load_labeled(root, 32)
    assert data.layout == "cvc-clinicdb" and data.stems == ["1", "2", "3"]
    _assert_valid(data, 3, 32)


@needs_ph2
def test_shared_ph2_loads():
    layout, pairs, problems = D.discover_labeled(PH2)
    assert len(pairs) == 200 and not problems


# ---------------------------------------------------------------------------- unlabeled
def test_unlabeled_folder_and_images_subfolder(tmp_path):
    for i in range(5):
        _write(tmp_path / "flat" / f"u{i}.jpg", _case(40, i)[0])
        _write(tmp_path / "nested" / "images" / f"u{i}.png", _case(40, i)[0])
    (tmp_path / "flat" / "notes.txt").write_text("x")
    flat = D.load_unlabeled(tmp_path / "flat", 32)
    nested = D.load_unlabeled(tmp_path / "nested", 32)
    assert flat.stems == nested.stems == [f"u{i}" for i in range(5)]
    assert flat.images.shape == (5, 32, 32, 3) and flat.images.dtype == np.uint8
    sub = D.load_unlabeled(tmp_path / "nested", 32, limit=3, seed=1)
    assert len(sub) == 3 and set(sub.stems) <= set(nested.stems)
    assert D.load_unlabeled(tmp_path / "nested", 32, limit=3, seed=1).stems == sub.stems


# ------------------------------------------------------------------------------ splits
def test_splits_70_10_20_deterministic():
    stems = [f"s{i:03d}" for i in range(50)]
    a = D.make_splits(stems, seed=0)
    assert [len(a[k]) for k in ("train", "val", "test")] == [35, 5, 10]
    assert sorted(a["train"] + a["val"] + a["test"]) == stems
    assert D.make_splits(list(reversed(stems)), seed=0) == a  # order of the input does not matter
    b = D.make_splits(stems, seed=1)
    assert b != a and [len(b[k]) for k in ("train", "val", "test")] == [35, 5, 10]
    small = D.make_splits(["a", "b", "c"], seed=0)
    assert all(len(v) == 1 for v in small.values())
    with pytest.raises(InputError, match="at least 3"):
        D.make_splits(["a", "b"], seed=0)


def test_splits_csv_overrides(tmp_path):
    stems = ["a", "b", "c", "d", "e"]
    (tmp_path / "splits.csv").write_text("stem,split\na,train\nb,train\nc,val\nd,test\ne,TEST\n")
    s = D.make_splits(stems, seed=0, root=tmp_path)
    assert s == {"train": ["a", "b"], "val": ["c"], "test": ["d", "e"]}
    assert D.make_splits(stems, seed=5, root=tmp_path) == s  # the seed does not matter then
    # a spreadsheet's UTF-8 BOM and comment lines are fine
    (tmp_path / "splits.csv").write_bytes("\ufeffstem,split\n# note\na,train\nc,val\nd,test\n".encode("utf-8"))
    assert D.make_splits(stems, seed=0, root=tmp_path) == {"train": ["a"], "val": ["c"], "test": ["d"]}
    # a comment before the header (as in ../shared/data/cvc-clinicdb/splits.csv)
    (tmp_path / "splits.csv").write_text("# split by video\nstem,split\na,train\nc,val\nd,test\n")
    assert D.make_splits(stems, seed=0, root=tmp_path) == {"train": ["a"], "val": ["c"], "test": ["d"]}


@pytest.mark.parametrize("text, match", [
    ("a,train\nb,validation\nc,test\n", r"split 'validation'"),
    ("a,train\nzz,val\nc,test\n", r"stem 'zz'"),
    ("a,train\nb,train\nc,train\n", r"val split is empty"),
    ("a,train\nb\nc,test\n", r"expected 'stem,split'"),
    ("a,train\nb,val\nc,test\na,test\n", r"'a'.*more than once"),
])
def test_splits_csv_errors(tmp_path, text, match):
    (tmp_path / "splits.csv").write_text(text)
    with pytest.raises(InputError, match=match) as e:
        D.make_splits(["a", "b", "c"], seed=0, root=tmp_path)
    assert "splits.csv" in str(e.value)


def test_splits_csv_not_utf8(tmp_path):
    (tmp_path / "splits.csv").write_bytes(b"\xff\xfea\x00,train\n")
    with pytest.raises(InputError, match="splits.csv"):
        D.make_splits(["a", "b", "c"], seed=0, root=tmp_path)


# ------------------------------------------------------------------------------- cache
def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch, _isolated_cache):
    root = _generic(tmp_path / "ds", 4)
    first = D.load_labeled(root, 32)
    assert list(_isolated_cache.glob("labeled-*.npz"))  # written to $QGSEG_CACHE

    def boom(path):
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(D, "read_image", boom)
    monkeypatch.setattr(D, "read_mask", boom)
    again = D.load_labeled(root, 32)
    assert np.array_equal(again.images, first.images) and np.array_equal(again.masks, first.masks)
    assert again.stems == first.stems and again.layout == first.layout
    # another image size is another cache entry
    with pytest.raises(AssertionError, match="decoded"):
        D.load_labeled(root, 64)
    # touching a file (new mtime) invalidates
    f = root / "images" / "c01.png"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    with pytest.raises(AssertionError, match="decoded"):
        D.load_labeled(root, 32)
    monkeypatch.undo()
    monkeypatch.setenv("QGSEG_CACHE", str(_isolated_cache))
    # rewriting a mask changes the cached content
    _write(root / "masks" / "c02.png", np.zeros((48, 48), np.uint8))
    third = D.load_labeled(root, 32)
    assert third.masks[2].sum() == 0 and third.masks[1].sum() > 0


def test_unlabeled_cache_is_reused(tmp_path, monkeypatch):
    for i in range(3):
        _write(tmp_path / "u" / f"u{i}.png", _case(40, i)[0])
    first = D.load_unlabeled(tmp_path / "u", 32)
    monkeypatch.setattr(D, "read_image", lambda p: (_ for _ in ()).throw(AssertionError("decoded")))
    assert np.array_equal(D.load_unlabeled(tmp_path / "u", 32).images, first.images)


def test_damaged_cache_is_rebuilt(tmp_path, _isolated_cache):
    root = _generic(tmp_path / "ds", 3)
    first = D.load_labeled(root, 32)
    for f in _isolated_cache.glob("labeled-*.npz"):
        f.write_bytes(b"not a zip")
    assert np.array_equal(D.load_labeled(root, 32).images, first.images)


def test_cache_dir_argument_wins(tmp_path, _isolated_cache):
    root = _generic(tmp_path / "ds", 3)
    D.load_labeled(root, 32, cache_dir=str(tmp_path / "mycache"))
    assert list((tmp_path / "mycache").glob("labeled-*.npz"))
    assert not list(_isolated_cache.glob("*.npz"))


# ------------------------------------------------------------------------ binarisation
def test_grey_masks_are_binarised_with_a_warning(tmp_path, caplog):
    root = _generic(tmp_path / "ds", 4)
    m = cv2.imread(str(root / "masks" / "c01.png"), cv2.IMREAD_GRAYSCALE)
    soft = cv2.GaussianBlur(m, (7, 7), 2)  # a soft edge: grey levels
    assert len(np.unique(soft)) > 2
    _write(root / "masks" / "c01.png", soft)
    with caplog.at_level(logging.WARNING, logger="qgseg"):
        data = D.load_labeled(root, 48)
    assert data.grey_masks == 1
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "1 of 4" in warn[0] and "binarised" in warn[0]
    assert np.array_equal(data.masks[1], (soft > 127).astype(np.uint8))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qgseg"):
        assert D.load_labeled(root, 48).grey_masks == 1  # from the cache: still says so
    assert ["1 of 4" in r.getMessage() for r in caplog.records] == [True]


def test_binary_masks_give_no_warning_and_any_two_level_mask_works(tmp_path, caplog):
    root = _generic(tmp_path / "ds", 3)
    m = cv2.imread(str(root / "masks" / "c00.png"), cv2.IMREAD_GRAYSCALE)
    _write(root / "masks" / "c00.png", (m > 0).astype(np.uint8))  # {0, 1}
    _write(root / "masks" / "c01.png", (m > 0).astype(np.uint8) * 100)  # {0, 100}
    with caplog.at_level(logging.WARNING, logger="qgseg"):
        data = D.load_labeled(root, 48)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert data.grey_masks == 0
    assert np.array_equal(data.masks[0], (m > 0).astype(np.uint8))
    assert np.array_equal(data.masks[1], (m > 0).astype(np.uint8))


def test_read_mask_binarisation_rules(tmp_path):
    cases = {
        "zero_one": (np.array([[0, 1], [1, 0]], np.uint8), [[0, 1], [1, 0]], False),
        "full255": (np.array([[0, 255], [255, 0]], np.uint8), [[0, 1], [1, 0]], False),
        "grey": (np.array([[0, 100], [200, 255]], np.uint8), [[0, 0], [1, 1]], True),
        "empty": (np.zeros((2, 2), np.uint8), [[0, 0], [0, 0]], False),
    }
    for name, (arr, want, grey) in cases.items():
        p = _write(tmp_path / f"{name}.png", arr)
        got, g = D.read_mask(p)
        assert got.tolist() == want and g is grey, name


# ----------------------------------------------------------------------- augmentation
def test_random_flip_rot_same_transform_for_image_and_mask():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 16, 16)
    m = (x[:, :1] > 0.5).float()
    aux = x[:, 1:2] * 2
    xt, mt, at = D.random_flip_rot(x, m, aux, generator=g)
    assert xt.shape == x.shape and mt.shape == m.shape
    assert torch.equal(mt, (xt[:, :1] > 0.5).float())
    assert torch.equal(at, xt[:, 1:2] * 2)
    # each output is one of the 8 dihedral versions of its input, and several versions occur
    used = set()
    for i in range(32):
        versions = [torch.rot90(x[i].flip(-1) if f else x[i], k, dims=(-2, -1)) for f in (0, 1) for k in range(4)]
        hits = [j for j, v in enumerate(versions) if torch.equal(v, xt[i])]
        assert hits, i
        used.add(hits[0])
    assert len(used) >= 5
    assert torch.equal(x[:, :1] > 0.5, m.bool())  # inputs are not modified
    # seeded: the same generator seed gives the same result
    xt2 = D.random_flip_rot(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(xt2, xt)


def test_index_batches():
    g = torch.Generator().manual_seed(0)
    b = D.index_batches(10, 4, g)
    assert [len(t) for t in b] == [4, 4]
    assert len(set(torch.cat(b).tolist())) == 8
    b = D.index_batches(10, 4, g, drop_last=False)
    assert [len(t) for t in b] == [4, 4, 2] and sorted(torch.cat(b).tolist()) == list(range(10))
    assert [t.tolist() for t in D.index_batches(5, 2, g, shuffle=False, drop_last=False)] == [[0, 1], [2, 3], [4]]
    assert [len(t) for t in D.index_batches(3, 8, g)] == [3]  # fewer samples than a batch: one batch
    assert D.index_batches(0, 4, g) == []
    same = [t.tolist() for t in D.index_batches(9, 3, torch.Generator().manual_seed(7))]
    assert same == [t.tolist() for t in D.index_batches(9, 3, torch.Generator().manual_seed(7))]
    assert same != [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # shuffled


def test_to_float_tensors():
    x = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    f = D.to_float_images(x)
    assert f.shape == (2, 3, 4, 4) and f.dtype == torch.float32
    assert torch.allclose(f[0, :, 0, 0], (1 - torch.tensor(D.IMAGENET_MEAN)) / torch.tensor(D.IMAGENET_STD))
    m = D.to_float_masks(torch.ones(2, 4, 4, dtype=torch.uint8))
    assert m.shape == (2, 1, 4, 4) and m.dtype == torch.float32


# -------------------------------------------------------------------- bad input matrix
def _raises_naming(path: Path, fn, *args, **kw) -> str:
    with pytest.raises(InputError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert str(path) in msg, msg
    assert "\n" not in msg
    return msg


def test_bad_missing_folder(tmp_path):
    _raises_naming(tmp_path / "nope", D.load_labeled, tmp_path / "nope", 32)
    _raises_naming(tmp_path / "nope", D.load_unlabeled, tmp_path / "nope", 32)


def test_bad_not_a_folder(tmp_path):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    _raises_naming(f, D.load_labeled, f, 32)
    _raises_naming(f, D.load_unlabeled, f, 32)


def test_bad_empty_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    _raises_naming(tmp_path / "empty", D.load_labeled, tmp_path / "empty", 32)
    _raises_naming(tmp_path / "empty", D.load_unlabeled, tmp_path / "empty", 32)
    (tmp_path / "e2" / "images").mkdir(parents=True)
    (tmp_path / "e2" / "masks").mkdir()
    _raises_naming(tmp_path / "e2", D.load_labeled, tmp_path / "e2", 32)
    _raises_naming(tmp_path / "e2" / "images", D.load_unlabeled, tmp_path / "e2", 32)


def test_bad_no_folder_given():
    with pytest.raises(InputError, match="--labeled"):
        D.load_labeled("", 32)
    with pytest.raises(InputError, match="--unlabeled"):
        D.load_unlabeled("", 32)


def test_bad_images_without_masks_folder(tmp_path):
    for i in range(2):
        _write(tmp_path / "ds" / "images" / f"c{i}.png", _case(32, i)[0])
    msg = _raises_naming(tmp_path / "ds", D.load_labeled, tmp_path / "ds", 32)
    assert "mask" in msg


def test_bad_image_without_mask(tmp_path):
    root = _generic(tmp_path / "ds", 4)
    (root / "masks" / "c02.png").unlink()
    msg = _raises_naming(root / "images" / "c02.png", D.load_labeled, root, 32)
    assert "without a mask" in msg
    data, problems = D.scan_labeled(root, 32)
    assert data is None and len(problems) == 1


def test_bad_mask_without_image(tmp_path):
    root = _generic(tmp_path / "ds", 4)
    (root / "images" / "c03.png").unlink()
    msg = _raises_naming(root / "masks" / "c03.png", D.load_labeled, root, 32)
    assert "without an image" in msg


def test_bad_size_mismatch(tmp_path):
    root = _generic(tmp_path / "ds", 3)
    m = cv2.imread(str(root / "masks" / "c01.png"), cv2.IMREAD_GRAYSCALE)
    _write(root / "masks" / "c01.png", cv2.resize(m, (40, 44), interpolation=cv2.INTER_NEAREST))
    msg = _raises_naming(root / "masks" / "c01.png", D.load_labeled, root, 32)
    assert "40x44" in msg and "48x48" in msg


@pytest.mark.parametrize("which", ["images", "masks"])
def test_bad_corrupt_file(tmp_path, which):
    root = _generic(tmp_path / "ds", 3)
    bad = root / which / "c01.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    msg = _raises_naming(bad, D.load_labeled, root, 32)
    assert "corrupt" in msg


def test_bad_empty_file(tmp_path):
    root = _generic(tmp_path / "ds", 3)
    bad = root / "images" / "c00.png"
    bad.write_bytes(b"")
    _raises_naming(bad, D.load_labeled, root, 32)


def test_bad_truncated_jpeg(tmp_path):
    root = _generic(tmp_path / "ds", 3, img_ext=".jpg")
    bad = root / "images" / "c02.jpg"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    _raises_naming(bad, D.load_labeled, root, 32)
    # unlabeled too
    (tmp_path / "unl").mkdir()
    shutil.copy(bad, tmp_path / "unl" / "u.jpg")
    _raises_naming(tmp_path / "unl" / "u.jpg", D.load_unlabeled, tmp_path / "unl", 32)


def test_bad_problem_in_cached_set_is_found_after_change(tmp_path):
    root = _generic(tmp_path / "ds", 3)
    D.load_labeled(root, 32)  # cached
    (root / "images" / "c00.png").write_bytes(b"garbage")
    _raises_naming(root / "images" / "c00.png", D.load_labeled, root, 32)


def test_all_problems_are_listed(tmp_path):
    root = _generic(tmp_path / "ds", 5)
    (root / "masks" / "c00.png").unlink()
    (root / "images" / "c04.png").write_bytes(b"junk")
    data, problems = D.scan_labeled(root, 32)
    assert data is None and len(problems) == 2
    with pytest.raises(InputError, match=r"1 more problem"):
        D.load_labeled(root, 32)


def test_grayscale_and_rgba_images_load_as_rgb(tmp_path):
    root = _generic(tmp_path / "ds", 3)
    img = cv2.imread(str(root / "images" / "c00.png"))[..., ::-1]
    Image.fromarray(img).convert("L").save(root / "images" / "c00.png")
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "images" / "c01.png")
    Image.fromarray(img).convert("P").save(root / "images" / "c02.png")
    data = D.load_labeled(root, 48)
    assert data.images.shape == (3, 48, 48, 3)
    g = data.images[0]
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])
    assert np.array_equal(data.images[1], img)
    assert np.abs(data.images[2].astype(int) - img).mean() < 20
    assert D.read_image(root / "images" / "c01.png").shape == (48, 48, 3)


def test_random_color_jitters_each_sample_and_keeps_flat_images_flat():
    from qgseg.data import random_color, to_float_images

    u = torch.randint(0, 256, (1, 16, 16, 3), dtype=torch.uint8).repeat(6, 1, 1, 1)
    x = to_float_images(u)
    assert torch.allclose(random_color(x, 0.0), x, atol=1e-5)  # strength 0: unchanged
    y = random_color(x, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(y, random_color(x, 0.3, torch.Generator().manual_seed(0)))  # seeded
    assert len({round(float(v), 4) for v in (y - x).abs().mean((1, 2, 3))}) == 6  # own factors per sample
    rgb = y * torch.tensor(D.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(D.IMAGENET_MEAN).view(1, 3, 1, 1)
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5  # valid pixel values
    flat = to_float_images(torch.full((4, 8, 8, 3), 150, dtype=torch.uint8))
    out = random_color(flat, 0.5, torch.Generator().manual_seed(1))
    assert torch.allclose(out, out[:, :, :1, :1].expand_as(out), atol=1e-5)  # no structure is created
