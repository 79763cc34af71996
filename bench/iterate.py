"""Does iterative affinity learning (Wang et al., IJCV 2020) improve the pseudo-labels? Round 0 is
the method as `wsss run-local` runs it (classifier, CAMs, AffinityNet, walk, CRF). Each further
round trains the segmentation network (the unary, `wsss.segmentation`) on the last round's
final masks, takes its confident pixels (probability >= --confident) as the affinity labels of
a new AffinityNet (its backbone from the classifier's), and refines the unary's probabilities
with the configured refiners on the new affinities (`RunConfig.labeler` with label.model
refined_segmentation): the round's pseudo-labels. mIoU of every stage of every round on the
same images, in process, seeded.

`wsss run` with `iterate.rounds` runs the same rounds as Ray jobs (`pipelines.iterate`); this
bench measures the method alone, in one process: whether rounds help, on which data, and what a
round costs.

    uv run python bench/iterate.py --config configs/demo.yaml --rounds 2 \
        --set dataset.manifest=data/synthetic/manifest.jsonl \
        --out bench/results/iterate-synthetic.json
    uv run python bench/iterate.py --config configs/demo.yaml --rounds 1 --masked-only \
        --set dataset.manifest=../shared/datasets/ccp/manifest.jsonl \
        --out bench/results/iterate-ccp.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_info, write_results
from quality import masked_subset

from pipelines.config import load_config
from pipelines.evaluate import format_table, stage_result
from pipelines.inputs import load_manifest, resolve_weights
from pipelines.local_run import (
    Example,
    cam_affinity_labels,
    fit_affinity_net,
    fit_classifier,
    load_examples,
)
from wsss.cam import compute_cams
from wsss.labeling import Labeler
from wsss.metrics import ConfusionMatrix
from wsss.networks import initial_network
from wsss.segmentation import (
    SegmentationNet,
    confident_label_map,
    segment,
    segmentation_example,
    segmentation_step_loss,
)
from wsss.training import default_device, train_in_process


def score(
    labeler: Labeler, examples: list[Example], n_all: int, keep: str | None
) -> tuple[dict, list[np.ndarray]]:
    """Every stage's result over the examples, and the masks of stage `keep` (None: the final
    masks, which are the last stage's unless `pseudo_label` sets a confidence threshold)."""
    matrices = {stage: ConfusionMatrix(n_all) for stage in labeler.stages}
    finals = []
    for e in examples:
        out = labeler.label(e.image, e.labels)
        finals.append(out.mask if keep is None else out.masks[keep])
        for stage, matrix in matrices.items():
            matrix.update(out.masks[stage], e.mask)
    return {stage: stage_result(m, len(examples)) for stage, m in matrices.items()}, finals


def train_unary(cfg, examples, masks, n_classes, device) -> SegmentationNet:
    start = initial_network(
        "segmentation", resolve_weights(cfg.segmentation.model, cfg), n_classes, seed=cfg.seed
    )

    def make_example(sample, rng):
        return segmentation_example(*sample, rng, cfg.segmentation.augment)

    samples = [(e.image, m) for e, m in zip(examples, masks, strict=True)]
    return train_in_process(
        start,
        samples,
        make_example,
        segmentation_step_loss,
        cfg.segmentation.optim,
        cfg.seed,
        device,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="run configuration (YAML); default: the defaults")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--rounds", type=int, default=2, help="rounds after round 0")
    parser.add_argument(
        "--confident", type=float, default=0.9, help="the unary's probability for affinity labels"
    )
    parser.add_argument("--masked-only", action="store_true", help="the masked rows only")
    parser.add_argument(
        "--train-on",
        metavar="STAGE",
        help="the stage whose masks train the next round's network (default: the final masks)",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    device = default_device()
    with tempfile.TemporaryDirectory() as scratch:
        if args.masked_only:
            subset = masked_subset(cfg.dataset.manifest, Path(scratch))
            cfg = cfg.model_copy(
                update={"dataset": cfg.dataset.model_copy(update={"manifest": str(subset)})}
            )
        manifest = load_manifest(cfg)
        examples = [e for e in load_examples(cfg, manifest) if e.mask is not None]
    n_classes = manifest.num_foreground
    log = print
    rounds, seconds = [], []
    started = time.perf_counter()
    classifier = fit_classifier(cfg, examples, n_classes, device, log)
    cams = [compute_cams(classifier, e.image, e.labels, cfg.cam) for e in examples]
    label_maps = cam_affinity_labels(cfg, examples, cams)
    affinity = fit_affinity_net(cfg, examples, label_maps, classifier, device, log)
    labeler = cfg.labeler({"classifier": classifier, "affinity": affinity})
    stages, masks = score(labeler, examples, n_classes + 1, args.train_on)
    rounds.append(stages)
    seconds.append(round(time.perf_counter() - started, 1))
    print(f"\nround 0 ({seconds[-1]} s)\n" + format_table(manifest.classes, stages))
    # A round labels as `wsss run`'s rounds do: the network's probabilities, then the refiners.
    refined = cfg.model_copy(
        update={"label": cfg.label.model_copy(update={"model": "refined_segmentation"})}
    )
    for r in range(1, args.rounds + 1):
        started = time.perf_counter()
        unary = train_unary(cfg, examples, masks, n_classes, device)
        label_maps = [
            confident_label_map(
                segment(unary, e.image, e.labels, cfg.segmentation.inference),
                e.image.shape[:2],
                args.confident,
            )
            for e in examples
        ]
        affinity = fit_affinity_net(cfg, examples, label_maps, classifier, device, log)
        networks = {"classifier": classifier, "segmentation": unary, "affinity": affinity}
        labeler = refined.labeler(networks)
        stages, masks = score(labeler, examples, n_classes + 1, args.train_on)
        ignored = float(np.mean([(m == 255).mean() for m in label_maps]))
        stages["affinity labels: ignored share"] = round(ignored, 3)
        rounds.append(stages)
        seconds.append(round(time.perf_counter() - started, 1))
        table = {k: v for k, v in stages.items() if isinstance(v, dict)}
        print(f"\nround {r} ({seconds[-1]} s; {100 * ignored:.0f}% of the affinity labels ignored)")
        print(format_table(manifest.classes, table))
    write_results(
        args.out,
        {
            "command": f"python bench/iterate.py --config {args.config} --rounds {args.rounds} "
            f"--confident {args.confident} "
            + ("--masked-only " if args.masked_only else "")
            + (f"--train-on {args.train_on} " if args.train_on else "")
            + " ".join(f"--set {s}" for s in args.set),
            "machine": machine_info(torch=torch.__version__, threads=torch.get_num_threads()),
            "images": len(examples),
            "rounds": rounds,
            "seconds": seconds,
        },
    )


if __name__ == "__main__":
    main()
