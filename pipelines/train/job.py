"""Ray Train plumbing shared by `wsss train-classifier`, `train-affinity` and
`train-segmentation`.

A stage describes its network in a `TrainJob` and builds a Ray Data dataset of ready training
examples: `image_dataset` streams the manifest's images (fetched and decoded in Ray Data tasks,
unreadable ones skipped and counted), the stage's own `map_batches` steps augment them.
`run_training` then runs a `TorchTrainer`: every worker trains its shard with the loop of
`wsss.training` (DDP through `prepare_model`, gloo on CPUs, NCCL on GPUs), reports each epoch's
metrics with a checkpoint to `<run>/train/<stage>/`, and the driver writes the model record. A
run started again under the same run name resumes from its last checkpoint.
"""

from __future__ import annotations

import io
import json
import logging
import math
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from pipelines import runtime, storage
from pipelines.config import ConfigError, RunConfig
from pipelines.manifests import Manifest
from pipelines.model_record import (
    META_FILE,
    TRAIN_STATE_FILE,
    WEIGHTS_FILE,
    ModelRecord,
    Stage,
    sha256_hex,
    write_record,
)
from pipelines.shards import ragged
from pipelines.train import kept_seeds
from wsss.imageio import ImageDecodeError, decode_image, decode_mask
from wsss.params import Params
from wsss.training import (
    Batch,
    OptimParams,
    StepLoss,
    epoch_summary,
    fit,
    make_optimizer,
    make_scheduler,
    param_groups,
)

logger = logging.getLogger(__name__)

# Unreadable rows whose messages are kept for the model record (all of them are counted).
KEPT_SKIP_MESSAGES = 20


def check_cluster(cfg: RunConfig, model_actors: bool = False) -> None:
    """Raise InsufficientResourcesError unless the cluster can host the training workers with
    one CPU for Ray Data's tasks and, with `model_actors` (AffinityNet's labels are computed by
    the labeling's model actors before training starts), those with one CPU for tasks."""
    r = cfg.ray
    workers = runtime.Demand(
        "ray.train_workers",
        r.train_workers,
        "a training worker",
        "ray.cpus_per_worker",
        {"CPU": r.cpus_per_worker, "GPU": 1.0 if r.use_gpu else 0.0},
    )
    phases = [workers, runtime.model_actors(cfg)] if model_actors else [workers]
    runtime.check_resources(cfg, "training", phases)


@ray.remote(num_cpus=0)
class SkippedRows:
    """The manifest rows whose image could not be read or decoded, each counted once however
    often its data is read (every epoch, or again after a resumption)."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._messages: list[str] = []  # the first few, in order

    def add(self, problems: list[tuple[str, str]]) -> None:
        for image_id, message in problems:
            if image_id not in self._ids and len(self._messages) < KEPT_SKIP_MESSAGES:
                self._messages.append(message)
            self._ids.add(image_id)

    def count(self) -> int:
        return len(self._ids)

    def messages(self) -> list[str]:
        return list(self._messages)


@ray.remote(num_cpus=0)
class EpochLines:
    """A training run's progress: the first worker adds a line per epoch, the driver prints the
    lines as they come (`follow_progress`); worker output itself goes to the log file."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def add(self, line: str) -> None:
        self._lines.append(line)

    def since(self, seen: int) -> list[str]:
        return self._lines[seen:]


@contextmanager
def follow_progress(progress, log: Callable[[str], None], every_s: float = 2.0) -> Iterator[None]:
    """While the block runs, pass the new lines of the `EpochLines` actor `progress` to `log`
    (from a thread: the block waits in trainer.fit); the last ones once it ends."""
    seen = 0
    done = threading.Event()

    def show_new() -> None:
        nonlocal seen
        for line in ray.get(progress.since.remote(seen)):
            log(line)
            seen += 1

    def poll() -> None:
        while not done.wait(every_s):
            show_new()

    thread = threading.Thread(target=poll, name="wsss-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        show_new()


def decode_rows(batch: dict[str, np.ndarray], cfg: RunConfig, skipped) -> dict[str, np.ndarray]:
    """Ray Data step: fetch and decode each row's image -> {"image_id", "image": uint8 (H, W, 3)
    each, and "labels" (class indices each) or "mask" (uint8 (H, W) each) as the rows have
    them: a mask is PNG bytes (a shard's) or the URI of one (a manifest's ground truth); the
    rows' "row" and kept seeds pass through where they have them. A row
    whose image or mask cannot be fetched or decoded, or whose mask does not fit its image, is
    dropped, logged and reported to the `SkippedRows` actor `skipped`, never fatal."""
    ids, images, extras, problems, decoded = [], [], [], [], []
    extra = "labels" if "labels" in batch else "mask"
    carried = [c for c in ("row", kept_seeds.SEEDS) if c in batch]
    for i, (image_id, uri, value) in enumerate(
        zip(batch["image_id"], batch["image"], batch[extra], strict=True)
    ):
        try:
            image = decode_image(_read(uri, cfg), cfg.dataset.max_pixels)
            if extra == "labels":
                value = np.asarray(value, dtype=np.int64)
            else:
                value = decode_mask(value if isinstance(value, bytes) else _read(value, cfg))
                if value.shape != image.shape[:2]:
                    raise ImageDecodeError(
                        f"mask {value.shape} does not match the image {image.shape[:2]}"
                    )
        except (OSError, ImageDecodeError) as err:
            problems.append((str(image_id), f"{image_id} ({uri}): {err}"))
            continue
        ids.append(str(image_id))
        images.append(image)
        extras.append(value)
        decoded.append(i)
    if problems:
        messages = "; ".join(message for _, message in problems)
        logger.warning("skipping %d unreadable image(s): %s", len(problems), messages)
        # Waited for, so every count is in before the epoch's data is exhausted.
        ray.get(skipped.add.remote(problems))
    out = {"image_id": np.array(ids, dtype=object), "image": ragged(images), extra: ragged(extras)}
    return out | {column: batch[column][decoded] for column in carried}


def _read(uri: str, cfg: RunConfig) -> bytes:
    return storage.read_bytes(str(uri), cfg.storage, cfg.dataset.max_bytes)


def block_count(n_rows: int, cfg: RunConfig) -> int:
    """Blocks of `ray.rows_per_block` rows that `n_rows` rows make (at least one)."""
    return max(1, math.ceil(n_rows / cfg.ray.rows_per_block))


def decoded_blocks(rows: ray.data.Dataset, cfg: RunConfig, skipped) -> ray.data.Dataset:
    """`rows` (image URIs and their labels or masks), their blocks visited in a new order every
    epoch (from `cfg.seed`), fetched and decoded in Ray Data tasks (`decode_rows`); the
    workers' local shuffle buffers mix rows across neighbouring blocks."""
    return rows.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=cfg.seed)).map_batches(
        decode_rows,
        fn_kwargs={"cfg": cfg, "skipped": skipped},
        batch_size=cfg.ray.rows_per_block,
        batch_format="numpy",
    )


def image_dataset(
    manifest: Manifest, cfg: RunConfig, skipped, kept: str | None = None
) -> ray.data.Dataset:
    """The manifest's images, decoded in Ray Data tasks, as {"image_id", "image", "labels",
    "row"} rows, row being the position in the manifest, and with the kept seeds of the merged
    file `kept` (`pipelines.train.kept_seeds`) when given. Only the rows' URIs live on the
    driver. The rows are shuffled once into blocks of `ray.rows_per_block` (`decoded_blocks`
    then varies the blocks' order per epoch)."""
    order = np.random.default_rng(cfg.seed).permutation(len(manifest.rows))
    rows = [
        {
            "image_id": manifest.rows[i].image_id,
            "image": manifest.rows[i].image,
            "labels": manifest.label_indices(manifest.rows[i]),
            "row": int(i),
        }
        for i in order
    ]
    blocks = block_count(len(rows), cfg)
    dataset = ray.data.from_items(rows, override_num_blocks=blocks)
    return decoded_blocks(kept_seeds.join(dataset, kept, cfg.storage, blocks), cfg, skipped)


@dataclass(frozen=True)
class TrainJob:
    """One stage's training, as every Ray Train worker receives it (pickled)."""

    stage: Stage
    cfg: RunConfig
    classes: list[str]
    model_params: Params  # the network's architecture (ClassifierParams, ...)
    optim: OptimParams
    build_model: Callable[[], nn.Module]  # the network at its initial weights, on the CPU
    step_loss: StepLoss
    n_rows: int  # manifest rows: sets the length of the learning-rate schedule
    skipped: Any  # the SkippedRows actor the dataset reports to
    progress: Any  # the EpochLines actor the first worker reports each epoch to
    # Leave out each worker's last, smaller batch of an epoch: a network with batch norm on
    # pooled features (DeepLabV3's ASPP) cannot train on a batch of one.
    drop_last: bool = False
    # Where each epoch's kept seeds go (`pipelines.train.kept_seeds`): the classifier's, whose
    # CAM method may keep some (OAA); the network then has `begin_epoch` and `epoch_seeds`.
    seeds_uri: str | None = None

    @property
    def batch_per_worker(self) -> int:
        """`optim.batch_size` is the global batch: each worker takes its share (rounded up)."""
        return math.ceil(self.optim.batch_size / self.cfg.ray.train_workers)

    @property
    def steps_per_epoch(self) -> int:
        # Ray Train gives every worker the same number of rows (up to workers - 1 are dropped).
        rows_per_worker = self.n_rows // self.cfg.ray.train_workers
        if self.drop_last:
            return rows_per_worker // self.batch_per_worker
        return math.ceil(rows_per_worker / self.batch_per_worker)


def new_job(
    stage: Stage,
    cfg: RunConfig,
    classes: list[str],
    n_rows: int,
    section: Any,
    build_model: Callable[[], nn.Module],
    step_loss: StepLoss,
    drop_last: bool = False,
    seeds_uri: str | None = None,
) -> TrainJob:
    """The job of training `stage` on `n_rows` examples of `classes` with the `model` and
    `optim` of the config `section` (`cfg.classifier`, `cfg.affinity`, ...)."""
    return TrainJob(
        stage=stage,
        cfg=cfg,
        classes=classes,
        model_params=section.model,
        optim=section.optim,
        build_model=build_model,
        step_loss=step_loss,
        n_rows=n_rows,
        skipped=runtime.on_driver_node(SkippedRows).remote(),
        progress=runtime.on_driver_node(EpochLines).remote(),
        drop_last=drop_last,
        seeds_uri=seeds_uri,
    )


def run_training(
    job: TrainJob,
    dataset: ray.data.Dataset,
    log: Callable[[str], None] = print,
    image_ids: Sequence[str] = (),
) -> ModelRecord:
    """Train `job` on `dataset` (rows of training examples) with a TorchTrainer, then write
    and return the model record. Resumes from the run's last checkpoint when there is one.
    Checkpoints go under the run's `output`: on a cluster of several nodes that must be s3://
    (or a folder every node shares). With `job.seeds_uri`, the seeds kept in training are
    merged first and named in the record; `image_ids` are the training manifest's, by row."""
    cfg = job.cfg
    if job.steps_per_epoch < 1:
        needs = f"a batch of {job.batch_per_worker}" if job.drop_last else "at least one"
        raise ConfigError(
            f"{job.n_rows} images cannot be shared among ray.train_workers "
            f"{cfg.ray.train_workers}: every worker needs {needs}"
        )
    train_root = cfg.layout.checkpoints
    filesystem, path = storage.filesystem(train_root, cfg.storage)
    gpus = {"GPU": 1.0} if cfg.ray.use_gpu else {}
    trainer = ray.train.torch.TorchTrainer(
        _train_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.train_workers,
            use_gpu=cfg.ray.use_gpu,  # NCCL then, gloo otherwise
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **gpus},
        ),
        run_config=ray.train.RunConfig(
            name=job.stage,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
        ),
        datasets={"train": dataset},
    )
    log(
        f"training the {job.stage} on {cfg.ray.train_workers} worker(s), checkpoints in "
        f"{storage.join(train_root, job.stage)}"
    )
    with follow_progress(job.progress, log):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"the {job.stage} training finished without a checkpoint")
    root = "s3://" if storage.is_s3(train_root) else ""
    checkpoint_uri = root + result.checkpoint.path
    meta = json.loads(storage.read_bytes(storage.join(checkpoint_uri, META_FILE), cfg.storage))
    skipped_examples = ray.get(job.skipped.messages.remote())
    record = ModelRecord(
        stage=job.stage,
        checkpoint_uri=checkpoint_uri,
        weights_uri=storage.join(checkpoint_uri, WEIGHTS_FILE),
        weights_sha256=meta["weights_sha256"],
        classes=meta["classes"],
        backbone=meta["model"]["backbone"]["name"],
        model=meta["model"],
        epochs=meta["epoch"] + 1,
        config_hash=meta["config_hash"],
        metrics=meta["metrics"],
        skipped_examples=skipped_examples,
        created_at=meta["created_at"],
        kept_seeds_uri=None
        if job.seeds_uri is None
        else kept_seeds.merge_files(job.seeds_uri, image_ids, cfg.storage, log),
    )
    uri = cfg.layout.record(job.stage)
    write_record(record, uri, cfg)
    for message in skipped_examples:
        log(f"  skipped unreadable image {message}")
    log(f"wrote the {job.stage} model record {uri}")
    return record


# --- inside each Ray Train worker -------------------------------------------------------------


class _ThroughDDP:
    """A model as step losses use it: calls go through the DDP wrapper (so gradients are
    averaged across workers), attributes (`affinities`, `params`) come from the network."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(getattr(self._model, "module", self._model), name)


def _ddp_step_loss(step_loss: StepLoss) -> StepLoss:
    def step(model: nn.Module, batch: Batch):
        return step_loss(_ThroughDDP(model), batch)

    return step


def _train_worker(config: dict) -> None:
    job: TrainJob = config["job"]
    cfg, optim = job.cfg, job.optim
    rank = ray.train.get_context().get_world_rank()
    rank0 = rank == 0
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    model = job.build_model()
    checkpoint = ray.train.get_checkpoint()
    resumed = _read_checkpoint(checkpoint, job) if checkpoint is not None else None
    if resumed is not None:
        model.load_state_dict(resumed["weights"])
    ddp_model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(param_groups(model, optim.lr, optim.head_lr_mult), optim)
    scheduler = make_scheduler(optimizer, job.steps_per_epoch * optim.epochs, optim)
    start_epoch = 0
    if resumed is not None:
        _resume_schedule(optimizer, scheduler, resumed["train_state"])
        start_epoch = resumed["meta"]["epoch"] + 1
    shard = ray.train.get_dataset_shard("train")

    def epoch_batches(epoch: int):
        return shard.iter_torch_batches(
            batch_size=job.batch_per_worker,
            local_shuffle_buffer_size=4 * job.batch_per_worker,
            prefetch_batches=2,
            drop_last=job.drop_last,
        )

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        if job.seeds_uri is not None:  # before the checkpoint: a resumption redoes this epoch
            kept = model.epoch_seeds()
            if kept is not None:
                kept_seeds.write_epoch(job.seeds_uri, epoch, rank, kept, cfg.storage)
        metrics = _across_workers(metrics, device)
        # Every worker has exhausted the epoch's data here, so all its skips are counted.
        skipped = ray.get(job.skipped.count.remote()) if rank0 else 0
        metrics.update(
            skipped_images=float(skipped),
            workers=float(cfg.ray.train_workers),
            start_epoch=float(start_epoch),  # > 0: this attempt resumed from a checkpoint
        )
        saved = None
        if rank0:
            job.progress.add.remote(epoch_summary(job.stage, epoch, optim.epochs, metrics))
            folder = tempfile.mkdtemp(prefix=f"wsss-{job.stage}-")
            _write_checkpoint(Path(folder), job, model, optimizer, scheduler, epoch, metrics)
            saved = ray.train.Checkpoint.from_directory(folder)
        # The upload (weights and optimizer state, ~3x the model) overlaps the next epoch; Ray
        # Train deletes the local folder once it is stored and registers the checkpoint then.
        ray.train.report(
            metrics,
            checkpoint=saved,
            checkpoint_dir_name=f"epoch_{epoch:04d}",
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
        )

    fit(
        ddp_model,
        epoch_batches,
        _ddp_step_loss(job.step_loss),
        optimizer,
        scheduler,
        optim.epochs,
        device,
        start_epoch=start_epoch,
        on_epoch_end=on_epoch_end,
        on_epoch_start=model.begin_epoch if job.seeds_uri is not None else None,
    )


def _across_workers(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """One epoch's metrics over all workers: sample-weighted means of the losses, the summed
    samples, the slowest worker's seconds and the throughput they give."""
    if not (dist.is_available() and dist.is_initialized()):
        return dict(metrics)
    counters = ("steps", "samples", "seconds", "samples_per_s", "epoch")
    means = sorted(k for k in metrics if k not in counters)
    samples = metrics["samples"]
    sums = torch.tensor(
        [samples, *(metrics[k] * samples for k in means)], dtype=torch.float64, device=device
    )
    dist.all_reduce(sums)
    seconds = torch.tensor([metrics["seconds"]], dtype=torch.float64, device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    total, slowest = sums[0].item(), seconds.item()
    out = {k: sums[i + 1].item() / total for i, k in enumerate(means)}
    out.update(
        epoch=metrics["epoch"],
        steps=metrics["steps"],
        samples=total,
        seconds=slowest,
        samples_per_s=total / slowest if slowest > 0 else math.inf,
    )
    return out


def _write_checkpoint(
    folder: Path,
    job: TrainJob,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    metrics: dict[str, float],
) -> None:
    """model.pt (state dict), train_state.pt (optimizer, steps) and meta.json (the run layout:
    docs/architecture.md)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    weights = buffer.getvalue()
    (folder / WEIGHTS_FILE).write_bytes(weights)
    train_state = {"optimizer": optimizer.state_dict(), "steps": scheduler.last_epoch}
    torch.save(train_state, folder / TRAIN_STATE_FILE)
    meta = {
        "stage": job.stage,
        "epoch": epoch,
        "classes": job.classes,
        "model": job.model_params.model_dump(mode="json"),
        "config": job.cfg.model_dump(mode="json"),
        "config_hash": job.cfg.hash(),
        "metrics": metrics,
        "weights_sha256": sha256_hex(weights),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def _read_checkpoint(checkpoint: ray.train.Checkpoint, job: TrainJob) -> dict:
    """The weights, training state and meta of the checkpoint a run resumes from, after
    checking it was trained for the same network and classes."""
    with checkpoint.as_directory() as folder:
        meta = json.loads((Path(folder) / META_FILE).read_text())
        model = job.model_params.model_dump(mode="json")
        if meta["stage"] != job.stage or meta["model"] != model or meta["classes"] != job.classes:
            raise ConfigError(
                f"checkpoint {checkpoint.path} of this run name was trained for another "
                f"network or class list ({meta['stage']}, {meta['model']}, {meta['classes']}); "
                "choose a new run name to start afresh"
            )
        load = {"map_location": "cpu", "weights_only": True}
        return {
            "meta": meta,
            "weights": torch.load(Path(folder) / WEIGHTS_FILE, **load),
            "train_state": torch.load(Path(folder) / TRAIN_STATE_FILE, **load),
        }


def _resume_schedule(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_state: dict,
) -> None:
    """Restore the optimizer's moments and move the fresh scheduler to the saved step. The
    learning rates follow this run's schedule, which is longer when epochs were added."""
    optimizer.load_state_dict(train_state["optimizer"])
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = group["initial_lr"] = base_lr
    with warnings.catch_warnings():
        # Stepping a scheduler before its optimizer warns; here it only replays the schedule.
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(train_state["steps"]):
            scheduler.step()
