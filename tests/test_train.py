"""Ray Train jobs of the classifier and AffinityNet, on the local Ray instance and S3 server.

One classifier run (2 workers, the dataset and the run folder on the local S3 server, two
unreadable images) is shared by the tests that look at its outcome; the resume and AffinityNet
tests train on top of it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from conftest import (
    SHARD_VERSION,
    synthetic_with_unreadable,
    tiny_networks,
    upload_dataset,
    write_label_shard,
)
from torch import nn

from pipelines import storage
from pipelines.cli import main
from pipelines.config import RunConfig, load_config
from pipelines.model_record import (
    WEIGHTS_FILE,
    ModelRecord,
    load_network,
    read_record,
    save_model,
    write_record,
)
from pipelines.runtime import InsufficientResourcesError
from pipelines.shards import ragged
from pipelines.train import affinity as train_affinity
from pipelines.train import classifier as train_classifier
from pipelines.train.job import _resume_schedule, decode_rows
from wsss.affinity import AffinityNet, affinity_label_map, predict_affinity
from wsss.cam import compute_cams
from wsss.classifier import Classifier
from wsss.imageio import read_image
from wsss.training import OptimParams, make_optimizer, make_scheduler
from wsss.transforms import normalize

N_IMAGES = 12
UNREADABLE = ("synth-000003", "synth-000007")
pytestmark = pytest.mark.slow


def tiny_overrides(manifest: str, output: str, endpoint: str) -> list[str]:
    return [
        f"dataset.manifest={manifest}",
        f"output={output}",
        f"storage.s3_endpoint_url={endpoint}",
        "name=tiny",
        "ray.train_workers=2",
        "cam.scales=[1.0]",
        # SEAM's loss calls the classifier twice (two views) for the maps and feature levels
        # with the logits, and trains its PCM on them outside that call: the Ray Train job
        # must pass both through DDP (the plain CAM trains through Ray in tests/test_label.py).
        "classifier.model.method=seam",
        *tiny_networks(),
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """12 small synthetic images, two of them unreadable (not an image; truncated)."""
    manifest = synthetic_with_unreadable(tmp_path_factory.mktemp("data"), N_IMAGES, 1, UNREADABLE)
    return manifest.parent


@pytest.fixture(scope="module")
def overrides(ray_cluster, s3_endpoint, data_dir) -> list[str]:
    """The tiny run: its dataset uploaded to a fresh bucket, its outputs under s3://."""
    bucket = upload_dataset(s3_endpoint, data_dir)
    return tiny_overrides(f"s3://{bucket}/data/manifest.jsonl", f"s3://{bucket}/runs", s3_endpoint)


@pytest.fixture(scope="module")
def cfg(overrides) -> RunConfig:
    return load_config(overrides=overrides)


@pytest.fixture(scope="module")
def classifier_record(cfg) -> ModelRecord:
    return train_classifier.run(cfg, log=lambda _: None)


def read_weights(uri: str, cfg: RunConfig) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(storage.read_bytes(uri, cfg.storage)), weights_only=True)


def readable_images(data_dir: Path, count: int) -> list[tuple[np.ndarray, list[int]]]:
    rows = [json.loads(line) for line in (data_dir / "manifest.jsonl").read_text().splitlines()]
    classes = (data_dir / "classes.txt").read_text().split()
    return [
        (read_image(data_dir / row["image"]), [classes.index(name) for name in row["labels"]])
        for row in rows
        if row["image_id"] not in UNREADABLE
    ][:count]


def test_two_worker_checkpoint_gives_the_cams_of_the_in_process_model(
    cfg, classifier_record, data_dir
):
    record = read_record(cfg.layout.record("classifier"), cfg)  # read back from S3
    assert record.checkpoint_uri.startswith(cfg.run_uri + "/train/classifier/")
    assert record.classes[0] == "background" and len(record.classes) == 4
    assert record.backbone == "resnet18"
    assert record.config_hash == cfg.hash()
    assert classifier_record.metrics["workers"] == 2

    distributed = load_network(cfg.layout.record("classifier"), cfg, "classifier")
    in_process = Classifier(3, cfg.classifier.model)
    in_process.load_state_dict(read_weights(record.weights_uri, cfg))
    in_process.eval()
    untrained = train_classifier.initial_classifier(3, cfg)  # what training started from
    assert not torch.equal(distributed.head.weight, untrained.head.weight)
    assert not torch.equal(distributed.method.pcm.embed.weight, untrained.method.pcm.embed.weight)
    for image, labels in readable_images(data_dir, 3):
        expected = compute_cams(in_process, image, labels, cfg.cam)
        cams = compute_cams(distributed, image, labels, cfg.cam)
        np.testing.assert_array_equal(cams, expected)
        assert cams.shape == (3, *image.shape[:2])
        # CAMs are relu'd and may still be all zero after one tiny epoch: the raw scores too.
        x = torch.from_numpy(normalize(image))[None]
        with torch.no_grad():
            torch.testing.assert_close(
                distributed.score_maps(x), in_process.score_maps(x), rtol=0, atol=0
            )


def test_unreadable_images_are_skipped_and_counted(classifier_record):
    # 12 rows, 2 unreadable: 10 trained on, split evenly between the two workers.
    assert classifier_record.metrics["skipped_images"] == 2
    assert classifier_record.metrics["samples"] == N_IMAGES - 2
    assert classifier_record.metrics["steps"] == 3  # 5 rows per worker, batches of 2
    skipped = " ".join(classifier_record.skipped_examples)
    assert all(image_id in skipped for image_id in UNREADABLE)
    assert "not an image" in skipped and "truncated" in skipped


def test_run_started_again_resumes_after_its_last_checkpoint(cfg, overrides, classifier_record):
    first_meta = storage.join(classifier_record.checkpoint_uri, "meta.json")
    before = storage.read_bytes(first_meta, cfg.storage)
    assert json.loads(before)["epoch"] == 0

    # Started again with one more epoch, on one worker instead of two.
    longer = load_config(overrides=[*overrides, "classifier.optim.epochs=2", "ray.train_workers=1"])
    lines: list[str] = []
    resumed = train_classifier.run(longer, log=lines.append)

    assert resumed.metrics["epoch"] == 1 and resumed.epochs == 2
    # The driver printed the workers' epoch line as it came: epoch 2 only, the one trained.
    epochs = [line for line in lines if " epoch " in line]
    assert len(epochs) == 1 and epochs[0].startswith("  classifier epoch 2/2: loss ")
    assert resumed.metrics["workers"] == 1 and resumed.metrics["start_epoch"] == 1
    assert resumed.checkpoint_uri.endswith("/epoch_0001")
    # Epoch 0 was not trained again: its checkpoint is the one the first run wrote.
    assert storage.read_bytes(first_meta, cfg.storage) == before
    first = read_weights(classifier_record.weights_uri, cfg)
    second = read_weights(resumed.weights_uri, cfg)
    assert not torch.equal(first["head.weight"], second["head.weight"])


def segmentation_on_s3_shards(data_dir: Path, s3_endpoint: str, bucket: str) -> list[str]:
    """Overrides training the segmentation network (ResNet-18 from random weights, small crops)
    on a labels/ shard in a bucket of its own on the local S3 server, whose rows name the
    images uploaded to `bucket` (their masks: the ground truth)."""
    shard_root = data_dir.parent / "segmentation-shards"
    if not shard_root.exists():
        write_label_shard(
            shard_root, data_dir, lambda truth: truth, image_root=f"s3://{bucket}/data"
        )
    shard_bucket = upload_dataset(s3_endpoint, shard_root)
    return [
        f"segmentation.labels=s3://{shard_bucket}/data",
        f"segmentation.labels_version={SHARD_VERSION}",
        "segmentation.model.backbone.library=torchvision",
        "segmentation.model.backbone.name=resnet18",
        "segmentation.model.backbone.weights=null",
        "segmentation.augment.crop_size=48",
        "segmentation.augment.resize_long=[48, 64]",
        "segmentation.optim.batch_size=4",
    ]


def test_run_killed_after_its_first_checkpoint_resumes_from_there(
    cfg, overrides, ray_cluster, data_dir, s3_endpoint
):
    # `wsss train-segmentation` in a process of its own on this session's Ray, killed (SIGKILL)
    # as soon as its first checkpoint is registered; then the same command started again. A
    # checkpoint counts once Ray Train has recorded it in the run's snapshot file: one whose
    # upload a kill interrupts before that is trained again. Every network trains through the
    # same job (pipelines/train/job.py; the classifier resumes in the test above and in
    # tests/test_multinode.py); the segmentation network's reads pseudo-label shards on S3, two
    # of whose images are unreadable.
    network = "segmentation"
    epochs = 4  # uploads queue behind the training: the record waits for all of them
    command = [sys.executable, "-m", "pipelines.cli", f"train-{network}"]
    bucket = cfg.dataset.manifest.removeprefix("s3://").split("/")[0]
    for assignment in [
        *overrides,
        *segmentation_on_s3_shards(data_dir, s3_endpoint, bucket),
        f"name=killed-{network}",
        "ray.train_workers=1",
        f"{network}.optim.epochs={epochs}",
        f"ray.address={ray.get_runtime_context().gcs_address}",
    ]:
        command += ["--set", assignment]
    run = storage.join(cfg.output, f"killed-{network}")
    first_meta = storage.join(run, f"train/{network}/epoch_0000/meta.json")
    registered = storage.join(run, f"train/{network}/checkpoint_manager_snapshot.json")
    record = storage.join(run, f"models/{network}.json")

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not storage.exists(registered, cfg.storage):
        assert process.poll() is None, "the training exited before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.2)
    process.kill()
    process.wait()
    assert not storage.exists(record, cfg.storage), "the run finished before it was killed"
    before = storage.read_bytes(first_meta, cfg.storage)

    restarted = main(command[3:])
    assert restarted == 0
    resumed = read_record(record, cfg)
    start = int(resumed.metrics["start_epoch"])
    assert 1 <= start < epochs  # resumed after a stored checkpoint, not from scratch
    assert resumed.epochs == epochs and resumed.metrics["epoch"] == epochs - 1
    assert storage.read_bytes(first_meta, cfg.storage) == before  # epoch 0 not trained again
    assert resumed.metrics["skipped_images"] == len(UNREADABLE)


def test_label_actor_gives_the_in_process_affinity_labels(cfg, classifier_record):
    # The actor's work, called here on a decoded batch (the AffinityNet run streams it in Ray).
    manifest = train_affinity.load_manifest(cfg)
    rows = [row for row in manifest.rows if row.image_id not in UNREADABLE][:3]
    batch = {
        "image_id": np.array([row.image_id for row in rows], dtype=object),
        "image": np.array([row.image for row in rows], dtype=object),
        "labels": ragged([np.array(manifest.label_indices(row)) for row in rows]),
    }
    decoded = decode_rows(batch, cfg, skipped=None)  # all readable: nothing to report
    labelled = train_affinity.AffinityLabeler(cfg.layout.record("classifier"), cfg)(decoded)

    classifier = load_network(cfg.layout.record("classifier"), cfg, "classifier")
    assert list(labelled["image_id"]) == [row.image_id for row in rows]
    for row, image, label_map in zip(rows, labelled["image"], labelled["label_map"], strict=True):
        labels = manifest.label_indices(row)
        cams = compute_cams(classifier, image, labels, cfg.cam)
        expected = affinity_label_map(cams, labels, cfg.affinity.labels, image)
        assert label_map.shape == image.shape[:2]
        np.testing.assert_array_equal(label_map, expected)


def test_affinity_net_trains_from_the_classifier_and_loads_from_its_record(
    cfg, overrides, classifier_record, data_dir
):
    initial = train_affinity.initial_affinity_net(cfg.layout.record("classifier"), cfg)
    classifier = load_network(cfg.layout.record("classifier"), cfg, "classifier")
    for name, value in classifier.backbone.state_dict().items():
        assert torch.equal(initial.backbone.state_dict()[name], value), name

    one_worker = load_config(overrides=[*overrides, "ray.train_workers=1"])
    record = train_affinity.run(one_worker, log=lambda _: None)

    assert record.stage == "affinity" and record.metrics["skipped_images"] == 2
    assert np.isfinite(record.metrics["loss"]) and record.metrics["samples"] == N_IMAGES - 2
    distributed = load_network(cfg.layout.record("affinity"), cfg, "affinity")
    in_process = AffinityNet(cfg.affinity.model)
    in_process.load_state_dict(read_weights(record.weights_uri, cfg))
    for image, _ in readable_images(data_dir, 2):
        expected = predict_affinity(in_process, image)
        torch.testing.assert_close(predict_affinity(distributed, image), expected, rtol=0, atol=0)


def test_more_workers_or_gpus_than_the_cluster_has_fail_fast(cfg, ray_cluster, capsys):
    started = time.perf_counter()
    too_many = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"train_workers": 64})})
    with pytest.raises(
        InsufficientResourcesError, match=r"ray.train_workers 64 .* the cluster has 4"
    ):
        train_classifier.run(too_many, log=lambda _: None)
    gpus = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"use_gpu": True})})
    with pytest.raises(InsufficientResourcesError, match="GPUs .* the cluster has 0"):
        train_affinity.run(gpus, log=lambda _: None)
    assert main(["train-classifier", "--set", "ray.cpus_per_worker=16"]) == 2
    assert "no node has that much" in capsys.readouterr().err
    assert time.perf_counter() - started < 10


@ray.remote(num_cpus=1)
def _worker_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


@ray.remote
class _CpuHolder:
    def pid(self) -> int:
        return os.getpid()


def test_local_ray_keeps_idle_workers_while_cpus_are_held(ray_cluster):
    """Ray on its own keeps no more idle workers than there are free CPUs: with three of the
    four held (as model actors hold theirs), all idle workers but one would be killed within a
    second or two, and the next tasks would start new processes. The local instance of
    `start_local_ray` (the session's, as `wsss` starts one) keeps them."""
    # Four at once; where a new worker would start slowly, Ray may run one after another.
    workers = set(ray.get([_worker_pid.remote(1.0) for _ in range(4)]))
    holder = _CpuHolder.options(num_cpus=3).remote()
    try:
        idle = workers - {ray.get(holder.pid.remote())}  # the actor may take one of them
        assert len(idle) >= 2  # more than the one CPU left free
        time.sleep(4)  # Ray kills surplus workers idle for over a second, checking every 0.2 s
        assert {pid for pid in idle if _alive(pid)} == idle
    finally:
        ray.kill(holder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- without Ray ----------------------------------------------------------------------------


def test_resumed_schedule_continues_the_learning_rate_and_moments():
    torch.manual_seed(0)
    params = OptimParams(algorithm="sgd", lr=0.1, momentum=0.9, poly_power=0.9)
    model = nn.Linear(3, 2)
    optimizer = make_optimizer([{"params": list(model.parameters())}], params)
    scheduler = make_scheduler(optimizer, 6, params)
    for _ in range(3):
        model(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
        scheduler.step()
    saved = {"optimizer": optimizer.state_dict(), "steps": scheduler.last_epoch}

    fresh = make_optimizer([{"params": list(model.parameters())}], params)
    longer = make_scheduler(fresh, 10, params)  # the resumed run has more epochs
    _resume_schedule(fresh, longer, saved)

    assert fresh.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - 3 / 10) ** 0.9)
    assert longer.last_epoch == 3
    for p in model.parameters():
        assert torch.equal(fresh.state[p]["momentum_buffer"], optimizer.state[p]["momentum_buffer"])


def test_actors_load_the_record_the_driver_read_and_refuse_weights_changed_since(tmp_path):
    cfg = load_config(
        overrides=[
            f"output={tmp_path}",
            "classifier.model.backbone.name=resnet18",
            "classifier.model.backbone.weights=null",
        ]
    )
    torch.manual_seed(0)
    first, second = Classifier(2, cfg.classifier.model), Classifier(2, cfg.classifier.model)
    uri = cfg.layout.record("classifier")
    save_model(first, ["background", "a", "b"], cfg, str(tmp_path / "first"))
    driver_read = read_record(uri, cfg)  # what `label` and `train-affinity` hand their actors
    # The record is replaced mid-run (a retrain): actors still get the driver's model.
    save_model(second, ["background", "a", "b"], cfg, str(tmp_path / "second"))
    loaded = load_network(driver_read, cfg, "classifier")
    torch.testing.assert_close(loaded.head.weight, first.head.weight)
    assert not torch.equal(load_network(uri, cfg, "classifier").head.weight, first.head.weight)
    # The weights themselves overwritten in place: refused, not mixed in under the old version.
    Path(driver_read.weights_uri).write_bytes((tmp_path / "second" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match="sha256 .* does not match"):
        load_network(driver_read, cfg, "classifier")


def test_model_record_rejects_changed_weights_and_other_stages(tmp_path):
    overrides = [
        "classifier.model.backbone.name=resnet18",
        "classifier.model.backbone.weights=null",
    ]
    cfg = load_config(overrides=[f"output={tmp_path}", *overrides])
    model = Classifier(2, cfg.classifier.model)
    weights = tmp_path / "model.pt"
    torch.save(model.state_dict(), weights)
    record = ModelRecord(
        stage="classifier",
        checkpoint_uri=str(tmp_path),
        weights_uri=str(weights),
        weights_sha256="0" * 64,
        classes=["background", "a", "b"],
        backbone="resnet18",
        model=cfg.classifier.model.model_dump(mode="json"),
        epochs=1,
        config_hash=cfg.hash(),
        metrics={},
        skipped_examples=[],
        created_at="2026-01-01T00:00:00+00:00",
    )
    uri = cfg.layout.record("classifier")
    write_record(record, uri, cfg)
    with pytest.raises(ValueError, match="sha256 .* does not match"):
        load_network(uri, cfg, "classifier")
    with pytest.raises(ValueError, match="is for the classifier, not the affinity"):
        load_network(uri, cfg, "affinity")
    # Weights that would run code when unpickled are refused even with a matching digest.
    torch.save({"head.weight": Path("not/a/tensor")}, weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    write_record(record.model_copy(update={"weights_sha256": digest}), uri, cfg)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_network(uri, cfg, "classifier")
    Path(uri).write_text('{"stage": "classifier"}')
    with pytest.raises(ValueError, match=f"model record {uri}: checkpoint_uri: Field required"):
        read_record(uri, cfg)
