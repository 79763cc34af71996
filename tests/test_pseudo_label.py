import numpy as np
import pydantic
import pytest

from wsss.pseudo_label import SCORE_EPSILON, PseudoLabelParams, finalize, normalize_scores

# 3 channels over a 2 x 3 image; per-pixel max probabilities are
#   [[0.7, 0.5, 0.9],
#    [0.4, 0.6, 0.34]]
# and the winning channels are
#   [[0, 1, 2],
#    [1, 2, 0]]
PROBS = np.array(
    [
        [[0.7, 0.3, 0.05], [0.3, 0.2, 0.34]],
        [[0.2, 0.5, 0.05], [0.4, 0.2, 0.33]],
        [[0.1, 0.2, 0.90], [0.3, 0.6, 0.33]],
    ],
    dtype=np.float32,
)
CHANNELS = [0, 15, 7]  # background, then the image's labels (class indices 15 and 7)


def test_argmax_maps_channels_to_class_indices_without_threshold():
    mask, confidence, ignore_fraction = finalize(PROBS, CHANNELS, PseudoLabelParams())
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, [[0, 15, 7], [15, 7, 0]])
    assert confidence == pytest.approx((0.7 + 0.5 + 0.9 + 0.4 + 0.6 + 0.34) / 6)
    assert ignore_fraction == 0.0


def test_threshold_sets_unconfident_pixels_to_ignore():
    params = PseudoLabelParams(confidence_threshold=0.5)
    mask, confidence, ignore_fraction = finalize(PROBS, CHANNELS, params)
    # 0.4 and 0.34 are below 0.5; 0.5 itself is kept (strictly below is ignored).
    np.testing.assert_array_equal(mask, [[0, 15, 7], [255, 7, 255]])
    assert confidence == pytest.approx((0.7 + 0.5 + 0.9 + 0.6) / 4)
    assert ignore_fraction == pytest.approx(2 / 6)


def test_everything_ignored_gives_zero_confidence():
    params = PseudoLabelParams(confidence_threshold=0.95)
    mask, confidence, ignore_fraction = finalize(PROBS, CHANNELS, params)
    assert np.all(mask == 255)
    assert confidence == 0.0
    assert ignore_fraction == 1.0


def test_default_threshold_is_off():
    assert PseudoLabelParams().confidence_threshold == 0.0


@pytest.mark.parametrize(
    ("probs", "channels", "message"),
    [
        (PROBS[0], CHANNELS, "probs must have shape"),
        (PROBS, [0, 15], "channels has 2 entries but probs has 3"),
        (PROBS, [0, 15, 255], r"channels\[2\] = 255"),
        (PROBS, [0, -1, 7], r"channels\[1\] = -1"),
        (PROBS, [0, 7, 7], "distinct"),
        (np.full((3, 2, 3), np.nan), CHANNELS, "NaN"),
    ],
)
def test_finalize_rejects_bad_input(probs, channels, message):
    with pytest.raises(ValueError, match=message):
        finalize(probs, channels, PseudoLabelParams())


@pytest.mark.parametrize("value", [-0.1, 1.1])
def test_threshold_bounds(value):
    with pytest.raises(pydantic.ValidationError, match="confidence_threshold"):
        PseudoLabelParams(confidence_threshold=value)


def test_normalize_scores_sums_to_one_with_epsilon():
    scores = np.array(
        [
            [[0.0, 2.0]],
            [[0.0, 1.0]],
            [[0.0, 1.0]],
        ]
    )  # (3, 1, 2): an all-zero pixel and a (2, 1, 1) pixel
    probs = normalize_scores(scores)
    assert probs.shape == (3, 1, 2)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs[:, 0, 0], [1 / 3, 1 / 3, 1 / 3], rtol=1e-6)
    eps = SCORE_EPSILON
    expected = np.array([2 + eps, 1 + eps, 1 + eps]) / (4 + 3 * eps)
    np.testing.assert_allclose(probs[:, 0, 1], expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        (np.ones((4, 4)), "scores must have shape"),
        (np.full((2, 2, 2), -0.1), "non-negative"),
        (np.full((2, 2, 2), np.inf), "NaN or infinity"),
    ],
)
def test_normalize_scores_rejects_bad_input(scores, message):
    with pytest.raises(ValueError, match=message):
        normalize_scores(scores)
