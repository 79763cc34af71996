"""The CAM-method family: the plain CAM, WILDCAT's multi-map head, the configuration's union,
and the hooks every training path and the CAM stage go through."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.train.classifier import classification_examples
from wsss.cam import CamParams, compute_cams
from wsss.cam_methods import CAM_METHODS, multi_hot
from wsss.cam_methods.plain import PlainCamParams
from wsss.classifier import Classifier, ClassifierParams, classifier_step_loss, train_classifier
from wsss.training import OptimParams
from wsss.transforms import AugmentParams, normalize

torch.set_num_threads(1)
RESNET18 = {"name": "resnet18"}
SMALL = AugmentParams(resize_long=(32, 40), crop_size=32)


def test_the_plain_cam_is_the_default_and_written_by_omission():
    assert {"cam", "wildcat"} <= set(CAM_METHODS)
    plain = ClassifierParams()
    assert plain.method == PlainCamParams()
    # Configurations and model records from before the family keep their hashes.
    assert "method" not in plain.model_dump(mode="json")
    assert "method" not in plain.model_dump()
    assert ClassifierParams(method="cam").model_dump(mode="json") == plain.model_dump(mode="json")
    assert ClassifierParams(method="wildcat").model_dump(mode="json")["method"] == {
        "name": "wildcat",
        "maps_per_class": 8,
    }


def test_wildcat_averages_its_maps_per_class_and_pools_the_class_maps():
    torch.manual_seed(0)
    params = ClassifierParams(backbone=RESNET18, method={"name": "wildcat", "maps_per_class": 4})
    model = Classifier(3, params).eval()
    assert model.head.weight.shape == (12, 512, 1, 1)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        head_maps = model.head(model.backbone(x)[-1])
        class_maps = model.score_maps(x)
        expected = head_maps.view(2, 3, 4, 4, 6).mean(dim=2)  # class k: head maps 4k .. 4k + 3
        torch.testing.assert_close(class_maps, expected)
        torch.testing.assert_close(model(x), class_maps.mean(dim=(2, 3)))  # its pooling (gap)
        torch.testing.assert_close(model.seed_maps(x), class_maps.clamp_min(0))
    # The CAM stage makes its seeds from the class maps like any method's.
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    cams = compute_cams(model, image, [1, 3], CamParams(scales=(1.0,), flip=False))
    assert cams.shape == (3, 48, 64) and not cams[1].any()
    assert cams[0].max() == pytest.approx(1.0, abs=1e-4)


def test_training_goes_through_the_methods_examples_and_loss():
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8), [1 + i % 2]) for i in range(4)]
    torch.manual_seed(0)
    model = Classifier(2, ClassifierParams(backbone=RESNET18, method="wildcat"))
    before = model.head.weight.detach().clone()
    optim = OptimParams(epochs=1, batch_size=2, lr=0.01)
    trained = train_classifier(model, samples, SMALL, optim, seed=0)
    assert not torch.equal(trained.head.weight, before)  # the 2 x 8 head maps train
    batch = {
        "image": torch.from_numpy(np.stack([normalize(s[0][:32, :32]) for s in samples])),
        "targets": torch.from_numpy(np.stack([multi_hot(s[1], 2) for s in samples])),
    }
    loss, _ = classifier_step_loss(trained, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)


class _TwoViews(PlainCamParams):
    """A method with an extra view per example, as SEAM's would have (not registered)."""

    def example(self, image, labels, n_classes, rng, augment_params):
        example = super().example(image, labels, n_classes, rng, augment_params)
        return {**example, "flipped": example["image"][:, :, ::-1].copy()}


def test_the_ray_data_step_stacks_whatever_examples_the_method_makes():
    rng = np.random.default_rng(1)
    images = np.empty(3, dtype=object)
    images[:] = [rng.integers(0, 256, (40, 36, 3), dtype=np.uint8) for _ in range(3)]
    batch = {"image": images, "labels": np.array([[1], [2], [1, 2]], dtype=object)}
    stacked = classification_examples(batch, 2, SMALL, _TwoViews())
    assert set(stacked) == {"image", "targets", "flipped"}
    assert stacked["flipped"].shape == stacked["image"].shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(stacked["flipped"], stacked["image"][..., ::-1])
    np.testing.assert_array_equal(stacked["targets"], [[1, 0], [0, 1], [1, 1]])
