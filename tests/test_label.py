"""`wsss label` on the local Ray instance and S3 server: shards out, bad inputs as error rows,
re-runs that add nothing, a killed run started again, and masks equal to the in-process ones.

The model records name untrained networks (seeded), written the way a finished training writes
them: training is `tests/test_train.py`'s subject and takes minutes on two cores, while the
labeling pipeline only needs a record, its checkpoint and its class list.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from conftest import WORKER_DIES_ON, model_records, shard_rows, tiny_label_overrides
from PIL import Image

from pipelines import reader, shards, storage
from pipelines.cli import main
from pipelines.config import RunConfig, load_config
from pipelines.label import job as label
from pipelines.label import rows as label_rows
from pipelines.lease import leased
from pipelines.model_record import load_network
from pipelines.runtime import InsufficientResourcesError
from pipelines.storage import StorageConfig
from wsss import synthetic
from wsss.imageio import decode_mask, read_image
from wsss.synthetic import SyntheticParams

pytestmark = pytest.mark.slow

N_IMAGES = 56
# image_id -> (stage, error_type) of every input that cannot be labelled.
BAD = {
    "synth-000001": ("decode", "ImageDecodeError"),  # zero bytes
    "synth-000002": ("decode", "ImageDecodeError"),  # truncated
    "synth-000003": ("decode", "ImageDecodeError"),  # not an image
    "synth-000004": ("decode", "ImageTooLargeError"),  # 100 x 100 > MAX_PIXELS
    "missing": ("fetch", "FileNotFoundError"),  # not in the bucket
    "zebra": ("manifest", "ManifestError"),  # label not in the class list
    "synth-000006": ("manifest", "DuplicateImageId"),  # a second row has its image_id
}
MALFORMED_LINE = '{"image": "images/synth-000008.png", "labels": [}'
EXTRA_ROWS = [
    {"image_id": "missing", "image": "images/missing.png", "labels": []},
    {"image_id": "zebra", "image": "images/synth-000005.png", "labels": ["zebra"]},
    {"image_id": "synth-000006", "image": "images/synth-000007.png", "labels": []},
]
INPUT_ROWS = N_IMAGES + len(EXTRA_ROWS) + 1
ERRORS = len(BAD) + 1  # and the malformed line
LABELLED = N_IMAGES - 5  # synth-000001..4 unreadable, synth-000006 duplicated


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """56 synthetic images, four of them spoilt, and four extra manifest rows."""
    params = SyntheticParams(n_classes=3, min_side=48, max_side=64, max_objects=2)
    manifest = synthetic.generate(tmp_path_factory.mktemp("data"), N_IMAGES, 2, params)
    images = manifest.parent / "images"
    (images / "synth-000001.png").write_bytes(b"")
    truncated = images / "synth-000002.png"
    truncated.write_bytes(truncated.read_bytes()[:80])
    (images / "synth-000003.png").write_bytes(b"GIF? no, plain text")
    Image.new("RGB", (100, 100), (9, 9, 9)).save(images / "synth-000004.png")
    with manifest.open("a") as f:
        for row in EXTRA_ROWS:
            f.write(json.dumps(row) + "\n")
        f.write(MALFORMED_LINE + "\n")
    return manifest.parent


@pytest.fixture(scope="module")
def cfg(ray_cluster, s3_endpoint, data_dir) -> RunConfig:
    """Dataset and run folder in a fresh bucket; the model records in the run's models/."""
    bucket = f"label-{time.time_ns()}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    for path in data_dir.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"data/{path.relative_to(data_dir)}")
    manifest = f"s3://{bucket}/data/manifest.jsonl"
    cfg = load_config(overrides=tiny_label_overrides(manifest, f"s3://{bucket}/runs", s3_endpoint))
    model_records(cfg, (data_dir / "classes.txt").read_text().split())
    return cfg


@pytest.fixture(scope="module")
def first_run(cfg) -> dict:
    return label.run(cfg, log=lambda _: None)


def manifest_ids(data_dir: Path) -> set[str]:
    ids = set()
    for line in (data_dir / "manifest.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        ids.add(record.get("image_id") or Path(record["image"]).with_suffix("").as_posix())
    return ids


def test_every_input_row_ends_in_labels_or_errors_with_the_shard_schema(cfg, first_run):
    summary = first_run
    assert summary["input"] == INPUT_ROWS
    assert (summary["labelled"], summary["errors"], summary["skipped"]) == (LABELLED, ERRORS, 1)
    assert summary["skipped_by_reason"] == {"duplicate": 1}
    assert summary["input"] == summary["labelled"] + summary["errors"] + summary["skipped"]
    assert summary["config_hash"] == cfg.hash() and len(summary["model_version"]) == 16
    assert summary["images_per_s"] > 0 and any("ModelActor" in name for name in summary["stages"])
    saved = json.loads(storage.read_bytes(f"{cfg.run_uri}/label_summary.json", cfg.storage))
    assert saved == summary
    per_run = f"{cfg.run_uri}/label_runs/{summary['run_id']}.json"
    assert json.loads(storage.read_bytes(per_run, cfg.storage)) == summary

    labels, errors = shard_rows(cfg, "labels"), shard_rows(cfg, "errors")
    assert labels.schema.remove_metadata() == shards.labels_schema(cfg.stages)
    assert summary["method_stages"] == ["cam", "random_walk", "crf"]
    assert errors.schema.remove_metadata() == shards.ERRORS_SCHEMA
    metadata = labels.schema.metadata
    assert json.loads(metadata[b"wsss.classes"])[0] == "background"
    assert metadata[b"wsss.schema_version"] == shards.SCHEMA_VERSION.encode()
    assert labels.num_rows == LABELLED and errors.num_rows == ERRORS
    ids = labels.column("image_id").to_pylist() + errors.column("image_id").to_pylist()
    assert len(ids) == len(set(ids))  # no image_id twice in the output
    assert len(shards.shard_files(cfg.run_uri, "labels", cfg.storage)) > 1
    for row in labels.to_pylist():
        mask = decode_mask(row["mask"])
        assert mask.shape == (row["height"], row["width"])
        assert set(np.unique(mask)) <= {0, 1, 2, 3, 255}
        assert 0 <= row["confidence"] <= 1 and 0 <= row["ignore_fraction"] <= 1
        assert row["mask_cam"] is None and row["mask_rw"] is None
        assert row["model_version"] == summary["model_version"]
        assert row["image"].startswith("s3://") and row["image"].endswith(".png")


def test_bad_inputs_become_error_rows_naming_stage_and_type(first_run, cfg):
    errors = {row["image_id"]: row for row in shard_rows(cfg, "errors").to_pylist()}
    for image_id, (stage, error_type) in BAD.items():
        assert (errors[image_id]["stage"], errors[image_id]["error_type"]) == (stage, error_type)
    assert "empty data" in errors["synth-000001"]["message"]
    assert "truncated" in errors["synth-000002"]["message"]
    assert "not an image" in errors["synth-000003"]["message"]
    assert "max_pixels 5000" in errors["synth-000004"]["message"]
    assert "unknown class 'zebra'" in errors["zebra"]["message"]
    assert "2 manifest rows" in errors["synth-000006"]["message"]
    malformed = [row for image_id, row in errors.items() if image_id.startswith("manifest-row-")]
    assert len(malformed) == 1 and "malformed JSON" in malformed[0]["message"]
    assert all(row["model_version"] == first_run["model_version"] for row in errors.values())


def test_masks_are_those_of_the_in_process_pipeline(first_run, cfg, data_dir):
    networks = {n: load_network(f"{cfg.run_uri}/models/{n}.json", cfg, n) for n in cfg.networks}
    labeler = cfg.labeler(networks)
    classes = (data_dir / "classes.txt").read_text().split()
    labelled = shard_rows(cfg, "labels").to_pylist()
    assert len({row["mask"] for row in labelled}) > 1  # not one constant mask
    for row in labelled:
        image = read_image(data_dir / "images" / f"{row['image_id']}.png")
        indices = [classes.index(name) for name in row["labels"]]
        expected = labeler.label(image, indices)
        np.testing.assert_array_equal(decode_mask(row["mask"]), expected.mask, row["image_id"])
        assert row["confidence"] == pytest.approx(expected.confidence, rel=1e-6)


def test_second_run_adds_nothing_and_counts_every_row_skipped(first_run, cfg):
    before = {
        kind: shards.shard_files(cfg.run_uri, kind, cfg.storage)
        for kind in (shards.LABELS, shards.ERRORS)
    }
    again = label.run(cfg, log=lambda _: None)
    assert (again["labelled"], again["errors"]) == (0, 0)
    assert again["skipped"] == again["input"] == INPUT_ROWS
    assert again["skipped_by_reason"] == {"already_done": INPUT_ROWS}
    assert again["model_version"] == first_run["model_version"]
    after = {
        kind: shards.shard_files(cfg.run_uri, kind, cfg.storage)
        for kind in (shards.LABELS, shards.ERRORS)
    }
    assert after == before


def test_force_relabels_once_more_keeping_the_stages_and_a_crf_pool_gives_the_same_masks(
    first_run, cfg
):
    old = {row["image_id"]: row["mask"] for row in shard_rows(cfg, "labels").to_pylist()}
    # The first run finished each image in the model actors (no GPUs); this one hands the walks
    # to a CRF pool of its own, as on GPUs.
    pooled = cfg.model_copy(update={"label": cfg.label.model_copy(update={"crf_pool": True})})
    forced = label.run(pooled, force=True, keep_stages=True, log=lambda _: None)
    assert forced["crf_pool"] and not first_run["crf_pool"]
    assert any("Finisher" in name for name in forced["stages"])
    assert (forced["labelled"], forced["errors"], forced["skipped"]) == (LABELLED, ERRORS, 1)
    assert forced["retired_files"] > 0
    labels = shard_rows(cfg, "labels").to_pylist()
    assert sorted(row["image_id"] for row in labels) == sorted(old)  # each once, as before
    assert shard_rows(cfg, "errors").num_rows == ERRORS
    superseded = f"{cfg.run_uri}/{shards.SUPERSEDED_DIR}/{forced['run_id']}"
    assert shards.shard_files(superseded, "labels", cfg.storage)  # moved, not deleted
    for row in labels:
        assert row["mask"] == old[row["image_id"]]  # same models, same masks
        for column in ("mask_cam", "mask_rw"):
            assert decode_mask(row[column]).shape == (row["height"], row["width"])


def test_readers_yield_image_and_mask_arrays(first_run, cfg):
    dataset = reader.PseudoLabelDataset(cfg.run_uri, cfg.storage)
    assert len(dataset) == LABELLED
    stored = {row["image_id"]: row for row in shard_rows(cfg, "labels").to_pylist()}
    for index in (0, 17, len(dataset) - 1):
        item = dataset[index]
        row = stored[item["image_id"]]
        assert item["image"].shape == (row["height"], row["width"], 3)
        assert item["image"].dtype == np.uint8
        np.testing.assert_array_equal(item["mask"], decode_mask(row["mask"]))
    with pytest.raises(IndexError):
        dataset[LABELLED]

    streamed = reader.read_pseudo_labels(cfg.run_uri, cfg.storage, batch_size=16).take_all()
    assert sorted(row["image_id"] for row in streamed) == sorted(stored)
    for row in streamed:
        height, width = stored[row["image_id"]]["height"], stored[row["image_id"]]["width"]
        assert row["image"].shape == (height, width, 3) and row["mask"].shape == (height, width)
    raw = shards.read_shard_rows(cfg.run_uri, cfg.storage, "errors", model_version=None)
    assert raw.count() == ERRORS


def test_killed_run_started_again_ends_with_one_row_per_image(
    first_run, cfg, data_dir, tmp_path, s3_endpoint
):
    out = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "label",
        *(
            arg
            for item in tiny_label_overrides(cfg.dataset.manifest, cfg.output, s3_endpoint)
            for arg in ("--set", item)
        ),
        "--set",
        f"ray.address={ray.get_runtime_context().gcs_address}",
        "--set",
        "label.min_rows_per_file=4",
        "--out",
        str(out),
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ)
    )
    try:
        deadline = time.monotonic() + 240
        while not shards.shard_files(str(out), "labels", cfg.storage):
            assert process.poll() is None, "the run ended before any shard was written"
            assert time.monotonic() < deadline, "no shard after 240 s"
            time.sleep(0.1)
    finally:
        process.kill()
        process.wait()
    assert not (out / shards.SUMMARY_FILE).exists(), "the run finished before it was killed"
    written = shard_rows(cfg, "labels", str(out)).num_rows
    assert 0 < written < LABELLED
    # A shard a killed writer left half-written is never read (only finished files count).
    (out / "labels" / "0_killed_000000.parquet.tmp").write_bytes(b"PAR1 truncated")
    deadline = time.monotonic() + 60  # Ray releases the killed job's workers
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)

    restarted = label.run(cfg, out_uri=str(out), log=lambda _: None)
    assert restarted["input"] == INPUT_ROWS
    assert restarted["skipped_by_reason"]["already_done"] >= written
    assert restarted["labelled"] + restarted["skipped_by_reason"]["already_done"] >= LABELLED
    labels, errors = shard_rows(cfg, "labels", str(out)), shard_rows(cfg, "errors", str(out))
    ids = labels.column("image_id").to_pylist() + errors.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == INPUT_ROWS - 1  # one duplicate row is skipped for good
    assert set(ids) >= manifest_ids(data_dir)
    assert labels.num_rows == LABELLED and errors.num_rows == ERRORS


def test_transient_fetch_errors_are_retried_by_the_next_run_and_superseded(
    ray_cluster, data_dir, tmp_path
):
    from moto.server import ThreadedMotoServer

    quiet = {"log": lambda _: None}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint, bucket = f"http://{host}:{port}", f"flaky-{time.time_ns()}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    originals = [
        json.loads(line) for line in (data_dir / "manifest.jsonl").read_text().splitlines()[10:16]
    ]
    folder = tmp_path / "flaky"
    folder.mkdir()
    (folder / "classes.txt").write_text((data_dir / "classes.txt").read_text())
    with (folder / "manifest.jsonl").open("w") as manifest:
        for row in originals:
            s3.upload_file(str(data_dir / row["image"]), bucket, row["image"])
            uri = f"s3://{bucket}/{row['image']}"
            manifest.write(json.dumps(row | {"image": uri}) + "\n")
    overrides = tiny_label_overrides(
        str(folder / "manifest.jsonl"), str(tmp_path / "runs"), endpoint
    )
    flaky = load_config(overrides=[*overrides, "storage.s3_max_attempts=1"])
    model_records(flaky, (data_dir / "classes.txt").read_text().split())

    server.stop()  # the object store goes down: every fetch fails, for now
    down = label.run(flaky, **quiet)
    assert (down["labelled"], down["errors"], down["transient_errors"]) == (0, 6, 6)
    failed = shard_rows(flaky, "errors").to_pylist()
    assert {(r["stage"], r["transient"]) for r in failed} == {("fetch", True)}

    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()  # back, on the same port, with the same objects
    try:
        back = label.run(flaky, **quiet)  # no --force
        again = label.run(flaky, **quiet)
    finally:
        server.stop()
    assert (back["labelled"], back["errors"], back["superseded_rows"]) == (6, 0, 6)
    assert not shards.shard_files(flaky.run_uri, "errors", flaky.storage)  # superseded, kept aside
    assert list((tmp_path / "runs" / "tiny" / shards.SUPERSEDED_DIR).rglob("*.parquet"))
    ids = shard_rows(flaky, "labels").column("image_id").to_pylist()
    assert sorted(ids) == sorted(r["image_id"] for r in originals)
    assert (again["labelled"], again["errors"], again["skipped"]) == (0, 0, 6)


def test_a_row_that_kills_its_worker_becomes_an_error_row_and_the_job_finishes(
    first_run, cfg, data_dir, tmp_path
):
    rows_in = [
        json.loads(line) for line in (data_dir / "manifest.jsonl").read_text().splitlines()[10:15]
    ]
    poison = rows_in[2] | {"image_id": WORKER_DIES_ON}
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        "".join(
            json.dumps(r | {"image": str(data_dir / r["image"])}) + "\n" for r in [*rows_in, poison]
        )
    )
    (tmp_path / "classes.txt").write_text((data_dir / "classes.txt").read_text())
    out = str(tmp_path / "out")
    summary = label.run(cfg, input_uri=str(manifest), out_uri=out, log=lambda _: None)
    assert (summary["input"], summary["labelled"], summary["errors"]) == (6, 5, 1)
    (died,) = shard_rows(cfg, "errors", out).to_pylist()
    assert (died["image_id"], died["error_type"]) == (WORKER_DIES_ON, "WorkerDied")
    assert "died 2 times" in died["message"] and not died["transient"]
    assert sorted(shard_rows(cfg, "labels", out).column("image_id").to_pylist()) == sorted(
        r["image_id"] for r in rows_in
    )


def test_two_runs_started_together_end_with_one_row_per_image(first_run, cfg, tmp_path):
    out = str(tmp_path / "together")
    patient = cfg.model_copy(update={"label": cfg.label.model_copy(update={"lease_wait_s": 600})})
    summaries: list[dict] = []
    start = threading.Barrier(2)

    def run_one() -> None:
        start.wait()
        summaries.append(label.run(patient, out_uri=out, log=lambda _: None))

    threads = [threading.Thread(target=run_one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # One labelled everything while the other waited for its lease, then found nothing to do.
    first, second = sorted(summaries, key=lambda s: s["labelled"], reverse=True)
    assert (first["labelled"], second["labelled"], second["errors"]) == (LABELLED, 0, 0)
    labels, errors = shard_rows(cfg, "labels", out), shard_rows(cfg, "errors", out)
    ids = labels.column("image_id").to_pylist() + errors.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == INPUT_ROWS - 1
    assert not first["lease_lost"] and not second["lease_lost"]


def test_a_run_beside_a_running_one_exits_3_naming_it(first_run, cfg, tmp_path, capsys):
    out = str(tmp_path / "busy")
    with leased(out, cfg.storage, "nightly-run", "wsss relabel", 600, 0, lambda _: None):
        code = main(
            [
                "label",
                *(
                    a
                    for item in tiny_label_overrides(
                        cfg.dataset.manifest, cfg.output, cfg.storage.s3_endpoint_url
                    )
                    for a in ("--set", item)
                ),
                "--set",
                f"ray.address={ray.get_runtime_context().gcs_address}",
                "--out",
                out,
            ]
        )
    assert code == 3
    assert "is held by nightly-run on" in capsys.readouterr().err
    assert not shards.shard_files(out, "labels", cfg.storage)


# --- without Ray ------------------------------------------------------------------------------


def bucket(*rows_: dict) -> pa.Table:
    """Rows as the anti-join gets them: with their bucket (one bucket for all)."""
    table = pa.Table.from_pylist(list(rows_), schema=label_rows.ROW_SCHEMA)
    return label_rows.with_bucket(table, buckets=1)


def test_anti_join_skips_done_images_and_fails_duplicates():
    row = label_rows.manifest_row("a", "s3://b/a.png", ["cat"])
    marker = label_rows.manifest_row("a", None, [], "done_marker")
    assert label_rows.resolve_bucket(bucket(row)).to_pylist() == [row]
    assert label_rows.resolve_bucket(bucket(marker)).num_rows == 0
    skipped = label_rows.resolve_bucket(bucket(row, marker, row)).column("outcome").to_pylist()
    assert skipped == [label_rows.ALREADY_DONE] * 2
    other = row | {"image": "s3://b/0.png"}
    first, second = label_rows.resolve_bucket(bucket(row, other)).to_pylist()
    assert (first["outcome"], first["error_type"], first["image"]) == (
        label_rows.ERROR,
        "DuplicateImageId",
        "s3://b/0.png",
    )
    assert second["outcome"] == label_rows.DUPLICATE


def test_anti_join_resolves_each_image_id_of_a_bucket_on_its_own():
    fresh = [label_rows.manifest_row(f"new{i}", f"new{i}.png", ["cat"]) for i in range(3)]
    done = label_rows.manifest_row("done", "done.png", ["dog"])
    twice = [label_rows.manifest_row("twice", f"t{i}.png", ["cat"]) for i in (2, 1, 3)]
    markers = [label_rows.manifest_row(i, None, [], "done_marker") for i in ("done", "gone")]
    out = label_rows.resolve_bucket(bucket(*fresh, done, *twice, *markers, fresh[0] | {}))
    outcomes = sorted((r["image_id"], r["image"], r["outcome"]) for r in out.to_pylist())
    assert outcomes == [
        ("done", "done.png", label_rows.ALREADY_DONE),
        ("new0", "new0.png", label_rows.DUPLICATE),  # listed twice with one image: still
        ("new0", "new0.png", label_rows.ERROR),  # a duplicate
        ("new1", "new1.png", label_rows.OK),
        ("new2", "new2.png", label_rows.OK),
        ("twice", "t1.png", label_rows.ERROR),
        ("twice", "t2.png", label_rows.DUPLICATE),
        ("twice", "t3.png", label_rows.DUPLICATE),
    ]
    assert out.schema == label_rows.ROW_SCHEMA


def test_a_row_whose_key_changed_is_labelled_again_and_replaces_its_old_row():
    settings = "settings-digest"
    key = label_rows.row_key(["cat"], "etag-1", settings)
    assert (
        len(
            {
                key,
                label_rows.row_key(["cat", "dog"], "etag-1", settings),  # labels changed
                label_rows.row_key(["cat"], "etag-2", settings),  # the image changed
                label_rows.row_key(["cat"], "etag-1", "other settings"),  # mask settings changed
                label_rows.row_key(["cat"], None, settings),
            }
        )
        == 5
    )
    row = label_rows.manifest_row("a", "a.png", ["cat"], key=key)
    old = label_rows.manifest_row("a", None, [], "done_marker", key="old-key")
    (changed,) = label_rows.resolve_bucket(bucket(row, old)).to_pylist()
    assert (changed["outcome"], changed["replaces"]) == (label_rows.OK, True)
    same = old | {"row_key": key}
    legacy = old | {"row_key": None}  # a file from before keys: done for any key
    for marker in (same, legacy):
        (done,) = label_rows.resolve_bucket(bucket(row, old, marker)).to_pylist()
        assert done["outcome"] == label_rows.ALREADY_DONE


def test_supersede_removes_the_replaced_rows_and_keeps_the_files_as_they_were(tmp_path):
    folders = {kind: tmp_path / kind for kind in (shards.LABELS, shards.ERRORS)}
    for folder in folders.values():
        folder.mkdir()
    labels_file = folders[shards.LABELS] / "v_r1_000000.parquet"
    errors_file = folders[shards.ERRORS] / "v_r1_000000.parquet"
    pq.write_table(pa.table({"image_id": ["a", "b"], "mask": [b"1", b"2"]}), labels_file)
    pq.write_table(pa.table({"image_id": ["c"], "message": ["down"]}), errors_file)
    files = [str(labels_file), str(errors_file)]
    assert label_rows.supersede(str(tmp_path), StorageConfig(), files, "r2", set()) == 0
    removed = label_rows.supersede(str(tmp_path), StorageConfig(), files, "r2", {"a", "c", "z"})
    assert removed == 2
    assert pq.read_table(labels_file).to_pylist() == [{"image_id": "b", "mask": b"2"}]
    assert not errors_file.exists()  # nothing left in it
    aside = tmp_path / shards.SUPERSEDED_DIR / "r2"
    assert pq.read_table(aside / shards.LABELS / labels_file.name).num_rows == 2
    assert pq.read_table(aside / shards.ERRORS / errors_file.name).num_rows == 1


def test_anti_join_buckets_are_stable_and_in_range():
    table = pa.Table.from_pylist(
        [label_rows.manifest_row(f"img{i}", "x.png", []) for i in range(200)],
        schema=label_rows.ROW_SCHEMA,
    )
    keys = label_rows.with_bucket(table, buckets=8)[label_rows.BUCKET].to_pylist()
    assert set(keys) == set(range(8))  # 200 ids fill every one of 8 buckets
    # crc32, not hash(): the same image_id lands in the same bucket in every process
    assert keys[:3] == [zlib.crc32(f"img{i}".encode()) % 8 for i in range(3)]


def test_manifest_records_are_validated_row_by_row():
    index = {"background": 0, "cat": 1, "dog": 2}
    good = label_rows.validate_record(
        {"image": "x/a.png", "labels": ["dog", "cat"]}, index, "s3://b", "", "s"
    )
    assert (good["image_id"], good["image"], good["labels"]) == (
        "x/a",
        "s3://b/x/a.png",
        ["cat", "dog"],
    )
    assert good["outcome"] == label_rows.OK
    bad = label_rows.validate_record(
        {"image": "a.png", "labels": "cat", "size": 3}, index, "/r", "raw", "s"
    )
    assert (bad["image_id"], bad["outcome"], bad["error_stage"]) == (
        "a.png",
        label_rows.ERROR,
        "manifest",
    )
    assert "labels: must be a list" in bad["error_message"] and "size" in bad["error_message"]
    anonymous = label_rows.validate_record([1], index, "/r", "[1]", "s")
    assert anonymous["image_id"].startswith("manifest-row-") and anonymous["image"] == ""
    assert (
        label_rows.validate_record([1], index, "/r", "[1]", "s") == anonymous
    )  # found again by a re-run
    # Lone surrogates, which JSON admits and Parquet does not: error rows, not a crashed job.
    lines = [
        r'{"image_id": "\ud800", "image": "a.png", "labels": ["cat"]}',
        r'{"image": "b\udfff.png", "labels": ["cat"]}',
        r'{"image": "c.png", "labels": ["\ud800"]}',
        '{"image": "d.png", "labels": ["dog"]}',
    ]
    table = label_rows.rows_from_lines(pa.table({"text": lines}), index, "/r", "s")
    got = table.select(["image_id", "image", "outcome"]).to_pylist()
    assert [r["outcome"] for r in got] == [label_rows.ERROR] * 3 + [label_rows.OK]
    assert got[0]["image_id"] == "a.png" and got[1]["image_id"].startswith("manifest-row-")
    assert got[2]["image_id"] == "c.png" and got[3]["image_id"] == "d"
    assert "not valid Unicode" in table.column("error_message")[0].as_py()


def test_steps_without_a_model_never_import_torch():
    # Ray's task workers import the module of each step they run: these stay free of torch.
    code = (
        "import sys, pipelines.label.rows, pipelines.relabel.rows, pipelines.shards; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_more_model_actors_or_gpus_than_the_cluster_has_fail_fast(first_run, cfg):
    too_many = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"model_actors": 64})})
    with pytest.raises(InsufficientResourcesError, match=r"ray.model_actors 64 .* cluster has 4"):
        label.run(too_many, out_uri=f"{cfg.run_uri}/never", log=lambda _: None)
    gpus = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"use_gpu": True})})
    with pytest.raises(InsufficientResourcesError, match="GPUs .* cluster has 0"):
        label.run(gpus, out_uri=f"{cfg.run_uri}/never", log=lambda _: None)
    assert not storage.exists(f"{cfg.run_uri}/never", cfg.storage)


def test_cli_without_model_records_names_them_and_exits_2(tmp_path, capsys):
    code = main(["label", "--set", f"output={tmp_path}", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "classifier model record" in err and "--classifier" in err
    assert not (tmp_path / "out").exists()


def test_only_fetch_failures_outside_the_image_are_transient_and_not_done(tmp_path):
    assert label_rows.is_transient("fetch", "OSError")  # connection refused, 5xx, throttled
    assert label_rows.is_transient("fetch", "PermissionError")
    for stage, error_type in [
        ("fetch", "FileNotFoundError"),
        ("decode", "ImageDecodeError"),
        ("manifest", "ManifestError"),
        ("crf", "MemoryError"),
    ]:
        assert not label_rows.is_transient(stage, error_type)
    errors = tmp_path / shards.ERRORS
    errors.mkdir()
    base = {"image": "", "stage": "fetch", "error_type": "OSError", "message": "down"}
    pq.write_table(
        pa.Table.from_pylist(
            [
                base | {"image_id": "retry", "transient": True},
                base | {"image_id": "final", "transient": False},
            ]
        ),
        errors / "v_new_000000.parquet",
    )
    pq.write_table(  # schema version 1: no `transient` column, every row final
        pa.Table.from_pylist([{k: v for k, v in base.items()} | {"image_id": "old"}]),
        errors / "v_old_000000.parquet",
    )
    paths = pa.table({"path": sorted(str(p) for p in errors.iterdir())})
    markers = label_rows.done_markers_of_files(paths, str(tmp_path), StorageConfig())
    keys = sorted((m["image_id"], m["row_key"]) for m in markers.to_pylist())
    # Final errors stand for any key (their files are from before keys); the transient one's
    # marker matches no key, so its image is tried again and its row replaced.
    assert keys == [("final", None), ("old", None), ("retry", "retry")]
    retry = label_rows.manifest_row("retry", "r.png", [], key="k")
    (marker,) = [m for m in markers.to_pylist() if m["image_id"] == "retry"]
    (again,) = label_rows.resolve_bucket(bucket(retry, marker)).to_pylist()
    assert again["outcome"] == label_rows.OK and again["replaces"]
