"""Refinement settings side by side on a finished run's networks (its model records): the CAMs and
the walk's affinities of the manifest's first `calibrate.images` masked images are computed once,
as `wsss calibrate` does, then the configuration and each variant of it are scored on them (each
refiner's and the final mIoU). No training: a variant may change anything after the networks.

    uv run python bench/variants.py --config configs/demo.yaml \\
        --set dataset.manifest=../shared/datasets/ccp/manifest.jsonl \\
        --set output=runs --set name=ccp-iterate --set calibrate.images=604 \\
        --variant crf.keep_classes=false --out bench/results/variants-ccp.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import machine_info, write_results

from pipelines import calibrate
from pipelines.config import load_config
from pipelines.model_record import load_network, record_uris
from wsss.calibration import refinement_miou


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="run configuration (YAML); default: the defaults")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="FIELD=VALUE[;FIELD=VALUE]",
        help="settings scored beside the configuration's (repeatable)",
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    variants = {v: load_config(args.config, [*args.set, *v.split(";")]) for v in args.variant}
    networks = {name: load_network(uri, cfg, name) for name, uri in record_uris(cfg).items()}
    started = time.perf_counter()
    images, n_classes = calibrate.calibration_images(cfg, networks)
    print(
        f"{len(images)} masked images, CAMs and affinities in {time.perf_counter() - started:.0f} s"
    )
    scores = {}
    for name, settings in {"configured": cfg, **variants}.items():
        scores[name] = refinement_miou(images, n_classes, settings.labeler(networks))
        stages = ", ".join(f"{stage} {100 * value:.1f}" for stage, value in scores[name].items())
        print(f"{name}: {stages}", flush=True)
    write_results(
        args.out,
        {
            "command": f"python bench/variants.py --config {args.config} "
            + " ".join(f"--set {s}" for s in args.set)
            + "".join(f" --variant '{v}'" for v in args.variant),
            "machine": machine_info(torch=torch.__version__, threads=torch.get_num_threads()),
            "images": len(images),
            "scores": scores,
        },
    )


if __name__ == "__main__":
    main()
