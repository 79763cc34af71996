"""Sparse random walk (`wsss.random_walk.propagate`) against the dense PSA/IRN-style walk.

The dense reference builds the N x N affinity matrix, column-normalises it and squares it logt
times, then multiplies the CAM rows by it (PSA's `infer_aff.py`). Both run on the same
synthetic, piecewise-constant affinities for a 500x375 image at stride 8 (63x47 grid) and
stride 4 (125x94 grid). Every variant runs in a fresh subprocess so that its peak resident
memory (ru_maxrss) is its own; the baseline of an idle interpreter with torch and wsss
imported is subtracted. The sparse walk is also measured on larger grids to show that its
memory grows linearly with the number of pixels.

    .venv/bin/python bench/random_walk.py --out random_walk.json [--skip-dense-stride4]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine_info, write_results

from wsss.neighbourhood import offsets, pair_indices, pair_valid
from wsss.random_walk import RandomWalkParams, propagate

IMAGE_SIZE = (375, 500)  # (H, W) of a typical PASCAL VOC image
# Grids are (h, w); these are the 500x375 image at strides 8, 4, 2 and 1, the last being the
# grid of a 2000x1500 image at stride 4.
LINEARITY_GRIDS = [(47, 63), (94, 125), (188, 250), (375, 500)]


def synthetic_inputs(
    h: int, w: int, radius: int, channels: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """CAM-like scores (channels, h, w) and affinities (P, h, w) from a random Voronoi
    segmentation: about 0.9 inside a segment and 0.1 across, with noise, clipped to [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(12, 2, generator=generator) * torch.tensor([h, w])
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    points = torch.stack([ys, xs], dim=-1).float()
    segments = torch.cdist(points.reshape(-1, 2), centres).argmin(dim=1).reshape(h, w)
    affinity = torch.empty(len(offsets(radius)), h, w)
    for k, (dy, dx) in enumerate(offsets(radius)):
        partner = segments.roll((-dy, -dx), dims=(0, 1))  # wrapped values fall on invalid pairs
        affinity[k] = torch.where(segments == partner, 0.9, 0.1)
    affinity = (affinity + 0.1 * torch.randn(affinity.shape, generator=generator)).clamp(0, 1)
    scores = torch.rand(channels, h, w, generator=generator)
    return scores, affinity


def dense_walk(
    scores: torch.Tensor, affinity: torch.Tensor, radius: int, params: RandomWalkParams
) -> torch.Tensor:
    """PSA/IRN reference: dense A, T = A / column sums, logt squarings, cam_vec @ T."""
    c, h, w = scores.shape
    n = h * w
    src, dst = pair_indices(h, w, radius)
    weight = affinity[pair_valid(h, w, radius)] ** params.beta
    a = torch.eye(n)
    a[src, dst] = weight
    a[dst, src] = weight
    transition = a / a.sum(dim=0, keepdim=True)
    del a
    for _ in range(params.logt):
        transition = transition @ transition
    return (scores.reshape(c, n) @ transition).reshape(c, h, w)


VARIANTS = {"sparse": propagate, "dense": dense_walk}


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(args: argparse.Namespace) -> None:
    """One variant on one grid in this (fresh) process; prints a JSON line."""
    torch.set_num_threads(args.threads)
    params = RandomWalkParams(beta=args.beta, logt=args.logt)
    h, w = args.grid
    scores, affinity = synthetic_inputs(h, w, args.radius, args.channels)
    walk = VARIANTS[args.worker]
    # Untimed run on a tiny grid first: one-off library initialisation is not the walk's cost.
    walk(*synthetic_inputs(12, 9, args.radius, args.channels), args.radius, params)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = walk(scores, affinity, args.radius, params)
        times.append(time.perf_counter() - start)
    if args.save:
        torch.save(out, args.save)
    print(json.dumps({"times_s": times, "maxrss_bytes": maxrss_bytes()}))


def run_worker(
    variant: str, grid: tuple[int, int], repeats: int, args: argparse.Namespace, save: Path | None
) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--grid", *map(str, grid)]
    command += ["--repeats", str(repeats), "--threads", str(args.threads)]
    command += ["--radius", str(args.radius), "--beta", str(args.beta), "--logt", str(args.logt)]
    command += ["--channels", str(args.channels)]
    if save is not None:
        command += ["--save", str(save)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def idle_baseline_bytes() -> int:
    code = (
        "import resource, torch, wsss.random_walk, wsss.neighbourhood; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    return int(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
    )


def main(args: argparse.Namespace) -> dict:
    baseline = idle_baseline_bytes()
    grids = {s: (math.ceil(IMAGE_SIZE[0] / s), math.ceil(IMAGE_SIZE[1] / s)) for s in (8, 4)}
    comparisons = []
    with tempfile.TemporaryDirectory() as tmp:
        for stride, grid in grids.items():
            row = {"stride": stride, "grid_hw": list(grid), "pixels": grid[0] * grid[1]}
            outputs = {}
            for variant in ("sparse", "dense"):
                if variant == "dense" and stride == 4 and args.skip_dense_stride4:
                    continue
                # The dense stride-4 walk takes minutes: time it once.
                repeats = 1 if (variant == "dense" and stride == 4) else args.repeats
                save = Path(tmp) / f"{variant}_{stride}.pt"
                result = run_worker(variant, grid, repeats, args, save)
                outputs[variant] = torch.load(save, weights_only=True)
                row[variant] = {
                    "median_s": statistics.median(result["times_s"]),
                    "times_s": result["times_s"],
                    "peak_mib": (result["maxrss_bytes"] - baseline) / 2**20,
                }
                print(f"stride {stride} {variant}: {row[variant]}", file=sys.stderr)
            if "dense" in outputs:
                row["max_abs_diff"] = float((outputs["sparse"] - outputs["dense"]).abs().max())
                row["speedup"] = row["dense"]["median_s"] / row["sparse"]["median_s"]
            comparisons.append(row)

    linearity = []
    for grid in LINEARITY_GRIDS:
        result = run_worker("sparse", grid, 1, args, None)
        pixels = grid[0] * grid[1]
        peak = result["maxrss_bytes"] - baseline
        linearity.append(
            {
                "grid_hw": list(grid),
                "pixels": pixels,
                "peak_mib": peak / 2**20,
                "bytes_per_pixel": peak / pixels,
            }
        )
        print(f"sparse {grid}: {linearity[-1]}", file=sys.stderr)

    return {
        "machine": machine_info(torch_threads=args.threads, torch=torch.__version__),
        "image_hw": list(IMAGE_SIZE),
        "radius": args.radius,
        "beta": args.beta,
        "logt": args.logt,
        "channels": args.channels,
        "repeats": args.repeats,
        "idle_baseline_mib": baseline / 2**20,
        "comparisons": comparisons,
        "sparse_linearity": linearity,
    }


def markdown(report: dict) -> str:
    m, channels = report["machine"], report["channels"]
    lines = [
        f"Random walk, radius {report['radius']}, beta {report['beta']}, logt {report['logt']} "
        f"({2 ** report['logt']} steps), C = {channels} channels (background + {channels - 1} "
        f"classes), 500x375 image; {m['cpu_model']}, nproc {m['nproc']}, torch {m['torch']} "
        f"with {m['torch_threads']} threads (CPU shared with other jobs: medians of "
        f"{report['repeats']} runs, dense stride 4 timed once). Peak memory is ru_maxrss of a "
        f"fresh process minus an idle interpreter with torch imported "
        f"({report['idle_baseline_mib']:.0f} MiB).",
        "",
        "| stride | grid (w x h) | sparse time | dense time | speedup | sparse peak | dense peak "
        "| max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["comparisons"]:
        sparse, dense = row["sparse"], row.get("dense")
        if dense:
            dense_cells = (
                f"{dense['median_s']:.2f} s | {row['speedup']:.0f}x | {sparse['peak_mib']:.0f} MiB "
                f"| {dense['peak_mib']:.0f} MiB | {row['max_abs_diff']:.1e}"
            )
        else:
            dense_cells = f"skipped | - | {sparse['peak_mib']:.0f} MiB | - | -"
        lines.append(
            f"| {row['stride']} | {row['grid_hw'][1]} x {row['grid_hw'][0]} "
            f"| {sparse['median_s']:.3f} s | {dense_cells} |"
        )
    lines += [
        "",
        "| sparse walk: grid (w x h) | pixels | peak memory | bytes / pixel |",
        "|---|---|---|---|",
    ]
    for row in report["sparse_linearity"]:
        lines.append(
            f"| {row['grid_hw'][1]} x {row['grid_hw'][0]} | {row['pixels']} "
            f"| {row['peak_mib']:.0f} MiB "
            f"| {row['bytes_per_pixel']:.0f} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--radius", type=int, default=5)
    parser.add_argument("--beta", type=float, default=8.0)
    parser.add_argument("--logt", type=int, default=8)
    parser.add_argument("--channels", type=int, default=3, help="background + 2 classes")
    parser.add_argument(
        "--skip-dense-stride4", action="store_true", help="skip the minutes-long dense run"
    )
    # Internal: run one variant in this process (used for the fresh-subprocess measurements).
    parser.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--grid", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        worker(arguments)
    else:
        report = main(arguments)
        print(markdown(report))
        write_results(arguments.out, report)
