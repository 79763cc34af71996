"""`wsss run`: every stage of a run in order: train-classifier, the training of each other network
the configured refiners need (train-affinity for the random walk), label, evaluate; then, with
`iterate.rounds`, each round's stages (`pipelines.iterate`: round-1/train-segmentation,
round-1/train-affinity, round-1/label, round-1/evaluate, ...) and the report of all rounds.

A finished stage leaves a marker `stages/<stage>.json` in the run's folder (a round's in its
own) holding a fingerprint of what its output depends on: the configuration sections it reads
and the manifest file's size and modification time. A stage whose marker has the current
fingerprint (and whose output is there) is skipped, unless a stage whose output it reads (its
`inputs`) ran. When a training stage's settings changed, the run stops and says which sections
changed: the run's checkpoints belong to the old settings (Ray Train would resume from them),
and a new run `name` trains afresh. A round's networks are the run's own product: a round whose
inputs changed trains them afresh, and a round's training killed part-way resumes only while
its inputs are the same (`<stage>.started.json`). Changed labeling settings relabel the
collection (`wsss label --force`): the model version alone would not tell the shards apart.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

from pipelines import evaluate, iterate, shards, storage
from pipelines.config import ConfigError, RunConfig
from pipelines.label import job as label
from pipelines.train import affinity as train_affinity
from pipelines.train import classifier as train_classifier
from pipelines.train import segmentation as train_segmentation

# The job that trains each network, as a stage.
TRAINERS: dict[str, Callable[..., object]] = {
    "classifier": train_classifier.run,
    "affinity": train_affinity.run,
    "segmentation": train_segmentation.run,
}


@dataclass(frozen=True)
class Stage:
    kind: str  # "train-<network>", "label" or "evaluate"
    cfg: RunConfig  # what it runs with: the run's configuration or its round's
    sections: tuple[str, ...]  # of the run's configuration: what its output depends on
    inputs: tuple[str, ...] = ()  # the stages whose output it reads, by name
    round: int = 0  # the iterate round it belongs to; 0: the run itself
    # Model records a round takes from the run (the classifier: AffinityNet's backbone, and the
    # networks of refiners such as deep_clustering).
    records: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """As the run reports it: "label", "round-1/label"."""
        return f"{iterate.round_name(self.round)}/{self.kind}" if self.round else self.kind

    @property
    def marker(self) -> str:
        return self.cfg.layout.marker(self.kind)

    @property
    def output(self) -> str:
        """A file whose presence shows the stage's output is there."""
        layout = self.cfg.layout
        if self.kind.startswith("train-"):
            return layout.record(self.kind.removeprefix("train-"))
        if self.kind == "label":
            return storage.join(layout.labels, shards.SUMMARY_FILE)
        return storage.join(layout.report(), evaluate.RESULT_FILE)


def stages(cfg: RunConfig) -> list[Stage]:
    """The stages of `cfg`'s run in order (a training stage per network its method needs, then
    label and evaluate; then those of each iterate round), each with the configuration sections
    its output depends on and the stages whose output it reads."""
    trains = [name for name in cfg.networks if name != "classifier"]
    method = ("seed", "dataset", "classifier", "cam", *trains)
    labeling = (*method, "refiners", *cfg.refiners, "pseudo_label", "label")
    trained = tuple(f"train-{name}" for name in cfg.networks)
    planned = [
        Stage("train-classifier", cfg, ("seed", "dataset", "classifier")),
        *(Stage(f"train-{name}", cfg, method, ("train-classifier",)) for name in trains),
        Stage("label", cfg, labeling, trained),
        Stage("evaluate", cfg, (*labeling, "evaluate"), ("label",)),
    ]
    if not cfg.iterate.rounds:
        return planned
    records = iterate.inherited_records(cfg)
    unary, *others = iterate.trained_networks(cfg)  # the segmentation network first
    unary_sections = tuple(dict.fromkeys((*labeling, *iterate.UNARY_SECTIONS)))
    round_sections = tuple(dict.fromkeys((*labeling, *iterate.SECTIONS)))
    for r in range(1, cfg.iterate.rounds + 1):
        round_cfg, prefix = iterate.round_config(cfg, r), iterate.round_name(r)
        last_labels = f"{iterate.round_name(r - 1)}/label" if r > 1 else "label"

        stage = partial(Stage, cfg=round_cfg, round=r, records=records)
        planned.append(stage(f"train-{unary}", sections=unary_sections, inputs=(last_labels,)))
        for network in others:
            inputs = (f"{prefix}/train-{unary}", "train-classifier")
            planned.append(stage(f"train-{network}", sections=round_sections, inputs=inputs))
        trained_here = tuple(f"{prefix}/train-{name}" for name in (unary, *others))
        inputs = (*trained_here, "train-classifier")
        planned.append(stage("label", sections=round_sections, inputs=inputs))
        evaluated = (*round_sections, "evaluate")
        planned.append(stage("evaluate", sections=evaluated, inputs=(f"{prefix}/label",)))
    return planned


def stage_sections(cfg: RunConfig) -> dict[str, tuple[str, ...]]:
    """Each stage of `cfg`'s run by name, with the configuration sections it depends on."""
    return {stage.name: stage.sections for stage in stages(cfg)}


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def section_digests(cfg: RunConfig, stage: Stage) -> dict[str, str]:
    """Digest of each configuration section (or dotted field) `stage` depends on, and of the
    manifest file."""
    data = cfg.model_dump(mode="json")
    digests = {}
    for section in stage.sections:
        value = data
        for key in section.split("."):
            value = value[key]
        digests[section] = _digest(value)
    fs, path = storage.filesystem(cfg.dataset.manifest, cfg.storage)
    info = fs.get_file_info(path)
    digests["manifest file"] = _digest([info.size, info.mtime_ns])
    return digests


def _read_json(uri: str, cfg: RunConfig) -> dict | None:
    return (
        json.loads(storage.read_bytes(uri, cfg.storage))
        if storage.exists(uri, cfg.storage)
        else None
    )


def previous_digests(stage: Stage) -> dict[str, str] | None:
    """The section digests of the stage's last finished run, if it ran and its output is there."""
    if not storage.exists(stage.output, stage.cfg.storage):
        return None
    marker = _read_json(stage.marker, stage.cfg)
    return None if marker is None else marker["sections"]


def _train(stage: Stage, fingerprint: dict, log: Callable[[str], None]) -> None:
    """Train the stage's network. A round's network starts afresh unless its last training was
    killed part-way on the same inputs (`fingerprint`): Ray Train would resume whatever
    checkpoints the round folder holds."""
    network = stage.kind.removeprefix("train-")
    cfg = stage.cfg
    if stage.round:
        started_uri = cfg.layout.marker(f"{stage.kind}.started")
        started = _read_json(started_uri, cfg)
        if storage.exists(stage.marker, cfg.storage) or started not in (None, fingerprint):
            log(f"   its inputs changed: training the {network} afresh")
            for stale in (
                storage.join(cfg.layout.checkpoints, network),
                cfg.layout.record(network),
            ):
                storage.remove_tree(stale, cfg.storage)
            storage.remove_tree(stage.marker, cfg.storage)
        storage.write_bytes(started_uri, json.dumps(fingerprint, indent=2).encode(), cfg.storage)
    if network == "affinity":  # its backbone from the run's classifier (a round has none)
        train_affinity.run(cfg, stage.records.get("classifier"), log=log)
    else:
        TRAINERS[network](cfg, log=log)


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, str]:
    """Run the stages not yet done for `cfg`; returns what happened to each stage."""
    cfg.require_method("run")
    planned = stages(cfg)
    markers = {stage.name: stage.marker for stage in planned}
    outcome: dict[str, str] = {}
    for stage in planned:
        digests = section_digests(cfg, stage)
        before = previous_digests(stage)
        # A stage whose inputs were made anew runs too.
        renewed = [name for name in stage.inputs if outcome.get(name, "skipped") != "skipped"]
        if before == digests and not renewed:
            log(f"== {stage.name}: already done for this configuration, skipped")
            outcome[stage.name] = "skipped"
            if stage.kind == "evaluate":
                result = json.loads(storage.read_bytes(stage.output, cfg.storage))
                log(evaluate.format_table(result["classes"], result["stages"]))
            continue
        changed = [s for s in digests if before is not None and before.get(s) != digests[s]]
        if changed and stage.kind.startswith("train-") and not stage.round:
            raise ConfigError(
                f"run {cfg.name!r} trained its {stage.kind.removeprefix('train-')} with other "
                f"settings ({', '.join(changed)} changed) and its checkpoints belong to them; "
                "set a new `name` to train afresh (or restore the settings)"
            )
        # The shards were labelled with other settings: redo them.
        relabel = stage.kind == "label" and bool(changed)
        log(f"== {stage.name}")
        if stage.kind.startswith("train-"):
            inputs = {name: _read_json(markers[name], cfg) for name in stage.inputs}
            _train(stage, {"sections": digests, "inputs": inputs}, log)
        elif stage.kind == "label":
            label.run(stage.cfg, force=relabel, records=stage.records, log=log)
        else:
            evaluate.run(stage.cfg, log=log)
        marker = {
            "stage": stage.name,
            "sections": digests,
            "config_hash": cfg.hash(),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        storage.write_bytes(stage.marker, json.dumps(marker, indent=2).encode(), cfg.storage)
        outcome[stage.name] = "relabelled" if relabel else "done"
    if cfg.iterate.rounds:
        log("== rounds")
        iterate.report(cfg, log)
    return outcome
