"""Seconds per `ray.data.read_parquet` of one small file on a local S3 server, with Ray 2.60's
default reader (DataSourceV2, which reads footers on a pool of FooterReader actors started for
each read) against the V1 reader (tasks only), alternating reader by reader in one Ray session.
This is why `pipelines.runtime.connect` selects V1: the pipelines read one-file manifests, small
ledgers and listings, where the actor start-up is all of the cost.

    flock /tmp/wsss-ray.lock .venv/bin/python bench/parquet_read.py \
        --out bench/results/parquet_read.json
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from common import machine_info, write_results
from moto.server import ThreadedMotoServer

from pipelines import storage
from pipelines.storage import StorageConfig


def timed_read(path: str, fs, v2: bool) -> float:
    ray.data.DataContext.get_current().use_datasource_v2 = v2
    started = time.perf_counter()
    rows = ray.data.read_parquet(path, filesystem=fs).materialize().count()
    assert rows == 3
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "testing")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="bench")
    buffer = io.BytesIO()
    pq.write_table(pa.table({"image_id": ["a", "b", "c"]}), buffer)
    s3.put_object(Bucket="bench", Key="ledger/one.parquet", Body=buffer.getvalue())
    fs, path = storage.filesystem(
        "s3://bench/ledger/one.parquet", StorageConfig(s3_endpoint_url=endpoint)
    )

    ray.init(num_cpus=args.cpus, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    timed_read(path, fs, v2=False)  # warm-up: the first tasks start Ray's workers
    timed_read(path, fs, v2=True)
    times: dict[str, list[float]] = {"v1": [], "v2": []}
    for _ in range(args.rounds):
        for reader in ("v2", "v1"):
            times[reader].append(timed_read(path, fs, v2=reader == "v2"))
    ray.shutdown()
    server.stop()

    medians = {reader: statistics.median(seconds) for reader, seconds in times.items()}
    for reader, seconds in times.items():
        each = ", ".join(f"{s:.2f}" for s in seconds)
        print(f"{reader}: median {medians[reader]:.2f} s  ({each})")
    print(f"V2 / V1: {medians['v2'] / medians['v1']:.0f}x")
    write_results(
        args.out,
        {
            "machine": machine_info(ray=ray.__version__, ray_cpus=args.cpus),
            "seconds": times,
            "median_seconds": medians,
        },
    )


if __name__ == "__main__":
    main()
