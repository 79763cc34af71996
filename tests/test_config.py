import pytest
import yaml

from pipelines.config import ConfigError, RunConfig, apply_override, load_config
from wsss.refiners import REFINERS


def test_defaults_are_valid_and_hash_is_stable():
    a, b = load_config(), RunConfig()
    assert a == b
    assert a.hash() == b.hash()
    assert load_config(overrides=["seed=1"]).hash() != a.hash()


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump({"name": "nightly", "classifier": {"optim": {"epochs": 7, "lr": 0.05}}})
    )
    cfg = load_config(path, ["classifier.optim.epochs=2", "cam.scales=[1.0, 0.5]"])
    assert cfg.name == "nightly"
    assert cfg.classifier.optim.epochs == 2  # the command line wins over the file
    assert cfg.classifier.optim.lr == 0.05
    assert tuple(cfg.cam.scales) == (1.0, 0.5)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(overrides=["crf.iterations=4", "ray.train_workers=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("classifier.optim.epochs=0", "classifier.optim.epochs"),
        ("classifier.optim.lr=-1", "classifier.optim.lr"),
        ("crf.iterations=abc", "crf.iterations"),
        ("cam.scales=[]", "cam.scales"),
        ("random_walk.beta=0", "random_walk.beta"),
        ("classifier.model.backbone.name=resnet7", "classifier.model.backbone.name"),
        ("storage.s3_max_attempts=0", "storage.s3_max_attempts"),
        ("dataset.typo_field=1", "dataset.typo_field"),
        ("refiners=[random_walk, densecrf]", "refiners"),
        ("refiners=[crf, crf]", "refiners"),
        ("classifier.model.pooling=wildcat", "classifier.model.pooling"),
        ("classifier.model.pooling={name: top_k, kmax: -1}", "classifier.model.pooling.top_k.kmax"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=[override])
    assert field in str(exc.value)


def test_the_method_follows_the_configured_refiners():
    default = RunConfig()
    assert default.stages == ("cam", "random_walk", "crf")
    assert default.networks == ("classifier", "affinity")
    crf_only = load_config(overrides=["refiners=[crf]"])
    assert crf_only.stages == ("cam", "crf") and crf_only.networks == ("classifier",)
    assert crf_only.hash() != default.hash()
    with pytest.raises(ConfigError, match=r"unknown refiner.*'densecrf'.*registered"):
        load_config(overrides=["refiners=[densecrf]"])
    # Each registered refiner has its section, and the schema lists the names.
    schema = RunConfig.model_json_schema()
    assert {"random_walk", "crf"} <= set(schema["properties"])
    assert schema["properties"]["refiners"]["items"]["enum"] == sorted(REFINERS)
    assert {"crf", "deep_clustering", "random_walk"} <= set(REFINERS)


def test_radius_must_agree_between_labels_and_network():
    with pytest.raises(ConfigError, match="radius"):
        load_config(overrides=["affinity.labels.radius=4"])


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="section.field=value"):
        apply_override({}, "noequals")
    with pytest.raises(ConfigError, match="not a section"):
        apply_override({"name": "x"}, "name.inner=1")


def test_shipped_config_files_validate():
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert files, "configs/ holds example configurations"
    for path in files:
        cfg = load_config(path)
        assert cfg.name  # every shipped file is a complete, valid run description


def test_setting_one_field_keeps_the_other_defaults_of_its_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("affinity:\n  model:\n    feature_stride: 8\n")
    for cfg in (load_config(path), load_config(overrides=["affinity.model.feature_stride=8"])):
        assert cfg.affinity.model.feature_stride == 8
        assert cfg.affinity.model.backbone == load_config().affinity.model.backbone  # the demo's


def test_the_run_layout_says_where_everything_goes():
    layout = load_config(overrides=["output=s3://b/runs", "name=n"]).layout
    assert layout.root == "s3://b/runs/n"
    assert layout.record("affinity") == "s3://b/runs/n/models/affinity.json"
    assert layout.checkpoints == "s3://b/runs/n/train"
    assert layout.marker("label") == "s3://b/runs/n/stages/label.json"
    assert layout.labels == layout.report() == "s3://b/runs/n"
    assert layout.relabel == "s3://b/runs/n/relabel"
    assert layout.calibrated == "s3://b/runs/n/calibrated.yaml"
    # Outputs set elsewhere: the shards (and relabel's sets), the report, the calibration.
    moved = load_config(
        overrides=["label.out=/data/labels", "evaluate.out=/data/report", "calibrate.out=/c.yaml"]
    ).layout
    assert (moved.labels, moved.relabel) == ("/data/labels", "/data/labels/relabel")
    assert moved.report() == moved.report("/other") == "/data/report"
    assert moved.calibrated == "/c.yaml"
    assert load_config().layout.report("/other") == "/other"
