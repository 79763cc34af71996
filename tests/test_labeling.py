import numpy as np
import pytest
import torch

from wsss import labeling
from wsss.affinity import AffinityNet, AffinityNetParams
from wsss.backbones import BackboneParams
from wsss.cam import BackgroundParams, CamParams
from wsss.classifier import Classifier, ClassifierParams
from wsss.crf import CrfParams
from wsss.params import Params
from wsss.pseudo_label import PseudoLabelParams
from wsss.random_walk import RandomWalkParams
from wsss.refiners import REFINERS, Refiner, Scores, build_refiners, networks_needed
from wsss.refiners.crf import CrfRefinerParams
from wsss.refiners.random_walk import grid_scores

RESNET18 = BackboneParams(name="resnet18")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    classifier = Classifier(4, ClassifierParams(backbone=RESNET18)).eval()
    affinity_net = AffinityNet(AffinityNetParams(backbone=RESNET18, feature_stride=8)).eval()
    return {"classifier": classifier, "affinity": affinity_net}


WALK = RandomWalkParams(logt=3)
CRF = CrfRefinerParams(iterations=3)


def labeler(networks, walk=WALK, crf=CRF):
    refiners = build_refiners([("random_walk", walk), ("crf", crf)], networks)
    cam = CamParams(scales=(1.0,))
    seeds = labeling.CamSeeds(networks.get("classifier"), cam)
    return labeling.Labeler(seeds, refiners, PseudoLabelParams())


def test_cam_mask_uses_constant_background():
    cams = np.zeros((3, 2, 2), np.float32)
    cams[1, 0, 0] = 0.9  # class 2 wins here
    cams[2, 1, 1] = 0.1  # below the threshold: background
    mask = labeling.cam_mask(cams, BackgroundParams(threshold=0.15))
    assert mask.tolist() == [[2, 0], [0, 0]]


def test_grid_scores_average_and_cover_padding():
    scores = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(2, 5, 6)
    grid = grid_scores(scores, 4)
    assert grid.shape == (2, 2, 2)  # ceil(5/4) x ceil(6/4)
    assert torch.isclose(grid[0, 0, 0], scores[0, :4, :4].mean())
    # Cell (1, 1) covers rows 4..7 and columns 4..7 of the padded map: every padded row repeats
    # row 4, and columns 6, 7 repeat column 5.
    assert torch.isclose(grid[1, 1, 1], (scores[1, 4, 4] + 3 * scores[1, 4, 5]) / 4)


def test_registry_knows_the_members_and_their_networks():
    assert {"random_walk", "crf"} <= set(REFINERS)
    assert networks_needed(["crf", "random_walk"]) == ["affinity"]
    assert networks_needed(["crf"]) == []
    with pytest.raises(ValueError, match="unknown refiner.*'nope'"):
        build_refiners([("nope", CrfParams())])
    with pytest.raises(TypeError, match="crf takes CrfRefinerParams"):
        build_refiners([("crf", RandomWalkParams())])


def test_seed_then_finish_shapes_and_channel_mapping(models):
    method = labeler(models)
    assert method.stages == ("cam", "random_walk", "crf") and method.split == 1
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (37, 50, 3), dtype=np.uint8)
    seeded = method.seed(image, [3, 1])
    # The accelerated part ends after the walk: its scores on the affinity grid.
    assert seeded.refined == 1 and set(seeded.masks) == {"cam", "random_walk"}
    assert seeded.scores.channels == (0, 1, 3)
    assert seeded.scores.values.shape == (3, 5, 7)  # ceil(37/8) x ceil(50/8)
    assert seeded.scores.values.min() >= 0
    out = method.finish(image, seeded)
    assert list(out.masks) == ["cam", "random_walk", "crf"]
    for mask in (*out.masks.values(), out.mask):
        assert mask.shape == (37, 50) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1, 3}
    assert 0 <= out.confidence <= 1 and out.ignore_fraction == 0.0
    # In one process: the same masks.
    again = method.label(image, [1, 3])
    assert all((again.masks[s] == out.masks[s]).all() for s in method.stages)


def test_walk_with_given_cams_skips_the_classifier(models):
    method = labeler(
        {"affinity": models["affinity"]}, RandomWalkParams(logt=2), CrfRefinerParams(iterations=0)
    )
    image = np.full((24, 24, 3), 128, np.uint8)
    cams = np.zeros((4, 24, 24), np.float32)
    cams[1, :, 12:] = 1.0  # class 2 on the right half
    out = method.label(image, [2], cams_fg=cams)
    assert (out.masks["cam"][:, 14:] == 2).all() and (out.masks["cam"][:, :10] == 0).all()
    walk = out.masks["random_walk"]
    assert (walk[:, 20:] == 2).all() and (walk[:, :4] == 0).all()
    with pytest.raises(labeling.StageError, match="without a classifier needs the CAMs") as err:
        method.seed(image, [2])
    assert err.value.stage == "cam"


def test_prepared_inputs_replace_the_refiners_own(models):
    """Calibration passes each refiner's `prepare` once: the result must not change."""
    method = labeler(models)
    image = np.random.default_rng(1).integers(0, 255, (32, 40, 3), dtype=np.uint8)
    prepared = method.prepare(image)
    assert set(prepared) == {"random_walk", "crf"} and prepared["crf"] is None
    direct = method.label(image, [2])
    given = method.finish(image, method.seed(image, [2], prepared=prepared), prepared)
    assert (direct.mask == given.mask).all()


@pytest.mark.parametrize("method", ["power", "threshold"])
def test_walk_background_methods_and_background_only_images(models, method):
    image = np.full((24, 24, 3), 128, np.uint8)
    cams = np.zeros((4, 24, 24), np.float32)
    cams[0, :, 16:] = 1.0
    params = RandomWalkParams(logt=2, background=BackgroundParams(method=method, threshold=0.25))
    labels = labeler(models, params, CrfRefinerParams())
    walked = labels.seed(image, [1], cams_fg=cams).scores
    assert walked.values.shape == (2, 3, 3) and walked.stride == 8
    if method == "threshold":
        assert np.allclose(walked.values[0], 0.25)  # the constant, set after the walk
        assert np.isclose(walked.values[1].max(), 1.0)  # each class rescaled to peak at 1
    empty = labels.seed(image, [])
    assert empty.refined == -1 and empty.scores.channels == (0,)
    out = labels.finish(image, empty)
    assert list(out.masks) == list(labels.stages)
    assert not out.mask.any() and not any(m.any() for m in out.masks.values())


class _Erase(Refiner):
    """A refiner made for the test: every pixel to the background (unregistered)."""

    name = "erase"
    params_type = CrfParams

    def refine(self, image, scores, prepared=None):
        values = np.zeros_like(scores.values)
        values[0] = 1.0
        return Scores(scores.channels, values, scores.stride)


class _Broken(Refiner):
    name = "broken"
    params_type = Params

    def refine(self, image, scores, prepared=None):
        raise RuntimeError("out of memory")


CAMS_GIVEN = labeling.CamSeeds(None, CamParams())  # the CAM stage of callers passing CAMs


def test_a_new_refiner_is_a_stage_with_its_mask_and_failures_name_it():
    image = np.full((16, 16, 3), 90, np.uint8)
    cams = np.ones((2, 16, 16), np.float32)
    method = labeling.Labeler(CAMS_GIVEN, [_Erase(CrfParams())], PseudoLabelParams())
    assert method.stages == ("cam", "erase") and method.split == 0  # a CPU refiner
    out = method.label(image, [1], cams_fg=cams)
    assert (out.masks["cam"] == 1).all() and not out.masks["erase"].any() and not out.mask.any()
    broken = labeling.Labeler(CAMS_GIVEN, [_Broken(Params())], PseudoLabelParams())
    with pytest.raises(labeling.StageError, match="broken: RuntimeError: out of memory") as err:
        broken.label(image, [1], cams_fg=cams)
    assert err.value.stage == "broken"


def test_a_refiner_without_its_network_says_which():
    refiner = build_refiners([("random_walk", RandomWalkParams())])[0]
    with pytest.raises(ValueError, match="random_walk refiner needs the affinity network"):
        refiner.prepare(np.zeros((8, 8, 3), np.uint8))
