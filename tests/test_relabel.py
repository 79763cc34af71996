"""`wsss relabel` on the local S3 server: a second run on the same night labels nothing, added
or rewritten images are labelled and nothing else."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import boto3
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import upload_dataset

from pipelines import shards, storage
from pipelines.config import load_config
from pipelines.label import rows as label_rows
from pipelines.lease import LeaseHeld, leased
from pipelines.model_record import save_model
from pipelines.relabel import job as relabel
from pipelines.relabel import rows as relabel_rows
from pipelines.storage import StorageConfig
from wsss import synthetic
from wsss.affinity import AffinityNet
from wsss.classifier import Classifier
from wsss.synthetic import SyntheticParams

pytestmark = pytest.mark.slow
PARAMS = SyntheticParams(n_classes=2, min_side=40, max_side=48, max_objects=1)


def labelled_ids(night: str, cfg) -> list[str]:
    """image_ids of every labels/ and errors/ row of a dated shard set."""
    fs, _ = storage.filesystem(night, cfg.storage)
    ids = []
    for kind in (shards.LABELS, shards.ERRORS):
        for path in shards.shard_files(night, kind, cfg.storage, model_version=None):
            with fs.open_input_file(path) as f:
                ids += pq.read_table(f, columns=["image_id"]).column("image_id").to_pylist()
    return sorted(ids)


def test_relabel_labels_only_what_is_new_or_changed(ray_cluster, s3_endpoint, tmp_path):
    data = tmp_path / "data"
    synthetic.generate(data, 5, seed=2, params=PARAMS)
    with (data / "manifest.jsonl").open("a") as manifest:  # two rows no run can label
        manifest.write('{"image_id": "bad-class", "image": "images/x.png", "labels": ["zebra"]}\n')
        manifest.write("{not json\n")
    bucket = upload_dataset(s3_endpoint, data)
    cfg = load_config(
        overrides=[
            f"dataset.manifest=s3://{bucket}/data/manifest.jsonl",
            f"output=s3://{bucket}/runs",
            f"storage.s3_endpoint_url={s3_endpoint}",
            "cam.scales=[1.0]",
            "affinity.model.feature_stride=8",
            "crf.iterations=1",
            "random_walk.logt=3",
        ]
    )
    classes = (data / "classes.txt").read_text().split()
    models = storage.join(cfg.run_uri, "imported")
    # Untrained networks: relabel decides what to label, not how well.
    save_model(Classifier(len(classes) - 1, cfg.classifier.model), classes, cfg, models + "/c")
    save_model(AffinityNet(cfg.affinity.model), classes, cfg, models + "/a")
    root = cfg.layout.relabel
    quiet = {"log": lambda _: None}

    first = relabel.run(cfg, date="2026-11-20", **quiet)
    assert (first["input"], first["new_or_changed"], first["invalid_manifest_rows"]) == (7, 5, 2)
    assert first["labelled"] + first["errors"] == 7 and first["skipped"] == 0
    night = storage.join(root, "2026-11-20")
    ids = labelled_ids(night, cfg)
    assert len(ids) == 7 and [i for i in ids if i.startswith("synth-")] == [
        f"synth-{i:06d}" for i in range(5)
    ]
    fs, _ = storage.filesystem(night, cfg.storage)
    invalid = []
    for path in shards.shard_files(night, shards.ERRORS, cfg.storage, model_version=None):
        with fs.open_input_file(path) as f:
            invalid += [r for r in pq.read_table(f).to_pylist() if r["stage"] == "manifest"]
    assert sorted(row["image_id"][:13] for row in invalid) == ["bad-class", "manifest-row-"]
    assert any("unknown class 'zebra'" in row["message"] for row in invalid)

    # Run again the same night, with the versions from a listing of the images' prefix, as the
    # nightly job over millions of images takes them: they agree with the per-image requests of
    # the first run, so nothing is new; the image object that has no manifest row yet is named,
    # not labelled.
    synthetic.generate(data, 7, seed=2, params=PARAMS)  # sample i depends on (seed, i) only
    upload_dataset(s3_endpoint, data, bucket, ["images/synth-000005.png"])
    listing = f"s3://{bucket}/data/images"
    again = relabel.run(cfg, date="2026-11-20", listing=listing, **quiet)
    assert again["new_or_changed"] == again["invalid_manifest_rows"] == 0
    assert again["skipped"] == again["input"] == 7 and again["labelled"] == again["errors"] == 0
    assert len(labelled_ids(night, cfg)) == 7  # no new rows
    assert again["objects_without_manifest_row"] == 1
    assert again["objects_without_manifest_row_examples"] == [f"{listing}/synth-000005.png"]

    # Two images added to the manifest (one of them uploaded just now) and one rewritten.
    (data / "images" / "synth-000001.png").write_bytes(
        (data / "images" / "synth-000006.png").read_bytes()
    )
    changed = ["manifest.jsonl", *(f"images/synth-00000{i}.png" for i in (1, 6))]
    upload_dataset(s3_endpoint, data, bucket, changed)
    next_night = relabel.run(cfg, date="2026-11-21", listing=listing, **quiet)
    assert next_night["new_or_changed"] == 3 and next_night["objects_without_manifest_row"] == 0
    assert labelled_ids(storage.join(root, "2026-11-21"), cfg) == [
        "synth-000001",
        "synth-000005",
        "synth-000006",
    ]
    fs, folder = storage.filesystem(storage.join(root, relabel.RUNS), cfg.storage)
    records = sorted(info.path for info in fs.get_file_info(pafs.FileSelector(folder)))
    assert len(records) == 3  # one record per run, the empty one included
    last = json.loads(storage.read_bytes("s3://" + records[-1], cfg.storage))
    assert last["run_id"] == next_night["run_id"] and last["date"] == "2026-11-21"

    # The same night, an image rewritten a second time and another image's labels changed: both
    # are labelled again into the same dated set, and their first rows there superseded.
    (data / "images" / "synth-000001.png").write_bytes(
        (data / "images" / "synth-000003.png").read_bytes()
    )
    manifest = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    relabelled = manifest[2]
    relabelled["labels"] = [c for c in classes[1:] if c not in relabelled["labels"]]
    (data / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in manifest))
    upload_dataset(s3_endpoint, data, bucket, ["manifest.jsonl", "images/synth-000001.png"])
    again = relabel.run(cfg, date="2026-11-21", listing=listing, **quiet)
    assert (again["new_or_changed"], again["labelled"] + again["errors"]) == (2, 2)
    night = storage.join(root, "2026-11-21")
    ids = ["synth-000001", "synth-000002", "synth-000005", "synth-000006"]
    assert labelled_ids(night, cfg) == ids  # one row per image
    # Other mask settings: every row is labelled again (tonight, into the same set).
    other = cfg.model_copy(update={"crf": cfg.crf.model_copy(update={"iterations": 2})})
    redone = relabel.run(other, date="2026-11-21", listing=listing, **quiet)
    assert redone["new_or_changed"] == 7 and redone["skipped"] == 0
    assert labelled_ids(night, cfg) == [f"synth-{i:06d}" for i in range(7)]

    # A second relabel beside a running one (a cron overlap) is refused before it plans.
    with leased(root, cfg.storage, "nightly", "wsss relabel", 600, 0, lambda _: None):
        with pytest.raises(LeaseHeld, match="held by nightly on"):
            relabel.run(cfg, date="2026-11-21", **quiet)
    assert len(fs.get_file_info(pafs.FileSelector(folder))) == 5  # it recorded no run


def test_listing_streams_image_objects_with_the_versions_a_request_gives(s3_endpoint, tmp_path):
    data = tmp_path / "data"
    synthetic.generate(data, 3, seed=1, params=PARAMS)
    (data / "images" / "notes.txt").write_text("not an image")
    bucket = upload_dataset(s3_endpoint, data)
    config = StorageConfig(s3_endpoint_url=s3_endpoint)
    for prefix in (f"s3://{bucket}/data/images/", str(data / "images")):
        listing = pa.concat_tables(relabel_rows.list_versions(prefix, config)).to_pylist()
        names = sorted(row["image"].rsplit("/", 1)[1] for row in listing)
        assert names == [f"synth-00000{i}.png" for i in range(3)]
        for row in listing:
            assert row["source_version"] == relabel_rows.source_version(row["image"], config)
    # A prefix is a folder: "images" does not list "images2/".
    assert (
        relabel_rows.listing_folder(f"s3://{bucket}/data/images") == f"s3://{bucket}/data/images/"
    )
    assert relabel_rows.source_version(f"s3://{bucket}/data/images/nope.png", config) == "missing"


def test_an_s3_listing_in_key_ranges_lists_every_object_once(s3_endpoint, s3_bucket):
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    keys = [f"images/{i:04d}.jpg" for i in range(2100)] + ["images/sub/x.png", "images2/y.jpg"]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=s3_bucket, Key=key, Body=key), keys))
    config = StorageConfig(s3_endpoint_url=s3_endpoint)
    prefix = f"s3://{s3_bucket}/images"
    whole = pa.concat_tables(relabel_rows.list_versions(prefix, config)).to_pylist()
    assert len(whole) == 2101  # 3 pages of S3's 1000; not images2/
    # Cuts from a sample: existing keys, a key that is not there, one outside the prefix, and
    # cuts close together (ranges of more than a page, of less, and of nothing).
    sample = [f"{prefix}/{i:04d}.jpg" for i in (1999, 10, 11, 500, 2099)]
    sample += [f"{prefix}/0500b.jpg", f"s3://{s3_bucket}/images2/y.jpg"]
    cuts = relabel_rows.listing_boundaries(sample, 4)
    assert cuts == [f"{prefix}/0011.jpg", f"{prefix}/0500b.jpg", f"{prefix}/2099.jpg"]
    for boundaries in (cuts, sample):
        ranged = relabel_rows.list_versions(prefix, config, boundaries)
        rows = pa.concat_tables(ranged).to_pylist()
        assert sorted(rows, key=lambda r: r["image"]) == sorted(whole, key=lambda r: r["image"])


def test_rows_a_listing_lacks_are_missing_under_its_folder_and_asked_elsewhere(tmp_path):
    image = tmp_path / "other" / "a.png"
    image.parent.mkdir()
    image.write_bytes(b"\x89PNG")
    batch = pa.Table.from_pylist(
        [
            {"image_id": "listed", "image": "s3://b/images/x.png", "source_version": "etag-1"},
            {"image_id": "gone", "image": "s3://b/images/y.png", "source_version": None},
            {"image_id": "elsewhere", "image": str(image), "source_version": None},
        ]
    ).append_column("labels", pa.array([["cat"]] * 3))
    out = relabel_rows.with_source_versions(
        batch, StorageConfig(), "m1", mask_settings="s", listed="s3://b/images/"
    )
    versions = dict(
        zip(
            out.column("image_id").to_pylist(),
            out.column("source_version").to_pylist(),
            strict=True,
        )
    )
    assert versions["listed"] == "etag-1" and versions["gone"] == "missing"
    assert versions["elsewhere"] == relabel_rows.source_version(str(image), StorageConfig())
    assert versions["elsewhere"].startswith("4-")  # size and mtime of the local file
    assert out.column("model_version").to_pylist() == ["m1"] * 3
    # Keyed as `wsss label` keys the night manifest's rows, which carry these versions.
    assert out.column("row_key")[0].as_py() == label_rows.row_key(["cat"], "etag-1", "s")
