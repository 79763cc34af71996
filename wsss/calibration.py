"""Calibration on a few pixel-labelled images: how well given refinement settings do on them.

A user with a few dozen masked images can pick the settings that the label-free defaults only
guess (the CAM stage's background, the walk's beta, length and background). The networks and
their outputs (CAMs, affinities) do not depend on those settings, so they are computed once per
image (`CalibrationImage`) and every candidate only reruns the walk, the CRF and the scoring.
The affinity labels' thresholds are not among them: each value would need AffinityNet trained
anew. The search itself (Ray Tune) is the pipelines' business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from wsss import labeling
from wsss.affinity import AffinityNet
from wsss.cam import CONSTANT_BACKGROUNDS, BackgroundParams, CamParams
from wsss.crf import CrfParams
from wsss.metrics import ConfusionMatrix
from wsss.pseudo_label import PseudoLabelParams
from wsss.random_walk import RandomWalkParams


@dataclass(frozen=True)
class CalibrationImage:
    image: np.ndarray  # uint8 (H, W, 3)
    labels: tuple[int, ...]  # class indices 1..K
    mask: np.ndarray  # ground truth (H, W), 255 = ignore
    cams_fg: np.ndarray  # (K, H, W) CAMs of the image's classes
    affinity: torch.Tensor  # (P, h, w) AffinityNet's affinities


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
    images: Sequence[CalibrationImage],
    n_classes: int,
    affinity_net: AffinityNet,
    cam_params: CamParams,
    walk_params: RandomWalkParams,
    crf_params: CrfParams,
    pl_params: PseudoLabelParams,
) -> dict[str, float]:
    """mIoU of the random walk's and the final (CRF) masks over `images` with these settings,
    from their stored CAMs and affinities: {"random_walk": ..., "final": ...}."""
    walk_matrix, final_matrix = ConfusionMatrix(n_classes), ConfusionMatrix(n_classes)
    for item in images:
        walked = labeling.walk(
            item.image,
            item.labels,
            None,  # the CAMs are given: no classifier needed
            affinity_net,
            cam_params,
            walk_params,
            cams_fg=item.cams_fg,
            affinity=item.affinity,
        )
        out = labeling.finish(item.image, walked, crf_params, pl_params)
        walk_matrix.update(out.rw_mask, item.mask)
        final_matrix.update(out.mask, item.mask)
    return {
        "random_walk": float(np.nan_to_num(walk_matrix.miou(), nan=0.0)),
        "final": float(np.nan_to_num(final_matrix.miou(), nan=0.0)),
    }
