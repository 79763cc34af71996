"""Final pseudo-label step: refined per-pixel probabilities over the classes
present in an image -> a class-index mask with 255 where the refinement is not confident.

Refined maps carry only the image's own classes: channel c stands for class `channels[c]`
(channel 0 is background = class 0, then the image's labels).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import Field

from wsss.imageio import IGNORE_INDEX
from wsss.params import Params

# Added to every score so all-zero pixels become uniform rather than 0/0; negligible next to
# CAM / random-walk scores, which are O(1) where a class is present.
SCORE_EPSILON = 1e-5


class PseudoLabelParams(Params):
    """How refined probabilities become a mask."""

    # Default 0.0 = off: the reference pipelines (PSA, IRN) take the plain argmax after the CRF
    # and report their mIoU that way. A threshold trades coverage for precision, and which value
    # is useful depends on how peaked the CRF output is (iterations, compat) and on the number of
    # channels (with 2 channels the max is always >= 0.5), so it is opted into per run.
    confidence_threshold: float = Field(
        0.0,
        ge=0,
        le=1,
        description="pixels whose highest probability is below this become 255 (ignore)",
    )


def normalize_scores(scores: np.ndarray) -> np.ndarray:
    """Non-negative per-class scores (C, H, W) -> per-pixel probabilities (C, H, W) float32.

    p_c = (s_c + eps) / sum_k (s_k + eps) with eps = SCORE_EPSILON: a distribution at every
    pixel, uniform where all scores are zero. This is the one way CAM and random-walk outputs
    (with their background channel) become the CRF unary's probabilities.
    """
    scores = np.asarray(scores)
    if scores.ndim != 3 or scores.shape[0] < 1:
        raise ValueError(f"scores must have shape (C, H, W) with C >= 1, got {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    if scores.min() < 0:
        raise ValueError(f"scores must be non-negative, got minimum {scores.min()}")
    shifted = scores.astype(np.float32) + np.float32(SCORE_EPSILON)
    return shifted / shifted.sum(axis=0, keepdims=True)


def finalize(
    probs: np.ndarray, channels: Sequence[int], params: PseudoLabelParams
) -> tuple[np.ndarray, float, float]:
    """Per-pixel probabilities (C, H, W) -> (mask, confidence, ignore_fraction).

    mask: uint8 (H, W), class `channels[argmax_c probs]`, or 255 where max_c probs is below
    `params.confidence_threshold`.
    confidence: mean over the non-ignored pixels of max_c probs (0.0 when every pixel is ignored).
    ignore_fraction: fraction of pixels set to 255.
    """
    probs = np.asarray(probs)
    if probs.ndim != 3 or min(probs.shape) < 1:
        raise ValueError(f"probs must have shape (C, H, W), all >= 1, got {probs.shape}")
    if not np.isfinite(probs).all():
        raise ValueError("probs contain NaN or infinity")
    channels = [int(c) for c in channels]
    if len(channels) != probs.shape[0]:
        raise ValueError(
            f"channels has {len(channels)} entries but probs has {probs.shape[0]} channels"
        )
    for c, cls in enumerate(channels):
        if not 0 <= cls < IGNORE_INDEX:
            raise ValueError(
                f"channels[{c}] = {cls} is not a class index in [0, {IGNORE_INDEX - 1}]"
            )
    if len(set(channels)) != len(channels):
        raise ValueError(f"channels must be distinct, got {channels}")

    best = probs.argmax(axis=0)
    best_prob = np.take_along_axis(probs, best[None], axis=0)[0]
    mask = np.asarray(channels, dtype=np.uint8)[best]
    ignored = best_prob < params.confidence_threshold
    mask[ignored] = IGNORE_INDEX
    kept = best_prob[~ignored]
    confidence = float(kept.mean()) if kept.size else 0.0
    return mask, confidence, float(ignored.mean())
