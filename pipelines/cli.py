"""The `wsss` command.

Every subcommand that does work takes the same `--config FILE` and `--set section.field=value`
options and validates the whole configuration before it starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pipelines.config import ConfigError, RunConfig, load_config
from pipelines.lease import LeaseHeld
from pipelines.manifests import ManifestError
from wsss.networks import NETWORKS

if TYPE_CHECKING:
    from pipelines.model_record import ModelRecord


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML run configuration")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set classifier.optim.epochs=3 (repeatable)",
    )


def _config(args: argparse.Namespace, extra: Sequence[str] = ()) -> RunConfig:
    return load_config(args.config, [*args.overrides, *extra])


def cmd_synth(args: argparse.Namespace) -> int:
    from wsss import synthetic

    extra = [
        f"synthetic.{k}={v}" for k in ("out", "n", "seed") if (v := getattr(args, k)) is not None
    ]
    cfg = _config(args, extra)
    s = cfg.synthetic
    manifest = synthetic.generate(s.out, s.n, s.seed, s.params)
    (manifest.parent / "config.yaml").write_text(cfg.to_yaml())
    print(f"wrote {s.n} images to {manifest}")
    if args.preview:
        synthetic.write_preview(args.preview, s.seed, s.params)
        print(f"wrote preview {args.preview}")
    return 0


def cmd_run_local(args: argparse.Namespace) -> int:
    from pipelines import local_run

    local_run.main(_config(args), compare=[chain.split(",") for chain in args.compare])
    return 0


@contextmanager
def _console(cfg: RunConfig, command: str) -> Iterator[Callable[[str], None]]:
    """Ray's and the libraries' output to a log file for the block; yields the writer of our
    own lines to the terminal (`pipelines.console`)."""
    from pipelines import console

    path = console.log_path(cfg, command)
    with console.library_output_to(path) as say:
        say(f"Ray's and the libraries' own output goes to {path}")
        yield say


def _print_record(record: ModelRecord, say: Callable[[str], None]) -> None:
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in record.metrics.items())
    say(f"{record.stage}: {record.epochs} epoch(s), last epoch: {metrics}")
    say(f"checkpoint {record.checkpoint_uri}")


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from pipelines.train import classifier as train_classifier

    cfg = _config(args)
    with _console(cfg, "train-classifier") as say:
        _print_record(train_classifier.run(cfg, say), say)
    return 0


def cmd_train_affinity(args: argparse.Namespace) -> int:
    from pipelines.train import affinity as train_affinity

    cfg = _config(args)
    with _console(cfg, "train-affinity") as say:
        _print_record(train_affinity.run(cfg, args.classifier, log=say), say)
    return 0


def cmd_train_segmentation(args: argparse.Namespace) -> int:
    from pipelines.train import segmentation as train_segmentation

    extra = [f"segmentation.labels={args.labels}"] if args.labels else []
    if args.ground_truth:
        extra.append("segmentation.train_on=ground_truth")
    cfg = _config(args, extra)
    with _console(cfg, "train-segmentation") as say:
        _print_record(train_segmentation.run(cfg, say), say)
    return 0


def _model_choice(args: argparse.Namespace) -> list[str]:
    """`--model` of label and relabel, as the override of label.model."""
    return [f"label.model={args.model}"] if args.model else []


def cmd_label(args: argparse.Namespace) -> int:
    from pipelines.label import job as label

    cfg = _config(args, _model_choice(args))
    with _console(cfg, "label") as say:
        summary = label.run(
            cfg,
            input_uri=args.input,
            out_uri=args.out,
            force=args.force,
            keep_stages=args.keep_stages,
            records=_records(args),
            log=say,
        )
        for key in ("input", "labelled", "errors", "skipped"):
            say(f"{key}: {summary[key]}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipelines import evaluate

    cfg = _config(args)
    with _console(cfg, "evaluate") as say:
        evaluate.run(cfg, args.labels, args.model_version, log=say)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipelines import export

    cfg = _config(args)
    with _console(cfg, "export") as say:
        summary = export.run(cfg, args.labels, args.out, args.format, args.model_version, say)
    return 1 if summary["failed"] else 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines import run

    if args.config_file and args.config:
        raise ConfigError("give the configuration once: as CONFIG or as --config")
    args.config = args.config or args.config_file
    cfg = _config(args)
    with _console(cfg, "run") as say:
        outcome = run.run(cfg, log=say)
        say(", ".join(f"{stage}: {what}" for stage, what in outcome.items()))
    return 0


def _records(args: argparse.Namespace) -> dict[str, str | None]:
    """The model records given on the command line, by network name."""
    return {name: getattr(args, name) for name in NETWORKS}


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pipelines import calibrate

    cfg = _config(args)
    with _console(cfg, "calibrate") as say:
        calibrate.run(cfg, _records(args), log=say)
    return 0


def cmd_relabel(args: argparse.Namespace) -> int:
    from pipelines.relabel import job as relabel

    cfg = _config(args, _model_choice(args))
    with _console(cfg, "relabel") as say:
        record = relabel.run(
            cfg,
            input_uri=args.input,
            out_uri=args.out,
            date=args.date,
            listing=args.listing,
            inventory=args.inventory,
            log=say,
        )
        say(f"{record['new_or_changed']} new or changed image(s) -> {record['shards']}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        from pipelines import config_reference

        print(config_reference.markdown(), end="")
        return 0
    if args.schema:
        print(json.dumps(RunConfig.model_json_schema(), indent=2))
        return 0
    cfg = _config(args)
    print(cfg.to_yaml(), end="")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "synth": (cmd_synth, "write the synthetic dataset (the embedded default)"),
    "run-local": (
        cmd_run_local,
        "run every stage in this process (no Ray) and print mIoU per stage",
    ),
    "train-classifier": (
        cmd_train_classifier,
        "train the classifier with Ray Train (resumes the run's last checkpoint)",
    ),
    "train-affinity": (
        cmd_train_affinity,
        "train AffinityNet with Ray Train on the classifier's CAMs (resumes likewise)",
    ),
    "train-segmentation": (
        cmd_train_segmentation,
        "train a segmentation network with Ray Train on the pseudo-label shards (or, with "
        "--ground-truth, on the manifest's masks: the fully supervised upper bound)",
    ),
    "label": (
        cmd_label,
        "write pseudo-label shards for a manifest with Ray Data (skips images already labelled "
        "by the same models)",
    ),
    "evaluate": (
        cmd_evaluate,
        "mIoU per stage and class of the shards against the manifest's ground truth, and the "
        "overlay gallery",
    ),
    "export": (
        cmd_export,
        "write the pseudo-label shards as an image/mask folder layout other segmentation "
        "trainers read (mmsegmentation's, torchvision's VOC)",
    ),
    "calibrate": (
        cmd_calibrate,
        "pick the CAM background and the walk's settings on the manifest's masked images with "
        "Ray Tune; writes them as a configuration for the next run",
    ),
    "relabel": (
        cmd_relabel,
        "the nightly job: label only new or changed images into a dated shard set",
    ),
    "run": (
        cmd_run,
        "every stage in order (train-classifier, train-affinity, label, evaluate), skipping "
        "those already done for this configuration",
    ),
    "config": (cmd_config, "print the resolved configuration (or its JSON schema)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsss",
        description="Image-level labels to pixel-level pseudo-labels: CAM, AffinityNet random "
        "walk and dense CRF, distributed with Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {}
    for name, (func, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_options(p)
        p.set_defaults(func=func)
        parsers[name] = p
    synth = parsers["synth"]
    synth.add_argument("--out", help="output folder (synthetic.out)")
    synth.add_argument("--n", type=int, help="number of images (synthetic.n)")
    synth.add_argument("--seed", type=int, help="seed (synthetic.seed)")
    synth.add_argument("--preview", metavar="PNG", help="also write a contact sheet of samples")
    parsers["run-local"].add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="REFINERS",
        help="also score this chain of refiners (comma-separated, e.g. deep_clustering,crf) on "
        "the same classifier and CAMs; repeatable",
    )
    parsers["train-affinity"].add_argument(
        "--classifier",
        metavar="URI",
        help="model record of the classifier (default: the run's models/classifier.json)",
    )
    training = parsers["train-segmentation"]
    training.add_argument(
        "--labels",
        metavar="URI",
        help="the shards to train on (segmentation.labels; default: label.out, else the run)",
    )
    training.add_argument(
        "--ground-truth",
        action="store_true",
        help="train on the manifest's ground-truth masks instead (segmentation.train_on)",
    )
    for name in ("label", "relabel"):
        parsers[name].add_argument(
            "--input", metavar="URI", help="manifest (default: dataset.manifest)"
        )
        parsers[name].add_argument(
            "--model",
            choices=("method", "segmentation", "refined_segmentation"),
            help="label with the method (CAMs and refiners), with the trained segmentation "
            "network in one forward pass, or with its probabilities refined by the refiners "
            "(label.model; default: method)",
        )
        parsers[name].add_argument(
            "--out", metavar="URI", help="output folder (default: label.out, else the run folder)"
        )
    labeling = parsers["label"]
    labeling.add_argument(
        "--force", action="store_true", help="relabel images this model version labelled before"
    )
    labeling.add_argument(
        "--keep-stages",
        action="store_true",
        help="also store each stage's mask before the last (mask_cam, mask_rw, ...)",
    )
    for stage in NETWORKS:
        for name in ("label", "calibrate"):
            parsers[name].add_argument(
                f"--{stage}",
                metavar="URI",
                help=f"model record of the {stage} (default: the run's models/{stage}.json)",
            )
    evaluating = parsers["evaluate"]
    evaluating.add_argument(
        "--labels", metavar="URI", help="shards to evaluate (default: label.out, else the run)"
    )
    evaluating.add_argument(
        "--model-version",
        default="latest",
        help="model version of the shards (default: the latest labeling run's)",
    )
    exporting = parsers["export"]
    exporting.add_argument(
        "--labels", metavar="URI", help="shards to export (default: label.out, else the run)"
    )
    exporting.add_argument(
        "--out", metavar="URI", required=True, help="folder or S3 prefix to write the layout to"
    )
    exporting.add_argument(
        "--format",
        default="png-folder",
        help="png-folder: images/ and masks/ (mmsegmentation); voc: JPEGImages/, "
        "SegmentationClass/ and ImageSets/ (torchvision, mmsegmentation); default png-folder",
    )
    exporting.add_argument(
        "--model-version",
        default="latest",
        help="model version of the shards (default: the latest labeling run's)",
    )
    parsers["relabel"].add_argument("--date", help="the dated shard set (default: today, UTC)")
    parsers["relabel"].add_argument(
        "--listing",
        metavar="PREFIX",
        help="take the images' versions from a listing of this folder or S3 prefix (one request "
        "per 1000 objects instead of one per image); listed images without a manifest row are "
        "reported",
    )
    parsers["relabel"].add_argument(
        "--inventory",
        metavar="URI",
        help="with --listing on S3: read the listing from this S3 Inventory report (its "
        "manifest.json, or the inventory configuration's folder for its newest report; CSV, "
        "Parquet or ORC with the ETag field) instead of listing the prefix",
    )
    parsers["run"].add_argument(
        "config_file", nargs="?", metavar="CONFIG", help="YAML run configuration"
    )
    parsers["config"].add_argument(
        "--schema", action="store_true", help="print the JSON schema of the configuration"
    )
    parsers["config"].add_argument(
        "--reference", action="store_true", help="print the configuration reference (Markdown)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ManifestError) as exc:
        print(f"wsss: {exc}", file=sys.stderr)
        return 2
    except LeaseHeld as exc:  # another run writes this output: not an error of this one
        print(f"wsss: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
