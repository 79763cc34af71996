"""The pseudo-label shards (DESIGN §4.2): their schema, their files, and readers for later work.

`wsss label` writes Parquet files under `<out>/labels/` (one row per labelled image) and
`<out>/errors/` (one row per image that could not be labelled), and a JSON summary of each run:
`<out>/label_runs/<run_id>.json`, with `<out>/label_summary.json` a copy of the latest. Every file
is written by one run with one model version, and its name says both:
`<model_version>_<run_id>_<task>.parquet`. So a reader selects a model version by file name, and a
re-run finds what it already did without opening other versions' files.

Readers: `read_shard_rows` (the raw rows as a Ray Dataset, e.g. for evaluation),
`read_pseudo_labels` (a Ray Dataset of decoded image and mask arrays, for a Ray training job) and
`PseudoLabelDataset` (a `torch.utils.data.Dataset` doing the same per index).
"""

from __future__ import annotations

import bisect
import json
import posixpath
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch.utils.data

from pipelines import storage
from pipelines.storage import StorageConfig
from wsss.imageio import decode_image, decode_mask

SCHEMA_VERSION = "1"
LABELS = "labels"
ERRORS = "errors"
Kind = Literal["labels", "errors"]
SUMMARY_FILE = "label_summary.json"  # the latest run's summary
RUNS_DIR = "label_runs"  # every run's summary
SUPERSEDED_DIR = "superseded"  # files a `--force` run replaced, kept rather than deleted
SHARD_EXTENSION = ".parquet"
LATEST = "latest"  # model_version argument: the one of the latest run's summary

# File metadata keys.
META_SCHEMA_VERSION = b"wsss.schema_version"
META_CLASSES = b"wsss.classes"

_TIMESTAMP = pa.timestamp("us", tz="UTC")
_PROVENANCE = [
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("config_hash", pa.string(), nullable=False),
    pa.field("created_at", _TIMESTAMP, nullable=False),
]
LABELS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.string(), nullable=False),  # the resolved URI the image came from
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("labels", pa.list_(pa.string()), nullable=False),
        pa.field("mask", pa.binary(), nullable=False),  # PNG, mode L, class index, 255 = ignore
        pa.field("confidence", pa.float32(), nullable=False),
        pa.field("ignore_fraction", pa.float32(), nullable=False),
        pa.field("mask_cam", pa.binary()),  # same encoding; null unless stages were kept
        pa.field("mask_rw", pa.binary()),
        *_PROVENANCE,
    ]
)
ERRORS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.string(), nullable=False),  # as far as it was known
        pa.field("stage", pa.string(), nullable=False),  # manifest, fetch, decode, walk, crf
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        *_PROVENANCE,
    ]
)
SCHEMAS: dict[str, pa.Schema] = {LABELS: LABELS_SCHEMA, ERRORS: ERRORS_SCHEMA}


def file_schema(kind: Kind, classes: list[str]) -> pa.Schema:
    """The schema of a `kind` file, with the class names and schema version as file metadata."""
    metadata = {META_SCHEMA_VERSION: SCHEMA_VERSION, META_CLASSES: json.dumps(classes)}
    return SCHEMAS[kind].with_metadata(metadata)


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
) -> ray.data.Dataset:
    """The rows of the `kind` shards under `out_uri` as they are stored (masks as PNG bytes),
    of `model_version` (default: the latest run's; None: every version)."""
    model_version = resolve_model_version(out_uri, config, model_version)
    files = shard_files(out_uri, kind, config, model_version)
    if not files:
        raise FileNotFoundError(
            f"no {kind} shards of model version {model_version or 'any'} under {out_uri}"
        )
    fs, _ = storage.filesystem(out_uri, config)
    shard_rows = ray.data.read_parquet(files, filesystem=fs)
    return shard_rows if columns is None else shard_rows.select_columns(columns)


def decode_pair(image_uri: str, mask_png: bytes, config: StorageConfig) -> tuple:
    """The image (H, W, 3) uint8 fetched from `image_uri` and its decoded mask (H, W) uint8."""
    image = decode_image(storage.read_bytes(image_uri, config))
    mask = decode_mask(mask_png)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{image_uri}: mask {mask.shape} does not match image {image.shape[:2]}")
    return image, mask


def _decode_rows(batch: dict[str, np.ndarray], config: StorageConfig) -> dict[str, np.ndarray]:
    # Imported here: pipelines.train brings Ray Train, which the torch Dataset does not need.
    from pipelines.train import ragged

    pairs = [
        decode_pair(str(uri), mask, config)
        for uri, mask in zip(batch["image"], batch["mask"], strict=True)
    ]
    return {
        "image_id": batch["image_id"],
        "image": ragged([image for image, _ in pairs]),
        "mask": ragged([mask for _, mask in pairs]),
    }


def read_pseudo_labels(
    out_uri: str, config: StorageConfig, model_version: str | None = LATEST, batch_size: int = 64
) -> ray.data.Dataset:
    """Rows {"image_id", "image": uint8 (H, W, 3), "mask": uint8 (H, W), 255 = ignore} of the
    pseudo-labels under `out_uri`; images are fetched from the URIs the rows name."""
    rows = read_shard_rows(out_uri, config, LABELS, model_version, ["image_id", "image", "mask"])
    return rows.map_batches(
        _decode_rows, fn_kwargs={"config": config}, batch_size=batch_size, batch_format="numpy"
    )


class PseudoLabelDataset(torch.utils.data.Dataset):
    """Map-style dataset over the pseudo-label shards under `out_uri` (local or s3://): item i is
    {"image_id", "image": uint8 (H, W, 3), "mask": uint8 (H, W)}.

    Construction reads only the files' footers (row counts); an item reads the row group holding
    it, and the last row group read is kept, so sequential access reads each group once."""

    def __init__(
        self, out_uri: str, config: StorageConfig, model_version: str | None = LATEST
    ) -> None:
        self.config = config
        self.model_version = resolve_model_version(out_uri, config, model_version)
        self.fs, _ = storage.filesystem(out_uri, config)
        self.files = shard_files(out_uri, LABELS, config, self.model_version)
        # starts[k]: index of the first item of row group k; groups[k]: (file, group) of it.
        self.starts: list[int] = []
        self.groups: list[tuple[str, int]] = []
        total = 0
        for path in self.files:
            metadata = pq.read_metadata(path, filesystem=self.fs)
            for group in range(metadata.num_row_groups):
                self.starts.append(total)
                self.groups.append((path, group))
                total += metadata.row_group(group).num_rows
        self.length = total
        self._cached: tuple[int, pa.Table] | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} pseudo-labels")
        index %= self.length
        k = bisect.bisect_right(self.starts, index) - 1
        if self._cached is None or self._cached[0] != k:
            path, group = self.groups[k]
            with self.fs.open_input_file(path) as f:
                table = pq.ParquetFile(f).read_row_group(
                    group, columns=["image_id", "image", "mask"]
                )
            self._cached = (k, table)
        row = self._cached[1].slice(index - self.starts[k], 1).to_pylist()[0]
        image, mask = decode_pair(row["image"], row["mask"], self.config)
        return {"image_id": row["image_id"], "image": image, "mask": mask}
