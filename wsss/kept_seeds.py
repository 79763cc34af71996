"""Seed maps that a CAM method keeps for each training image while the classifier trains (OAA's
accumulated attention; `CamMethod.keeps_seeds`), and the CAM stage's use of them.

Each training epoch hands out `KeptMaps`: one uint8 map per (row, class) entry, where row is the
image's position in the training set and 255 is the strongest score. The map lies on the image's
own grid (`grid_shape`), whatever crop the epoch saw. Entries of one (row, class) merge by their
pointwise maximum (`merge`). A maximum does not care about order or grouping, so the merged maps
come out the same when per-worker, per-epoch files merge in any order. They also come out the
same when an epoch is done again after a resumed run. An image's merged maps travel as one
`encode`d blob; `cams` turns them into the CAM stage's maps at the image's size.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

Key = tuple[int, int]  # (row, class index 1..K)


def grid_shape(size: tuple[int, int], grid: int) -> tuple[int, int]:
    """The (h, w) cells of an image of `size` (H, W) whose long side has `grid` cells."""
    height, width = size
    scale = grid / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


@dataclass(frozen=True)
class KeptMaps:
    """Maps of (row, class) entries: `rows` int64 (N,), `classes` int32 (N,), `shapes` int32
    (N, 2), and `maps`, the N uint8 maps flattened one after another."""

    rows: np.ndarray
    classes: np.ndarray
    shapes: np.ndarray
    maps: np.ndarray

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[int, int, np.ndarray]]) -> KeptMaps:
        entries = list(entries)
        return cls(
            rows=np.array([e[0] for e in entries], dtype=np.int64),
            classes=np.array([e[1] for e in entries], dtype=np.int32),
            shapes=np.array([e[2].shape for e in entries], dtype=np.int32).reshape(-1, 2),
            maps=np.concatenate([e[2].ravel() for e in entries]).astype(np.uint8)
            if entries
            else np.zeros(0, np.uint8),
        )

    def __len__(self) -> int:
        return len(self.rows)

    def entries(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(row, class, uint8 map (h, w)) of each entry."""
        sizes = self.shapes.prod(axis=1)
        ends = np.cumsum(sizes)
        for i in range(len(self)):
            flat = self.maps[ends[i] - sizes[i] : ends[i]]
            yield int(self.rows[i]), int(self.classes[i]), flat.reshape(self.shapes[i])

    def to_bytes(self) -> bytes:
        """The entries as an .npz file."""
        buffer = io.BytesIO()
        np.savez(buffer, rows=self.rows, classes=self.classes, shapes=self.shapes, maps=self.maps)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> KeptMaps:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            return cls(f["rows"], f["classes"], f["shapes"], f["maps"])


def merge(
    parts: Iterable[KeptMaps], into: dict[Key, np.ndarray] | None = None
) -> dict[Key, np.ndarray]:
    """The pointwise maximum of every (row, class)'s maps over `parts` (added to `into`)."""
    merged = {} if into is None else into
    for part in parts:
        for row, c, kept in part.entries():
            old = merged.get((row, c))
            if old is None:
                merged[(row, c)] = kept.copy()
            elif old.shape != kept.shape:
                raise ValueError(
                    f"row {row} class {c}: maps of shapes {old.shape} and {kept.shape} cannot "
                    "merge (kept with another grid?)"
                )
            else:
                np.maximum(old, kept, out=old)
    return merged


def by_row(merged: Mapping[Key, np.ndarray]) -> dict[int, dict[int, np.ndarray]]:
    """Merged maps grouped per row: row -> {class: map}."""
    rows: dict[int, dict[int, np.ndarray]] = {}
    for (row, c), kept in merged.items():
        rows.setdefault(row, {})[c] = kept
    return rows


def encode(maps: Mapping[int, np.ndarray]) -> bytes:
    """One image's maps {class: uint8 (h, w)} as bytes (`decode`)."""
    return KeptMaps.from_entries((0, c, m) for c, m in sorted(maps.items())).to_bytes()


def decode(data: bytes) -> dict[int, np.ndarray]:
    """{class: uint8 (h, w)} of `encode`d bytes."""
    return {c: m for _, c, m in KeptMaps.from_bytes(data).entries()}


def cams(
    kept: Mapping[int, np.ndarray],
    labels: Sequence[int],
    size: tuple[int, int],
    n_classes: int,
    computed: Callable[[], np.ndarray],
) -> np.ndarray:
    """The CAM stage's maps float32 (K, H, W) at `size` of an image with class indices `labels`
    from its kept maps {class: uint8 (h, w)}: each upsampled bilinearly and scaled to peak at 1
    like `wsss.cam.compute_cams`; a labelled class with no kept map (its image was not trained
    on, or the class never passed the method's filter) takes its channel of `computed()` (the
    classifier's CAMs, computed at most once). Unlabelled classes are 0."""
    out = np.zeros((n_classes, *size), dtype=np.float32)
    fallback = None
    for c in sorted(set(labels)):
        if c in kept:
            grid = torch.from_numpy(kept[c].astype(np.float32))[None, None]
            up = F.interpolate(grid, size, mode="bilinear", align_corners=False)[0, 0].numpy()
            out[c - 1] = up / (up.max() + 1e-5)
        else:
            fallback = computed() if fallback is None else fallback
            out[c - 1] = fallback[c - 1]
    return out
