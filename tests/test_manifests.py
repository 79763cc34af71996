"""Class lists, manifests (JSONL, JSON, Parquet), the VOC layout, and every rejected input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.manifests import (
    VOC_CLASSES,
    Manifest,
    ManifestError,
    ManifestRow,
    labels_from_mask,
    missing_files,
    parse_classes,
    parse_jsonl,
    parse_manifest_records,
    parse_parquet,
    parse_records,
    read_manifest,
    read_voc,
)
from wsss.imageio import encode_mask

CLASSES = ["background", "cat", "dog", "person"]


def write_dataset(
    folder: Path, records: list[dict], fmt: str = "jsonl", touch: bool = True
) -> Path:
    """classes.txt, the manifest, and (with `touch`) an empty file for every relative path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n\n")
    if touch:
        for record in records:
            for key in ("image", "mask"):
                if record.get(key) and not record[key].startswith("/"):
                    (folder / record[key]).parent.mkdir(parents=True, exist_ok=True)
                    (folder / record[key]).write_bytes(b"x")
    path = folder / f"manifest.{fmt}"
    if fmt == "parquet":
        columns = dict.fromkeys(key for record in records for key in record)
        pq.write_table(pa.table({k: [r.get(k) for r in records] for k in columns}), path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


RECORDS = [
    {"image": "imgs/a.jpg", "labels": ["dog", "cat"]},
    {"image": "imgs/sub/a.jpg", "labels": ["person"], "mask": "masks/a.png"},
    {"image_id": "custom", "image": "imgs/b.png", "labels": []},
]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_read_manifest_resolves_paths_and_defaults_ids(tmp_path, fmt):
    path = write_dataset(tmp_path / "ds", RECORDS, fmt)
    manifest = read_manifest(path)
    root = str((tmp_path / "ds").absolute())
    assert manifest.classes == CLASSES
    assert manifest.root == root
    assert manifest.rows == [
        ManifestRow("imgs/a", f"{root}/imgs/a.jpg", ("cat", "dog"), None),
        ManifestRow("imgs/sub/a", f"{root}/imgs/sub/a.jpg", ("person",), f"{root}/masks/a.png"),
        ManifestRow("custom", f"{root}/imgs/b.png", (), None),
    ]
    assert manifest.label_indices(manifest.rows[0]) == [1, 2]
    np.testing.assert_array_equal(manifest.label_targets(manifest.rows[1]), [0, 0, 1])
    assert manifest.num_foreground == 3 and manifest.class_index("dog") == 2


def test_json_array_manifest(tmp_path):
    path = write_dataset(tmp_path, RECORDS)
    array_path = tmp_path / "list.json"
    array_path.write_text(json.dumps(RECORDS, indent=2))
    assert read_manifest(array_path).rows == read_manifest(path).rows


def test_s3_root_and_absolute_paths():
    records = [
        {"image": "./x/1.jpg", "labels": ["cat"]},
        {"image": "s3://bucket/data/y/2.jpg", "labels": ["dog"], "mask": "/abs/m.png"},
        {"image": "s3://other/z/3.jpg", "labels": []},
        {"image": "/local/4.jpg", "labels": []},
    ]
    rows = parse_manifest_records(records, CLASSES, "s3://bucket/data/")
    assert [r.image for r in rows] == [
        "s3://bucket/data/x/1.jpg",
        "s3://bucket/data/y/2.jpg",
        "s3://other/z/3.jpg",
        "/local/4.jpg",
    ]
    assert [r.image_id for r in rows] == ["x/1", "y/2", "s3://other/z/3", "/local/4"]
    assert rows[1].mask == "/abs/m.png"
    manifest = Manifest(CLASSES, rows, "s3://bucket/data")
    assert missing_files(manifest) == [
        "row 2 (image_id 'y/2') mask '/abs/m.png'",
        "row 4 (image_id '/local/4') image '/local/4.jpg'",
    ]


def test_unknown_class_names_row_and_class():
    records = [{"image": "a.jpg", "labels": ["cat"]}, {"image": "b.jpg", "labels": ["zebra"]}]
    with pytest.raises(
        ManifestError, match=r"row 2 \(image 'b\.jpg'\): labels: unknown class 'zebra'"
    ):
        parse_manifest_records(records, CLASSES, "/r")


def test_background_label_is_rejected():
    with pytest.raises(ManifestError, match=r"row 1 .*labels: 'background' is implicit"):
        parse_manifest_records([{"image": "a.jpg", "labels": ["background"]}], CLASSES, "/r")


def test_duplicate_image_id_names_both_rows():
    records = [
        {"image": "a.jpg", "labels": []},
        {"image": "b.jpg", "labels": []},
        {"image": "a.png", "labels": ["cat"]},  # same default id 'a'
    ]
    with pytest.raises(
        ManifestError, match=r"row 3 \(image_id 'a'\): duplicate image_id, first used by row 1"
    ):
        parse_manifest_records(records, CLASSES, "/r")


def test_all_row_problems_are_reported_with_their_field():
    records = [
        {"labels": ["cat"]},
        {"image": "b.jpg"},
        {"image": "c.jpg", "labels": "cat"},
        {"image": 7, "labels": []},
        {"image": "e.jpg", "labels": [], "image_id": ""},
        {"image": "f.jpg", "labels": ["cat", "cat"]},
        {"image": "g.jpg", "labels": [], "colour": "red"},
        {"image": "h.jpg", "labels": [], "mask": ""},
    ]
    with pytest.raises(ManifestError) as info:
        parse_manifest_records(records, CLASSES, "/r")
    problems = info.value.problems
    assert len(problems) == 8
    assert problems[0] == "row 1: image: missing"
    assert problems[1].startswith("row 2 (image 'b.jpg'): labels: missing")
    assert problems[2] == "row 3 (image 'c.jpg'): labels: must be a list of class names, got 'cat'"
    assert problems[3] == "row 4: image: must be a non-empty path string, got 7"
    assert problems[4] == "row 5 (image 'e.jpg'): image_id: must be a non-empty string, got ''"
    assert problems[5] == "row 6 (image 'f.jpg'): labels: class 'cat' listed twice"
    assert "row 7 (image 'g.jpg'): unknown field(s) ['colour']" in problems[6]
    assert problems[7].startswith("row 8 (image 'h.jpg'): mask: must be a non-empty path")
    assert str(info.value).startswith("8 problems: row 1: image: missing; row 2")


def test_empty_manifest_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match="no rows"):
        parse_manifest_records([], CLASSES, "/r")
    path = write_dataset(tmp_path, [])
    with pytest.raises(ManifestError, match="no rows"):
        read_manifest(path)


def test_missing_files_are_all_reported(tmp_path):
    records = [{"image": f"img{i}.jpg", "labels": []} for i in range(15)]
    records[0]["mask"] = "m0.png"
    path = write_dataset(tmp_path, records, touch=False)
    (tmp_path / "img3.jpg").write_bytes(b"x")
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    message = str(info.value)
    assert message.startswith("15 file(s) listed in ")
    assert "row 1 (image_id 'img0') image" in message and "row 1 (image_id 'img0') mask" in message
    assert "and 5 more" in message
    assert len(info.value.problems) == 15
    assert not any("img3" in p for p in info.value.problems)
    assert len(read_manifest(path, check_files=False)) == 15


def test_malformed_jsonl_line_is_named():
    text = '{"image": "a.jpg", "labels": []}\n\n{"image": "b.jpg", "labels": [}\n[1, 2]\n'
    with pytest.raises(ManifestError) as info:
        parse_jsonl(text)
    assert info.value.problems[0].startswith("line 3: malformed JSON")
    assert info.value.problems[1] == "line 4: expected a JSON object, got list"
    assert parse_jsonl('\n{"a": 1}\n   \n{"b": 2}') == [{"a": 1}, {"b": 2}]


def test_read_manifest_names_the_file_on_row_errors(tmp_path):
    path = write_dataset(tmp_path, [{"image": "a.jpg", "labels": ["zebra"]}])
    with pytest.raises(ManifestError, match=r"manifest\.jsonl: 1 problem\(s\): row 1 .*'zebra'"):
        read_manifest(path)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def test_parquet_missing_and_unknown_columns_are_named():
    table = pa.table({"image_id": ["a"], "path": ["a.jpg"]})
    with pytest.raises(ManifestError) as info:
        parse_parquet(parquet_bytes(table))
    assert "missing required column(s) ['image', 'labels']" in info.value.problems[0]
    assert "unknown column(s) ['path']" in info.value.problems[1]


def test_parquet_nulls_mean_absent_optional_fields():
    table = pa.table(
        {
            "image_id": [None, "b"],
            "image": ["x/a.jpg", "b.jpg"],
            "labels": [["cat"], None],
            "mask": [None, "b.png"],
        }
    )
    records = parse_parquet(parquet_bytes(table))
    with pytest.raises(ManifestError, match=r"^row 2 \(image_id 'b'\): labels: missing"):
        parse_manifest_records(records, CLASSES, "/r")
    rows = parse_manifest_records(records[:1], CLASSES, "/r")
    assert rows == [ManifestRow("x/a", "/r/x/a.jpg", ("cat",), None)]


def test_parse_records_rejects_garbage():
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        parse_records(b"definitely not parquet", "m.parquet")
    with pytest.raises(ManifestError, match=r"unknown manifest format '\.csv'"):
        parse_records(b"image,labels\n", "m.csv")
    with pytest.raises(ManifestError, match="not UTF-8"):
        parse_records(b"\xff\xfe{}", "m.jsonl")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cat\ndog\n", r"line 1: must be 'background', got 'cat'"),
        ("", "empty class list"),
        ("background\ncat\n\ndog\n", "line 3: empty class name"),
        ("background\ncat\ndog\ncat\n", r"line 4: duplicate class name 'cat' \(first on line 2\)"),
        ("background\n", "no foreground classes"),
        ("\n".join(["background"] + [f"c{i}" for i in range(255)]), "256 classes, at most 255"),
    ],
)
def test_bad_class_lists(text, message):
    with pytest.raises(ManifestError, match=message):
        parse_classes(text)


def test_class_list_tolerates_trailing_blank_lines_and_crlf():
    assert parse_classes("background\r\ncat\r\nhot dog\r\n\r\n\n") == [
        "background",
        "cat",
        "hot dog",
    ]


def test_classes_txt_without_background_first_fails_read_manifest(tmp_path):
    path = write_dataset(tmp_path, RECORDS)
    (tmp_path / "classes.txt").write_text("cat\nbackground\ndog\nperson\n")
    with pytest.raises(ManifestError, match=r"classes\.txt line 1: must be 'background'"):
        read_manifest(path)


def test_missing_classes_txt(tmp_path):
    path = write_dataset(tmp_path, RECORDS)
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(ManifestError, match=r"classes\.txt: file not found"):
        read_manifest(path)


def make_voc(root: Path, masks: dict[str, np.ndarray], split_ids: list[str]) -> None:
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    palette = np.random.default_rng(1).integers(0, 256, 768, dtype=np.uint8).tobytes()
    for image_id, mask in masks.items():
        Image.new("RGB", mask.shape[::-1]).save(root / "JPEGImages" / f"{image_id}.jpg")
        im = Image.fromarray(mask).convert("P")
        im.putpalette(palette)  # VOC masks are palette PNGs: the index is the class
        im.save(root / "SegmentationClass" / f"{image_id}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(split_ids) + "\n")


def test_read_voc_derives_labels_from_masks(tmp_path):
    first = np.zeros((6, 8), np.uint8)
    first[1:3, 1:3] = 15  # person
    first[4:, 5:] = 8  # cat
    first[0, :] = 255  # boundary is not a label
    second = np.full((6, 8), 12, np.uint8)  # dog everywhere
    make_voc(
        tmp_path, {"2007_000001": first, "2007_000002": second}, ["2007_000001", "2007_000002"]
    )
    manifest = read_voc(tmp_path, "train")
    assert manifest.classes == list(VOC_CLASSES) and len(VOC_CLASSES) == 21
    root = str(tmp_path.absolute())
    assert manifest.rows == [
        ManifestRow(
            "2007_000001",
            f"{root}/JPEGImages/2007_000001.jpg",
            ("cat", "person"),
            f"{root}/SegmentationClass/2007_000001.png",
        ),
        ManifestRow(
            "2007_000002",
            f"{root}/JPEGImages/2007_000002.jpg",
            ("dog",),
            f"{root}/SegmentationClass/2007_000002.png",
        ),
    ]
    assert manifest.label_indices(manifest.rows[0]) == [8, 15]


def test_read_voc_reports_missing_files_and_bad_masks(tmp_path):
    bad = np.full((4, 4), 30, np.uint8)
    make_voc(tmp_path, {"a": np.zeros((4, 4), np.uint8), "bad": bad}, ["a", "gone1", "gone2"])
    with pytest.raises(ManifestError) as info:
        read_voc(tmp_path)
    assert str(info.value).startswith("4 file(s) listed in VOC 'train' split do not exist")
    assert info.value.problems[0].startswith("row 2 (image_id 'gone1') image")
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("a\nbad\n")
    with pytest.raises(ManifestError, match=r"row 2 \(image_id 'bad'\) mask: .*\[30\] beyond"):
        read_voc(tmp_path)
    with pytest.raises(ManifestError, match=r"split 'val' not found; available: \['train'\]"):
        read_voc(tmp_path, "val")


def test_voc_split_duplicate_ids(tmp_path):
    make_voc(tmp_path, {"a": np.zeros((4, 4), np.uint8)}, ["a", "a"])
    with pytest.raises(ManifestError, match=r"line 2: duplicate id 'a' \(first on line 1\)"):
        read_voc(tmp_path)


def test_labels_from_mask_file_round_trip(tmp_path):
    mask = np.array([[0, 3, 3], [255, 1, 0]], np.uint8)
    assert labels_from_mask(mask, CLASSES) == ("cat", "person")
    (tmp_path / "m.png").write_bytes(encode_mask(mask))
    assert labels_from_mask(np.asarray(Image.open(tmp_path / "m.png")), CLASSES) == (
        "cat",
        "person",
    )
