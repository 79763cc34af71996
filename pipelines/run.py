"""`wsss run`: every stage of a run in order: train-classifier, the training of each other network
the configured refiners need (train-affinity for the random walk), label, evaluate.

A finished stage leaves a marker `<run>/stages/<stage>.json` holding a fingerprint of what its
output depends on: the configuration sections it reads and the manifest file's size and
modification time. A stage whose marker has the current fingerprint (and whose output is there)
is skipped, unless an earlier stage ran. When a training stage's settings changed, the run stops
and says which sections changed: the run's checkpoints belong to the old settings (Ray Train
would resume from them), and a new run `name` trains afresh. Changed labeling settings relabel
the collection (`wsss label --force`): the model version alone would not tell the shards apart.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime

from pipelines import evaluate, shards, storage
from pipelines.config import ConfigError, RunConfig
from pipelines.label import job as label
from pipelines.train import affinity as train_affinity
from pipelines.train import classifier as train_classifier

# The job that trains each network a method may need (`RunConfig.networks`), as a stage.
TRAINERS: dict[str, Callable[..., object]] = {
    "classifier": train_classifier.run,
    "affinity": train_affinity.run,
}


def stage_sections(cfg: RunConfig) -> dict[str, tuple[str, ...]]:
    """The stages of `cfg`'s run in order (a training stage per network its method needs, then
    label and evaluate), each with the configuration sections its output depends on."""
    trains = [name for name in cfg.networks if name != "classifier"]
    method = ("seed", "dataset", "classifier", "cam", *trains)
    sections = {"train-classifier": ("seed", "dataset", "classifier")}
    sections |= {f"train-{name}": method for name in trains}
    labeling = (*method, "refiners", *cfg.refiners, "pseudo_label", "label")
    return sections | {"label": labeling, "evaluate": (*labeling, "evaluate")}


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def section_digests(cfg: RunConfig, stage: str) -> dict[str, str]:
    """Digest of each configuration section `stage` depends on, and of the manifest file."""
    data = cfg.model_dump(mode="json")
    digests = {section: _digest(data[section]) for section in stage_sections(cfg)[stage]}
    fs, path = storage.filesystem(cfg.dataset.manifest, cfg.storage)
    info = fs.get_file_info(path)
    digests["manifest file"] = _digest([info.size, info.mtime_ns])
    return digests


def output_uri(cfg: RunConfig, stage: str) -> str:
    """A file whose presence shows the stage's output is there."""
    if stage.startswith("train-"):
        return cfg.layout.record(stage.removeprefix("train-"))
    if stage == "label":
        return storage.join(cfg.layout.labels, shards.SUMMARY_FILE)
    return storage.join(cfg.layout.report(), evaluate.RESULT_FILE)


def previous_digests(cfg: RunConfig, stage: str) -> dict[str, str] | None:
    """The section digests of the stage's last finished run, if it ran and its output is there."""
    uri = cfg.layout.marker(stage)
    if not (
        storage.exists(uri, cfg.storage) and storage.exists(output_uri(cfg, stage), cfg.storage)
    ):
        return None
    return json.loads(storage.read_bytes(uri, cfg.storage))["sections"]


def run(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, str]:
    """Run the stages not yet done for `cfg`; returns what happened to each stage."""
    cfg.require_method("run")
    outcome: dict[str, str] = {}
    relabel = False  # the shards were labelled with other settings: redo them
    for stage in stage_sections(cfg):
        digests = section_digests(cfg, stage)
        before = previous_digests(cfg, stage)
        # Once a stage ran, the later ones see new inputs and run too.
        if before == digests and all(o == "skipped" for o in outcome.values()):
            log(f"== {stage}: already done for this configuration, skipped")
            outcome[stage] = "skipped"
            if stage == "evaluate":
                result = json.loads(storage.read_bytes(output_uri(cfg, stage), cfg.storage))
                log(evaluate.format_table(result["classes"], result["stages"]))
            continue
        changed = [s for s in digests if before is not None and before.get(s) != digests[s]]
        if changed and stage.startswith("train-"):
            raise ConfigError(
                f"run {cfg.name!r} trained its {stage.removeprefix('train-')} with other "
                f"settings ({', '.join(changed)} changed) and its checkpoints belong to them; "
                "set a new `name` to train afresh (or restore the settings)"
            )
        relabel = relabel or (stage == "label" and bool(changed))
        log(f"== {stage}")
        if stage.startswith("train-"):
            TRAINERS[stage.removeprefix("train-")](cfg, log=log)
        elif stage == "label":
            label.run(cfg, force=relabel, log=log)
        else:
            evaluate.run(cfg, log=log)
        marker = {
            "stage": stage,
            "sections": digests,
            "config_hash": cfg.hash(),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        storage.write_bytes(
            cfg.layout.marker(stage), json.dumps(marker, indent=2).encode(), cfg.storage
        )
        outcome[stage] = "relabelled" if relabel and stage == "label" else "done"
    return outcome
