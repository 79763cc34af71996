"""The pseudo-label shards (docs/output.md): their schema, their files, and a reader of their rows.

`wsss label` writes Parquet files under `<out>/labels/` (one row per labelled image) and
`<out>/errors/` (one row per image that could not be labelled), and a JSON summary of each run:
`<out>/label_runs/<run_id>.json`, with `<out>/label_summary.json` a copy of the latest. Every file
is written by one run with one model version, and its name says both:
`<model_version>_<run_id>_<task>.parquet`. So a reader selects a model version by file name, and a
re-run finds what it already did without opening other versions' files.

`read_shard_rows` gives the raw rows as a Ray Dataset (e.g. for evaluation); `pipelines.reader`
the decoded images and masks for segmentation training. This module never imports torch: the
labeling job's writers use it in Ray workers that have no need of torch.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipelines import storage
from pipelines.storage import StorageConfig

SCHEMA_VERSION = "3"
LABELS = "labels"
ERRORS = "errors"
Kind = Literal["labels", "errors"]
SUMMARY_FILE = "label_summary.json"  # the latest run's summary
RUNS_DIR = "label_runs"  # every run's summary
SUPERSEDED_DIR = "superseded"  # files a run replaced (`--force`) or rewrote, kept as they were
SHARD_EXTENSION = ".parquet"
LATEST = "latest"  # model_version argument: the one of the latest run's summary

# File metadata keys.
META_SCHEMA_VERSION = b"wsss.schema_version"
META_CLASSES = b"wsss.classes"

_TIMESTAMP = pa.timestamp("us", tz="UTC")
_PROVENANCE = [
    # What makes the row current (`pipelines.label.rows.row_key`: a digest of the image's
    # labels, its source version and the mask-shaping settings); a run relabels an image whose
    # manifest row has another key. Files of schema version 2 and before lack it.
    pa.field("row_key", pa.string()),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("config_hash", pa.string(), nullable=False),
    pa.field("created_at", _TIMESTAMP, nullable=False),
]
_LABELS_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("image", pa.string(), nullable=False),  # the resolved URI the image came from
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("labels", pa.list_(pa.string()), nullable=False),
    pa.field("mask", pa.binary(), nullable=False),  # PNG, mode L, class index, 255 = ignore
    pa.field("confidence", pa.float32(), nullable=False),
    pa.field("ignore_fraction", pa.float32(), nullable=False),
]
FINAL_COLUMN = "mask"
# Schema version 1 named the random walk's column so; kept, so its files still read.
_SHORT_COLUMNS = {"random_walk": "mask_rw"}


def stage_columns(stages: Sequence[str]) -> dict[str, str]:
    """Stage name -> the column holding its mask, for a method's stages in order ("cam", then
    its refiners): the last stage's mask is the final one, `mask` (its argmax, thresholded by
    pseudo_label.confidence_threshold); each earlier stage's is `mask_<stage>`."""
    columns = {stage: _SHORT_COLUMNS.get(stage, f"mask_{stage}") for stage in stages[:-1]}
    return columns | {stages[-1]: FINAL_COLUMN}


def labels_schema(stages: Sequence[str]) -> pa.Schema:
    """The labels/ schema of a method with these stages: an optional column per stage before
    the last, same encoding as `mask`, null unless label.keep_stages."""
    kept = [
        pa.field(column, pa.binary())
        for column in stage_columns(stages).values()
        if column != FINAL_COLUMN
    ]
    return pa.schema([*_LABELS_FIELDS, *kept, *_PROVENANCE])


ERRORS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.string(), nullable=False),  # as far as it was known
        pa.field("stage", pa.string(), nullable=False),  # manifest, fetch, decode, walk, crf
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        # Whether another try may succeed (network, throttling, 5xx, timeouts): the next run
        # retries the image and supersedes this row. Files of schema version 1 lack it (false).
        pa.field("transient", pa.bool_(), nullable=False),
        *_PROVENANCE,
    ]
)


def file_schema(kind: Kind, classes: list[str], stages: Sequence[str]) -> pa.Schema:
    """The schema of a `kind` file, with the class names and schema version as file metadata."""
    metadata = {META_SCHEMA_VERSION: SCHEMA_VERSION, META_CLASSES: json.dumps(classes)}
    schema = labels_schema(stages) if kind == LABELS else ERRORS_SCHEMA
    return schema.with_metadata(metadata)


def shard_classes(labels_uri: str, config: StorageConfig, model_version: str | None) -> list[str]:
    """The class names, in index order, that the labels shards' files record (`file_schema`)."""
    files = shard_files(labels_uri, LABELS, config, model_version)
    if not files:
        raise FileNotFoundError(
            f"no labels shards of model version {model_version or 'any'} under {labels_uri}"
        )
    fs, _ = storage.filesystem(labels_uri, config)
    metadata = pq.read_schema(files[0], filesystem=fs).metadata or {}
    return json.loads(metadata[META_CLASSES])


def new_run_id(started: datetime) -> str:
    """A run's id: its start time (UTC, sortable) and a random suffix, unique across machines."""
    return f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:12]}"


def shard_name(model_version: str, run_id: str, task: int) -> str:
    return f"{model_version}_{run_id}_{task:06d}{SHARD_EXTENSION}"


def model_version_of(name: str) -> str:
    """The model version a shard file name starts with."""
    return posixpath.basename(name).split("_", 1)[0]


def shard_files(
    out_uri: str, kind: Kind, config: StorageConfig, model_version: str | None = None
) -> list[str]:
    """Filesystem paths of the finished `kind` shards under `out_uri` (of one model version
    when given), sorted. Files being written (a `.tmp` suffix) are not shards."""
    fs, folder = storage.filesystem(storage.join(out_uri, kind), config)
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(
        info.path
        for info in infos
        if info.type == pafs.FileType.File
        and info.path.endswith(SHARD_EXTENSION)
        and (model_version is None or model_version_of(info.path) == model_version)
    )


def latest_summary(out_uri: str, config: StorageConfig) -> dict | None:
    """The summary of the latest finished `wsss label` run into `out_uri`, if any."""
    uri = storage.join(out_uri, SUMMARY_FILE)
    if not storage.exists(uri, config):
        return None
    return json.loads(storage.read_bytes(uri, config))


def resolve_model_version(out_uri: str, config: StorageConfig, model_version: str | None):
    """`model_version`, with LATEST replaced by the latest run's (None stays: every version)."""
    if model_version != LATEST:
        return model_version
    summary = latest_summary(out_uri, config)
    if summary is None:
        raise FileNotFoundError(
            f"{storage.join(out_uri, SUMMARY_FILE)}: no finished labeling run in {out_uri}; "
            "pass model_version (or None for every version)"
        )
    return summary["model_version"]


def read_shard_rows(
    out_uri: str,
    config: StorageConfig,
    kind: Kind = LABELS,
    model_version: str | None = LATEST,
    columns: list[str] | None = None,
    optional_columns: Sequence[str] = (),
) -> ray.data.Dataset:
    """The rows of the `kind` shards under `out_uri` as they are stored (masks as PNG bytes),
    of `model_version` (default: the latest run's; None: every version). With `columns`, only
    those, and of `optional_columns` those the shards have (e.g. stage masks of another
    method's stages)."""
    model_version = resolve_model_version(out_uri, config, model_version)
    files = shard_files(out_uri, kind, config, model_version)
    if not files:
        raise FileNotFoundError(
            f"no {kind} shards of model version {model_version or 'any'} under {out_uri}"
        )
    fs, _ = storage.filesystem(out_uri, config)
    shard_rows = ray.data.read_parquet(files, filesystem=fs)
    if columns is None:
        return shard_rows
    stored = set(pq.read_schema(files[0], filesystem=fs).names)
    return shard_rows.select_columns(
        list(dict.fromkeys([*columns, *(c for c in optional_columns if c in stored)]))
    )


def ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array of `arrays`: a Ray Data column of differently shaped arrays (decoded
    images and masks)."""
    out = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        out[i] = array
    return out
