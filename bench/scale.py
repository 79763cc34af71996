"""Planning a million-image night (issue 19): the time and memory of what `wsss label` and
`wsss relabel` do before they fetch a single image, at 100k and 1M manifest rows.

For each size N the script builds (once, cached under --work):
- a Parquet manifest of N rows (image_id, image, one to three of 20 class names);
- N placeholder image files (empty: only their names and stat are read), one flat folder;
- a shard set of the rows done before: labels/ files of 1,000 rows each (the default
  label.min_rows_per_file, row groups as `wsss label` writes them) for 99% of the ids, 0.5% of
  them with another row key (changed labels);
- relabel's ledger of the same rows (ten files, one per earlier night), 0.5% with an old source
  version (changed images).
So 1% of the rows are new and 0.5% changed: 15k to label at 1M.

It then times, in a local Ray of this machine's cores:
- label: `pipelines.label.job.planned_rows` (manifest read and check, the done markers read
  from the shard set, the anti-join), streamed to the end and its outcomes counted;
- relabel: `pipelines.relabel.job.plan` with `--listing` of the image folder (the listing streamed
  into its Parquet file, the objects without a manifest row, the listing and ledger joins),
  which is how a nightly job over millions of images takes its source versions;
- listing: that listing alone (`pipelines.relabel.rows.list_versions`), pages streamed, in key
  ranges listed at once on S3 as `relabel` lists (`--ranges 1`: one listing, page after page;
  `--pages`: only the first pages, for the time per page at a bucket's size);
- inventory (`--store s3` only): the same listing read from an S3 Inventory report of the
  objects (`pipelines.relabel.inventory.inventory_versions`; one gzipped CSV), as `relabel --listing
  --inventory` reads it; relabel-inventory: `relabel.plan` with that report as its listing.
With `--store s3` the manifest, shard set and ledger live on a local S3 server (moto, in a
process of its own that does not count in the memory), and the listing is of N placeholder
objects there, 1,000 per request as S3 pages.

Memory: peak RSS of the driver and of all processes summed (object store pages count once per
process mapping them), and the largest private memory (USS) of any single Ray worker process (a
task or an actor), sampled every 0.2 s (`common.PeakMemory`).

    flock /tmp/cpu.lock uv run python bench/scale.py --rows 100000 1000000 \\
        --out bench/results/scale.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import multiprocessing
import os
import statistics
import time
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from common import PeakMemory, machine_info, settle, write_results

from pipelines import runtime, shards
from pipelines.config import RunConfig, load_config
from pipelines.label import job as label
from pipelines.label import rows as label_rows
from pipelines.manifests import VOC_CLASSES
from pipelines.relabel import inventory
from pipelines.relabel import job as relabel
from pipelines.relabel import rows as relabel_rows

CLASSES = list(VOC_CLASSES[1:])  # 20 names; the background is not a manifest label
VERSION = "scalebench0000v1"  # the model version of the shard set and ledger
ROWS_PER_FILE = 1000
LEDGER_FILES = 10
BUCKET = "wsss-scale"
INVENTORY = f"s3://{BUCKET}/inventory/manifest.json"  # the report `_serve` writes
MASK = b"\x89PNG placeholder"  # never decoded: planning reads ids and keys only


def image_id(i: int) -> str:
    return f"img-{i:07d}"


def labels_of(i: int) -> list[str]:
    """One to three class names, in class order (as the manifest check returns them)."""
    picked = {CLASSES[i % 20], CLASSES[(i * 7) % 20], CLASSES[(i * 13) % 20]}
    return [c for c in CLASSES if c in picked][: 1 + i % 3]


def build(root: Path, n: int, cfg: RunConfig) -> None:
    """The manifest, images, shard set and ledger of an N-row night under `root` (see the
    module docstring); skipped when already built."""
    if (root / "built").exists():
        return
    started = time.perf_counter()
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    ids = [image_id(i) for i in range(n)]
    for i in ids:
        os.close(os.open(images / f"{i}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))
    labels = [labels_of(i) for i in range(n)]
    pq.write_table(
        pa.table({"image_id": ids, "image": [f"images/{i}.jpg" for i in ids], "labels": labels}),
        root / "manifest.parquet",
    )
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    done, changed = n * 99 // 100, n // 200
    settings = cfg.mask_settings()
    write_shards(root / "out", ids[:done], labels[:done], changed, settings, cfg)
    versions = [
        relabel_rows.source_version(str(images / f"{i}.jpg"), cfg.storage) for i in ids[:done]
    ]
    write_ledger(
        root / "out" / "relabel" / relabel.LEDGER, ids, labels, versions, changed, settings
    )
    # The same on S3, where the listing gives ETags (an empty object's is the MD5 of nothing).
    etags = ["etag-d41d8cd98f00b204e9800998ecf8427e"] * done
    write_ledger(root / "s3-ledger", ids, labels, etags, changed, settings)
    (root / "built").write_text(f"{time.perf_counter() - started:.1f} s\n")


def write_ledger(
    folder: Path,
    ids: list[str],
    labels: list[list[str]],
    versions: list[str],
    changed: int,
    settings: str,
) -> None:
    """Relabel's ledger of the rows with these source `versions`, in LEDGER_FILES files (one
    per earlier night); the first `changed` with an old version (the image changed since)."""
    versions = ["0-0"] * changed + versions[changed:]
    keys = [label_rows.row_key(lab, v, settings) for lab, v in zip(labels, versions, strict=False)]
    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(versions) // LEDGER_FILES)
    for night, start in enumerate(range(0, len(versions), per_file)):
        part = slice(start, start + per_file)
        table = pa.table(
            {
                "image_id": ids[part],
                "source_version": versions[part],
                "model_version": [VERSION] * len(versions[part]),
                "row_key": keys[part],
            },
            schema=relabel_rows.LEDGER_SCHEMA,
        )
        pq.write_table(table, folder / f"2026110{night}T000000Z-scalebench.parquet")


def write_shards(
    out: Path, ids: list[str], labels: list[list[str]], changed: int, settings: str, cfg: RunConfig
) -> None:
    """labels/ files as `wsss label` writes them, one per ROWS_PER_FILE rows; the first
    `changed` rows keyed with other labels (their manifest rows changed since)."""
    folder = out / shards.LABELS
    folder.mkdir(parents=True, exist_ok=True)
    schema = shards.file_schema(shards.LABELS, CLASSES, cfg.stages)
    created = pa.scalar(0, pa.timestamp("us", tz="UTC"))
    for task, start in enumerate(range(0, len(ids), ROWS_PER_FILE)):
        part = range(start, min(start + ROWS_PER_FILE, len(ids)))
        keys = [
            label_rows.row_key(["changed"] if i < changed else labels[i], None, settings)
            for i in part
        ]
        m = len(part)
        columns = {
            "image_id": ids[part.start : part.stop],
            "image": [f"images/{ids[i]}.jpg" for i in part],
            "height": [1] * m,
            "width": [1] * m,
            "labels": labels[part.start : part.stop],
            "mask": [MASK] * m,
            "confidence": [1.0] * m,
            "ignore_fraction": [0.0] * m,
            "row_key": keys,
            "model_version": [VERSION] * m,
            "config_hash": ["scalebench"] * m,
            "created_at": pa.array([created] * m, pa.timestamp("us", tz="UTC")),
        }
        table = pa.table([columns.get(f.name, pa.nulls(m, f.type)) for f in schema], schema=schema)
        name = shards.shard_name(VERSION, "20261101T000000Z-scalebench", task)
        pq.write_table(table, folder / name, row_group_size=label_rows.ROW_GROUP_ROWS)


def label_plan(cfg: RunConfig, out: str) -> dict:
    """`planned_rows` streamed to the end: the outcome counts."""
    planned = label.planned_rows(cfg, CLASSES, VERSION, out)
    counts: dict[str, int] = {}
    for batch in planned.select_columns(["outcome", "replaces"]).iter_batches(
        batch_format="pyarrow"
    ):
        for item in pc.value_counts(batch["outcome"]).to_pylist():
            outcome = item["values"] or "pending"
            counts[outcome] = counts.get(outcome, 0) + item["counts"]
        counts["replaces"] = counts.get("replaces", 0) + pc.sum(batch["replaces"]).as_py()
    return counts


def relabel_plan(cfg: RunConfig, out: str, listing: str, inventory: str | None = None) -> dict:
    night = relabel.plan(
        cfg, f"{out}/relabel", "scalebench", VERSION, CLASSES, listing, lambda _: None, inventory
    )
    return {"input": night.total, "new_or_changed": night.new, "invalid": night.n_invalid}


def list_objects(cfg: RunConfig, prefix: str, n: int, ranges: int, pages: int | None) -> dict:
    """`relabel --listing` alone: the pages of the prefix streamed, as into its listing file,
    in `ranges` key ranges (cut at every n / ranges-th image, where `relabel.plan` cuts at a
    sample of the manifest's); only the first `pages` when given."""
    images = [f"{prefix}/{image_id(i)}.jpg" for i in range(0, n, 997)]
    cuts = relabel_rows.listing_boundaries(images, ranges)
    listed = objects = 0
    for page in relabel_rows.list_versions(prefix, cfg.storage, cuts):
        listed, objects = listed + 1, objects + page.num_rows
        if listed == pages:
            break
    return {"pages": listed, "objects": objects, "ranges": ranges}


def read_inventory(cfg: RunConfig, listing: str) -> dict:
    """`relabel --listing --inventory` alone: the listing of the prefix read from the S3
    Inventory report the local S3 server holds (`_serve`), pages streamed."""
    pages = objects = 0
    for page in inventory.inventory_versions(INVENTORY, listing, cfg.storage):
        pages, objects = pages + 1, objects + page.num_rows
    return {"pages": pages, "objects": objects}


def timed(step, exclude: tuple[int, ...]) -> dict:
    settle(quiet_s=3.0)
    with PeakMemory(exclude=exclude) as memory:
        started = time.perf_counter()
        result = step()
        seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), **memory.mib(), "result": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", choices=("local", "s3"), default="local")
    parser.add_argument(
        "--jobs",
        nargs="+",
        choices=("label", "relabel", "listing", "inventory", "relabel-inventory"),
        default=["label", "relabel"],
    )
    parser.add_argument(
        "--ranges",
        type=int,
        default=relabel_rows.LISTING_THREADS,
        help="listing job: key ranges of the S3 listing (1: one listing, page after page)",
    )
    parser.add_argument("--pages", type=int, help="listing job: stop after this many pages")
    parser.add_argument("--work", type=Path, default=Path("/tmp/wsss-scale"))
    parser.add_argument(
        "--set", action="append", default=[], dest="overrides", help="a config field=value"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if {"inventory", "relabel-inventory"} & set(args.jobs) and args.store != "s3":
        parser.error("the inventory job reads an S3 Inventory report: --store s3")
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the per-operator progress lines

    results: dict = {
        "machine": machine_info(ray=ray.__version__),
        "store": args.store,
        "overrides": args.overrides,
        "runs": {},
    }
    for n in args.rows:
        root = args.work / f"{n}"
        cfg = load_config(overrides=[f"dataset.manifest={root}/manifest.parquet", *args.overrides])
        build(root, n, cfg)
        out, listing, exclude = str(root / "out"), str(root / "images"), ()
        if args.store == "s3":
            server, cfg = s3_copy(root, n, args.overrides)
            out, listing, exclude = f"s3://{BUCKET}/out", f"s3://{BUCKET}/images", (server.pid,)
        # A fresh local Ray, never one that another process left running.
        runtime.start_local_ray(address="local")
        runtime.connect(cfg)
        steps = {
            "label": partial(label_plan, cfg, out),
            "relabel": partial(relabel_plan, cfg, out, listing),
            "listing": partial(list_objects, cfg, listing, n, args.ranges, args.pages),
            "inventory": partial(read_inventory, cfg, listing),
            "relabel-inventory": partial(relabel_plan, cfg, out, listing, INVENTORY),
        }
        for job in args.jobs:
            rounds = [timed(steps[job], exclude) for _ in range(args.rounds)]
            summary = {
                key: statistics.median(r[key] for r in rounds)
                for key in ("seconds", "peak_rss_mib", "peak_driver_rss_mib", "peak_worker_uss_mib")
            }
            results["runs"][f"{job} {n}"] = {**summary, "rounds": rounds}
            largest = max(rounds, key=lambda r: r["peak_worker_uss_mib"])["peak_worker"]
            print(f"{job} {n:>9,}: {summary} {rounds[0]['result']} ({largest})", flush=True)
        ray.shutdown()
        if args.store == "s3":
            server.terminate()
    write_results(args.out, results)


# --- the local S3 server ----------------------------------------------------------------------


def s3_copy(root: Path, n: int, overrides: list[str]):
    """A moto server in a process of its own holding the manifest, shard set and ledger under
    `root` and N placeholder image objects; the configuration pointing at it."""
    ready = multiprocessing.get_context("spawn").Queue()
    server = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(str(root), n, ready), daemon=True
    )
    server.start()
    endpoint = ready.get(timeout=1800)
    os.environ.update(AWS_ACCESS_KEY_ID="scale", AWS_SECRET_ACCESS_KEY="scale")
    cfg = load_config(
        overrides=[
            f"dataset.manifest=s3://{BUCKET}/manifest.parquet",
            f"storage.s3_endpoint_url={endpoint}",
            "storage.s3_region=us-east-1",
            *overrides,
        ]
    )
    return server, cfg


def _serve(root: str, n: int, ready) -> None:
    """Start moto, fill the bucket (the image objects straight into its store: through HTTP
    that takes over an hour per million), put `endpoint` on `ready` and serve."""
    import logging

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket(BUCKET, "us-east-1")
    root_path = Path(root)
    files = {
        "manifest.parquet": root_path / "manifest.parquet",
        "classes.txt": root_path / "classes.txt",
        **{f"out/labels/{p.name}": p for p in (root_path / "out" / "labels").iterdir()},
        **{f"out/relabel/ledger/{p.name}": p for p in (root_path / "s3-ledger").iterdir()},
    }
    for key, path in files.items():
        backend.put_object(BUCKET, key, path.read_bytes())
    for i in range(n):
        backend.put_object(BUCKET, f"images/{image_id(i)}.jpg", b"")
    # The S3 Inventory report of those objects, one gzipped CSV as S3 writes it for a bucket
    # (S3 splits larger ones into several files), with the fields relabel reads.
    empty_etag = "d41d8cd98f00b204e9800998ecf8427e"  # the MD5 of no bytes
    lines = "".join(f'"{BUCKET}","images/{image_id(i)}.jpg","{empty_etag}"\n' for i in range(n))
    backend.put_object(BUCKET, "inventory/files/1.csv.gz", gzip.compress(lines.encode()))
    report = {
        "sourceBucket": BUCKET,
        "destinationBucket": f"arn:aws:s3:::{BUCKET}",
        "fileFormat": "CSV",
        "fileSchema": "Bucket, Key, ETag",
        "files": [{"key": "inventory/files/1.csv.gz", "size": 0, "MD5checksum": ""}],
    }
    backend.put_object(BUCKET, "inventory/manifest.json", json.dumps(report).encode())
    ready.put(f"http://127.0.0.1:{server._server.server_port}")
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
