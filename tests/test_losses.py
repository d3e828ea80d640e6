import math

import pytest
import torch

from qgseg.losses import bce_loss, dice_only_loss, mse_prob_loss, pairwise_ranking_loss, seg_loss, soft_dice_loss

BIG = 30.0  # a logit whose sigmoid is 1 to float precision


def _target_2x2() -> torch.Tensor:
    return torch.tensor([[1.0, 0.0], [1.0, 0.0]]).reshape(1, 1, 2, 2)


def test_perfect_prediction_gives_zero_dice_loss():
    t = torch.zeros(2, 1, 4, 4)
    t[0, 0, 1:3, 1:3] = 1
    t[1, 0, 0, :] = 1
    logits = (t * 2 - 1) * BIG
    assert torch.allclose(soft_dice_loss(logits, t), torch.zeros(2), atol=1e-6)
    assert torch.allclose(dice_only_loss(logits, t), torch.zeros(2), atol=1e-6)


def test_soft_dice_golden_value():
    # p = 0.5 everywhere, 2 of 4 pixels foreground: (2*1 + 1) / (2 + 2 + 1) = 0.6
    loss = soft_dice_loss(torch.zeros(1, 1, 2, 2), _target_2x2())
    assert loss.item() == pytest.approx(0.4, abs=1e-6)
    # eps = 0: 2*1 / 4 = 0.5
    assert soft_dice_loss(torch.zeros(1, 1, 2, 2), _target_2x2(), eps=0.0).item() == pytest.approx(0.5, abs=1e-6)


def test_both_empty_dice_loss_is_zero():
    logits = torch.full((1, 1, 4, 4), -BIG)
    assert soft_dice_loss(logits, torch.zeros(1, 1, 4, 4)).item() == pytest.approx(0.0, abs=1e-6)


def test_bce_golden_values():
    t = _target_2x2()
    assert bce_loss(torch.zeros(1, 1, 2, 2), t).item() == pytest.approx(math.log(2), abs=1e-6)
    # p = 0.75 everywhere: two pixels cost -ln 0.75, two cost -ln 0.25
    logits = torch.full((1, 1, 2, 2), math.log(3))
    expected = (2 * -math.log(0.75) + 2 * -math.log(0.25)) / 4
    assert bce_loss(logits, t).item() == pytest.approx(expected, abs=1e-6)


def test_seg_loss_is_half_bce_plus_half_dice():
    t = _target_2x2()
    logits = torch.zeros(1, 1, 2, 2)
    assert seg_loss(logits, t).item() == pytest.approx(0.5 * math.log(2) + 0.5 * 0.4, abs=1e-6)
    logits = torch.randn(3, 1, 4, 4)
    t = (torch.rand(3, 1, 4, 4) > 0.5).float()
    assert torch.allclose(seg_loss(logits, t), 0.5 * bce_loss(logits, t) + 0.5 * soft_dice_loss(logits, t))


def test_mse_prob_golden_value():
    teacher = torch.tensor([1.0, 0.0, 0.5, 0.25]).reshape(1, 1, 2, 2)
    expected = (0.25 + 0.25 + 0.0 + 0.0625) / 4
    assert mse_prob_loss(torch.zeros(1, 1, 2, 2), teacher).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("fn", [soft_dice_loss, bce_loss, seg_loss, mse_prob_loss, dice_only_loss])
def test_per_sample_shape_and_independence(fn):
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 8, 8)
    t = (torch.rand(3, 1, 8, 8) > 0.5).float()
    base = fn(logits, t)
    assert base.shape == (3,)
    logits2, t2 = logits.clone(), t.clone()
    logits2[1] = torch.randn(1, 8, 8) * 5
    t2[1] = 1 - t2[1]
    changed = fn(logits2, t2)
    assert torch.equal(changed[0], base[0]) and torch.equal(changed[2], base[2])
    assert not torch.equal(changed[1], base[1])


def test_soft_targets_are_accepted():
    t = torch.full((2, 1, 4, 4), 0.5)
    # BCE against p = 0.5 is minimised (= ln 2) by logit 0.
    assert torch.allclose(bce_loss(torch.zeros(2, 1, 4, 4), t), torch.full((2,), math.log(2)))
    assert bce_loss(torch.ones(2, 1, 4, 4), t)[0] > math.log(2)


@pytest.mark.parametrize("fn", [soft_dice_loss, bce_loss, seg_loss, mse_prob_loss])
def test_valid_mask_ignores_invalid_pixels(fn):
    torch.manual_seed(1)
    t = (torch.rand(2, 1, 4, 4) > 0.5).float()
    valid = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    valid[:, :, :2] = True
    logits = torch.randn(2, 1, 4, 4, requires_grad=True)
    loss = fn(logits, t, valid)
    # Equal to the loss computed on the valid half alone ...
    half = fn(logits[:, :, :2].detach(), t[:, :, :2])
    assert torch.allclose(loss.detach(), half, atol=1e-6)
    # ... and invalid pixels get no gradient.
    loss.sum().backward()
    assert torch.all(logits.grad[:, :, 2:] == 0)
    assert torch.any(logits.grad[:, :, :2] != 0)


def test_valid_float_mask_and_empty_valid():
    t = torch.ones(2, 1, 2, 2)
    logits = torch.zeros(2, 1, 2, 2)
    valid = torch.zeros(2, 1, 2, 2)
    valid[0] = 1.0
    out = bce_loss(logits, t, valid)
    assert out[0].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out[1].item() == 0.0  # no valid pixel: contributes nothing
    assert mse_prob_loss(logits, t, valid)[1].item() == 0.0


def test_bfloat16_logits_give_float32_losses():
    logits = torch.randn(2, 1, 4, 4).bfloat16()
    t = (torch.rand(2, 1, 4, 4) > 0.5).float()
    assert seg_loss(logits, t).dtype == torch.float32


def test_pairwise_ranking_loss_known_answers():
    t = torch.tensor([0.8, 0.6, 0.9, 0.1])
    g = torch.tensor([0, 0, 1, 2])  # only (0, 1) is a same-image pair
    right = pairwise_ranking_loss(torch.tensor([0.9, 0.5, 0.0, 0.0]), t, g)
    assert float(right) == pytest.approx(0.0)  # predicted gap 0.4 >= true gap 0.2
    wrong = torch.tensor([0.5, 0.9, 0.0, 0.0], requires_grad=True)
    loss = pairwise_ranking_loss(wrong, t, g)
    assert float(loss.detach()) == pytest.approx(0.2 + 0.4)  # true gap 0.2, predicted gap -0.4
    loss.backward()
    assert wrong.grad.tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0])
    short = pairwise_ranking_loss(torch.tensor([0.75, 0.7, 0.0, 0.0]), t, g)
    assert float(short) == pytest.approx(0.15)  # right order, gap 0.05 of 0.2
    none = pairwise_ranking_loss(torch.tensor([0.5, 0.5, 0.5, 0.5], requires_grad=True), t, torch.arange(4))
    assert float(none.detach()) == 0.0 and none.requires_grad
