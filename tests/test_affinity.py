import functools
import math

import numpy as np
import pydantic
import pytest
import torch
from scipy import ndimage

from wsss.affinity import (
    AffinityLabelParams,
    AffinityNet,
    AffinityNetParams,
    PairwiseL1,
    affinity_example,
    affinity_label_map,
    affinity_loss,
    affinity_step_loss,
    pair_labels,
    predict_affinity,
    reduce_label_map,
    train_affinity_net,
)
from wsss.backbones import BackboneParams, build_backbone
from wsss.neighbourhood import offsets, pair_valid, shifted
from wsss.networks import initial_network
from wsss.synthetic import Sample, SyntheticParams, render_sample
from wsss.training import OptimParams, param_groups
from wsss.transforms import AugmentParams

torch.set_num_threads(1)

RESNET18 = BackboneParams(name="resnet18")


def brute_force_pair_labels(labels: np.ndarray, radius: int) -> dict[str, set]:
    """Every unordered pair {p, q} with 0 < |p - q| < radius, sorted by kind, as (p, q) with p
    before q in raster order."""
    h, w = labels.shape
    kinds = {"bg_pos": set(), "fg_pos": set(), "neg": set(), "ignored": set()}
    for p in np.ndindex(h, w):
        for q in np.ndindex(h, w):
            if not p < q or (p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= radius**2:
                continue
            a, b = labels[p], labels[q]
            if a == 255 or b == 255:
                kinds["ignored"].add((p, q))
            elif a != b:
                kinds["neg"].add((p, q))
            else:
                kinds["bg_pos" if a == 0 else "fg_pos"].add((p, q))
    return kinds


def pairs_of(mask: torch.Tensor, radius: int) -> set:
    """(p, q) pairs marked in a (P, h, w) forward-pair mask."""
    out = set()
    for k, y, x in mask.nonzero().tolist():
        dy, dx = offsets(radius)[k]
        out.add(((y, x), (y + dy, x + dx)))
    return out


@pytest.mark.parametrize(("h", "w", "radius"), [(7, 6, 3), (5, 9, 5), (1, 8, 2)])
def test_pair_labels_match_brute_force(h, w, radius):
    rng = np.random.default_rng(h * w + radius)
    labels = rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(h, w), p=[0.4, 0.3, 0.2, 0.1])
    expected = brute_force_pair_labels(labels, radius)
    got = pair_labels(labels, radius)
    for name, mask in zip(("bg_pos", "fg_pos", "neg"), got, strict=True):
        assert mask.shape == (len(offsets(radius)), h, w) and mask.dtype == torch.bool
        assert pairs_of(mask, radius) == expected[name], name
    # The kinds are disjoint: each pair is labelled once.
    assert int(sum(m.sum() for m in got)) == sum(
        len(expected[k]) for k in ("bg_pos", "fg_pos", "neg")
    )

    batched = pair_labels(torch.from_numpy(np.stack([labels, labels[::-1].copy()])), radius)
    flipped = pair_labels(labels[::-1], radius)
    for single, other, both in zip(got, flipped, batched, strict=True):
        assert both.shape == (2, len(offsets(radius)), h, w)
        assert torch.equal(both[0], single) and torch.equal(both[1], other)


def test_pair_counts_by_hand():
    labels = np.array([[0, 0, 1], [255, 1, 2]], np.uint8)
    # radius 2: offsets (0, 1), (1, -1), (1, 0), (1, 1). In-bounds pairs without the ignored
    # pixel: (0,0)-(0,1) 0/0; (0,1)-(0,2) 0/1; (1,1)-(1,2) 1/2; (0,2)-(1,1) 1/1;
    # (0,1)-(1,1) 0/1; (0,2)-(1,2) 1/2; (0,0)-(1,1) 0/1; (0,1)-(1,2) 0/2.
    bg_pos, fg_pos, neg = pair_labels(labels, radius=2)
    assert (int(bg_pos.sum()), int(fg_pos.sum()), int(neg.sum())) == (1, 1, 6)
    assert bg_pos[0, 0, 0] and fg_pos[1, 0, 2]


def test_pair_labels_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        pair_labels(np.zeros((4, 4), np.int64), 3)


def test_affinity_label_map_thresholds_and_ignore():
    # K = 3, image classes 1 and 3; one pixel per column.
    cams = np.array(
        [
            [0.9, 0.2, 0.25, 0.03, 0.01, 0.31, 0.06],  # class 1
            [0.0, 0.0, 0.00, 0.00, 0.90, 0.00, 0.00],  # class 2, not an image label
            [0.2, 0.6, 0.10, 0.04, 0.00, 0.00, 0.00],  # class 3
        ],
        np.float32,
    )[:, None, :]
    params = AffinityLabelParams(mode="absolute", conf_fg=0.30, conf_bg=0.05)
    got = affinity_label_map(cams, [1, 3], params)
    assert got.dtype == np.uint8 and got.shape == (1, 7)
    assert got[0].tolist() == [1, 3, 255, 0, 0, 1, 255]
    stricter = params.model_copy(update={"conf_fg": 0.5, "conf_bg": 0.035})
    assert affinity_label_map(cams, [1, 3], stricter)[0].tolist() == [1, 3, 255, 255, 0, 255, 255]
    # Without labels nothing is foreground.
    assert affinity_label_map(cams, [], params)[0].tolist() == [0] * 7


def test_otsu_affinity_labels_follow_each_images_own_score_range():
    # One object (columns 0-3) on background (4-9); the second image is the first with every
    # score squeezed into [0.5, 0.9], as a diffuse CAM would be. Absolute thresholds call all of
    # it foreground; Otsu's per-image split finds the same regions in both.
    sharp = np.array([0.95, 0.9, 0.85, 0.8, 0.15, 0.1, 0.1, 0.05, 0.05, 0.0], np.float32)
    diffuse = 0.5 + 0.4 * sharp
    params = AffinityLabelParams(mode="otsu", conf_fg=0.3, conf_bg=0.5)
    expected = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    for scores in (sharp, diffuse):
        cams = scores[None, None, :]
        assert affinity_label_map(cams, [1], params)[0].tolist() == expected
    absolute = AffinityLabelParams(mode="absolute", conf_fg=0.30, conf_bg=0.05)
    assert affinity_label_map(diffuse[None, None, :], [1], absolute)[0].tolist() == [1] * 10


def test_affinity_label_map_rejects_bad_input():
    cams = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="label 3"):
        affinity_label_map(cams, [1, 3], AffinityLabelParams())
    with pytest.raises(ValueError, match="cams_fg"):
        affinity_label_map(cams[0], [1], AffinityLabelParams())
    with pytest.raises(ValueError, match="needs the image"):
        affinity_label_map(cams, [1], AffinityLabelParams(use_crf=True))
    with pytest.raises(pydantic.ValidationError, match="conf_bg"):
        AffinityLabelParams(mode="absolute", conf_fg=0.1, conf_bg=0.2)


def two_colour_image(h: int, w: int) -> np.ndarray:
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = (200, 30, 30)
    image[:, w // 2 :] = (30, 30, 200)
    return image


@pytest.mark.parametrize("reach", [26.0, 32.0])
def test_affinity_label_map_crf_snaps_to_colour_edge(reach):
    # Class 1 is the red left half; its CAM fades out across the edge at x = 20 (reach 26:
    # fg stops short of the edge; 32: fg spills over it), leaving an ignore band without CRF.
    h, w = 24, 40
    cams = np.zeros((2, h, w), np.float32)
    cams[0] = np.clip(1 - np.arange(w) / reach, 0, 1)
    cams[1] = 0.9  # class 2 is not an image label: the CRF must not see it
    params = AffinityLabelParams(mode="absolute", conf_fg=0.30, conf_bg=0.05)
    plain = affinity_label_map(cams, [1], params)
    assert (plain == 255).any()
    assert ((plain == 1).sum(axis=1) != w // 2).all()

    refined = affinity_label_map(
        cams, [1], params.model_copy(update={"use_crf": True}), image=two_colour_image(h, w)
    )
    expected = np.zeros((h, w), np.uint8)
    expected[:, : w // 2] = 1
    np.testing.assert_array_equal(refined, expected)

    # CAMs on a coarser grid than the image: the image is resized to the CAMs. Resizing blends
    # the two colours in the two columns at the edge, which may go either way.
    half = affinity_label_map(
        cams[:, ::2, ::2].copy(),
        [1],
        params.model_copy(update={"use_crf": True}),
        image=two_colour_image(h, w),
    )
    assert half.shape == (h // 2, w // 2)
    edge = w // 4
    np.testing.assert_array_equal(half[:, : edge - 1], 1)
    np.testing.assert_array_equal(half[:, edge + 1 :], 0)


def test_reduce_label_map_takes_cell_centres_and_pads_with_ignore():
    label = np.arange(130, dtype=np.uint8).reshape(10, 13)
    reduced = reduce_label_map(label, 4)
    assert reduced.shape == (math.ceil(10 / 4), math.ceil(13 / 4)) == (3, 4)
    for i, j in np.ndindex(*reduced.shape):
        y, x = 4 * i + 2, 4 * j + 2
        assert reduced[i, j] == (label[y, x] if y < 10 and x < 13 else 255)


def test_affinity_example_pads_crop_to_stride_and_reduces_labels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    label = np.zeros((40, 60), np.uint8)
    label[:, 30:] = 1
    params = AugmentParams(resize_long=(60, 60), flip=False, crop_size=50)
    example = affinity_example(image, label, rng, params, stride=8)
    assert example["image"].shape == (3, 56, 56) and example["image"].dtype == np.float32
    assert example["label"].shape == (7, 7) and example["label"].dtype == np.uint8
    # The crop is 50 wide inside the 60-wide image, so grid columns 0..5 (centre pixels 4..44)
    # lie in it and column 6 (pixel 52) in the stride padding. The 40-high image sits somewhere
    # in the 50-high crop: exactly 5 of the 7 rows of cell centres fall on it.
    label = example["label"]
    assert (label[:, 6] == 255).all()
    labelled_rows = (label[:, :6] != 255).all(axis=1)
    assert labelled_rows.sum() == 5 and (label[~labelled_rows] == 255).all()
    assert set(np.unique(label[labelled_rows, :6]).tolist()) == {0, 1}


def test_affinity_loss_on_hand_made_affinities():
    aff = torch.tensor([0.8, 0.6, 0.5, 0.1, 0.3, 0.42], requires_grad=True)
    bg_pos = torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.bool)
    fg_pos = torch.tensor([0, 0, 1, 0, 0, 0], dtype=torch.bool)
    neg = torch.tensor([0, 0, 0, 1, 1, 0], dtype=torch.bool)
    loss, parts = affinity_loss(aff, bg_pos, fg_pos, neg)
    bg = -(math.log(0.8) + math.log(0.6)) / 2
    fg = -math.log(0.5)
    ng = -(math.log(0.9) + math.log(0.7)) / 2
    assert loss.item() == pytest.approx(bg / 4 + fg / 4 + ng / 2, rel=1e-6)
    assert parts == pytest.approx({"bg_pos": bg, "fg_pos": fg, "neg": ng}, rel=1e-6)
    loss.backward()
    assert aff.grad[5] == 0  # unlabelled pair
    assert aff.grad[0] == pytest.approx(-1 / (4 * 2 * 0.8), rel=1e-5)
    assert aff.grad[3] == pytest.approx(1 / (2 * 2 * 0.9), rel=1e-5)


def test_affinity_loss_guards_empty_kinds_and_saturation():
    aff = torch.tensor([0.0, 1.0, 0.5], requires_grad=True)
    none = torch.zeros(3, dtype=torch.bool)
    bg_pos = torch.tensor([True, False, False])
    neg = torch.tensor([False, True, False])
    loss, parts = affinity_loss(aff, bg_pos, none, neg)
    assert parts["fg_pos"] == 0.0
    # a = 0 for a positive and a = 1 for a negative are clamped to a finite cost.
    assert math.isfinite(loss.item()) and parts["bg_pos"] == pytest.approx(-math.log(1e-5))
    loss, parts = affinity_loss(aff, none, none, none)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(aff.grad, torch.zeros(3))
    with pytest.raises(ValueError, match="fg_pos"):
        affinity_loss(aff, bg_pos, torch.zeros(2, dtype=torch.bool), neg)


def test_affinities_match_formula():
    torch.manual_seed(0)
    model = AffinityNet(AffinityNetParams(backbone=RESNET18, radius=3))
    f = torch.randn(2, 5, 6, 7)
    aff = model.affinities(f)
    assert aff.shape == (2, len(offsets(3)), 6, 7)
    for k, (dy, dx) in enumerate(offsets(3)):
        for y, x in np.ndindex(6, 7):
            if 0 <= y + dy < 6 and 0 <= x + dx < 7:
                expected = torch.exp(-(f[:, :, y, x] - f[:, :, y + dy, x + dx]).abs().mean(1))
                torch.testing.assert_close(aff[:, k, y, x], expected)


@pytest.mark.parametrize("stride", [4, 8])
def test_affinity_net_shapes_and_param_groups(stride):
    torch.manual_seed(0)
    params = AffinityNetParams(backbone=RESNET18, feature_stride=stride, level_dims=(8, 8, 16, 16))
    model = AffinityNet(params)
    f = model(torch.randn(2, 3, 48, 64))
    assert f.shape == (2, 48, 48 // stride, 64 // stride)
    with pytest.raises(ValueError, match="multiple of the feature stride"):
        model(torch.randn(1, 3, 50, 64))

    aff = predict_affinity(model, np.zeros((37, 50, 3), np.uint8))
    assert aff.shape == (len(offsets(5)), math.ceil(37 / stride), math.ceil(50 / stride))
    assert aff.dtype == torch.float32 and bool(((aff > 0) & (aff <= 1)).all())

    groups = param_groups(model, 0.01, head_lr_mult=10)
    assert [g["lr"] for g in groups] == [0.01, 0.1]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    assert {id(p) for p in groups[1]["params"]}.isdisjoint(
        id(p) for p in model.backbone.parameters()
    )


def test_affinity_net_params_validation():
    with pytest.raises(pydantic.ValidationError, match="feature_stride"):
        AffinityNetParams(feature_stride=16)
    with pytest.raises(pydantic.ValidationError, match=r"level_dims\[2\]"):
        AffinityNetParams(level_dims=(8, 8, 12, 8))
    with pytest.raises(pydantic.ValidationError):
        AffinityNetParams(unknown=1)


def test_step_loss_rejects_label_grid_mismatch():
    model = AffinityNet(AffinityNetParams(backbone=RESNET18, level_dims=(8, 8, 8, 8)))
    batch = {"image": torch.randn(1, 3, 32, 32), "label": torch.zeros(1, 5, 8, dtype=torch.uint8)}
    with pytest.raises(ValueError, match="label grid"):
        affinity_step_loss(model, batch)


def test_train_affinity_net_checks_samples_and_starts_from_the_given_backbone():
    image = np.zeros((32, 32, 3), np.uint8)
    params = AffinityNetParams(backbone=RESNET18, level_dims=(8, 8, 8, 8))
    train = functools.partial(
        train_affinity_net,
        augment_params=AugmentParams(resize_long=(32, 32), crop_size=32),
        optim_params=OptimParams(epochs=1, batch_size=1, lr=1e-12),
        seed=0,
        device="cpu",
    )
    with pytest.raises(ValueError, match=r"samples\[1\]: label map shape"):
        bad = [(image, np.zeros((32, 32), np.uint8)), (image, np.zeros((16, 32), np.uint8))]
        train(AffinityNet(params), bad)
    torch.manual_seed(123)
    source = build_backbone("resnet18")
    label = np.zeros((32, 32), np.uint8)
    label[:, 16:] = 1
    start = initial_network("affinity", params, 1, backbone_weights=source.state_dict(), seed=0)
    model = train(start, [(image, label)])
    torch.testing.assert_close(model.backbone.conv1.weight, source.conv1.weight)
    with pytest.raises(ValueError, match="do not fit backbone"):
        initial_network(
            "affinity", params, 1, backbone_weights=build_backbone("resnet50").state_dict()
        )


# --- the key behaviour: trained affinities separate objects ------------------------------------

SYNTHETIC = SyntheticParams(n_classes=4, min_side=96, max_side=112)


def cam_like(sample: Sample, rng: np.random.Generator) -> np.ndarray:
    """CAM stand-ins from the ground truth, imperfect like real CAMs: each object's mask is
    weighted by a smooth random field (parts of the object respond weakly), blurred (the map
    spills over the boundary) and normalised to peak 1."""
    h, w = sample.mask.shape
    cams = np.zeros((SYNTHETIC.n_classes, h, w), np.float32)
    for c in sample.labels:
        field = ndimage.zoom(rng.uniform(0.0, 1.0, (4, 4)), (h / 4, w / 4), order=1)[:h, :w]
        cam = ndimage.gaussian_filter((sample.mask == c) * (0.2 + field), sigma=0.04 * min(h, w))
        cams[c - 1] = cam / cam.max()
    return cams


def mean_affinities(model: AffinityNet, samples: list[Sample]) -> tuple[float, float]:
    """Mean predicted affinity of same-object pairs and of pairs across an object boundary,
    with pairs from the ground truth on the feature grid."""
    within, across = [], []
    for sample in samples:
        aff = predict_affinity(model, sample.image)
        _, fg_pos, neg = pair_labels(
            reduce_label_map(sample.mask, model.stride), model.params.radius
        )
        within.append(aff[fg_pos])
        across.append(aff[neg])
    return torch.cat(within).mean().item(), torch.cat(across).mean().item()


@pytest.mark.slow
def test_trained_affinity_net_separates_objects_on_held_out_images():
    rng = np.random.default_rng(0)
    train = [render_sample(0, i, SYNTHETIC) for i in range(40)]
    samples = [
        (s.image, affinity_label_map(cam_like(s, rng), s.labels, AffinityLabelParams()))
        for s in train
    ]
    labelled = [
        (label == s.mask)[label != 255].mean() for s, (_, label) in zip(train, samples, strict=True)
    ]
    # The CAM stand-ins give mostly right but incomplete labels (measured: 98% right, 9% ignore).
    assert np.mean(labelled) > 0.9
    assert np.mean([(label == 255).mean() for _, label in samples]) > 0.03
    held_out = [render_sample(1, i, SYNTHETIC) for i in range(16)]

    # Stride 8 trains in half the time of the default 4 and learns the same way (margin 0.30-0.33
    # at stride 4 with this recipe).
    params = AffinityNetParams(backbone=RESNET18, feature_stride=8)
    torch.manual_seed(0)
    within_before, across_before = mean_affinities(AffinityNet(params).eval(), held_out)
    history = []
    model = train_affinity_net(
        initial_network("affinity", params, SYNTHETIC.n_classes, seed=0),
        samples,
        AugmentParams(resize_long=(80, 112), crop_size=96),
        OptimParams(epochs=6, batch_size=8, lr=0.05),
        seed=0,
        device="cpu",
        on_epoch_end=lambda epoch, metrics: history.append(metrics),
    )
    within, across = mean_affinities(model, held_out)
    # Measured: within 0.61, across 0.31 (margin 0.31; 0.27-0.31 over training seeds 0-2) after
    # about 8 s of training on an idle core; the untrained margin is 0.03; the loss falls from 0.76
    # to 0.39 (0.52x).
    assert within - across > 0.15
    assert within - across > (within_before - across_before) + 0.1
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]


@pytest.mark.parametrize(("h", "w", "radius"), [(7, 6, 3), (3, 2, 4), (9, 9, 5)])
def test_pairwise_l1_matches_autograd_reference(h, w, radius):
    torch.manual_seed(0)
    f = torch.randn(2, 5, h, w, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: PairwiseL1.apply(x, radius), (f,))
    out = PairwiseL1.apply(f, radius)
    reference = torch.stack(
        [(f - shifted(f, dy, dx)).abs().mean(dim=1) for dy, dx in offsets(radius)], dim=1
    )
    valid = pair_valid(h, w, radius)[None].expand_as(out)
    assert torch.allclose(out[valid], reference[valid])
    assert (out[~valid] == 0).all()
