"""`wsss train-classifier`: the classifier trained with Ray Train on the manifest's images.

Ray Data fetches and decodes the images (`pipelines.train.job.image_dataset`) and makes the CAM
method's training examples of them here (`CamMethodParams.example`); the workers train with
`classifier_step_loss`, the method's loss. A method that keeps seeds while it trains (OAA) has
each epoch's stored by every worker; they are merged after training
(`pipelines.train.kept_seeds`).
The model record lands at `<run>/models/classifier.json`, naming the merged seeds if any.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from pipelines.config import RunConfig
from pipelines.inputs import load_manifest, resolve_weights
from pipelines.model_record import ModelRecord
from pipelines.runtime import connect
from pipelines.train.job import check_cluster, image_dataset, new_job, run_training
from wsss.cam_methods import CamMethodParams
from wsss.classifier import Classifier, classifier_step_loss
from wsss.networks import initial_network
from wsss.transforms import AugmentParams


def classification_examples(
    batch: dict[str, np.ndarray],
    n_classes: int,
    augment_params: AugmentParams,
    method: CamMethodParams,
) -> dict[str, np.ndarray]:
    """Ray Data step: decoded rows -> the method's examples, stacked (the plain CAM's:
    {"image": float32 (B, 3, S, S), "targets": (B, K)}), each with its "row" in the manifest.

    Augmentation draws from fresh entropy: Ray Data does not tell a task which epoch it
    serves, so unlike the in-process loop a run is not repeatable draw for draw."""
    rng = np.random.default_rng()
    examples = [
        method.example(image, labels, n_classes, rng, augment_params) | {"row": np.int64(row)}
        for image, labels, row in zip(batch["image"], batch["labels"], batch["row"], strict=True)
    ]
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def initial_classifier(n_classes: int, cfg: RunConfig) -> Classifier:
    """The classifier before training: its configured backbone weights, when set, are fetched
    on the worker's own node."""
    return initial_network("classifier", resolve_weights(cfg.classifier.model, cfg), n_classes)


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> ModelRecord:
    """Train the classifier of `cfg` on Ray (resuming the run's last checkpoint, if any) and
    write its model record."""
    connect(cfg)
    check_cluster(cfg)
    manifest = load_manifest(cfg)
    n_classes = manifest.num_foreground
    build_model = partial(initial_classifier, n_classes, cfg)
    job = new_job(
        "classifier",
        cfg,
        manifest.classes,
        len(manifest),
        cfg.classifier,
        build_model,
        classifier_step_loss,
        seeds_uri=cfg.layout.kept_seeds("classifier"),
    )
    dataset = image_dataset(manifest, cfg, job.skipped).map_batches(
        classification_examples,
        fn_kwargs={
            "n_classes": n_classes,
            "augment_params": cfg.classifier.augment,
            "method": cfg.classifier.model.method,
        },
        batch_size=cfg.ray.rows_per_block,
        batch_format="numpy",
    )
    return run_training(job, dataset, log, [r.image_id for r in manifest.rows])
