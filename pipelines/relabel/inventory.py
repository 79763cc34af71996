"""`wsss relabel --inventory`: the listing of an S3 prefix read from an S3 Inventory report (the
daily or weekly listing S3 writes of a bucket as CSV, Parquet or ORC) instead of listed: a few
large reads however many objects. Read on the driver, streamed a block at a time into the
listing file, as `rows.list_versions` streams a listing.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.orc as paorc
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.config import ConfigError
from pipelines.relabel.rows import (
    IMAGE_SUFFIXES,
    LISTING_PAGE,
    etag_version,
    listing_folder,
    listing_page,
)
from pipelines.storage import StorageConfig

# An inventory's fields as its Parquet and ORC files name them; CSV files have no header and
# name them in the report's `fileSchema`, in these spellings.
INVENTORY_FIELDS = {
    "Key": "key",
    "ETag": "e_tag",
    "IsLatest": "is_latest",
    "IsDeleteMarker": "is_delete_marker",
}
REPORT_DATE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}-\d{2}Z")  # a report's folder, as S3 names it


def inventory_manifest(uri: str, config: StorageConfig) -> str:
    """The manifest.json an `--inventory` URI names: itself, or for the folder of an inventory
    configuration (where S3 writes a dated folder per report) the newest report's."""
    if uri.endswith(".json"):
        return uri
    fs, path = storage.filesystem(uri.rstrip("/"), config)
    dated = [
        info.path
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        if info.type == pafs.FileType.Directory and REPORT_DATE.fullmatch(info.base_name)
    ]
    for folder in sorted(dated, key=posixpath.basename, reverse=True):
        manifest = "s3://" + posixpath.join(folder, "manifest.json")
        if storage.exists(manifest, config):
            return manifest
    raise ConfigError(f"--inventory {uri}: no report (a dated folder with a manifest.json) in it")


def read_inventory_report(manifest_uri: str, config: StorageConfig) -> dict:
    """The manifest.json of an S3 Inventory report, checked for what a listing needs."""
    try:
        report = json.loads(storage.read_bytes(manifest_uri, config))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--inventory {manifest_uri}: not JSON ({exc})") from exc
    fields = ("sourceBucket", "destinationBucket", "fileFormat", "fileSchema", "files")
    absent = [f for f in fields if not isinstance(report, dict) or f not in report]
    if absent:
        raise ConfigError(
            f"--inventory {manifest_uri}: not an S3 Inventory manifest.json (no {absent})"
        )
    report["fileFormat"] = str(report["fileFormat"]).upper()
    if report["fileFormat"] not in ("CSV", "PARQUET", "ORC"):
        raise ConfigError(f"--inventory {manifest_uri}: unknown fileFormat {report['fileFormat']}")
    if not any(name in report["fileSchema"] for name in ("ETag", "e_tag")):
        raise ConfigError(
            f"--inventory {manifest_uri}: the report has no ETag field (its fileSchema: "
            f"{report['fileSchema']!r}); add ETag to the inventory configuration's fields"
        )
    return report


def _inventory_batches(uri: str, report: dict, config: StorageConfig) -> Iterator[pa.Table]:
    """One data file of an inventory report, a block at a time, with the columns of
    INVENTORY_FIELDS it has, named as Parquet names them (CSV keys URL-decoded)."""
    fs, path = storage.filesystem(uri, config)
    wanted = list(INVENTORY_FIELDS.values())
    if report["fileFormat"] == "CSV":
        names = [
            INVENTORY_FIELDS.get(n.strip(), n.strip()) for n in report["fileSchema"].split(",")
        ]
        with fs.open_input_stream(path, compression="detect") as source:
            reader = pacsv.open_csv(
                source,
                read_options=pacsv.ReadOptions(column_names=names),
                convert_options=pacsv.ConvertOptions(
                    include_columns=[n for n in wanted if n in names],
                    column_types=dict.fromkeys(names, pa.string()),
                ),
            )
            for batch in reader:
                table = pa.Table.from_batches([batch])
                keys = pa.array([unquote_plus(k) for k in table["key"].to_pylist()], pa.string())
                yield table.set_column(table.schema.get_field_index("key"), "key", keys)
        return
    with fs.open_input_file(path) as source:
        if report["fileFormat"] == "PARQUET":
            parquet = pq.ParquetFile(source)
            columns = [n for n in wanted if n in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(columns=columns, batch_size=LISTING_PAGE * 10):
                yield pa.Table.from_batches([batch])
        else:
            orc = paorc.ORCFile(source)
            columns = [n for n in wanted if n in orc.schema.names]
            for stripe in range(orc.nstripes):
                yield pa.Table.from_batches([orc.read_stripe(stripe, columns=columns)])


def inventory_versions(manifest_uri: str, prefix: str, config: StorageConfig) -> Iterator[pa.Table]:
    """The image objects under the S3 prefix `prefix` with their versions, read from the S3
    Inventory report whose manifest.json is `manifest_uri` (`inventory_manifest`; CSV, Parquet
    or ORC, with the ETag field) instead of listed: a few large reads instead of a request per
    1,000 objects. Only current versions count (a versioned bucket's report may hold older ones
    and delete markers). Streamed a block at a time, as `list_versions`."""
    report = read_inventory_report(manifest_uri, config)
    bucket, key_prefix = storage.split_s3(listing_folder(prefix))
    if report["sourceBucket"] != bucket:
        raise ConfigError(
            f"--inventory {manifest_uri} lists the bucket {report['sourceBucket']!r}, the "
            f"--listing prefix {prefix} is in {bucket!r}"
        )
    destination = report["destinationBucket"].removeprefix("arn:aws:s3:::")
    for entry in report["files"]:
        for table in _inventory_batches(f"s3://{destination}/{entry['key']}", report, config):
            rows = zip(
                table["key"].to_pylist(),
                table["e_tag"].to_pylist(),
                *(
                    table[c].to_pylist() if c in table.column_names else [None] * len(table)
                    for c in ("is_latest", "is_delete_marker")
                ),
                strict=True,
            )
            yield listing_page(
                [
                    (f"s3://{bucket}/{key}", etag_version(etag))
                    for key, etag, latest, deleted in rows
                    if key.startswith(key_prefix)
                    and key.lower().endswith(IMAGE_SUFFIXES)
                    and _flag(latest, default=True)
                    and not _flag(deleted, default=False)
                    and etag
                ]
            )


def _flag(value: object, default: bool) -> bool:
    """An inventory's boolean field: a bool (Parquet, ORC), "true"/"false" (CSV) or absent."""
    if value is None or value == "":
        return default
    return value if isinstance(value, bool) else str(value).lower() == "true"
