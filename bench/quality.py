"""Pseudo-label quality of the whole method on a dataset: mIoU per stage and class (CAM at the
configured background and at the best constant of a sweep over 0.05-0.95, random walk, CRF =
final), the classifier's mAP and the time per stage, from `wsss run-local` (in process, no Ray).

    # the synthetic default (wsss synth --config configs/demo.yaml first)
    uv run python bench/quality.py --config configs/demo.yaml \
        --set dataset.manifest=data/synthetic/manifest.jsonl \
        --out bench/results/quality-synthetic.json
    # real photos: ../shared/datasets/ccp, its 604 masked photos (--masked-only; without it
    # all 1,698 rows train and the masked ones are evaluated, ~3x the time)
    uv run python bench/quality.py --config configs/demo.yaml --masked-only \
        --set dataset.manifest=../shared/datasets/ccp/manifest.jsonl \
        --out bench/results/quality-ccp.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
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
    parser.add_argument(
        "--masked-only", action="store_true", help="train and evaluate on the masked rows only"
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="REFINERS",
        help="also score this chain of refiners (e.g. deep_clustering,crf) on the same CAMs",
    )
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    with tempfile.TemporaryDirectory() as scratch:
        if args.masked_only:
            subset = masked_subset(cfg.dataset.manifest, Path(scratch))
            cfg = cfg.model_copy(
                update={"dataset": cfg.dataset.model_copy(update={"manifest": str(subset)})}
            )
        summary = local_run.main(cfg, compare=[chain.split(",") for chain in args.compare])
    results = {
        "command": f"python bench/quality.py --config {args.config} "
        + ("--masked-only " if args.masked_only else "")
        + "".join(f"--compare {chain} " for chain in args.compare)
        + " ".join(f"--set {s}" for s in args.set),
        "machine": machine_info(torch=torch.__version__, threads=torch.get_num_threads()),
        **summary,
    }
    write_results(args.out, results)


def masked_subset(manifest: str, folder: Path) -> Path:
    """A copy of a local JSONL manifest (and its classes.txt) holding only the rows that have a
    ground-truth mask, with absolute paths; returns its path."""
    source = Path(manifest).absolute()
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    with open(folder / "manifest.jsonl", "w") as out:
        for row in rows:
            if row.get("mask"):
                for key in ("image", "mask"):
                    row[key] = str(source.parent / row[key])
                out.write(json.dumps(row) + "\n")
    shutil.copy(source.parent / "classes.txt", folder / "classes.txt")
    return folder / "manifest.jsonl"


if __name__ == "__main__":
    main()
