"""Dataset manifests: the class list, one row per image, and the PASCAL VOC layout.

Parsing works on text, bytes and dicts so the pipelines layer can fetch a manifest from anywhere
(local or S3) and hand it over; `read_manifest` and `read_voc` are the local-file conveniences.
Every problem raises `ManifestError` naming the row (1-based) or line, the image_id where known
and the field; problems are collected so one run reports all of them, and no row is dropped.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wsss.imageio import IGNORE_INDEX, ImageDecodeError, read_mask

CLASSES_FILE = "classes.txt"  # beside the manifest; line 1 is background

BACKGROUND = "background"
VOC_CLASSES = (
    BACKGROUND,
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
# source_version: the image's version (an ETag, size + mtime) when the writer of the manifest
# knows it; part of what makes a labelled row current (`pipelines.label.rows.row_key`).
MANIFEST_FIELDS = ("image_id", "image", "labels", "mask", "source_version")
REQUIRED_FIELDS = ("image", "labels")
# Masks are uint8 with 255 = ignore, so class indices must stay in 0..254.
MAX_CLASSES = IGNORE_INDEX
_SHOWN_PROBLEMS = 10
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class ManifestError(ValueError):
    """An unusable manifest or class list. `problems` holds every individual message; the
    message shows the first few after `summary` (default: their count)."""

    def __init__(self, problems: str | Sequence[str], summary: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if summary is None and len(self.problems) == 1:
            message = self.problems[0]
        else:
            shown = self.problems[:_SHOWN_PROBLEMS]
            message = (summary or f"{len(self.problems)} problems") + ": " + "; ".join(shown)
            if len(self.problems) > len(shown):
                message += f"; ... and {len(self.problems) - len(shown)} more"
        super().__init__(message)


@dataclass(frozen=True)
class ManifestRow:
    """One image: `image`/`mask` are resolved paths or URIs; `labels` ordered by class index."""

    image_id: str
    image: str
    labels: tuple[str, ...]
    mask: str | None = None


@dataclass(frozen=True)
class Manifest:
    """Class list (background first) and rows; `root` is the folder relative paths resolve to."""

    classes: list[str]
    rows: list[ManifestRow]
    root: str
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_index", {name: i for i, name in enumerate(self.classes)})

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_foreground(self) -> int:
        """K, the number of foreground classes (= classifier logits)."""
        return len(self.classes) - 1

    def class_index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise ManifestError(f"unknown class {name!r}; classes are {self.classes}") from None

    def label_indices(self, row: ManifestRow) -> list[int]:
        """Class indices (1..K) of the row's labels, ascending."""
        return sorted(self.class_index(name) for name in row.labels)

    def label_targets(self, row: ManifestRow) -> np.ndarray:
        """Multi-hot classifier target (K,) float32: entry k is class k + 1."""
        target = np.zeros(self.num_foreground, dtype=np.float32)
        target[[i - 1 for i in self.label_indices(row)]] = 1.0
        return target


def parse_classes(text: str, source: str = "classes.txt") -> list[str]:
    """Class names, one per line; line 1 must be `background`; trailing blank lines ignored."""
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ManifestError(f"{source}: empty class list; line 1 must be {BACKGROUND!r}")
    problems = []
    if lines[0] != BACKGROUND:
        problems.append(f"{source} line 1: must be {BACKGROUND!r}, got {lines[0]!r}")
    first_line: dict[str, int] = {}
    for number, name in enumerate(lines, start=1):
        if not name:
            problems.append(f"{source} line {number}: empty class name")
        elif name in first_line:
            problems.append(
                f"{source} line {number}: duplicate class name {name!r} "
                f"(first on line {first_line[name]})"
            )
        else:
            first_line[name] = number
    if len(lines) < 2:
        problems.append(f"{source}: no foreground classes after {BACKGROUND!r}")
    if len(lines) > MAX_CLASSES:
        problems.append(
            f"{source}: {len(lines)} classes, at most {MAX_CLASSES} fit a uint8 mask with "
            f"{IGNORE_INDEX} = ignore"
        )
    if problems:
        raise ManifestError(problems)
    return lines


def parse_jsonl(text: str) -> list[dict]:
    """JSON Lines: one object per line, blank lines skipped."""
    records, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {number}: malformed JSON: {e.msg} at column {e.colno}")
            continue
        if not isinstance(record, dict):
            problems.append(f"line {number}: expected a JSON object, got {type(record).__name__}")
            continue
        records.append(record)
    if problems:
        raise ManifestError(problems)
    return records


def parse_parquet(data: bytes) -> list[dict]:
    """Rows of a Parquet manifest as dicts; the columns must be manifest fields."""
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise ManifestError(f"not a readable Parquet file: {e}") from e
    columns = set(table.column_names)
    problems = []
    missing = [name for name in REQUIRED_FIELDS if name not in columns]
    if missing:
        problems.append(f"Parquet manifest is missing required column(s) {missing}")
    unknown = sorted(columns - set(MANIFEST_FIELDS))
    if unknown:
        problems.append(
            f"Parquet manifest has unknown column(s) {unknown}; allowed are {list(MANIFEST_FIELDS)}"
        )
    if problems:
        raise ManifestError(problems)
    return table.to_pylist()


def parse_records(data: bytes, name: str) -> list[dict]:
    """Manifest records from the bytes of file `name`, by its extension: .jsonl, .json
    (JSON Lines, or one JSON array of objects) or .parquet."""
    kind = manifest_format(name)
    if kind == "parquet":
        return parse_parquet(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"{name}: not UTF-8 text ({e})") from e
    if kind == "json" and text.lstrip().startswith("["):
        return _parse_json_array(text, name)
    return parse_jsonl(text)


def parse_manifest_records(
    records: Iterable[dict], classes: Sequence[str], root: str
) -> list[ManifestRow]:
    """Validate records (row N = the N-th record, 1-based) into rows with resolved paths.

    `image_id` defaults to the image path relative to `root` without its extension. Relative
    `image`/`mask` paths are joined to `root` (a local folder or `s3://bucket/prefix`); absolute
    paths and URIs are kept as given. Labels are returned ordered by class index.
    """
    index = {name: i for i, name in enumerate(classes)}
    rows: list[ManifestRow] = []
    problems: list[str] = []
    first_row: dict[str, int] = {}
    for number, record in enumerate(records, start=1):
        where = f"row {number}"
        if not isinstance(record, dict):
            problems.append(f"{where}: expected a record (dict), got {type(record).__name__}")
            continue
        for name in ("image_id", "image"):
            if isinstance(record.get(name), str) and record[name]:
                where += f" ({name} {record[name]!r})"
                break
        row_problems: list[str] = []
        row = parse_record(record, index, root, row_problems)
        problems += [f"{where}: {p}" for p in row_problems]
        if row is None:
            continue
        if row.image_id in first_row:
            problems.append(
                f"row {number} (image_id {row.image_id!r}): duplicate image_id, "
                f"first used by row {first_row[row.image_id]}"
            )
            continue
        first_row[row.image_id] = number
        rows.append(row)
    if problems:
        raise ManifestError(problems)
    if not rows:
        raise ManifestError("manifest has no rows")
    return rows


def missing_files(manifest: Manifest) -> list[str]:
    """Describe each local image/mask path of the manifest that is not a file (URIs skipped)."""
    missing = []
    for number, row in enumerate(manifest.rows, start=1):
        for name, path in (("image", row.image), ("mask", row.mask)):
            if path is not None and not _URI.match(path) and not os.path.isfile(path):
                missing.append(f"row {number} (image_id {row.image_id!r}) {name} {path!r}")
    return missing


def classes_uri(manifest: str) -> str:
    """Where the class list of the manifest at path or URI `manifest` is: beside it."""
    return posixpath.join(posixpath.dirname(manifest), CLASSES_FILE)


def manifest_format(name: str) -> str:
    """ "parquet", "jsonl" or "json", by the extension of the manifest file `name`."""
    ext = posixpath.splitext(name)[1].lower()
    if ext not in (".parquet", ".jsonl", ".json"):
        raise ManifestError(f"{name}: unknown manifest format {ext!r}; use .jsonl, .json, .parquet")
    return ext[1:]


def read_manifest(path: str | os.PathLike, check_files: bool = True) -> Manifest:
    """A local manifest (.jsonl/.json/.parquet) with `classes.txt` beside it.

    With `check_files`, every local image and mask must exist; all missing ones are reported.
    """
    path = Path(path).absolute()
    classes_path = Path(classes_uri(path.as_posix()))
    for required in (path, classes_path):
        if not required.is_file():
            raise ManifestError(f"{required}: file not found")
    classes = parse_classes(classes_path.read_text(encoding="utf-8"), str(classes_path))
    root = str(path.parent)
    try:
        records = parse_records(path.read_bytes(), path.name)
        manifest = Manifest(classes, parse_manifest_records(records, classes, root), root)
    except ManifestError as e:
        raise ManifestError(e.problems, f"{path}: {len(e.problems)} problem(s)") from None
    if check_files:
        _raise_missing(missing_files(manifest), str(path))
    return manifest


def parse_voc_split(text: str, source: str = "split file") -> list[str]:
    """Image ids of an ImageSets/Segmentation/<split>.txt, one per line; duplicates are errors."""
    ids, problems, first_line = [], [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        image_id = line.strip()
        if not image_id:
            continue
        if image_id in first_line:
            problems.append(
                f"{source} line {number}: duplicate id {image_id!r} (first on line "
                f"{first_line[image_id]})"
            )
            continue
        first_line[image_id] = number
        ids.append(image_id)
    if problems:
        raise ManifestError(problems)
    if not ids:
        raise ManifestError(f"{source}: no image ids")
    return ids


def labels_from_mask(mask: np.ndarray, classes: Sequence[str]) -> tuple[str, ...]:
    """Names of the foreground classes present in a class-index mask (0 and 255 ignored)."""
    present = np.unique(mask)
    present = present[(present != 0) & (present != IGNORE_INDEX)]
    unknown = present[present >= len(classes)]
    if unknown.size:
        raise ManifestError(
            f"mask has class indices {unknown.tolist()} beyond the {len(classes)} classes"
        )
    return tuple(classes[i] for i in present)


def read_voc(
    root: str | os.PathLike, split: str = "train", mask_dir: str = "SegmentationClass"
) -> Manifest:
    """A PASCAL VOC layout: ids from ImageSets/Segmentation/<split>.txt, images from
    JPEGImages/<id>.jpg, masks from <mask_dir>/<id>.png (SegmentationClassAug for SBD's
    train_aug); image labels are the classes present in each mask, as in the WSSS literature."""
    root_path = Path(root).absolute()
    split_path = root_path / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_path.is_file():
        available = sorted(p.stem for p in split_path.parent.glob("*.txt"))
        raise ManifestError(f"{split_path}: split {split!r} not found; available: {available}")
    ids = parse_voc_split(split_path.read_text(encoding="utf-8"), str(split_path))
    rows, missing, problems = [], [], []
    for number, image_id in enumerate(ids, start=1):
        image = root_path / "JPEGImages" / f"{image_id}.jpg"
        mask = root_path / mask_dir / f"{image_id}.png"
        absent = [
            f"{name} {str(p)!r}"
            for name, p in (("image", image), ("mask", mask))
            if not p.is_file()
        ]
        missing += [f"row {number} (image_id {image_id!r}) {a}" for a in absent]
        if absent:
            continue
        try:
            labels = labels_from_mask(read_mask(mask), VOC_CLASSES)
        except (ImageDecodeError, ManifestError) as e:
            problems.append(f"row {number} (image_id {image_id!r}) mask: {e}")
            continue
        rows.append(ManifestRow(image_id, str(image), labels, str(mask)))
    _raise_missing(missing, f"VOC {split!r} split")
    if problems:
        raise ManifestError(problems)
    return Manifest(list(VOC_CLASSES), rows, str(root_path))


def parse_record(
    record: dict, index: dict[str, int], root: str, problems: list[str]
) -> ManifestRow | None:
    """One record to a row, appending to `problems` (field-prefixed) instead of raising."""
    unknown = sorted(set(record) - set(MANIFEST_FIELDS))
    if unknown:
        problems.append(f"unknown field(s) {unknown}; allowed are {list(MANIFEST_FIELDS)}")
    image = _path_field(record, "image", required=True, problems=problems)
    mask = _path_field(record, "mask", required=False, problems=problems)
    image_id = record.get("image_id")
    if image_id is not None and (not isinstance(image_id, str) or not image_id.strip()):
        problems.append(f"image_id: must be a non-empty string, got {image_id!r}")
    for name, value in (("image_id", image_id), ("image", image), ("mask", mask)):
        if isinstance(value, str) and not is_text(value):
            problems.append(f"{name}: not valid Unicode (a lone surrogate), got {value!r}")
    version = record.get("source_version")
    if version is not None and (not isinstance(version, str) or not version.strip()):
        problems.append(f"source_version: must be a non-empty string, got {version!r}")
    labels = record.get("labels")
    if labels is None:
        problems.append("labels: missing (use [] for an image with no foreground class)")
    elif isinstance(labels, str) or not isinstance(labels, (list, tuple)):
        problems.append(f"labels: must be a list of class names, got {labels!r}")
    else:
        seen = set()
        for name in labels:
            if not isinstance(name, str):
                problems.append(f"labels: class names must be strings, got {name!r}")
            elif name == BACKGROUND:
                problems.append(f"labels: {BACKGROUND!r} is implicit and not an image label")
            elif name not in index:
                problems.append(f"labels: unknown class {name!r}")
            elif name in seen:
                problems.append(f"labels: class {name!r} listed twice")
            else:
                seen.add(name)
    if problems:
        return None
    return ManifestRow(
        image_id=image_id if image_id is not None else _default_image_id(image, root),
        image=_resolve(image, root),
        labels=tuple(sorted(labels, key=index.__getitem__)),
        mask=None if mask is None else _resolve(mask, root),
    )


def outside_roots(uri: str, roots: Sequence[str]) -> str | None:
    """Why `uri` (a resolved image or mask path) is not under any of `roots` (folders, S3
    buckets or prefixes), or None when it is or when `roots` is empty (anything goes). ".."
    segments are resolved first, so a path cannot climb out of a root."""
    if not roots:
        return None
    scheme, sep, rest = uri.partition("://")
    normal = f"{scheme}{sep}{posixpath.normpath(rest)}" if sep else posixpath.normpath(uri)
    for root in roots:
        folder = root.rstrip("/") + "/"
        if normal.startswith(folder):
            return None
    return f"{uri} is outside dataset.allowed_roots ({', '.join(roots)})"


def is_text(value: str) -> bool:
    """Whether `value` can be written as UTF-8: JSON admits lone surrogates ("\\ud800"),
    Parquet, object keys and file names do not."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _path_field(record: dict, name: str, required: bool, problems: list[str]) -> str | None:
    value = record.get(name)
    if value is None:
        if required:
            problems.append(f"{name}: missing")
        return None
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{name}: must be a non-empty path string, got {value!r}")
        return None
    return value


def _is_absolute(path: str) -> bool:
    return bool(_URI.match(path)) or path.startswith("/")


def _resolve(path: str, root: str) -> str:
    if _is_absolute(path):
        return path
    return root.rstrip("/") + "/" + posixpath.normpath(path)


def _default_image_id(image: str, root: str) -> str:
    """The image path relative to root without extension (the path itself when outside root)."""
    prefix = root.rstrip("/") + "/"
    if not _is_absolute(image):
        relative = posixpath.normpath(image)
    elif image.startswith(prefix):
        relative = image[len(prefix) :]
    else:
        relative = image
    return posixpath.splitext(relative)[0]


def _parse_json_array(text: str, name: str) -> list[dict]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(
            f"{name}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from e
    if not isinstance(records, list):
        raise ManifestError(f"{name}: expected a JSON array of objects")
    bad = [i for i, r in enumerate(records, start=1) if not isinstance(r, dict)]
    if bad:
        raise ManifestError(f"{name}: array elements {bad[:_SHOWN_PROBLEMS]} are not objects")
    return records


def _raise_missing(missing: list[str], what: str) -> None:
    if missing:
        raise ManifestError(missing, f"{len(missing)} file(s) listed in {what} do not exist")
