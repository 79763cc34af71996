"""The overlay gallery of a labeling run: for a few images, the image, its ground truth, the CAM
mask and the final pseudo-label side by side, as one PNG contact sheet and a static HTML page.

Reads a bounded number of shard rows (`take`), so it costs the same on any collection size.
Written to a folder (`wsss evaluate` uses `gallery/` beside its result): `gallery.png`,
`index.html` and the page's pictures in `images/`.
"""

from __future__ import annotations

import hashlib
import html
import io
import re

import numpy as np
from PIL import Image

from pipelines import shards, storage
from pipelines.config import RunConfig
from pipelines.inputs import load_manifest
from wsss.imageio import decode_image, decode_mask
from wsss.labeling import CAM_STAGE
from wsss.metrics import ConfusionMatrix
from wsss.visualize import PALETTE, contact_sheet, overlay

FOLDER = "gallery"


def panel_titles(first_stage: str) -> tuple[str, ...]:
    """The gallery's columns: the third is the method's first stage (the CAM)."""
    return ("image", "ground truth", "CAM" if first_stage == CAM_STAGE else first_stage, "final")


def _png(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def _row_pictures(row: dict, truth_uri: str | None, n_classes: int, cfg: RunConfig):
    """The four pictures of one row (None for a mask that is not there: no ground truth, or
    a CAM mask the run did not keep) and its caption, with the final mask's mIoU when the
    ground truth is known."""
    image = decode_image(storage.read_bytes(row["image"], cfg.storage))
    truth = decode_mask(storage.read_bytes(truth_uri, cfg.storage)) if truth_uri else None
    cam_column = shards.stage_columns(cfg.stages)[cfg.stages[0]]
    cam = decode_mask(row[cam_column]) if row.get(cam_column) is not None else None
    final = decode_mask(row["mask"])
    caption = f"{row['image_id']}: {', '.join(row['labels'])}"
    matrix = ConfusionMatrix(n_classes).update(final, truth) if truth is not None else None
    if matrix is not None and matrix.total:  # some ground-truth pixel is not ignore
        caption += f" (final mIoU {100 * matrix.miou():.0f})"
    pictures = [image, *(None if m is None else overlay(image, m) for m in (truth, cam, final))]
    return pictures, caption


def _legend(classes: list[str]) -> str:
    items = []
    for index, name in enumerate(classes):
        r, g, b = PALETTE[index]
        swatch = f'<span class="sw" style="background:rgb({r},{g},{b})"></span>'
        items.append(f"<li>{swatch}{html.escape(name)}</li>")
    items.append('<li><span class="sw" style="background:#fff"></span>ignore (255)</li>')
    return "<ul class='legend'>" + "".join(items) + "</ul>"


def file_stem(image_id: str) -> str:
    """A file name for `image_id`, which is any text a manifest gave (slashes, "..", spaces):
    its safe characters, at most 80, and a digest of the whole id, so two ids never share one."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("._")[:80]
    digest = hashlib.sha256(image_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{safe}-{digest}" if safe else digest


def write_gallery(
    out_uri: str,
    cfg: RunConfig,
    folder: str,
    n: int = 12,
    model_version: str | None = shards.LATEST,
) -> dict[str, str]:
    """Write into `folder` the gallery of the first `n` labelled images under `out_uri`
    (preferring images with ground truth); returns the URIs of the contact sheet and the page."""
    manifest = load_manifest(cfg)
    truths = {row.image_id: row.mask for row in manifest.rows if row.mask}
    columns = ["image_id", "image", "labels", shards.FINAL_COLUMN]
    cam_column = shards.stage_columns(cfg.stages)[cfg.stages[0]]
    rows = shards.read_shard_rows(
        out_uri, cfg.storage, shards.LABELS, model_version, columns, optional_columns=[cam_column]
    )
    candidates = sorted(
        rows.take(4 * n), key=lambda r: (r["image_id"] not in truths, r["image_id"])
    )
    chosen = candidates[:n]
    if not chosen:
        raise FileNotFoundError(f"no labelled images under {out_uri} to show")

    tiles, captions, body = [], [], []
    titles = panel_titles(cfg.stages[0])
    n_classes = len(manifest.classes)
    for row in chosen:
        truth_uri = truths.get(row["image_id"])
        panels, caption = _row_pictures(row, truth_uri, n_classes, cfg)
        blank = np.full_like(panels[0], 255)
        tiles.append([blank if p is None else p for p in panels])
        captions.append(
            [
                caption,
                *(
                    c if p is not None else f"{c}: none"
                    for c, p in zip(titles[1:], panels[1:], strict=True)
                ),
            ]
        )
        cells = []
        for column, picture in zip(titles, panels, strict=True):
            if picture is None:
                cells.append("<td>none</td>")
                continue
            name = f"images/{file_stem(row['image_id'])}_{column.replace(' ', '_')}.png"
            storage.write_bytes(storage.join(folder, name), _png(picture), cfg.storage)
            cells.append(f'<td><img src="{html.escape(name)}" alt="{html.escape(column)}"></td>')
        body.append(f"<tr><th>{html.escape(caption)}</th>{''.join(cells)}</tr>")

    sheet_uri = storage.join(folder, "gallery.png")
    storage.write_bytes(sheet_uri, _png(contact_sheet(tiles, captions)), cfg.storage)
    header = "".join(f"<th>{html.escape(c)}</th>" for c in ("", *titles))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>wsss pseudo-labels: {html.escape(out_uri)}</title>
<style>body{{font-family:sans-serif}} img{{width:192px;image-rendering:pixelated}}
th{{text-align:left;font-weight:normal;max-width:14em}} .legend{{list-style:none;padding:0}}
.legend li{{display:inline-block;margin-right:1em}}
.sw{{display:inline-block;width:1em;height:1em;margin-right:.3em;border:1px solid #999}}</style>
</head><body>
<h1>Pseudo-labels of {html.escape(out_uri)}</h1>
<p>Model version {html.escape(str(model_version))}. Overlays: class colours over the image
(background left as is).</p>
{_legend(manifest.classes)}
<table><tr>{header}</tr>
{chr(10).join(body)}
</table></body></html>
"""
    page_uri = storage.join(folder, "index.html")
    storage.write_bytes(page_uri, page.encode(), cfg.storage)
    return {"contact_sheet": sheet_uri, "page": page_uri}
