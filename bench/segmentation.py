"""What the pseudo-labels are worth to a segmentation network, and the gap to full supervision:
the method's stages, a segmentation network trained on its pseudo-labels and the same network
trained on ground-truth masks, all scored on the same held-out masked images, with the labeling
cost of the method and of the network (`wsss label` against `wsss label --model segmentation`):
the labeling jobs' seconds, and the median seconds per image of each labeling in process.

The masked rows are split (seeded): a held-out part (`--holdout`) whose masks nothing trains on,
and the rest. `wsss run` trains the classifier and AffinityNet on the rest and labels it; the
segmentation network trains on those pseudo-labels (`wsss train-segmentation`) and, for the
upper bound, on the rest's ground-truth masks (`--ground-truth`), with the same settings and
budget. Everything is then labelled on the held-out images and evaluated there. Local Ray,
local files; the work folder is kept (`--work`).

    # the synthetic default (wsss synth --config configs/demo.yaml first)
    uv run python bench/segmentation.py --config configs/demo.yaml \
        --set dataset.manifest=data/synthetic/manifest.jsonl --work runs/bench-seg/synthetic \
        --out bench/results/segmentation-synthetic.json
    # real photos: ../shared/datasets/ccp, its masked photos only
    uv run python bench/segmentation.py --config configs/demo.yaml --masked-only \
        --set dataset.manifest=../shared/datasets/ccp/manifest.jsonl --work runs/bench-seg/ccp \
        --out bench/results/segmentation-ccp.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_info, write_results

from pipelines import console, evaluate
from pipelines import run as run_all
from pipelines.config import RunConfig, load_config
from pipelines.inputs import load_manifest
from pipelines.label import job as label
from pipelines.model_record import load_network
from pipelines.train import segmentation as train_segmentation
from wsss.imageio import read_image


def split_manifest(manifest: str, folder: Path, holdout: float, seed: int, masked_only: bool):
    """Write folder/train/manifest.jsonl (the rows not held out; with `masked_only` only masked
    ones) and folder/heldout/manifest.jsonl (a seeded `holdout` share of the masked rows),
    classes.txt beside each, paths absolute; returns both manifests' paths."""
    source = Path(manifest).absolute()
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    for row in rows:
        for key in ("image", "mask"):
            if row.get(key):
                row[key] = str(source.parent / row[key])
    masked = [i for i, row in enumerate(rows) if row.get("mask")]
    held = set(
        np.random.default_rng(seed).permutation(masked)[: round(holdout * len(masked))].tolist()
    )
    parts = {
        "train": [
            r for i, r in enumerate(rows) if i not in held and (r.get("mask") or not masked_only)
        ],
        "heldout": [r for i, r in enumerate(rows) if i in held],
    }
    paths = {}
    for name, part in parts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        paths[name] = folder / name / "manifest.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in part))
        shutil.copy(source.parent / "classes.txt", folder / name / "classes.txt")
    return paths["train"], paths["heldout"], len(parts["train"]), len(parts["heldout"])


def on_manifest(cfg: RunConfig, manifest: Path) -> RunConfig:
    """`cfg` reading `manifest` (the held-out images') instead of its own."""
    return cfg.model_copy(
        update={"dataset": cfg.dataset.model_copy(update={"manifest": str(manifest)})}
    )


def label_and_score(cfg: RunConfig, heldout: Path, out: Path, say) -> tuple[dict, float]:
    """Label the held-out images into `out` and evaluate them: (stages' results, seconds)."""
    started = time.perf_counter()
    summary = label.run(cfg, input_uri=str(heldout), out_uri=str(out), log=say)
    seconds = time.perf_counter() - started
    scoring = on_manifest(cfg, heldout)
    result = evaluate.evaluate(str(out), scoring)
    return {"stages": result["stages"], "classes": result["classes"], "summary": summary}, seconds


def seconds_per_image(cfg: RunConfig, heldout: Path) -> float:
    """Median seconds one held-out image takes through `cfg`'s labeling in this process (the
    networks from the run's model records; no Ray, no storage): the compute of the method or
    of the segmentation network alone, without a job's start-up."""
    networks = {name: load_network(cfg.layout.record(name), cfg, name) for name in cfg.networks}
    labeler = cfg.labeler(networks)
    scoring = on_manifest(cfg, heldout)
    manifest = load_manifest(scoring)
    seconds = []
    for row in manifest.rows:
        image = read_image(row.image)
        started = time.perf_counter()
        labeler.label(image, manifest.label_indices(row))
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))


SEGMENTATION_RUNS = {
    "pseudo-labels": ("segmentation-pseudo-labels", "heldout-seg-pseudo"),
    "ground truth": ("segmentation-ground-truth", "heldout-seg-ground"),
}


def run_configs(args: argparse.Namespace, train_manifest: Path) -> dict[str, RunConfig]:
    """The method's run, and per segmentation run its trainer's and its labeler's."""
    common = [
        *args.set,
        f"dataset.manifest={train_manifest}",
        f"output={args.work / 'runs'}",
        "evaluate.out=null",
        "evaluate.gallery_images=0",
        "log_dir=null",
        "label.keep_stages=true",
    ]
    method = load_config(args.config, [*common, "name=method"])
    configs = {"method": method}
    for source, (name, _) in SEGMENTATION_RUNS.items():
        if source == "ground truth":
            extra = ["segmentation.train_on=ground_truth"]
        else:
            extra = [f"segmentation.labels={method.layout.labels}"]
        configs[f"train on {source}"] = load_config(args.config, [*common, f"name={name}", *extra])
        configs[f"label with {source}"] = load_config(
            args.config, [*common, f"name={name}", *extra, "label.model=segmentation"]
        )
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="run configuration (YAML); default: the defaults")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--work", type=Path, required=True, help="work folder (kept)")
    parser.add_argument("--holdout", type=float, default=0.25, help="held-out masked share")
    parser.add_argument("--masked-only", action="store_true", help="train on masked rows only")
    parser.add_argument(
        "--timing-only",
        action="store_true",
        help="only the per-image timing, with the networks an earlier run left in --work; "
        "added to the --out file",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    base = load_config(args.config, args.set)
    train_manifest, heldout, n_train, n_held = split_manifest(
        base.dataset.manifest, args.work / "data", args.holdout, base.seed, args.masked_only
    )
    configs = run_configs(args, train_manifest)
    results = json.loads(args.out.read_text()) if args.timing_only else {}
    if not args.timing_only:
        results = train_label_and_score(args, configs, heldout, n_train, n_held)
    per_image = {
        "method": seconds_per_image(configs["method"], heldout),
        **{
            f"segmentation trained on {source}": seconds_per_image(
                configs[f"label with {source}"], heldout
            )
            for source in SEGMENTATION_RUNS
        },
    }
    for what, seconds in per_image.items():
        print(f"{what}: {1000 * seconds:.0f} ms per image (median, in process)")
    results["seconds_per_image"] = {k: round(v, 4) for k, v in per_image.items()}
    results["machine"] = machine_info(torch=torch.__version__, threads=torch.get_num_threads())
    write_results(args.out, results)


def train_label_and_score(
    args: argparse.Namespace,
    configs: dict[str, RunConfig],
    heldout: Path,
    n_train: int,
    n_held: int,
) -> dict:
    """Train the method and both segmentation networks, label the held-out images with each and
    evaluate them there; the results (mIoU per stage and class, seconds per step)."""
    method_cfg = configs["method"]
    timings: dict[str, float] = {}
    rows: dict[str, dict] = {}
    with console.library_output_to(args.work / "bench.log") as say:
        say(
            f"{n_train} training rows, {n_held} held-out masked images; Ray's output: "
            f"{args.work / 'bench.log'}"
        )
        started = time.perf_counter()
        run_all.run(method_cfg, log=say)
        timings["method: train and label the training rows"] = time.perf_counter() - started
        method, timings["method: label the held-out images"] = label_and_score(
            method_cfg, heldout, args.work / "heldout-method", say
        )
        rows |= {f"pseudo-labels: {stage}": r for stage, r in method["stages"].items()}
        for source, (_, out) in SEGMENTATION_RUNS.items():
            started = time.perf_counter()
            train_segmentation.run(configs[f"train on {source}"], log=say)
            timings[f"segmentation on {source}: train"] = time.perf_counter() - started
            scored, timings[f"segmentation on {source}: label the held-out images"] = (
                label_and_score(configs[f"label with {source}"], heldout, args.work / out, say)
            )
            rows[f"segmentation trained on {source}"] = scored["stages"]["segmentation"]
        say(evaluate.format_table(method["classes"], rows))
        for what, seconds in timings.items():
            say(f"{what}: {seconds:.0f} s")
    return {
        "command": "python bench/segmentation.py "
        + (f"--config {args.config} " if args.config else "")
        + ("--masked-only " if args.masked_only else "")
        + f"--holdout {args.holdout} "
        + " ".join(f"--set {s}" for s in args.set),
        "training_rows": n_train,
        "heldout_images": n_held,
        "classes": method["classes"],
        "rows": rows,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }


if __name__ == "__main__":
    main()
