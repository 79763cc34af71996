"""`wsss evaluate` on shards written here with known masks: exact scores, and no score at all
when the ground truth is entirely ignore."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARD_VERSION as VERSION
from conftest import write_label_shard
from PIL import Image

from pipelines import evaluate, gallery
from pipelines.config import load_config
from wsss import synthetic
from wsss.imageio import IGNORE_INDEX, encode_mask, read_mask
from wsss.metrics import ConfusionMatrix
from wsss.synthetic import SyntheticParams

pytestmark = pytest.mark.slow
N_IMAGES = 6


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    params = SyntheticParams(n_classes=3, min_side=40, max_side=56, max_objects=2)
    return synthetic.generate(tmp_path / "data", N_IMAGES, 5, params).parent


def config(data_dir: Path, tmp_path: Path, *extra: str):
    return load_config(
        overrides=[
            f"dataset.manifest={data_dir / 'manifest.jsonl'}",
            f"output={tmp_path / 'runs'}",
            "evaluate.gallery_images=4",
            *extra,
        ]
    )


def all_background(truth: np.ndarray) -> np.ndarray:
    return np.where(truth == IGNORE_INDEX, IGNORE_INDEX, 0).astype(np.uint8)


def test_ground_truth_as_labels_scores_one_and_the_gallery_shows_it(
    ray_cluster, data_dir, tmp_path
):
    out = tmp_path / "out"
    write_label_shard(out, data_dir, all_background)
    lines: list[str] = []
    result = evaluate.run(
        config(data_dir, tmp_path), str(out), model_version=VERSION, log=lines.append
    )

    stages = result["stages"]
    assert stages["crf"]["miou"] == 1.0 and stages["cam"]["miou"] == 1.0
    assert stages["crf"]["images"] == N_IMAGES
    # The walk's all-background masks, scored independently of the pipeline.
    expected = ConfusionMatrix(4)
    for mask in sorted((data_dir / "masks").glob("*.png")):
        truth = read_mask(mask)
        expected.update(all_background(truth), truth)
    assert stages["random_walk"]["miou"] == pytest.approx(expected.miou(), abs=1e-4)
    assert stages["random_walk"]["counts"] == expected.counts.tolist()
    assert stages["random_walk"]["miou"] < 0.5

    # The class report: the final masks are the ground truth, so each class's area is its mean
    # share of the images labelled with it there; the walk's all-background masks give it none.
    rows = [json.loads(line) for line in (data_dir / "manifest.jsonl").read_text().splitlines()]
    classes = result["classes"]
    for entry in result["class_report"]:
        labelled = [r for r in rows if entry["class"] in r["labels"]]
        c = classes.index(entry["class"])
        if not labelled:
            assert entry["presence"] == 0 and entry["area"]["crf"] is None
            continue
        shares = [(read_mask(data_dir / r["mask"]) == c).mean() for r in labelled]
        assert entry["presence"] == pytest.approx(len(labelled) / N_IMAGES, abs=1e-4)
        assert entry["area"]["crf"] == pytest.approx(np.mean(shares), abs=1e-4)
        assert entry["area"]["random_walk"] == 0.0
    assert "| class | labelled in |" in "\n".join(lines)

    saved = json.loads((out / evaluate.RESULT_FILE).read_text())
    assert saved["stages"] == stages
    table = "\n".join(lines)
    assert "| crf | 100.0 |" in table and "| cam | 100.0 |" in table

    # The gallery (evaluate.gallery_images, here 4): image, ground truth, CAM, final per row.
    folder = out / gallery.FOLDER
    sheet = np.asarray(Image.open(folder / "gallery.png"))
    assert sheet.ndim == 3 and sheet.shape[0] > 4 * 40  # four rows of tiles with captions
    page = (folder / "index.html").read_text()
    pictures = re.findall(r'<img src="([^"]+)"', page)
    assert len(pictures) == 4 * 4
    for name in pictures:
        assert np.asarray(Image.open(folder / name)).ndim == 3
    assert page.count("(final mIoU 100)") == 4  # the final masks are the ground truth
    assert "background" in page and "ignore (255)" in page


def test_the_stages_evaluated_are_the_configured_methods(ray_cluster, data_dir, tmp_path):
    """A method without the walk (refiners: [crf]) has shards without mask_rw: its evaluation
    has the rows cam and crf, and the class report's final stage is the CRF's."""
    out = tmp_path / "out"
    write_label_shard(out, data_dir, all_background, stages=("cam", "crf"))
    cfg = config(data_dir, tmp_path, "refiners=[crf]", "evaluate.gallery_images=0")
    assert cfg.stages == ("cam", "crf")
    result = evaluate.run(cfg, str(out), model_version=VERSION, log=lambda _: None)
    assert list(result["stages"]) == ["cam", "crf"]
    assert result["stages"]["crf"]["miou"] == 1.0 and result["stages"]["cam"]["miou"] == 1.0
    assert all(set(entry["area"]) == {"cam", "crf"} for entry in result["class_report"])


def test_all_ignore_ground_truth_reports_nothing_evaluated(ray_cluster, data_dir, tmp_path):
    for mask in (data_dir / "masks").glob("*.png"):
        shape = read_mask(mask).shape
        mask.write_bytes(encode_mask(np.full(shape, IGNORE_INDEX, np.uint8)))
    out = tmp_path / "out"
    write_label_shard(out, data_dir, lambda truth: truth)
    lines: list[str] = []
    result = evaluate.run(
        config(data_dir, tmp_path), str(out), model_version=VERSION, log=lines.append
    )

    for stage in ("cam", "random_walk", "crf"):
        assert result["stages"][stage]["miou"] is None
        assert result["stages"][stage]["pixels"] == 0
        assert "nothing evaluated" in result["stages"][stage]["note"]
    assert "| crf | nothing evaluated |" in "\n".join(lines)


def test_unusable_ground_truth_skips_its_row_not_the_evaluation(ray_cluster, data_dir, tmp_path):
    masks = sorted((data_dir / "masks").glob("*.png"))
    out = tmp_path / "out"
    write_label_shard(out, data_dir, lambda truth: truth)  # shards of the masks as they were
    wrong_size = read_mask(masks[0])[:-3]
    masks[0].write_bytes(encode_mask(wrong_size))
    masks[1].write_bytes(b"not a png")
    lines: list[str] = []
    cfg = config(data_dir, tmp_path, "evaluate.gallery_images=0")
    result = evaluate.run(cfg, str(out), model_version=VERSION, log=lines.append)
    assert result["ground_truth_unusable"] == 2
    problems = "\n".join(result["ground_truth_problems"])
    assert f"is {wrong_size.shape}, the masks" in problems and "ImageDecodeError" in problems
    for stage in ("cam", "random_walk", "crf"):  # the other images are evaluated, and perfectly
        assert result["stages"][stage]["images"] == N_IMAGES - 2
        assert result["stages"][stage]["miou"] == 1.0
    assert any("2 image(s) not evaluated" in line for line in lines)


def test_a_manifest_without_ground_truth_is_refused(ray_cluster, data_dir, tmp_path):
    manifest = data_dir / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "mask"}) + "\n" for r in rows)
    )
    with pytest.raises(evaluate.ConfigError, match="no ground-truth masks"):
        evaluate.run(config(data_dir, tmp_path), str(tmp_path / "out"), model_version=VERSION)


def test_gallery_file_names_are_safe_and_distinct_whatever_the_image_id():
    ids = ["../../etc/passwd", "a/b c", "a_b c", "", "ok-1", "x" * 300]
    stems = [gallery.file_stem(i) for i in ids]
    assert len(set(stems)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]{1,89}", stem) for stem in stems)
    assert all(not stem.startswith(".") for stem in stems)
    assert stems[4].startswith("ok-1-")
