"""Shared fixtures: a local S3 server (moto on 127.0.0.1) and test-wide torch settings."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint: str) -> dict:
    """One local Ray instance for the whole session (two on one machine break each other).

    4 logical CPUs on the 2-core machine, so training workers and actor pools leave room for
    Ray Data's tasks. It starts after the S3 server, so its processes inherit the credentials.
    Returns the cluster's resources."""
    import ray

    from pipelines.runtime import start_local_ray

    # Ray Train polls its workers this often; the default 2 s dominates the teardown of tiny runs.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # A labeling actor that meets this image_id kills its process (pipelines.label.job): the
    # workers inherit it from here.
    os.environ["WSSS_TEST_WORKER_DIES_ON"] = WORKER_DIES_ON
    start_local_ray(4, include_dashboard=False)  # as `wsss` starts a local Ray
    yield ray.cluster_resources()
    ray.shutdown()


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


def tiny_networks(crop: int = 48, longest: int = 64) -> list[str]:
    """Overrides for ResNet-18 classifier and AffinityNet trained one epoch on small crops."""
    optim = {"algorithm": "adamw", "lr": 1e-3, "head_lr_mult": 1, "epochs": 1, "batch_size": 4}
    overrides = ["affinity.model.feature_stride=8"]
    for net in ("classifier", "affinity"):
        overrides += [
            f"{net}.model.backbone.library=torchvision",
            f"{net}.model.backbone.name=resnet18",
            f"{net}.model.backbone.weights=null",
            f"{net}.augment.crop_size={crop}",
            f"{net}.augment.resize_long=[{crop}, {longest}]",
            *(f"{net}.optim.{k}={v}" for k, v in optim.items()),
        ]
    return overrides
