"""Per-stage cost of labeling one image at a stated size (docs/scale.md, issue 19).

Times the stages of one image as the labeling's model actors run them (`Labeler.seed`, one
image per call, then `Labeler.finish`): JPEG decode, the CAM forward (the configured scales and
flips), AffinityNet's forward, the random walk, the CRF with the final mask, the PNG encoding of
the mask. The networks are randomly initialised: their time does not depend on the weights, and
nothing is downloaded. Medians of --repeats after one warm-up; on CUDA every timing waits for
the device.

    uv run python bench/stages.py --config run.yaml --size 500 375 --device cpu --threads 1
    uv run python bench/stages.py --config run.yaml --size 500 375 --device cuda

where run.yaml is the production configuration of cluster/kuberay/configmap-run.yaml (its
`run.yaml` key; docs/scale.md uses these numbers).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_info, write_results
from PIL import Image

from pipelines.config import load_config
from wsss.affinity import AffinityNet, predict_affinity
from wsss.cam import compute_cams
from wsss.classifier import Classifier
from wsss.imageio import decode_image, encode_mask
from wsss.synthetic import render_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="run configuration (default: the code's defaults)")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    parser.add_argument("--classes", type=int, default=20, help="foreground classes (VOC: 20)")
    parser.add_argument("--labels", type=int, default=2, help="labelled classes per image")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    cfg = load_config(
        args.config,
        [
            "classifier.model.backbone.weights=null",
            "affinity.model.backbone.weights=null",
            *args.overrides,
        ],
    )
    torch.manual_seed(0)
    classifier = Classifier(args.classes, cfg.classifier.model).to(device).eval()
    affinity_net = AffinityNet(cfg.affinity.model).to(device).eval()
    labeler = cfg.labeler({"classifier": classifier, "affinity": affinity_net})

    width, height = args.size
    image = np.asarray(Image.fromarray(render_sample(0, 0).image).resize((width, height)))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    labels = list(range(1, args.labels + 1))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn):
        result = fn()  # warm-up
        sync()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = fn()
            sync()
            times.append(time.perf_counter() - start)
        return result, round(statistics.median(times), 4)

    seconds = {}
    _, seconds["decode"] = timed(lambda: decode_image(jpeg))
    with torch.no_grad():
        cams, seconds["cam"] = timed(lambda: compute_cams(classifier, image, labels, cfg.cam))
        affinity, seconds["affinity"] = timed(lambda: predict_affinity(affinity_net, image))
        _, seconds["walk"] = timed(
            lambda: labeler.seed(image, labels, cams, {"random_walk": affinity})
        )
        partial, seconds["seed"] = timed(lambda: labeler.seed(image, labels))
    labelled, seconds["finish"] = timed(lambda: labeler.finish(image, partial))
    _, seconds["encode"] = timed(lambda: encode_mask(labelled.mask))

    result = {
        "size": [width, height],
        "labels": args.labels,
        "machine": machine_info(torch=torch.__version__),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": args.threads,
        "method": {
            "classifier": cfg.classifier.model.backbone.name,
            "cam_scales": list(cfg.cam.scales),
            "cam_flip": cfg.cam.flip,
            "affinity": cfg.affinity.model.backbone.name,
            "feature_stride": cfg.affinity.model.feature_stride,
            "refiners": list(cfg.refiners),
            "logt": cfg.random_walk.logt,
            "crf_iterations": cfg.crf.iterations,
        },
        "seconds_per_image": seconds,
        "repeats": args.repeats,
    }
    print(json.dumps(result, indent=2))
    write_results(args.out, result)


if __name__ == "__main__":
    main()
