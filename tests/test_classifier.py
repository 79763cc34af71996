from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from wsss.cam_methods import classification_loss, multi_hot
from wsss.cam_methods.plain import PlainCamParams
from wsss.classifier import Classifier, ClassifierParams, image_scores, train_classifier
from wsss.metrics import mean_average_precision
from wsss.networks import initial_network
from wsss.synthetic import SyntheticParams, render_sample
from wsss.training import OptimParams, param_groups, shuffled_batches
from wsss.transforms import AugmentParams

torch.set_num_threads(1)
RESNET18 = ClassifierParams(backbone={"name": "resnet18"})


@pytest.mark.parametrize("pooling", ["gap", "gmp"])
def test_logits_are_pooled_score_maps_at_stride_16(pooling):
    torch.manual_seed(0)
    model = Classifier(5, ClassifierParams(backbone={"name": "resnet18"}, pooling=pooling)).eval()
    assert model.head.bias is None and model.head.weight.shape == (5, 512, 1, 1)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps = model.score_maps(x)
        logits = model(x)
    assert maps.shape == (2, 5, 4, 6)
    expected = maps.mean(dim=(2, 3)) if pooling == "gap" else maps.amax(dim=(2, 3))
    torch.testing.assert_close(logits, expected)
    assert (maps < 0).any()  # raw scores: no relu before pooling


def test_param_groups_cover_trainable_parameters_once_with_head_faster():
    model = Classifier(3, RESNET18)
    groups = param_groups(model, 0.01, head_lr_mult=10.0)
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.1)]
    assert groups[1]["params"] == [model.head.weight]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    frozen = Classifier(
        3, ClassifierParams(backbone={"name": "resnet18", "freeze_batchnorm": True})
    )
    frozen_groups = param_groups(frozen, 0.01, head_lr_mult=2.0)
    frozen_ids = {id(p) for g in frozen_groups for p in g["params"]}
    assert id(frozen.backbone.bn1.weight) not in frozen_ids
    assert id(frozen.backbone.conv1.weight) in frozen_ids
    assert frozen_groups[1]["lr"] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="n_classes"):
        Classifier(0, RESNET18)


def test_classification_loss_is_mean_binary_cross_entropy():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    p = torch.sigmoid(logits)
    manual = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()
    torch.testing.assert_close(classification_loss(logits, targets), manual)


def test_multi_hot_and_its_errors():
    np.testing.assert_array_equal(multi_hot([3, 1], 4), np.array([1, 0, 1, 0], np.float32))
    np.testing.assert_array_equal(multi_hot([], 2), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="label 0 is not a foreground class"):
        multi_hot([0], 4)
    with pytest.raises(ValueError, match=r"label 5 .* 1\.\.4"):
        multi_hot([5], 4)


def test_classification_batches_shapes_order_and_targets():
    rng = np.random.default_rng(0)
    samples = [
        (rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8), [1 + i % 3]) for i in range(5)
    ]
    params = AugmentParams(resize_long=(32, 48), crop_size=32)
    batches = list(
        shuffled_batches(
            samples,
            lambda sample, rng: PlainCamParams().example(*sample, 3, rng, params),
            2,
            np.random.default_rng(7),
        )
    )
    assert [b["image"].shape for b in batches] == [(2, 3, 32, 32)] * 2 + [(1, 3, 32, 32)]
    order = np.random.default_rng(7).permutation(5)
    targets = torch.cat([b["targets"] for b in batches])
    expected = torch.from_numpy(np.stack([multi_hot(samples[i][1], 3) for i in order]))
    torch.testing.assert_close(targets, expected)
    assert batches[0]["image"].dtype == torch.float32


def test_train_classifier_rejects_bad_samples_naming_the_row():
    good = (np.zeros((32, 32, 3), np.uint8), [1])
    model = Classifier(2, RESNET18)
    args = (AugmentParams(), OptimParams(epochs=1))
    with pytest.raises(ValueError, match=r"samples\[1\]: label 3 is not"):
        train_classifier(model, [good, (good[0], [3])], *args, seed=0)
    with pytest.raises(ValueError, match=r"samples\[0\]: image must be a uint8"):
        train_classifier(model, [(np.zeros((32, 32), np.uint8), [1]), good], *args, seed=0)
    with pytest.raises(ValueError, match="no training samples"):
        train_classifier(model, [], *args, seed=0)


def test_initial_classifier_loads_backbone_weights_from_params(tmp_path):
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    params = ClassifierParams(
        backbone={"name": "resnet18", "weights": str(path), "freeze_batchnorm": True}
    )
    samples = [(np.full((32, 32, 3), 100 * i, np.uint8), [i + 1]) for i in range(2)]
    model = train_classifier(
        initial_network("classifier", params, 2, seed=0),
        samples,
        AugmentParams(resize_long=(32, 32), crop_size=32),
        OptimParams(epochs=1, lr=1e-12, weight_decay=0.0),
        seed=0,
        device="cpu",
    )
    assert not model.training
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=key)


# Easy synthetic scenes (no distractors or clutter, big objects, 4 classes): a from-scratch
# resnet18 has to learn shape and texture from a few hundred small images in under a minute.
SYNTHETIC = SyntheticParams(
    n_classes=4,
    min_side=64,
    max_side=80,
    min_size=0.45,
    max_objects=2,
    max_distractors=0,
    clutter_lines=0,
)


@pytest.mark.slow
def test_small_classifier_learns_synthetic_classes_on_cpu():
    train = [render_sample(0, i, SYNTHETIC) for i in range(600)]
    held_out = [render_sample(1000, i, SYNTHETIC) for i in range(200)]
    model = train_classifier(
        initial_network("classifier", RESNET18, SYNTHETIC.n_classes, seed=0),
        [(s.image, s.labels) for s in train],
        AugmentParams(resize_long=(64, 80), crop_size=72),
        # From random init AdamW learns much faster than the method's SGD (see OptimParams).
        OptimParams(algorithm="adamw", epochs=3, batch_size=8, lr=1e-3, head_lr_mult=1.0),
        seed=0,
        device="cpu",
    )
    scores = image_scores(model, [s.image for s in held_out])
    targets = np.stack([multi_hot(s.labels, SYNTHETIC.n_classes) for s in held_out])
    chance = targets.mean()  # mAP of uninformative scores ~ label frequency
    held_out_map = mean_average_precision(scores, targets)
    # Measured 0.665 here (chance 0.34) after ~32 s of training on a shared CPU; other data and
    # training seeds gave 0.58-0.67.
    assert chance < 0.4
    assert held_out_map > 0.5, f"held-out mAP {held_out_map:.3f}, chance {chance:.3f}"
