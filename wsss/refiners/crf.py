"""The dense CRF as a refiner (PSA): the scores, as probabilities, sharpened along the image's
colour edges (`wsss.crf.dense_crf`) at full resolution, with pairwise weights divided by the
image's number of classes (`wsss.crf.pairwise_per_class`, unless crf.divide_by_classes is off),
without removing a class its input had (`wsss.crf.keep_removed_classes`, unless
crf.keep_classes is off)."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from wsss.crf import CrfParams, dense_crf, keep_removed_classes, pairwise_per_class
from wsss.refiners.base import Refiner, Scores, register


class CrfRefinerParams(CrfParams):
    """The CRF's settings (PSA's), whether its pairwise weights depend on the image's number of
    classes, and whether it may remove a class its input had."""

    divide_by_classes: bool = Field(
        True,
        description="the pairwise weights (gaussian_compat, bilateral_compat) are divided by "
        "the number of foreground classes the image is labelled with "
        "(`wsss.crf.pairwise_per_class`); false: the same weights for every image",
    )

    keep_classes: bool = Field(
        True,
        description="where the CRF removed a foreground class that its input had (best at no "
        "pixel after, best at some before), those pixels keep their input scores "
        "(`wsss.crf.keep_removed_classes`)",
    )


@register
class DenseCrf(Refiner):
    name = "crf"
    params_type = CrfRefinerParams

    def refine(self, image: np.ndarray, scores: Scores, prepared: Any = None) -> Scores:
        probs = scores.full_probabilities(image.shape[:2])
        params = self.params
        if params.divide_by_classes:
            params = pairwise_per_class(params, max(len(scores.channels) - 1, 1))
        refined = dense_crf(image, probs, params)
        if self.params.keep_classes:
            refined = keep_removed_classes(probs, refined)
        return Scores(scores.channels, refined, probabilities=True)
