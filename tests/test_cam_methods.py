"""The CAM-method family: the plain CAM, WILDCAT's multi-map head, the configuration's union,
and the hooks every training path and the CAM stage go through."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from pipelines.train.classifier import classification_examples
from wsss.cam import CamParams, compute_cams
from wsss.cam_methods import CAM_METHODS, multi_hot
from wsss.cam_methods.hfpl import feature_similarity_loss, sampled_logits
from wsss.cam_methods.plain import PlainCamParams
from wsss.cam_methods.saliency import strongest_other
from wsss.cam_methods.seam import PixelCorrelation
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
        torch.testing.assert_close(
            model.seed_maps(x, torch.ones(2, 3, dtype=torch.bool)), class_maps.clamp_min(0)
        )
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
    batch = {
        "image": images,
        "labels": np.array([[1], [2], [1, 2]], dtype=object),
        "row": np.array([4, 0, 9]),
    }
    stacked = classification_examples(batch, 2, SMALL, _TwoViews())
    assert set(stacked) == {"image", "targets", "flipped", "row"}
    np.testing.assert_array_equal(stacked["row"], [4, 0, 9])  # OAA keeps its maps by row
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
        {"image": [s[0] for s in samples], "labels": [s[1] for s in samples], "row": range(4)},
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


class _PointwiseMaps(nn.Module):
    """A stand-in classifier whose class maps are a 1x1 convolution of the image itself, with
    the image as every feature level: its maps commute with resizing the image, unless
    `bump` adds a fixed value at a fixed map position whatever the image's size."""

    def __init__(self, bump: float = 0.0) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, 2, 1, bias=False)
        nn.init.uniform_(self.head.weight, 0.5, 1.0)  # positive maps of a positive image
        self.bump = bump

    def forward(self, x, with_levels=False):
        maps = self.head(x)
        bump = torch.zeros_like(maps)
        bump[:, 1, 2, 2] = self.bump
        maps = maps + bump
        return maps.mean(dim=(2, 3)), maps, [x, x, x, x]


def _ramp_images(batch: int, size: int) -> torch.Tensor:
    """Images linear in x and y: their maps' extremes lie on the corners, which resizing with
    aligned corners keeps, so max-normalising commutes with resizing too."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    ramps = torch.stack([xs + 0.1, ys + 0.1, 0.5 * (xs + ys) + 0.1])
    return torch.stack([ramps * (1 + i) for i in range(batch)])


@pytest.mark.parametrize("flip", [False, True])
def test_seams_equivariance_loss_is_zero_for_maps_that_commute_with_the_rescaling(flip):
    torch.manual_seed(0)
    method = ClassifierParams(method={"name": "seam", "scale": 0.5, "flip": flip}).method
    seam = method.build((3, 3, 3, 3))
    batch = {"image": _ramp_images(2, 33), "targets": torch.tensor([[1.0, 1.0], [0.0, 1.0]])}
    if flip:  # a flipped view commutes with maps symmetric under the flip
        batch["image"] = batch["image"] + batch["image"].flip(-1)
    _, parts = seam.loss(_PointwiseMaps(), batch)
    assert parts["equivariance"] == pytest.approx(0.0, abs=1e-6)
    # The same maps with a bump fixed in map cells, wherever the image's size puts it: not
    # equivariant, and the loss says so.
    _, parts = seam.loss(_PointwiseMaps(bump=5.0), batch)
    assert parts["equivariance"] > 1e-3


def test_seams_pixel_correlation_gives_convex_combinations_of_the_maps():
    torch.manual_seed(0)
    pcm = PixelCorrelation((4, 5))
    h, w = 3, 4
    levels = [torch.randn(2, 4, 6, 8), torch.randn(2, 5, h, w)]
    images = torch.randn(2, 3, 24, 32)
    # Map i is the indicator of position i: each output position's channels are its weights.
    indicators = torch.eye(h * w).view(1, h * w, h, w).expand(2, -1, -1, -1)
    with torch.no_grad():
        weights = pcm(indicators, levels, images)
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, h, w), atol=1e-4, rtol=0)
        maps = torch.rand(2, 3, h, w)
        out = pcm(maps, levels, images)
    low, high = maps.amin(dim=(2, 3), keepdim=True), maps.amax(dim=(2, 3), keepdim=True)
    assert (out >= low - 1e-4).all() and (out <= high + 1e-4).all()
    assert not torch.allclose(out, maps)


def test_seam_trains_its_pcm_and_seeds_from_it():
    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8), [1 + i % 2]) for i in range(4)]
    torch.manual_seed(0)
    model = Classifier(2, ClassifierParams(backbone=RESNET18, method="seam"))
    before = model.method.pcm.embed.weight.detach().clone()
    trained = train_classifier(model, samples, SMALL, OptimParams(epochs=1, batch_size=2), seed=0)
    assert not torch.equal(trained.method.pcm.embed.weight, before)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    x = torch.from_numpy(normalize(image))[None]
    with torch.no_grad():
        levels, maps = trained.levels_and_maps(x)
        # The class whose map activates somewhere (a class that never does seeds nothing).
        label = int(maps.amax(dim=(2, 3))[0].argmax())
        labelled = F.one_hot(torch.tensor([label]), 2)
        refined = trained.method.refined(x, levels, maps, labelled.float())
        torch.testing.assert_close(
            trained.seed_maps(x, labelled.bool()), refined[:, 1:].clamp_min(0)
        )
    assert not refined[0, 2 - label].any()  # the unlabelled class takes no part
    cams = compute_cams(trained, image, [label + 1], CamParams(scales=(1.0,), flip=False))
    assert cams.shape == (2, 48, 64) and not cams[1 - label].any()
    assert cams[label].max() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValidationError, match=r"method\.seam\.scale"):
        ClassifierParams(method={"name": "seam", "scale": 1.0})


class _HalfAndHalf(nn.Module):
    """A stand-in classifier: class 1's score reads the left half of its features only, class
    2's the right half, class 3's nothing (a constant)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 1)
        self.pool = lambda maps: maps.mean(dim=(2, 3))

    def levels_and_maps(self, x):
        f = self.features(x)
        left = torch.zeros_like(f[:, :1])
        left[..., : f.shape[3] // 2] = 1.0
        maps = torch.cat([f[:, :1] * left, f[:, 1:2] * (1 - left), 0 * f[:, 2:3] + 1.0], dim=1)
        return [f, f, f, f], maps


def test_saliency_of_a_class_is_zero_where_its_score_has_no_gradient():
    torch.manual_seed(0)
    method = ClassifierParams(method={"name": "saliency", "subtract": 0.0}).method.build(())
    x = torch.randn(2, 3, 6, 8)
    labelled = torch.tensor([[True, True, True], [True, False, False]])
    with torch.no_grad():  # as the CAM stage calls it
        maps = method.seed_maps(_HalfAndHalf(), x, labelled)
    assert maps.shape == (2, 3, 6, 8)
    assert (maps[:, 0, :, :4] > 0).all() and not maps[:, 0, :, 4:].any()
    assert (maps[0, 1, :, 4:] > 0).all() and not maps[0, 1, :, :4].any()
    assert not maps[1, 1].any()  # not labelled in image 1
    assert not maps[:, 2].any()  # a constant score: no gradient anywhere
    # DCSM's subtraction: where two labelled classes' saliency overlaps, each keeps only
    # what it has beyond the strongest other's.
    saliency = torch.tensor([[[[1.0, 0.2]], [[0.4, 0.5]], [[0.0, 0.3]]]])
    other = strongest_other(saliency)
    torch.testing.assert_close(other, torch.tensor([[[[0.4, 0.5]], [[1.0, 0.3]], [[1.0, 0.5]]]]))


def test_saliency_seeds_through_the_cam_stage_of_a_classifier():
    torch.manual_seed(0)
    model = Classifier(3, ClassifierParams(backbone=RESNET18, method="saliency")).eval()
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    cams = compute_cams(model, image, [1, 3], CamParams(scales=(1.0, 0.5), flip=True))
    assert cams.shape == (3, 48, 64) and not cams[1].any()
    assert cams[0].max() == pytest.approx(1.0, abs=1e-4)
    # The subtraction leaves each position to at most one class.
    assert not ((cams[0] > 0.05) & (cams[2] > 0.05)).all()
    assert all(p.grad is None for p in model.parameters())  # no weight gradients left behind
    with pytest.raises(ValidationError, match=r"method\.saliency\.levels"):
        ClassifierParams(method={"name": "saliency", "levels": [1, 4]})
