"""`wsss label`: a manifest's images streamed through the method (CAMs, then the configured
refiners: by default the random walk and the dense CRF) into Parquet shards.

One streaming Ray Data execution; the driver holds no rows, only the class list, the model
records and one small count record per write task:

    manifest rows (read_text / read_parquet; each row validated, a bad row becomes an error row)
      + the (image_id, row key) pairs this model version already wrote (unless --force)
    -> groupby(bucket of image_ids).map_groups: the anti-join against earlier runs and the
                                              duplicate check
    -> join(the classifier's kept seeds)      only when its CAM method kept seeds while it
                                              trained (OAA: `pipelines.train.kept_seeds`)
    -> fetch + decode                         CPU tasks (S3 fetches overlap in threads; without
                                              GPUs Ray fuses them into the model actors' calls)
    -> CAMs + the refiners that run beside    model actors (`ModelActor`), a GPU each when
       the networks (`Labeler.seed`: the walk)  ray.use_gpu
    -> the other refiners (the CRF), the final in a CPU actor pool of its own (`Finisher`) when the
       mask, PNG (`finish_row`)                 model actors have GPUs; in the model actors, after
                                              the seed part, when they run on CPUs (`crf_pool`)
    -> ShardSink: labels/ and errors/ files (layout and schema: `pipelines.shards`)

The steps without a model (rows, anti-join, fetch + decode, the sink) are in
`pipelines.label.rows`, which never imports torch; this module plans the job and holds the
model steps.

Every manifest row travels to the sink exactly once with an `outcome`: labelled, error (with the
stage, error type and message) or skipped; so input = labelled + errors + skipped by construction.

Re-runs: each manifest row has a key (`rows.row_key`: a digest of its labels, its source
version when the manifest gives one, and the settings that shape masks). An image whose image_id
already has a row of the same model version and key, in labels/ or in errors/, is skipped (an
image that failed for good stays failed until it or its row changes). One whose earlier rows have
another key (changed labels, image or settings), or whose error was transient, is labelled again
and its earlier row removed from its file after the run (`rows.supersede`; the file as it was
goes to `<out>/superseded/<run_id>/`), so the shards keep one row per image. `--force` first
moves this model version's files to `<out>/superseded/<run_id>/` and labels everything again.
Several manifest rows with one image_id give one error row (DuplicateImageId) and are otherwise
skipped.

Killed runs: a shard is written whole or not at all (local files are written under a `.tmp`
name and renamed; an S3 object appears only when its upload completes), so a run started again
skips exactly the images in finished shards and labels the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import posixpath
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import ray

from pipelines import lease, runtime, shards, storage
from pipelines.config import ConfigError, RunConfig
from pipelines.inputs import manifest_classes, manifest_dataset
from pipelines.label import rows as label_rows
from pipelines.model_record import ModelRecord, load_network, read_record, record_uris
from pipelines.storage import StorageConfig
from pipelines.train import kept_seeds
from wsss import labeling
from wsss.cam import image_cams
from wsss.imageio import encode_mask
from wsss.kept_seeds import decode
from wsss.training import default_device

# Test hook: a labeling actor that meets this image_id kills its own process, as an image that
# exhausts memory or crashes native code would (tests/test_label.py). Unset outside the tests.
_DIES_ON = os.environ.get("WSSS_TEST_WORKER_DIES_ON")


class WorkerDied(RuntimeError):
    """A row's labeling killed the process labeling it (out of memory, a native crash) every
    time it was tried."""


@ray.remote(num_cpus=0)
class DeathJournal:
    """Which rows the labeling actors began and ended. Ray restarts an actor whose process died
    and retries its batch; a row begun again while earlier attempts never ended is the one that
    killed them, and after `label.worker_deaths_per_row` such deaths it becomes an error row
    (`WorkerDied`) instead of killing the next actor too."""

    def __init__(self) -> None:
        self.begun: Counter = Counter()
        self.ended: Counter = Counter()

    def begin(self, image_id: str) -> int:
        """Record an attempt at `image_id`; how many earlier attempts died on it."""
        self.begun[image_id] += 1
        return self.begun[image_id] - 1 - self.ended[image_id]

    def end(self, image_id: str) -> None:
        self.ended[image_id] += 1
        if self.ended[image_id] >= self.begun[image_id]:  # keep only rows in flight or deadly
            del self.begun[image_id], self.ended[image_id]


class RowGuard:
    """Runs each row of a labeling actor through the `DeathJournal` (see there)."""

    def __init__(self, journal, deaths_per_row: int, stage: str) -> None:
        self.journal = journal
        self.deaths_per_row = deaths_per_row
        self.stage = stage

    def run(self, row: dict, label: Callable[[], Any]) -> Any:
        """`label()` for `row`, unless earlier attempts at it died too often: then the row is
        failed (WorkerDied) and None returned."""
        image_id = row["image_id"]
        deaths = ray.get(self.journal.begin.remote(image_id))
        try:
            if deaths >= self.deaths_per_row:
                label_rows.fail(row, self.stage, WorkerDied(f"its worker died {deaths} times"))
                return None
            if image_id == _DIES_ON:
                os._exit(70)
            return label()
        finally:
            self.journal.end.remote(image_id)

    def finish(
        self, row: dict, part: Callable[[], labeling.Partial | None], labeler, cfg: RunConfig
    ) -> dict:
        """`finish_row` of `row` with the seed part `part()`, guarded: the row as the sink takes
        it, failed (WorkerDied) when its attempts died too often."""
        finished = self.run(row, lambda: finish_row(row, part(), labeler, cfg))
        return finished or label_rows.finished_row(row, cfg.stages)


class ModelActor:
    """Ray Data actor: the CAMs and the refiners that run beside the networks
    (`wsss.labeling.Labeler.seed`) of decoded rows, and with `finish` the rest too
    (`finish_row`). Each actor loads the networks once, onto the GPU Ray gave it if any, from
    the model records the driver read (not from the records' URIs: a record replaced mid-run
    must not give actors another model under the run's version; changed weights fail the
    sha256 check). A seed part handed on travels pickled: it is an intermediate of this
    job, never stored."""

    def __init__(
        self,
        cfg: RunConfig,
        records: dict[str, ModelRecord],
        classes: list[str],
        finish: bool,
        journal,
    ) -> None:
        device = default_device()
        self.cfg = cfg
        self.finish = finish
        networks = {name: load_network(r, cfg, name).to(device) for name, r in records.items()}
        self.classifier = networks.get("classifier")
        self.labeler = cfg.labeler(networks)
        self.index = {name: i for i, name in enumerate(classes)}
        stages = cfg.stages if finish else self.labeler.stages[: self.labeler.split + 1]
        self.guard = RowGuard(journal, cfg.label.worker_deaths_per_row, "+".join(stages))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        if self.finish:
            final = [
                self.guard.finish(row, lambda row=row: self._seed(row), self.labeler, self.cfg)
                for row in rows
            ]
            return pa.Table.from_pylist(final, schema=label_rows.finished_schema(self.cfg.stages))
        seeded = [self.guard.run(row, lambda row=row: self._seed(row)) for row in rows]
        for row, part in zip(rows, seeded, strict=True):
            row["seeded"] = None if part is None else pickle.dumps(part, pickle.HIGHEST_PROTOCOL)
            row[kept_seeds.SEEDS] = None  # used: the CRF pool needs only the seed part
        return pa.Table.from_pylist(rows, schema=label_rows.SEEDED_SCHEMA)

    def _seed(self, row: dict) -> labeling.Partial | None:
        """The row's seed part, or None when it failed before or fails here (then marked so)."""
        if row["outcome"] != label_rows.OK:
            return None
        image, labels = label_rows.row_image(row), [self.index[name] for name in row["labels"]]
        try:
            cams = None
            if row.get(kept_seeds.SEEDS) is not None:  # the classifier's, kept while training
                seeds = decode(row[kept_seeds.SEEDS])
                cams = image_cams(self.classifier, image, labels, self.cfg.cam, seeds)
            return self.labeler.seed(image, labels, cams)
        except labeling.StageError as exc:  # e.g. out of memory: the image fails, not the job
            label_rows.fail(row, exc.stage, exc.__cause__)
            return None


def finish_row(
    row: dict, part: labeling.Partial | None, labeler: labeling.Labeler, cfg: RunConfig
) -> dict:
    """A decoded row and its seed part -> the final row: the remaining refiners, the final mask
    and confidence (`wsss.labeling.Labeler.finish`), masks PNG-encoded; every stage's mask too
    with label.keep_stages."""
    stages = cfg.stages
    final = label_rows.finished_row(row, stages)
    if row["outcome"] != label_rows.OK:
        return final
    try:
        labelled = labeler.finish(label_rows.row_image(row), part)
    except labeling.StageError as exc:  # the image fails, not the job
        label_rows.fail(final, exc.stage, exc.__cause__)
        return final
    final.update(
        mask=encode_mask(labelled.mask),
        confidence=labelled.confidence,
        ignore_fraction=labelled.ignore_fraction,
    )
    if cfg.label.keep_stages:
        for stage, column in shards.stage_columns(stages).items():
            if column != shards.FINAL_COLUMN:
                final[column] = encode_mask(labelled.masks[stage])
    return final


class Finisher:
    """Ray Data actor of the CRF pool: `finish_row` of each seeded row (the seed part pickled).
    A pool rather than tasks, because a task stage would be fused into the write, which gathers
    label.min_rows_per_file rows per task: the CRF of a whole file would then run in one task,
    after its last walk."""

    def __init__(self, cfg: RunConfig, journal) -> None:
        self.cfg = cfg
        # The refiners after the seed part need no network (all of today's run on CPUs alone).
        self.labeler = cfg.labeler({})
        stages = self.labeler.stages[self.labeler.split + 1 :] or ("pseudo_label",)
        self.guard = RowGuard(journal, cfg.label.worker_deaths_per_row, "+".join(stages))

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = [
            self.guard.finish(
                row, lambda row=row: _unpickled(row["seeded"]), self.labeler, self.cfg
            )
            for row in batch.to_pylist()
        ]
        return pa.Table.from_pylist(out, schema=label_rows.finished_schema(self.cfg.stages))


def _unpickled(seeded: bytes | None) -> labeling.Partial | None:
    return None if seeded is None else pickle.loads(seeded)


def crf_pool(cfg: RunConfig) -> bool:
    """Whether the CRF runs in a CPU actor pool of its own (label.crf_pool; by default when the
    model actors have GPUs). A pool keeps GPU actors from waiting on the CPU's CRF; without
    GPUs the model actors are CPU processes already, and finishing each image where it was
    walked spares handing it over and the extra processes sharing the cores (docs/benchmarks.md)."""
    return cfg.ray.use_gpu if cfg.label.crf_pool is None else cfg.label.crf_pool


# --- the job ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Models:
    """The trained networks a labeling of a configuration uses: each one's model record URI and
    record by network name, and the model version they make (what the shards are keyed by)."""

    uris: dict[str, str]
    records: dict[str, ModelRecord]
    version: str
    classes: list[str]  # the manifest's, which every record knows


def models(cfg: RunConfig, records: dict[str, str | None] | None = None) -> Models:
    """The networks `cfg`'s method needs (`RunConfig.networks`), from the model records in
    `records` by network name (default: this run's); a ConfigError when one is missing, is for
    another network or knows other classes than the manifest's."""
    uris = record_uris(cfg, records)
    read = _read_records(cfg, uris)
    classes = manifest_classes(cfg)
    for name, record in read.items():
        if record.classes != classes:
            raise ConfigError(
                f"the {name} of {uris[name]} knows the classes {record.classes}, the manifest "
                f"{cfg.dataset.manifest} has {classes}"
            )
    return Models(uris, read, model_version(read), classes)


def model_version(records: dict[str, ModelRecord]) -> str:
    """Content hash of the checkpoints a labeling uses (the seed stage's network first)."""
    digest = hashlib.sha256(":".join(r.weights_sha256 for r in records.values()).encode())
    return digest.hexdigest()[:16]


def _read_records(cfg: RunConfig, uris: dict[str, str]) -> dict[str, ModelRecord]:
    """The model record of each stage at `uris`; a ConfigError says which one is missing or
    is for another stage."""
    records = {}
    for stage, uri in uris.items():
        try:
            records[stage] = read_record(uri, cfg)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"the {stage} model record: {exc}; train it first or pass --{stage} URI"
            ) from None
        if records[stage].stage != stage:
            raise ConfigError(f"model record {uri} is for the {records[stage].stage}, not {stage}")
    return records


def check_cluster(cfg: RunConfig) -> None:
    """Raise InsufficientResourcesError unless the cluster can host the model actors and the
    CPU tasks beside them (`label.cpus_per_task`)."""
    cpus = cfg.label.cpus_per_task
    phase = runtime.model_actors(cfg, cpus, f"label.cpus_per_task {cpus:g}")
    runtime.check_resources(cfg, "labeling", [phase])


def retire(out_uri: str, config: StorageConfig, version: str, run_id: str) -> int:
    """Move this model version's shards out of labels/ and errors/ into
    `superseded/<run_id>/` (for --force); returns how many files moved."""
    fs, root = storage.filesystem(out_uri, config)
    moved = 0
    for kind in (shards.LABELS, shards.ERRORS):
        target = posixpath.join(root, shards.SUPERSEDED_DIR, run_id, kind)
        for path in shards.shard_files(out_uri, kind, config, version):
            fs.create_dir(target, recursive=True)
            fs.move(path, posixpath.join(target, posixpath.basename(path)))
            moved += 1
    return moved


def stage_times(ds: ray.data.Dataset) -> dict[str, dict[str, float]]:
    """Per Ray Data operator of an executed dataset: its wall time and the summed time of its
    tasks, in seconds (from `Dataset.get_stats_summary`, what `Dataset.stats()` prints)."""
    stages: dict[str, dict[str, float]] = {}

    def visit(summary) -> None:
        for parent in summary.parents:
            visit(parent)
        for op in summary.operators_stats:
            stages[op.operator_name] = {
                "wall_s": round(op.time_total_s, 3),
                "task_s": round(op.wall_time.sum, 3) if op.wall_time else 0.0,
            }

    visit(ds.get_stats_summary())
    return stages


def planned_rows(
    cfg: RunConfig,
    classes: list[str],
    version: str | None,
    out_uri: str,
    kept: str | None = None,
) -> ray.data.Dataset:
    """The labeling's plan: every manifest row with its outcome before any image is fetched
    (`label_rows.OK` to label, else an error or skipped), resolved against the rows model
    `version` already wrote under `out_uri` (none when `version` is None) by the anti-join
    (`label_rows.resolve_bucket`); with the seeds the classifier kept while training (`kept`,
    the merged file: `pipelines.train.kept_seeds`) joined to them when given."""
    rows, partitions = manifest_dataset(cfg, classes)
    done = None if version is None else label_rows.done_markers(out_uri, cfg.storage, version)
    if done is not None:
        rows = rows.union(done)
    planned = (
        rows.map_batches(
            label_rows.with_bucket,
            fn_kwargs={"buckets": partitions * label_rows.BUCKETS_PER_PARTITION},
            batch_format="pyarrow",
        )
        .groupby(label_rows.BUCKET, num_partitions=partitions)
        .map_groups(label_rows.resolve_bucket, batch_format="pyarrow")
    )
    return kept_seeds.join(planned, kept, cfg.storage, partitions)


def labelled_dataset(
    cfg: RunConfig,
    classes: list[str],
    records: dict[str, ModelRecord],
    version: str | None,
    out_uri: str,
) -> ray.data.Dataset:
    """The whole plan, from the manifest to final rows (nothing runs until it is written).
    With `version`, image_ids that version already wrote under `out_uri` are skipped."""
    r = cfg.ray
    task = {"num_cpus": cfg.label.cpus_per_task, "batch_format": "pyarrow"}
    # Ray Data restarts a dead actor and retries its batch without bound (a bound is settable
    # only through its deprecated ray_remote_args): the journal ends that loop, turning a row
    # that keeps killing its worker into an error row.
    journal = runtime.on_driver_node(DeathJournal).remote()
    pool = crf_pool(cfg)
    seeds = records[cfg.seed_network]
    labelled = (
        planned_rows(cfg, classes, version, out_uri, seeds.kept_seeds_uri)
        # A partition leaves the anti-join as one block: split it so the stages after share it.
        .repartition(target_num_rows_per_block=r.rows_per_block)
        .map_batches(
            label_rows.fetch_and_decode,
            fn_kwargs={
                "config": cfg.storage,
                "max_pixels": cfg.dataset.max_pixels,
                "max_bytes": cfg.dataset.max_bytes,
            },
            batch_size=r.rows_per_block,
            **task,
        )
        .map_batches(
            ModelActor,
            fn_constructor_kwargs={
                "cfg": cfg,
                "records": records,
                "classes": classes,
                "finish": not pool,
                "journal": journal,
            },
            compute=ray.data.ActorPoolStrategy(size=r.model_actors),
            num_cpus=r.cpus_per_actor,
            num_gpus=r.gpus_per_actor if r.use_gpu else 0,
            batch_size=cfg.label.batch_size,
            batch_format="pyarrow",
        )
    )
    if not pool:
        return labelled
    return labelled.map_batches(
        Finisher,
        fn_constructor_kwargs={"cfg": cfg, "journal": journal},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.label.crf_workers),
        batch_size=cfg.label.batch_size,
        # Ray Data spreads actors over every node (its SPREAD default), GPU nodes included; Ray's
        # own policy keeps CPU-only actors off GPU nodes while a node without GPUs has room, so
        # the CRF runs on the cpu group as cluster/kuberay/raycluster.yaml intends.
        scheduling_strategy="DEFAULT",
        **task,
    )


def run(
    cfg: RunConfig,
    *,
    input_uri: str | None = None,
    out_uri: str | None = None,
    force: bool = False,
    keep_stages: bool = False,
    records: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Label the manifest (`input_uri`, default dataset.manifest) into `out_uri` (default
    label.out, else the run folder) with the networks the method needs (`RunConfig.networks`)
    from the model records in `records` by network name (default: this run's). Returns the run
    summary, also written to `<out>/label_runs/<run_id>.json` and `<out>/label_summary.json`."""
    cfg = cfg.for_labeling(input_uri, out_uri, keep_stages)
    out = cfg.layout.labels
    networks = models(cfg, records)
    runtime.connect(cfg)
    check_cluster(cfg)

    started_at = datetime.now(UTC)
    run_id = shards.new_run_id(started_at)
    # One run at a time per output: a second one would plan against the same finished shards
    # and label every pending image again.
    with lease.leased(
        out,
        cfg.storage,
        run_id,
        "wsss label",
        cfg.label.lease_timeout_s,
        cfg.label.lease_wait_s,
        log,
    ) as held:
        summary = _label(cfg, networks, out, run_id, force, log)
        summary |= {
            "started_at": started_at.isoformat(timespec="seconds"),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "lease_lost": held.lost,
        }
        return _write_summary(summary, out, cfg, log)


def _label(
    cfg: RunConfig, networks: Models, out: str, run_id: str, force: bool, log: Callable[[str], None]
) -> dict:
    """The labeling itself, under the output's lease: its counts and times."""
    version = networks.version
    retired = retire(out, cfg.storage, version, run_id) if force else 0
    if retired:
        log(f"--force: moved {retired} earlier shard file(s) to {out}/superseded/{run_id}/")
    log(f"labeling {cfg.dataset.manifest} into {out} (model version {version}, run {run_id})")
    # Files from before: rows this run writes anew (a changed key, a transient error retried)
    # are removed from them after it.
    earlier = (
        []
        if force
        else [
            *shards.shard_files(out, shards.LABELS, cfg.storage, version),
            *shards.shard_files(out, shards.ERRORS, cfg.storage, version),
        ]
    )
    ds = labelled_dataset(cfg, networks.classes, networks.records, None if force else version, out)
    sink = label_rows.ShardSink(
        out,
        cfg.storage,
        networks.classes,
        cfg.stages,
        run_id,
        version,
        cfg.hash(),
        cfg.label.min_rows_per_file,
    )
    started = time.perf_counter()
    ds.write_datasink(sink, ray_remote_args={"num_cpus": cfg.label.cpus_per_task})
    seconds = time.perf_counter() - started
    assert sink.counts is not None  # set by on_write_complete
    counts = sink.counts
    superseded = label_rows.supersede(out, cfg.storage, earlier, run_id, sink.replaced)
    if superseded:
        log(
            f"{superseded} earlier row(s) replaced (changed image, labels or settings, or a "
            f"transient error retried): moved to {out}/{shards.SUPERSEDED_DIR}/{run_id}/"
        )
    if counts["transient_errors"]:
        log(
            f"{counts['transient_errors']} error(s) are transient (network, throttling, 5xx): "
            "the next run retries them"
        )
    processed = counts["labelled"] + counts["errors"]
    return {
        "run_id": run_id,
        "input": processed + counts["skipped"],
        **counts,
        "seconds": round(seconds, 2),
        "images_per_s": round(processed / seconds, 3) if seconds > 0 else None,
        "stages": stage_times(ds),
        "model_version": version,
        "config_hash": cfg.hash(),
        "manifest": cfg.dataset.manifest,
        "out": out,
        "method_stages": list(cfg.stages),
        "records": networks.uris,
        "force": force,
        "retired_files": retired,
        "superseded_rows": superseded,
        "keep_stages": cfg.label.keep_stages,
        "crf_pool": crf_pool(cfg),
    }


def _write_summary(summary: dict, out: str, cfg: RunConfig, log: Callable[[str], None]) -> dict:
    """Write the run summary to `<out>/label_runs/<run_id>.json` and `<out>/label_summary.json`."""
    text = json.dumps(summary, indent=2).encode()
    per_run = storage.join(out, shards.RUNS_DIR, f"{summary['run_id']}.json")
    storage.write_bytes(per_run, text, cfg.storage)
    storage.write_bytes(storage.join(out, shards.SUMMARY_FILE), text, cfg.storage)
    log(
        f"input {summary['input']}: labelled {summary['labelled']}, errors {summary['errors']}, "
        f"skipped {summary['skipped']} ({summary['images_per_s']} images/s); summary {per_run}"
    )
    return summary
