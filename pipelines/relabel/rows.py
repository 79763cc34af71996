"""The rows of `wsss relabel` and its Ray Data steps: the ledger's and the listing's schemas,
the images' source versions (a HEAD request, a stat, or a listing page) and the steps that key
manifest rows for the ledger.

Nothing here imports torch, directly or through what it imports (`tests/test_label.py`
checks): Ray's task workers import the module of each step they run, and would otherwise load
torch (several seconds and ~600 MB each) to join a manifest with a ledger. The job itself is
`pipelines.relabel.job`.
"""

from __future__ import annotations

import os
import posixpath
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from botocore.exceptions import BotoCoreError, ClientError

from pipelines import storage
from pipelines.label import rows as label_rows
from pipelines.storage import StorageConfig

STAT_THREADS = 16
LISTING_PAGE = 1000  # objects per listing batch: S3's page size
LISTING_THREADS = 16  # S3 key ranges listed at once (`_list_s3`)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("source_version", pa.string()),
        pa.field("model_version", pa.string()),
        # `label_rows.row_key`; ledger files from before it lack it (`_not_in_ledger`).
        pa.field("row_key", pa.string()),
    ]
)
LEGACY_LEDGER_KEY = ("image_id", "source_version", "model_version")
LISTING_SCHEMA = pa.schema(
    [pa.field("image", pa.string()), pa.field("source_version", pa.string())]
)
_MANIFEST_COLUMNS = ("image_id", "image", "labels")
NIGHT_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("image", pa.string()),
        pa.field("labels", pa.list_(pa.string())),
        # So that `wsss label` keys the night's rows as the ledger does: an image changed twice
        # on one night is labelled again in the same dated set.
        pa.field("source_version", pa.string()),
    ]
)


def etag_version(etag: str) -> str:
    return "etag-" + etag.strip('"')


def _file_version(size: int, mtime_ns: int) -> str:
    return f"{size}-{mtime_ns}"


def source_version(uri: str, config: StorageConfig) -> str:
    """The version of the image object at `uri` (its ETag on S3, size and mtime locally);
    "missing" when there is none, "unreadable" when asking failed (the labeling then records
    the fetch error)."""
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        try:
            head = storage.s3_client(config).head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return "missing" if status == 404 else "unreadable"
        except BotoCoreError:
            return "unreadable"
        return etag_version(head["ETag"])
    fs, path = storage.filesystem(uri, config)
    try:
        info = fs.get_file_info(path)
    except OSError:
        return "unreadable"
    return _file_version(info.size, info.mtime_ns) if info.type == pafs.FileType.File else "missing"


def listing_folder(prefix: str) -> str:
    """A listing's prefix as a folder: "s3://b/images" lists s3://b/images/..., not images2/."""
    folder = prefix.rstrip("/") + "/"
    return folder if storage.is_s3(folder) else posixpath.abspath(folder) + "/"


def list_versions(
    prefix: str, config: StorageConfig, boundaries: Sequence[str] = ()
) -> Iterator[pa.Table]:
    """The image objects under the folder or S3 prefix `prefix` with their source versions,
    streamed a page at a time (the driver never holds the whole listing). On S3, `boundaries`
    (object URIs under the prefix, e.g. a sample of the manifest's) cut the key space into
    ranges listed at once (`_list_s3`)."""
    folder = listing_folder(prefix)
    if storage.is_s3(folder):
        yield from _list_s3(folder, config, boundaries)
        return
    page: list[tuple[str, str]] = []
    for path, stat in _image_files(folder):
        page.append((path, _file_version(stat.st_size, stat.st_mtime_ns)))
        if len(page) == LISTING_PAGE:
            yield listing_page(page)
            page = []
    if page:
        yield listing_page(page)


def _list_s3(folder: str, config: StorageConfig, boundaries: Sequence[str]) -> Iterator[pa.Table]:
    """The S3 listing of `folder`: one range of keys per gap between the sorted `boundaries`
    (and before the first, after the last), each listed page after page from its own start
    (StartAfter) by one of LISTING_THREADS threads. S3 hands out a prefix's pages one after
    another (each page names the next), so a single listing of millions of objects takes a
    request's latency per 1,000 objects; ranges overlap those latencies. Pages are yielded as
    they arrive, through a queue of at most 2 x LISTING_THREADS pages."""
    bucket, key = storage.split_s3(folder)
    inside = f"s3://{bucket}/{key}"
    cuts = sorted({b.removeprefix(f"s3://{bucket}/") for b in boundaries if b.startswith(inside)})
    ranges = list(zip([None, *cuts], [*cuts, None], strict=True))
    client = storage.s3_client(config)
    pages: queue.Queue = queue.Queue(maxsize=2 * LISTING_THREADS)
    done, stop = object(), threading.Event()

    def put(item: object) -> None:
        while not stop.is_set():  # the consumer went away: give up rather than block
            try:
                pages.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def list_range(after: str | None, upto: str | None) -> None:
        """Put the pages of the keys in (after, upto] on `pages`, then `done`."""
        try:
            start = {} if after is None else {"StartAfter": after}
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=key, **start):
                contents = page.get("Contents", [])
                last = upto is not None and contents and contents[-1]["Key"] > upto
                if last:
                    contents = [o for o in contents if o["Key"] <= upto]
                images = [o for o in contents if o["Key"].lower().endswith(IMAGE_SUFFIXES)]
                listed = [(f"s3://{bucket}/{o['Key']}", etag_version(o["ETag"])) for o in images]
                put(listing_page(listed))
                if last or stop.is_set():
                    break
            put(done)
        except BaseException as exc:  # raised again in the consumer
            put(exc)

    with ThreadPoolExecutor(max_workers=LISTING_THREADS) as pool:
        for after, upto in ranges:
            pool.submit(list_range, after, upto)
        try:
            finished = 0
            while finished < len(ranges):
                item = pages.get()
                if isinstance(item, BaseException):
                    raise item
                if item is done:
                    finished += 1
                else:
                    yield item
        finally:
            stop.set()


def listing_page(page: list[tuple[str, str]]) -> pa.Table:
    """A listing page of (image URI, source version) pairs (none, for an S3 page without
    images)."""
    return pa.table(
        {"image": [image for image, _ in page], "source_version": [v for _, v in page]},
        schema=LISTING_SCHEMA,
    )


def _image_files(folder: str) -> Iterator[tuple[str, os.stat_result]]:
    """The image files under the local `folder`, at any depth, with their stat, one directory
    at a time: a recursive pyarrow FileSelector returns the whole listing at once."""
    pending = [folder.rstrip("/") or "/"]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
                    yield entry.path, entry.stat()


def valid_rows(batch: pa.Table) -> pa.Table:
    """Ray Data step: the manifest rows that passed the manifest check, with the columns the
    night's manifest keeps."""
    ok = batch.filter(pc.equal(batch.column("outcome"), label_rows.OK))
    return ok.select(_MANIFEST_COLUMNS)


def invalid_rows(batch: pa.Table, version: str) -> pa.Table:
    """Ray Data step: the manifest rows that failed the manifest check (error rows), keyed for
    the ledger by a digest of what is wrong with them: recorded once, and again only when the
    row changes (a corrected row is a valid one and is labelled): their row key, which is
    that digest (`label_rows.row_key`'s twin for invalid rows)."""
    bad = batch.filter(pc.not_equal(batch.column("outcome"), label_rows.OK))
    digests = ["manifest-error-" + key for key in bad.column("row_key").to_pylist()]
    return bad.append_column("source_version", pa.array(digests, pa.string())).append_column(
        "model_version", pa.array([version] * bad.num_rows, pa.string())
    )


def with_source_versions(
    batch: pa.Table,
    config: StorageConfig,
    version: str,
    mask_settings: str,
    listed: str | None = None,
) -> pa.Table:
    """Ray Data step: valid manifest rows -> the same with `source_version`, `model_version` and
    their `row_key` (`label_rows.row_key`, as `wsss label` keys the night manifest's rows).
    Rows joined to a listing of the folder `listed` keep the listing's version; rows under that
    folder that the listing lacks are "missing"; any other row is asked for its version."""
    rows = batch.to_pylist()
    versions = [row.get("source_version") for row in rows]
    ask = []
    for i, row in enumerate(rows):
        if versions[i] is None and listed is not None and row["image"].startswith(listed):
            versions[i] = "missing"
        elif versions[i] is None:
            ask.append(i)
    with ThreadPoolExecutor(max_workers=STAT_THREADS) as pool:
        asked = pool.map(partial(source_version, config=config), [rows[i]["image"] for i in ask])
        for i, answer in zip(ask, asked, strict=True):
            versions[i] = answer
    return pa.table(
        {
            "image_id": [r["image_id"] for r in rows],
            "image": [r["image"] for r in rows],
            "labels": [r["labels"] for r in rows],
            "source_version": versions,
            "model_version": [version] * len(rows),
            "row_key": [
                label_rows.row_key(r["labels"], v, mask_settings)
                for r, v in zip(rows, versions, strict=True)
            ],
        }
    )


def transient_rows(batch: pa.Table) -> pa.Table:
    """Ray Data step: errors/ rows -> the image_ids of the transient ones."""
    return batch.filter(batch["transient"]).select(["image_id"])


def listing_boundaries(images: Sequence[str], ranges: int) -> list[str]:
    """`ranges - 1` cuts that split the sorted `images` (a sample of the URIs a listing will
    meet) into `ranges` parts of about equal size: the S3 listing's ranges (`_list_s3`)."""
    ordered = sorted(set(images))
    step = len(ordered) / ranges
    return sorted({ordered[int(i * step)] for i in range(1, ranges)}) if ordered else []
