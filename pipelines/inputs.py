"""What a run reads besides images: the dataset manifest and pretrained backbone weights, from
local paths or object storage.

The parsing and validation rules are `pipelines.manifests`'s; this module only fetches the bytes.
"""

from __future__ import annotations

from typing import TypeVar

from pipelines import manifests, storage
from pipelines.config import RunConfig
from pipelines.manifests import Manifest, ManifestError
from wsss.affinity import AffinityNetParams
from wsss.classifier import ClassifierParams


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
    local PASCAL VOC root when `dataset.voc_split` is set). Raises ManifestError."""
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
