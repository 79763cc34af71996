"""The CAM-method family: the plain CAM, WILDCAT's multi-map head, the configuration's union,
and the hooks every training path and the CAM stage go through."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipelines.train.classifier import classification_examples
from wsss.cam import CamParams, compute_cams
from wsss.cam_methods import CAM_METHODS, multi_hot
from wsss.cam_methods.hfpl import feature_similarity_loss, sampled_logits
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


def test_hfpl_draws_its_positions_in_proportion_to_the_class_probability():
    maps = torch.full((1, 2, 4, 4), -30.0)
    maps[0, 0, 1, 2] = 30.0  # class 1: all its probability at one position
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0])  # class 2: four positions, the rest ~0
    maps[0, 1, 0] = logits
    torch.manual_seed(0)
    drawn = sampled_logits(maps, 20000)
    assert drawn.shape == (1, 2, 20000)
    assert (drawn[0, 0] == 30.0).float().mean() > 0.999  # the 1e-5 floor elsewhere: ~1.5e-4
    # Each position is drawn with probability sigmoid(logit) / sum of sigmoids: the sampled
    # logits' frequencies follow that distribution (and so their mean its expectation).
    expected = torch.sigmoid(logits) / torch.sigmoid(logits).sum()
    frequencies = torch.stack([(drawn[0, 1] == value).float().mean() for value in logits])
    torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)
    torch.testing.assert_close(drawn[0, 1].mean(), (expected * logits).sum(), atol=0.02, rtol=0)


def _all_pairs_similarity(colours, maps, mu, sigma, radius):
    """HFPL's reference formula over every ordered pair of the grid closer than `radius`."""
    b, _, h, w = maps.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).float()
    dist = torch.cdist(pos, pos)
    x = colours.reshape(b, 3, -1).transpose(1, 2)
    y = maps.reshape(b, maps.shape[1], -1).transpose(1, 2)
    gap = (torch.cdist(x, x, p=1) / 3).clamp(0, 1)
    alike = torch.tanh(mu + torch.log((gap + 1e-5) / (1 - gap + 1e-5)))
    g = torch.exp(-0.5 * (dist / sigma) ** 2) / (2 * math.pi * sigma**2)
    g = torch.where((dist > 0) & (dist < radius), g, torch.zeros(()))
    return -(g * 0.5 * torch.cdist(y, y) ** 2 * alike).sum() / (b * h * w)


def test_hfpl_similarity_is_the_references_formula_on_the_radius_pairs():
    gen = torch.Generator().manual_seed(0)
    colours, maps = torch.rand(2, 3, 5, 6, generator=gen), torch.rand(2, 3, 5, 6, generator=gen)
    ours = feature_similarity_loss(colours, maps, mu=2.5, sigma=1.5, radius=3)
    torch.testing.assert_close(ours, _all_pairs_similarity(colours, maps, 2.5, 1.5, 3))
    # Maps whose edge follows the colour edge score lower than maps that cross it.
    colours = torch.zeros(1, 3, 6, 6)
    colours[..., 3:] = 1.0
    follows, crosses = torch.zeros(1, 1, 6, 6), torch.zeros(1, 1, 6, 6)
    follows[..., 3:] = 1.0
    crosses[..., 2:, :] = 1.0
    assert feature_similarity_loss(colours, follows, 2.5, 1.5, 3) < 0
    assert feature_similarity_loss(colours, crosses, 2.5, 1.5, 3) > 0


def test_hfpl_trains_through_its_loss_and_checks_its_settings():
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8), [1 + i % 2]) for i in range(4)]
    torch.manual_seed(0)
    model = Classifier(2, ClassifierParams(backbone=RESNET18, method="hfpl"))
    batch = classification_examples(
        {"image": [s[0] for s in samples], "labels": [s[1] for s in samples]},
        2,
        SMALL,
        model.params.method,
    )
    loss, parts = classifier_step_loss(model, {k: torch.from_numpy(v) for k, v in batch.items()})
    assert torch.isfinite(loss) and set(parts) == {"classification", "similarity"}
    before = model.head.weight.detach().clone()
    trained = train_classifier(model, samples, SMALL, OptimParams(epochs=1, batch_size=2), seed=0)
    assert not torch.equal(trained.head.weight, before)
    with pytest.raises(ValidationError, match="radius"):
        ClassifierParams(method={"name": "hfpl", "sigma": 3.0, "radius": 4})
