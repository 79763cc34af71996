"""Pseudo-label quality of the whole method on a dataset: mIoU per stage and class (CAM at the
configured background and at the best constant of a sweep over 0.05-0.95, random walk, CRF =
final), the classifier's mAP and the time per stage, from `wsss run-local` (in process, no Ray).

    # the synthetic default (wsss synth --config configs/demo.yaml first)
    uv run python bench/quality.py --config configs/demo.yaml \
        --set dataset.manifest=data/synthetic/manifest.jsonl \
        --out bench/results/quality-synthetic.json
    # real photos: ../shared/datasets/ccp (masked rows are evaluated, all rows train)
    uv run python bench/quality.py --config configs/demo.yaml \
        --set dataset.manifest=../shared/datasets/ccp/manifest.jsonl \
        --out bench/results/quality-ccp.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import machine_info, write_results

from pipelines import local_run
from pipelines.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="run configuration (YAML); default: the defaults")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    summary = local_run.main(cfg)
    results = {
        "command": f"python bench/quality.py --config {args.config} "
        + " ".join(f"--set {s}" for s in args.set),
        "machine": machine_info(torch=torch.__version__, threads=torch.get_num_threads()),
        **summary,
    }
    write_results(args.out, results)


if __name__ == "__main__":
    main()
