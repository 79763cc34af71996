"""`wsss relabel`, the nightly job: label only the images that are new or changed since the
last run, or that the current models have not labelled yet.

Each run compares the manifest with a ledger of what earlier runs labelled, keyed by
(image_id, source version, model version), where the source version is the image object's size
and modification time (`pyarrow.fs.FileInfo`; on S3 the object's LastModified, which changes
whenever the object is rewritten). The rows not in the ledger become the night's manifest, which
`wsss label` labels into a dated shard set; once it has finished they are added to the ledger.
So running twice on one night does nothing the second time, and a run that died is simply run
again (labeling resumes inside the dated set).

Layout under `<out>/relabel/`:
    <date>/manifest.parquet, <date>/classes.txt   the night's new or changed images
    <date>/labels/, <date>/errors/, ...           the dated shard set (`wsss label` output)
    ledger/<run_id>.parquet                       (image_id, source_version, model_version)
    runs/<run_id>.json                            the run record
Downstream readers take every dated set; where an image_id appears in several, the latest date
holds its current label.

The comparison is a Ray Data left-anti join: neither the manifest nor the ledger is collected on
the driver, which only streams the night's (small) delta into its manifest file.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipelines import label, storage
from pipelines.config import RunConfig
from pipelines.evaluate import labels_uri
from pipelines.model_record import record_uri
from pipelines.storage import StorageConfig
from pipelines.train import connect

FOLDER = "relabel"
LEDGER = "ledger"
PENDING = "pending"  # ledger files of runs still labeling
RUNS = "runs"
STAT_THREADS = 16

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("source_version", pa.string()),
        pa.field("model_version", pa.string()),
    ]
)
NIGHT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("image", pa.string()),
        pa.field("labels", pa.list_(pa.string())),
    ]
)


def source_version(uri: str, config: StorageConfig) -> str:
    """Size and modification time of the object at `uri`; "missing" when there is none (the
    labeling then records the fetch error)."""
    fs, path = storage.filesystem(uri, config)
    try:
        info = fs.get_file_info(path)
    except OSError:
        return "unreadable"
    if info.type != pafs.FileType.File:
        return "missing"
    return f"{info.size}-{info.mtime_ns}"


def with_source_versions(batch: pa.Table, config: StorageConfig, version: str) -> pa.Table:
    """Ray Data step: valid manifest rows -> the same with `source_version` and `model_version`
    (rows the manifest check failed are left to `wsss label` on the whole manifest)."""
    rows = [row for row in batch.to_pylist() if row["outcome"] == label.OK]
    with ThreadPoolExecutor(max_workers=STAT_THREADS) as pool:
        versions = list(
            pool.map(partial(source_version, config=config), [r["image"] for r in rows])
        )
    return pa.table(
        {
            "image_id": [r["image_id"] for r in rows],
            "image": [r["image"] for r in rows],
            "labels": [r["labels"] for r in rows],
            "source_version": versions,
            "model_version": [version] * len(rows),
        }
    )


def ledger_files(root: str, config: StorageConfig) -> list[str]:
    fs, folder = storage.filesystem(storage.join(root, LEDGER), config)
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(
        i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    )


def pending_rows(cfg: RunConfig, root: str, version: str) -> ray.data.Dataset:
    """The manifest rows whose (image_id, source version) the ledger has not seen labelled by
    model `version`."""
    classes = label.manifest_classes(cfg)
    rows, partitions = label.manifest_rows(cfg, classes)
    current = rows.map_batches(
        with_source_versions,
        fn_kwargs={"config": cfg.storage, "version": version},
        batch_format="pyarrow",
    )
    done = ledger_files(root, cfg.storage)
    if not done:
        return current
    fs, _ = storage.filesystem(root, cfg.storage)
    ledger = ray.data.read_parquet(done, filesystem=fs, schema=LEDGER_SCHEMA)
    keys = ("image_id", "source_version", "model_version")
    return current.join(ledger, "left_anti", num_partitions=partitions, on=keys)


def _write_parquet(uri: str, schema: pa.Schema, batches, config: StorageConfig) -> None:
    """Stream `batches` (pyarrow tables) into one Parquet file at `uri`."""
    fs, path = storage.filesystem(uri, config)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f, pq.ParquetWriter(f, schema) as writer:
        for batch in batches:
            writer.write_table(batch.select(schema.names).cast(schema))


def run(
    cfg: RunConfig,
    *,
    input_uri: str | None = None,
    out_uri: str | None = None,
    date: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Label the new or changed images of the manifest (`input_uri`, default dataset.manifest)
    into the dated shard set `<out>/relabel/<date>/` (date: today, UTC). Returns the run record,
    also written to `<out>/relabel/runs/<run_id>.json`."""
    cfg = label.effective_config(cfg, input_uri, out_uri, keep_stages=False)
    root = storage.join(labels_uri(cfg), FOLDER)
    started = datetime.now(UTC)
    date = date or f"{started:%Y-%m-%d}"
    run_id = f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:12]}"
    uris = {"classifier": record_uri(cfg, "classifier"), "affinity": record_uri(cfg, "affinity")}
    records = label.read_records(cfg, uris)
    version = label.model_version(records["classifier"], records["affinity"])
    connect(cfg)

    night = storage.join(root, date)
    night_manifest = storage.join(night, f"manifest-{run_id}.parquet")
    pending_ledger = storage.join(root, LEDGER, PENDING, f"{run_id}.parquet")
    # Computed once, kept in the object store (spilled to disk if large), streamed twice.
    delta = pending_rows(cfg, root, version).materialize()
    new = delta.count()
    record: dict = {
        "run_id": run_id,
        "date": date,
        "manifest": cfg.dataset.manifest,
        "model_version": version,
        "new_or_changed": new,
        "shards": night,
        "started_at": started.isoformat(timespec="seconds"),
    }
    if new:
        classes_txt = storage.read_bytes(
            storage.join(storage.parent(cfg.dataset.manifest), "classes.txt"), cfg.storage
        )
        storage.write_bytes(storage.join(night, "classes.txt"), classes_txt, cfg.storage)
        for uri, schema in ((night_manifest, NIGHT_SCHEMA), (pending_ledger, LEDGER_SCHEMA)):
            batches = delta.iter_batches(batch_format="pyarrow", batch_size=4096)
            _write_parquet(uri, schema, batches, cfg.storage)
        log(f"{new} new or changed image(s): labeling them into {night}")
        summary = label.run(cfg, input_uri=night_manifest, out_uri=night, log=log)
        # Labelled (or recorded as errors): from now on the ledger knows them.
        fs, path = storage.filesystem(pending_ledger, cfg.storage)
        fs.move(
            path, posixpath.join(posixpath.dirname(posixpath.dirname(path)), f"{run_id}.parquet")
        )
        record.update({k: summary[k] for k in ("labelled", "errors", "skipped", "seconds")})
    else:
        log("nothing new or changed since the last run: nothing to label")
    record["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    storage.write_bytes(
        storage.join(root, RUNS, f"{run_id}.json"),
        json.dumps(record, indent=2).encode(),
        cfg.storage,
    )
    return record
