"""What a run reads besides images: the dataset manifest and pretrained backbone weights, from
local paths or object storage.

The parsing and validation rules are `wsss.dataset`'s; this module only fetches the bytes.
"""

from __future__ import annotations

from pipelines import storage
from pipelines.config import RunConfig
from wsss import dataset
from wsss.backbone import BackboneParams
from wsss.dataset import Manifest, ManifestError


def load_manifest(cfg: RunConfig) -> Manifest:
    """The validated manifest of `cfg.dataset` (JSONL/Parquet with classes.txt beside it, or a
    local PASCAL VOC root when `dataset.voc_split` is set). Raises ManifestError."""
    uri = cfg.dataset.manifest
    if cfg.dataset.voc_split is not None:
        if storage.is_s3(uri):
            raise ManifestError(
                f"{uri}: a VOC layout must be a local folder; convert it to a manifest"
            )
        return dataset.read_voc(uri, cfg.dataset.voc_split)
    if not storage.is_s3(uri):
        return dataset.read_manifest(uri)
    root = storage.parent(uri)
    classes_uri = storage.join(root, "classes.txt")
    try:
        classes = dataset.parse_classes(storage.read_text(classes_uri, cfg.storage), classes_uri)
        records = dataset.parse_records(storage.read_bytes(uri, cfg.storage), uri)
    except OSError as exc:
        raise ManifestError(f"cannot read manifest: {exc}") from exc
    try:
        rows = dataset.parse_manifest_records(records, classes, root)
    except ManifestError as exc:
        raise ManifestError(exc.problems, f"{uri}: {len(exc.problems)} problem(s)") from None
    return Manifest(classes, rows, root)


def resolve_weights(params: BackboneParams, cfg: RunConfig) -> BackboneParams:
    """`params` with an s3:// `weights` URI replaced by a local copy (wsss loads local files and
    torchvision weights names only)."""
    if params.weights is None or not storage.is_s3(params.weights):
        return params
    return params.model_copy(update={"weights": storage.local_copy(params.weights, cfg.storage)})
