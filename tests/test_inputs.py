import io
import json

import boto3
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
import torchvision

from pipelines import inputs
from pipelines.config import load_config
from pipelines.manifests import ManifestError
from wsss import synthetic
from wsss.backbones import BackboneParams, build_backbone, load_backbone_weights
from wsss.classifier import ClassifierParams
from wsss.synthetic import SyntheticParams


def _upload_folder(client, bucket, folder, prefix):
    for path in folder.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")


def test_manifest_from_s3_resolves_rows_against_the_prefix(tmp_path, s3_endpoint, s3_bucket):
    params = SyntheticParams(n_classes=2, min_side=40, max_side=48)
    synthetic.generate(tmp_path, 3, seed=1, params=params)
    _upload_folder(boto3.client("s3", endpoint_url=s3_endpoint), s3_bucket, tmp_path, "ds")
    cfg = load_config(
        overrides=[
            f"dataset.manifest=s3://{s3_bucket}/ds/manifest.jsonl",
            f"storage.s3_endpoint_url={s3_endpoint}",
        ]
    )
    manifest = inputs.load_manifest(cfg)
    assert len(manifest) == 3 and manifest.classes[0] == "background"
    assert manifest.rows[0].image.startswith(f"s3://{s3_bucket}/ds/images/")


def test_missing_s3_manifest_is_a_manifest_error(s3_endpoint, s3_bucket):
    cfg = load_config(
        overrides=[
            f"dataset.manifest=s3://{s3_bucket}/nothing/manifest.jsonl",
            f"storage.s3_endpoint_url={s3_endpoint}",
        ]
    )
    with pytest.raises(ManifestError, match="cannot read manifest"):
        inputs.load_manifest(cfg)


def test_backbone_weights_from_s3(s3_endpoint, s3_bucket):
    state = torchvision.models.resnet18(weights=None).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(
        Bucket=s3_bucket, Key="weights/r18.pt", Body=buffer.getvalue()
    )
    cfg = load_config(overrides=[f"storage.s3_endpoint_url={s3_endpoint}"])
    uri = f"s3://{s3_bucket}/weights/r18.pt"
    params = ClassifierParams(backbone=BackboneParams(name="resnet18", weights=uri))
    resolved = inputs.resolve_weights(params, cfg)
    assert not resolved.backbone.weights.startswith("s3://")
    assert resolved.pooling == params.pooling
    backbone = build_backbone("resnet18")
    load_backbone_weights(backbone, resolved.backbone.weights)
    assert torch.equal(backbone.conv1.weight, state["conv1.weight"])
    assert inputs.resolve_weights(ClassifierParams(), cfg) == ClassifierParams()


def test_rows_outside_the_allowed_roots_are_refused(tmp_path):
    from pipelines.label import rows as label_rows
    from pipelines.manifests import outside_roots

    roots = ("s3://images", "s3://shared/team-a/", str(tmp_path))
    assert outside_roots("s3://images/a.png", ()) is None  # no roots: anywhere
    for inside in ("s3://images/a.png", "s3://shared/team-a/x/b.png", f"{tmp_path}/c.png"):
        assert outside_roots(inside, roots) is None
    for outside in (
        "s3://images2/a.png",  # another bucket whose name starts alike
        "s3://shared/team-b/b.png",
        f"{tmp_path}/../escape.png",  # ".." cannot climb out
        "/etc/passwd",
    ):
        assert "outside dataset.allowed_roots" in outside_roots(outside, roots)
    batch = pa.Table.from_pylist(
        [
            label_rows.manifest_row("in", "s3://images/a.png", ["cat"], key="k1"),
            label_rows.manifest_row("out", "s3://elsewhere/a.png", ["cat"], key="k2"),
        ],
        schema=label_rows.ROW_SCHEMA,
    )
    checked = label_rows.within_roots(batch, roots).to_pylist()
    assert [r["outcome"] for r in checked] == [label_rows.OK, label_rows.ERROR]
    assert checked[1]["error_type"] == "OutsideAllowedRoots"
    # Keyed by its problem, not as the valid row: once the roots admit it, it is labelled.
    assert checked[0]["row_key"] == "k1" and checked[1]["row_key"] not in (None, "k2")
    # The driver's manifest reader (training, run-local, evaluate) refuses the whole manifest.
    manifest = synthetic.generate(tmp_path / "ds", 2, seed=1, params=SyntheticParams(n_classes=2))
    cfg = load_config(
        overrides=[f"dataset.manifest={manifest}", "dataset.allowed_roots=[s3://images]"]
    )
    with pytest.raises(ManifestError, match="outside dataset.allowed_roots"):
        inputs.load_manifest(cfg)


def test_the_planning_joins_have_a_partition_per_join_partition_rows_manifest_rows(tmp_path):
    cfg = load_config(overrides=["label.join_partition_rows=1000"])
    fs = pafs.LocalFileSystem()
    rows = [
        {"image_id": f"img-{i:05d}", "image": f"{i}.jpg", "labels": ["cat"]} for i in range(2500)
    ]
    parquet, jsonl = tmp_path / "manifest.parquet", tmp_path / "manifest.jsonl"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # Counted in the footer, whatever the file's size.
    assert inputs.join_partitions(cfg, fs, str(parquet), parquet.stat().st_size) == 3
    # Estimated from the size: never fewer partitions than the rows need, a few more at most.
    lines = inputs.join_partitions(cfg, fs, str(jsonl), jsonl.stat().st_size)
    assert 3 <= lines <= 4
    one = cfg.model_copy(
        update={"label": cfg.label.model_copy(update={"join_partition_rows": 10**6})}
    )
    assert inputs.join_partitions(one, fs, str(parquet), parquet.stat().st_size) == 1
