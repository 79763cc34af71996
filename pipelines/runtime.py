"""The Ray runtime every job shares: joining the cluster (or starting a local Ray) and checking,
before a job starts, that the cluster can host the workers and actors it asks for: Ray would
otherwise wait for them without end.

Imports Ray core only (not Ray Train), so every job imports it at the top.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines.config import ConfigError, RunConfig

# Ray keeps no more idle workers than there are free logical CPUs (ray-project/ray#36766). While
# model actors or training workers hold CPUs, the workers that ran one Ray Data operator's tasks
# are killed within a second of going idle, and the next operator (or the next run) starts a
# fresh Python worker: ~1.5-2 CPU-s each, a large share of a short job on a small node
# (docs/benchmarks.md). A local instance keeps this many idle workers per logical CPU instead.
IDLE_WORKERS_PER_CPU = 2


class InsufficientResourcesError(ConfigError):
    """The Ray cluster lacks the CPUs or GPUs the configuration asks for: Ray would wait for
    them without end."""


def start_local_ray(num_cpus: int | None = None, **options: Any) -> None:
    """Start a local Ray instance with `num_cpus` logical CPUs (None = the machine's cores) that
    keeps its idle workers for the next tasks (`IDLE_WORKERS_PER_CPU`); `options` go to
    `ray.init`. A RAY_num_workers_soft_limit set by the user wins."""
    cpus = num_cpus or os.cpu_count() or 1
    # Read by the raylet that ray.init starts, which inherits this process's environment.
    os.environ.setdefault("RAY_num_workers_soft_limit", str(IDLE_WORKERS_PER_CPU * cpus))
    # Ray Train's preemption watcher polls for other nodes being preempted (spot instances);
    # a local instance has one node, and the watcher's start logs an error-level line about
    # its restartable actor (ray-project/ray#53727) in every training run.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(num_cpus=num_cpus, **options)


def connect(cfg: RunConfig) -> None:
    """Join the cluster at `ray.address` (or start a local Ray, `start_local_ray`) unless
    already connected."""
    if not ray.is_initialized():
        if cfg.ray.address is None:
            start_local_ray(cfg.ray.local_cpus)
        else:
            ray.init(address=cfg.ray.address)
    # Ray 2.60's default Parquet reader (DataSourceV2) starts 32 footer-reading actors for every
    # read_parquet call, ~10 s per read on a 2-core node (measured; docs/benchmarks.md) for our
    # one-file manifests and ledgers; the V1 reader lists and reads the same files in tasks.
    ray.data.DataContext.get_current().use_datasource_v2 = False


def on_driver_node(actor_class: Any) -> Any:
    """`actor_class` (a `ray.remote` class) placed on the driver's node, for the job's own
    bookkeeping actors. Ray places an actor of `num_cpus=0` on any node, and one on a worker node
    dies with that node (tests/test_multinode.py saw it fail the labeling); the driver's node
    lives as long as the job."""
    node = ray.get_runtime_context().get_node_id()
    return actor_class.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))


@dataclass(frozen=True)
class Demand:
    """One phase of a job: `count` (the setting `count_field`) workers or actors, each needing
    `resources` ({"CPU": ..., "GPU": ...}; its CPUs set by `cpu_field`) on one node, with
    `task_cpus` CPUs beside them for Ray Data's tasks (`task_field` says where that comes from)."""

    count_field: str
    count: int
    what: str
    cpu_field: str
    resources: dict[str, float]
    task_cpus: float = 1.0
    task_field: str = "1 for Ray Data tasks"


def check_resources(cfg: RunConfig, job: str, demands: Sequence[Demand]) -> None:
    """Raise InsufficientResourcesError naming the settings unless the cluster can host each
    phase of `job` in turn (the phases run one after another): its CPUs and GPUs in total, and
    one worker or actor on some single node. Reads `ray.cluster_resources()`: on an autoscaling
    cluster this is its current size."""
    total = ray.cluster_resources()
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    have_cpus, have_gpus = total.get("CPU", 0), total.get("GPU", 0)
    problems = []
    for d in demands:
        cpu, gpu = d.resources.get("CPU", 0.0), d.resources.get("GPU", 0.0)
        cpus = d.count * cpu + d.task_cpus
        if cpus > have_cpus:
            problems.append(
                f"{cpus:g} CPUs ({d.count_field} {d.count} x {d.cpu_field} {cpu:g} + "
                f"{d.task_field}) but the cluster has {have_cpus:g}"
            )
        if d.count * gpu > have_gpus:
            problems.append(
                f"{d.count * gpu:g} GPUs (ray.use_gpu: {d.count_field} {d.count} x {gpu:g}) but "
                f"the cluster has {have_gpus:g}"
            )
        if not any(all(node.get(k, 0) >= v for k, v in d.resources.items()) for node in nodes):
            wanted = " and ".join(f"{v:g} {k}" for k, v in d.resources.items() if v)
            problems.append(f"{wanted} on one node for {d.what}, but no node has that much")
    if problems:
        gpu_hint = ", set ray.use_gpu=false" if cfg.ray.use_gpu else ""
        raise InsufficientResourcesError(
            f"the Ray cluster cannot host this {job}: it needs "
            + "; and ".join(problems)
            + f". Lower the counts or the CPUs per worker or actor{gpu_hint}, or use a bigger "
            "cluster."
        )


def model_actors(cfg: RunConfig, task_cpus: float = 1.0, task_field: str = "") -> Demand:
    """The labeling model actors of `cfg` (`ray.model_actors`, a GPU share each with
    `ray.use_gpu`) as a phase of a job."""
    r = cfg.ray
    return Demand(
        "ray.model_actors",
        r.model_actors,
        "a model actor",
        "ray.cpus_per_actor",
        {"CPU": r.cpus_per_actor, "GPU": r.gpus_per_actor if r.use_gpu else 0.0},
        task_cpus,
        task_field or f"{task_cpus:g} for Ray Data tasks",
    )
