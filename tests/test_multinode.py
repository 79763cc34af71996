"""Labeling and training on a Ray cluster of several nodes, and a node lost in the middle.

`ray.cluster_utils.Cluster` starts a head and worker nodes as processes on this machine, shaped
as cluster/kuberay/raycluster.yaml: a head without CPUs (the driver's node), a `gpu` group whose
nodes have one GPU each (a logical one: torch finds no CUDA here, so the model actors run on the
CPU) and a `cpu` group. Mid-run a worker node is removed (its processes killed, as when a pod or
its machine is lost) and a node of its group added, as KubeRay recreates a lost pod.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import ray
from conftest import (
    model_records,
    shard_rows,
    synthetic_with_unreadable,
    tiny_label_overrides,
    tiny_networks,
    upload_dataset,
)
from ray.cluster_utils import Cluster
from ray.util.state import list_actors, list_tasks
from ray.util.state.common import ActorState

from pipelines import runtime, shards, storage
from pipelines.config import RunConfig, load_config
from pipelines.inputs import manifest_classes
from pipelines.label import job as label
from pipelines.model_record import META_FILE
from pipelines.train import classifier as train_classifier

pytestmark = pytest.mark.slow

N_IMAGES = 80
UNREADABLE = ("synth-000005", "synth-000011")  # so that both labels/ and errors/ get rows
TRAIN_IMAGES = 16
EPOCHS = 3
# Each group's nodes. A gpu node holds one model actor or one training worker (2 CPUs each), so
# two of either land on two nodes; the cpu node has room for the CRF actor and Ray Data's tasks.
GROUPS = {"gpu": {"num_cpus": 2, "num_gpus": 1}, "cpu": {"num_cpus": 3}}
MODEL_ACTOR = "MapWorker(MapBatches(ModelActor))"
CRF_ACTOR = "MapWorker(MapBatches(Finisher))"


class KubeRayLike:
    """A head without CPUs, two gpu nodes and a cpu node; nodes replaced as KubeRay would."""

    def __init__(self) -> None:
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        self.nodes = {}  # node id -> the node's processes (ray._private.node.Node)
        self.group = {self.cluster.head_node.node_id: "head"}  # node id -> group
        for group in ("gpu", "gpu", "cpu"):
            self.add(group)

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, group: str) -> None:
        node = self.cluster.add_node(**GROUPS[group])
        self.nodes[node.node_id] = node
        self.group[node.node_id] = group

    def replace(self, node_id: str) -> None:
        """Kill the node `node_id`'s processes, then add a node of its group (as KubeRay recreates
        a lost pod). Only from the main thread: a new node sets signal handlers."""
        self.cluster.remove_node(self.nodes.pop(node_id))
        self.add(self.group[node_id])

    def shutdown(self) -> None:
        self.cluster.shutdown()


def live_actors() -> list[ActorState]:
    return list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000)


def groups_by_class(cluster: KubeRayLike, actors: list[ActorState]) -> dict[str, list[str]]:
    """The node group of each actor, by actor class."""
    placed: dict[str, list[str]] = {}
    for actor in actors:
        placed.setdefault(actor.class_name, []).append(cluster.group[actor.node_id])
    return placed


def wait_for(condition: Callable[[], bool], job: Future, what: str) -> None:
    """Wait until `condition()` while `job` (running in a thread) has not ended."""
    deadline = time.monotonic() + 240
    while not condition():
        if job.done():
            job.result()  # raises the job's error, if any
            pytest.fail(f"the job ended before {what}")
        assert time.monotonic() < deadline, f"no {what} after 240 s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(without_session_ray) -> KubeRayLike:
    """The cluster, which this process joins at `ray.address` as `wsss` does (here, in the main
    thread; the jobs run in another so that this one can remove and add nodes)."""
    cluster = KubeRayLike()
    runtime.connect(load_config(overrides=[f"ray.address={cluster.address}"]))
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def bucket(tmp_path_factory, s3_endpoint) -> str:
    """80 synthetic images (two unreadable) and their manifest; a training manifest of 16 of
    them beside it, `train.jsonl`."""
    manifest = synthetic_with_unreadable(tmp_path_factory.mktemp("data"), N_IMAGES, 3, UNREADABLE)
    lines = manifest.read_text().splitlines()
    readable = [line for line in lines if not any(bad in line for bad in UNREADABLE)]
    (manifest.parent / "train.jsonl").write_text("\n".join(readable[:TRAIN_IMAGES]) + "\n")
    return upload_dataset(s3_endpoint, manifest.parent)


@pytest.fixture(scope="module")
def label_cfg(cluster, bucket, s3_endpoint) -> RunConfig:
    """A labeling on the cluster's GPU group: two model actors, a CRF pool of one actor."""
    overrides = tiny_label_overrides(
        f"s3://{bucket}/data/manifest.jsonl", f"s3://{bucket}/runs", s3_endpoint
    )
    cfg = load_config(
        overrides=[
            *overrides,
            f"ray.address={cluster.address}",
            "ray.use_gpu=true",
            "ray.model_actors=2",
            "label.crf_workers=1",
            "cam.scales=[1.0, 1.5, 2.0]",  # work enough for the model actors to lose some
        ]
    )
    model_records(cfg, manifest_classes(cfg))
    return cfg


@dataclass(frozen=True)
class NodeLoss:
    """A labeling that lost a node of a model actor mid-run."""

    placed: dict[str, list[str]]  # live actors' node groups by class when the node went
    model_actor: str  # the id of the model actor whose node went
    written: list[str]  # the labels/ files when the node went
    summary: dict  # the run's summary


def model_actors_at_work() -> bool:
    """Whether both model actors are up and one of them has finished a batch."""
    alive = [a for a in live_actors() if a.class_name == MODEL_ACTOR]
    done = list_tasks(
        filters=[("name", "=", f"{MODEL_ACTOR}.submit"), ("state", "=", "FINISHED")], limit=1
    )
    return len(alive) == 2 and bool(done)


@pytest.fixture(scope="module")
def gpu_node_lost(cluster, label_cfg) -> NodeLoss:
    """`label` on the cluster; once both model actors are at work, the node of one of them is
    lost and replaced."""
    context = ray.data.DataContext.get_current()
    # Both model actors up before the first batch (one alone would label every image while the
    # other starts, on two cores), so that the node goes while both have work.
    context.wait_for_min_actors_s = 240
    pool = ThreadPoolExecutor(1)
    try:
        running = pool.submit(label.run, label_cfg, log=lambda _: None)
        wait_for(model_actors_at_work, running, "both model actors were at work")
        actors = live_actors()
        written = shards.shard_files(label_cfg.run_uri, shards.LABELS, label_cfg.storage)
        victim = next(a for a in actors if a.class_name == MODEL_ACTOR)
        cluster.replace(victim.node_id)
        summary = running.result(timeout=300)
    finally:
        pool.shutdown(wait=False)  # a job still running ends with the cluster
        context.wait_for_min_actors_s = ray.data.context.DEFAULT_WAIT_FOR_MIN_ACTORS_S
    return NodeLoss(groups_by_class(cluster, actors), victim.actor_id, written, summary)


def test_model_actors_run_on_the_gpu_group_and_the_crf_on_the_cpu_group(gpu_node_lost):
    placed = gpu_node_lost.placed
    assert placed[MODEL_ACTOR] == ["gpu", "gpu"]
    assert placed[CRF_ACTOR] == ["cpu"]
    # The row journal is the driver's: on a worker node it would die with that node.
    assert placed["DeathJournal"] == ["head"]


def test_a_gpu_node_lost_mid_run_leaves_every_row_once_in_labels_or_errors(
    gpu_node_lost, label_cfg
):
    files = shards.shard_files(label_cfg.run_uri, shards.LABELS, label_cfg.storage)
    assert set(gpu_node_lost.written) < set(files)  # the node went mid-run
    (restarted,) = list_actors(filters=[("actor_id", "=", gpu_node_lost.model_actor)], detail=True)
    assert restarted.num_restarts >= 1  # Ray Data's actors restart (on the new node, here)
    summary = gpu_node_lost.summary
    assert (summary["input"], summary["skipped"]) == (N_IMAGES, 0)
    assert (summary["labelled"], summary["errors"]) == (N_IMAGES - len(UNREADABLE), 2)

    labels, errors = shard_rows(label_cfg, shards.LABELS), shard_rows(label_cfg, shards.ERRORS)
    written = Counter(labels.column("image_id").to_pylist() + errors.column("image_id").to_pylist())
    manifest = storage.read_bytes(label_cfg.dataset.manifest, label_cfg.storage).decode()
    expected = Counter(json.loads(line)["image_id"] for line in manifest.splitlines())
    assert written == expected  # every row once: none lost, none twice
    assert sorted(errors.column("image_id").to_pylist()) == sorted(UNREADABLE)


@pytest.fixture(scope="module")
def train_cfg(cluster, bucket, s3_endpoint) -> RunConfig:
    """The classifier trained by two workers of 2 CPUs each (on two nodes: no node has 4), with
    the failures the cluster's run configuration allows (cluster/kuberay/configmap-run.yaml)."""
    return load_config(
        overrides=[
            f"dataset.manifest=s3://{bucket}/data/train.jsonl",
            f"output=s3://{bucket}/runs",
            f"storage.s3_endpoint_url={s3_endpoint}",
            f"ray.address={cluster.address}",
            "name=train",
            "ray.train_workers=2",
            "ray.cpus_per_worker=2",
            "ray.max_failures=3",
            "ray.rows_per_block=8",
            "cam.scales=[1.0]",
            *tiny_networks(),
            f"classifier.optim.epochs={EPOCHS}",
        ]
    )


def test_training_resumes_from_its_last_checkpoint_when_a_worker_node_is_lost(cluster, train_cfg):
    checkpoints = storage.join(train_cfg.layout.checkpoints, "classifier")
    registered = storage.join(checkpoints, "checkpoint_manager_snapshot.json")
    first_meta = storage.join(checkpoints, "epoch_0000", META_FILE)
    pool = ThreadPoolExecutor(1)
    try:
        running = pool.submit(train_classifier.run, train_cfg, log=lambda _: None)
        # A checkpoint counts once Ray Train has recorded it in the run's snapshot file.
        wait_for(
            lambda: storage.exists(registered, train_cfg.storage), running, "a stored checkpoint"
        )
        actors = live_actors()
        first = storage.read_bytes(first_meta, train_cfg.storage)
        workers = [a for a in actors if a.class_name == "RayTrainWorker"]
        cluster.replace(workers[0].node_id)
        record = running.result(timeout=300)
    finally:
        pool.shutdown(wait=False)

    assert len({worker.node_id for worker in workers}) == 2  # two workers, two nodes
    placed = groups_by_class(cluster, actors)
    assert placed["SkippedRows"] == placed["EpochLines"] == ["head"]  # the driver's
    start = int(record.metrics["start_epoch"])
    assert 1 <= start < EPOCHS  # the new workers resumed after a stored checkpoint
    assert record.epochs == EPOCHS and record.metrics["workers"] == 2
    assert storage.read_bytes(first_meta, train_cfg.storage) == first  # not trained again
    assert record.checkpoint_uri == storage.join(checkpoints, f"epoch_{EPOCHS - 1:04d}")
