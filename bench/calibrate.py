"""What `wsss calibrate` adds over the label-free defaults, on masked images it did not see.

Runs the calibration of a finished run (its model records; `wsss run` first, or networks stored
with `pipelines.model_record.save_model`) on the manifest's first `calibrate.images` masked
images, then scores the configured and the calibrated settings (CAM, walk, final) on the next
`--held-out` masked images. Ray Tune starts Ray: as in the Makefile, Ray must not rebuild the
environment for its workers under `uv run`, hence RAY_ENABLE_UV_RUN_RUNTIME_ENV=0.

    RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 uv run python bench/calibrate.py --config configs/demo.yaml \\
        --set dataset.manifest=../shared/datasets/ccp/manifest.jsonl \\
        --set output=runs/quality --set name=ccp --held-out 200 \\
        --out bench/results/calibrate-ccp.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_info, write_results

from pipelines import calibrate
from pipelines.config import load_config
from pipelines.model_record import load_network, record_uris
from wsss import labeling
from wsss.calibration import refinement_miou
from wsss.metrics import ConfusionMatrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="run configuration (YAML); default: the defaults")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--held-out", type=int, default=200, help="masked images scored after")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    networks = {name: load_network(uri, cfg, name) for name, uri in record_uris(cfg).items()}
    started = time.perf_counter()
    report = calibrate.calibrate(cfg, networks)
    seconds = time.perf_counter() - started
    calibrated = load_config(report["config"])

    # The held-out images: the masked rows after the ones calibration used.
    held_out_cfg = cfg.model_copy(
        update={
            "calibrate": cfg.calibrate.model_copy(
                update={"images": cfg.calibrate.images + args.held_out}
            )
        }
    )
    images, n_classes = calibrate.calibration_images(held_out_cfg, networks)
    images = images[cfg.calibrate.images :]
    scores = {}
    for name, settings in (("configured", cfg), ("calibrated", calibrated)):
        cam = ConfusionMatrix(n_classes)
        for item in images:
            cam.update(labeling.cam_mask(item.cams_fg, settings.cam.background), item.mask)
        refined = refinement_miou(images, n_classes, settings.labeler(networks))
        scores[name] = {"cam": float(np.nan_to_num(cam.miou())), **refined}
        print(
            f"{name}: CAM {100 * scores[name]['cam']:.1f}, random walk "
            f"{100 * refined['random_walk']:.1f}, final {100 * refined['final']:.1f} "
            f"({len(images)} held-out images)"
        )
    write_results(
        args.out,
        {
            "command": f"python bench/calibrate.py --config {args.config} "
            + " ".join(f"--set {s}" for s in args.set)
            + f" --held-out {args.held_out}",
            "machine": machine_info(torch=torch.__version__, threads=torch.get_num_threads()),
            "calibration_seconds": round(seconds, 1),
            "calibration": report,
            "held_out_images": len(images),
            "held_out": scores,
        },
    )


if __name__ == "__main__":
    main()
