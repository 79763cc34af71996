"""The dense CRF as a refiner (PSA): the scores, as probabilities, sharpened along the image's
colour edges (`wsss.crf.dense_crf`) at full resolution."""

from __future__ import annotations

from typing import Any

import numpy as np

from wsss.crf import CrfParams, dense_crf
from wsss.refiners.base import Refiner, Scores, register


@register
class DenseCrf(Refiner):
    name = "crf"
    params_type = CrfParams

    def refine(self, image: np.ndarray, scores: Scores, prepared: Any = None) -> Scores:
        probs = scores.full_probabilities(image.shape[:2])
        return Scores(scores.channels, dense_crf(image, probs, self.params), probabilities=True)
