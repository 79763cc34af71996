"""Deep clustering refinement (`wsss.deep_clustering`, the `deep_clustering` refiner): regions
that resemble a class's confident regions are claimed by it, along superpixel edges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.config import ConfigError, load_config
from wsss.classifier import Classifier, ClassifierParams
from wsss.deep_clustering import (
    DeepClusteringParams,
    cluster_regions,
    refine_by_clustering,
    region_means,
    superpixels,
    training_regions,
)
from wsss.refiners import REFINERS, Scores, build_refiners


def two_colour_image(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A red square on a blue background, and its mask (1 on the square)."""
    rng = np.random.default_rng(0)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    image = np.where(mask[..., None] == 1, [200, 40, 40], [40, 40, 200]).astype(np.float64)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    return image, mask


def test_superpixels_are_numbered_densely_and_follow_colour_edges():
    image, mask = two_colour_image()
    regions = superpixels(image, DeepClusteringParams(segments=30))
    assert regions.shape == mask.shape and regions.dtype == np.int64
    assert set(np.unique(regions)) == set(range(regions.max() + 1))
    assert 10 <= regions.max() + 1 <= 60
    # Every superpixel lies (almost) on one side of the square's edge.
    purity = [max(mask[regions == r].mean(), 1 - mask[regions == r].mean()) for r in range(10)]
    assert min(purity) > 0.9


def test_region_means_equal_the_mean_over_each_region_also_from_a_coarser_grid():
    rng = np.random.default_rng(1)
    regions = torch.from_numpy(rng.integers(0, 5, (8, 8)))
    values = torch.from_numpy(rng.normal(size=(70, 8, 8)).astype(np.float32))  # two blocks
    means = region_means(values, regions, 5)
    for r in range(5):
        expected = values[:, regions == r].mean(dim=1)
        torch.testing.assert_close(means[r], expected)
    # A coarse grid is upsampled: a constant map stays constant over every region.
    constant = torch.full((3, 2, 2), 4.0)
    torch.testing.assert_close(region_means(constant, regions, 5), torch.full((5, 3), 4.0))


def test_training_regions_take_each_class_best_fraction_and_keep_every_class():
    probs = torch.tensor(
        [[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.7, 0.1, 0.2], [0.6, 0.4, 0.0], [0.2, 0.8, 0.0]]
    )
    chosen, labels = training_regions(probs, probs.argmax(dim=1), fraction=0.5)
    # class 0 claims four regions: its two most probable train; class 1 its only region; class
    # 2 claims none and takes its most probable one (region 2, which class 0 then loses).
    assert labels.tolist() == [0, 0, 2, 0, 1]
    assert chosen.tolist() == [True, True, True, False, True]


def test_clustering_gives_uncertain_regions_to_the_class_whose_seeds_they_resemble():
    rng = np.random.default_rng(2)
    # Two kinds of region (features near two centres); the incoming scores are sure of a few
    # regions of each kind and wrong, weakly, about the rest of the second kind.
    kind = np.array([0] * 10 + [1] * 10)
    features = torch.from_numpy(
        (np.eye(2)[kind] * 3 + rng.normal(0, 0.3, (20, 2))).astype(np.float32)
    )
    probs = np.where(kind[:, None] == 0, [0.9, 0.1], [0.55, 0.45]).astype(np.float32)
    probs[10:13] = [0.05, 0.95]  # the confident regions of the second kind
    params = DeepClusteringParams(seed_fraction=0.3)
    refined = cluster_regions(features, torch.from_numpy(probs), torch.ones(20), params)
    assert refined.argmax(dim=1).tolist() == kind.tolist()
    torch.testing.assert_close(refined.sum(dim=1), torch.ones(20))
    # Seeded: the same inputs give the same probabilities.
    torch.testing.assert_close(
        refined, cluster_regions(features, torch.from_numpy(probs), torch.ones(20), params)
    )


def test_refinement_completes_an_object_its_scores_cover_in_part():
    image, mask = two_colour_image(64)
    # The scores find the square's left half only; a network's features tell the colours apart.
    probs = np.stack([np.full(mask.shape, 0.6), np.zeros(mask.shape)]).astype(np.float32)
    probs[1, 16:48, 16:32] = 0.9
    probs /= probs.sum(axis=0, keepdims=True)
    colour = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) / 255)
    levels = [torch.nn.functional.avg_pool2d(colour[None], 8)[0]]
    refined = refine_by_clustering(image, probs, levels, DeepClusteringParams(segments=40))
    assert refined.shape == probs.shape
    before = ((probs.argmax(0) == 1) & (mask == 1)).sum() / mask.sum()
    after = (refined.argmax(0) == mask).mean()
    assert before < 0.55 and after > 0.95


def test_the_refiner_runs_on_a_classifier_and_is_configured_by_its_own_section(tmp_path):
    assert "deep_clustering" in REFINERS
    image, _ = two_colour_image(48)
    classifier = Classifier(2, ClassifierParams(backbone={"name": "resnet18"}))
    [refiner] = build_refiners(
        [("deep_clustering", DeepClusteringParams(segments=20))], {"classifier": classifier}
    )
    scores = Scores((0, 2), np.random.default_rng(3).random((2, 12, 12)).astype(np.float32), 4)
    refined = refiner.refine(image, scores)
    assert refined.channels == (0, 2) and refined.probabilities
    assert refined.values.shape == (2, 48, 48)
    np.testing.assert_allclose(refined.values.sum(axis=0), 1.0, atol=1e-5)

    cfg = load_config(None, ["refiners=[deep_clustering,crf]", "deep_clustering.segments=50"])
    assert cfg.stages == ("cam", "deep_clustering", "crf")
    assert cfg.networks == ("classifier",)  # no AffinityNet to train
    assert cfg.with_refiners(["random_walk"]).networks == ("classifier", "affinity")
    with pytest.raises(ConfigError, match="refiners"):
        cfg.with_refiners(["deep_clustering", "no_such_refiner"])
    with pytest.raises(ConfigError, match="deep_clustering.seed_fraction"):
        load_config(None, ["deep_clustering.seed_fraction=0"])
