"""Confusion-matrix metrics and mAP against small hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsss.metrics import ConfusionMatrix, mean_average_precision

nan = float("nan")

# 3 classes; gt row-major 3x4, 255 = ignore in gt, 255 = abstain in pred.
GT = np.array([[0, 0, 1, 1], [0, 1, 1, 255], [2, 2, 1, 0]])
PRED = np.array([[0, 1, 1, 1], [0, 1, 255, 2], [2, 0, 1, 0]])


def test_counts_and_metrics_by_hand():
    cm = ConfusionMatrix(3).update(PRED, GT)
    # gt 0: pixels (0,0)->0 (0,1)->1 (1,0)->0 (2,3)->0 ; gt 1: (0,2)->1 (0,3)->1 (1,1)->1
    # (1,2)->abstain (2,2)->1 ; gt 2: (2,0)->2 (2,1)->0 ; (1,3) is ignored.
    np.testing.assert_array_equal(cm.counts, [[3, 1, 0, 0], [0, 4, 0, 1], [1, 0, 1, 0]])
    assert cm.total == 11
    # IoU: class 0: 3 / (4 + 4 - 3) = 0.6; class 1: 4 / (5 + 5 - 4) = 2/3; class 2: 1 / (2 + 1 - 1)
    np.testing.assert_allclose(cm.iou(), [0.6, 2 / 3, 0.5])
    assert cm.miou() == pytest.approx((0.6 + 2 / 3 + 0.5) / 3)
    np.testing.assert_allclose(cm.precision(), [3 / 4, 4 / 5, 1 / 1])
    np.testing.assert_allclose(cm.recall(), [3 / 4, 4 / 5, 1 / 2])
    assert cm.pixel_accuracy() == pytest.approx(8 / 11)


def test_absent_class_is_nan_and_skipped_by_miou():
    cm = ConfusionMatrix(4).update(np.array([0, 1, 1]), np.array([0, 1, 0]))
    iou = cm.iou()
    assert np.isnan(iou[2]) and np.isnan(iou[3])
    np.testing.assert_allclose(iou[:2], [1 / 2, 1 / 2])
    assert cm.miou() == pytest.approx(0.5)
    assert np.isnan(cm.recall()[3]) and np.isnan(cm.precision()[2])


def test_empty_matrix_is_nan_without_warnings(recwarn):
    cm = ConfusionMatrix(2).update(np.zeros(3, np.uint8), np.full(3, 255, np.uint8))
    assert cm.total == 0
    assert np.isnan(cm.miou()) and np.isnan(cm.pixel_accuracy())
    assert len(recwarn) == 0


def test_abstaining_lowers_recall_not_precision():
    gt = np.array([1, 1, 1, 1])
    cm = ConfusionMatrix(2).update(np.array([1, 1, 255, 255]), gt)
    assert cm.recall()[1] == 0.5 and cm.precision()[1] == 1.0 and cm.iou()[1] == 0.5
    assert np.isnan(cm.iou()[0])  # abstentions are not false positives for any class


def test_merge_equals_whole_and_survives_json():
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 5, (7, 9)) for _ in range(4)]
    preds = [rng.integers(0, 5, (7, 9)) for _ in range(4)]
    for g in gts:
        g[rng.random(g.shape) < 0.1] = 255
    for p in preds:
        p[rng.random(p.shape) < 0.1] = 255
    whole = ConfusionMatrix(5).update(np.stack(preds), np.stack(gts))
    parts = [ConfusionMatrix(5).update(p, g) for p, g in zip(preds, gts, strict=True)]
    left = parts[0].merge(parts[1])
    right = ConfusionMatrix.from_dict(json.loads(json.dumps((parts[2] + parts[3]).to_dict())))
    merged = left + right
    np.testing.assert_array_equal(merged.counts, whole.counts)
    assert merged.miou() == whole.miou() and merged.total == whole.total
    np.testing.assert_array_equal(
        parts[0].counts, ConfusionMatrix(5).update(preds[0], gts[0]).counts
    )


@pytest.mark.parametrize(
    ("pred", "gt", "message"),
    [
        (np.zeros((2, 3), int), np.zeros((3, 2), int), r"pred shape \(2, 3\) != gt shape \(3, 2\)"),
        (np.zeros(2, float), np.zeros(2, int), "pred must have an integer dtype"),
        (np.array([0, 0]), np.array([0, 7]), r"gt has values \[7\] outside 0\.\.2"),
        (np.array([3, 254]), np.array([0, 1]), r"pred has values \[3, 254\] outside 0\.\.2"),
        (np.array([-1, 0]), np.array([0, 1]), r"pred has values \[-1\]"),
    ],
)
def test_update_rejects_bad_input(pred, gt, message):
    with pytest.raises(ValueError, match=message):
        ConfusionMatrix(3).update(pred, gt)


def test_merge_and_from_dict_check_shapes():
    with pytest.raises(ValueError, match="cannot merge 2 classes into 3"):
        ConfusionMatrix(3).merge(ConfusionMatrix(2))
    with pytest.raises(ValueError, match=r"counts must have shape \(3, 4\)"):
        ConfusionMatrix.from_dict({"n_classes": 3, "counts": [[0, 0], [0, 0]]})


def test_average_precision_by_hand():
    # Ranked: +, -, +, - -> precision at the positives 1 and 2/3; AP = (1 + 2/3) / 2.
    scores = np.array([[0.9], [0.8], [0.7], [0.6]])
    targets = np.array([[1], [0], [1], [0]])
    assert mean_average_precision(scores, targets) == pytest.approx(5 / 6)


def test_tied_scores_enter_together():
    # Thresholds 0.5 (one +, one -: P 1/2, R 1/2) and 0.2 (P 2/3, R 1): AP = 1/4 + 1/3.
    scores = np.array([[0.5], [0.5], [0.2]])
    targets = np.array([[1], [0], [1]])
    assert mean_average_precision(scores, targets) == pytest.approx(7 / 12)
    # The order of tied rows must not matter.
    assert mean_average_precision(scores[[1, 0, 2]], targets[[1, 0, 2]]) == pytest.approx(7 / 12)


def test_map_skips_classes_without_positives():
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4], [0.4, 0.3, 0.5]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    # Class 0: ranked first -> AP 1. Class 1: ranked first -> AP 1. Class 2 has no positive.
    assert mean_average_precision(scores, targets) == pytest.approx(1.0)
    targets[2, 1] = 1  # class 1 now: scores 0.8 (+), 0.3 (+), 0.1 (-) -> AP 1
    targets[0, 0], targets[2, 0] = 0, 1  # class 0: 0.9 (-), 0.4 (+), 0.2 (-) -> AP 1/2
    assert mean_average_precision(scores, targets) == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("scores", "targets", "message"),
    [
        (np.zeros((2, 2)), np.zeros((2, 3)), "equal shape"),
        (np.zeros(3), np.zeros(3), "2-D"),
        (np.array([[nan], [0.0]]), np.array([[1], [0]]), "nan or inf"),
        (np.zeros((2, 1)), np.array([[2], [0]]), "0/1"),
        (np.zeros((2, 1)), np.zeros((2, 1)), "no class has a positive"),
    ],
)
def test_map_rejects_bad_input(scores, targets, message):
    with pytest.raises(ValueError, match=message):
        mean_average_precision(scores, targets)
