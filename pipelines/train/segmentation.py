"""`wsss train-segmentation`: a segmentation network (`wsss.segmentation`) trained with Ray Train
on the pseudo-label shards, or on the manifest's ground-truth masks for the fully supervised
upper bound (`segmentation.train_on`).

The shards' rows (image URI and final mask as PNG) or the manifest's masked rows (image and mask
URIs) are fetched and decoded in Ray Data tasks (`pipelines.train.job.decode_rows`: unreadable
rows skipped and counted), augmented jointly here, and trained on with pixel-wise
cross-entropy, 255 ignored. The model record lands at `<run>/models/segmentation.json`;
`wsss label --model segmentation` labels with it and `wsss evaluate` scores what it labels.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import ray
from ray.data.expressions import col

from pipelines import shards
from pipelines.config import ConfigError, RunConfig
from pipelines.inputs import load_manifest, resolve_weights
from pipelines.manifests import Manifest
from pipelines.model_record import ModelRecord
from pipelines.runtime import connect
from pipelines.train.job import (
    block_count,
    check_cluster,
    decoded_blocks,
    new_job,
    run_training,
)
from wsss.networks import initial_network
from wsss.segmentation import SegmentationNet, segmentation_example, segmentation_step_loss
from wsss.transforms import AugmentParams


def segmentation_examples(
    batch: dict[str, np.ndarray], augment_params: AugmentParams
) -> dict[str, np.ndarray]:
    """Ray Data step: decoded {"image", "mask"} rows -> {"image": float32 (B, 3, S, S), "mask":
    uint8 (B, S, S)}, augmented from fresh entropy (see the classifier's)."""
    rng = np.random.default_rng()
    examples = [
        segmentation_example(image, mask, rng, augment_params)
        for image, mask in zip(batch["image"], batch["mask"], strict=True)
    ]
    return {key: np.stack([e[key] for e in examples]) for key in ("image", "mask")}


def training_rows(cfg: RunConfig, manifest: Manifest) -> tuple[ray.data.Dataset, int, str]:
    """The rows {"image_id", "image" (URI), "mask" (PNG bytes or URI)} to train on, their number
    and where they come from (for the log)."""
    if cfg.segmentation.train_on == "ground_truth":
        masked = [
            {"image_id": row.image_id, "image": row.image, "mask": row.mask}
            for row in manifest.rows
            if row.mask
        ]
        if not masked:
            raise ConfigError(
                f"segmentation.train_on: ground_truth, but dataset.manifest "
                f"{cfg.dataset.manifest} has no row with a `mask`"
            )
        return ray.data.from_items(masked), len(masked), f"{len(masked)} ground-truth masks"
    labels = cfg.segmentation.labels or cfg.layout.labels
    try:
        version = shards.resolve_model_version(labels, cfg.storage, cfg.segmentation.labels_version)
        classes = shards.shard_classes(labels, cfg.storage, version)
    except FileNotFoundError as exc:
        raise ConfigError(f"segmentation.labels: {exc}; run `wsss label` first") from None
    if classes != manifest.classes:
        raise ConfigError(
            f"segmentation.labels: the shards under {labels} know the classes {classes}, the "
            f"manifest {cfg.dataset.manifest} has {manifest.classes}"
        )
    column = cfg.segmentation.labels_column
    # The version resolved once: a labeling run finishing meanwhile changes nothing here.
    rows = shards.read_shard_rows(
        labels, cfg.storage, shards.LABELS, version, ["image_id", "image"], [column]
    )
    if column not in rows.columns():
        raise ConfigError(
            f"segmentation.labels_column: the shards under {labels} have no column {column!r}"
        )
    if column != shards.FINAL_COLUMN:
        # A stage's mask is stored only when its labeling kept the stages (label.keep_stages).
        rows = rows.filter(expr=col(column).is_not_null())
        rows = rows.rename_columns({column: "mask"})
    n_rows = rows.count()
    if not n_rows and column != shards.FINAL_COLUMN:
        raise ConfigError(
            f"segmentation.labels_column: no shard row under {labels} (model version {version}) "
            f"holds a {column!r} mask; label with label.keep_stages: true"
        )
    masks = "pseudo-labels" if column == shards.FINAL_COLUMN else f"{column} masks"
    return rows, n_rows, f"{n_rows} {masks} of {labels} (model version {version})"


def initial_segmentation_net(n_classes: int, cfg: RunConfig) -> SegmentationNet:
    """The network before training: its backbone from the configured weights (ImageNet's)."""
    return initial_network("segmentation", resolve_weights(cfg.segmentation.model, cfg), n_classes)


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> ModelRecord:
    """Train the segmentation network of `cfg` on Ray (resuming the run's last checkpoint, if
    any) and write its model record."""
    connect(cfg)
    check_cluster(cfg)
    manifest = load_manifest(cfg)
    rows, n_rows, source = training_rows(cfg, manifest)
    log(f"training the segmentation network on {source}")
    build_model = partial(initial_segmentation_net, manifest.num_foreground, cfg)
    job = new_job(
        "segmentation",
        cfg,
        manifest.classes,
        n_rows,
        cfg.segmentation,
        build_model,
        segmentation_step_loss,
        drop_last=True,
    )
    dataset = decoded_blocks(
        rows.repartition(block_count(n_rows, cfg)), cfg, job.skipped
    ).map_batches(
        segmentation_examples,
        fn_kwargs={"augment_params": cfg.segmentation.augment},
        batch_size=cfg.ray.rows_per_block,
        batch_format="numpy",
    )
    return run_training(job, dataset, log)
