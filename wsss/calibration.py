"""Calibration on a few pixel-labelled images: how well given refinement settings do on them.

A user with a few dozen masked images can pick the settings that the label-free defaults only
guess (the CAM stage's background, the walk's beta, length and background). The networks and
their outputs (CAMs; what each refiner prepares, e.g. the affinities) do not depend on those
settings, so they are computed once per image (`CalibrationImage`) and every candidate only
reruns the refiners and the scoring.
The affinity labels' thresholds are not among them: each value would need AffinityNet trained
anew. The search itself (Ray Tune) is the pipelines' business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsss import labeling
from wsss.cam import CONSTANT_BACKGROUNDS, BackgroundParams
from wsss.metrics import ConfusionMatrix


@dataclass(frozen=True)
class CalibrationImage:
    image: np.ndarray  # uint8 (H, W, 3)
    labels: tuple[int, ...]  # class indices 1..K
    mask: np.ndarray  # ground truth (H, W), 255 = ignore
    cams_fg: np.ndarray  # (K, H, W) CAMs of the image's classes
    prepared: dict[str, Any]  # each refiner's `prepare(image)` by name (`Labeler.prepare`)


def best_cam_background(
    images: Sequence[CalibrationImage], n_classes: int
) -> tuple[BackgroundParams, float, dict[str, float]]:
    """The CAM-stage background with the highest mIoU of the CAM masks over `images`: Otsu's
    or one of `wsss.cam.CONSTANT_BACKGROUNDS`. Returns it, its mIoU and every candidate's mIoU
    by name."""
    candidates = {"otsu": BackgroundParams(method="otsu")}
    candidates.update({str(t): background for t, background in CONSTANT_BACKGROUNDS.items()})
    scores = {}
    for name, background in candidates.items():
        matrix = ConfusionMatrix(n_classes)
        for item in images:
            matrix.update(labeling.cam_mask(item.cams_fg, background), item.mask)
        scores[name] = float(np.nan_to_num(matrix.miou(), nan=0.0))
    best = max(scores, key=scores.__getitem__)
    return candidates[best], scores[best], scores


def refinement_miou(
    images: Sequence[CalibrationImage], n_classes: int, labeler: labeling.Labeler
) -> dict[str, float]:
    """mIoU over `images` of each refiner's masks and of the final pseudo-labels with the
    settings of `labeler`, from the stored CAMs and prepared inputs: {stage: ..., "final": ...}."""
    stages = labeler.stages[1:]
    matrices = {name: ConfusionMatrix(n_classes) for name in (*stages, "final")}
    for item in images:
        out = labeler.finish(
            item.image,
            labeler.seed(item.image, item.labels, item.cams_fg, item.prepared),
            item.prepared,
        )
        for stage in stages:
            matrices[stage].update(out.masks[stage], item.mask)
        matrices["final"].update(out.mask, item.mask)
    return {name: float(np.nan_to_num(m.miou(), nan=0.0)) for name, m in matrices.items()}
