"""distill_loss: 1 − cosine over paired points (a pure function)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.loss import distill_loss


def test_hand_computed_example() -> None:
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], requires_grad=True)
    target = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-5.0, 0.0]], dtype=torch.float16)
    paired = torch.tensor([True, True, False])
    loss = distill_loss(pred, target, paired)
    # cos = 1 and 1/sqrt(2); the unpaired third point (cos 0) is left out
    assert loss.item() == pytest.approx((0.0 + 1 - 1 / math.sqrt(2)) / 2, abs=1e-6)
    loss.backward()
    assert pred.grad[2].abs().sum() == 0  # unpaired: no gradient
    assert pred.grad[1].abs().sum() > 0


def test_all_unpaired_gives_zero_without_nan() -> None:
    pred = torch.randn(5, 3, requires_grad=True)
    loss = distill_loss(pred, torch.randn(5, 3), torch.zeros(5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() == 0


def test_scale_invariant_and_bounded() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(50, 8), torch.randn(50, 8)
    paired = torch.rand(50) > 0.3
    a = distill_loss(pred, target, paired)
    torch.testing.assert_close(distill_loss(3.0 * pred, 0.5 * target, paired), a)
    assert distill_loss(-target, target, paired).item() == pytest.approx(2.0, abs=1e-6)
    assert distill_loss(target, target, paired).item() == pytest.approx(0.0, abs=1e-6)


def test_zero_prediction_is_finite() -> None:
    loss = distill_loss(torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, dtype=torch.bool))
    assert loss.item() == pytest.approx(1.0)


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="do not match"):
        distill_loss(torch.zeros(3, 4), torch.zeros(3, 5), torch.ones(3, dtype=torch.bool))
