"""Every stage of the method in this process, without Ray: `wsss run-local`.

The reference the distributed jobs are checked against, and the quickest way to see what a
configuration does on a small dataset. It reads the manifest and images (local or s3://), trains
the classifier, computes CAMs and affinity labels, trains AffinityNet, labels every image with
`wsss.labeling` and reports mIoU after each stage (CAM, then each configured refiner: random walk,
CRF) against the ground-truth masks.
The resolved config and a JSON summary go to `<output>/<name>/local/`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipelines import storage
from pipelines.config import RunConfig
from pipelines.evaluate import CLASS_REPORT_TITLE, format_table, round_metric, stage_result
from pipelines.inputs import load_manifest, resolve_weights
from pipelines.manifests import Manifest
from wsss import labeling
from wsss.affinity import AffinityNet, affinity_label_map, train_affinity_net
from wsss.cam import CONSTANT_BACKGROUNDS, image_cams
from wsss.class_report import ClassAreas, class_report, format_class_report, presence_rates
from wsss.classifier import Classifier, image_scores, train_classifier
from wsss.imageio import decode_image, decode_mask
from wsss.kept_seeds import by_row
from wsss.metrics import ConfusionMatrix, mean_average_precision
from wsss.networks import initial_network
from wsss.training import EpochEnd, default_device, epoch_summary


@dataclass
class Example:
    image_id: str
    image: np.ndarray
    labels: list[int]
    mask: np.ndarray | None


def load_examples(cfg: RunConfig, manifest: Manifest) -> list[Example]:
    """Decode every image (and ground-truth mask) of the manifest into memory."""
    examples = []
    for row in manifest.rows:
        image = decode_image(storage.read_bytes(row.image, cfg.storage), cfg.dataset.max_pixels)
        mask = decode_mask(storage.read_bytes(row.mask, cfg.storage)) if row.mask else None
        if mask is not None and mask.shape != image.shape[:2]:
            raise ValueError(
                f"{row.image_id}: mask {mask.shape} does not match image {image.shape[:2]}"
            )
        examples.append(Example(row.image_id, image, manifest.label_indices(row), mask))
    return examples


def _log_epoch(what: str, epochs: int, log: Callable[[str], None]) -> EpochEnd:
    return lambda epoch, metrics: log(epoch_summary(what, epoch, epochs, metrics))


def fit_classifier(
    cfg: RunConfig,
    examples: list[Example],
    n_classes: int,
    device,
    log: Callable[[str], None],
    kept: dict | None = None,
) -> Classifier:
    """The classifier of `cfg` trained on `examples` (its backbone weights resolved first);
    the seeds its CAM method keeps (OAA's) are merged into `kept` (`train_classifier`)."""
    start = initial_network(
        "classifier", resolve_weights(cfg.classifier.model, cfg), n_classes, seed=cfg.seed
    )
    return train_classifier(
        start,
        [(e.image, e.labels) for e in examples],
        cfg.classifier.augment,
        cfg.classifier.optim,
        cfg.seed,
        device,
        on_epoch_end=_log_epoch("classifier", cfg.classifier.optim.epochs, log),
        kept=kept,
    )


def cam_affinity_labels(
    cfg: RunConfig, examples: list[Example], cams: list[np.ndarray]
) -> list[np.ndarray]:
    """The affinity label map of each example from its CAMs `cams` (IRN's, `wsss.affinity`)."""
    return [
        affinity_label_map(cams_fg, e.labels, cfg.affinity.labels, e.image)
        for e, cams_fg in zip(examples, cams, strict=True)
    ]


def fit_affinity_net(
    cfg: RunConfig,
    examples: list[Example],
    label_maps: list[np.ndarray],
    classifier: Classifier,
    device,
    log: Callable[[str], None],
) -> AffinityNet:
    """AffinityNet trained on the examples' affinity label maps (`wsss.affinity`: a class,
    0 background, 255 ignore per pixel), its backbone starting from the classifier's."""
    samples = [(e.image, m) for e, m in zip(examples, label_maps, strict=True)]
    start = initial_network(
        "affinity",
        cfg.affinity.model,
        classifier.n_classes,
        classifier.backbone.state_dict(),
        seed=cfg.seed,
    )
    return train_affinity_net(
        start,
        samples,
        cfg.affinity.augment,
        cfg.affinity.optim,
        cfg.seed,
        device,
        on_epoch_end=_log_epoch("affinity", cfg.affinity.optim.epochs, log),
    )


def cam_sweep(examples: list[Example], cams: list[np.ndarray], n_all: int) -> dict:
    """The CAM masks' confusion matrix at each of `CONSTANT_BACKGROUNDS`, over the examples
    with ground truth."""
    sweep = {thr: ConfusionMatrix(n_all) for thr in CONSTANT_BACKGROUNDS}
    for e, cams_fg in zip(examples, cams, strict=True):
        if e.mask is not None:
            for thr, matrix in sweep.items():
                matrix.update(labeling.cam_mask(cams_fg, CONSTANT_BACKGROUNDS[thr]), e.mask)
    return sweep


def score_stages(
    labeler: labeling.Labeler,
    seeded: list[labeling.Partial],
    examples: list[Example],
    n_all: int,
) -> tuple[dict[str, ConfusionMatrix], dict[str, ClassAreas]]:
    """Finish labeling the seeded examples; each stage's confusion matrix (over the examples
    with ground truth) and class areas. The last stage's mask is the final pseudo-label."""
    final = labeler.stages[-1]
    matrices = {name: ConfusionMatrix(n_all) for name in labeler.stages}
    areas = {name: ClassAreas(n_all) for name in labeler.stages}
    for e, part in zip(examples, seeded, strict=True):
        out = labeler.finish(e.image, part)
        for name in labeler.stages:
            mask = out.mask if name == final else out.masks[name]
            areas[name].update(mask, e.labels)
            if e.mask is not None:
                matrices[name].update(mask, e.mask)
    return matrices, areas


def run(
    cfg: RunConfig, log: Callable[[str], None] = print, compare: Sequence[Sequence[str]] = ()
) -> dict:
    """Run every stage; returns the summary (also written under the run folder). `compare`:
    other refiner chains (e.g. ("deep_clustering", "crf")) scored as well on the same classifier
    and CAMs, under the summary's "compared", so that refiners are measured side by side."""
    cfg.require_method("run-local")
    variants = [cfg.with_refiners(chain) for chain in compare]  # bad names fail before work
    device = torch.device(cfg.device) if cfg.device else default_device()
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(stage: str, since: float) -> float:
        now = time.perf_counter()
        timings[stage] = round(now - since, 2)
        return now

    # The configuration first: an output that cannot be written fails before the training.
    out_dir = cfg.layout.local
    storage.write_bytes(storage.join(out_dir, "config.yaml"), cfg.to_yaml().encode(), cfg.storage)
    manifest = load_manifest(cfg)
    examples = load_examples(cfg, manifest)
    evaluated = sum(e.mask is not None for e in examples)
    n_classes, n_all = manifest.num_foreground, manifest.num_foreground + 1
    log(f"{len(examples)} images, {n_classes} foreground classes, device {device}")
    t = lap("load", started)

    kept: dict = {}
    classifier = fit_classifier(cfg, examples, n_classes, device, log, kept)
    targets = np.stack([manifest.label_targets(row) for row in manifest.rows])
    train_map = mean_average_precision(
        image_scores(classifier, [e.image for e in examples]), targets
    )
    t = lap("train_classifier", t)
    kept_by_row = by_row(kept)
    cams = [
        image_cams(classifier, e.image, e.labels, cfg.cam, kept_by_row.get(i))
        for i, e in enumerate(examples)
    ]
    sweep = cam_sweep(examples, cams, n_all)
    t = lap("cam", t)
    networks = {"classifier": classifier}
    if any("affinity" in c.networks for c in (cfg, *variants)):  # the walk needs AffinityNet
        label_maps = cam_affinity_labels(cfg, examples, cams)
        networks["affinity"] = fit_affinity_net(cfg, examples, label_maps, classifier, device, log)
        t = lap("train_affinity", t)

    labeler = cfg.labeler(networks)
    seeded = [labeler.seed(e.image, e.labels, c) for e, c in zip(examples, cams, strict=True)]
    t = lap("seed", t)  # the CAM masks and the refiners beside the networks (the walk)
    stages, areas = score_stages(labeler, seeded, examples, n_all)
    t = lap("finish", t)  # the other refiners (the CRF) and the final masks
    compared = {}
    for variant in variants:
        other = variant.labeler(networks)
        matrices, _ = score_stages(
            other,
            [other.seed(e.image, e.labels, c) for e, c in zip(examples, cams, strict=True)],
            examples,
            n_all,
        )
        now = time.perf_counter()
        compared[chain_name(variant.refiners)] = {
            "stages": {name: stage_result(m, evaluated) for name, m in matrices.items()},
            "seconds": round(now - t, 2),
        }
        t = now

    best_threshold = max(sweep, key=lambda thr: np.nan_to_num(sweep[thr].miou(), nan=-1.0))
    summary = {
        "images": len(examples),
        "evaluated": evaluated,
        "classes": manifest.classes,
        "classifier_train_map": round(float(train_map), 4),
        "stages": {name: stage_result(m, evaluated) for name, m in stages.items()},
        "class_report": class_report(
            manifest.classes,
            presence_rates((e.labels for e in examples), n_all),
            areas,
            cfg.evaluate.class_report,
            final=labeler.stages[-1],
        ),
        "cam_threshold_sweep": {str(thr): round_metric(m.miou()) for thr, m in sweep.items()},
        "cam_best_threshold": best_threshold,
        "cam_best_miou": round_metric(sweep[best_threshold].miou()),
        "seconds": {**timings, "total": round(time.perf_counter() - started, 2)},
        "config_hash": cfg.hash(),
    }
    if compared:
        summary["compared"] = compared
    storage.write_bytes(
        storage.join(out_dir, "summary.json"), json.dumps(summary, indent=2).encode(), cfg.storage
    )
    summary["output"] = out_dir
    return summary


def chain_name(refiners: Sequence[str]) -> str:
    """How a chain of refiners is named in a summary: "cam+random_walk+crf"."""
    return "+".join((labeling.CAM_STAGE, *refiners))


def main(cfg: RunConfig, compare: Sequence[Sequence[str]] = ()) -> dict:
    summary = run(cfg, compare=compare)
    print()
    print(format_table(summary["classes"], summary["stages"]))
    for chain, result in summary.get("compared", {}).items():
        print(f"\ncompared: {chain} ({result['seconds']} s)")
        print(format_table(summary["classes"], result["stages"]))
    print()
    best = summary["cam_best_miou"]
    print(
        f"CAM mIoU with the best background threshold "
        f"({summary['cam_best_threshold']}): {'-' if best is None else f'{100 * best:.1f}'}"
    )
    print(f"classifier mAP on the training images: {100 * summary['classifier_train_map']:.1f}")
    print()
    print(CLASS_REPORT_TITLE)
    print(format_class_report(summary["class_report"]))
    print(f"time per stage (s): {summary['seconds']}")
    print(f"summary and resolved config written to {summary['output']}")
    return summary
