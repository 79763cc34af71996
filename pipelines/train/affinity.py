"""`wsss train-affinity`: AffinityNet trained with Ray Train on labels from a teacher network
(`RunConfig.affinity_teacher`): the classifier's CAMs (IRN), or, in the rounds of iterative
affinity learning (label.model refined_segmentation, `pipelines.iterate`), a segmentation
network's confident pixels.

The affinity labels are a Ray Data stage: an actor pool loads the teacher from its model record
once per actor and turns each decoded image into an affinity label map
(`wsss.affinity.affinity_label_map` of the CAMs, `wsss.segmentation.confident_label_map`). The
labels are computed once per run and kept in Ray's object store (spilled to disk when larger
than memory; only references reach the driver): CAMs at several scales cost far more than an
epoch of AffinityNet training. Every epoch, Ray Data tasks augment image and map jointly and
stream the examples to the trainer. AffinityNet's backbone starts from the classifier's, as in
`wsss run-local`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import ray

from pipelines.config import ConfigError, RunConfig
from pipelines.inputs import load_manifest
from pipelines.manifests import Manifest
from pipelines.model_record import ModelRecord, load_network, read_record
from pipelines.runtime import connect
from pipelines.shards import ragged
from pipelines.train.job import check_cluster, image_dataset, new_job, run_training
from pipelines.train.kept_seeds import SEEDS
from wsss import kept_seeds
from wsss.affinity import AffinityNet, affinity_example, affinity_label_map, affinity_step_loss
from wsss.cam import image_cams
from wsss.networks import initial_network
from wsss.segmentation import confident_label_map, segment
from wsss.training import default_device
from wsss.transforms import AugmentParams


class AffinityLabeler:
    """Ray Data actor: decoded rows -> {"image_id", "image", "label_map"}, the affinity label
    map uint8 (H, W) of each image from the network of `teacher_record`
    (`RunConfig.affinity_teacher`)."""

    def __init__(self, teacher_record: ModelRecord, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.teacher = cfg.affinity_teacher
        # The actor sees only the GPU Ray gave it (if any): default_device picks it.
        self.model = load_network(teacher_record, cfg, self.teacher).to(default_device())

    def label_map(
        self, image: np.ndarray, labels: list[int], kept: bytes | None = None
    ) -> np.ndarray:
        """The image's affinity label map; `kept`: its seeds the classifier's CAM method kept
        while training (OAA's), which stand for its CAMs (`pipelines.train.kept_seeds`)."""
        if self.teacher == "classifier":
            seeds = None if kept is None else kept_seeds.decode(kept)
            cams = image_cams(self.model, image, labels, self.cfg.cam, seeds)
            return affinity_label_map(cams, labels, self.cfg.affinity.labels, image)
        scores = segment(self.model, image, labels, self.cfg.segmentation.inference)
        return confident_label_map(scores, image.shape[:2], self.cfg.iterate.confident)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kept = batch.get(SEEDS, [None] * len(batch["image"]))
        label_maps = [
            self.label_map(image, [int(c) for c in labels], seeds)
            for image, labels, seeds in zip(batch["image"], batch["labels"], kept, strict=True)
        ]
        return {
            "image_id": batch["image_id"],
            "image": batch["image"],
            "label_map": ragged(label_maps),
        }


def affinity_examples(
    batch: dict[str, np.ndarray], augment_params: AugmentParams, stride: int
) -> dict[str, np.ndarray]:
    """Ray Data step: {"image", "label_map"} rows -> {"image": float32 (B, 3, S, S), "label":
    uint8 (B, S/stride, S/stride)}, augmented from fresh entropy (see the classifier's)."""
    rng = np.random.default_rng()
    examples = [
        affinity_example(image, label_map, rng, augment_params, stride)
        for image, label_map in zip(batch["image"], batch["label_map"], strict=True)
    ]
    return {key: np.stack([e[key] for e in examples]) for key in ("image", "label")}


def affinity_label_dataset(
    manifest: Manifest, cfg: RunConfig, teacher_record: ModelRecord, skipped
) -> ray.data.Dataset:
    """The manifest's images with their affinity label maps, computed by an actor pool of
    `ray.model_actors` teacher networks (each with `ray.cpus_per_actor` CPUs, and
    `ray.gpus_per_actor` GPUs when `ray.use_gpu`); the classifier's kept seeds stand for its
    CAMs where it has them."""
    r = cfg.ray
    kept = teacher_record.kept_seeds_uri if cfg.affinity_teacher == "classifier" else None
    return image_dataset(manifest, cfg, skipped, kept).map_batches(
        AffinityLabeler,
        fn_constructor_kwargs={"teacher_record": teacher_record, "cfg": cfg},
        compute=ray.data.ActorPoolStrategy(size=r.model_actors),
        num_cpus=r.cpus_per_actor,
        num_gpus=r.gpus_per_actor if r.use_gpu else 0,
        batch_size=r.rows_per_block,
        batch_format="numpy",
    )


def initial_affinity_net(classifier_record: ModelRecord, cfg: RunConfig) -> AffinityNet:
    """AffinityNet before training: its backbone is the trained classifier's."""
    classifier = load_network(classifier_record, cfg, "classifier")
    return initial_network(
        "affinity", cfg.affinity.model, classifier.n_classes, classifier.backbone.state_dict()
    )


def run(
    cfg: RunConfig, classifier_record: str | None = None, log: Callable[[str], None] = print
) -> ModelRecord:
    """Train the AffinityNet of `cfg` on Ray, its backbone from the classifier of
    `classifier_record` (default: this run's), its labels from that classifier's CAMs or, in an
    iterate round, this run's segmentation network (`RunConfig.affinity_teacher`), resuming the
    run's last checkpoint if any, and write its model record."""
    connect(cfg)
    check_cluster(cfg, model_actors=True)
    uris = {"classifier": classifier_record or cfg.layout.record("classifier")}
    uris.setdefault(cfg.affinity_teacher, cfg.layout.record(cfg.affinity_teacher))
    manifest = load_manifest(cfg)
    # The records read here, not their URIs, go to the actors and workers: one network each for
    # the whole job even if a record is replaced while it runs.
    records = {name: read_record(uri, cfg) for name, uri in uris.items()}
    for name, record in records.items():
        if record.classes != manifest.classes:
            raise ConfigError(
                f"the {name} of {uris[name]} knows the classes {record.classes}, "
                f"the manifest {cfg.dataset.manifest} has {manifest.classes}"
            )
    build_model = partial(initial_affinity_net, records["classifier"], cfg)
    job = new_job(
        "affinity",
        cfg,
        manifest.classes,
        len(manifest),
        cfg.affinity,
        build_model,
        affinity_step_loss,
    )
    teacher = records[cfg.affinity_teacher]
    labelled = affinity_label_dataset(manifest, cfg, teacher, job.skipped).materialize()
    dataset = labelled.map_batches(
        affinity_examples,
        fn_kwargs={
            "augment_params": cfg.affinity.augment,
            "stride": cfg.affinity.model.feature_stride,
        },
        batch_size=cfg.ray.rows_per_block,
        batch_format="numpy",
    )
    return run_training(job, dataset, log)
