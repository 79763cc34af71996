"""`wsss relabel` on the local S3 server: a second run on the same night labels nothing, added
or rewritten images are labelled and nothing else."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import boto3
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.orc as paorc
import pyarrow.parquet as pq
import pytest
from conftest import upload_dataset

from pipelines import shards, storage
from pipelines.config import ConfigError, load_config
from pipelines.label import rows as label_rows
from pipelines.lease import LeaseHeld, leased
from pipelines.model_record import save_model
from pipelines.relabel import inventory
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

    # The same night with the listing read from an S3 Inventory report made before synth-000006
    # was uploaded: the report agrees with the objects it names and the image it lacks is asked
    # for its version (a report is as of its date), so nothing is new.
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    keys = [f"data/images/synth-00000{i}.png" for i in range(6)]
    lines = "".join(
        f'"{bucket}","{key}","{s3.head_object(Bucket=bucket, Key=key)["ETag"].strip(chr(34))}"\n'
        for key in keys
    )
    s3.create_bucket(Bucket=f"{bucket}-inventory")
    files = {"1.csv": lines.encode()}
    report = _inventory(s3, f"{bucket}-inventory", bucket, "CSV", files, "Bucket, Key, ETag")
    # Given the inventory configuration's folder, the newest report is read.
    _inventory(s3, f"{bucket}-inventory", bucket, "CSV", {}, "Bucket, Key", "2026-11-01T01-00Z")
    configuration = report.rsplit("/", 2)[0] + "/"
    reported = relabel.run(
        other, date="2026-11-21", listing=listing, inventory=configuration, **quiet
    )
    assert reported["new_or_changed"] == 0 and reported["skipped"] == 7
    assert reported["inventory"] == report and reported["objects_without_manifest_row"] == 0
    with pytest.raises(ConfigError, match="needs --listing"):
        relabel.run(other, date="2026-11-21", inventory=report, **quiet)

    # A second relabel beside a running one (a cron overlap) is refused before it plans.
    with leased(root, cfg.storage, "nightly", "wsss relabel", 600, 0, lambda _: None):
        with pytest.raises(LeaseHeld, match="held by nightly on"):
            relabel.run(cfg, date="2026-11-21", **quiet)
    assert len(fs.get_file_info(pafs.FileSelector(folder))) == 6  # it recorded no run


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


INVENTORY_CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, ETag"
INVENTORY_PARQUET_SCHEMA = (
    "message s3.inventory { required binary bucket (STRING); required binary key (STRING); "
    "optional boolean is_latest; optional binary e_tag (STRING);}"
)


def _inventory(
    s3,
    bucket: str,
    source: str,
    fmt: str,
    files: dict[str, bytes],
    schema: str | None = None,
    date: str = "2026-12-06T01-00Z",
) -> str:
    """An S3 Inventory report of the bucket `source` in `bucket`, dated `date`: its data files
    and its manifest.json, as S3 writes them; returns the manifest's URI."""
    base = f"inventory/{source}/daily/{date}"
    for name, body in files.items():
        s3.put_object(Bucket=bucket, Key=f"{base}/files/{name}", Body=body)
    manifest = {
        "sourceBucket": source,
        "destinationBucket": f"arn:aws:s3:::{bucket}",
        "version": "2016-11-30",
        "creationTimestamp": "1796605200000",
        "fileFormat": fmt,
        "fileSchema": schema
        or (INVENTORY_CSV_SCHEMA if fmt == "CSV" else INVENTORY_PARQUET_SCHEMA),
        "files": [{"key": f"{base}/files/{name}", "size": 1, "MD5checksum": "x"} for name in files],
    }
    s3.put_object(Bucket=bucket, Key=f"{base}/manifest.json", Body=json.dumps(manifest))
    return f"s3://{bucket}/{base}/manifest.json"


def test_an_inventory_report_gives_the_listing_of_the_current_image_objects(s3_endpoint, s3_bucket):
    import gzip

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    source = f"{s3_bucket}-images"
    s3.create_bucket(Bucket=source)
    for key in ("data/images/a.png", "data/images/b c+d.jpg", "data/images/notes.txt"):
        s3.put_object(Bucket=source, Key=key, Body=key.encode())
    s3.put_object(Bucket=source, Key="other/x.png", Body=b"x")
    etag = {
        k: s3.head_object(Bucket=source, Key=k)["ETag"].strip('"')
        for k in ("data/images/a.png", "data/images/b c+d.jpg", "other/x.png")
    }
    config = StorageConfig(s3_endpoint_url=s3_endpoint)
    prefix = f"s3://{source}/data/images"
    listed = pa.concat_tables(relabel_rows.list_versions(prefix, config)).to_pylist()

    # CSV, in two gzipped files, keys URL-encoded: an older version of a.png and a deleted
    # image (a versioned bucket's report has both), a text file and an object outside the
    # prefix are left out.
    lines = [
        ["data/images/a.png", "v2", "true", "false", "17", etag["data/images/a.png"]],
        ["data/images/a.png", "v1", "false", "false", "9", "0ld"],
        ["data/images/b+c%2Bd.jpg", "v1", "true", "false", "21", etag["data/images/b c+d.jpg"]],
    ]
    more = [
        ["data/images/gone.png", "v3", "true", "true", "0", ""],
        ["data/images/notes.txt", "v1", "true", "false", "21", "e1"],
        ["other/x.png", "v1", "true", "false", "1", etag["other/x.png"]],
    ]

    def csv_gz(rows):
        text = "".join(",".join(f'"{v}"' for v in [source, *row]) + "\n" for row in rows)
        return gzip.compress(text.encode())

    report = _inventory(
        s3, s3_bucket, source, "CSV", {"1.csv.gz": csv_gz(lines), "2.csv.gz": csv_gz(more)}
    )
    rows = pa.concat_tables(inventory.inventory_versions(report, prefix, config)).to_pylist()
    by_image = lambda rows: sorted(rows, key=lambda r: r["image"])  # noqa: E731
    assert by_image(rows) == by_image(listed)  # what listing the prefix gives
    assert len(rows) == 2

    # Parquet, as S3 names the columns there (flags as booleans).
    table = pa.table(
        {
            "bucket": [source] * 2,
            "key": ["data/images/a.png", "data/images/b c+d.jpg"],
            "is_latest": [True, True],
            "e_tag": [etag["data/images/a.png"], etag["data/images/b c+d.jpg"]],
        }
    )
    for fmt, write in (("Parquet", pq.write_table), ("ORC", paorc.write_table)):
        buffer = pa.BufferOutputStream()
        write(table, buffer)
        files = {f"1.{fmt.lower()}": buffer.getvalue().to_pybytes()}
        report = _inventory(s3, s3_bucket, source, fmt, files)
        rows = pa.concat_tables(inventory.inventory_versions(report, prefix, config))
        assert by_image(rows.to_pylist()) == by_image(listed)

    # A report of another bucket, or one without ETags, cannot give the listing.
    with pytest.raises(ConfigError, match="lists the bucket"):
        next(inventory.inventory_versions(report, f"s3://{s3_bucket}/data", config))
    bare = _inventory(
        s3, s3_bucket, source, "CSV", {"1.csv": b""}, "Bucket, Key, Size", "2026-12-07T01-00Z"
    )
    with pytest.raises(ConfigError, match="no ETag field"):
        next(inventory.inventory_versions(bare, prefix, config))
    # The folder of an inventory configuration: its newest dated report.
    folder = f"s3://{s3_bucket}/inventory/{source}/daily"
    assert inventory.inventory_manifest(folder, config) == bare  # the day after the others
    with pytest.raises(ConfigError, match="no report"):
        inventory.inventory_manifest(f"s3://{s3_bucket}/inventory/elsewhere", config)
