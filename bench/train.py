"""Classifier training throughput: the plain in-process loop against Ray Train with 1 and 2 workers.

All three train the same ResNet-18 classifier on the same synthetic images with the same global
batch, crop and optimizer. The in-process loop (`wsss.classifier.train_classifier`, what
`wsss run-local` runs) trains on images decoded beforehand and augments inline; the Ray runs
(`pipelines.train_classifier.run`) fetch, decode and augment in Ray Data tasks and train in
Ray Train workers (DDP over gloo with 2), the cores shared out among the workers. Throughput is
samples/s of an epoch (its samples over its wall time, waiting for data included); the first
epoch (start-up) is left out and the median of the rest taken, with the run's wall time beside
it. The three kinds run in rounds, in a rotated order each round, so drift from other load on a
shared machine hits them alike; the table gives medians over the rounds.

    .venv/bin/python bench/train.py --out bench/results/train.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
from common import machine_info, write_results

from pipelines.config import RunConfig, load_config
from pipelines.inputs import load_manifest
from pipelines.local_run import load_examples
from pipelines.train import classifier as train_classifier
from wsss import classifier, synthetic
from wsss.networks import initial_network
from wsss.synthetic import SyntheticParams


def config(
    args: argparse.Namespace, manifest: Path, output: Path, name: str, workers: int
) -> RunConfig:
    optim = {"algorithm": "adamw", "lr": 1e-3, "head_lr_mult": 1}
    overrides = [
        f"dataset.manifest={manifest}",
        f"output={output}",
        f"name={name}",
        "classifier.model.backbone.name=resnet18",
        f"classifier.augment.crop_size={args.crop}",
        f"classifier.augment.resize_long=[{args.crop}, {args.side}]",
        f"classifier.optim.epochs={args.epochs}",
        f"classifier.optim.batch_size={args.batch_size}",
        f"ray.train_workers={workers}",
        # The machine's cores are shared out among the workers (the in-process loop gets all).
        f"ray.cpus_per_worker={args.threads // workers}",
        *(f"classifier.optim.{k}={v}" for k, v in optim.items()),
    ]
    return load_config(overrides=overrides)


def steady(per_epoch: list[float]) -> float:
    """Median samples/s over the epochs after the first."""
    return statistics.median(per_epoch[1:])


def in_process(cfg: RunConfig, threads: int) -> dict:
    torch.set_num_threads(threads)
    manifest = load_manifest(cfg)
    samples = [(e.image, e.labels) for e in load_examples(cfg, manifest)]
    per_epoch = []
    started = time.perf_counter()
    classifier.train_classifier(
        initial_network("classifier", cfg.classifier.model, manifest.num_foreground, seed=cfg.seed),
        samples,
        cfg.classifier.augment,
        cfg.classifier.optim,
        cfg.seed,
        "cpu",
        on_epoch_end=lambda epoch, metrics: per_epoch.append(metrics["samples_per_s"]),
    )
    wall = time.perf_counter() - started
    return {"samples_per_s": steady(per_epoch), "per_epoch": per_epoch, "wall_s": wall}


def on_ray(cfg: RunConfig) -> dict:
    started = time.perf_counter()
    record = train_classifier.run(cfg, log=lambda _: None)
    wall = time.perf_counter() - started
    run = Path(record.checkpoint_uri).parent
    metas = [json.loads((d / "meta.json").read_text()) for d in sorted(run.glob("epoch_*"))]
    per_epoch = [m["metrics"]["samples_per_s"] for m in metas]
    return {"samples_per_s": steady(per_epoch), "per_epoch": per_epoch, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="synthetic images")
    parser.add_argument("--side", type=int, default=128, help="largest image side (px)")
    parser.add_argument("--crop", type=int, default=96, help="training crop (px)")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="cores to train on")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()

    kinds = ["in_process", "ray_train_1_worker", "ray_train_2_workers"]
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        params = SyntheticParams(min_side=args.side * 3 // 4, max_side=args.side)
        manifest = synthetic.generate(Path(tmp) / "data", args.n, seed=0, params=params)
        output = Path(tmp) / "runs"
        # Two logical CPUs per core leave room for Ray Data's tasks beside the workers.
        ray.init(num_cpus=2 * args.threads, include_dashboard=False, logging_level="WARNING")
        for round_ in range(args.rounds):
            for kind in kinds[round_ % 3 :] + kinds[: round_ % 3]:
                name = f"{kind}-{round_}"
                if kind == "in_process":
                    result = in_process(config(args, manifest, output, name, 1), args.threads)
                else:
                    workers = 1 if kind == "ray_train_1_worker" else 2
                    result = on_ray(config(args, manifest, output, name, workers))
                runs[kind].append(result)
                print(f"{name}: {result}", flush=True)
        ray.shutdown()

    summary = {
        kind: {
            "samples_per_s": statistics.median(r["samples_per_s"] for r in results),
            "wall_s": statistics.median(r["wall_s"] for r in results),
        }
        for kind, results in runs.items()
    }
    for result in summary.values():
        result["vs_in_process"] = result["samples_per_s"] / summary["in_process"]["samples_per_s"]
    report = {
        "setup": {**vars(args), "out": str(args.out) if args.out else None},
        "machine": machine_info(torch=torch.__version__, ray=ray.__version__),
        "summary": summary,
        "runs": runs,
    }
    print(json.dumps(report, indent=2))
    print(
        f"\n| run | samples/s (median of {args.rounds} runs) | vs in-process | wall (s) |"
        "\n|---|---|---|---|"
    )
    for kind, result in summary.items():
        print(
            f"| {kind} | {result['samples_per_s']:.1f} | {result['vs_in_process']:.2f} | "
            f"{result['wall_s']:.1f} |"
        )
    write_results(args.out, report)


if __name__ == "__main__":
    main()
