"""How much the refinement stages (AffinityNet random walk, dense CRF) add on top of CAMs of a
known quality.

The demo's CAMs come from a classifier trained from random weights on a CPU for two minutes; they
are weak and often fire on the wrong object, which no refinement can repair. To measure the
refinement itself, this benchmark replaces the classifier with CAM stand-ins made from the ground
truth the way real CAMs fail: each object is weighted by a smooth random field (parts of it respond
weakly), blurred (the map spills over the boundary) and scaled to peak at 1. Everything after
that is the method as `wsss run-local` runs it: affinity labels, AffinityNet trained on them,
the walk, the CRF. It prints mIoU after each stage, and again with the learned affinities
replaced by the ground truth's (1 within a class, 0 across) to separate the walk from AffinityNet.

    uv run python bench/refinement.py --n 200 --out bench/results/refinement.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import machine_info, write_results
from scipy import ndimage

from pipelines.config import RunConfig
from wsss import labeling
from wsss.affinity import affinity_label_map, reduce_label_map, train_affinity_net
from wsss.cam import BackgroundParams
from wsss.metrics import ConfusionMatrix
from wsss.neighbourhood import offsets, shifted
from wsss.networks import initial_network
from wsss.synthetic import Sample, render_sample


def cam_stand_in(sample: Sample, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Foreground CAMs (K, H, W) from the ground truth: incomplete inside, spilling outside."""
    h, w = sample.mask.shape
    cams = np.zeros((n_classes, h, w), np.float32)
    for c in sample.labels:
        field = ndimage.zoom(rng.uniform(0.0, 1.0, (4, 4)), (h / 4, w / 4), order=1)[:h, :w]
        cam = ndimage.gaussian_filter((sample.mask == c) * (0.1 + field**2), sigma=0.05 * min(h, w))
        cams[c - 1] = cam / cam.max()
    return cams


def oracle_affinity(mask: np.ndarray, stride: int, radius: int) -> torch.Tensor:
    """Affinities (P, h, w) from the ground truth: 1 for pairs of the same class, 0 across."""
    grid = torch.from_numpy(reduce_label_map(mask, stride).astype(np.int64))
    return torch.stack(
        [(grid == shifted(grid, dy, dx, fill=-1)).float() for dy, dx in offsets(radius)]
    )


def run(n: int, seed: int, cfg: RunConfig) -> dict:
    params = cfg.synthetic.params
    k = params.n_classes
    rng = np.random.default_rng(seed)
    samples = [render_sample(seed, i, params) for i in range(n)]
    cams = [cam_stand_in(s, k, rng) for s in samples]
    started = time.perf_counter()
    label_maps = [
        affinity_label_map(c, s.labels, cfg.affinity.labels, s.image)
        for c, s in zip(cams, samples, strict=True)
    ]
    net = train_affinity_net(
        initial_network("affinity", cfg.affinity.model, k, seed=seed),
        [(s.image, m) for s, m in zip(samples, label_maps, strict=True)],
        cfg.affinity.model,
        cfg.affinity.augment,
        cfg.affinity.optim,
        seed,
        "cpu",
    )
    trained = time.perf_counter()
    names = ("cam", "random_walk", "crf", "random_walk_oracle_affinity", "crf_oracle_affinity")
    stages = {name: ConfusionMatrix(k + 1) for name in names}
    best_cam = {t: ConfusionMatrix(k + 1) for t in np.arange(0.05, 0.55, 0.05).round(2)}
    # The CAMs are given: the method needs no classifier; the walk and the CRF as configured.
    labeler = cfg.model_copy(update={"refiners": ("random_walk", "crf")}).labeler({"affinity": net})
    for s, c in zip(samples, cams, strict=True):
        out = labeler.label(s.image, s.labels, cams_fg=c)
        stages["cam"].update(out.masks["cam"], s.mask)
        stages["random_walk"].update(out.masks["random_walk"], s.mask)
        stages["crf"].update(out.mask, s.mask)
        oracle = {"random_walk": oracle_affinity(s.mask, net.stride, net.params.radius)}
        out = labeler.finish(s.image, labeler.seed(s.image, s.labels, c, oracle), oracle)
        stages["random_walk_oracle_affinity"].update(out.masks["random_walk"], s.mask)
        stages["crf_oracle_affinity"].update(out.mask, s.mask)
        for t, matrix in best_cam.items():
            matrix.update(labeling.cam_mask(c, BackgroundParams(threshold=float(t))), s.mask)
    best_t = max(best_cam, key=lambda t: best_cam[t].miou())
    return {
        "images": n,
        "miou": {name: round(100 * m.miou(), 1) for name, m in stages.items()},
        "cam_best_threshold": float(best_t),
        "cam_best_miou": round(100 * best_cam[best_t].miou(), 1),
        "affinity_train_s": round(trained - started, 1),
        "label_s": round(time.perf_counter() - trained, 1),
        "machine": machine_info(torch_threads=torch.get_num_threads()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="synthetic images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    result = run(args.n, args.seed, RunConfig())
    print("| stage | mIoU |\n|---|---|")
    for name, value in result["miou"].items():
        print(f"| {name} | {value} |")
    print(
        f"CAM with the best threshold ({result['cam_best_threshold']}): {result['cam_best_miou']}"
    )
    write_results(args.out, result)


if __name__ == "__main__":
    main()
