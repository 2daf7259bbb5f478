"""Loss functions: values on hand-checked cases, masking of unknown pixels, weights from config."""
from __future__ import annotations

import math

import pytest
import torch

from refvlm_core.errors import ConfigError
from refvlm_core.losses import (LossWeights, box_giou_loss, box_l1_loss, connected_zero, dice_loss,
                                keypoint_l1_loss, keypoint_visibility_loss, sigmoid_focal_loss, silog_loss)


def test_box_losses_are_zero_on_identical_boxes_and_positive_otherwise():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.1]])
    assert box_l1_loss(boxes, boxes, 2) == 0
    assert box_giou_loss(boxes, boxes, 2).abs() < 1e-6
    shifted = boxes + torch.tensor([0.1, 0.0, 0.0, 0.0])
    assert torch.isclose(box_l1_loss(shifted, boxes, 2), torch.tensor(0.1))
    disjoint = torch.tensor([[0.1, 0.1, 0.1, 0.1]]), torch.tensor([[0.9, 0.9, 0.1, 0.1]])
    assert 1.0 < box_giou_loss(*disjoint, 1) < 2.0  # GIoU < 0 for far apart boxes


def test_focal_and_dice_on_confident_predictions():
    target = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    right, wrong = (target * 2 - 1) * 20, (1 - target * 2) * 20
    assert sigmoid_focal_loss(right, target, 1) < 1e-6 < sigmoid_focal_loss(wrong, target, 1)
    assert dice_loss(right, target, 1) < 1e-6 and dice_loss(wrong, target, 1) > 0.6
    # alpha = -1 and gamma = 0 reduce focal loss to plain BCE
    logits = torch.randn(3, 10)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, (logits > 0.3).float())
    assert torch.isclose(sigmoid_focal_loss(logits, (logits > 0.3).float(), 3, alpha=-1, gamma=0), bce)


def test_keypoint_losses_ignore_unlabelled_keypoints():
    target = torch.zeros(1, 17, 3)
    target[0, :5, :2], target[0, :5, 2] = 0.5, 2
    pred = torch.full((1, 17, 2), 0.5)
    pred[0, 10:] = 0.0  # wrong only where unlabelled
    assert keypoint_l1_loss(pred, target) == 0
    pred[0, 0, 0] = 0.6
    assert torch.isclose(keypoint_l1_loss(pred, target), torch.tensor(0.1 / 5))
    logits = torch.full((1, 17), -20.0)
    logits[0, :5] = 20.0
    assert keypoint_visibility_loss(logits, target) < 1e-6


def test_silog_is_eigen_on_valid_pixels_and_ignores_nan():
    torch.manual_seed(0)
    target = torch.rand(8, 8) * 5 + 0.5
    target[0, :4] = float("nan")
    target[1, :2] = 0.0
    pred = torch.rand(1, 8, 8) * 5 + 0.5
    valid = torch.isfinite(target) & (target > 0)
    d = torch.log(pred[0][valid]) - torch.log(target[valid])
    expected = (d ** 2).mean() - 0.5 * d.mean() ** 2
    assert torch.isclose(silog_loss(pred, target, lam=0.5), expected, atol=1e-6)
    exact = torch.where(valid, target, torch.full_like(target, 3.0))[None]
    assert silog_loss(exact, target).abs() < 1e-6
    # lambda = 1: a global scale error costs nothing; lambda = 0.5: it does
    assert silog_loss(exact * 2, target, lam=1.0).abs() < 1e-5
    assert torch.isclose(silog_loss(exact * 2, target, lam=0.5), torch.tensor(0.5 * math.log(2) ** 2), atol=1e-5)


def test_silog_with_no_valid_pixels_is_finite_zero_with_gradient():
    pred = torch.full((2, 4, 4), 2.0, requires_grad=True)
    loss = silog_loss(pred, torch.full((4, 4), float("nan")))
    loss.backward()
    assert loss == 0 and torch.isfinite(pred.grad).all()


def test_connected_zero_reaches_every_output():
    a, b = torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)
    zero = connected_zero({"a": a * 2, "b": b, "idx": torch.arange(3)})
    zero.backward()
    assert zero == 0 and a.grad is not None and b.grad is not None


def test_loss_weights_from_config_mapping():
    weights = LossWeights.coerce({"lm": 1.0, "box_l1": 3.0, "mask_focal": 10})
    assert weights.box_l1 == 3.0 and weights.mask_focal == 10.0 and weights.box_giou == 2.0
    assert LossWeights.coerce(None) == LossWeights()
    with pytest.raises(ConfigError, match="box_l2"):
        LossWeights.coerce({"box_l2": 1.0})
