import math

import numpy as np
import pytest
import torch
from scipy import stats

from qgseg.metrics import (
    dice_per_sample,
    e_val,
    hd95_per_sample,
    iou_per_sample,
    mean_se,
    pairwise_ranking_accuracy,
    regression_metrics,
    spearman,
)


def _masks() -> tuple[torch.Tensor, torch.Tensor]:
    pred = torch.zeros(3, 1, 4, 4)
    target = torch.zeros(3, 1, 4, 4)
    pred[0, 0, 0, :] = 1  # 4 pixels
    target[0, 0, 0, 2:] = 1  # 2 of them
    target[0, 0, 1, 2:] = 1  # + 2 others -> |P&T| = 2, |P| = |T| = 4
    target[2, 0, 0, 0] = 1  # sample 1: both empty; sample 2: prediction empty
    return pred, target


def test_dice_and_iou_golden_values():
    pred, target = _masks()
    d = dice_per_sample(pred, target)
    i = iou_per_sample(pred, target)
    assert d.shape == (3,) and i.shape == (3,)
    assert d.tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert i.tolist() == pytest.approx([2 / 6, 1.0, 0.0])


def test_dice_accepts_bool_3d_and_probabilities():
    pred, target = _masks()
    d = dice_per_sample(pred[:, 0].bool(), target[:, 0].bool())
    assert d.tolist() == pytest.approx([0.5, 1.0, 0.0])
    probs = pred * 0.9 + 0.05  # 0.95 / 0.05 -> binarised at 0.5
    assert dice_per_sample(probs, target).tolist() == pytest.approx([0.5, 1.0, 0.0])


def _square(size: int, top: int, left: int, side: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[top : top + side, left : left + side] = True
    return m


def test_hd95_of_shifted_squares_is_the_shift():
    a = _square(64, 10, 10, 20)
    b = _square(64, 10, 13, 20)
    out = hd95_per_sample(np.stack([a, a]), np.stack([b, a]))
    assert out.shape == (2,)
    assert out[0] == pytest.approx(3.0)
    assert out[1] == 0.0


def test_hd95_empty_rules():
    empty = np.zeros((16, 16), dtype=bool)
    sq = _square(16, 4, 4, 5)
    out = hd95_per_sample(np.stack([empty, sq, empty]), np.stack([empty, empty, sq]))
    assert out[0] == 0.0
    assert math.isnan(out[1]) and math.isnan(out[2])


def _hd95_brute_force(a: np.ndarray, b: np.ndarray) -> float:
    """Reference: boundary = foreground pixel with a background 4-neighbour (outside = background),
    all pairwise distances, max of the two directed 95th percentiles (MONAI / medpy definition)."""
    from scipy.spatial.distance import cdist

    def boundary(m: np.ndarray) -> np.ndarray:
        p = np.pad(m, 1)
        inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        return np.argwhere(m & ~inner)

    d = cdist(boundary(a), boundary(b))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95_matches_brute_force():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    preds, targets = [], []
    for _ in range(4):
        cy, cx, r = rng.integers(14, 34), rng.integers(14, 34), rng.integers(5, 12)
        preds.append((yy - cy) ** 2 + ((xx - cx) / 1.3) ** 2 < r**2)
        targets.append((yy - cy - rng.integers(-3, 4)) ** 2 + (xx - cx) ** 2 < (r + rng.integers(-2, 3)) ** 2)
    preds.append(_square(48, 0, 0, 30))  # touching the image border
    targets.append(_square(48, 5, 2, 30))
    ours = hd95_per_sample(np.stack(preds), np.stack(targets))
    ref = [_hd95_brute_force(a, b) for a, b in zip(preds, targets)]
    assert np.allclose(ours, ref)
    assert np.all(ours > 0)


def test_hd95_fast_at_128px():
    import time

    rng = np.random.default_rng(0)
    p = rng.random((64, 128, 128)) > 0.5
    t = np.roll(p, 2, axis=2)
    start = time.perf_counter()
    hd95_per_sample(p, t)
    assert time.perf_counter() - start < 2.0


def test_mean_se():
    m, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == pytest.approx(2.5)
    assert se == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert mean_se([0.7]) == (pytest.approx(0.7), 0.0)
    assert mean_se([1.0, float("nan"), 3.0]) == (pytest.approx(2.0), pytest.approx(1.0))
    assert all(math.isnan(v) for v in mean_se([]))


def test_regression_metrics_against_numpy_and_scipy():
    rng = np.random.default_rng(1)
    true = rng.random(50)
    pred = true + rng.normal(0, 0.1, 50)
    r = regression_metrics(pred, true)
    assert r["n"] == 50
    assert r["mae"] == pytest.approx(np.mean(np.abs(pred - true)))
    assert r["rmse"] == pytest.approx(np.sqrt(np.mean((pred - true) ** 2)))
    assert r["pearson"] == pytest.approx(np.corrcoef(pred, true)[0, 1])
    assert r["spearman"] == pytest.approx(stats.spearmanr(pred, true).statistic)
    assert r["pearson_p"] == pytest.approx(stats.pearsonr(pred, true).pvalue)
    assert 0 <= r["spearman_p"] < 1e-6


def test_regression_metrics_known_values_and_constant_input():
    r = regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0]))
    assert r["mae"] == pytest.approx(2 / 3)
    assert r["rmse"] == pytest.approx(math.sqrt(4 / 3))
    assert r["spearman"] == pytest.approx(1.0)
    c = regression_metrics(np.full(5, 0.8), np.linspace(0, 1, 5))
    assert math.isnan(c["pearson"]) and math.isnan(c["spearman"])
    assert c["mae"] == pytest.approx(np.mean(np.abs(0.8 - np.linspace(0, 1, 5))))


def test_e_val():
    curve = [0.1, 0.5, 0.9, 0.95, 1.0, 0.8]
    assert e_val(curve) == 5  # 0.95 < 0.96 * 1.0
    assert e_val(curve, fraction=0.9) == 3
    assert e_val([0.5]) == 1
    assert e_val([float("nan"), 0.2, 0.8]) == 3
    assert e_val([]) == 0


def test_spearman_known_answers():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # 1 - 6 * 2 / (3 * 8)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1], [2]))
    assert spearman([1, 2, np.nan, 3], [1, 2, 0, 3]) == pytest.approx(1.0)  # NaN pairs dropped


def test_pairwise_ranking_accuracy_known_answers():
    true = [0.9, 0.8, 0.5, 0.9, 0.3]
    groups = ["a", "a", "a", "b", "b"]
    # image a: pairs (0,1) (0,2) (1,2), image b: (3,4); no pair across images
    assert pairwise_ranking_accuracy([0.9, 0.8, 0.5, 0.1, 0.2], true, groups) == pytest.approx(3 / 4)
    assert pairwise_ranking_accuracy([3, 2, 1, 2, 1], true, groups) == pytest.approx(1.0)
    # a tie in the score counts half; a pair closer than min_gap does not count
    assert pairwise_ranking_accuracy([1, 1, 0, 1, 0], true, groups) == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    assert pairwise_ranking_accuracy([0, 1, 0, 1, 0], [0.80, 0.805, 0.2, 0.9, 0.3], groups, min_gap=0.01) == \
        pytest.approx((0.5 + 1 + 1) / 3)  # (0, 1) is 0.005 apart: left out; (0, 2) a tie; (1, 2), (3, 4) right
    assert math.isnan(pairwise_ranking_accuracy([1, 2], [0.5, 0.9], ["a", "b"]))


