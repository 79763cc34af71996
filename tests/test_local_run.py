"""End to end in one process: synthetic data in, per-stage mIoU and the saved config out."""

import json

import pytest

from pipelines import local_run
from pipelines.config import load_config
from pipelines.evaluate import format_table
from wsss import synthetic
from wsss.synthetic import SyntheticParams


@pytest.mark.slow
def test_run_local_trains_labels_and_reports_every_stage(tmp_path):
    params = SyntheticParams(n_classes=3, min_side=64, max_side=80, max_objects=2)
    manifest = synthetic.generate(tmp_path / "data", 12, seed=3, params=params)
    tiny = {"algorithm": "adamw", "lr": 1e-3, "head_lr_mult": 1, "epochs": 1, "batch_size": 6}
    overrides = [
        f"dataset.manifest={manifest}",
        f"output={tmp_path / 'runs'}",
        "name=tiny",
        "classifier.model.backbone.name=resnet18",
        "classifier.model.backbone.weights=null",
        "affinity.model.backbone.name=resnet18",
        "affinity.model.backbone.weights=null",
        "affinity.model.feature_stride=8",
        "classifier.augment.crop_size=64",
        "affinity.augment.crop_size=64",
        "classifier.augment.resize_long=[64, 80]",
        "affinity.augment.resize_long=[64, 80]",
        "cam.scales=[1.0]",
        "random_walk.logt=4",
        "crf.iterations=2",
    ]
    overrides += [
        f"{net}.optim.{k}={v}" for net in ("classifier", "affinity") for k, v in tiny.items()
    ]
    cfg = load_config(overrides=overrides)
    lines = []
    summary = local_run.run(cfg, log=lines.append)

    assert summary["images"] == summary["evaluated"] == 12
    assert set(summary["stages"]) == {"cam", "random_walk", "crf"}
    for stage in summary["stages"].values():
        assert 0.0 <= stage["miou"] <= 1.0 and stage["images"] == 12
    assert len(summary["stages"]["crf"]["iou"]) == 4  # background + 3 classes
    assert summary["cam_best_miou"] >= summary["cam_threshold_sweep"]["0.15"]
    assert any("classifier epoch 1" in line for line in lines)

    out = tmp_path / "runs" / "tiny" / "local"
    assert load_config(out / "config.yaml") == cfg  # the resolved config is saved beside
    saved = json.loads((out / "summary.json").read_text())
    assert saved["stages"] == summary["stages"] and saved["config_hash"] == cfg.hash()
    table = format_table(summary["classes"], summary["stages"])
    assert table.splitlines()[0].startswith("| stage | mIoU | background |")
    assert len(table.splitlines()) == 5
