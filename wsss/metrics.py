"""Segmentation metrics from a mergeable confusion matrix, and multilabel mAP for classifiers."""

from __future__ import annotations

import numpy as np

from wsss.imageio import IGNORE_INDEX


class ConfusionMatrix:
    """Pixel counts `counts[gt, pred]` over `n_classes` classes plus one "abstained" column.

    Pixels whose ground truth is 255 are not counted. A prediction of 255 (an uncertain
    pseudo-label pixel) where the ground truth is a class counts in the last column: a false
    negative for that class (it lowers its recall and IoU) but a false positive for no class, so
    precision is measured on the pixels the prediction committed to.
    """

    def __init__(self, n_classes: int, counts: np.ndarray | None = None):
        if n_classes < 1 or n_classes > IGNORE_INDEX:
            raise ValueError(f"n_classes must be in 1..{IGNORE_INDEX}, got {n_classes}")
        self.n_classes = n_classes
        shape = (n_classes, n_classes + 1)
        if counts is None:
            counts = np.zeros(shape, dtype=np.int64)
        counts = np.asarray(counts)
        if counts.shape != shape:
            raise ValueError(f"counts must have shape {shape}, got {counts.shape}")
        if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
            raise ValueError("counts must be non-negative integers")
        self.counts = counts.astype(np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> ConfusionMatrix:
        """Add one prediction/ground-truth pair of equal shape; returns self."""
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:
            raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}")
        for name, values in (("pred", pred), ("gt", gt)):
            if not np.issubdtype(values.dtype, np.integer):
                raise ValueError(f"{name} must have an integer dtype, got {values.dtype}")
        n = self.n_classes
        valid = gt != IGNORE_INDEX
        gt, pred = gt[valid].astype(np.int64), pred[valid].astype(np.int64)
        bad_gt = np.unique(gt[(gt < 0) | (gt >= n)])
        if bad_gt.size:
            raise ValueError(
                f"gt has values {bad_gt.tolist()} outside 0..{n - 1} and {IGNORE_INDEX}"
            )
        abstained = pred == IGNORE_INDEX
        bad_pred = np.unique(pred[((pred < 0) | (pred >= n)) & ~abstained])
        if bad_pred.size:
            raise ValueError(
                f"pred has values {bad_pred.tolist()} outside 0..{n - 1} and {IGNORE_INDEX}"
            )
        column = np.where(abstained, n, pred)
        self.counts += np.bincount(gt * (n + 1) + column, minlength=n * (n + 1)).reshape(n, n + 1)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """A new matrix holding the counts of both."""
        if other.n_classes != self.n_classes:
            raise ValueError(f"cannot merge {other.n_classes} classes into {self.n_classes}")
        return ConfusionMatrix(self.n_classes, self.counts + other.counts)

    __add__ = merge

    def to_dict(self) -> dict:
        """JSON-safe form for sending partial results between processes."""
        return {"n_classes": self.n_classes, "counts": self.counts.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> ConfusionMatrix:
        return cls(int(data["n_classes"]), np.asarray(data["counts"], dtype=np.int64))

    @property
    def total(self) -> int:
        """Ground-truth pixels counted (ignore pixels excluded, abstained predictions included)."""
        return int(self.counts.sum())

    def _true_positives(self) -> np.ndarray:
        return np.diag(self.counts[:, : self.n_classes]).astype(np.float64)

    def _gt_totals(self) -> np.ndarray:
        return self.counts.sum(axis=1).astype(np.float64)

    def _pred_totals(self) -> np.ndarray:
        return self.counts[:, : self.n_classes].sum(axis=0).astype(np.float64)

    def iou(self) -> np.ndarray:
        """Per-class intersection over union; nan where the class is in neither gt nor pred."""
        tp = self._true_positives()
        return _ratio(tp, self._gt_totals() + self._pred_totals() - tp)

    def miou(self) -> float:
        """Mean IoU over the classes with a defined IoU (nan if none)."""
        return _nanmean(self.iou())

    def precision(self) -> np.ndarray:
        """Per class: correct / predicted as that class; nan where never predicted."""
        return _ratio(self._true_positives(), self._pred_totals())

    def recall(self) -> np.ndarray:
        """Per class: correct / ground-truth pixels of that class; nan where absent."""
        return _ratio(self._true_positives(), self._gt_totals())

    def pixel_accuracy(self) -> float:
        """Correct pixels / counted pixels (abstained pixels count as wrong); nan if none."""
        total = self.total
        return float(self._true_positives().sum() / total) if total else float("nan")


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes (columns) with at least one positive of the average precision.

    AP is the step-wise area under the precision-recall curve, sum_k (R_k - R_{k-1}) P_k, with
    one point per distinct score (tied scores enter together), as in scikit-learn's
    `average_precision_score`.
    """
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(
            f"scores and targets must be 2-D (N, K) of equal shape, got {scores.shape} and "
            f"{targets.shape}"
        )
    if not np.isfinite(scores).all():
        raise ValueError("scores contain nan or inf")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("targets must be 0/1")
    positive_classes = np.flatnonzero(targets.sum(axis=0) > 0)
    if positive_classes.size == 0:
        raise ValueError("no class has a positive target; mAP is undefined")
    return float(
        np.mean([_average_precision(scores[:, k], targets[:, k]) for k in positive_classes])
    )


def _average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    order = np.argsort(-scores, kind="stable")
    scores, hits = scores[order], targets[order].astype(np.float64)
    # The last index of each run of equal scores is one threshold of the curve.
    last_of_run = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tp = np.cumsum(hits)[last_of_run]
    precision = tp / (last_of_run + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")
