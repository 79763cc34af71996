import numpy as np
import pydantic
import pytest

import wsss.crf
from wsss.crf import CrfParams, dense_crf

HEIGHT, WIDTH, EDGE = 48, 64, 32  # colour edge between columns EDGE - 1 and EDGE


def two_colour_image(seed: int = 0) -> np.ndarray:
    """Left half reddish, right half bluish, with mild pixel noise."""
    rng = np.random.default_rng(seed)
    image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.float64)
    image[:, :EDGE] = (200, 60, 40)
    image[:, EDGE:] = (40, 90, 190)
    return np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def ramp_probs(crossing: float, width_px: float = 3.0) -> np.ndarray:
    """(2, H, W) soft background/foreground ramp whose 0.5 level lies at column `crossing`."""
    x = np.arange(WIDTH, dtype=np.float64)
    fg = 1.0 / (1.0 + np.exp(-(x - crossing) / width_px))
    fg = np.broadcast_to(fg, (HEIGHT, WIDTH))
    return np.stack([1.0 - fg, fg]).astype(np.float32)


def first_foreground_column(labels: np.ndarray) -> np.ndarray:
    """Per row, the first column labelled 1 (labels are a left-0 / right-1 split)."""
    return (labels == 1).argmax(axis=1)


def split_iou(labels: np.ndarray) -> float:
    """Mean IoU over both classes against the true split at EDGE."""
    truth = np.zeros((HEIGHT, WIDTH), dtype=np.int64)
    truth[:, EDGE:] = 1
    ious = [
        ((labels == c) & (truth == c)).sum() / ((labels == c) | (truth == c)).sum() for c in (0, 1)
    ]
    return float(np.mean(ious))


@pytest.mark.parametrize("offset", [6.5, -6.5])
def test_crf_moves_blurred_boundary_onto_colour_edge(offset):
    image = two_colour_image()
    probs = ramp_probs(EDGE + offset)
    before = probs.argmax(axis=0)
    # The input boundary is ~6 px away from the colour edge.
    assert np.all(np.abs(first_foreground_column(before) - EDGE) >= 6)

    after = dense_crf(image, probs, CrfParams()).argmax(axis=0)

    assert np.all(np.abs(first_foreground_column(after) - EDGE) <= 1)
    # The whole region, not just the first fg column, matches the true split.
    assert split_iou(after) > 0.95
    assert split_iou(after) - split_iou(before) > 0.1


def test_bilateral_term_is_what_snaps_to_the_edge():
    image = two_colour_image()
    probs = ramp_probs(EDGE + 6.5)
    after = dense_crf(image, probs, CrfParams(bilateral_compat=0.0)).argmax(axis=0)
    # Position-only smoothing of a symmetric ramp leaves the crossing where it was.
    assert np.all(np.abs(first_foreground_column(after) - EDGE) >= 5)


def test_output_is_a_distribution_per_pixel():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    probs = rng.random((5, HEIGHT, WIDTH))
    probs /= probs.sum(axis=0)
    out = dense_crf(image, probs, CrfParams())
    assert out.shape == (5, HEIGHT, WIDTH)
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-5)


def test_single_channel_returns_ones_without_calling_the_library(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("DenseCRF2D must not be constructed for a single channel")

    monkeypatch.setattr(wsss.crf.dcrf, "DenseCRF2D", fail)
    out = dense_crf(two_colour_image(), np.full((1, HEIGHT, WIDTH), 0.3), CrfParams())
    assert out.shape == (1, HEIGHT, WIDTH)
    assert out.dtype == np.float32
    assert np.all(out == 1.0)


def test_zero_iterations_returns_the_clipped_normalised_input():
    probs = ramp_probs(EDGE + 6.5)
    probs[:, :, :3] = np.array([1.0, 0.0])[:, None, None]  # exact zeros get the floor
    floor = 1e-3
    out = dense_crf(two_colour_image(), probs, CrfParams(iterations=0, probability_floor=floor))
    clipped = np.maximum(probs, floor)
    np.testing.assert_allclose(out, clipped / clipped.sum(axis=0), rtol=1e-5, atol=1e-7)


def test_negligible_pairwise_weights_keep_the_input_argmax():
    probs = ramp_probs(EDGE + 6.5)
    params = CrfParams(gaussian_compat=1e-3, bilateral_compat=1e-3, iterations=10)
    out = dense_crf(two_colour_image(), probs, params)
    np.testing.assert_array_equal(out.argmax(axis=0), probs.argmax(axis=0))


def test_more_iterations_sharpen_the_marginals():
    probs = ramp_probs(EDGE + 6.5)
    image = two_colour_image()
    one = dense_crf(image, probs, CrfParams(iterations=1)).max(axis=0).mean()
    ten = dense_crf(image, probs, CrfParams(iterations=10)).max(axis=0).mean()
    assert ten > one > probs.max(axis=0).mean()


def test_non_contiguous_image_and_float64_probs_work():
    image = two_colour_image()
    flipped_view = image[:, ::-1]  # negative stride: not C-contiguous
    assert not flipped_view.flags.c_contiguous
    probs = ramp_probs(EDGE - 6.5)[:, :, ::-1].astype(np.float64)
    out = dense_crf(flipped_view, probs, CrfParams())
    expected = dense_crf(np.ascontiguousarray(flipped_view), probs.astype(np.float32), CrfParams())
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # Mirrored geometry: the boundary is at the mirrored colour edge.
    labels = out.argmax(axis=0)
    assert np.all(np.abs((labels == 0).argmax(axis=1) - (WIDTH - EDGE)) <= 1)


def test_probs_in_another_memory_order_give_the_same_marginals():
    # e.g. a (H, W, C) array transposed to (C, H, W) without a copy, as torch's permute gives
    image = two_colour_image()
    probs = ramp_probs(EDGE - 6.5)
    channels_last = np.ascontiguousarray(probs.transpose(1, 2, 0)).transpose(2, 0, 1)
    assert not channels_last.flags.c_contiguous
    np.testing.assert_allclose(
        dense_crf(image, channels_last, CrfParams()), dense_crf(image, probs, CrfParams())
    )


@pytest.mark.parametrize(
    ("image", "probs", "error", "message"),
    [
        (np.zeros((8, 8), np.uint8), np.ones((2, 8, 8)), ValueError, "image must have shape"),
        (np.zeros((8, 8, 4), np.uint8), np.ones((2, 8, 8)), ValueError, "image must have shape"),
        (np.zeros((8, 8, 3), np.float32), np.ones((2, 8, 8)), TypeError, "image must be uint8"),
        (np.zeros((8, 8, 3), np.uint8), np.ones((8, 8)), ValueError, "probs must have shape"),
        (np.zeros((8, 8, 3), np.uint8), np.ones((0, 8, 8)), ValueError, "C, H, W >= 1"),
        (np.zeros((8, 8, 3), np.uint8), np.ones((2, 8, 9)), ValueError, "does not match image"),
        (np.zeros((8, 8, 3), np.uint8), np.ones((2, 8, 8), np.int64), TypeError, "float array"),
        (np.zeros((8, 8, 3), np.uint8), np.full((2, 8, 8), np.nan), ValueError, "NaN"),
        (np.zeros((8, 8, 3), np.uint8), np.full((2, 8, 8), -0.5), ValueError, "non-negative"),
    ],
)
def test_bad_inputs_raise_clear_errors(image, probs, error, message):
    with pytest.raises(error, match=message):
        dense_crf(image, probs, CrfParams())


@pytest.mark.parametrize(
    "field, value",
    [
        ("gaussian_sxy", 0.0),
        ("bilateral_srgb", -1.0),
        ("bilateral_compat", -0.1),
        ("iterations", -1),
        ("probability_floor", 0.0),
        ("probability_floor", 1.0),
    ],
)
def test_params_bounds_are_enforced(field, value):
    with pytest.raises(pydantic.ValidationError, match=field):
        CrfParams(**{field: value})


def test_params_defaults_are_psa_and_unknown_fields_are_rejected():
    params = CrfParams()
    assert (params.gaussian_sxy, params.gaussian_compat) == (3, 3)
    assert (params.bilateral_sxy, params.bilateral_srgb, params.bilateral_compat) == (80, 13, 10)
    assert params.iterations == 10
    with pytest.raises(pydantic.ValidationError, match="bilateral_rgb"):
        CrfParams(bilateral_rgb=13)


def test_read_only_image_is_accepted():
    image = np.zeros((8, 10, 3), np.uint8)
    image[:, 5:] = 200
    image.setflags(write=False)  # as np.asarray(PIL image) gives
    probs = np.full((2, 8, 10), 0.5, np.float32)
    out = dense_crf(image, probs, CrfParams(iterations=2))
    assert out.shape == (2, 8, 10)


def test_a_class_the_crf_removes_keeps_its_input_scores_and_a_shrunk_one_does_not():
    before = np.zeros((4, 6, 6), np.float32)
    before[0] = 0.5
    before[1, :, :3] = 0.9  # class 1: the left half
    before[2, 0, 5] = 0.8  # class 2: one pixel
    before[3, 5, 5] = 0.7  # class 3: one pixel
    after = np.zeros_like(before)
    after[0] = 1.0  # the CRF leaves background everywhere but ...
    after[0, :, :2], after[1, :, :2] = 0.0, 1.0  # ... class 1 shrunk to two columns
    after[0, 5, 5], after[3, 5, 5] = 0.0, 1.0  # ... and class 3 where it was
    kept = wsss.crf.keep_removed_classes(before, after)
    # Class 2 was removed: its pixel takes its input scores back; nothing else changes.
    np.testing.assert_array_equal(kept[:, 0, 5], before[:, 0, 5])
    changed = np.zeros((6, 6), bool)
    changed[0, 5] = True
    np.testing.assert_array_equal(kept[:, ~changed], after[:, ~changed])
    assert kept.argmax(axis=0)[0, 5] == 2 and (kept.argmax(axis=0)[:, :3] == 1).sum() == 12


def test_the_crf_refiner_does_not_remove_a_labelled_class_unless_told():
    from wsss.refiners import Scores, build_refiners
    from wsss.refiners.crf import CrfRefinerParams

    image = two_colour_image()
    probs = ramp_probs(EDGE)
    # A small, weak third class inside the red half: the smoothing takes it over.
    small = np.zeros((1, HEIGHT, WIDTH), np.float32)
    small[0, 20:24, 10:14] = 0.6
    probs = np.concatenate([probs * (1 - small), small])
    scores = Scores((0, 1, 2), probs, probabilities=True)
    removed = dense_crf(image, probs, CrfParams()).argmax(axis=0)
    assert not (removed == 2).any()  # the plain CRF removes it
    (off,) = build_refiners([("crf", CrfRefinerParams(keep_classes=False))])
    assert not (off.refine(image, scores).mask(image.shape[:2]) == 2).any()
    (kept,) = build_refiners([("crf", CrfRefinerParams())])
    mask = kept.refine(image, scores).mask(image.shape[:2])
    np.testing.assert_array_equal(mask == 2, probs.argmax(axis=0) == 2)
    assert split_iou(np.where(mask == 2, 0, mask)) > 0.95  # the rest is the CRF's


def test_the_crf_refiner_divides_its_pairwise_weights_by_the_image_classes():
    from wsss.refiners import Scores, build_refiners
    from wsss.refiners.crf import CrfRefinerParams

    image = two_colour_image()
    probs = ramp_probs(EDGE + 6.5)
    (divided,) = build_refiners([("crf", CrfRefinerParams(keep_classes=False))])
    # One class: PSA's weights.
    one = divided.refine(image, Scores((0, 1), probs, probabilities=True)).values
    np.testing.assert_allclose(one, dense_crf(image, probs, CrfParams()), atol=1e-6)
    # Three classes (two of them with no score here): a third of each weight.
    three = np.concatenate([probs, np.zeros((2, HEIGHT, WIDTH), np.float32)])
    refined = divided.refine(image, Scores((0, 1, 4, 7), three, probabilities=True)).values
    third = CrfParams(gaussian_compat=1.0, bilateral_compat=10 / 3)
    np.testing.assert_allclose(refined, dense_crf(image, three, third), atol=1e-6)
    assert not np.allclose(refined, dense_crf(image, three, CrfParams()), atol=1e-3)
    # Off: the same weights for every image.
    (same,) = build_refiners(
        [("crf", CrfRefinerParams(keep_classes=False, divide_by_classes=False))]
    )
    plain = same.refine(image, Scores((0, 1, 4, 7), three, probabilities=True)).values
    np.testing.assert_allclose(plain, dense_crf(image, three, CrfParams()), atol=1e-6)
    with pytest.raises(ValueError, match="n_classes"):
        wsss.crf.pairwise_per_class(CrfParams(), 0)
