"""`wsss run`: all stages in order on the local S3 server; a second run skips what is done."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import tiny_networks, upload_dataset

from pipelines import storage
from pipelines.cli import main
from pipelines.config import ConfigError, load_config
from pipelines.run import run, stage_sections
from wsss import synthetic
from wsss.synthetic import SyntheticParams


def test_the_stages_follow_the_networks_and_refiners_of_the_method():
    default = stage_sections(load_config())
    assert list(default) == ["train-classifier", "train-affinity", "label", "evaluate"]
    assert default["label"][-5:] == ("refiners", "random_walk", "crf", "pseudo_label", "label")
    crf_only = stage_sections(load_config(overrides=["refiners=[crf]"]))
    assert list(crf_only) == ["train-classifier", "label", "evaluate"]
    # Without the walk, AffinityNet's settings do not shape the labels.
    assert "affinity" not in crf_only["label"] and "random_walk" not in crf_only["label"]


@pytest.fixture(scope="module")
def overrides(ray_cluster, s3_endpoint, tmp_path_factory) -> list[str]:
    data = tmp_path_factory.mktemp("data")
    params = SyntheticParams(n_classes=2, min_side=48, max_side=56, max_objects=1)
    synthetic.generate(data, 8, seed=4, params=params)
    bucket = upload_dataset(s3_endpoint, data)
    settings = [
        f"dataset.manifest=s3://{bucket}/data/manifest.jsonl",
        f"output=s3://{bucket}/runs",
        f"storage.s3_endpoint_url={s3_endpoint}",
        "cam.scales=[1.0]",
        "random_walk.logt=3",
        "crf.iterations=1",
        "label.keep_stages=true",
        "evaluate.gallery_images=2",
        *tiny_networks(crop=48, longest=56),
    ]
    return settings


@pytest.mark.slow
def test_run_does_every_stage_once_and_redoes_what_changed(overrides, capfd, tmp_path):
    cfg = load_config(overrides=overrides)
    quiet = {"log": lambda _: None}
    first = run(cfg, **quiet)
    assert first == dict.fromkeys(
        ["train-classifier", "train-affinity", "label", "evaluate"], "done"
    )
    result = json.loads(
        storage.read_bytes(storage.join(cfg.run_uri, "evaluation.json"), cfg.storage)
    )
    assert set(result["stages"]) == {"cam", "random_walk", "crf"}
    assert result["stages"]["crf"]["images"] == 8
    marker = json.loads(storage.read_bytes(cfg.layout.marker("label"), cfg.storage))
    assert marker["config_hash"] == cfg.hash()

    # Through the CLI, as `make demo` runs it: nothing left to do; the saved table is printed.
    args = ["run", "--set", f"log_dir={tmp_path}"] + [a for o in overrides for a in ("--set", o)]
    assert main(args) == 0
    out = capfd.readouterr().out
    assert "train-classifier: skipped, train-affinity: skipped, label: skipped" in out
    assert "| crf |" in out
    # Ray's own output went to the log file the first line names, not to the terminal.
    log = Path(re.search(r"own output goes to (\S+)", out).group(1))
    assert log.parent == tmp_path and log.name.startswith("run-") and log.exists()

    # A refinement setting changed: the shards are relabelled and evaluated again, the
    # networks are not retrained.
    crf = load_config(overrides=[*overrides, "crf.iterations=2"])
    again = run(crf, **quiet)
    assert again == {
        "train-classifier": "skipped",
        "train-affinity": "skipped",
        "label": "relabelled",
        "evaluate": "done",
    }
    summary = json.loads(
        storage.read_bytes(storage.join(cfg.run_uri, "label_summary.json"), cfg.storage)
    )
    assert summary["labelled"] + summary["errors"] == 8 and summary["force"]

    # Another method, the CRF alone on the CAMs: no AffinityNet to train, the shards relabelled
    # with its stages and evaluated by them.
    crf_only = load_config(overrides=[*overrides, "crf.iterations=2", "refiners=[crf]"])
    assert run(crf_only, **quiet) == {
        "train-classifier": "skipped",
        "label": "relabelled",
        "evaluate": "done",
    }
    result = json.loads(
        storage.read_bytes(storage.join(cfg.run_uri, "evaluation.json"), cfg.storage)
    )
    assert list(result["stages"]) == ["cam", "crf"]

    # A training setting changed: refused, naming the section (the checkpoints are the old ones).
    lr = load_config(overrides=[*overrides, "classifier.optim.lr=0.01"])
    with pytest.raises(
        ConfigError, match="trained its classifier with other settings .*classifier"
    ):
        run(lr, **quiet)
