"""What a run reads besides images: the dataset manifest and pretrained backbone weights, from
local paths or object storage.

The parsing and validation rules are `pipelines.manifests`'s; this module fetches the bytes, or
reads the manifest as a Ray Dataset (`manifest_dataset`: the labeling and relabel jobs, at any
manifest size) or whole on the driver (`load_manifest`: training and the in-process run).
"""

from __future__ import annotations

import math
import posixpath
from typing import TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipelines import manifests, storage
from pipelines.config import RunConfig
from pipelines.label import rows as label_rows
from pipelines.manifests import Manifest, ManifestError
from wsss.affinity import AffinityNetParams
from wsss.classifier import ClassifierParams

# The fewest bytes per JSON Lines manifest row `join_partitions` assumes: a line of an id, a short
# path and one label is longer, so the estimate never gives fewer partitions than the rows need.
MIN_MANIFEST_LINE_BYTES = 48


def manifest_classes(cfg: RunConfig) -> list[str]:
    """The class list of `cfg.dataset`: classes.txt beside the manifest, or VOC's."""
    if cfg.dataset.voc_split is not None:
        return list(manifests.VOC_CLASSES)
    uri = manifests.classes_uri(cfg.dataset.manifest)
    try:
        text = storage.read_text(uri, cfg.storage)
    except OSError as exc:
        raise ManifestError(f"{uri}: cannot read the class list: {exc}") from exc
    return manifests.parse_classes(text, uri)


def load_manifest(cfg: RunConfig) -> Manifest:
    """The validated manifest of `cfg.dataset` (JSONL/Parquet with classes.txt beside it, or a
    local PASCAL VOC root when `dataset.voc_split` is set), every image and mask under
    `dataset.allowed_roots` when set. Raises ManifestError."""
    manifest = _read_manifest(cfg)
    outside = [
        problem
        for row in manifest.rows
        for uri in (row.image, row.mask)
        if uri is not None and (problem := manifests.outside_roots(uri, cfg.dataset.allowed_roots))
    ]
    if outside:
        raise ManifestError(outside, f"{len(outside)} path(s) outside dataset.allowed_roots")
    return manifest


def _read_manifest(cfg: RunConfig) -> Manifest:
    uri = cfg.dataset.manifest
    if cfg.dataset.voc_split is not None:
        if storage.is_s3(uri):
            raise ManifestError(
                f"{uri}: a VOC layout must be a local folder; convert it to a manifest"
            )
        return manifests.read_voc(uri, cfg.dataset.voc_split)
    if not storage.is_s3(uri):
        return manifests.read_manifest(uri)
    root = storage.parent(uri)
    try:
        records = manifests.parse_records(storage.read_bytes(uri, cfg.storage), uri)
    except OSError as exc:
        raise ManifestError(f"cannot read manifest: {exc}") from exc
    classes = manifest_classes(cfg)
    try:
        rows = manifests.parse_manifest_records(records, classes, root)
    except ManifestError as exc:
        raise ManifestError(exc.problems, f"{uri}: {len(exc.problems)} problem(s)") from None
    return Manifest(classes, rows, root)


def manifest_dataset(cfg: RunConfig, classes: list[str]) -> tuple[ray.data.Dataset, int]:
    """The manifest's rows as `label_rows.ROW_SCHEMA` rows (an invalid one an error row), each
    keyed by `label_rows.row_key` with `cfg`'s mask settings, read and validated in Ray Data
    tasks, and the number of partitions of the joins that plan the run (`join_partitions`). A
    VOC layout (local, at most tens of thousands of rows) is read and validated on the
    driver."""
    uri = cfg.dataset.manifest
    settings = cfg.mask_settings()
    if cfg.dataset.voc_split is not None:
        rows = [
            label_rows.manifest_row(
                r.image_id, r.image, r.labels, key=label_rows.row_key(r.labels, None, settings)
            )
            for r in load_manifest(cfg).rows
        ]
        table = pa.Table.from_pylist(rows, schema=label_rows.ROW_SCHEMA)
        return ray.data.from_arrow(table), 1  # load_manifest checked the allowed roots
    index = {name: i for i, name in enumerate(classes)}
    fs, path = storage.filesystem(uri, cfg.storage)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise ManifestError(f"{uri}: manifest not found")
    root = storage.parent(uri) if storage.is_s3(uri) else posixpath.dirname(path)
    partitions = join_partitions(cfg, fs, path, info.size)
    if manifests.manifest_format(uri) == "parquet":
        read, step = ray.data.read_parquet(path, filesystem=fs), label_rows.rows_from_records
    else:
        with fs.open_input_stream(path) as f:
            if f.read(4096).lstrip().startswith(b"["):
                raise ManifestError(
                    f"{uri}: a JSON array cannot be streamed; write the manifest as JSON Lines "
                    "(one object per line) or Parquet"
                )
        read, step = ray.data.read_text(path, filesystem=fs), label_rows.rows_from_lines
    rows = read.map_batches(
        step,
        fn_kwargs={"index": index, "root": root, "mask_settings": settings},
        batch_format="pyarrow",
    )
    return _within_roots(rows, cfg), partitions


def join_partitions(cfg: RunConfig, fs: pafs.FileSystem, path: str, size: int) -> int:
    """Partitions of the joins that plan a run over the manifest at `path` (`size` bytes): one
    per `label.join_partition_rows` rows, counted in a Parquet footer, estimated from a JSON
    Lines file's size (counting its lines would read it once more)."""
    if manifests.manifest_format(path) == "parquet":
        with fs.open_input_file(path) as f:
            rows = pq.ParquetFile(f).metadata.num_rows
    else:
        rows = size // MIN_MANIFEST_LINE_BYTES
    return max(1, math.ceil(rows / cfg.label.join_partition_rows))


def _within_roots(rows: ray.data.Dataset, cfg: RunConfig) -> ray.data.Dataset:
    roots = cfg.dataset.allowed_roots
    if not roots:
        return rows
    return rows.map_batches(
        label_rows.within_roots, fn_kwargs={"roots": roots}, batch_format="pyarrow"
    )


ModelParams = TypeVar("ModelParams", ClassifierParams, AffinityNetParams)


def resolve_weights(params: ModelParams, cfg: RunConfig) -> ModelParams:
    """Model `params` whose backbone's s3:// `weights` URI is replaced by a local copy (wsss loads
    local files and torchvision weights names only)."""
    weights = params.backbone.weights
    if weights is None or not storage.is_s3(weights):
        return params
    backbone = params.backbone.model_copy(
        update={"weights": storage.local_copy(weights, cfg.storage)}
    )
    return params.model_copy(update={"backbone": backbone})
