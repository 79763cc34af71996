"""Shared fixtures and helpers: a local S3 server (moto on 127.0.0.1), the session's local Ray,
tiny configurations and model records, and test-wide torch settings."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    import pyarrow as pa

    from pipelines.config import RunConfig

# The CI machine has 2 cores; several torch threads per test only thrash.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """URL of an S3-compatible server on loopback, with fake credentials in the environment."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the local S3 server; returns its name."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


WORKER_DIES_ON = "kills-its-worker"


def ray_test_settings() -> None:
    """What the tests' Ray processes inherit from this one: call it before a Ray starts."""
    # Ray Train polls its workers this often; the default 2 s dominates the teardown of tiny runs.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # A labeling actor that meets this image_id kills its process (pipelines.label.job): the
    # workers inherit it from here.
    os.environ["WSSS_TEST_WORKER_DIES_ON"] = WORKER_DIES_ON


def _start_session_ray() -> None:
    from pipelines.runtime import start_local_ray

    ray_test_settings()
    start_local_ray(4, include_dashboard=False)  # as `wsss` starts a local Ray


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint: str) -> dict:
    """One local Ray instance for the whole session (two on one machine break each other).

    4 logical CPUs on the 2-core machine, so training workers and actor pools leave room for
    Ray Data's tasks. It starts after the S3 server, so its processes inherit the credentials.
    Returns the cluster's resources."""
    import ray

    _start_session_ray()
    yield ray.cluster_resources()
    ray.shutdown()


@pytest.fixture(scope="module")
def without_session_ray(s3_endpoint: str) -> None:
    """For a module that starts a Ray cluster of its own (tests/test_multinode.py): a process is
    connected to one Ray at a time and two on one machine break each other, so the session's
    local Ray, when an earlier module started it, is stopped for the module and started again
    after it. The S3 server is up first, so the module's Ray inherits the credentials."""
    import ray

    running = ray.is_initialized()
    ray.shutdown()
    ray_test_settings()
    yield
    ray.shutdown()
    if running:
        _start_session_ray()


def upload_dataset(
    endpoint: str, folder: Path, bucket: str | None = None, names: list[str] | None = None
) -> str:
    """Upload a local dataset `folder` (every file, or `names` relative to it) under `data/` of
    `bucket` on the local S3 server, creating a fresh bucket when none is given; returns the
    bucket's name."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    if bucket is None:
        bucket = f"data-{time.time_ns()}"
        s3.create_bucket(Bucket=bucket)
    paths = [folder / n for n in names] if names else [p for p in folder.rglob("*") if p.is_file()]
    for path in paths:
        s3.upload_file(str(path), bucket, f"data/{path.relative_to(folder)}")
    return bucket


def synthetic_with_unreadable(folder: Path, n: int, seed: int, unreadable: tuple[str, str]) -> Path:
    """`n` small synthetic images (3 classes, 48-64 px) and their manifest under `folder`, the
    image of `unreadable[0]` not an image and that of `unreadable[1]` truncated; the manifest's
    path."""
    from wsss import synthetic
    from wsss.synthetic import SyntheticParams

    params = SyntheticParams(n_classes=3, min_side=48, max_side=64, max_objects=2)
    manifest = synthetic.generate(folder, n, seed, params)
    images = manifest.parent / "images"
    (images / f"{unreadable[0]}.png").write_bytes(b"not an image at all")
    truncated = images / f"{unreadable[1]}.png"
    truncated.write_bytes(truncated.read_bytes()[:80])
    return manifest


def tiny_networks(
    crop: int = 48, longest: int = 64, nets: tuple[str, ...] = ("classifier", "affinity")
) -> list[str]:
    """Overrides for ResNet-18 networks `nets` (classifier, AffinityNet, segmentation) trained
    one epoch on small crops."""
    optim = {"algorithm": "adamw", "lr": 1e-3, "head_lr_mult": 1, "epochs": 1, "batch_size": 4}
    overrides = ["affinity.model.feature_stride=8"]
    for net in nets:
        overrides += [
            f"{net}.model.backbone.library=torchvision",
            f"{net}.model.backbone.name=resnet18",
            f"{net}.model.backbone.weights=null",
            f"{net}.augment.crop_size={crop}",
            f"{net}.augment.resize_long=[{crop}, {longest}]",
            *(f"{net}.optim.{k}={v}" for k, v in optim.items()),
        ]
    return overrides


MAX_PIXELS = 5000  # the synthetic images have at most 64 x 64 = 4096


def tiny_label_overrides(manifest: str, output: str, endpoint: str) -> list[str]:
    """Overrides for a labeling with untrained ResNet-18 networks (`model_records`) and the
    cheapest refiners, in blocks and files of a few rows."""
    return [
        f"dataset.manifest={manifest}",
        f"dataset.max_pixels={MAX_PIXELS}",
        f"output={output}",
        f"storage.s3_endpoint_url={endpoint}",
        "name=tiny",
        "classifier.model.backbone.name=resnet18",
        "classifier.model.backbone.weights=null",
        "affinity.model.backbone.name=resnet18",
        "affinity.model.backbone.weights=null",
        "affinity.model.feature_stride=8",
        "cam.scales=[1.0]",
        "random_walk.logt=5",
        "crf.iterations=3",
        "ray.rows_per_block=8",
        "label.batch_size=4",
        "label.min_rows_per_file=8",
    ]


def model_records(cfg: RunConfig, classes: list[str]) -> dict[str, str]:
    """Records of seeded, untrained networks under the run's models/, as training writes them."""
    from pipelines import storage
    from pipelines.model_record import save_model
    from wsss.affinity import AffinityNet
    from wsss.classifier import Classifier

    torch.manual_seed(0)
    checkpoints = storage.join(cfg.run_uri, "train")
    save_model(
        Classifier(len(classes) - 1, cfg.classifier.model),
        classes,
        cfg,
        storage.join(checkpoints, "classifier", "epoch_0000"),
    )
    save_model(
        AffinityNet(cfg.affinity.model),
        classes,
        cfg,
        storage.join(checkpoints, "affinity", "epoch_0000"),
    )
    return {stage: cfg.layout.record(stage) for stage in ("classifier", "affinity")}


def shard_rows(cfg: RunConfig, kind: str, out: str | None = None) -> pa.Table:
    """Every row of the `kind` shards (labels or errors) under `out` (default: the run folder),
    read back with pyarrow alone, as one table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import shards, storage

    out = out or cfg.run_uri
    fs, _ = storage.filesystem(out, cfg.storage)
    files = shards.shard_files(out, kind, cfg.storage)
    return pa.concat_tables(pq.read_table(path, filesystem=fs) for path in files)


SHARD_VERSION = "v0test"


def write_label_shard(
    out: Path,
    data_dir: Path,
    predict,
    stages=("cam", "random_walk", "crf"),
    image_root: str | None = None,
) -> None:
    """One labels/ file under `out` of model version SHARD_VERSION of a method with `stages`:
    for each image of the synthetic dataset in `data_dir`, the final mask and the CAM mask are
    the ground truth and the walk's mask (when the method has a walk) is `predict(ground
    truth)`. The rows' image URIs are under `image_root` (default: `data_dir` itself)."""
    import json
    from datetime import UTC, datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import shards
    from wsss.imageio import IGNORE_INDEX, encode_mask, read_mask

    rows = [json.loads(line) for line in (data_dir / "manifest.jsonl").read_text().splitlines()]
    classes = (data_dir / "classes.txt").read_text().split()
    records = []
    for row in rows:
        truth = read_mask(data_dir / row["mask"])
        records.append(
            {
                "image_id": row["image_id"],
                "image": f"{image_root or data_dir}/{row['image']}",
                "height": truth.shape[0],
                "width": truth.shape[1],
                "labels": row["labels"],
                "mask": encode_mask(truth),
                "confidence": 1.0,
                "ignore_fraction": float((truth == IGNORE_INDEX).mean()),
                "mask_cam": encode_mask(truth),
                **({"mask_rw": encode_mask(predict(truth))} if "random_walk" in stages else {}),
                "model_version": SHARD_VERSION,
                "config_hash": "test",
                "created_at": datetime.now(UTC),
            }
        )
    schema = shards.file_schema(shards.LABELS, classes, stages)
    table = pa.Table.from_pylist(records, schema=schema)
    path = out / shards.LABELS / shards.shard_name(SHARD_VERSION, "run", 0)
    path.parent.mkdir(parents=True)
    pq.write_table(table, path)
