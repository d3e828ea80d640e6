"""Tests for qgseg.corrupt (Type 1 corruptions, Dice targets, corrupted-set storage)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from qgseg.corrupt import (
    CATEGORIES,
    OPS,
    WEIGHTS,
    CorruptedSet,
    Corruptor,
    corrupt_dataset,
    dice,
    dice_batch,
    load_set,
    save_set,
)
from qgseg.errors import InputError

PH2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ph2" / "masks"


def ellipse_mask(h: int = 48, w: int = 48, centre=(24, 24), axes=(12, 8), angle: float = 20.0) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(m, centre, axes, angle, 0, 360, 1, thickness=-1)
    return m


def two_blobs(h: int = 48, w: int = 48) -> np.ndarray:
    m = ellipse_mask(h, w, (18, 20), (10, 7), 0)
    cv2.circle(m, (38, 38), 4, 1, thickness=-1)
    return m


def lesion_set(n: int = 10, size: int = 48, seed: int = 0) -> np.ndarray:
    """Irregular lesion-like masks of varied size and position."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        c = (int(size / 2 + rng.integers(-size // 8, size // 8 + 1)), int(size / 2 + rng.integers(-size // 8, size // 8 + 1)))
        ax = (int(rng.integers(size // 8, size // 3)), int(rng.integers(size // 8, size // 3)))
        cv2.ellipse(out[i], c, ax, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
        bump = (c[0] + ax[0] // 2, c[1] + ax[1] // 2)
        cv2.circle(out[i], bump, max(2, min(ax) // 2), 1, thickness=-1)
    return out


MASKS = {
    "normal": ellipse_mask(),
    "non_square": ellipse_mask(40, 64, (30, 20), (14, 9), 30),
    "two_components": two_blobs(),
    "empty": np.zeros((48, 48), np.uint8),
    "full": np.ones((48, 48), np.uint8),
}


# ---------------------------------------------------------------------------------------------- ops


def test_registry_names_and_weights():
    for name in ["erode_k5", "dilate_k9", "opening_k5", "ellipse", "convex_hull", "bbox", "polygon_5",
                 "jagged_k3", "smooth_g11", "elastic_light", "grid_heavy", "holes_small", "islands",
                 "holes_islands", "keep_largest", "drop_component", "rect_dropout", "shift_0.2",
                 "scale_down", "rotate_30", "affine", "gauss_blob_1.0", "circle_blob", "heavy_erode",
                 "heavy_shift", "invert", "empty", "full", "random_density"]:
        assert name in OPS
    assert sum(CATEGORIES.values()) == pytest.approx(1.0)
    assert CATEGORIES["identity"] == 0.20 and CATEGORIES["blob"] == 0.07
    assert WEIGHTS["catastrophic"] == {"invert": 1.0, "empty": 0.5, "full": 0.5, "random_density": 0.3}
    assert not any("blob" in n for n in WEIGHTS["chained"])
    assert set(WEIGHTS["blob"]) == {"gauss_blob_1.0", "gauss_blob_1.2", "circle_blob"}
    for table in WEIGHTS.values():
        assert set(table) <= set(OPS)


@pytest.mark.parametrize("kind", list(MASKS))
@pytest.mark.parametrize("name", list(OPS))
def test_op_binary_same_shape(name: str, kind: str):
    m = MASKS[kind]
    before = m.copy()
    out = OPS[name](m, np.random.default_rng(0))
    assert out.dtype == np.uint8
    assert out.shape == m.shape
    assert set(np.unique(out)) <= {0, 1}
    np.testing.assert_array_equal(m, before)  # input untouched


@pytest.mark.parametrize("name", list(OPS))
def test_op_seeded_determinism(name: str):
    m = two_blobs()
    a = OPS[name](m, np.random.default_rng(123))
    b = OPS[name](m, np.random.default_rng(123))
    np.testing.assert_array_equal(a, b)


def test_op_semantics():
    m = ellipse_mask()
    rng = np.random.default_rng(0)
    area = int(m.sum())
    assert OPS["erode_k5"](m, rng).sum() < area
    assert OPS["dilate_k5"](m, rng).sum() > area
    assert not np.any(OPS["erode_k7"](m, rng) & (1 - m))  # erosion stays inside
    assert np.all(OPS["dilate_k7"](m, rng) >= m)
    np.testing.assert_array_equal(OPS["invert"](m, rng), 1 - m)
    assert OPS["empty"](m, rng).sum() == 0 and OPS["full"](m, rng).all()
    assert 0.4 < OPS["random_density"](np.zeros((64, 64), np.uint8), rng).mean() < 0.6
    assert np.all(OPS["bbox"](m, rng) >= m)
    assert np.all(OPS["convex_hull"](m, rng) >= m)
    assert dice(OPS["ellipse"](m, rng), m) > 0.9
    assert OPS["holes_large"](m, rng).sum() < area
    assert OPS["islands"](m, rng).sum() > area
    assert OPS["polygon_3"](m, rng).sum() < area
    # shift moves the lesion by 0.3 of the image without changing its size (here it stays inside)
    small = ellipse_mask(64, 64, (32, 32), (5, 4), 0)
    shifted = OPS["shift_0.3"](small, rng)
    assert shifted.sum() == small.sum()
    ys0, xs0 = np.nonzero(small)
    ys1, xs1 = np.nonzero(shifted)
    assert np.hypot(xs1.mean() - xs0.mean(), ys1.mean() - ys0.mean()) == pytest.approx(0.3 * 64, abs=1.0)
    assert dice(shifted, small) == 0.0
    # scaling about the centroid: area ratio ~ s**2
    big = OPS["heavy_scale_up"](small, rng)
    assert 1.4**2 * 0.8 < big.sum() / small.sum() < 1.6**2 * 1.2


def test_components():
    m = two_blobs()
    rng = np.random.default_rng(0)
    n_before = cv2.connectedComponents(m)[0] - 1
    assert n_before == 2
    largest = OPS["keep_largest"](m, rng)
    assert cv2.connectedComponents(largest)[0] - 1 == 1
    np.testing.assert_array_equal(largest, ellipse_mask(48, 48, (18, 20), (10, 7), 0))
    dropped = OPS["drop_component"](m, rng)
    assert cv2.connectedComponents(dropped)[0] - 1 == 1
    assert np.all(dropped <= m)
    single = ellipse_mask()
    np.testing.assert_array_equal(OPS["drop_component"](single, rng), single)


def test_sizes_scale_with_image():
    # erosion k9: 4 px per side at 224 px, round(9 * 0.5) | 1 = 5 -> 2 px per side at 112 px
    for size, side, expect in [(224, 100, 92), (112, 50, 46)]:
        m = np.zeros((size, size), np.uint8)
        m[10:10 + side, 10:10 + side] = 1
        out = OPS["erode_k9"](m, np.random.default_rng(0))
        assert out.sum() == expect * expect
    # kernels never fall below 3
    m = np.zeros((32, 32), np.uint8)
    m[8:20, 8:20] = 1
    assert OPS["erode_k5"](m, np.random.default_rng(0)).sum() == 10 * 10


# --------------------------------------------------------------------------------------------- dice


def test_dice_golden():
    a = np.zeros((8, 8), np.uint8)
    b = np.zeros((8, 8), np.uint8)
    assert dice(a, b) == 1.0  # both empty
    a[0:4, 0:4] = 1
    assert dice(a, a) == 1.0
    assert dice(a, b) == 0.0  # one empty
    b[4:8, 4:8] = 1
    assert dice(a, b) == 0.0  # disjoint
    c = np.zeros((8, 8), np.uint8)
    c[2:4, 0:4] = 1  # 8 pixels, all inside a (16 pixels): 2*8 / (16+8)
    assert dice(a, c) == pytest.approx(2 * 8 / 24)
    d = np.zeros((8, 8), np.uint8)
    d[0:4, 2:6] = 1  # overlap 8 of 16 and 16: 2*8/32
    assert dice(a, d) == pytest.approx(0.5)


def test_dice_batch_matches_dice():
    rng = np.random.default_rng(0)
    a = (rng.random((6, 16, 16)) < 0.3).astype(np.uint8)
    b = (rng.random((6, 16, 16)) < 0.3).astype(np.uint8)
    a[0] = 0
    b[0] = 0  # both empty -> 1
    b[1] = 0  # one empty -> 0
    b[2] = a[2]
    got = dice_batch(a, b)
    assert got.dtype == np.float32 and got.shape == (6,)
    np.testing.assert_allclose(got, [dice(x, y) for x, y in zip(a, b)], rtol=1e-6)
    assert got[0] == 1.0 and got[1] == 0.0 and got[2] == 1.0
    assert dice_batch(np.zeros((0, 4, 4), np.uint8), np.zeros((0, 4, 4), np.uint8)).shape == (0,)


# ---------------------------------------------------------------------------------------- sampling


def test_category_frequencies():
    cor = Corruptor(lesion_set(10, 32))
    n = 2500
    counts = dict.fromkeys(CATEGORIES, 0)
    for s in range(n):
        _, cat, _ = cor.sample(s % 10, np.random.default_rng([7, s]))
        counts[cat] += 1
    chi2 = sum((counts[c] - n * p) ** 2 / (n * p) for c, p in CATEGORIES.items())
    assert chi2 < 30, counts  # 6 degrees of freedom: p(chi2 > 30) ~ 4e-5


def test_sample_structure():
    masks = lesion_set(20, 32)
    cor = Corruptor(masks)
    areas = masks.reshape(20, -1).sum(1).astype(np.int64)
    seen = set()
    for s in range(600):
        i = s % 20
        m, cat, ops = cor.sample(i, np.random.default_rng([3, s]))
        seen.add(cat)
        assert m.shape == masks[i].shape and m.dtype == np.uint8
        if cat == "identity":
            assert ops == [] and np.array_equal(m, masks[i])
        elif cat == "chained":
            assert 2 <= len(ops) <= 3 and len(set(ops)) == len(ops)
            assert all(o in WEIGHTS["chained"] for o in ops)
        elif cat == "cross_image":
            j = int(ops[0].split("_")[1])
            assert j != i and np.array_equal(m, masks[j])
            # among the 20% (here 4 of 19) other cases closest in area
            d = np.abs(areas - areas[i])
            assert (d[np.arange(20) != i] < d[j]).sum() < 4
        else:
            assert len(ops) == 1 and ops[0] in WEIGHTS[cat]
    assert seen == set(CATEGORIES)


def test_single_case_has_no_cross_image():
    cor = Corruptor(lesion_set(1, 32))
    cats = {cor.sample(0, np.random.default_rng(s))[1] for s in range(200)}
    assert "cross_image" not in cats


def test_dice_distribution_covers_range():
    cs = corrupt_dataset(lesion_set(12, 64), k=40, seed=0)
    assert (cs.dice < 0.5).mean() > 0.07
    assert (cs.dice > 0.9).mean() > 0.3
    assert 0.1 < ((cs.dice >= 0.5) & (cs.dice <= 0.9)).mean()


@pytest.mark.skipif(not PH2.is_dir(), reason="PH2 masks not available")
def test_dice_distribution_ph2():
    files = sorted(PH2.glob("*.png"))[:60]
    masks = np.stack([(cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (96, 96),
                                  interpolation=cv2.INTER_NEAREST) > 127).astype(np.uint8) for f in files])
    cs = corrupt_dataset(masks, k=10, seed=1)
    assert (cs.dice < 0.5).mean() > 0.07
    assert (cs.dice > 0.9).mean() > 0.3


# ------------------------------------------------------------------------------------ dataset level


def test_corrupt_dataset_deterministic_and_per_sample_rng():
    masks = lesion_set(5, 32)
    a = corrupt_dataset(masks, k=6, seed=11)
    b = corrupt_dataset(masks, k=6, seed=11)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.ops == b.ops and a.category == b.category
    c = corrupt_dataset(masks, k=6, seed=12)
    assert not np.array_equal(a.masks, c.masks)
    # sample j of case i depends only on (seed, i, j)
    cor = Corruptor(masks)
    for row in [0, 7, 29]:
        i, j = divmod(row, 6)
        m, cat, ops = cor.sample(i, np.random.default_rng([11, i, j]))
        np.testing.assert_array_equal(a.masks[row], m)
        assert a.category[row] == cat and a.ops[row] == "+".join(ops)
    np.testing.assert_array_equal(a.case, np.repeat(np.arange(5), 6))
    assert a.case.dtype == np.int32 and a.dice.dtype == np.float32 and a.masks.dtype == np.uint8


def test_stored_dice_matches_recomputed():
    masks = lesion_set(6, 32)
    cs = corrupt_dataset(masks, k=8, seed=2)
    for row in range(len(cs)):
        assert cs.dice[row] == pytest.approx(dice(cs.masks[row], masks[cs.case[row]]), abs=1e-6)
    ident = [r for r, c in enumerate(cs.category) if c == "identity"]
    assert ident and all(cs.dice[r] == 1.0 and cs.ops[r] == "" for r in ident)


def test_weak_predictions():
    masks = lesion_set(4, 32)
    weak = np.stack([np.roll(masks, 3 * (c + 1), axis=2) for c in range(3)])  # (C,N,H,W)
    cs = corrupt_dataset(masks, k=5, seed=0, weak=weak, p_weak=1.0)
    assert set(cs.category) == {"weak"}
    used = set()
    for row in range(len(cs)):
        c = int(cs.ops[row].removeprefix("weak_ckpt"))
        used.add(c)
        np.testing.assert_array_equal(cs.masks[row], weak[c, cs.case[row]])
        assert cs.dice[row] == pytest.approx(dice(weak[c, cs.case[row]], masks[cs.case[row]]), abs=1e-6)
    assert used == {0, 1, 2}
    mixed = corrupt_dataset(masks, k=50, seed=0, weak=weak, p_weak=0.2)
    share = mixed.category.count("weak") / len(mixed)
    assert 0.12 < share < 0.28
    with pytest.raises(InputError):
        corrupt_dataset(masks, k=2, seed=0, weak=weak[:, :2])


def test_bad_arguments():
    with pytest.raises(InputError):
        corrupt_dataset(np.zeros((2, 8, 8), np.uint8), k=0, seed=0)
    with pytest.raises(InputError):
        corrupt_dataset(np.zeros((8, 8), np.uint8), k=1, seed=0)
    with pytest.raises(InputError):
        corrupt_dataset(np.zeros((2, 8, 8), np.uint8), k=1, seed=0, p_weak=1.5)


def test_save_load_round_trip(tmp_path: Path):
    masks = lesion_set(3, 64)
    cs = corrupt_dataset(masks, k=20, seed=5)
    path = tmp_path / "sub" / "corrupted.npz"
    save_set(cs, path)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["corrupted.npz"]
    back = load_set(path)
    assert isinstance(back, CorruptedSet)
    np.testing.assert_array_equal(back.masks, cs.masks)
    np.testing.assert_array_equal(back.case, cs.case)
    np.testing.assert_array_equal(back.dice, cs.dice)
    assert back.category == cs.category and back.ops == cs.ops
    assert back.masks.dtype == np.uint8 and back.case.dtype == np.int32 and back.dice.dtype == np.float32
    # bit packing: well under one byte per pixel
    assert path.stat().st_size < cs.masks.size / 4
    other = tmp_path / "noext"
    save_set(cs, other)  # no ".npz" appended
    assert other.is_file() and len(load_set(other)) == len(cs)
    with pytest.raises(InputError):
        load_set(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError):
        load_set(tmp_path / "junk.npz")
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:200])  # truncated zip
    with pytest.raises(InputError):
        load_set(tmp_path / "cut.npz")


def test_index_frame():
    cs = corrupt_dataset(lesion_set(3, 32), k=4, seed=0)
    df = cs.index_frame(["a", "b", "c"])
    assert list(df.columns) == ["stem", "k", "category", "ops", "dice"]
    assert df["stem"].tolist() == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert df["k"].tolist() == [0, 1, 2, 3] * 3
    np.testing.assert_allclose(df["dice"].to_numpy(), cs.dice)
    with pytest.raises(InputError):
        cs.index_frame(["a"])


# ------------------------------------------------------------------------------------------- plots


def test_plots(tmp_path: Path):
    from qgseg.plots import corruption_examples, dice_histogram

    masks = lesion_set(4, 32)
    images = np.zeros((4, 32, 32, 3), np.uint8) + 128
    cs = corrupt_dataset(masks, k=12, seed=0)
    for p in [corruption_examples(images, masks, cs, tmp_path / "ex.png", per_category=2),
              corruption_examples(None, masks[0], corrupt_dataset(masks[:1], 3, 0), tmp_path / "one.png"),
              dice_histogram(cs.dice, tmp_path / "h.png", by_category=cs.category)]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_remove_lesions_paints_the_lesion_out_and_keeps_the_rest():
    from qgseg.corrupt import remove_lesions

    h = 64
    yy, xx = np.mgrid[:h, :h]
    lesion = ((yy - 30) ** 2 + (xx - 34) ** 2 < 12 ** 2).astype(np.uint8)
    skin = np.array([200, 160, 140], np.uint8)
    image = np.broadcast_to(skin, (h, h, 3)).copy()
    image[lesion == 1] = (70, 40, 30)
    image[:4, :4] = (0, 255, 0)  # a marker far from the lesion
    out = remove_lesions(image[None], lesion[None])
    assert out.shape == (1, h, h, 3) and out.dtype == np.uint8
    inside = out[0][lesion == 1].astype(float)
    assert np.abs(inside.mean(0) - skin).max() < 10  # the dark lesion became skin
    far = cv2.dilate(lesion, np.ones((15, 15), np.uint8)) == 0
    assert np.array_equal(out[0][far], image[far])  # pixels away from the lesion are untouched
    # an image without lesion comes back unchanged; wrong shapes are refused
    assert np.array_equal(remove_lesions(image[None], np.zeros((1, h, h), np.uint8))[0], image)
    with pytest.raises(ValueError, match="remove_lesions"):
        remove_lesions(image, lesion)


# ------------------------------------------------------------------------ fast paths (issue 18)
# The generator computes some things itself instead of calling the library that defines them;
# these tests pin each one to that library, bit for bit.


def test_sample_rngs_match_default_rng():
    from qgseg.corrupt import _sample_rngs

    for seed in [0, 11, 2**32 - 1, 2**32, 2**64 + 3, 10**30]:
        for cases, k in [(np.arange(6), 4), (np.array([0, 5, 2**32 - 1]), 2), (np.arange(1), 1)]:
            got = _sample_rngs(seed, cases, k)
            ref = [np.random.default_rng([seed, int(i), j]) for i in cases for j in range(k)]
            assert len(got) == len(ref)
            for a, b in zip(got, ref):
                assert a.bit_generator.state == b.bit_generator.state
                assert a.random() == b.random()


def test_elastic_and_grid_match_albumentations():
    import random

    import albumentations as A

    from qgseg.corrupt import _scale

    def album(t, m, rng):  # how the generator called albumentations before issue 18
        t.set_random_state(rng, random.Random(int(rng.integers(0, 2**63))))
        return (t(image=m * np.uint8(255))["image"] > 127).astype(np.uint8)

    for m in [lesion_set(3, 64)[1], ellipse_mask(40, 64, (30, 20), (14, 9), 30), two_blobs(47, 47)]:
        s = _scale(m)
        for name, alpha, sigma in [("elastic_light", 30, 4), ("elastic_heavy", 60, 5)]:
            t = A.ElasticTransform(alpha=round(alpha * s, 3), sigma=round(max(sigma * s, 1.0), 3),
                                   noise_distribution="uniform", interpolation=cv2.INTER_LINEAR, p=1.0)
            for seed in range(5):
                r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
                np.testing.assert_array_equal(OPS[name](m, r1), album(t, m, r2))
                assert r1.random() == r2.random()  # the same draws consumed
        for name, steps, limit in [("grid_light", 5, 0.2), ("grid_heavy", 8, 0.4), ("heavy_grid", 12, 0.6)]:
            steps = max(1, min(steps, min(m.shape) // 2))
            t = A.GridDistortion(num_steps=steps, distort_limit=limit, interpolation=cv2.INTER_LINEAR, p=1.0)
            for seed in range(5):
                r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
                np.testing.assert_array_equal(OPS[name](m, r1), album(t, m, r2))
                assert r1.random() == r2.random()


def test_draw_distinct_matches_numpy_choice():
    from qgseg.corrupt import _OP_TABLES, _Table

    for table in [_OP_TABLES["chained"], _Table({"a": 100.0, "b": 1e-3, "c": 1.0, "d": 50.0})]:
        for s in range(300):
            for n in (1, 2, 3, 4):
                r1, r2 = np.random.default_rng([s, n]), np.random.default_rng([s, n])
                ref = [table.names[i] for i in r1.choice(len(table.names), size=n, replace=False, p=table.p)]
                assert table.draw_distinct(r2, n) == ref
                assert r1.random() == r2.random()


def test_kth_smallest_and_random_fg_match_numpy():
    from qgseg.corrupt import _kth_smallest, _random_fg

    rng = np.random.default_rng(0)
    for t in range(400):
        n = int(rng.integers(1, 20000))
        x = [rng.normal(size=n), rng.integers(0, 4, n).astype(float), np.sort(rng.random(n)), -np.sort(rng.random(n)),
             np.where(rng.random(n) < 0.01, np.nan, rng.normal(size=n))][t % 5]
        kth = int(rng.integers(0, n))
        np.testing.assert_array_equal(_kth_smallest(x, kth), np.partition(x, kth)[kth])  # NaN == NaN here
    for m in [*lesion_set(4, 40), MASKS["non_square"], MASKS["full"], MASKS["empty"]]:
        for s in range(20):
            r1, r2 = np.random.default_rng(s), np.random.default_rng(s)
            idx = np.flatnonzero(m)  # the reference: list every foreground pixel, then pick
            if idx.size == 0:
                assert _random_fg(m, r2, 3).shape == (0, 2)
                continue
            p = idx[r1.integers(0, idx.size, size=3)]
            np.testing.assert_array_equal(_random_fg(m, r2, 3), np.stack([p % m.shape[1], p // m.shape[1]], axis=1))


def test_corrupt_dataset_same_for_any_block_size_and_worker_count():
    masks = lesion_set(9, 40)
    weak = np.stack([np.roll(masks, 2, axis=1)])
    ref = corrupt_dataset(masks, k=5, seed=4, weak=weak, p_weak=0.2)
    for kwargs in [{"block": 1}, {"block": 4}, {"block": 100}, {"workers": 2, "block": 2}]:
        cs = corrupt_dataset(masks, k=5, seed=4, weak=weak, p_weak=0.2, **kwargs)
        np.testing.assert_array_equal(cs.masks, ref.masks)
        np.testing.assert_array_equal(cs.dice, ref.dice)
        np.testing.assert_array_equal(cs.case, ref.case)
        assert cs.category == ref.category and cs.ops == ref.ops
    with pytest.raises(InputError):
        corrupt_dataset(masks, k=1, seed=0, block=0)
