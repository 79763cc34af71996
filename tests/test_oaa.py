"""OAA (`wsss.cam_methods.oaa`) and the seeds a CAM method keeps from training
(`wsss.kept_seeds`): the crop's maps warped back onto the image, accumulation by pointwise maximum
over the epochs, and the CAM stage reading the kept maps."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import shard_rows, synthetic_with_unreadable, tiny_networks, upload_dataset
from pydantic import ValidationError

from pipelines import storage
from pipelines.config import load_config
from pipelines.inputs import load_manifest
from pipelines.label import job as label
from pipelines.model_record import load_network
from pipelines.train import affinity as train_affinity
from pipelines.train import classifier as classifier_job
from pipelines.train import kept_seeds as ray_kept_seeds
from pipelines.train.job import SkippedRows, image_dataset
from wsss import kept_seeds
from wsss.affinity import affinity_label_map
from wsss.cam import CamParams, compute_cams, image_cams
from wsss.cam_methods.oaa import OaaParams, to_image_grid
from wsss.classifier import Classifier, ClassifierParams, train_classifier
from wsss.imageio import decode_mask, read_image
from wsss.labeling import cam_mask
from wsss.training import OptimParams
from wsss.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentParams,
    Placement,
    draw_placement,
    place,
)

torch.set_num_threads(1)
RESNET18 = {"name": "resnet18"}


def _ramps(height: int, width: int) -> np.ndarray:
    """An image whose red is 3 * y and green 2 * x (pixel centres), blue 0."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([3 * ys, 2 * xs, np.zeros_like(ys)], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("seed", range(6))
def test_the_crops_maps_go_back_to_where_the_image_had_them(seed):
    height, width, crop, grid = 60, 100, 64, 25
    image = _ramps(height, width)
    params = AugmentParams(resize_long=(60, 140), crop_size=crop)
    placement = draw_placement((height, width), np.random.default_rng(seed), params)
    placed = place(image, placement, crop)
    # The crop's own red and green as maps over the crop (what a CAM of it would be aligned to).
    channels = torch.from_numpy(placed[:2] * IMAGENET_STD[:2, None, None])
    channels = channels + torch.from_numpy(IMAGENET_MEAN[:2, None, None])
    on_grid, seen = to_image_grid(255 * channels, placement, crop, grid)
    rows, cols = kept_seeds.grid_shape((height, width), grid)
    assert on_grid.shape == (2, rows, cols) == (2, 15, 25) and seen.any()
    ys = (np.arange(rows) + 0.5) * height / rows - 0.5  # the cells' centres in image pixels
    xs = (np.arange(cols) + 0.5) * width / cols - 0.5
    expected = np.stack(np.broadcast_arrays(3 * ys[:, None], 2 * xs[None, :]))
    error = np.abs(on_grid.numpy() - expected)[:, seen.numpy()]
    # Resampling blurs the ramps' ends a little; flipped or not, the values land where they were.
    assert np.median(error) < 1.5 and error.max() < 8, (placement, error.max())
    assert not on_grid[:, ~seen].any()


class _GivenMaps(torch.nn.Module):
    """A classifier whose class score maps are whatever the test sets."""

    def __init__(self, maps: torch.Tensor) -> None:
        super().__init__()
        self.maps = maps

    def __call__(self, x, with_maps=False):
        return self.maps.mean(dim=(2, 3)), self.maps


def _whole_image(size: int) -> np.ndarray:
    """The placement of a crop that is the whole (size, size) image, unflipped."""
    return Placement((size, size), (size, size), False, (0, 0), (0, 0), (size, size)).as_array()


def test_accumulated_maps_are_the_pointwise_maximum_of_the_epochs_maps():
    size, grid = 32, 8
    method = OaaParams(grid=grid, from_epoch=1, predicted_only=False).build((8,))
    method.train()
    generator = torch.Generator().manual_seed(0)
    epochs = [torch.rand(2, 3, 4, 4, generator=generator) for _ in range(4)]
    batch = {
        "image": torch.zeros(2, 3, size, size),
        "targets": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
        "placement": torch.from_numpy(np.stack([_whole_image(size)] * 2)),
        "row": torch.tensor([7, 3]),
    }
    kept_per_epoch = []
    for epoch, maps in enumerate(epochs):
        method.begin_epoch(epoch)
        method.loss(_GivenMaps(maps), batch)
        kept_per_epoch.append(method.epoch_seeds())
    assert len(kept_per_epoch[0]) == 0  # from_epoch 1: the first epoch keeps nothing
    assert [len(k) for k in kept_per_epoch[1:]] == [3, 3, 3]  # the labelled classes only

    def on_grid(maps: torch.Tensor, b: int, c: int) -> np.ndarray:
        m = maps[b, c] / (maps[b, c].max() + 1e-5)  # each epoch's map peaks at 255
        m = F.interpolate(m[None, None], (grid, grid), mode="bilinear", align_corners=False)
        return (m[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()

    merged = kept_seeds.merge(kept_per_epoch)
    assert set(merged) == {(7, 1), (7, 3), (3, 2)}
    for (row, c), kept in merged.items():
        b = [7, 3].index(row)
        expected = np.maximum.reduce([on_grid(maps, b, c - 1) for maps in epochs[1:]])
        np.testing.assert_allclose(kept, expected, atol=1)
        assert kept.max() == 255
    # A resumed run does an epoch again and its files merge in any order: same maps.
    again = kept_seeds.merge([kept_per_epoch[3], kept_per_epoch[2], kept_per_epoch[2]])
    again = kept_seeds.merge([kept_per_epoch[1]], again)
    assert all(np.array_equal(again[k], merged[k]) for k in merged)
    # Stored and read back as files and per-image blobs, nothing changes.
    stored = kept_seeds.KeptMaps.from_bytes(kept_per_epoch[2].to_bytes())
    assert [(r, c) for r, c, _ in stored.entries()] == [
        (r, c) for r, c, _ in kept_per_epoch[2].entries()
    ]
    image = kept_seeds.by_row(merged)[7]
    decoded = kept_seeds.decode(kept_seeds.encode(image))
    assert decoded.keys() == {1, 3} and np.array_equal(decoded[3], merged[(7, 3)])


def test_the_reference_filter_keeps_only_classes_among_the_top_predictions():
    method = OaaParams(grid=4, from_epoch=0).build((8,))
    method.train()
    maps = torch.zeros(1, 3, 4, 4)
    maps[0, 0] = 2.0  # labelled and the top prediction
    maps[0, 1] = -1.0  # labelled, but below the unlabelled class 3
    maps[0, 2] = 1.0
    batch = {
        "image": torch.zeros(1, 3, 16, 16),
        "targets": torch.tensor([[1.0, 1.0, 0.0]]),
        "placement": torch.from_numpy(_whole_image(16)[None]),
        "row": torch.tensor([0]),
    }
    method.begin_epoch(0)
    method.loss(_GivenMaps(maps), batch)
    assert [c for _, c, _ in method.epoch_seeds().entries()] == [1]


def test_the_cam_stage_reads_kept_maps_and_falls_back_to_the_cams():
    torch.manual_seed(0)
    model = Classifier(3, ClassifierParams(backbone=RESNET18)).eval()
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    params = CamParams(scales=(1.0,), flip=False)
    kept = {1: np.zeros((4, 6), np.uint8)}
    kept[1][1, 2] = 200
    cams = image_cams(model, image, [1, 2], params, kept)
    computed = compute_cams(model, image, [1, 2], params)
    assert cams.shape == (3, 40, 60) and not cams[2].any()
    np.testing.assert_array_equal(cams[1], computed[1])  # class 2 kept nothing: its CAM
    assert cams[0].max() == pytest.approx(1.0, abs=1e-4)
    peak = np.unravel_index(cams[0].argmax(), cams[0].shape)
    assert 10 <= peak[0] < 20 and 20 <= peak[1] < 30  # cell (1, 2) of the 4 x 6 grid
    np.testing.assert_array_equal(image_cams(model, image, [1, 2], params, None), computed)


def test_training_in_process_keeps_every_labelled_class_of_every_image():
    rng = np.random.default_rng(0)
    sizes = [(36, 40), (40, 30), (32, 48), (44, 44)]
    samples = [
        (rng.integers(0, 256, (*size, 3), dtype=np.uint8), [1 + i % 2, 3][: 1 + i % 2])
        for i, size in enumerate(sizes)
    ]
    augment = AugmentParams(resize_long=(32, 48), crop_size=32)
    optim = OptimParams(epochs=2, batch_size=2, lr=0.01)
    method = {"name": "oaa", "grid": 10, "from_epoch": 0, "predicted_only": False}
    torch.manual_seed(0)
    model = Classifier(3, ClassifierParams(backbone=RESNET18, method=method))
    kept: dict = {}
    train_classifier(model, samples, augment, optim, seed=0, kept=kept)
    assert set(kept) == {(i, c) for i, (_, labels) in enumerate(samples) for c in labels}
    for (row, _), maps in kept.items():
        assert maps.dtype == np.uint8
        assert maps.shape == kept_seeds.grid_shape(samples[row][0].shape[:2], 10)
    # From an epoch past the last, nothing accumulates: the CAM stage then uses the CAMs.
    late: dict = {}
    model = Classifier(3, ClassifierParams(backbone=RESNET18, method=method | {"from_epoch": 2}))
    train_classifier(model, samples, augment, optim, seed=0, kept=late)
    assert late == {}


def test_oaa_settings_are_checked_and_named():
    assert ClassifierParams(method="oaa").method == OaaParams()
    with pytest.raises(ValidationError, match="method.oaa.grid"):
        ClassifierParams(method={"name": "oaa", "grid": 2})
    with pytest.raises(ValidationError, match="from_epoch"):
        ClassifierParams(method={"name": "oaa", "from_epoch": -1})


# --- under Ray Train and the labeling job ------------------------------------------------------

UNREADABLE = ("synth-000002", "synth-000005")


def _epoch_maps(cfg, root: str) -> dict[str, dict]:
    """Each epoch file's entries under `root` by file name: {(row, class): map}."""
    files = ray_kept_seeds.epoch_files(root, cfg.storage)
    return {
        uri[len(root) + 1 :]: {
            (row, c): m
            for row, c, m in kept_seeds.KeptMaps.from_bytes(
                storage.read_bytes(uri, cfg.storage)
            ).entries()
        }
        for uri in files
    }


def _merged(cfg, uri: str) -> dict[str, dict[int, np.ndarray]]:
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri, cfg.storage)))
    return {
        image_id: kept_seeds.decode(blob)
        for image_id, blob in zip(
            table["image_id"].to_pylist(), table[ray_kept_seeds.SEEDS].to_pylist(), strict=True
        )
    }


@pytest.mark.slow
def test_ray_train_accumulates_across_workers_and_resumption_and_the_label_jobs_use_it(
    ray_cluster, s3_endpoint, tmp_path
):
    manifest = synthetic_with_unreadable(tmp_path / "data", 10, 3, UNREADABLE)
    bucket = upload_dataset(s3_endpoint, manifest.parent)
    overrides = [
        f"dataset.manifest=s3://{bucket}/data/manifest.jsonl",
        f"output=s3://{bucket}/runs",
        f"storage.s3_endpoint_url={s3_endpoint}",
        "name=oaa",
        "ray.train_workers=2",
        "cam.scales=[1.0]",
        "classifier.model.method={name: oaa, grid: 8, from_epoch: 0, predicted_only: false}",
        *tiny_networks(nets=("classifier",)),
        "refiners=[crf]",
        "crf.iterations=2",
        "label.keep_stages=true",
    ]
    cfg = load_config(overrides=overrides)
    rows = load_manifest(cfg).rows
    readable = [r.image_id for r in rows if r.image_id not in UNREADABLE]
    root = cfg.layout.kept_seeds("classifier")

    first = classifier_job.run(cfg, log=lambda _: None)
    epochs = _epoch_maps(cfg, root)
    assert sorted(epochs) == ["epoch_0000/rank_000.npz", "epoch_0000/rank_001.npz"]
    # Every readable image's labelled classes, once per epoch, whichever worker had it.
    entries = [key for maps in epochs.values() for key in maps]
    ids = {rows[row].image_id for row, _ in entries}
    assert len(entries) == len(set(entries)) and ids == set(readable)
    assert first.kept_seeds_uri == storage.join(root, ray_kept_seeds.MERGED)

    # Started again with two more epochs: epoch 0's files stay as they were, the merged maps
    # are the maximum over all three epochs' files.
    before = {name: storage.read_bytes(storage.join(root, name), cfg.storage) for name in epochs}
    longer = load_config(overrides=[*overrides, "classifier.optim.epochs=3"])
    resumed = classifier_job.run(longer, log=lambda _: None)
    assert resumed.metrics["start_epoch"] == 1
    epochs = _epoch_maps(cfg, root)
    assert {name.split("/")[0] for name in epochs} == {"epoch_0000", "epoch_0001", "epoch_0002"}
    assert all(
        storage.read_bytes(storage.join(root, n), cfg.storage) == b for n, b in before.items()
    )
    merged_uri = resumed.kept_seeds_uri
    merged = _merged(cfg, merged_uri)
    assert set(merged) == set(readable)
    # A driver-side job (calibration) reads a few images' maps alone.
    few = ray_kept_seeds.read(resumed.kept_seeds_uri, [*readable[:2], "unknown"], cfg.storage)
    assert few.keys() == set(readable[:2])
    assert all(np.array_equal(few[i][c], merged[i][c]) for i in few for c in merged[i])
    index = {r.image_id: i for i, r in enumerate(rows)}
    for image_id, maps in merged.items():
        for c, kept in maps.items():
            each = [m[(index[image_id], c)] for m in epochs.values() if (index[image_id], c) in m]
            assert len(each) == 3
            np.testing.assert_array_equal(kept, np.maximum.reduce(each))

    # The labeling joins the kept maps to its rows: the CAM stage's masks are those of the
    # merged maps (the classifier's own CAMs for the images it could not read in training).
    summary = label.run(longer, log=lambda _: None)
    assert summary["labelled"] == len(readable)
    classifier = load_network(longer.layout.record("classifier"), longer, "classifier")
    classes = resumed.classes
    from_cams = 0
    for row in shard_rows(longer, "labels").to_pylist():
        image = read_image(manifest.parent / "images" / f"{row['image_id']}.png")
        labels = [classes.index(name) for name in row["labels"]]
        cams = image_cams(classifier, image, labels, longer.cam, merged[row["image_id"]])
        expected = cam_mask(cams, longer.cam.background)
        np.testing.assert_array_equal(decode_mask(row["mask_cam"]), expected)
        plain = cam_mask(compute_cams(classifier, image, labels, longer.cam), longer.cam.background)
        from_cams += np.array_equal(plain, expected)
    assert from_cams < len(readable)  # the kept maps, not the CAMs

    # AffinityNet's labels come from the same kept maps: the join, then the labeling actor.
    # Its images' rows, as the AffinityNet job streams them (`image_dataset` with the merged
    # file), carry the kept maps; the unreadable ones are skipped before.
    streamed = image_dataset(load_manifest(longer), longer, SkippedRows.remote(), merged_uri)
    carried = {r["image_id"]: r[ray_kept_seeds.SEEDS] for r in streamed.take_all()}
    assert carried.keys() == set(readable)
    assert all(kept_seeds.decode(carried[i]).keys() == merged[i].keys() for i in readable)
    actor = train_affinity.AffinityLabeler(resumed, longer)
    for image_id in readable[:3]:
        image = read_image(manifest.parent / "images" / f"{image_id}.png")
        labels = sorted(merged[image_id])
        blob = kept_seeds.encode(merged[image_id])
        cams = image_cams(classifier, image, labels, longer.cam, merged[image_id])
        expected = affinity_label_map(cams, labels, longer.affinity.labels, image)
        np.testing.assert_array_equal(actor.label_map(image, labels, blob), expected)
