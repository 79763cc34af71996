"""`wsss export` on shards written here: the files it writes are the shards' masks and the
sources' images, in the layouts other trainers read; an unreadable source is reported, not lost
among the others."""

from __future__ import annotations

import io
import json
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SHARD_VERSION, write_label_shard
from PIL import Image

from pipelines import shards
from pipelines.cli import main
from pipelines.export import export_name
from wsss import synthetic
from wsss.imageio import decode_mask, read_image
from wsss.synthetic import SyntheticParams

pytestmark = pytest.mark.slow
N_IMAGES = 5


@pytest.fixture()
def labelled(tmp_path) -> tuple[Path, dict]:
    """Shards of 5 synthetic images (masks: their ground truth) and their rows by image_id."""
    params = SyntheticParams(n_classes=3, min_side=40, max_side=56, max_objects=2)
    data_dir = synthetic.generate(tmp_path / "data", N_IMAGES, 7, params).parent
    out = tmp_path / "labelled"
    write_label_shard(out, data_dir, lambda truth: truth)
    table = pq.read_table(next((out / shards.LABELS).iterdir()))
    return out, {row["image_id"]: row for row in table.to_pylist()}


def export(labels: Path, out: str, *options: str) -> int:
    return main(
        ["export", "--labels", str(labels), "--out", out, "--model-version", SHARD_VERSION]
        + list(options)
    )


def test_png_folder_on_s3_holds_the_shards_masks_and_the_source_images(
    ray_cluster, s3_endpoint, s3_bucket, labelled
):
    labels, rows = labelled
    out = f"s3://{s3_bucket}/export"
    assert export(labels, out, "--set", f"storage.s3_endpoint_url={s3_endpoint}") == 0
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")

    def read(key: str) -> bytes:
        return s3.get_object(Bucket=s3_bucket, Key=f"export/{key}")["Body"].read()

    for image_id, row in rows.items():
        assert read(f"masks/{image_id}.png") == row["mask"]  # the shard's bytes, unchanged
        assert read(f"images/{image_id}.png") == Path(row["image"]).read_bytes()
    assert read("names.txt").decode().split() == sorted(rows)
    palette = json.loads(read("palette.json"))
    classes = (labels.parent / "data/classes.txt").read_text().split()
    assert palette["classes"] == classes and classes[0] == "background"
    assert palette["ignore_index"] == 255 and len(palette["palette"]) == 4
    summary = json.loads(read("export.json"))
    assert summary["exported"] == N_IMAGES and summary["failed"] == 0


def test_voc_layout_and_an_unreadable_source_reported_while_the_rest_export(
    ray_cluster, labelled, tmp_path
):
    labels, rows = labelled
    missing = sorted(rows)[1]
    Path(rows[missing]["image"]).unlink()  # its source is gone since it was labelled
    out = tmp_path / "voc"
    assert export(labels, str(out), "--format", "voc") == 1
    exported = sorted(set(rows) - {missing})
    assert (out / "ImageSets/Segmentation/train.txt").read_text().split() == exported
    for image_id in exported:
        mask = Image.open(out / f"SegmentationClass/{image_id}.png")
        assert mask.mode == "P"  # VOC's palette PNGs; their indices are the shard's classes
        np.testing.assert_array_equal(np.asarray(mask), decode_mask(rows[image_id]["mask"]))
        # The PNG sources encoded as JPEG (quality 95): the source's pixels, so encoded.
        reference = io.BytesIO()
        Image.fromarray(read_image(rows[image_id]["image"])).save(reference, "JPEG", quality=95)
        assert (out / f"JPEGImages/{image_id}.jpg").read_bytes() == reference.getvalue()
    assert not (out / f"JPEGImages/{missing}.jpg").exists()
    (failure,) = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert failure["image_id"] == missing and "FileNotFoundError" in failure["error"]
    summary = json.loads((out / "export.json").read_text())
    assert (summary["exported"], summary["failed"]) == (N_IMAGES - 1, 1)


def test_names_are_flat_distinct_and_map_back_to_their_ids():
    from urllib.parse import unquote

    ids = ["a/b", "a%2Fb", "a b", "ü.x", "..", "plain-id_1.2"]
    names = [export_name(i) for i in ids]
    assert all("/" not in n for n in names) and len(set(names)) == len(ids)
    assert [unquote(n) for n in names] == ids
    assert export_name("plain-id_1.2") == "plain-id_1.2"


def test_an_unknown_format_fails_before_any_work(labelled, tmp_path):
    labels, _ = labelled
    assert export(labels, str(tmp_path / "x"), "--format", "coco") == 2
    assert not (tmp_path / "x").exists()
