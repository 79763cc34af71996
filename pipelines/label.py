"""`wsss label`: a manifest's images streamed through CAM, random walk and CRF into Parquet shards.

One streaming Ray Data execution; the driver holds no rows, only the class list, the model
records and one small count record per write task:

    manifest rows (read_text / read_parquet; each row validated, a bad row becomes an error row)
      + the image_ids this model version already wrote (unless --force)
    -> groupby(image_id).map_groups: the anti-join against earlier runs and the duplicate check
    -> fetch + decode                         CPU tasks (fetches overlap in threads)
    -> CAM + random walk (`labeling.walk`)    actor pool, a GPU each when ray.use_gpu
    -> CRF + final mask + PNG (`Finisher`)    CPU actor pool
    -> ShardSink: labels/ and errors/ files (layout and schema: `pipelines.shards`)

Every manifest row travels to the sink exactly once with an `outcome`: labelled, error (with the
stage, error type and message) or skipped; so input = labelled + errors + skipped by construction.

Re-runs: an image whose image_id already has a row of the same model version, in labels/ or in
errors/, is skipped (an image that failed stays failed until `--force`; writing a second row for
it would break "one row per image"). `--force` first moves this model version's files to
`<out>/superseded/<run_id>/` and labels everything again. Several manifest rows with one
image_id give one error row (DuplicateImageId) and are otherwise skipped.

Killed runs: a shard is written whole or not at all (local files are written under a `.tmp`
name and renamed; an S3 object appears only when its upload completes), so a run started again
skips exactly the images in finished shards and labels the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import posixpath
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockAccessor

from pipelines import shards, storage
from pipelines.config import ConfigError, RunConfig
from pipelines.inputs import load_manifest
from pipelines.model_record import (
    ModelRecord,
    load_affinity_net,
    load_classifier,
    read_record,
    record_uri,
)
from pipelines.storage import StorageConfig
from wsss import dataset, labeling
from wsss.imageio import ImageDecodeError, decode_image, encode_mask
from wsss.training import default_device

# Outcome of a row: still being labelled (OK), failed, or skipped for one of two reasons.
OK = ""
ERROR = "error"
ALREADY_DONE = "already_done"  # this model version wrote a row for the image before
DUPLICATE = "duplicate"  # another manifest row has the same image_id
_DONE_MARKER = "done_marker"  # rows read from earlier shards; they never leave the anti-join

FETCH_THREADS = 16  # object-store reads overlap their latency within a fetch task
ROW_GROUP_ROWS = 128  # small row groups: PseudoLabelDataset reads one per item it needs
FILES_PER_TASK = 16  # shard files whose image_ids one task of the anti-join reads
MANIFEST_BYTES_PER_PARTITION = 64 << 20  # ~0.5M manifest rows per anti-join partition
MAX_MESSAGE_CHARS = 2000

_ROW_FIELDS = [
    pa.field("image_id", pa.string()),
    pa.field("image", pa.string()),
    pa.field("labels", pa.list_(pa.string())),
    pa.field("outcome", pa.string()),
    pa.field("error_stage", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
]
_SIZE_FIELDS = [pa.field("height", pa.int32()), pa.field("width", pa.int32())]
ROW_SCHEMA = pa.schema(_ROW_FIELDS)
DECODED_SCHEMA = pa.schema([*_ROW_FIELDS, *_SIZE_FIELDS, pa.field("pixels", pa.binary())])
WALKED_SCHEMA = pa.schema([*DECODED_SCHEMA, pa.field("walked", pa.binary())])
_RESULT_FIELDS = [  # the shards' columns, null while a row has no result
    shards.LABELS_SCHEMA.field(name).with_nullable(True)
    for name in ("mask", "confidence", "ignore_fraction", "mask_cam", "mask_rw")
]
FINISHED_SCHEMA = pa.schema([*_ROW_FIELDS, *_SIZE_FIELDS, *_RESULT_FIELDS])


# --- manifest rows ----------------------------------------------------------------------------


def _row(
    image_id: str, image: str, labels: Iterable[str], outcome: str = OK, failure=("", "", "")
) -> dict:
    stage, error_type, message = failure
    return {
        "image_id": image_id,
        "image": image,
        "labels": list(labels),
        "outcome": outcome,
        "error_stage": stage,
        "error_type": error_type,
        "error_message": message[:MAX_MESSAGE_CHARS],
    }


def _fail(row: dict, stage: str, exc: BaseException) -> None:
    row.update(
        outcome=ERROR,
        error_stage=stage,
        error_type=type(exc).__name__,
        error_message=str(exc)[:MAX_MESSAGE_CHARS],
    )


def validate_record(record: object, index: dict[str, int], root: str, raw: str) -> dict:
    """One manifest record as a row: resolved image URI and labels (DESIGN §4.1 rules of
    `wsss.dataset`), or an error row naming every problem. `raw` is the record's text: a row
    without a usable image_id or image is identified by its hash, so a re-run finds it again."""
    problems: list[str] = []
    parsed = None
    if isinstance(record, dict):
        parsed = dataset.parse_record(record, index, root, problems)
    else:
        problems.append(f"expected a JSON object, got {type(record).__name__}")
    if parsed is not None:
        return _row(parsed.image_id, parsed.image, parsed.labels)
    fields = record if isinstance(record, dict) else {}
    image = fields.get("image") if isinstance(fields.get("image"), str) else ""
    given_id = fields.get("image_id")
    image_id = given_id if isinstance(given_id, str) and given_id.strip() else image
    return _manifest_error(image_id or _unnamed_id(raw), image, "; ".join(problems))


def _unnamed_id(raw: str) -> str:
    return "manifest-row-" + hashlib.sha256(raw.encode()).hexdigest()[:16]


def _manifest_error(image_id: str, image: str, message: str) -> dict:
    return _row(image_id, image, [], ERROR, ("manifest", "ManifestError", message))


def rows_from_lines(batch: pa.Table, index: dict[str, int], root: str) -> pa.Table:
    """Ray Data step: JSON Lines text rows {"text"} -> validated rows."""
    rows = []
    for line in batch.column("text").to_pylist():
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            message = f"malformed JSON: {exc.msg} at column {exc.colno}: {line[:200]!r}"
            rows.append(_manifest_error(_unnamed_id(line), "", message))
            continue
        rows.append(validate_record(record, index, root, line))
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def rows_from_records(batch: pa.Table, index: dict[str, int], root: str) -> pa.Table:
    """Ray Data step: manifest records (Parquet manifest or VOC rows) -> validated rows."""
    rows = [
        validate_record(record, index, root, json.dumps(record, sort_keys=True, default=str))
        for record in batch.to_pylist()
    ]
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def manifest_classes(cfg: RunConfig) -> list[str]:
    """The class list of the manifest: classes.txt beside it, or VOC's."""
    if cfg.dataset.voc_split is not None:
        return list(dataset.VOC_CLASSES)
    uri = storage.join(storage.parent(cfg.dataset.manifest), "classes.txt")
    try:
        text = storage.read_text(uri, cfg.storage)
    except OSError as exc:
        raise dataset.ManifestError(f"{uri}: cannot read the class list: {exc}") from exc
    return dataset.parse_classes(text, uri)


def manifest_rows(cfg: RunConfig, classes: list[str]) -> tuple[ray.data.Dataset, int]:
    """The manifest's rows, validated in Ray Data tasks, and the number of anti-join partitions
    its size calls for. A VOC layout (local, at most tens of thousands of rows) is listed on the
    driver; manifests of any size are read by Ray Data."""
    uri = cfg.dataset.manifest
    index = {name: i for i, name in enumerate(classes)}
    if cfg.dataset.voc_split is not None:
        manifest = load_manifest(cfg)
        records = [
            {"image_id": r.image_id, "image": r.image, "labels": list(r.labels), "mask": r.mask}
            for r in manifest.rows
        ]
        rows = ray.data.from_items(records).map_batches(
            rows_from_records,
            fn_kwargs={"index": index, "root": manifest.root},
            batch_format="pyarrow",
        )
        return rows, 1
    fs, path = storage.filesystem(uri, cfg.storage)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise dataset.ManifestError(f"{uri}: manifest not found")
    root = storage.parent(uri) if storage.is_s3(uri) else posixpath.dirname(path)
    partitions = max(1, math.ceil(info.size / MANIFEST_BYTES_PER_PARTITION))
    ext = posixpath.splitext(path)[1].lower()
    if ext == ".parquet":
        read, step = ray.data.read_parquet(path, filesystem=fs), rows_from_records
    elif ext in (".jsonl", ".json"):
        with fs.open_input_stream(path) as f:
            if f.read(4096).lstrip().startswith(b"["):
                raise dataset.ManifestError(
                    f"{uri}: a JSON array cannot be streamed; write the manifest as JSON Lines "
                    "(one object per line) or Parquet"
                )
        read, step = ray.data.read_text(path, filesystem=fs), rows_from_lines
    else:
        raise dataset.ManifestError(
            f"{uri}: unknown manifest format {ext!r}; use .jsonl, .json or .parquet"
        )
    rows = read.map_batches(step, fn_kwargs={"index": index, "root": root}, batch_format="pyarrow")
    return rows, partitions


# --- anti-join against earlier runs -------------------------------------------------------------


def done_markers_of_files(batch: pa.Table, out_uri: str, config: StorageConfig) -> pa.Table:
    """Ray Data step: shard file paths {"path"} -> a done marker row per image_id in them."""
    fs, _ = storage.filesystem(out_uri, config)
    ids = pa.concat_arrays(
        [
            pq.read_table(path, columns=["image_id"], filesystem=fs)
            .column("image_id")
            .combine_chunks()
            for path in batch.column("path").to_pylist()
        ]
    )
    n = len(ids)
    empty = pa.array([""] * n, pa.string())
    columns = {
        "image_id": ids,
        "image": pa.nulls(n, pa.string()),
        "labels": pa.nulls(n, pa.list_(pa.string())),
        "outcome": pa.array([_DONE_MARKER] * n, pa.string()),
        "error_stage": empty,
        "error_type": empty,
        "error_message": empty,
    }
    return pa.table(columns, schema=ROW_SCHEMA)


def done_markers(
    out_uri: str, config: StorageConfig, model_version: str
) -> ray.data.Dataset | None:
    """Marker rows for the image_ids with a row of `model_version` under `out_uri` (None when
    there are none). Only the image_id column of that version's files is read, in Ray tasks of
    FILES_PER_TASK files each."""
    files = [
        *shards.shard_files(out_uri, shards.LABELS, config, model_version),
        *shards.shard_files(out_uri, shards.ERRORS, config, model_version),
    ]
    if not files:
        return None
    return ray.data.from_items([{"path": path} for path in files]).map_batches(
        done_markers_of_files,
        fn_kwargs={"out_uri": out_uri, "config": config},
        batch_size=FILES_PER_TASK,
        batch_format="pyarrow",
    )


def resolve_group(group: pa.Table) -> pa.Table:
    """Ray Data map_groups step: the manifest rows of one image_id, with done markers if an
    earlier run wrote it. Already written: every row skipped. Several rows: the first (by image)
    becomes a DuplicateImageId error, the rest are skipped. Otherwise the row goes on as is."""
    is_marker = pc.equal(group.column("outcome"), _DONE_MARKER)
    rows = group.filter(pc.invert(is_marker))
    done = pc.any(is_marker).as_py()
    if rows.num_rows == 0 or (rows.num_rows == 1 and not done):
        return rows
    if done:
        outcomes = pa.array([ALREADY_DONE] * rows.num_rows, pa.string())
        return rows.set_column(rows.schema.get_field_index("outcome"), "outcome", outcomes)
    listed = sorted(rows.to_pylist(), key=lambda row: row["image"] or "")
    images = ", ".join(repr(row["image"]) for row in listed[:5])
    message = f"{len(listed)} manifest rows have this image_id (images {images})"
    first = listed[0] | {
        "outcome": ERROR,
        "error_stage": "manifest",
        "error_type": "DuplicateImageId",
        "error_message": message[:MAX_MESSAGE_CHARS],
    }
    rest = [row | {"outcome": DUPLICATE} for row in listed[1:]]
    return pa.Table.from_pylist([first, *rest], schema=ROW_SCHEMA)


# --- per-image stages ---------------------------------------------------------------------------


def _fetch(uri: str, config: StorageConfig) -> bytes | Exception:
    try:
        return storage.read_bytes(uri, config)
    except (OSError, ValueError) as exc:  # missing or unreadable object, malformed URI
        return exc


def fetch_and_decode(batch: pa.Table, cfg: RunConfig) -> pa.Table:
    """Ray Data step: rows -> rows with the decoded image as raw RGB bytes (`pixels`, with
    `height` and `width`). Unreadable bytes fail the row at stage fetch, undecodable or too
    large images at stage decode."""
    rows = [row | {"height": 0, "width": 0, "pixels": None} for row in batch.to_pylist()]
    todo = [row for row in rows if row["outcome"] == OK]
    with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, max(1, len(todo)))) as pool:
        fetched = list(pool.map(partial(_fetch, config=cfg.storage), [r["image"] for r in todo]))
    for row, data in zip(todo, fetched, strict=True):
        if isinstance(data, Exception):
            _fail(row, "fetch", data)
            continue
        try:
            image = decode_image(data, cfg.dataset.max_pixels)
        except ImageDecodeError as exc:
            _fail(row, "decode", exc)
            continue
        row.update(height=image.shape[0], width=image.shape[1], pixels=image.tobytes())
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def _image(row: dict) -> np.ndarray:
    return np.frombuffer(row["pixels"], np.uint8).reshape(row["height"], row["width"], 3)


class Walker:
    """Ray Data actor: CAMs and the random walk (`wsss.labeling.walk`) of decoded rows. Each
    actor loads both networks from their model records once, onto the GPU Ray gave it if any.
    The result travels pickled: it is an intermediate of this job, never stored."""

    def __init__(
        self, cfg: RunConfig, classifier_record: str, affinity_record: str, classes: list[str]
    ) -> None:
        device = default_device()
        self.cfg = cfg
        self.classifier = load_classifier(classifier_record, cfg).to(device)
        self.affinity_net = load_affinity_net(affinity_record, cfg).to(device)
        self.index = {name: i for i, name in enumerate(classes)}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [row | {"walked": None} for row in batch.to_pylist()]
        for row in rows:
            if row["outcome"] != OK:
                continue
            labels = [self.index[name] for name in row["labels"]]
            try:
                walked = labeling.walk(
                    _image(row),
                    labels,
                    self.classifier,
                    self.affinity_net,
                    self.cfg.cam,
                    self.cfg.random_walk,
                )
            except Exception as exc:  # e.g. out of memory: the image fails, not the job
                _fail(row, "walk", exc)
                continue
            row["walked"] = pickle.dumps(walked, protocol=pickle.HIGHEST_PROTOCOL)
        return pa.Table.from_pylist(rows, schema=WALKED_SCHEMA)


def finish_rows(batch: pa.Table, cfg: RunConfig) -> pa.Table:
    """Ray Data step: walked rows -> final rows: dense CRF, final mask and confidence
    (`wsss.labeling.finish`), masks PNG-encoded; CAM and walk masks too with label.keep_stages."""
    keep = cfg.label.keep_stages
    out = []
    for row in batch.to_pylist():
        final = {f.name: row[f.name] for f in (*_ROW_FIELDS, *_SIZE_FIELDS)}
        final |= {f.name: None for f in _RESULT_FIELDS}
        if row["outcome"] == OK:
            try:
                walked = pickle.loads(row["walked"])
                labelled = labeling.finish(_image(row), walked, cfg.crf, cfg.pseudo_label)
                final.update(
                    mask=encode_mask(labelled.mask),
                    confidence=labelled.confidence,
                    ignore_fraction=labelled.ignore_fraction,
                )
                if keep:
                    final.update(
                        mask_cam=encode_mask(labelled.cam_mask),
                        mask_rw=encode_mask(labelled.rw_mask),
                    )
            except Exception as exc:  # the image fails, not the job
                _fail(final, "crf", exc)
        out.append(final)
    return pa.Table.from_pylist(out, schema=FINISHED_SCHEMA)


class Finisher:
    """Ray Data actor of the CRF pool: `finish_rows`. A pool rather than tasks, because a task
    stage would be fused into the write, which gathers label.min_rows_per_file rows per task:
    the CRF of a whole file would then run in one task, after its last walk."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        return finish_rows(batch, self.cfg)


# --- the sink -----------------------------------------------------------------------------------


def _write_atomically(fs: pafs.FileSystem, path: str, table: pa.Table, local: bool) -> None:
    """Write `table` as a Parquet file that readers see whole or not at all."""
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, row_group_size=ROW_GROUP_ROWS)
    data = buffer.getvalue()
    if not local:  # an S3 object appears only when its upload completes
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    fs.create_dir(posixpath.dirname(path), recursive=True)
    partial_path = path + ".tmp"
    with fs.open_output_stream(partial_path) as f:
        f.write(data)
    fs.move(partial_path, path)  # a rename: a killed writer leaves only the .tmp file


class ShardSink(ray.data.Datasink):
    """Writes each write task's rows: labelled ones to one labels/ file, failed ones to one
    errors/ file (named `<model_version>_<run_id>_<task>`, so a retried task overwrites its own
    files and runs never collide), and returns the task's counts. After the write,
    `counts` holds the run's totals."""

    def __init__(
        self,
        out_uri: str,
        config: StorageConfig,
        classes: list[str],
        run_id: str,
        model_version: str,
        config_hash: str,
        min_rows: int,
    ) -> None:
        self.out_uri = out_uri
        self.config = config
        self.classes = classes
        self.run_id = run_id
        self.model_version = model_version
        self.config_hash = config_hash
        self.min_rows = min_rows
        self.counts: dict | None = None

    @property
    def min_rows_per_write(self) -> int:
        return self.min_rows

    def _provenance(self, n: int) -> dict[str, pa.Array]:
        now = datetime.now(UTC)
        return {
            "model_version": pa.array([self.model_version] * n, pa.string()),
            "config_hash": pa.array([self.config_hash] * n, pa.string()),
            "created_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        }

    def _labels_table(self, rows: pa.Table) -> pa.Table:
        schema = shards.file_schema(shards.LABELS, self.classes)
        columns = {name: rows.column(name) for name in schema.names if name in rows.column_names}
        columns |= self._provenance(rows.num_rows)
        return pa.table([columns[name] for name in schema.names], schema=schema)

    def _errors_table(self, rows: pa.Table) -> pa.Table:
        columns = {
            "image_id": rows.column("image_id"),
            "image": pc.fill_null(rows.column("image"), ""),
            "stage": rows.column("error_stage"),
            "error_type": rows.column("error_type"),
            "message": rows.column("error_message"),
        } | self._provenance(rows.num_rows)
        schema = shards.file_schema(shards.ERRORS, self.classes)
        return pa.table([columns[name] for name in schema.names], schema=schema)

    def write(self, blocks: Iterable, ctx) -> dict:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        rows = pa.concat_tables(tables) if tables else FINISHED_SCHEMA.empty_table()
        outcome = rows.column("outcome")
        labelled = rows.filter(pc.equal(outcome, OK))
        failed = rows.filter(pc.equal(outcome, ERROR))
        fs, root = storage.filesystem(self.out_uri, self.config)
        name = shards.shard_name(self.model_version, self.run_id, ctx.task_idx)
        local = not storage.is_s3(self.out_uri)
        for kind, part, to_table in (
            (shards.LABELS, labelled, self._labels_table),
            (shards.ERRORS, failed, self._errors_table),
        ):
            if part.num_rows:
                _write_atomically(fs, posixpath.join(root, kind, name), to_table(part), local)
        skipped = Counter(o for o in outcome.to_pylist() if o not in (OK, ERROR))
        return {
            "labelled": labelled.num_rows,
            "errors": failed.num_rows,
            "skipped": dict(skipped),
            "errors_by_stage": dict(Counter(failed.column("error_stage").to_pylist())),
        }

    def on_write_complete(self, write_result) -> None:
        totals = {"labelled": 0, "errors": 0}
        skipped: Counter = Counter()
        by_stage: Counter = Counter()
        for counts in write_result.write_returns:
            totals["labelled"] += counts["labelled"]
            totals["errors"] += counts["errors"]
            skipped.update(counts["skipped"])
            by_stage.update(counts["errors_by_stage"])
        self.counts = totals | {
            "skipped": sum(skipped.values()),
            "skipped_by_reason": dict(skipped),
            "errors_by_stage": dict(by_stage),
        }


# --- the job ------------------------------------------------------------------------------------


def model_version(classifier: ModelRecord, affinity: ModelRecord) -> str:
    """Content hash of the two checkpoints a labeling uses."""
    digest = hashlib.sha256(f"{classifier.weights_sha256}:{affinity.weights_sha256}".encode())
    return digest.hexdigest()[:16]


def read_records(cfg: RunConfig, uris: dict[str, str]) -> dict[str, ModelRecord]:
    """The model record of each stage at `uris`; a ConfigError says which one is missing or
    is for another stage."""
    records = {}
    for stage, uri in uris.items():
        try:
            records[stage] = read_record(uri, cfg)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"the {stage} model record: {exc}; train it first or pass --{stage} URI"
            ) from None
        if records[stage].stage != stage:
            raise ConfigError(f"model record {uri} is for the {records[stage].stage}, not {stage}")
    return records


def check_cluster(cfg: RunConfig) -> None:
    """Raise InsufficientResourcesError unless the cluster can host the model actors and one
    CPU task beside them (Ray would otherwise wait for them without end)."""
    from pipelines.train import InsufficientResourcesError  # see `run` on why imported here

    r = cfg.ray
    total = ray.cluster_resources()
    cpus = r.model_actors * r.cpus_per_actor + cfg.label.cpus_per_task
    problems = []
    if cpus > total.get("CPU", 0):
        problems.append(
            f"{cpus:g} CPUs (ray.model_actors {r.model_actors} x ray.cpus_per_actor "
            f"{r.cpus_per_actor:g} + label.cpus_per_task {cfg.label.cpus_per_task:g}) but the "
            f"cluster has {total.get('CPU', 0):g}"
        )
    gpus = r.model_actors * r.gpus_per_actor if r.use_gpu else 0.0
    if gpus > total.get("GPU", 0):
        problems.append(
            f"{gpus:g} GPUs (ray.use_gpu: ray.model_actors {r.model_actors} x "
            f"ray.gpus_per_actor {r.gpus_per_actor:g}) but the cluster has {total.get('GPU', 0):g}"
        )
    if problems:
        raise InsufficientResourcesError(
            "the Ray cluster cannot host this labeling: it needs " + "; and ".join(problems)
        )


def retire(out_uri: str, config: StorageConfig, version: str, run_id: str) -> int:
    """Move this model version's shards out of labels/ and errors/ into
    `superseded/<run_id>/` (for --force); returns how many files moved."""
    fs, root = storage.filesystem(out_uri, config)
    moved = 0
    for kind in (shards.LABELS, shards.ERRORS):
        target = posixpath.join(root, shards.SUPERSEDED_DIR, run_id, kind)
        for path in shards.shard_files(out_uri, kind, config, version):
            fs.create_dir(target, recursive=True)
            fs.move(path, posixpath.join(target, posixpath.basename(path)))
            moved += 1
    return moved


def stage_times(ds: ray.data.Dataset) -> dict[str, dict[str, float]]:
    """Per Ray Data operator of an executed dataset: its wall time and the summed time of its
    tasks, in seconds (from `Dataset.get_stats_summary`, what `Dataset.stats()` prints)."""
    stages: dict[str, dict[str, float]] = {}

    def visit(summary) -> None:
        for parent in summary.parents:
            visit(parent)
        for op in summary.operators_stats:
            stages[op.operator_name] = {
                "wall_s": round(op.time_total_s, 3),
                "task_s": round(op.wall_time.sum, 3) if op.wall_time else 0.0,
            }

    visit(ds.get_stats_summary())
    return stages


def labelled_dataset(
    cfg: RunConfig,
    classes: list[str],
    records: dict[str, str],
    version: str | None,
    out_uri: str,
) -> ray.data.Dataset:
    """The whole plan, from the manifest to final rows (nothing runs until it is written).
    With `version`, image_ids that version already wrote under `out_uri` are skipped."""
    r = cfg.ray
    rows, partitions = manifest_rows(cfg, classes)
    done = None if version is None else done_markers(out_uri, cfg.storage, version)
    if done is not None:
        rows = rows.union(done)
    task = {"num_cpus": cfg.label.cpus_per_task, "batch_format": "pyarrow"}
    return (
        rows.groupby("image_id", num_partitions=partitions)
        .map_groups(resolve_group, batch_format="pyarrow")
        # A partition leaves the anti-join as one block: split it so the stages after share it.
        .repartition(target_num_rows_per_block=r.rows_per_block)
        .map_batches(fetch_and_decode, fn_kwargs={"cfg": cfg}, batch_size=r.rows_per_block, **task)
        .map_batches(
            Walker,
            fn_constructor_kwargs={
                "cfg": cfg,
                "classifier_record": records["classifier"],
                "affinity_record": records["affinity"],
                "classes": classes,
            },
            compute=ray.data.ActorPoolStrategy(size=r.model_actors),
            num_cpus=r.cpus_per_actor,
            num_gpus=r.gpus_per_actor if r.use_gpu else 0,
            batch_size=cfg.label.batch_size,
            batch_format="pyarrow",
        )
        .map_batches(
            Finisher,
            fn_constructor_kwargs={"cfg": cfg},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.label.crf_workers),
            batch_size=cfg.label.batch_size,
            **task,
        )
    )


def effective_config(
    cfg: RunConfig, input_uri: str | None, out_uri: str | None, keep_stages: bool
) -> RunConfig:
    """`cfg` with the command-line choices applied, so the config hash covers them."""
    data = cfg.model_dump(mode="json")
    if input_uri is not None:
        data["dataset"] |= {"manifest": input_uri, "voc_split": None}
    if out_uri is not None:
        data["label"]["out"] = out_uri
    if keep_stages:
        data["label"]["keep_stages"] = True
    return RunConfig.model_validate(data)


def run(
    cfg: RunConfig,
    *,
    input_uri: str | None = None,
    out_uri: str | None = None,
    force: bool = False,
    keep_stages: bool = False,
    classifier_record: str | None = None,
    affinity_record: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Label the manifest (`input_uri`, default dataset.manifest) into `out_uri` (default
    label.out, else the run folder) with the networks of the two model records (default: this
    run's). Returns the run summary, also written to `<out>/label_runs/<run_id>.json` and
    `<out>/label_summary.json`."""
    cfg = effective_config(cfg, input_uri, out_uri, keep_stages)
    out = cfg.label.out or cfg.run_uri
    uris = {
        "classifier": classifier_record or record_uri(cfg, "classifier"),
        "affinity": affinity_record or record_uri(cfg, "affinity"),
    }
    records = read_records(cfg, uris)
    classes = manifest_classes(cfg)
    for stage, record in records.items():
        if record.classes != classes:
            raise ConfigError(
                f"the {stage} of {uris[stage]} knows the classes {record.classes}, the manifest "
                f"{cfg.dataset.manifest} has {classes}"
            )
    version = model_version(records["classifier"], records["affinity"])
    # Imported here, not above: every Ray worker running a step of this module imports it, and
    # pipelines.train brings Ray Train, seconds per worker start on a small machine.
    from pipelines.train import connect

    connect(cfg)
    check_cluster(cfg)

    started_at = datetime.now(UTC)
    run_id = f"{started_at:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:12]}"
    retired = retire(out, cfg.storage, version, run_id) if force else 0
    if retired:
        log(f"--force: moved {retired} earlier shard file(s) to {out}/superseded/{run_id}/")
    log(f"labeling {cfg.dataset.manifest} into {out} (model version {version}, run {run_id})")
    ds = labelled_dataset(cfg, classes, uris, None if force else version, out)
    sink = ShardSink(
        out, cfg.storage, classes, run_id, version, cfg.hash(), cfg.label.min_rows_per_file
    )
    started = time.perf_counter()
    ds.write_datasink(sink, ray_remote_args={"num_cpus": cfg.label.cpus_per_task})
    seconds = time.perf_counter() - started
    assert sink.counts is not None  # set by on_write_complete
    counts = sink.counts
    processed = counts["labelled"] + counts["errors"]
    summary = {
        "run_id": run_id,
        "input": processed + counts["skipped"],
        **counts,
        "seconds": round(seconds, 2),
        "images_per_s": round(processed / seconds, 3) if seconds > 0 else None,
        "stages": stage_times(ds),
        "model_version": version,
        "config_hash": cfg.hash(),
        "manifest": cfg.dataset.manifest,
        "out": out,
        "classifier_record": uris["classifier"],
        "affinity_record": uris["affinity"],
        "force": force,
        "retired_files": retired,
        "keep_stages": cfg.label.keep_stages,
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    text = json.dumps(summary, indent=2).encode()
    per_run = storage.join(out, shards.RUNS_DIR, f"{run_id}.json")
    storage.write_bytes(per_run, text, cfg.storage)
    storage.write_bytes(storage.join(out, shards.SUMMARY_FILE), text, cfg.storage)
    log(
        f"input {summary['input']}: labelled {counts['labelled']}, errors {counts['errors']}, "
        f"skipped {counts['skipped']} ({summary['images_per_s']} images/s); summary {per_run}"
    )
    return summary
