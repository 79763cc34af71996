"""Pseudo-labels for segmentation training: the shards' rows with their images fetched and
their masks decoded (docs/output.md). `read_pseudo_labels` gives a Ray Dataset, for a Ray training
job; `PseudoLabelDataset` a `torch.utils.data.Dataset` doing the same per index.
"""

from __future__ import annotations

import bisect

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch.utils.data

from pipelines import storage
from pipelines.shards import (
    LABELS,
    LATEST,
    ragged,
    read_shard_rows,
    resolve_model_version,
    shard_files,
)
from pipelines.storage import StorageConfig
from wsss.imageio import decode_image, decode_mask


def decode_pair(image_uri: str, mask_png: bytes, config: StorageConfig) -> tuple:
    """The image (H, W, 3) uint8 fetched from `image_uri` and its decoded mask (H, W) uint8."""
    image = decode_image(storage.read_bytes(image_uri, config))
    mask = decode_mask(mask_png)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{image_uri}: mask {mask.shape} does not match image {image.shape[:2]}")
    return image, mask


def _decode_rows(batch: dict[str, np.ndarray], config: StorageConfig) -> dict[str, np.ndarray]:
    pairs = [
        decode_pair(str(uri), mask, config)
        for uri, mask in zip(batch["image"], batch["mask"], strict=True)
    ]
    return {
        "image_id": batch["image_id"],
        "image": ragged([image for image, _ in pairs]),
        "mask": ragged([mask for _, mask in pairs]),
    }


def read_pseudo_labels(
    out_uri: str, config: StorageConfig, model_version: str | None = LATEST, batch_size: int = 64
) -> ray.data.Dataset:
    """Rows {"image_id", "image": uint8 (H, W, 3), "mask": uint8 (H, W), 255 = ignore} of the
    pseudo-labels under `out_uri`; images are fetched from the URIs the rows name."""
    rows = read_shard_rows(out_uri, config, LABELS, model_version, ["image_id", "image", "mask"])
    return rows.map_batches(
        _decode_rows, fn_kwargs={"config": config}, batch_size=batch_size, batch_format="numpy"
    )


class PseudoLabelDataset(torch.utils.data.Dataset):
    """Map-style dataset over the pseudo-label shards under `out_uri` (local or s3://): item i is
    {"image_id", "image": uint8 (H, W, 3), "mask": uint8 (H, W)}.

    Construction reads only the files' footers (row counts); an item reads the row group holding
    it, and the last row group read is kept, so sequential access reads each group once."""

    def __init__(
        self, out_uri: str, config: StorageConfig, model_version: str | None = LATEST
    ) -> None:
        self.config = config
        self.model_version = resolve_model_version(out_uri, config, model_version)
        self.fs, _ = storage.filesystem(out_uri, config)
        self.files = shard_files(out_uri, LABELS, config, self.model_version)
        # starts[k]: index of the first item of row group k; groups[k]: (file, group) of it.
        self.starts: list[int] = []
        self.groups: list[tuple[str, int]] = []
        total = 0
        for path in self.files:
            metadata = pq.read_metadata(path, filesystem=self.fs)
            for group in range(metadata.num_row_groups):
                self.starts.append(total)
                self.groups.append((path, group))
                total += metadata.row_group(group).num_rows
        self.length = total
        self._cached: tuple[int, pa.Table] | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} pseudo-labels")
        index %= self.length
        k = bisect.bisect_right(self.starts, index) - 1
        if self._cached is None or self._cached[0] != k:
            path, group = self.groups[k]
            with self.fs.open_input_file(path) as f:
                table = pq.ParquetFile(f).read_row_group(
                    group, columns=["image_id", "image", "mask"]
                )
            self._cached = (k, table)
        row = self._cached[1].slice(index - self.starts[k], 1).to_pylist()[0]
        image, mask = decode_pair(row["image"], row["mask"], self.config)
        return {"image_id": row["image_id"], "image": image, "mask": mask}
