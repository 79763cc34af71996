"""`wsss evaluate`: mIoU of the pseudo-label shards against the manifest's ground-truth masks.

The shards are streamed through Ray Data: each task decodes its rows' masks (the final one, and
each earlier stage's of the configured method when the labeling run kept them), fetches the
ground truth and returns one confusion matrix per stage (`wsss.metrics.ConfusionMatrix`); the
driver only merges those small matrices. Ground truth is a human annotation and exists for an
evaluation subset, so the image_id -> mask URI map of the manifest's annotated rows is what the
tasks receive.

Prints a table of mIoU and per-class IoU per stage and writes the same as JSON (default
`<out>/evaluation.json`). Pixels whose ground truth is 255 are not counted; when no pixel is left
the stage reports that nothing was evaluated instead of a number.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from pipelines import gallery, shards, storage
from pipelines.config import ConfigError, RunConfig
from pipelines.inputs import load_manifest
from pipelines.runtime import connect
from pipelines.storage import StorageConfig
from wsss.class_report import ClassAreas, class_report, format_class_report, presence_rates
from wsss.imageio import decode_mask
from wsss.metrics import ConfusionMatrix

RESULT_FILE = "evaluation.json"
MAX_PROBLEMS = 10  # examples of unusable ground truth kept in the result


CLASS_REPORT_TITLE = (
    "Which classes the image labels can localise (area: the mean share of an image labelled "
    "with the class that each stage's mask gives it):"
)


def score_batch(
    batch: dict[str, np.ndarray],
    ground_truth: dict[str, str],
    classes: list[str],
    stage_columns: dict[str, str],
    config: StorageConfig,
) -> dict[str, np.ndarray]:
    """Ray Data step: shard rows -> one row per stage (`stage_columns`: stage -> the column of
    its mask) with the batch's confusion counts over the rows that have ground truth, how many
    those were, and the class areas of every row (`wsss.class_report.ClassAreas`, which needs no
    ground truth)."""
    n_classes = len(classes)
    index = {name: i for i, name in enumerate(classes)}
    matrices = {stage: ConfusionMatrix(n_classes) for stage in stage_columns}
    areas = {stage: ClassAreas(n_classes) for stage in stage_columns}
    present = {stage: False for stage in stage_columns}
    evaluated = 0
    problems: list[str] = []  # ground truth a row cannot be evaluated against: that row only
    for i, image_id in enumerate(batch["image_id"]):
        truth_uri = ground_truth.get(str(image_id))
        truth = _read_ground_truth(truth_uri, config) if truth_uri else None
        if isinstance(truth, str):
            problems.append(f"{image_id}: ground truth {truth_uri}: {truth}")
            truth = None
        labels = [index[name] for name in batch["labels"][i]]
        for stage, column in stage_columns.items():
            png = batch[column][i] if column in batch else None
            if png is None:
                continue
            pred = decode_mask(png)
            present[stage] = True
            areas[stage].update(pred, labels)
            if truth is not None and pred.shape != truth.shape:  # every stage's mask has one size
                problems.append(
                    f"{image_id}: ground truth {truth_uri} is {truth.shape}, the masks {pred.shape}"
                )
                truth = None
            if truth is not None:
                matrices[stage].update(pred, truth)
        evaluated += truth is not None
    stages = [stage for stage in stage_columns if present[stage]]
    return {
        "stage": np.array(stages, dtype=object),
        "counts": np.array([matrices[s].counts.ravel() for s in stages]).reshape(len(stages), -1),
        "areas": np.array([areas[s].sums.ravel() for s in stages]).reshape(len(stages), -1),
        "images": np.full(len(stages), evaluated, dtype=np.int64),
        # The batch's problems, on each of its stage rows alike (the reader takes one).
        "unusable": np.full(len(stages), len(problems), dtype=np.int64),
        "problems": np.array(["\n".join(problems[:MAX_PROBLEMS])] * len(stages), dtype=object),
    }


def _read_ground_truth(uri: str, config: StorageConfig) -> np.ndarray | str:
    """The ground-truth mask at `uri`, or why it cannot be read (that row is then not
    evaluated; the job goes on)."""
    try:
        return decode_mask(storage.read_bytes(uri, config))
    except (OSError, ValueError) as exc:  # ImageDecodeError is a ValueError
        return f"{type(exc).__name__}: {exc}"


def round_metric(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 4)


def stage_result(matrix: ConfusionMatrix, images: int) -> dict:
    """JSON-ready result of one stage; mIoU None (with a reason) when no pixel was evaluated."""
    result: dict = {"images": images, "pixels": matrix.total}
    if matrix.total == 0:
        note = "nothing evaluated: every ground-truth pixel is 255 (ignore)"
        result.update(miou=None, iou=None, note=note)
        return result
    result.update(
        miou=round_metric(matrix.miou()),
        iou=[round_metric(v) for v in matrix.iou()],
        pixel_accuracy=round_metric(matrix.pixel_accuracy()),
        counts=matrix.counts.tolist(),
    )
    return result


def evaluate(out_uri: str, cfg: RunConfig, model_version: str | None = shards.LATEST) -> dict:
    """Confusion matrices per stage of the shards under `out_uri` against the ground truth of
    `cfg.dataset.manifest`, as the result dict written to JSON."""
    manifest = load_manifest(cfg)
    ground_truth = {row.image_id: row.mask for row in manifest.rows if row.mask}
    if not ground_truth:
        raise ConfigError(
            f"dataset.manifest {cfg.dataset.manifest} has no ground-truth masks (no row has a "
            "`mask`): there is nothing to evaluate against"
        )
    n_classes = len(manifest.classes)
    model_version = shards.resolve_model_version(out_uri, cfg.storage, model_version)
    stage_columns = shards.stage_columns(cfg.stages)
    rows = shards.read_shard_rows(
        out_uri,
        cfg.storage,
        shards.LABELS,
        model_version,
        ["image_id", "labels", shards.FINAL_COLUMN],
        optional_columns=list(stage_columns.values()),
    )
    scored = rows.map_batches(
        score_batch,
        fn_kwargs={
            "ground_truth": ground_truth,
            "classes": manifest.classes,
            "stage_columns": stage_columns,
            "config": cfg.storage,
        },
        batch_size=cfg.ray.rows_per_block,
        batch_format="numpy",
    )
    matrices: dict[str, ConfusionMatrix] = {}
    areas: dict[str, ClassAreas] = {}
    images: dict[str, int] = {}
    unusable, problems = 0, []
    for batch in scored.iter_batches(batch_format="numpy", batch_size=None):
        if len(batch["stage"]):
            unusable += int(batch["unusable"][0])
            problems += [p for p in batch["problems"][0].split("\n") if p]
        for stage, counts, sums, n in zip(
            batch["stage"], batch["counts"], batch["areas"], batch["images"], strict=True
        ):
            partial = ConfusionMatrix(n_classes, counts.reshape(n_classes, n_classes + 1))
            matrices[stage] = matrices[stage].merge(partial) if stage in matrices else partial
            part = ClassAreas(n_classes, sums.reshape(2, n_classes))
            areas[stage] = areas[stage].merge(part) if stage in areas else part
            images[stage] = images.get(stage, 0) + int(n)
    return {
        "labels": out_uri,
        "manifest": cfg.dataset.manifest,
        "model_version": model_version,
        "classes": manifest.classes,
        "ground_truth_images": len(ground_truth),
        "ground_truth_unusable": unusable,
        "ground_truth_problems": problems[:MAX_PROBLEMS],
        "stages": {
            stage: stage_result(matrices[stage], images[stage])
            for stage in stage_columns
            if stage in matrices
        },
        "class_report": class_report(
            manifest.classes,
            presence_rates((manifest.label_indices(row) for row in manifest.rows), n_classes),
            areas,
            cfg.evaluate.class_report,
            final=cfg.stages[-1],
        ),
    }


def format_table(classes: list[str], stages: dict[str, dict]) -> str:
    """Markdown table: a row per stage with its mIoU and per-class IoU, in percent. `stages`
    maps a stage to {"miou", "iou"}, None where nothing was evaluated."""
    lines = [f"| stage | mIoU | {' | '.join(classes)} |", "|" + "---|" * (len(classes) + 2)]
    for stage, result in stages.items():
        ious = result["iou"] or [None] * len(classes)
        cells = " | ".join("-" if v is None else f"{100 * v:.1f}" for v in ious)
        miou = "nothing evaluated" if result["miou"] is None else f"{100 * result['miou']:.1f}"
        lines.append(f"| {stage} | {miou} | {cells} |")
    return "\n".join(lines)


def run(
    cfg: RunConfig,
    out_uri: str | None = None,
    model_version: str | None = shards.LATEST,
    log: Callable[[str], None] = print,
) -> dict:
    """Evaluate the shards under `out_uri` (default: where `wsss label` of `cfg` writes), print
    the table, write the result JSON and, with evaluate.gallery_images, the overlay gallery."""
    out_uri = out_uri or cfg.layout.labels
    connect(cfg)
    result = evaluate(out_uri, cfg, model_version)
    report = cfg.layout.report(out_uri)
    result_uri = storage.join(report, RESULT_FILE)
    storage.write_bytes(result_uri, json.dumps(result, indent=2).encode(), cfg.storage)
    log(format_table(result["classes"], result["stages"]))
    for stage, r in result["stages"].items():
        if r["miou"] is None:
            log(f"{stage}: {r['note']} ({r['images']} image(s) with ground truth)")
    log(f"{result['ground_truth_images']} image(s) with ground truth; result in {result_uri}")
    if result["ground_truth_unusable"]:
        log(
            f"{result['ground_truth_unusable']} image(s) not evaluated, their ground truth "
            f"unusable, e.g. {result['ground_truth_problems'][0]}"
        )
    log(CLASS_REPORT_TITLE)
    log(format_class_report(result["class_report"]))
    if cfg.evaluate.gallery_images:
        written = gallery.write_gallery(
            out_uri,
            cfg,
            storage.join(report, gallery.FOLDER),
            cfg.evaluate.gallery_images,
            result["model_version"],
        )
        log(f"gallery: {written['contact_sheet']} and {written['page']}")
    return result
