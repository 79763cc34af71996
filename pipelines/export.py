"""`wsss export`: pseudo-label shards as the folder layouts other segmentation trainers read,
from any shard set (a run's `labels/`, a relabel night's) to a local folder or an S3 prefix,
streamed with Ray Data: each task writes its batch's files, the driver only their names.

Formats (`FORMATS`):

- `png-folder`: `images/<name><suffix>` (the source image's bytes, unchanged) and
  `masks/<name>.png` (the shard's mask bytes, unchanged: 8-bit class indices, 255 = ignore):
  mmsegmentation's `img_dir` / `ann_dir` layout (`reduce_zero_label=False`, `ignore_index=255`).
- `voc`: `JPEGImages/<name>.jpg` (JPEG sources copied, others encoded as JPEG),
  `SegmentationClass/<name>.png` (palette PNGs with the same indices, PASCAL VOC's colours) and
  `ImageSets/Segmentation/train.txt`: what torchvision's `VOCSegmentation` (its
  `references/segmentation` scripts) and mmsegmentation's `PascalVOCDataset` read.

Both write `palette.json` (class names in index order, their colours, the ignore index, the
format) and `names.txt` (one name per exported image). A name is the image_id with every
character outside `A-Z a-z 0-9 . _ -` percent-encoded, so names are flat, distinct and map back
to their ids. An image that cannot be fetched is not exported; it is listed in `errors.jsonl`
and the command exits non-zero, having exported the rest.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
from PIL import Image

from pipelines import shards, storage
from pipelines.config import ConfigError, RunConfig
from pipelines.runtime import connect
from pipelines.storage import StorageConfig
from wsss.imageio import decode_image, decode_mask, encode_mask
from wsss.transforms import IGNORE_INDEX
from wsss.visualize import PALETTE

JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class ExportFormat:
    """Where a format puts images and masks, and how it writes them."""

    images: str  # folder under the export's root
    masks: str
    jpeg_images: bool  # every image as .jpg (else the source's bytes and suffix)
    palette_masks: bool  # masks as palette PNGs (else the shard's grayscale PNG bytes)
    list_file: str | None  # the split file naming every image, if the format has one


FORMATS = {
    "png-folder": ExportFormat("images", "masks", False, False, None),
    "voc": ExportFormat(
        "JPEGImages", "SegmentationClass", True, True, "ImageSets/Segmentation/train.txt"
    ),
}


def export_name(image_id: str) -> str:
    """The file name (without suffix) of an image_id: flat and distinct per id."""
    return quote(image_id, safe="-_.")


def _image_suffix(uri: str, data: bytes) -> str:
    """The source's own suffix (lower-cased), else one from the bytes' format."""
    tail = uri.rsplit("/", 1)[-1]
    if "." in tail.lstrip("."):
        return "." + tail.rsplit(".", 1)[-1].lower()
    return ".jpg" if data.startswith(JPEG_MAGIC) else ".png"


def _as_jpeg(data: bytes) -> bytes:
    if data.startswith(JPEG_MAGIC):
        return data
    buffer = io.BytesIO()
    Image.fromarray(decode_image(data)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def export_batch(
    batch: dict[str, np.ndarray], root: str, fmt: ExportFormat, config: StorageConfig
) -> dict[str, np.ndarray]:
    """Ray Data step: write each row's image and mask under `root`; one output row per input
    row: its name, and the error that kept it out ("" when exported)."""
    names, errors = [], []
    for image_id, uri, mask in zip(batch["image_id"], batch["image"], batch["mask"], strict=True):
        name = export_name(str(image_id))
        try:
            data = storage.read_bytes(str(uri), config)
            if fmt.jpeg_images:
                image, suffix = _as_jpeg(data), ".jpg"
            else:
                image, suffix = data, _image_suffix(str(uri), data)
            mask_png = encode_mask(decode_mask(mask), PALETTE) if fmt.palette_masks else mask
        except Exception as exc:  # noqa: BLE001  (the row is reported; the others go on)
            names.append(name)
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        storage.write_bytes(storage.join(root, fmt.images, name + suffix), image, config)
        storage.write_bytes(storage.join(root, fmt.masks, name + ".png"), bytes(mask_png), config)
        names.append(name)
        errors.append("")
    return {
        "image_id": batch["image_id"],
        "name": np.array(names, dtype=object),
        "error": np.array(errors, dtype=object),
    }


def export(
    labels_uri: str,
    out_uri: str,
    format_name: str,
    config: StorageConfig,
    model_version: str | None = shards.LATEST,
    batch_size: int = 32,
) -> dict:
    """Write the shards under `labels_uri` to `out_uri` in `format_name`; returns the summary
    (also written as `export.json`)."""
    fmt = FORMATS[format_name]
    model_version = shards.resolve_model_version(labels_uri, config, model_version)
    classes = shards.shard_classes(labels_uri, config, model_version)
    rows = shards.read_shard_rows(
        labels_uri, config, shards.LABELS, model_version, ["image_id", "image", "mask"]
    )
    written = rows.map_batches(
        export_batch,
        fn_kwargs={"root": out_uri, "fmt": fmt, "config": config},
        batch_size=batch_size,
        batch_format="numpy",
    )
    names, failed = [], []
    for batch in written.iter_batches(batch_format="numpy", batch_size=4096):
        for image_id, name, error in zip(
            batch["image_id"], batch["name"], batch["error"], strict=True
        ):
            if error:
                failed.append({"image_id": str(image_id), "error": str(error)})
            else:
                names.append(str(name))
    names.sort()
    listing = ("\n".join(names) + "\n").encode() if names else b""
    storage.write_bytes(storage.join(out_uri, "names.txt"), listing, config)
    if fmt.list_file:
        storage.write_bytes(storage.join(out_uri, fmt.list_file), listing, config)
    palette = {
        "format": format_name,
        "classes": classes,
        "palette": PALETTE[: len(classes)].tolist(),
        "ignore_index": IGNORE_INDEX,
        "images": fmt.images,
        "masks": fmt.masks,
    }
    storage.write_bytes(
        storage.join(out_uri, "palette.json"), json.dumps(palette, indent=2).encode(), config
    )
    errors_uri = storage.join(out_uri, "errors.jsonl")
    if failed:
        lines = "".join(json.dumps(f) + "\n" for f in failed)
        storage.write_bytes(errors_uri, lines.encode(), config)
    summary = {
        "labels": labels_uri,
        "model_version": model_version,
        "format": format_name,
        "exported": len(names),
        "failed": len(failed),
        "errors": errors_uri if failed else None,
    }
    storage.write_bytes(
        storage.join(out_uri, "export.json"), json.dumps(summary, indent=2).encode(), config
    )
    return summary


def run(
    cfg: RunConfig,
    labels_uri: str | None,
    out_uri: str,
    format_name: str,
    model_version: str | None = shards.LATEST,
    log: Callable[[str], None] = print,
) -> dict:
    """`wsss export`: the shards under `labels_uri` (default: where `wsss label` of `cfg`
    writes) to `out_uri`."""
    if format_name not in FORMATS:
        raise ConfigError(f"--format {format_name!r}: not one of {', '.join(FORMATS)}")
    labels_uri = labels_uri or cfg.layout.labels
    connect(cfg)
    log(f"exporting the pseudo-labels under {labels_uri} to {out_uri} as {format_name}")
    summary = export(labels_uri, out_uri, format_name, cfg.storage, model_version)
    log(
        f"{summary['exported']} image(s) exported to {out_uri} (model version "
        f"{summary['model_version']}); classes and colours in palette.json"
    )
    if summary["failed"]:
        log(
            f"{summary['failed']} image(s) not exported (their source could not be read): "
            f"{summary['errors']}"
        )
    return summary
