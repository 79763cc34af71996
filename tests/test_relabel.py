"""`wsss relabel` on the local S3 server: a second run on the same night labels nothing, added
or rewritten images are labelled and nothing else."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from conftest import upload_dataset

from pipelines import relabel, shards, storage
from pipelines.config import load_config
from pipelines.model_record import save_model
from wsss import synthetic
from wsss.affinity import AffinityNet
from wsss.classifier import Classifier
from wsss.synthetic import SyntheticParams

pytestmark = pytest.mark.slow
PARAMS = SyntheticParams(n_classes=2, min_side=40, max_side=48, max_objects=1)


def labelled_ids(night: str, cfg) -> list[str]:
    """image_ids of every labels/ and errors/ row of a dated shard set."""
    fs, _ = storage.filesystem(night, cfg.storage)
    ids = []
    for kind in (shards.LABELS, shards.ERRORS):
        for path in shards.shard_files(night, kind, cfg.storage, model_version=None):
            with fs.open_input_file(path) as f:
                ids += pq.read_table(f, columns=["image_id"]).column("image_id").to_pylist()
    return sorted(ids)


def test_relabel_labels_only_what_is_new_or_changed(ray_cluster, s3_endpoint, tmp_path):
    data = tmp_path / "data"
    synthetic.generate(data, 5, seed=2, params=PARAMS)
    bucket = upload_dataset(s3_endpoint, data)
    cfg = load_config(
        overrides=[
            f"dataset.manifest=s3://{bucket}/data/manifest.jsonl",
            f"output=s3://{bucket}/runs",
            f"storage.s3_endpoint_url={s3_endpoint}",
            "cam.scales=[1.0]",
            "affinity.model.feature_stride=8",
            "crf.iterations=1",
            "random_walk.logt=3",
        ]
    )
    classes = (data / "classes.txt").read_text().split()
    models = storage.join(cfg.run_uri, "imported")
    # Untrained networks: relabel decides what to label, not how well.
    save_model(Classifier(len(classes) - 1, cfg.classifier.model), classes, cfg, models + "/c")
    save_model(AffinityNet(cfg.affinity.model), classes, cfg, models + "/a")
    root = storage.join(cfg.run_uri, relabel.FOLDER)
    quiet = {"log": lambda _: None}

    first = relabel.run(cfg, date="2026-11-20", **quiet)
    assert first["new_or_changed"] == 5 and first["labelled"] + first["errors"] == 5
    night = storage.join(root, "2026-11-20")
    assert labelled_ids(night, cfg) == [f"synth-{i:06d}" for i in range(5)]

    again = relabel.run(cfg, date="2026-11-20", **quiet)
    assert again["new_or_changed"] == 0 and "labelled" not in again
    assert len(labelled_ids(night, cfg)) == 5  # no new rows

    # Two images added to the collection and one rewritten with other content.
    synthetic.generate(data, 7, seed=2, params=PARAMS)
    (data / "images" / "synth-000001.png").write_bytes(
        (data / "images" / "synth-000006.png").read_bytes()
    )
    changed = ["manifest.jsonl", *(f"images/synth-00000{i}.png" for i in (1, 5, 6))]
    upload_dataset(s3_endpoint, data, bucket, changed)
    next_night = relabel.run(cfg, date="2026-11-21", **quiet)
    assert next_night["new_or_changed"] == 3
    assert labelled_ids(storage.join(root, "2026-11-21"), cfg) == [
        "synth-000001",
        "synth-000005",
        "synth-000006",
    ]
    fs, folder = storage.filesystem(storage.join(root, relabel.RUNS), cfg.storage)
    records = sorted(info.path for info in fs.get_file_info(pafs.FileSelector(folder)))
    assert len(records) == 3  # one record per run, the empty one included
    last = json.loads(storage.read_bytes("s3://" + records[-1], cfg.storage))
    assert last["run_id"] == next_night["run_id"] and last["date"] == "2026-11-21"
