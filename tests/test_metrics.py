"""Confusion matrix, IoU/mIoU (hand-computed example) and RankMe."""

import numpy as np
import pytest
import torch

from trainer.evaluate.metrics import (
    confusion_matrix,
    iou_per_class,
    iou_table,
    mean_iou,
    rankme,
)


def test_confusion_matrix_counts_and_ignore():
    gt = np.array([0, 0, 1, 1, 2, 255, 255])
    pred = np.array([0, 1, 1, 1, 0, 2, 0])
    conf = confusion_matrix(pred, gt, num_classes=4)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 1] = 2
    expected[2, 0] = 1
    np.testing.assert_array_equal(conf, expected)
    assert conf.sum() == 5  # the two ignored points count nowhere


def test_miou_hand_computed_example():
    # class 0: TP 1, FP 1 (gt 2 → pred 0), FN 1 (gt 0 → pred 1)  → 1/3
    # class 1: TP 2, FP 1, FN 0                                 → 2/3
    # class 2: TP 0, FP 0, FN 1                                 → 0
    # class 3: absent from gt and prediction                   → NaN, not in the mean
    gt = np.array([0, 0, 1, 1, 2, 255])
    pred = np.array([0, 1, 1, 1, 0, 3])
    conf = confusion_matrix(pred, gt, num_classes=4)
    ious = iou_per_class(conf)
    np.testing.assert_allclose(ious[:3], [1 / 3, 2 / 3, 0.0])
    assert np.isnan(ious[3])
    assert mean_iou(conf) == pytest.approx((1 / 3 + 2 / 3 + 0.0) / 3)


def test_predicted_but_absent_class_counts_as_zero():
    gt = np.array([0, 0, 0, 0])
    pred = np.array([0, 0, 0, 1])
    conf = confusion_matrix(pred, gt, num_classes=2)
    np.testing.assert_allclose(iou_per_class(conf), [0.75, 0.0])
    assert mean_iou(conf) == pytest.approx(0.375)


def test_confusion_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="ground-truth label outside"):
        confusion_matrix(np.array([0]), np.array([7]), num_classes=3)
    with pytest.raises(ValueError, match="lengths differ"):
        confusion_matrix(np.array([0, 1]), np.array([0]), num_classes=3)


def test_iou_table_lists_every_class_and_miou():
    table = iou_table(["road", "car"], np.array([0.5, np.nan]), 0.5)
    assert "road" in table and " 50.0" in table and "n/a" in table and "mIoU" in table


def test_rankme_identity_is_full_rank():
    assert rankme(np.eye(64)) == pytest.approx(64, rel=1e-4)


def test_rankme_hand_computed_unequal_singular_values():
    # singular values (3, 1): p = (3/4, 1/4), RankMe = exp(-(3/4 ln 3/4 + 1/4 ln 1/4)) = 1.7548
    # (equal singular values cannot tell sigma from sigma^2: that would give p = (0.9, 0.1), 1.3842)
    x = np.diag([3.0, 1.0]) @ np.array([[0.6, 0.8], [-0.8, 0.6]])  # rotated: still (3, 1)
    want = np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    assert rankme(x) == pytest.approx(want, rel=1e-6)


def test_rankme_rank_r_matrix():
    rng = np.random.default_rng(0)
    # rank 5 with equal singular values → exactly 5
    q, _ = np.linalg.qr(rng.normal(size=(200, 5)))
    r, _ = np.linalg.qr(rng.normal(size=(32, 5)))
    assert rankme(q @ r.T) == pytest.approx(5, rel=1e-3)
    # a generic rank-3 matrix: between 1 and 3
    low = rng.normal(size=(500, 3)) @ rng.normal(size=(3, 48))
    assert 1.5 < rankme(low) <= 3.0 + 1e-3
    # collapsed features (all rows equal) → 1
    assert rankme(np.ones((100, 16))) == pytest.approx(1.0, rel=1e-3)


def test_rankme_subsamples_and_accepts_tensors():
    x = torch.randn(30_000, 8, generator=torch.Generator().manual_seed(0))
    full = rankme(x, max_points=50_000)
    sub = rankme(x, max_points=2_000, seed=1)
    assert 7.0 < full <= 8.0
    assert sub == pytest.approx(full, rel=0.05)


def test_linear_probe_never_predicts_a_class_it_was_not_trained_on() -> None:
    """Classes 2..9 never occur in the probe's training labels: whatever the features (here far
    outside the training distribution, where the untrained rows' random weights would win), the
    probe predicts only classes 0 and 1."""
    from trainer.evaluate.probe import ProbeConfig, fit_linear_probe, predict

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g)
    y = (x[:, 0] > 0).numpy().astype(np.int64)
    head = fit_linear_probe([x], [y], num_classes=10, cfg=ProbeConfig(steps=400, batch_points=512))
    train_pred = predict(head, x)
    assert (train_pred == y).mean() > 0.95
    far = 50 * torch.randn(5000, 8, generator=g)
    assert set(np.unique(predict(head, far)).tolist()) <= {0, 1}
