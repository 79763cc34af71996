"""The seeds a classifier's CAM method keeps while it trains (OAA's accumulated maps;
`wsss.kept_seeds`), in storage, under `RunLayout.kept_seeds`:

- `epoch_NNNN/rank_RRR.npz`: what one Ray Train worker kept in one epoch, keyed by the rows'
  positions in the training manifest. An epoch done again after a resumption overwrites its
  files. A worker of an earlier attempt that left other ranks' files is harmless, because
  maps merge by their maximum.
- `merged.parquet`: after training, every file merged on the driver (`merge`). Its rows are
  image_id and `SEEDS` (one `wsss.kept_seeds.encode`d blob per image). The classifier's model
  record names it (`kept_seeds_uri`).

The labeling and AffinityNet's labels join it to their rows by image_id (`join`). Their model
actors then take an image's CAMs from its blob, and use the classifier's own CAMs where a row
has none (`wsss.cam.image_cams`).

The merge holds the merged maps in the driver's memory: 32 x 24 bytes per labelled class and
image at the default grid (about 2 GB for a million images of 2.5 labels each).
"""

from __future__ import annotations

import io
import posixpath
import re
from collections.abc import Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipelines import storage
from pipelines.storage import StorageConfig
from wsss.kept_seeds import KeptMaps, by_row, decode, encode, merge

SEEDS = "kept_seeds"  # the labeling rows' column (`pipelines.label.rows.DECODED_SCHEMA`)
MERGED = "merged.parquet"
_EPOCH_FILE = re.compile(r"epoch_\d+/rank_\d+\.npz$")


def write_epoch(root: str, epoch: int, rank: int, kept: KeptMaps, config: StorageConfig) -> None:
    """Store what worker `rank` kept in `epoch` (nothing when it kept nothing)."""
    if len(kept):
        uri = storage.join(root, f"epoch_{epoch:04d}", f"rank_{rank:03d}.npz")
        storage.write_bytes(uri, kept.to_bytes(), config)


def epoch_files(root: str, config: StorageConfig) -> list[str]:
    """The epoch files under `root`, in order."""
    fs, path = storage.filesystem(root, config)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    found = sorted(
        posixpath.relpath(i.path, path)
        for i in infos
        if i.type == pafs.FileType.File and _EPOCH_FILE.search(i.path)
    )
    return [storage.join(root, name) for name in found]


def merge_files(
    root: str, image_ids: Sequence[str], config: StorageConfig, log: Callable[[str], None]
) -> str | None:
    """Merge every epoch file under `root` into `<root>/merged.parquet`; `image_ids` are the
    training manifest's, by row. Returns its URI, or None when no epoch kept anything."""
    files = epoch_files(root, config)
    if not files:
        return None
    merged: dict = {}
    for uri in files:  # one file in memory at a time, besides the merged maps
        merge([KeptMaps.from_bytes(storage.read_bytes(uri, config))], merged)
    rows = by_row(merged)
    table = pa.table(
        {
            "image_id": pa.array([image_ids[r] for r in sorted(rows)], pa.string()),
            SEEDS: pa.array([encode(rows[r]) for r in sorted(rows)], pa.binary()),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    uri = storage.join(root, MERGED)
    storage.write_bytes(uri, buffer.getvalue(), config)
    log(f"merged the seeds kept in {len(files)} epoch file(s) for {len(rows)} images into {uri}")
    return uri


def read(uri: str | None, image_ids: Sequence[str], config: StorageConfig) -> dict[str, dict]:
    """The kept maps {class: uint8 map} of those of `image_ids` the merged file at `uri` has
    (nothing when `uri` is None), for a job that labels a few images on the driver."""
    if uri is None:
        return {}
    fs, path = storage.filesystem(uri, config)
    wanted = pc.field("image_id").isin(list(image_ids))
    table = pq.read_table(path, filesystem=fs, filters=wanted)
    return {
        image_id: decode(blob)
        for image_id, blob in zip(
            table["image_id"].to_pylist(), table[SEEDS].to_pylist(), strict=True
        )
    }


def join(
    rows: ray.data.Dataset, uri: str | None, config: StorageConfig, partitions: int
) -> ray.data.Dataset:
    """`rows` (with an image_id column) with the `SEEDS` column of the merged seeds at `uri`
    (null where an image has none); `rows` as they are when `uri` is None."""
    if uri is None:
        return rows
    fs, path = storage.filesystem(uri, config)
    kept = ray.data.read_parquet(path, filesystem=fs)
    return rows.join(kept, join_type="left_outer", num_partitions=partitions, on=("image_id",))
