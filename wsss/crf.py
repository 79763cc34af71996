"""Dense CRF refinement: fully connected CRF with Gaussian and bilateral
pairwise terms (Krähenbühl & Koltun 2011) through `pydensecrf`, with the PSA parameters.

A thin wrapper: it validates and lays out the inputs the way the C++ library needs them and
otherwise calls the library exactly as one would inline (bench/crf.py measures the overhead).
"""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydantic import Field

from wsss.params import Params


class CrfParams(Params):
    """Mean-field dense CRF parameters; defaults are those of PSA (Ahn & Kwak 2018)."""

    gaussian_sxy: float = Field(3.0, gt=0, description="spatial std (px) of the smoothness kernel")
    gaussian_compat: float = Field(3.0, ge=0, description="weight of the smoothness kernel")
    bilateral_sxy: float = Field(
        80.0, gt=0, description="spatial std (px) of the appearance kernel"
    )
    bilateral_srgb: float = Field(13.0, gt=0, description="colour std of the appearance kernel")
    bilateral_compat: float = Field(10.0, ge=0, description="weight of the appearance kernel")
    iterations: int = Field(10, ge=0, le=1000, description="mean-field steps; 0 = unary only")
    probability_floor: float = Field(
        1e-5,
        gt=0,
        lt=1,
        description="probabilities are clipped to at least this before -log, so a zero "
        "probability gives a large finite unary instead of infinity",
    )


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CrfParams) -> np.ndarray:
    """Refine per-pixel class probabilities `probs` (C, H, W) on RGB `image` (H, W, 3) uint8.

    Returns float32 (C, H, W) marginals after `params.iterations` mean-field steps; each pixel's
    column sums to 1. The unary is -log(max(probs, probability_floor)). With a single channel
    there is nothing to decide and ones are returned without running the CRF.
    """
    image = np.asarray(image)
    probs = np.asarray(probs)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got {image.dtype}")
    if probs.ndim != 3:
        raise ValueError(f"probs must have shape (C, H, W), got {probs.shape}")
    n_labels, height, width = probs.shape
    if min(probs.shape) < 1:
        raise ValueError(f"probs must have C, H, W >= 1, got shape {probs.shape}")
    if (height, width) != image.shape[:2]:
        raise ValueError(
            f"probs spatial shape {(height, width)} does not match image {image.shape[:2]}"
        )
    if not np.issubdtype(probs.dtype, np.floating):
        raise TypeError(f"probs must be a float array, got {probs.dtype}")
    if n_labels == 1:
        return np.ones((1, height, width), dtype=np.float32)

    # The C++ side takes float32 (C, N) unaries and a C-contiguous, writable uint8 image buffer
    # (Cython rejects read-only views such as np.asarray of a PIL image).
    unary = np.maximum(
        probs.reshape(n_labels, -1), params.probability_floor, dtype=np.float32, order="C"
    )
    np.log(unary, out=unary)
    np.negative(unary, out=unary)
    if not np.isfinite(unary.sum()):
        raise ValueError("probs contain NaN or infinity")
    if probs.min() < 0:
        raise ValueError(f"probs must be non-negative, got minimum {probs.min()}")
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.require(image, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"]),
        compat=params.bilateral_compat,
    )
    marginals = np.asarray(crf.inference(params.iterations), dtype=np.float32)
    return marginals.reshape(n_labels, height, width)


def pairwise_per_class(params: CrfParams, n_classes: int) -> CrfParams:
    """`params` with both pairwise weights divided by `n_classes`, the number of foreground
    classes an image is labelled with: PSA's weights, set for images of one class or two, at
    full strength on an image of one class. Where an image's classes share one region (six
    garments on one person) each class's part is small next to the smoothing kernels, and at
    full strength the CRF erases the small ones or gives them to the background. Measured on
    the same networks' walk: CCP's photos (3-8 labels) 17.5 -> 18.4, the synthetic set (1-3
    labels) 66.7 -> 66.9; a constant weight served neither (0.25: 17.0 and 65.9; 0.5: 17.6 and
    66.6; docs/benchmarks.md)."""
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    return params.model_copy(
        update={
            "gaussian_compat": params.gaussian_compat / n_classes,
            "bilateral_compat": params.bilateral_compat / n_classes,
        }
    )


def keep_removed_classes(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Marginals `after` (C, H, W) of a CRF on `before` (C, H, W), channel 0 the background,
    with the scores of `before` given back to the pixels of each other channel that was best
    at some pixel before and is best at none after. An image's labels say each of its classes
    is in it: smoothing may shrink a class the walk found, but not remove it. On CCP's photos
    of six garments the CRF removed the small ones (final 14.3 against the walk's 19.0; 17.8
    with this rule), while on the synthetic set it changes little (66.3 -> 66.7;
    docs/benchmarks.md)."""
    best_before, best_after = before.argmax(axis=0), after.argmax(axis=0)
    out = after.copy()
    for channel in range(1, before.shape[0]):
        found = best_before == channel
        if found.any() and not (best_after == channel).any():
            out[:, found] = before[:, found]
    return out
