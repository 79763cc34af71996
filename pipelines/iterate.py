"""The rounds of iterative affinity learning (Wang et al., IJCV 2020) that `wsss run` adds after
the method's own labeling with `iterate.rounds: N`.

Round 0 is the run itself: classifier, CAMs, refiners, shards. Round r (1..N) is a run of its
own, `round-<r>` inside the run's folder, whose configuration `round_config` derives:
- train-segmentation: a segmentation network (the unary) on round r-1's shards, the masks of
  `iterate.train_on`;
- a training stage per network its refiners need besides the classifier: for the random walk an
  AffinityNet on the unary's confident pixels (`iterate.confident`), its backbone from the run's
  classifier (`pipelines.train.affinity`);
- label: the unary's probabilities refined by the configured refiners (label.model
  refined_segmentation), into the round's own shard set;
- evaluate.
Each round keeps its model records, checkpoints, stage markers, shard set and evaluation in
`<run>/round-<r>/` (its shards in `<label.out>/round-<r>/` when label.out is set, its
evaluation in `<evaluate.out>/round-<r>/` when that is); `rounds.json` beside the run's own
evaluation holds every round's mIoU per stage. `pipelines.run` runs and skips the
rounds' stages as it does the run's own.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from pipelines import evaluate, shards, storage
from pipelines.config import RunConfig

ROUNDS_FILE = "rounds.json"

# What the rounds' stages depend on beyond the method's labeling (`pipelines.run`): the unary's
# training, then, for every later stage, its inference and the affinity labels' threshold too.
# Neither holds the round count (adding rounds keeps the rounds done) nor the segmentation
# settings a round derives (`round_config`).
UNARY_SECTIONS = (
    "iterate.train_on",
    "segmentation.model",
    "segmentation.augment",
    "segmentation.optim",
)
SECTIONS = (*UNARY_SECTIONS, "segmentation.inference", "iterate.confident")


def round_name(r: int) -> str:
    return f"round-{r}"


def round_config(cfg: RunConfig, r: int) -> RunConfig:
    """The configuration of round `r` (1..iterate.rounds) of the run `cfg`."""
    previous = cfg if r == 1 else round_config(cfg, r - 1)
    train_on = cfg.iterate.train_on
    column = (
        shards.FINAL_COLUMN
        if train_on == "final"
        else shards.stage_columns(previous.stages)[train_on]
    )
    name = round_name(r)
    data = cfg.model_dump(mode="json")
    data |= {"name": name, "output": cfg.run_uri}
    data["label"] |= {
        "model": "refined_segmentation",
        "out": storage.join(cfg.label.out, name) if cfg.label.out else None,
    }
    if cfg.evaluate.out:
        data["evaluate"]["out"] = storage.join(cfg.evaluate.out, name)
    data["segmentation"] |= {
        "train_on": "pseudo_labels",
        "labels": previous.layout.labels,
        "labels_version": shards.LATEST,
        "labels_column": column,
    }
    data["iterate"]["rounds"] = 0
    return type(cfg).model_validate(data)


def trained_networks(cfg: RunConfig) -> tuple[str, ...]:
    """The networks a round trains, in order: the unary, then those of its refiners (not the
    classifier: a round uses the run's)."""
    return tuple(name for name in round_config(cfg, 1).networks if name != "classifier")


def inherited_records(cfg: RunConfig) -> dict[str, str]:
    """The model records a round takes from the run rather than training them."""
    return {"classifier": cfg.layout.record("classifier")}


def report(cfg: RunConfig, log: Callable[[str], None] = print) -> dict:
    """Gather each round's evaluation (round 0: the run's) into `rounds.json` beside the run's
    evaluation, print the mIoU of every stage per round and return the report."""
    rounds = []
    for r in range(cfg.iterate.rounds + 1):
        round_cfg = cfg if r == 0 else round_config(cfg, r)
        uri = storage.join(round_cfg.layout.report(), evaluate.RESULT_FILE)
        result = json.loads(storage.read_bytes(uri, cfg.storage))
        rounds.append(
            {
                "round": r,
                "labels": round_cfg.layout.labels,
                "model_version": result["model_version"],
                "miou": {stage: s["miou"] for stage, s in result["stages"].items()},
            }
        )
    summary = {
        "train_on": cfg.iterate.train_on,
        "confident": cfg.iterate.confident,
        "rounds": rounds,
    }
    uri = storage.join(cfg.layout.report(), ROUNDS_FILE)
    storage.write_bytes(uri, json.dumps(summary, indent=2).encode(), cfg.storage)
    log(format_rounds(rounds))
    log(f"mIoU per round in {uri}")
    return summary


def format_rounds(rounds: list[dict]) -> str:
    """A markdown table: a row per round, a column per stage of any round (mIoU, %), the seed
    stages (the CAMs, the segmentation network) first."""
    seeds = [next(iter(r["miou"])) for r in rounds if r["miou"]]
    stages = list(dict.fromkeys([*seeds, *(stage for r in rounds for stage in r["miou"])]))
    lines = [
        "| round | " + " | ".join(stages) + " |",
        "|---|" + "---|" * len(stages),
    ]
    for r in rounds:
        cells = []
        for stage in stages:
            miou = r["miou"].get(stage)
            cells.append("" if miou is None else f"{100 * miou:.1f}")
        lines.append(f"| {r['round']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
