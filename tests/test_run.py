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
from pipelines.iterate import format_rounds, round_config
from pipelines.run import TRAINERS, _train, run, stage_sections, stages
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
    # Each iterate round trains the unary and the networks of the refiners, labels, evaluates;
    # the round count is not among what a round depends on, so adding rounds keeps those done.
    rounds = stage_sections(load_config(overrides=["iterate.rounds=2"]))
    round_stages = ["train-segmentation", "train-affinity", "label", "evaluate"]
    assert list(rounds) == [
        *default,
        *(f"round-{r}/{stage}" for r in (1, 2) for stage in round_stages),
    ]
    assert rounds["round-1/label"] == rounds["round-2/label"]
    assert {"segmentation.inference", "iterate.train_on", "iterate.confident"} <= set(
        rounds["round-1/label"]
    )
    # The unary's training does not read the affinity labels' threshold nor its own inference;
    # the segmentation settings a round derives (what it trains on) are no one's.
    unary = rounds["round-1/train-segmentation"]
    assert "iterate.confident" not in unary and "segmentation.inference" not in unary
    assert "segmentation.optim" in unary and "segmentation" not in unary
    assert not any(section.startswith("iterate") for section in rounds["label"])
    assert "iterate.rounds" not in rounds["round-1/label"]
    # No stage reads an evaluation: another gallery runs the evaluations again, nothing else.
    planned = stages(load_config(overrides=["iterate.rounds=2"]))
    assert not any(name.endswith("evaluate") for stage in planned for name in stage.inputs)
    assert [stage.name for stage in planned if "evaluate" in stage.sections] == [
        "evaluate",
        "round-1/evaluate",
        "round-2/evaluate",
    ]


def test_a_round_is_a_run_of_its_own_inside_the_run_trained_on_the_last_rounds_masks():
    cfg = load_config(
        overrides=[
            "output=s3://b/runs",
            "iterate.rounds=2",
            "iterate.train_on=random_walk",
            "label.keep_stages=true",
        ]
    )
    first, second = round_config(cfg, 1), round_config(cfg, 2)
    assert first.run_uri == "s3://b/runs/demo/round-1" == first.layout.labels
    assert first.layout.record("affinity") == "s3://b/runs/demo/round-1/models/affinity.json"
    assert first.label.model == "refined_segmentation" and first.iterate.rounds == 0
    assert first.stages == ("segmentation", "random_walk", "crf")
    # Round 1 trains on the run's shards, round 2 on round 1's, each on the walk's kept masks.
    assert first.segmentation.labels == cfg.layout.labels == "s3://b/runs/demo"
    assert second.segmentation.labels == "s3://b/runs/demo/round-1"
    assert first.segmentation.labels_column == second.segmentation.labels_column == "mask_rw"
    assert first.segmentation.train_on == "pseudo_labels"
    # With the shards elsewhere, each round's go beside the run's.
    moved = round_config(load_config(overrides=["iterate.rounds=1", "label.out=/data/l"]), 1)
    assert moved.layout.labels == "/data/l/round-1"
    assert moved.segmentation.labels == "/data/l" and moved.segmentation.labels_column == "mask"


def test_the_rounds_table_puts_the_seed_stages_first_and_leaves_missing_stages_blank():
    table = format_rounds(
        [
            {"round": 0, "miou": {"cam": 0.466, "random_walk": 0.445, "crf": 0.637}},
            {"round": 1, "miou": {"segmentation": 0.577, "random_walk": 0.616, "crf": None}},
        ]
    )
    assert table.splitlines() == [
        "| round | cam | segmentation | random_walk | crf |",
        "|---|---|---|---|---|",
        "| 0 | 46.6 |  | 44.5 | 63.7 |",
        "| 1 |  | 57.7 | 61.6 |  |",
    ]


def test_a_rounds_training_resumes_only_on_the_inputs_it_started_with(tmp_path, monkeypatch):
    cfg = load_config(overrides=[f"output={tmp_path}", "iterate.rounds=1"])
    unary = next(stage for stage in stages(cfg) if stage.name == "round-1/train-segmentation")
    trained = []
    monkeypatch.setitem(TRAINERS, "segmentation", lambda cfg, log: trained.append(cfg.name))
    checkpoint = Path(unary.cfg.layout.checkpoints) / "segmentation" / "epoch_0000" / "weights"
    started = {"sections": {"segmentation.optim": "a"}, "inputs": {"label": {"finished_at": "1"}}}

    def train(fingerprint: dict) -> bool:
        """Train; whether the checkpoint of the training before is still there to resume."""
        _train(unary, fingerprint, log=lambda _: None)
        return checkpoint.exists()

    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"epoch 0")
    assert train(started)  # killed part-way, started again on the same inputs: resumed
    relabelled = {**started, "inputs": {"label": {"finished_at": "2"}}}
    assert not train(relabelled)  # the shards it trains on were made anew: afresh
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"epoch 0")
    Path(unary.marker).write_text("{}")  # finished before: running again means afresh
    assert not train(relabelled) and not Path(unary.marker).exists()
    assert trained == ["round-1"] * 3


@pytest.mark.parametrize(
    "settings, message",
    [
        (["iterate.train_on=cam"], "iterate.train_on: 'cam' is neither final nor one of"),
        (["iterate.rounds=1", "iterate.train_on=random_walk"], "label.keep_stages"),
        (["iterate.rounds=1", "label.model=segmentation"], "iterate.rounds: .*label.model"),
        (["iterate.rounds=-1"], "iterate.rounds"),
        (["iterate.confident=1"], "iterate.confident"),
    ],
)
def test_iterate_settings_are_checked_before_any_work(settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=settings)
    # The final stage's masks are always stored: training on them needs nothing kept.
    assert load_config(overrides=["iterate.rounds=1", "iterate.train_on=crf"]).iterate.rounds


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


@pytest.fixture(scope="module")
def first_run(overrides) -> dict[str, str]:
    """The method's run, once for the module: its networks serve each test below."""
    return run(load_config(overrides=overrides), log=lambda _: None)


@pytest.mark.slow
def test_an_iterate_round_writes_its_own_shard_set_and_a_second_run_skips_it(overrides, first_run):
    # The rounds added to the method's run: its networks are kept, the rounds train their own.
    settings = [
        *overrides,
        "iterate.rounds=1",
        "iterate.train_on=random_walk",
        "iterate.confident=0.6",
        *tiny_networks(crop=48, longest=56, nets=("segmentation",)),
    ]
    cfg = load_config(overrides=settings)
    quiet = {"log": lambda _: None}
    round_stages = ["train-segmentation", "train-affinity", "label", "evaluate"]
    outcome = run(cfg, **quiet)
    assert outcome["train-classifier"] == outcome["train-affinity"] == "skipped"
    assert outcome["label"] == "skipped"  # this test runs first: the next one relabels
    assert [outcome[f"round-1/{stage}"] for stage in round_stages] == ["done"] * 4
    first = round_config(cfg, 1)

    def read(uri: str) -> dict:
        return json.loads(storage.read_bytes(uri, cfg.storage))

    # The round's own networks, its segmentation network trained on the run's walk masks.
    unary = read(first.layout.record("segmentation"))
    assert unary["checkpoint_uri"].startswith(storage.join(first.run_uri, "train"))
    affinity = read(first.layout.record("affinity"))
    assert affinity["weights_sha256"] != read(cfg.layout.record("affinity"))["weights_sha256"]
    # Its own shard set, labelled by the unary refined by the walk and the CRF; the run's
    # shards stay the method's.
    labelled = read(storage.join(first.layout.labels, "label_summary.json"))
    assert labelled["method_stages"] == ["segmentation", "random_walk", "crf"]
    assert labelled["labelled"] + labelled["errors"] == 8
    method = read(storage.join(cfg.layout.labels, "label_summary.json"))
    assert method["method_stages"] == ["cam", "random_walk", "crf"]
    assert labelled["model_version"] != method["model_version"]
    # Every round's mIoU per stage, in the run's folder.
    report = read(storage.join(cfg.run_uri, "rounds.json"))
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert set(report["rounds"][0]["miou"]) == {"cam", "random_walk", "crf"}
    assert set(report["rounds"][1]["miou"]) == {"segmentation", "random_walk", "crf"}
    assert report["rounds"][1]["labels"] == first.layout.labels != cfg.layout.labels

    # A second run finds every stage done, the round's too.
    assert set(run(cfg, **quiet).values()) == {"skipped"}


@pytest.mark.slow
def test_run_does_every_stage_once_and_redoes_what_changed(overrides, first_run, capfd, tmp_path):
    cfg = load_config(overrides=overrides)
    quiet = {"log": lambda _: None}
    assert first_run == dict.fromkeys(
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
