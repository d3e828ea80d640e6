"""Tests for the synthetic dermoscopy-like data set."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from qgseg import synth
from qgseg.errors import InputError


def _cases(domain: str, n: int, size: int = 48, seed: int = 0):
    return [synth.make_case(np.random.default_rng([seed, i]), size, domain) for i in range(n)]


@pytest.mark.parametrize("domain", ["labeled", "unlabeled"])
@pytest.mark.parametrize("size", [32, 64])
def test_make_case_shapes_and_binary_masks(domain: str, size: int) -> None:
    for image, mask in _cases(domain, 5, size):
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert mask.shape == (size, size) and mask.dtype == np.uint8
        assert set(np.unique(mask)) == {0, 255}


def test_lesion_area_fraction_in_range() -> None:
    fractions = np.array([(m > 0).mean() for _, m in _cases("labeled", 30, 64)])
    lo, hi = synth.AREA_RANGE
    assert fractions.min() >= lo and fractions.max() <= hi
    assert fractions.max() - fractions.min() > 0.1  # sizes actually vary


def test_lesion_is_darker_than_skin_but_not_a_constant_colour() -> None:
    for image, mask in _cases("labeled", 10, 64):
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(float)
        # Compare with the skin right around the lesion: vignetting darkens the corners.
        ring = (cv2.dilate(mask, np.ones((9, 9), np.uint8)) > 0) & (mask == 0)
        inside, around = grey[mask > 0], grey[ring]
        assert inside.mean() < around.mean()
        assert inside.std() > 2.0 and grey[mask == 0].std() > 2.0  # textured, not flat fills


def test_masks_have_no_speckle_islands() -> None:
    for _, mask in _cases("labeled", 20, 64):
        n, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8))
        assert 2 <= n <= 4  # background + one or a few parts
        assert stats[1:, cv2.CC_STAT_AREA].min() >= 0.1 * stats[1:, cv2.CC_STAT_AREA].max()


def test_same_rng_same_case_and_different_seed_differs() -> None:
    a = synth.make_case(np.random.default_rng(7), 32)
    b = synth.make_case(np.random.default_rng(7), 32)
    c = synth.make_case(np.random.default_rng(8), 32)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[1], c[1])


def test_unlabeled_domain_has_shifted_colour_statistics() -> None:
    lab = np.stack([im for im, _ in _cases("labeled", 20, 32)]).reshape(-1, 3).astype(float)
    unl = np.stack([im for im, _ in _cases("unlabeled", 20, 32)]).reshape(-1, 3).astype(float)
    lab_mean, unl_mean = lab.mean(0), unl.mean(0)
    assert np.abs(lab_mean - unl_mean).max() > 15  # RGB levels
    # Cooler white balance: blue relative to red is clearly higher in the unlabeled domain.
    assert unl_mean[2] / unl_mean[0] > lab_mean[2] / lab_mean[0] + 0.1


def test_unknown_domain_and_tiny_size_are_input_errors() -> None:
    with pytest.raises(InputError, match="domain"):
        synth.make_case(np.random.default_rng(0), 32, "validation")
    with pytest.raises(InputError, match="size"):
        synth.make_case(np.random.default_rng(0), 8)


def _files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_generate_layout_counts_and_determinism(tmp_path: Path) -> None:
    out = tmp_path / "a"
    result = synth.generate(out, n_labeled=4, n_unlabeled=3, size=32, seed=1)
    assert result == {"labeled": 4, "unlabeled": 3, "size": 32, "out": str(out)}
    a = _files(tmp_path / "a")
    assert sorted(a) == sorted(
        [f"labeled/images/case_{i:03d}.png" for i in range(4)]
        + [f"labeled/masks/case_{i:03d}.png" for i in range(4)]
        + [f"unlabeled/images/u_{i:04d}.png" for i in range(3)]
    )
    image = cv2.imread(str(tmp_path / "a/labeled/images/case_000.png"), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(tmp_path / "a/labeled/masks/case_000.png"), cv2.IMREAD_UNCHANGED)
    assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
    assert set(np.unique(mask)) <= {0, 255}
    # Written as RGB: the file (BGR on disk) matches make_case with the per-case rng.
    expected, _ = synth.make_case(synth._case_rng(1, "labeled", 0), 32, "labeled")
    assert np.array_equal(image[..., ::-1], expected)

    synth.generate(tmp_path / "b", n_labeled=4, n_unlabeled=3, size=32, seed=1)
    assert _files(tmp_path / "b") == a  # byte-identical
    synth.generate(tmp_path / "c", n_labeled=4, n_unlabeled=3, size=32, seed=2)
    c = _files(tmp_path / "c")
    assert all(c[k] != a[k] for k in a if "images" in k)


def test_generate_cases_do_not_depend_on_counts(tmp_path: Path) -> None:
    synth.generate(tmp_path / "small", n_labeled=2, n_unlabeled=1, size=32)
    synth.generate(tmp_path / "big", n_labeled=3, n_unlabeled=2, size=32)
    for rel in ["labeled/images/case_001.png", "labeled/masks/case_001.png",
                "unlabeled/images/u_0000.png"]:
        assert (tmp_path / "small" / rel).read_bytes() == (tmp_path / "big" / rel).read_bytes()


def test_generate_again_with_fewer_cases_removes_stale_files(tmp_path: Path) -> None:
    synth.generate(tmp_path, n_labeled=3, n_unlabeled=2, size=32)
    (tmp_path / "labeled/images/notes.txt").write_text("keep me")
    synth.generate(tmp_path, n_labeled=2, n_unlabeled=1, size=32)
    assert len(list((tmp_path / "labeled/images").glob("*.png"))) == 2
    assert len(list((tmp_path / "labeled/masks").glob("*.png"))) == 2
    assert len(list((tmp_path / "unlabeled/images").glob("*.png"))) == 1
    assert (tmp_path / "labeled/images/notes.txt").exists()


def test_generate_rejects_bad_counts(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="n_labeled"):
        synth.generate(tmp_path, n_labeled=0)
    with pytest.raises(InputError, match="seed"):
        synth.generate(tmp_path, n_labeled=1, seed=-1)


def test_contact_sheet_grid_and_green_contours(tmp_path: Path) -> None:
    cases = _cases("labeled", 5, 32)
    images = [im for im, _ in cases]
    masks: list = [m for _, m in cases]
    masks[4] = None  # an image without a mask
    before = [im.copy() for im in images]
    path = tmp_path / "sheet" / "s.png"
    synth.contact_sheet(images, masks, path, cols=3)
    sheet = cv2.imread(str(path))[..., ::-1]
    pad = 2
    assert sheet.shape == (2 * (32 + pad) + pad, 3 * (32 + pad) + pad, 3)
    green = (sheet[..., 1] == 255) & (sheet[..., 0] == 0) & (sheet[..., 2] == 0)
    assert green.sum() > 20
    last = sheet[pad + 34:pad + 34 + 32, pad + 34:pad + 34 + 32]  # row 1, col 1: no mask
    assert np.array_equal(last, images[4])
    assert all(np.array_equal(a, b) for a, b in zip(images, before))  # inputs untouched

    small = tmp_path / "pal.png"
    synth.contact_sheet(images, None, small, palette=64)
    assert small.stat().st_size < path.stat().st_size
    with pytest.raises(InputError, match="masks"):
        synth.contact_sheet(images, masks[:2], path)
