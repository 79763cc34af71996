"""Where a run keeps its things: one object, `RunLayout`, that every job asks for a path (the
table in docs/architecture.md). A run's folder is `output/name`, a local folder or an `s3://`
prefix; the labeling output may be elsewhere (`label.out`), and the evaluation's report and
calibration's configuration too (`evaluate.out`, `calibrate.out`). Inside a labeling output the
shard layout is `pipelines.shards`' (docs/output.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.storage import join


@dataclass(frozen=True)
class RunLayout:
    root: str  # output/name
    label_out: str | None = None  # label.out
    evaluate_out: str | None = None  # evaluate.out
    calibrate_out: str | None = None  # calibrate.out

    @property
    def labels(self) -> str:
        """Where `wsss label` writes the shards (and evaluation and relabel read them)."""
        return self.label_out or self.root

    @property
    def relabel(self) -> str:
        """The dated shard sets and the ledger of `wsss relabel`."""
        return join(self.labels, "relabel")

    def record(self, network: str) -> str:
        """The model record of a trained network ("classifier", "affinity")."""
        return join(self.root, "models", f"{network}.json")

    @property
    def checkpoints(self) -> str:
        """Ray Train's storage: a folder per network, a checkpoint per epoch in it."""
        return join(self.root, "train")

    def kept_seeds(self, network: str) -> str:
        """The seeds a network's CAM method keeps while it trains (OAA's maps): a file per
        epoch and worker, and the merged maps (`pipelines.train.kept_seeds`)."""
        return join(self.checkpoints, f"{network}-seeds")

    def marker(self, stage: str) -> str:
        """`wsss run`'s marker of a finished stage (its fingerprint)."""
        return join(self.root, "stages", f"{stage}.json")

    def report(self, labels: str | None = None) -> str:
        """Where the evaluation of the shards under `labels` (default: this run's) writes its
        result and gallery."""
        return self.evaluate_out or labels or self.labels

    @property
    def calibrated(self) -> str:
        """The configuration `wsss calibrate` writes (its report beside it)."""
        return self.calibrate_out or join(self.root, "calibrated.yaml")

    @property
    def local(self) -> str:
        """`wsss run-local`'s outputs."""
        return join(self.root, "local")

    @property
    def logs(self) -> str:
        """The command logs, when the run folder is local."""
        return join(self.root, "logs")
