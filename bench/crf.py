"""Dense CRF cost per image, and the overhead of `wsss.crf.dense_crf` over raw pydensecrf calls.

For each label count, times (a) the pydensecrf calls written inline and (b) `dense_crf` on the
same 500x375 synthetic image and probabilities, interleaved (alternating which goes first) so
that load from other processes on a shared CPU hits both alike; reports medians and the
overhead ratio. Runs pinned to one CPU core (pydensecrf is single-threaded).

    .venv/bin/python bench/crf.py --iterations 5 10 --out crf_bench.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pydensecrf.densecrf as dcrf
from common import machine_info, write_results
from pydensecrf.utils import unary_from_softmax
from scipy import ndimage

from wsss.crf import CrfParams, dense_crf

WIDTH, HEIGHT = 500, 375


def synthetic_scene(n_labels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured RGB image with n_labels - 1 soft-edged ellipses on a smooth background, and
    CAM-like probabilities (C, H, W): blurred, displaced, noisy versions of the true regions."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    background = np.stack(
        [
            80 + 60 * np.sin(xs / 70 + c) * np.cos(ys / 55 - c) + 40 * (ys / HEIGHT)
            for c in range(3)
        ],
        axis=-1,
    )
    image = background.copy()
    truth = np.zeros((n_labels, HEIGHT, WIDTH), dtype=np.float32)
    truth[0] = 1.0
    for k in range(1, n_labels):
        cy, cx = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH)
        ry, rx = rng.uniform(25, 90, size=2)
        angle = rng.uniform(0, np.pi)
        dy, dx = ys - cy, xs - cx
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
        region = (u * u + v * v) < 1.0
        image[region] = rng.uniform(20, 235, size=3)
        truth[:, region] = 0.0
        truth[k, region] = 1.0
    image += rng.normal(0, 8, image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)

    # Blur and shift as a CAM would be (coarse, off the object's edges), then add noise.
    shift = rng.integers(-6, 7, size=2)
    scores = ndimage.gaussian_filter(np.roll(truth, tuple(shift), axis=(1, 2)), (0, 6, 6))
    scores += rng.uniform(0, 0.15, scores.shape).astype(np.float32)
    probs = (scores / scores.sum(axis=0, keepdims=True)).astype(np.float32)
    return image, probs


def raw_pydensecrf(image: np.ndarray, probs: np.ndarray, params: CrfParams) -> np.ndarray:
    """The pydensecrf calls as one would write them inline (image already C-contiguous)."""
    n_labels, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(unary_from_softmax(probs, clip=params.probability_floor))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=image,
        compat=params.bilateral_compat,
    )
    return np.array(crf.inference(params.iterations)).reshape(n_labels, height, width)


def timed(fn, *args) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def bench_case(n_labels: int, iterations: int, repeats: int) -> dict:
    image, probs = synthetic_scene(n_labels, seed=n_labels)
    params = CrfParams(iterations=iterations)
    raw_times, wrapper_times = [], []
    timed(raw_pydensecrf, image, probs, params)  # warm-up (allocations, page faults)
    timed(dense_crf, image, probs, params)
    for r in range(repeats):
        if r % 2 == 0:
            t_raw, out_raw = timed(raw_pydensecrf, image, probs, params)
            t_wrap, out_wrap = timed(dense_crf, image, probs, params)
        else:
            t_wrap, out_wrap = timed(dense_crf, image, probs, params)
            t_raw, out_raw = timed(raw_pydensecrf, image, probs, params)
        raw_times.append(t_raw)
        wrapper_times.append(t_wrap)
    raw_median = statistics.median(raw_times)
    wrapper_median = statistics.median(wrapper_times)
    return {
        "labels": n_labels,
        "iterations": iterations,
        "repeats": repeats,
        "raw_s": raw_times,
        "wrapper_s": wrapper_times,
        "raw_median_s": raw_median,
        "wrapper_median_s": wrapper_median,
        "overhead_ratio": wrapper_median / raw_median,
        "paired_ratio_median": statistics.median(
            w / r for w, r in zip(wrapper_times, raw_times, strict=True)
        ),
        "max_abs_output_difference": float(np.abs(out_wrap - out_raw).max()),
    }


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| labels | iterations | raw pydensecrf median (s) | `dense_crf` median (s) "
        "| overhead (ratio of medians) | median paired ratio | max output diff |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['labels']} | {r['iterations']} | {r['raw_median_s']:.3f} "
            f"| {r['wrapper_median_s']:.3f} | {r['overhead_ratio']:.3f} "
            f"| {r['paired_ratio_median']:.3f} | {r['max_abs_output_difference']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, nargs="+", default=[3, 21])
    parser.add_argument("--iterations", type=int, nargs="+", default=[10])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cpu", type=int, default=None, help="core to pin to (default: first)")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args()

    cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    results = [
        bench_case(n_labels, iterations, args.repeats)
        for n_labels in args.labels
        for iterations in args.iterations
    ]
    info = machine_info(
        pinned_to_cpus=sorted(os.sched_getaffinity(0)),
        numpy=np.__version__,
        pydensecrf2=importlib.metadata.version("pydensecrf2"),
    )
    print(
        f"{WIDTH}x{HEIGHT} image, pinned to CPU {cpu} of nproc={info['nproc']} "
        f"({info['cpu_model']}), pydensecrf2 {info['pydensecrf2']}, {args.repeats} repeats"
    )
    print(markdown_table(results))
    write_results(args.out, {"image": [HEIGHT, WIDTH], "machine": info, "results": results})


if __name__ == "__main__":
    main()
