"""`wsss relabel`, the nightly job: label only the images that are new or changed since the
last run, or that the current models have not labelled yet.

Each run compares the manifest with a ledger of what earlier runs labelled, keyed by
(image_id, source version, model version, row key), where the source version is the image
object's ETag on S3 (it changes with the content) and its size and modification time for a local
file, and the row key (`pipelines.label.rows.row_key`) a digest of the image's labels, its source
version and the settings that shape masks: changed labels or settings relabel the rows they
affect. The rows not in the ledger become the night's manifest (with their source versions, so
that an image changed twice on one night is labelled again in the same dated set, its first row
superseded), which `wsss label` labels into a dated shard set; once it has finished they are
added to the ledger. So running twice on one night does
nothing the second time, and a run that died is simply run again (labeling resumes inside the
dated set).

Source versions come from one HEAD request per manifest image, or, with `--listing PREFIX`,
from a listing of the folder or S3 prefix the images live in: one request per 1000 objects
instead of one per image, which is what a nightly job over millions of images wants. The listing
also tells which image objects have arrived without a manifest row: they have no image-level
labels, so they are counted and named in the run record, not labelled. With `--inventory
MANIFEST_JSON` beside an S3 `--listing`, the listing is read from that S3 Inventory report instead
(a few large reads however many objects; `pipelines.relabel.inventory`); a report is as of its
date, so an image it lacks is asked for its version rather than called missing, and an image
replaced after the report is relabelled once a report shows it. Manifest rows that fail
the manifest check become error rows of the night's shard set, keyed in the ledger by a digest of
their problem, so each is recorded once (and again only when it changes): the run record counts
input = labelled + errors + skipped, as `wsss label` does.

One relabel runs per output at a time: it holds the lease of `<out>/relabel/` (`pipelines.lease`).

Layout under `<out>/relabel/`:
    <date>/manifest.parquet, <date>/classes.txt   the night's new or changed images
    <date>/labels/, <date>/errors/, ...           the dated shard set (`wsss label` output)
    ledger/<run_id>.parquet                       (image_id, source_version, model_version,
                                                   row_key)
    listings/<run_id>.parquet                     (image, source_version), with --listing
    runs/<run_id>.json                            the run record
Downstream readers take every dated set; where an image_id appears in several, the latest date
holds its current label.

The comparison is a Ray Data left-anti join: neither the manifest nor the ledger is collected on
the driver, which only streams the night's (small) delta into its manifest file.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipelines import lease, manifests, shards, storage
from pipelines.config import ConfigError, RunConfig
from pipelines.inputs import manifest_dataset
from pipelines.label import job as label
from pipelines.label import rows as label_rows
from pipelines.relabel import inventory as relabel_inventory
from pipelines.relabel import rows as relabel_rows
from pipelines.runtime import connect
from pipelines.storage import StorageConfig

LEDGER = "ledger"
PENDING = "pending"  # ledger files of runs still labeling
RUNS = "runs"
LISTINGS = "listings"
LISTING_SAMPLE = 64  # manifest images sampled per S3 listing range: ranges of about equal size


def ledger_files(root: str, config: StorageConfig) -> list[str]:
    fs, folder = storage.filesystem(storage.join(root, LEDGER), config)
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(
        i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
    )


def manifest_rows(cfg: RunConfig, classes: list[str]) -> tuple[ray.data.Dataset, int]:
    """Every manifest row (an invalid one an error row), read once and kept in the object store
    (spilled to disk if large) for the plan's several passes, and the join partitions it needs."""
    rows, partitions = manifest_dataset(cfg, classes)
    return rows.materialize(), partitions


def _not_in_ledger(
    rows: ray.data.Dataset, root: str, cfg: RunConfig, partitions: int
) -> ray.data.Dataset:
    """`rows` whose (image_id, source_version, model_version, row_key) the ledger does not hold;
    ledger files from before row keys match on the first three alone (an upgrade relabels
    nothing by itself)."""
    fs, _ = storage.filesystem(root, cfg.storage)
    files = ledger_files(root, cfg.storage)
    keyed = [f for f in files if "row_key" in pq.read_schema(f, filesystem=fs).names]
    legacy = [f for f in files if f not in keyed]
    for done, key in (
        (keyed, relabel_rows.LEDGER_SCHEMA.names),
        (legacy, relabel_rows.LEGACY_LEDGER_KEY),
    ):
        if done:
            ledger = ray.data.read_parquet(done, filesystem=fs, columns=list(key))
            rows = rows.join(ledger, "left_anti", num_partitions=partitions, on=tuple(key))
    return rows


def read_listing(listing: str, cfg: RunConfig) -> ray.data.Dataset:
    fs, path = storage.filesystem(listing, cfg.storage)
    return ray.data.read_parquet(path, filesystem=fs, schema=relabel_rows.LISTING_SCHEMA)


def pending_rows(
    cfg: RunConfig,
    rows: ray.data.Dataset,
    partitions: int,
    root: str,
    version: str,
    listing: str | None = None,
    listed: str | None = None,
) -> ray.data.Dataset:
    """The valid manifest `rows` whose (image_id, source version) the ledger has not seen
    labelled by model `version`; source versions from the `listing` file of the folder `listed`
    if given."""
    current = rows.map_batches(relabel_rows.valid_rows, batch_format="pyarrow")
    if listing is not None:
        listed_rows = read_listing(listing, cfg)
        current = current.join(listed_rows, "left_outer", num_partitions=partitions, on=("image",))
    current = current.map_batches(
        relabel_rows.with_source_versions,
        fn_kwargs={
            "config": cfg.storage,
            "version": version,
            "mask_settings": cfg.mask_settings(),
            "listed": listed,
        },
        batch_format="pyarrow",
    )
    return _not_in_ledger(current, root, cfg, partitions)


def new_invalid_rows(
    cfg: RunConfig, rows: ray.data.Dataset, partitions: int, root: str, version: str
) -> ray.data.Dataset:
    """The invalid manifest `rows` (`relabel_rows.invalid_rows`) that no earlier run recorded
    as they are."""
    invalid = rows.map_batches(
        relabel_rows.invalid_rows, fn_kwargs={"version": version}, batch_format="pyarrow"
    )
    return _not_in_ledger(invalid, root, cfg, partitions)


def objects_without_rows(
    cfg: RunConfig, rows: ray.data.Dataset, partitions: int, listing: str
) -> ray.data.Dataset:
    """The listed image objects that no valid manifest row names: images without image-level
    labels, which cannot be labelled."""
    return read_listing(listing, cfg).join(
        _named_images(rows), "left_anti", num_partitions=partitions, on=("image",)
    )


def _named_images(rows: ray.data.Dataset) -> ray.data.Dataset:
    """The images the valid manifest `rows` name, {"image"}."""
    valid = rows.map_batches(relabel_rows.valid_rows, batch_format="pyarrow")
    return valid.select_columns(["image"])


def _listing_cuts(rows: ray.data.Dataset) -> list[str]:
    """Where an S3 listing's key ranges start (`relabel_rows.list_versions`): at a sample of the
    images the manifest `rows` name, LISTING_SAMPLE per range, so that the ranges hold about as
    many objects each."""
    ranges = relabel_rows.LISTING_THREADS
    fraction = min(1.0, LISTING_SAMPLE * ranges / max(rows.count(), 1))
    sample = _named_images(rows).random_sample(fraction, seed=0).take_all()
    return relabel_rows.listing_boundaries([row["image"] for row in sample], ranges)


def record_invalid(
    invalid: ray.data.Dataset, night: str, cfg: RunConfig, run_id: str, networks: label.Models
) -> int:
    """Write the invalid manifest rows into the night's errors/ (stage "manifest", as `wsss
    label` records them); returns how many."""
    sink = label_rows.ShardSink(
        night,
        cfg.storage,
        networks.classes,
        cfg.stages,
        run_id,
        networks.version,
        cfg.hash(),
        cfg.label.min_rows_per_file,
    )
    invalid.map_batches(
        label_rows.finished_rows, fn_kwargs={"stages": cfg.stages}, batch_format="pyarrow"
    ).write_datasink(sink)
    assert sink.counts is not None  # set by on_write_complete
    return sink.counts["errors"]


def _write_parquet(uri: str, schema: pa.Schema, batches, config: StorageConfig) -> None:
    """Stream `batches` (pyarrow tables) into one Parquet file at `uri`."""
    fs, path = storage.filesystem(uri, config)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f, pq.ParquetWriter(f, schema) as writer:
        for batch in batches:
            writer.write_table(batch.select(schema.names).cast(schema))


def run(
    cfg: RunConfig,
    *,
    input_uri: str | None = None,
    out_uri: str | None = None,
    date: str | None = None,
    listing: str | None = None,
    inventory: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Label the new or changed images of the manifest (`input_uri`, default dataset.manifest)
    into the dated shard set `<out>/relabel/<date>/` (date: today, UTC), taking the images'
    versions from a listing of the folder or S3 prefix `listing` when given, read from the S3
    Inventory report whose manifest.json is `inventory` when that is given too. Returns the run
    record, also written to `<out>/relabel/runs/<run_id>.json`."""
    if inventory is not None and (listing is None or not storage.is_s3(listing)):
        raise ConfigError(
            f"--inventory {inventory} needs --listing with the S3 prefix whose images it lists"
        )
    cfg = cfg.for_labeling(input_uri, out_uri)
    root = cfg.layout.relabel
    started = datetime.now(UTC)
    run_id = shards.new_run_id(started)
    networks = label.models(cfg)
    connect(cfg)
    # One relabel at a time per output (a cron overlap, a manual run beside the nightly one):
    # both would plan against the same ledger and label the same images twice.
    with lease.leased(
        root,
        cfg.storage,
        run_id,
        "wsss relabel",
        cfg.label.lease_timeout_s,
        cfg.label.lease_wait_s,
        log,
    ):
        date = date or f"{started:%Y-%m-%d}"
        return _relabel(cfg, root, date, started, run_id, networks, listing, inventory, log)


def _list_objects(
    cfg: RunConfig,
    rows: ray.data.Dataset,
    partitions: int,
    listed: str,
    listing_file: str,
    inventory: str | None,
    log: Callable[[str], None],
) -> dict:
    """List the image objects under `listed` with their versions into `listing_file` (from the
    S3 Inventory report `inventory` when given); the run record's fields on the objects
    without a manifest row."""
    if inventory is not None:
        inventory = relabel_inventory.inventory_manifest(inventory, cfg.storage)
        log(f"reading the listing of {listed} from the S3 Inventory report {inventory}")
        objects = relabel_inventory.inventory_versions(inventory, listed, cfg.storage)
    else:
        boundaries = _listing_cuts(rows) if storage.is_s3(listed) else []
        objects = relabel_rows.list_versions(listed, cfg.storage, boundaries)
    _write_parquet(listing_file, relabel_rows.LISTING_SCHEMA, objects, cfg.storage)
    unnamed = objects_without_rows(cfg, rows, partitions, listing_file).materialize()
    examples = [row["image"] for row in unnamed.take(5)]
    if examples:
        log(
            f"{unnamed.count()} image object(s) under {listed} have no manifest row (no "
            f"image-level labels), e.g. {examples[0]}: not labelled"
        )
    return {
        "listing": listed,
        **({"inventory": inventory} if inventory is not None else {}),
        "objects_without_manifest_row": unnamed.count(),
        "objects_without_manifest_row_examples": examples,
    }


def _label_night(
    cfg: RunConfig,
    delta: ray.data.Dataset,
    night: str,
    night_manifest: str,
    log: Callable[[str], None],
) -> dict:
    """Label the new or changed rows `delta` into the dated shard set `night`, through a night
    manifest (`night_manifest`, its class list beside it); `wsss label`'s summary."""
    classes_txt = storage.read_bytes(manifests.classes_uri(cfg.dataset.manifest), cfg.storage)
    storage.write_bytes(manifests.classes_uri(night_manifest), classes_txt, cfg.storage)
    batches = delta.iter_batches(batch_format="pyarrow", batch_size=4096)
    _write_parquet(night_manifest, relabel_rows.NIGHT_SCHEMA, batches, cfg.storage)
    log(f"{delta.count()} new or changed image(s): labeling them into {night}")
    return label.run(cfg, input_uri=night_manifest, out_uri=night, log=log)


def _without_transient_errors(
    delta: ray.data.Dataset, night: str, cfg: RunConfig, summary: dict, partitions: int
) -> ray.data.Dataset:
    """The night's `delta` less the images its labeling run (`summary`) failed transiently:
    those stay out of the ledger, so the next relabel tries them again."""
    if not summary["transient_errors"]:
        return delta
    files = [
        path
        for path in shards.shard_files(night, shards.ERRORS, cfg.storage, summary["model_version"])
        if f"_{summary['run_id']}_" in posixpath.basename(path)
    ]
    fs, _ = storage.filesystem(night, cfg.storage)
    errors = ray.data.read_parquet(files, filesystem=fs, columns=["image_id", "transient"])
    retry = errors.map_batches(relabel_rows.transient_rows, batch_format="pyarrow")
    return delta.join(retry, "left_anti", num_partitions=partitions, on=("image_id",))


@dataclass(frozen=True)
class NightPlan:
    """What a relabel has to do, before it labels anything (`plan`)."""

    total: int  # manifest rows
    delta: ray.data.Dataset  # the new or changed valid rows, keyed as the ledger keys them
    new: int
    invalid: ray.data.Dataset  # invalid rows no earlier run recorded as they are
    n_invalid: int
    partitions: int  # of the joins
    listing: dict  # the run record's fields on the listing (`_list_objects`); empty without


def plan(
    cfg: RunConfig,
    root: str,
    run_id: str,
    version: str,
    classes: list[str],
    listing: str | None,
    log: Callable[[str], None],
    inventory: str | None = None,
) -> NightPlan:
    """Compare the manifest (with the versions of a listing of the folder or S3 prefix
    `listing`, when given, read from the S3 Inventory report `inventory` if that is given too)
    with the ledger under `root` for model `version`."""
    rows, partitions = manifest_rows(cfg, classes)
    listing_file = listed = None
    fields: dict = {}
    if listing is not None:
        listed = relabel_rows.listing_folder(listing)
        listing_file = storage.join(root, LISTINGS, f"{run_id}.parquet")
        fields = _list_objects(cfg, rows, partitions, listed, listing_file, inventory, log)
    # A listing says an object it lacks is missing; a report is as of its date (daily or
    # weekly): an image it lacks may have come since, and is asked for its version instead.
    covered = listed if inventory is None else None
    # Computed once, kept in the object store (spilled to disk if large), streamed twice.
    delta = pending_rows(cfg, rows, partitions, root, version, listing_file, covered).materialize()
    invalid = new_invalid_rows(cfg, rows, partitions, root, version).materialize()
    return NightPlan(
        rows.count(), delta, delta.count(), invalid, invalid.count(), partitions, fields
    )


def _relabel(
    cfg: RunConfig,
    root: str,
    date: str,
    started: datetime,
    run_id: str,
    networks: label.Models,
    listing: str | None,
    inventory: str | None,
    log: Callable[[str], None],
) -> dict:
    """The relabel itself (see `run`), under the lease of its root."""
    version = networks.version
    night = storage.join(root, date)
    night_manifest = storage.join(night, f"manifest-{run_id}.parquet")
    pending_ledger = storage.join(root, LEDGER, PENDING, f"{run_id}.parquet")
    record: dict = {
        "run_id": run_id,
        "date": date,
        "manifest": cfg.dataset.manifest,
        "model_version": version,
        "started_at": started.isoformat(timespec="seconds"),
    }
    night_plan = plan(cfg, root, run_id, version, networks.classes, listing, log, inventory)
    delta, invalid = night_plan.delta, night_plan.invalid
    new, n_invalid, total = night_plan.new, night_plan.n_invalid, night_plan.total
    # input = labelled + errors + skipped, as `wsss label` counts: rows the ledger already
    # holds are skipped, invalid rows are errors (once, until they change).
    counts = {"labelled": 0, "errors": 0, "skipped": total - new - n_invalid}
    record |= night_plan.listing
    record.update(input=total, new_or_changed=new, invalid_manifest_rows=n_invalid, shards=night)
    done = [invalid]
    if n_invalid:
        counts["errors"] += record_invalid(invalid, night, cfg, run_id, networks)
        log(f"{n_invalid} invalid manifest row(s): recorded as errors in {night}")
    if new:
        summary = _label_night(cfg, delta, night, night_manifest, log)
        counts = {k: counts[k] + summary[k] for k in counts}
        record["seconds"] = summary["seconds"]
        done.append(_without_transient_errors(delta, night, cfg, summary, night_plan.partitions))
    elif not n_invalid:
        log("nothing new or changed since the last run: nothing to label")
    if new or n_invalid:
        # Labelled or recorded for good: from now on the ledger knows them (written aside
        # first, then moved in, so a reader never sees half a ledger file).
        batches = (b for part in done for b in part.iter_batches(batch_format="pyarrow"))
        _write_parquet(pending_ledger, relabel_rows.LEDGER_SCHEMA, batches, cfg.storage)
        fs, path = storage.filesystem(pending_ledger, cfg.storage)
        fs.move(
            path, posixpath.join(posixpath.dirname(posixpath.dirname(path)), f"{run_id}.parquet")
        )
    record.update(counts)
    record["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    storage.write_bytes(
        storage.join(root, RUNS, f"{run_id}.json"),
        json.dumps(record, indent=2).encode(),
        cfg.storage,
    )
    return record
