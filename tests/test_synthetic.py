import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from wsss import synthetic
from wsss.synthetic import DESIGNS, SyntheticParams, class_names, generate, render_sample
from wsss.visualize import PALETTE, colorize, contact_sheet, heatmap, overlay

DEFAULT = SyntheticParams()
PART_BLACK, PART_WHITE = (20, 20, 20), (240, 240, 240)


@pytest.fixture(scope="module")
def samples():
    """300 samples of the default dataset (about 1.5 s)."""
    return [render_sample(3, i, DEFAULT) for i in range(300)]


def _is_colour(image, rgb):
    return (image == np.array(rgb, np.uint8)).all(axis=-1)


# --- determinism ------------------------------------------------------------------------------


def test_same_seed_and_index_give_identical_samples_and_others_differ():
    a, b = render_sample(11, 5), render_sample(11, 5)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.mask.tobytes() == b.mask.tobytes()
    assert a.labels == b.labels and a.objects == b.objects
    for other in (render_sample(12, 5), render_sample(11, 6)):
        assert other.image.shape != a.image.shape or not np.array_equal(other.image, a.image)


def test_first_samples_do_not_depend_on_dataset_size(tmp_path):
    small = generate(tmp_path / "small", 3, seed=4)
    large = generate(tmp_path / "large", 6, seed=4)
    small_rows = small.read_text().splitlines()
    assert large.read_text().splitlines()[:3] == small_rows
    for row in map(json.loads, small_rows):
        for key in ("image", "mask"):
            a = (small.parent / row[key]).read_bytes()
            assert a == (large.parent / row[key]).read_bytes()


# --- labels, classes, objects -----------------------------------------------------------------


def test_labels_are_exactly_the_classes_visible_above_min_area(samples):
    min_pixels_fraction = DEFAULT.min_label_area
    for i, s in enumerate(samples):
        h, w = s.mask.shape
        assert DEFAULT.min_side <= min(h, w) and max(h, w) <= DEFAULT.max_side
        assert s.image.shape == (h, w, 3) and s.image.dtype == np.uint8 and s.mask.dtype == np.uint8
        counts = np.bincount(s.mask.ravel(), minlength=256)
        expected = tuple(
            c for c in range(1, DEFAULT.n_classes + 1) if counts[c] >= min_pixels_fraction * h * w
        )
        assert s.labels == expected, f"sample {i}"
        assert s.labels, f"sample {i} has no label"
        assert set(np.unique(s.mask)) <= {0, 255, *s.labels}, f"sample {i}"


def test_small_visible_remnants_become_ignore_not_labels():
    params = SyntheticParams(min_label_area=0.06, max_objects=4)
    with_ignore = 0
    for i in range(60):
        s = render_sample(0, i, params)
        counts = np.bincount(s.mask.ravel(), minlength=256)
        assert all(counts[c] >= 0.06 * s.mask.size for c in s.labels)
        assert set(np.unique(s.mask)) <= {0, 255, *s.labels}
        # Every drawn class is either a label or was reduced to ignore pixels.
        assert {o.class_index for o in s.objects} >= set(s.labels)
        with_ignore += counts[255] > 0
    assert with_ignore >= 3


def test_every_class_appears_with_balanced_frequency(samples):
    freq = Counter(c for s in samples for c in s.labels)
    assert set(freq) == set(range(1, DEFAULT.n_classes + 1))
    mean = sum(freq.values()) / DEFAULT.n_classes
    assert all(0.7 * mean <= n <= 1.3 * mean for n in freq.values()), freq


def test_object_counts_and_sizes_span_their_ranges(samples):
    counts = Counter(len(s.objects) for s in samples)
    assert set(counts) == set(range(1, DEFAULT.max_objects + 1))
    sizes = np.array([o.size / min(s.mask.shape) for s in samples for o in s.objects])
    assert sizes.min() >= DEFAULT.min_size - 1e-9 and sizes.max() <= DEFAULT.max_size + 1e-9
    assert (sizes < 0.3).mean() > 0.15 and (sizes > 0.55).mean() > 0.15
    areas = np.array([(s.mask == c).mean() for s in samples for c in s.labels])
    assert (areas < 0.03).any() and (areas > 0.2).any()


def test_single_object_setting_and_class_subset():
    params = SyntheticParams(n_classes=3, max_objects=1)
    assert class_names(params) == ["background", *(d.name for d in DESIGNS[:3])]
    for i in range(40):
        s = render_sample(1, i, params)
        assert len(s.objects) == 1 and s.labels == (s.objects[0].class_index,)
        assert 1 <= s.labels[0] <= 3


def test_every_object_carries_its_part_and_distractors_never_do():
    # Parts are the only pixels painted exactly in the part black and white (no noise, no
    # shading), so they mark where the discriminative cue is.
    params = SyntheticParams(noise_sigma=0, max_distractors=3, decoy_fraction=0.7)
    with_both = 0
    for i in range(80):
        s = render_sample(2, i, params)
        part = _is_colour(s.image, PART_BLACK) | _is_colour(s.image, PART_WHITE)
        assert not (part & (s.mask == 0)).any(), f"sample {i}: part colours outside objects"
        with_both += all(
            _is_colour(s.image, PART_BLACK)[s.mask == c].any()
            and _is_colour(s.image, PART_WHITE)[s.mask == c].any()
            for c in s.labels
        )
    # Parts cut by the image border or hidden by a later shape are the exceptions.
    assert with_both >= 0.8 * 80


def test_mean_colour_does_not_identify_the_class():
    params = SyntheticParams(max_objects=1, max_distractors=0)
    colours, classes = [], []
    for i in range(300):
        s = render_sample(5, i, params)
        colours.append(s.image[s.mask == s.labels[0]].mean(axis=0))
        classes.append(s.labels[0])
    colours, classes = np.array(colours), np.array(classes)
    train, test = slice(0, 150), slice(150, 300)
    centroids = np.stack([colours[train][classes[train] == c].mean(0) for c in range(1, 7)])
    distance = ((colours[test][:, None] - centroids[None]) ** 2).sum(-1)
    accuracy = (distance.argmin(1) + 1 == classes[test]).mean()
    assert accuracy < 0.35  # chance is 1/6


def test_boundary_band_marks_only_pixels_near_class_changes():
    exact = render_sample(7, 0, SyntheticParams())
    banded = render_sample(7, 0, SyntheticParams(boundary_ignore=2))
    band = banded.mask == 255
    assert band.any()
    assert np.array_equal(banded.mask[~band], exact.mask[~band])
    edge = np.zeros_like(band)
    edge[:, 1:] |= exact.mask[:, 1:] != exact.mask[:, :-1]
    edge[1:, :] |= exact.mask[1:, :] != exact.mask[:-1, :]
    near_edge = np.zeros_like(band)
    ys, xs = np.nonzero(edge)
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            y, x = np.clip(ys + dy, 0, band.shape[0] - 1), np.clip(xs + dx, 0, band.shape[1] - 1)
            near_edge[y, x] = True
    assert not (band & ~near_edge).any()
    assert banded.labels == exact.labels


def test_invalid_parameters_and_arguments_are_rejected():
    for bad in (
        {"n_classes": 0},
        {"n_classes": len(DESIGNS) + 1},
        {"min_size": 0.8, "max_size": 0.5},
        {"min_side": 300, "max_side": 200},
        {"colour": 3},
    ):
        with pytest.raises(ValidationError):
            SyntheticParams(**bad)
    with pytest.raises(ValueError, match="seed"):
        render_sample(-1, 0)
    with pytest.raises(ValueError, match="image_format"):
        generate("unused", 1, 0, image_format="bmp")


# --- files ------------------------------------------------------------------------------------


def test_generate_writes_the_manifest_layout(tmp_path):
    params = SyntheticParams(n_classes=4)
    manifest = generate(tmp_path / "ds", 4, seed=9, params=params)
    assert manifest == tmp_path / "ds" / "manifest.jsonl"
    names = (tmp_path / "ds" / "classes.txt").read_text().splitlines()
    assert names == class_names(params) and names[0] == "background" and len(names) == 5
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["image_id"] for r in rows] == [f"synth-{i:06d}" for i in range(4)]
    for i, row in enumerate(rows):
        assert set(row) == {"image_id", "image", "labels", "mask"}
        sample = render_sample(9, i, params)
        with Image.open(manifest.parent / row["mask"]) as mask:
            assert mask.mode == "L"
            assert np.array_equal(np.asarray(mask), sample.mask)
        with Image.open(manifest.parent / row["image"]) as image:
            assert row["image"].endswith(".png")
            assert np.array_equal(np.asarray(image.convert("RGB")), sample.image)
        assert row["labels"] == [names[c] for c in sample.labels]


def test_generate_jpeg_images(tmp_path):
    manifest = generate(tmp_path, 2, seed=1, image_format="jpg")
    row = json.loads(manifest.read_text().splitlines()[1])
    assert row["image"] == "images/synth-000001.jpg" and row["mask"] == "masks/synth-000001.png"
    with Image.open(tmp_path / row["image"]) as image:
        assert image.format == "JPEG"
        decoded = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert np.abs(decoded - render_sample(1, 1).image).mean() < 12


def test_write_preview(tmp_path):
    path = synthetic.write_preview(tmp_path / "sub" / "preview.png", 0, n=4)
    with Image.open(path) as sheet:
        assert sheet.mode == "RGB" and sheet.width > 4 * 200 and sheet.height > 200


# --- visualisation ----------------------------------------------------------------------------


def test_palette_is_distinct_with_black_background_and_white_ignore():
    assert PALETTE.shape == (256, 3) and PALETTE.dtype == np.uint8
    assert len({tuple(c) for c in PALETTE}) == 256
    used = PALETTE[[*range(22), 255]].astype(int)
    distance = np.sqrt(((used[:, None] - used[None]) ** 2).sum(-1))
    assert distance[~np.eye(len(used), dtype=bool)].min() >= 60
    mask = np.array([[0, 1, 255]], np.uint8)
    assert colorize(mask).tolist() == [[[0, 0, 0], [128, 0, 0], [255, 255, 255]]]
    with pytest.raises(ValueError, match="2-D"):
        colorize(np.zeros((2, 2, 3), np.uint8))


def test_overlay_blends_only_labelled_pixels():
    image = np.full((2, 3, 3), 100, np.uint8)
    mask = np.array([[0, 2, 255], [0, 0, 1]], np.uint8)
    out = overlay(image, mask, alpha=0.25)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert (out[mask == 0] == 100).all()
    assert out[0, 1].tolist() == [75, 107, 75]  # 0.75 * 100 + 0.25 * (0, 128, 0)
    assert np.array_equal(overlay(image, mask, alpha=0.0), image)
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, mask, alpha=1.5)
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, mask[:, :2], alpha=0.5)


def test_heatmap_maps_scores_from_blue_to_red():
    scores = np.linspace(0, 1, 101).reshape(1, -1)
    out = heatmap(scores)
    assert out.shape == (1, 101, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [0, 0, 128] and out[0, -1].tolist() == [128, 0, 0]
    assert out[0, 50].tolist() == [128, 255, 128]
    # From full blue (0.125) to full red (0.875) the colour only gets warmer.
    warmth = out[0, 13:88, 0].astype(int) - out[0, 13:88, 2].astype(int)
    assert (np.diff(warmth) >= 0).all() and warmth[0] < -200 and warmth[-1] > 200
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        heatmap(np.array([[0.0, 1.5]]))
    with pytest.raises(ValueError, match="NaN"):
        heatmap(np.array([[np.nan]]))


def test_contact_sheet_places_fitted_tiles_and_captions():
    red = np.zeros((10, 20, 3), np.uint8)
    red[..., 0] = 255
    blue = np.zeros((40, 40, 3), np.uint8)
    blue[..., 2] = 255
    rows = [[red, blue], [blue]]
    plain = contact_sheet(rows, tile_size=(30, 30), pad=2)
    assert plain.shape == (2 * 32 + 2, 2 * 32 + 2, 3) and plain.dtype == np.uint8
    assert plain[2 + 15, 2 + 15].tolist() == [255, 0, 0]  # red tile, centred, enlarged
    assert plain[2 + 1, 2 + 15].tolist() == [255, 255, 255]  # letterbox above the wide tile
    assert plain[2 + 15, 34 + 15].tolist() == [0, 0, 255]
    captioned = contact_sheet(rows, [["a red tile", "blue"], ["blue again"]], (30, 30), pad=2)
    assert captioned.shape[0] > plain.shape[0] and captioned.shape[1] == plain.shape[1]
    caption_strip = captioned[2 + 30 : 2 + 30 + 14, 2 : 2 + 30]
    assert (caption_strip < 128).any()  # text was drawn under the first tile
    with pytest.raises(ValueError, match=r"row 1, column 0"):
        contact_sheet([[red], [np.zeros((5, 5), np.uint8)]])
    with pytest.raises(ValueError, match="row 0"):
        contact_sheet([[red, blue]], [["only one"]])
