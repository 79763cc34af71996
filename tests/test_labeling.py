import numpy as np
import pytest
import torch

from wsss import labeling
from wsss.affinity import AffinityNet, AffinityNetParams
from wsss.backbone import BackboneParams
from wsss.cam import BackgroundParams, CamParams
from wsss.classifier import Classifier, ClassifierParams
from wsss.crf import CrfParams
from wsss.pseudo_label import PseudoLabelParams
from wsss.random_walk import RandomWalkParams

RESNET18 = BackboneParams(name="resnet18")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    classifier = Classifier(4, ClassifierParams(backbone=RESNET18)).eval()
    affinity_net = AffinityNet(AffinityNetParams(backbone=RESNET18, feature_stride=8)).eval()
    return classifier, affinity_net


def test_cam_mask_uses_constant_background():
    cams = np.zeros((3, 2, 2), np.float32)
    cams[1, 0, 0] = 0.9  # class 2 wins here
    cams[2, 1, 1] = 0.1  # below the threshold: background
    mask = labeling.cam_mask(cams, BackgroundParams(threshold=0.15))
    assert mask.tolist() == [[2, 0], [0, 0]]


def test_grid_scores_average_and_cover_padding():
    scores = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(2, 5, 6)
    grid = labeling.grid_scores(scores, 4)
    assert grid.shape == (2, 2, 2)  # ceil(5/4) x ceil(6/4)
    assert torch.isclose(grid[0, 0, 0], scores[0, :4, :4].mean())
    # Cell (1, 1) covers rows 4..7 and columns 4..7 of the padded map: every padded row repeats
    # row 4, and columns 6, 7 repeat column 5.
    assert torch.isclose(grid[1, 1, 1], (scores[1, 4, 4] + 3 * scores[1, 4, 5]) / 4)


def test_walk_and_finish_shapes_and_channel_mapping(models):
    classifier, affinity_net = models
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (37, 50, 3), dtype=np.uint8)
    walked = labeling.walk(
        image, [3, 1], classifier, affinity_net, CamParams(scales=(1.0,)), RandomWalkParams(logt=3)
    )
    assert walked.channels == (0, 1, 3)
    assert walked.rw_scores.shape == (3, 5, 7)  # ceil(37/8) x ceil(50/8)
    assert walked.rw_scores.min() >= 0
    out = labeling.finish(image, walked, CrfParams(iterations=3), PseudoLabelParams())
    for mask in (out.cam_mask, out.rw_mask, out.mask):
        assert mask.shape == (37, 50) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1, 3}
    assert 0 <= out.confidence <= 1 and out.ignore_fraction == 0.0


def test_walk_with_given_cams_skips_the_classifier(models):
    classifier, affinity_net = models
    image = np.full((24, 24, 3), 128, np.uint8)
    cams = np.zeros((4, 24, 24), np.float32)
    cams[1, :, 12:] = 1.0  # class 2 on the right half
    walked = labeling.walk(
        image, [2], None, affinity_net, CamParams(), RandomWalkParams(logt=2), cams_fg=cams
    )
    out = labeling.finish(image, walked, CrfParams(iterations=0), PseudoLabelParams())
    assert (out.cam_mask[:, 14:] == 2).all() and (out.cam_mask[:, :10] == 0).all()
    assert (out.rw_mask[:, 20:] == 2).all() and (out.rw_mask[:, :4] == 0).all()


@pytest.mark.parametrize("method", ["power", "threshold"])
def test_walk_background_methods_and_background_only_images(models, method):
    _, affinity_net = models
    image = np.full((24, 24, 3), 128, np.uint8)
    cams = np.zeros((4, 24, 24), np.float32)
    cams[0, :, 16:] = 1.0
    params = RandomWalkParams(logt=2, background=BackgroundParams(method=method, threshold=0.25))
    walked = labeling.walk(image, [1], None, affinity_net, CamParams(), params, cams_fg=cams)
    assert walked.rw_scores.shape == (2, 3, 3)
    if method == "threshold":
        assert np.allclose(walked.rw_scores[0], 0.25)  # the constant, set after the walk
        assert np.isclose(walked.rw_scores[1].max(), 1.0)  # each class rescaled to peak at 1
    empty = labeling.walk(image, [], None, affinity_net, CamParams(), params)
    assert empty.channels == (0,) and not empty.cam_mask.any()
    out = labeling.finish(image, empty, CrfParams(), PseudoLabelParams())
    assert not out.mask.any() and not out.rw_mask.any()
