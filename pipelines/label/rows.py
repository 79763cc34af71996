"""The labeling job's rows and the steps that move them without a model: the rows' schemas and
outcomes, manifest validation, the anti-join against earlier runs, fetching and decoding images,
and the shard sink (docs/output.md).

Nothing here imports torch, directly or through what it imports (`tests/test_label.py` checks):
Ray runs these steps in its task workers, which then start in under two seconds and stay small
instead of loading torch (several seconds and ~600 MB each). The model steps are in
`pipelines.label.job`.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
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

from pipelines import manifests, shards, storage
from pipelines.storage import StorageConfig
from wsss.imageio import ImageDecodeError, decode_image

# Outcome of a row: still being labelled (OK), failed, or skipped for one of two reasons.
OK = ""
ERROR = "error"
ALREADY_DONE = "already_done"  # this model version wrote a row for the image before
DUPLICATE = "duplicate"  # another manifest row has the same image_id
_DONE_MARKER = "done_marker"  # rows read from earlier shards; they never leave the anti-join
# The key of a transient error row's marker: it matches no row, so the image is tried again.
_RETRY_KEY = "retry"

FETCH_THREADS = 16  # S3 reads overlap their latency within a fetch task
ROW_GROUP_ROWS = 128  # small row groups: reader.PseudoLabelDataset reads one per item it needs
FILES_PER_TASK = 16  # shard files whose image_ids one task of the anti-join reads
BUCKETS_PER_PARTITION = 8  # anti-join groups (`with_bucket`): spread evenly over the partitions
BUCKET = "bucket"
MAX_MESSAGE_CHARS = 2000
# Fetch failures another try will not change. Every other fetch failure (connection refused or
# reset, throttling, 5xx, timeouts, access denied) is transient: the next run retries it.
PERMANENT_FETCH_ERRORS = frozenset(
    {
        "FileNotFoundError",
        "IsADirectoryError",
        "NotADirectoryError",
        "ValueError",
        "ObjectTooLargeError",
    }
)

_ROW_FIELDS = [
    pa.field("image_id", pa.string()),
    pa.field("image", pa.string()),
    pa.field("labels", pa.list_(pa.string())),
    # What makes the row's result current (`row_key`); null in done markers of files from before
    # it existed, which then stand for any key.
    pa.field("row_key", pa.string()),
    # Whether an earlier run wrote a row of this image_id that this row's result replaces.
    pa.field("replaces", pa.bool_()),
    pa.field("outcome", pa.string()),
    pa.field("error_stage", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
]
_SIZE_FIELDS = [pa.field("height", pa.int32()), pa.field("width", pa.int32())]
ROW_SCHEMA = pa.schema(_ROW_FIELDS)
# kept_seeds: what the classifier's CAM method kept for the image while training (OAA's maps),
# joined to the plan when it kept any (`pipelines.train.kept_seeds`); it is not written out.
DECODED_SCHEMA = pa.schema(
    [
        *_ROW_FIELDS,
        *_SIZE_FIELDS,
        pa.field("pixels", pa.binary()),
        pa.field("kept_seeds", pa.binary()),
    ]
)
# The seed part of the method (`wsss.labeling.Partial`) pickled, on its way to the CRF pool.
SEEDED_SCHEMA = pa.schema([*DECODED_SCHEMA, pa.field("seeded", pa.binary())])


def _result_columns(stages: Sequence[str]) -> list[str]:
    """The shards' result columns of a method with these stages."""
    names = ("mask", "confidence", "ignore_fraction", *shards.stage_columns(stages).values())
    return list(dict.fromkeys(names))


def finished_schema(stages: Sequence[str]) -> pa.Schema:
    """Rows as the sink takes them: the row's fields and the shards' result columns of a method
    with these stages, null while a row has no result."""
    labels = shards.labels_schema(stages)
    results = [labels.field(name).with_nullable(True) for name in _result_columns(stages)]
    return pa.schema([*_ROW_FIELDS, *_SIZE_FIELDS, *results])


# --- manifest rows ----------------------------------------------------------------------------


def row_key(labels: Sequence[str], source_version: str | None, mask_settings: str) -> str:
    """What makes a labelled row current: a digest of the image's labels, its source version
    (when the manifest gives one) and the settings that shape its mask
    (`RunConfig.mask_settings`). A manifest row whose key no earlier row of its image_id has is
    labelled again, and the earlier row superseded (`supersede`)."""
    canonical = json.dumps([list(labels), source_version or "", mask_settings])
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def manifest_row(
    image_id: str,
    image: str,
    labels: Iterable[str],
    outcome: str = OK,
    failure=("", "", ""),
    *,
    key: str | None = None,
) -> dict:
    """A `ROW_SCHEMA` row with its `row_key`: a valid manifest row (outcome OK), or an error row
    with its (stage, error type, message) `failure`."""
    stage, error_type, message = failure
    return {
        "image_id": image_id,
        "image": image,
        "labels": list(labels),
        "row_key": key,
        "replaces": False,
        "outcome": outcome,
        "error_stage": stage,
        "error_type": error_type,
        "error_message": message[:MAX_MESSAGE_CHARS],
    }


def fail(row: dict, stage: str, exc: BaseException) -> None:
    row.update(
        outcome=ERROR,
        error_stage=stage,
        error_type=type(exc).__name__,
        error_message=str(exc)[:MAX_MESSAGE_CHARS],
    )


def validate_record(
    record: object, index: dict[str, int], root: str, raw: str, mask_settings: str
) -> dict:
    """One manifest record as a row: resolved image URI and labels (the rules of docs/output.md,
    `pipelines.manifests`), keyed by `row_key`, or an error row naming every problem. `raw` is
    the record's text: a row without a usable image_id or image is identified by its hash, so a
    re-run finds it again."""
    problems: list[str] = []
    parsed = None
    if isinstance(record, dict):
        parsed = manifests.parse_record(record, index, root, problems)
    else:
        problems.append(f"expected a JSON object, got {type(record).__name__}")
    if parsed is not None:
        key = row_key(parsed.labels, record.get("source_version"), mask_settings)
        return manifest_row(parsed.image_id, parsed.image, parsed.labels, key=key)
    fields = record if isinstance(record, dict) else {}

    def usable(value: object) -> bool:  # what an error row can carry (lone surrogates cannot)
        return isinstance(value, str) and bool(value.strip()) and manifests.is_text(value)

    image = fields["image"] if usable(fields.get("image")) else ""
    image_id = fields["image_id"] if usable(fields.get("image_id")) else image
    return _manifest_error(image_id or _unnamed_id(raw), image, "; ".join(problems))


def is_transient(stage: str, error_type: str) -> bool:
    """Whether an error of `error_type` at `stage` may go away on its own: only fetching
    depends on the world outside the image (missing objects, undecodable or too large images,
    invalid rows and the method's own failures are permanent)."""
    return stage == "fetch" and error_type not in PERMANENT_FETCH_ERRORS


def _transient_flags(rows: pa.Table) -> list[bool]:
    """`is_transient` of each error row."""
    stages, types = rows.column("error_stage").to_pylist(), rows.column("error_type").to_pylist()
    return [is_transient(stage, kind) for stage, kind in zip(stages, types, strict=True)]


def _unnamed_id(raw: str) -> str:
    return "manifest-row-" + hashlib.sha256(raw.encode()).hexdigest()[:16]


def _problem_key(message: str) -> str:
    """The key of a row that fails the manifest check: its problem, so it is recorded once and
    again only when the problem changes; once the row is valid its key is another one."""
    return hashlib.sha256(message[:MAX_MESSAGE_CHARS].encode()).hexdigest()[:16]


def _manifest_error(image_id: str, image: str, message: str) -> dict:
    failure = ("manifest", "ManifestError", message)
    return manifest_row(image_id, image, [], ERROR, failure, key=_problem_key(message))


def rows_from_lines(
    batch: pa.Table, index: dict[str, int], root: str, mask_settings: str
) -> pa.Table:
    """Ray Data step: JSON Lines text rows {"text"} -> validated rows."""
    rows = []
    for line in batch.column("text").to_pylist():
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            message = f"malformed JSON: {exc.msg} at column {exc.colno}: {line[:200]!r}"
            rows.append(_manifest_error(_unnamed_id(line), "", message))
            continue
        rows.append(validate_record(record, index, root, line, mask_settings))
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def within_roots(batch: pa.Table, roots: Sequence[str]) -> pa.Table:
    """Ray Data step: valid rows whose image lies outside `roots` (dataset.allowed_roots)
    become error rows (stage manifest, `OutsideAllowedRoots`)."""
    rows = batch.to_pylist()
    for row in rows:
        problem = row["outcome"] == OK and manifests.outside_roots(row["image"], roots)
        if problem:
            row.update(
                manifest_row(
                    row["image_id"],
                    row["image"],
                    row["labels"],
                    ERROR,
                    ("manifest", "OutsideAllowedRoots", problem),
                    key=_problem_key(problem),
                )
            )
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def rows_from_records(
    batch: pa.Table, index: dict[str, int], root: str, mask_settings: str
) -> pa.Table:
    """Ray Data step: manifest records (Parquet manifest or VOC rows) -> validated rows."""
    rows = [
        validate_record(
            record, index, root, json.dumps(record, sort_keys=True, default=str), mask_settings
        )
        for record in batch.to_pylist()
    ]
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


# --- anti-join against earlier runs -------------------------------------------------------------


def _marker_keys(path: str, fs: pafs.FileSystem) -> pa.Table:
    """(image_id, row_key) of a shard file's rows: the key null in files from before keys, and
    `_RETRY_KEY` for transient error rows (their images are tried again)."""
    stored = set(pq.read_schema(path, filesystem=fs).names)
    wanted = [c for c in ("image_id", "row_key", "transient") if c in stored]
    table = pq.read_table(path, columns=wanted, filesystem=fs)
    keys = table["row_key"] if "row_key" in stored else pa.nulls(table.num_rows, pa.string())
    if "transient" in stored:
        keys = pc.if_else(table["transient"], pa.scalar(_RETRY_KEY), keys)
    return pa.table({"image_id": table["image_id"], "row_key": keys})


def done_markers_of_files(batch: pa.Table, out_uri: str, config: StorageConfig) -> pa.Table:
    """Ray Data step: shard file paths {"path"} -> a done marker row per row in them, with the
    row's image_id and key (`_marker_keys`)."""
    fs, _ = storage.filesystem(out_uri, config)
    keys = pa.concat_tables(
        [_marker_keys(path, fs) for path in batch.column("path").to_pylist()]
    ).combine_chunks()
    n = keys.num_rows
    empty = pa.array([""] * n, pa.string())
    columns = {
        "image_id": keys["image_id"],
        "image": pa.nulls(n, pa.string()),
        "labels": pa.nulls(n, pa.list_(pa.string())),
        "row_key": keys["row_key"],
        "replaces": pa.nulls(n, pa.bool_()),
        "outcome": pa.array([_DONE_MARKER] * n, pa.string()),
        "error_stage": empty,
        "error_type": empty,
        "error_message": empty,
    }
    return pa.table(columns, schema=ROW_SCHEMA)


def supersede(
    out_uri: str, config: StorageConfig, files: list[str], run_id: str, replaced: set[str]
) -> int:
    """Remove the rows of the image_ids `replaced` from the shard `files` written before a run
    that has just written newer rows of them (a changed key, a retried transient error): each
    file concerned is copied to `superseded/<run_id>/<kind>/` and rewritten without them
    (deleted when none is left), so the shard set keeps one row per image_id. Returns how many
    rows went. A crash in between leaves the old row beside the new one; the next run that
    writes the image again removes it."""
    if not replaced:
        return 0
    fs, root = storage.filesystem(out_uri, config)
    value_set = pa.array(sorted(replaced), pa.string())
    removed = 0
    for path in files:
        ids = pq.read_table(path, columns=["image_id"], filesystem=fs)["image_id"]
        if not pc.any(pc.is_in(ids, value_set=value_set)).as_py():
            continue
        rows = pq.read_table(path, filesystem=fs)
        kept = rows.filter(pc.invert(pc.is_in(rows["image_id"], value_set=value_set)))
        kind = posixpath.basename(posixpath.dirname(path))
        target = posixpath.join(root, shards.SUPERSEDED_DIR, run_id, kind)
        fs.create_dir(target, recursive=True)
        fs.copy_file(path, posixpath.join(target, posixpath.basename(path)))
        if kept.num_rows:
            _write_atomically(fs, path, kept, not storage.is_s3(out_uri))
        else:
            fs.delete_file(path)
        removed += rows.num_rows - kept.num_rows
    return removed


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


def with_bucket(batch: pa.Table, buckets: int) -> pa.Table:
    """Ray Data step: rows -> rows with the anti-join's group key, `bucket` = crc32(image_id)
    % buckets (stable across processes, unlike hash()). The anti-join groups by bucket, not
    by image_id: Ray's map_groups calls its function once per group, which cost ~0.5 ms per
    image when every image_id was a group (docs/benchmarks.md)."""
    keys = [zlib.crc32(image_id.encode()) % buckets for image_id in batch["image_id"].to_pylist()]
    return batch.append_column(BUCKET, pa.array(keys, pa.int32()))


def resolve_bucket(bucket: pa.Table) -> pa.Table:
    """Ray Data map_groups step: the manifest rows of a bucket of image_ids (`with_bucket`),
    with a done marker for each row an earlier run wrote. An image_id with a row whose key has a
    marker (or with a marker of no key: a file from before keys) is skipped; one whose markers
    have other keys only goes on, marked `replaces`. Several rows of one image_id: the first (by
    image) becomes a DuplicateImageId error, the rest are skipped."""
    bucket = bucket.drop_columns([BUCKET])
    is_marker = pc.equal(bucket["outcome"], _DONE_MARKER)
    markers = bucket.filter(is_marker)
    rows = bucket.filter(pc.invert(is_marker))
    marked = set(markers["image_id"].to_pylist())
    current = {
        (image_id, key)
        for image_id, key in zip(
            markers["image_id"].to_pylist(), markers["row_key"].to_pylist(), strict=True
        )
    }
    ids, keys = rows["image_id"].to_pylist(), rows["row_key"].to_pylist()
    # An image_id is done when one of its rows is (so a DuplicateImageId error, keyed by its
    # first row, stays recorded once).
    done_ids = {
        i for i, k in zip(ids, keys, strict=True) if (i, k) in current or (i, None) in current
    }
    done = pa.array([i in done_ids for i in ids], pa.bool_())
    replaces = pa.array([i in marked and i not in done_ids for i in ids], pa.bool_())
    rows = rows.set_column(rows.schema.get_field_index("replaces"), "replaces", replaces)
    counts = rows.group_by("image_id").aggregate([("image_id", "count")])
    repeated = counts.filter(pc.greater(counts["image_id_count"], 1))["image_id"]
    duplicate = pc.and_not(pc.is_in(rows["image_id"], value_set=repeated.combine_chunks()), done)
    outcome = pc.if_else(done, pa.scalar(ALREADY_DONE), rows["outcome"])
    rows = rows.set_column(rows.schema.get_field_index("outcome"), "outcome", outcome)
    return pa.concat_tables(
        [rows.filter(pc.invert(duplicate)), _duplicates(rows.filter(duplicate))]
    )


def _duplicates(rows: pa.Table) -> pa.Table:
    """The rows of image_ids that several manifest rows have: per image_id, the first by
    image an error row, the others skipped."""
    by_id: dict[str, list[dict]] = {}
    for row in rows.to_pylist():
        by_id.setdefault(row["image_id"], []).append(row)
    out = []
    for listed in by_id.values():
        listed.sort(key=lambda row: row["image"] or "")
        images = ", ".join(repr(row["image"]) for row in listed[:5])
        message = f"{len(listed)} manifest rows have this image_id (images {images})"
        out.append(
            listed[0]
            | {
                "outcome": ERROR,
                "error_stage": "manifest",
                "error_type": "DuplicateImageId",
                "error_message": message[:MAX_MESSAGE_CHARS],
            }
        )
        out.extend(row | {"outcome": DUPLICATE} for row in listed[1:])
    return pa.Table.from_pylist(out, schema=ROW_SCHEMA)


# --- fetch and decode -------------------------------------------------------------------------


def _fetch(uri: str, config: StorageConfig, max_bytes: int) -> bytes | Exception:
    try:
        return storage.read_bytes(uri, config, max_bytes)
    except (OSError, ValueError) as exc:  # missing or unreadable object, malformed URI
        return exc


def fetch_and_decode(
    batch: pa.Table, config: StorageConfig, max_pixels: int, max_bytes: int
) -> pa.Table:
    """Ray Data step: rows -> rows with the decoded image as raw RGB bytes (`pixels`, with
    `height` and `width`). Unreadable or too large objects fail the row at stage fetch,
    undecodable images or too many pixels at stage decode."""
    rows = [row | {"height": 0, "width": 0, "pixels": None} for row in batch.to_pylist()]
    todo = [row for row in rows if row["outcome"] == OK]
    uris = [row["image"] for row in todo]
    if any(storage.is_s3(uri) for uri in uris):
        with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(uris))) as pool:
            fetched = list(pool.map(partial(_fetch, config=config, max_bytes=max_bytes), uris))
    else:  # local reads are quicker one after another than the threads cost to start
        fetched = [_fetch(uri, config, max_bytes) for uri in uris]
    for row, data in zip(todo, fetched, strict=True):
        if isinstance(data, Exception):
            fail(row, "fetch", data)
            continue
        try:
            image = decode_image(data, max_pixels)
        except ImageDecodeError as exc:
            fail(row, "decode", exc)
            continue
        row.update(height=image.shape[0], width=image.shape[1], pixels=image.tobytes())
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def row_image(row: dict) -> np.ndarray:
    """The (H, W, 3) uint8 image of a decoded row."""
    return np.frombuffer(row["pixels"], np.uint8).reshape(row["height"], row["width"], 3)


def finished_row(row: dict, stages: Sequence[str]) -> dict:
    """A row as the sink takes it: its fields (the size None for a row never decoded, e.g. an
    invalid manifest row), no results yet."""
    final = {f.name: row.get(f.name) for f in (*_ROW_FIELDS, *_SIZE_FIELDS)}
    return final | dict.fromkeys(_result_columns(stages))


def finished_rows(batch: pa.Table, stages: Sequence[str]) -> pa.Table:
    """Ray Data step: rows that go no further (e.g. invalid manifest rows) -> rows as the sink
    takes them (`finished_row`)."""
    finished = [finished_row(row, stages) for row in batch.to_pylist()]
    return pa.Table.from_pylist(finished, schema=finished_schema(stages))


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
        stages: Sequence[str],
        run_id: str,
        model_version: str,
        config_hash: str,
        min_rows: int,
    ) -> None:
        self.out_uri = out_uri
        self.config = config
        self.classes = classes
        self.stages = tuple(stages)
        self.run_id = run_id
        self.model_version = model_version
        self.config_hash = config_hash
        self.min_rows = min_rows
        self.counts: dict | None = None
        # image_ids whose earlier rows this run's rows replace (`supersede` removes those).
        self.replaced: set[str] = set()

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
        schema = shards.file_schema(shards.LABELS, self.classes, self.stages)
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
            "transient": pa.array(_transient_flags(rows), pa.bool_()),
            "row_key": rows.column("row_key"),
        } | self._provenance(rows.num_rows)
        schema = shards.file_schema(shards.ERRORS, self.classes, self.stages)
        return pa.table([columns[name] for name in schema.names], schema=schema)

    def write(self, blocks: Iterable, ctx) -> dict:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        rows = pa.concat_tables(tables) if tables else finished_schema(self.stages).empty_table()
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
        transient = sum(_transient_flags(failed))
        written = pc.or_(pc.equal(outcome, OK), pc.equal(outcome, ERROR))
        replacing = pc.and_(written, pc.fill_null(rows.column("replaces"), False))
        return {
            "replaced": rows.filter(replacing).column("image_id").to_pylist(),
            "labelled": labelled.num_rows,
            "errors": failed.num_rows,
            "transient_errors": transient,
            "skipped": dict(skipped),
            "errors_by_stage": dict(Counter(failed.column("error_stage").to_pylist())),
        }

    def on_write_complete(self, write_result) -> None:
        totals = {"labelled": 0, "errors": 0, "transient_errors": 0}
        skipped: Counter = Counter()
        by_stage: Counter = Counter()
        self.replaced = set()
        for counts in write_result.write_returns:
            self.replaced.update(counts["replaced"])
            totals["labelled"] += counts["labelled"]
            totals["errors"] += counts["errors"]
            totals["transient_errors"] += counts["transient_errors"]
            skipped.update(counts["skipped"])
            by_stage.update(counts["errors_by_stage"])
        self.counts = totals | {
            "skipped": sum(skipped.values()),
            "skipped_by_reason": dict(skipped),
            "errors_by_stage": dict(by_stage),
        }
