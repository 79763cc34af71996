"""Labeling throughput and memory: the Ray pipeline (`pipelines.label.job.run`, what `wsss label`
runs) against the ideal of the same per-image stages run in one process per core.

Both label the same small synthetic images with the same untrained networks (ResNet-18, seeded;
their model records are written here in the format a training writes, so no training is needed):
fetch + decode, `Labeler.seed` (CAM + random walk), `Labeler.finish` (dense CRF, final mask)
and PNG encoding. The ideal is a multiprocessing pool of one process per core (one
torch thread each) that starts, loads the networks and labels; it writes nothing. The Ray
pipeline runs on a local Ray started with two logical CPUs per core and one model actor per core,
which without GPUs also decodes and runs the CRF (`label.crf_pool`); the CPU tasks (manifest,
anti-join, writing) run beside the actors. Its time is the whole `run` call (actor start-up, the
manifest read and anti-join, writing the shards).

Two ratios: end to end (each side's whole time, start-up included, at each size) and steady state
(the marginal rate between the smallest and the largest size, (n2 - n1) / (t2 - t1) on median
times, in which each side's fixed start-up cancels: the rate a long job runs at).

Peak memory is the summed RSS of the driver and every process it started (Ray's GCS, raylet and
workers, sampled every 0.2 s); shared pages (the object store) count once per process mapping them.

    flock /tmp/wsss-ray.lock .venv/bin/python bench/label.py --out bench/results/label.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
from common import PeakMemory, machine_info, settle, write_results

from pipelines import storage
from pipelines.config import RunConfig, load_config
from pipelines.label import job as label
from pipelines.model_record import (
    load_network,
    save_model,
)
from wsss import synthetic
from wsss.affinity import AffinityNet
from wsss.classifier import Classifier
from wsss.imageio import decode_image, encode_mask
from wsss.synthetic import SyntheticParams


def config(args: argparse.Namespace, manifest: Path, work: Path, name: str) -> RunConfig:
    return load_config(
        overrides=[
            f"dataset.manifest={manifest}",
            f"output={work / 'runs'}",
            f"name={name}",
            "classifier.model.backbone.name=resnet18",
            "affinity.model.backbone.name=resnet18",
            "affinity.model.feature_stride=8",
            "cam.scales=[1.0]",
            f"ray.model_actors={args.cores}",
            "ray.cpus_per_actor=1",
            f"label.batch_size={args.batch_size}",
            f"label.min_rows_per_file={args.rows_per_file}",
            *([f"ray.rows_per_block={args.rows_per_block}"] if args.rows_per_block else []),
        ]
    )


def write_untrained_records(cfg: RunConfig, classes: list[str]) -> dict[str, str]:
    """Seeded untrained networks with model records where a training would leave them."""
    torch.manual_seed(0)
    checkpoints = storage.join(cfg.run_uri, "train")
    classifier = Classifier(len(classes) - 1, cfg.classifier.model)
    save_model(classifier, classes, cfg, storage.join(checkpoints, "classifier"))
    save_model(AffinityNet(cfg.affinity.model), classes, cfg, storage.join(checkpoints, "affinity"))
    return {stage: cfg.layout.record(stage) for stage in ("classifier", "affinity")}


# --- the ideal: the same stages in one process per core ---------------------------------------

_worker: dict = {}


def _load_networks(cfg: RunConfig, uris: dict[str, str], classes: list[str]) -> None:
    torch.set_num_threads(1)
    networks = {name: load_network(uri, cfg, name) for name, uri in uris.items()}
    _worker.update(
        cfg=cfg,
        labeler=cfg.labeler(networks),
        index={name: i for i, name in enumerate(classes)},
    )


def _label_one(item: tuple[str, list[str]]) -> int:
    cfg = _worker["cfg"]
    uri, names = item
    image = decode_image(storage.read_bytes(uri, cfg.storage), cfg.dataset.max_pixels)
    labels = [_worker["index"][name] for name in names]
    return len(encode_mask(_worker["labeler"].label(image, labels).mask))


def _ready(_: int) -> int:
    return os.getpid()


def ideal(cfg: RunConfig, uris: dict[str, str], classes: list[str], cores: int) -> dict:
    root = Path(cfg.dataset.manifest).parent
    rows = [json.loads(line) for line in Path(cfg.dataset.manifest).read_text().splitlines()]
    items = [(str(root / row["image"]), row["labels"]) for row in rows]
    context = multiprocessing.get_context("spawn")
    with PeakMemory() as memory:
        started = time.perf_counter()
        with context.Pool(cores, initializer=_load_networks, initargs=(cfg, uris, classes)) as pool:
            while len(set(pool.map(_ready, range(4 * cores), chunksize=1))) < cores:
                pass  # every worker has loaded the networks
            ready = time.perf_counter()
            pool.map(_label_one, items, chunksize=8)
            seconds = time.perf_counter() - started
    return {
        "images": len(items),
        "seconds": round(seconds, 2),
        "images_per_s": round(len(items) / seconds, 2),
        "startup_s": round(ready - started, 2),
        "peak_rss_mib": round(memory.peak_total / 2**20),
    }


# --- the Ray pipeline -------------------------------------------------------------------------


def with_ray(cfg: RunConfig, uris: dict[str, str], out: Path) -> dict:
    with PeakMemory() as memory:
        started = time.perf_counter()
        summary = label.run(
            cfg,
            out_uri=str(out),
            records=uris,
            log=lambda _: None,
        )
        seconds = time.perf_counter() - started
    assert summary["labelled"] == summary["input"], summary
    return {
        "images": summary["labelled"],
        "seconds": round(seconds, 2),
        "images_per_s": round(summary["labelled"] / seconds, 2),
        "peak_rss_mib": round(memory.peak_total / 2**20),
        "peak_driver_rss_mib": round(memory.peak_driver / 2**20),
        "stages": summary["stages"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--rounds", type=int, nargs="+", default=[3, 1], help="per size")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--min-side", type=int, default=32)
    parser.add_argument("--max-side", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows-per-file", type=int, default=200)
    parser.add_argument(
        "--rows-per-block", type=int, help="ray.rows_per_block (default: the config's)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rounds = dict(zip(args.sizes, args.rounds + [1] * len(args.sizes), strict=False))

    work = Path(tempfile.mkdtemp(prefix="wsss-bench-label-"))
    params = SyntheticParams(
        n_classes=3, min_side=args.min_side, max_side=args.max_side, max_objects=2
    )
    started = time.perf_counter()
    manifest = synthetic.generate(work / "data", max(args.sizes), 0, params)
    print(f"{max(args.sizes)} images generated in {time.perf_counter() - started:.0f} s")
    lines = manifest.read_text().splitlines()
    classes = (work / "data" / "classes.txt").read_text().split()
    # Imported here: the ideal's spawned processes import this module, and need no Ray Train.
    from pipelines.runtime import start_local_ray

    start_local_ray(2 * args.cores, include_dashboard=False)  # as `wsss label` starts one
    ray.data.DataContext.get_current().enable_progress_bars = False

    results: dict = {"machine": machine_info(torch_threads_per_process=1), "sizes": {}}
    for size in args.sizes:
        subset = work / "data" / f"manifest_{size}.jsonl"
        subset.write_text("\n".join(lines[:size]) + "\n")
        cfg = config(args, subset, work, f"n{size}")
        uris = write_untrained_records(cfg, classes)
        runs: dict[str, list] = {"ideal": [], "ray": []}
        for r in range(rounds[size]):
            # Alternate the order so drift from other load on the machine hits both alike.
            for kind in ("ideal", "ray") if r % 2 == 0 else ("ray", "ideal"):
                settle()
                if kind == "ideal":
                    result = ideal(cfg, uris, classes, args.cores)
                else:
                    result = with_ray(cfg, uris, work / "out" / f"n{size}-r{r}")
                runs[kind].append(result)
                print(f"{size} images, round {r + 1}, {kind}: {json.dumps(result)}", flush=True)
        med = {
            kind: {
                key: statistics.median(run[key] for run in results_)
                for key in ("seconds", "images_per_s", "peak_rss_mib")
            }
            for kind, results_ in runs.items()
        }
        med["ray_over_ideal"] = round(med["ray"]["images_per_s"] / med["ideal"]["images_per_s"], 3)
        results["sizes"][size] = {"runs": runs, "median": med}
        print(f"{size} images, medians: {json.dumps(med)}", flush=True)
    if len(args.sizes) > 1:
        results["steady_state"] = steady_state(results["sizes"], min(args.sizes), max(args.sizes))
        print(f"steady state: {json.dumps(results['steady_state'])}", flush=True)
    write_results(args.out, results)


def steady_state(sizes: dict, small: int, large: int) -> dict:
    """Images/s between two sizes, (large - small) / (t_large - t_small) on median times: the
    rate once started, each side's fixed start-up cancelling out."""
    rates = {
        kind: round(
            (large - small)
            / (sizes[large]["median"][kind]["seconds"] - sizes[small]["median"][kind]["seconds"]),
            2,
        )
        for kind in ("ideal", "ray")
    }
    return rates | {"ray_over_ideal": round(rates["ray"] / rates["ideal"], 3)}


if __name__ == "__main__":
    main()
