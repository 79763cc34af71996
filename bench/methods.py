"""The CAM methods side by side (issue 16): each trained on the same data with the same budget and
labelled through the same refiners, in process (`wsss run-local`'s stages), one after the other in
one run: CAM-stage mIoU (Otsu background per image, and the best constant, which needs masks to
pick), each refiner's and the final mIoU, the final background IoU, the classifier's training time
per epoch and the CAM stage's time per image (its scales and flips).

    # the synthetic default (wsss synth --config configs/demo.yaml first)
    uv run python bench/methods.py --config configs/demo.yaml \
        --set dataset.manifest=data/synthetic/manifest.jsonl --set output=runs/methods \
        --out bench/results/methods-synthetic.json
    # real photos: ../shared/datasets/ccp, its 604 masked photos (~16 minutes per method)
    uv run python bench/methods.py --config configs/demo.yaml --masked-only \
        --set dataset.manifest=../shared/datasets/ccp/manifest.jsonl --set output=runs/methods \
        --out bench/results/methods-ccp.json

`--methods cam,hfpl` runs some of them; `--seeds 0,1,2` runs each with several seeds (the
networks' initial heads, the data order and the augmentation) and reports the medians, since one
seed's difference between two methods can be smaller than the spread between seeds. Every other
setting is the configuration's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from common import machine_info, write_results
from quality import masked_subset

from pipelines import local_run
from pipelines.config import load_config

# Each method as the settings that select it; the pooling is each method's own (FCN-MIL is the
# plain CAM with global max pooling; WILDCAT pools with its top-k).
METHODS: dict[str, list[str]] = {
    "cam": ["classifier.model.method=cam", "classifier.model.pooling=gap"],
    "fcn-mil": ["classifier.model.method=cam", "classifier.model.pooling=gmp"],
    "wildcat": ["classifier.model.method=wildcat", "classifier.model.pooling=top_k"],
    "hfpl": ["classifier.model.method=hfpl", "classifier.model.pooling=gap"],
    "seam": ["classifier.model.method=seam", "classifier.model.pooling=gap"],
    "saliency": ["classifier.model.method=saliency", "classifier.model.pooling=gap"],
    "oaa": ["classifier.model.method=oaa", "classifier.model.pooling=gap"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="run configuration (YAML); default: the defaults")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--masked-only", action="store_true", help="train and evaluate on the masked rows only"
    )
    args = parser.parse_args()
    names = args.methods.split(",")
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    results: dict = {
        "command": f"python bench/methods.py --config {args.config} --methods {args.methods} "
        f"--seeds {args.seeds} "
        + ("--masked-only " if args.masked_only else "")
        + " ".join(f"--set {s}" for s in args.set),
        "machine": machine_info(torch=torch.__version__, threads=torch.get_num_threads()),
        "methods": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        extra = []
        if args.masked_only:
            manifest = load_config(args.config, args.set).dataset.manifest
            extra = [f"dataset.manifest={masked_subset(manifest, Path(scratch))}"]
        for name in names:
            runs = []
            for seed in args.seeds.split(","):
                settings = [*args.set, *extra, *METHODS[name], f"name={name}", f"seed={seed}"]
                cfg = load_config(args.config, settings)
                print(f"== {name}, seed {seed}", flush=True)
                summary = local_run.run(cfg, log=lambda line: print(line, flush=True))
                runs.append(row(summary, cfg.classifier.optim.epochs))
            results["methods"][name] = median_row(runs)
            print(table(results["methods"]), flush=True)
            write_results(args.out, results)


def row(summary: dict, epochs: int) -> dict:
    """One method's line of the table from its `local_run.run` summary."""
    stages = summary["stages"]
    final = list(stages)[-1]
    seconds = summary["seconds"]
    return {
        "stages": {name: stage["miou"] for name, stage in stages.items()},
        "cam_best": summary["cam_best_miou"],
        "cam_best_threshold": summary["cam_best_threshold"],
        "final_background_iou": stages[final]["iou"][0],
        "classifier_s_per_epoch": round(seconds["train_classifier"] / epochs, 1),
        "cam_ms_per_image": round(1000 * seconds["cam"] / summary["images"], 1),
        "seconds": seconds,
    }


def median_row(runs: list[dict]) -> dict:
    """The median over seeds of each number of `row`, with every seed's row kept."""

    def median(values: list) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    stages = runs[0]["stages"]
    return {
        "stages": {s: median([r["stages"][s] for r in runs]) for s in stages},
        "cam_best": median([r["cam_best"] for r in runs]),
        "cam_best_threshold": median([r["cam_best_threshold"] for r in runs]),
        "final_background_iou": median([r["final_background_iou"] for r in runs]),
        "classifier_s_per_epoch": median([r["classifier_s_per_epoch"] for r in runs]),
        "cam_ms_per_image": median([r["cam_ms_per_image"] for r in runs]),
        "seeds": runs,
    }


def table(rows: dict[str, dict]) -> str:
    """The methods as a Markdown table, mIoU in points (medians over the seeds)."""

    def points(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    stages = list(next(iter(rows.values()))["stages"])
    head = [
        "method",
        "CAM (Otsu)",
        "CAM, best constant",
        *stages[1:],
        "final background",
        "classifier s/epoch",
        "CAM ms/image",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [
            name,
            points(r["stages"][stages[0]]),
            f"{points(r['cam_best'])} ({r['cam_best_threshold']})",
            *(points(r["stages"][s]) for s in stages[1:]),
            points(r["final_background_iou"]),
            str(r["classifier_s_per_epoch"]),
            str(r["cam_ms_per_image"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
