from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from wsss.cam import BackgroundParams, CamParams, add_background, compute_cams, compute_cams_batch
from wsss.classifier import Classifier, ClassifierParams
from wsss.transforms import normalize

torch.set_num_threads(1)
N_CLASSES = 3


@pytest.fixture(scope="module")
def model() -> Classifier:
    """Random resnet18 classifier whose class 1 and 2 maps are positive everywhere (relu'd
    features times a positive head) and whose class 3 map is never positive."""
    torch.manual_seed(0)
    model = Classifier(N_CLASSES, ClassifierParams(backbone={"name": "resnet18"})).eval()
    with torch.no_grad():
        model.head.weight.abs_()
        model.head.weight[2].neg_()
    return model


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (56, 72, 3), dtype=np.uint8)
    image[10:30, 5:40] = (250, 30, 30)  # a structure that is not mirror-symmetric
    return image


def test_single_scale_cam_is_normalised_upsampled_relu_of_score_maps(model, image):
    params = CamParams(scales=(1.0,), flip=False)
    cams = compute_cams(model, image, [1, 2], params)
    assert cams.dtype == np.float32 and cams.shape == (N_CLASSES, 56, 72)
    with torch.no_grad():
        maps = F.relu(model.score_maps(torch.from_numpy(normalize(image))[None]))
        maps = F.interpolate(maps, (56, 72), mode="bilinear", align_corners=False)[0]
    expected = maps / (maps.amax(dim=(1, 2), keepdim=True) + 1e-5)
    expected[2] = 0
    np.testing.assert_allclose(cams, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_cams_are_non_negative_peak_at_one_and_zero_for_unlabelled_classes(model, image):
    cams = compute_cams(model, image, [2], CamParams())
    assert cams.shape == (N_CLASSES, 56, 72)
    assert cams.min() >= 0
    assert cams[1].max() == pytest.approx(1.0, abs=1e-4)
    assert not cams[0].any() and not cams[2].any()  # class 1 is active but not labelled
    both = compute_cams(model, image, [1, 2, 3], CamParams())
    assert both[0].max() == pytest.approx(1.0, abs=1e-4)
    assert both[1].max() == pytest.approx(1.0, abs=1e-4)
    assert not both[2].any()  # labelled, but its map is never positive
    assert both[0].std() > 0.01  # a map, not a constant


def test_flip_equivariance(model, image):
    params = CamParams(scales=(1.0, 0.5, 1.5), flip=True)
    cams = compute_cams(model, image, [1, 2], params)
    cams_of_flipped = compute_cams(model, np.ascontiguousarray(image[:, ::-1]), [1, 2], params)
    np.testing.assert_allclose(cams_of_flipped, cams[:, :, ::-1], atol=1e-4)
    # Without flip-averaging the network itself is not equivariant, which makes the check real.
    no_flip = CamParams(scales=(1.0,), flip=False)
    a = compute_cams(model, image, [1, 2], no_flip)
    b = compute_cams(model, np.ascontiguousarray(image[:, ::-1]), [1, 2], no_flip)
    assert np.abs(b - a[:, :, ::-1]).max() > 1e-2


def test_output_size_and_batch_agree_with_single_images(model, image):
    params = CamParams(scales=(1.0, 0.5))
    small = compute_cams(model, image, [1], params, output_size=(14, 18))
    assert small.shape == (N_CLASSES, 14, 18)
    other = np.ascontiguousarray(np.rot90(image, 2))
    images = torch.from_numpy(np.stack([normalize(image), normalize(other)]))
    label_mask = torch.tensor([[True, False, False], [True, True, False]])
    batch = compute_cams_batch(model, images, label_mask, params, (14, 18))
    assert batch.shape == (2, N_CLASSES, 14, 18)
    np.testing.assert_allclose(batch[0].numpy(), small, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        batch[1].numpy(),
        compute_cams(model, other, [1, 2], params, output_size=(14, 18)),
        rtol=1e-4,
        atol=1e-5,
    )


def test_bad_inputs_raise(model, image):
    with pytest.raises(ValueError, match=r"label 4 is not a foreground class index in 1\.\.3"):
        compute_cams(model, image, [4], CamParams())
    with pytest.raises(ValueError, match="uint8"):
        compute_cams(model, image.astype(np.float32), [1], CamParams())
    with pytest.raises(ValueError, match="label_mask has 2 classes"):
        compute_cams_batch(
            model,
            torch.zeros(1, 3, 32, 32),
            torch.ones(1, 2, dtype=torch.bool),
            CamParams(),
            (8, 8),
        )
    with pytest.raises(ValidationError, match="scales must not be empty"):
        CamParams(scales=())
    with pytest.raises(ValidationError, match="positive"):
        CamParams(scales=(1.0, -0.5))


def test_add_background_threshold_and_power():
    cams = np.array(
        [[[0.0, 0.5], [1.0, 0.2]], [[0.1, 0.75], [0.0, 0.0]]], dtype=np.float32
    )  # (K=2, 2, 2)
    with_threshold = add_background(cams, BackgroundParams(method="threshold", threshold=0.3))
    assert isinstance(with_threshold, np.ndarray) and with_threshold.shape == (3, 2, 2)
    np.testing.assert_array_equal(with_threshold[0], np.full((2, 2), 0.3, np.float32))
    np.testing.assert_array_equal(with_threshold[1:], cams)
    assert with_threshold.argmax(0).tolist() == [[0, 2], [1, 0]]

    with_power = add_background(cams, BackgroundParams(method="power", alpha=2.0))
    expected_bg = np.array([[0.81, 0.0625], [0.0, 0.64]], dtype=np.float32)
    np.testing.assert_allclose(with_power[0], expected_bg, rtol=1e-6)
    assert with_power.argmax(0).tolist() == [[0, 2], [1, 0]]

    batch = torch.from_numpy(np.stack([cams, cams[::-1].copy()]))
    out = add_background(batch, BackgroundParams(method="power", alpha=16.0))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 2, 2)
    torch.testing.assert_close(out[:, 0], (1 - batch.amax(dim=1)) ** 16)
    with pytest.raises(ValueError, match="K >= 1"):
        add_background(np.zeros((2, 2), np.float32), BackgroundParams())


def test_otsu_background_splits_each_map_between_its_two_modes():
    from wsss.cam import otsu_threshold

    low, high = torch.full((1, 6, 10), 0.1), torch.full((1, 6, 10), 0.7)
    scores = torch.cat([low[..., :6], high[..., :4]], dim=-1)  # 60% at 0.1, 40% at 0.7
    threshold = float(otsu_threshold(scores))
    assert 0.1 < threshold < 0.7
    batch = torch.stack([scores, scores * 0.5])  # (B, 1, h, w): one threshold per map
    thresholds = otsu_threshold(batch)
    assert thresholds.shape == (2, 1, 1, 1)
    assert 0.05 < float(thresholds[1]) < 0.35
    out = add_background(scores.numpy(), BackgroundParams(method="otsu"))
    assert out.argmax(axis=0)[0].tolist() == [0] * 6 + [1] * 4
