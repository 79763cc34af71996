"""`wsss calibrate`: pick the refinement settings on a few pixel-labelled images with Ray Tune.

Without masks the label-free defaults apply (Otsu backgrounds, the walk's beta 8 and 16 steps).
A user with a few dozen masked images runs this after training: the run's networks compute the
CAMs and affinities of the manifest's first `calibrate.images` masked images once
(`wsss.calibration`), the CAM stage's background is chosen by a sweep, and Ray Tune searches the
walk's beta, length and background and the CRF's strength (`calibrate.trials` random trials,
each one walk + CRF over the images, scored by the final masks' mIoU). The chosen values are kept
only where they beat the configured ones, and the whole configuration with them is written as
YAML (default `<run>/calibrated.yaml`) for the next `wsss run` or `wsss label`, with a JSON
report beside it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from typing import Any

from ray import tune
from torch import nn

from pipelines import storage
from pipelines.config import ConfigError, RunConfig
from pipelines.inputs import load_manifest
from pipelines.label import job as label
from pipelines.model_record import load_network
from pipelines.runtime import connect
from pipelines.train import kept_seeds
from wsss.calibration import CalibrationImage, best_cam_background, refinement_miou
from wsss.cam import BackgroundParams, image_cams
from wsss.crf import CrfParams
from wsss.imageio import decode_image, decode_mask
from wsss.random_walk import RandomWalkParams

REPORT_FILE = "calibration.json"
# The walk's settings Ray Tune draws from: PSA's beta 8 and length 2^8 lie inside; "otsu" is
# the label-free background, the numbers IRN-style constant backgrounds.
SEARCH_SPACE = {
    "beta": tune.choice([2, 4, 8, 12, 16]),
    "logt": tune.randint(1, 9),
    "background": tune.choice(["otsu", 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]),
}
# With the CRF among the refiners, also how strongly it smooths: a factor on its pairwise
# weights, 0 leaving the walk's scores as they are. On the synthetic shapes the CRF adds some
# 20 points; on the CCP photos it erases the small garments the walk found (docs/benchmarks.md).
CRF_SEARCH_SPACE = {"crf_weight": tune.choice([0.0, 0.5, 1.0])}


def search_space(cfg: RunConfig) -> dict[str, Any]:
    """What Ray Tune draws each trial's settings from, for the refiners of `cfg`."""
    return SEARCH_SPACE | (CRF_SEARCH_SPACE if "crf" in cfg.refiners else {})


def walk_params(base: RandomWalkParams, trial: dict[str, Any]) -> RandomWalkParams:
    """`base` with a trial's beta, logt and background."""
    choice = trial["background"]
    background = (
        base.background.model_copy(update={"method": "otsu"})
        if choice == "otsu"
        else base.background.model_copy(update={"method": "threshold", "threshold": choice})
    )
    return base.model_copy(
        update={"beta": float(trial["beta"]), "logt": int(trial["logt"]), "background": background}
    )


def crf_params(base: CrfParams, trial: dict[str, Any]) -> CrfParams:
    """`base` with its pairwise weights scaled by a trial's `crf_weight`; at 0 no mean-field
    step runs and the CRF passes its input's scores through. (Not "crf": a trial's result
    holds each refiner's mIoU under its name.)"""
    factor = float(trial["crf_weight"])
    return base.model_copy(
        update={
            "gaussian_compat": base.gaussian_compat * factor,
            "bilateral_compat": base.bilateral_compat * factor,
            "iterations": base.iterations if factor > 0 else 0,
        }
    )


def trial_config(cfg: RunConfig, trial: dict[str, Any]) -> RunConfig:
    """`cfg` with a trial's settings: the walk's, and the CRF's when the trial has them."""
    update: dict[str, Any] = {"random_walk": walk_params(cfg.random_walk, trial)}
    if "crf_weight" in trial:
        update["crf"] = crf_params(cfg.crf, trial)
    return cfg.model_copy(update=update)


def calibration_images(
    cfg: RunConfig, networks: dict[str, nn.Module], kept_uri: str | None = None
) -> tuple[list[CalibrationImage], int]:
    """The CAMs and the refiners' prepared inputs (the affinities) of the manifest's first
    `calibrate.images` masked images, and the number of classes (background included). The
    CAMs come from the seeds the classifier kept while training where the merged file
    `kept_uri` has them (OAA's: `pipelines.train.kept_seeds`)."""
    labeler = cfg.labeler(networks)
    manifest = load_manifest(cfg)
    rows = [row for row in manifest.rows if row.mask][: cfg.calibrate.images]
    if not rows:
        raise ConfigError(
            f"dataset.manifest {cfg.dataset.manifest} has no row with a `mask`: calibration "
            "needs a few pixel-labelled images"
        )
    kept = kept_seeds.read(kept_uri, [row.image_id for row in rows], cfg.storage)
    images = []
    for row in rows:
        image = decode_image(storage.read_bytes(row.image, cfg.storage), cfg.dataset.max_pixels)
        labels = tuple(manifest.label_indices(row))
        images.append(
            CalibrationImage(
                image=image,
                labels=labels,
                mask=decode_mask(storage.read_bytes(row.mask, cfg.storage)),
                cams_fg=image_cams(
                    labeler.seeds.classifier, image, labels, cfg.cam, kept.get(row.image_id)
                ),
                prepared=labeler.prepare(image),
            )
        )
    return images, len(manifest.classes)


def _trial(config: dict, images, n_classes: int, networks: dict[str, nn.Module], cfg: RunConfig):
    tune.report(refinement_miou(images, n_classes, trial_config(cfg, config).labeler(networks)))


def calibrate(
    cfg: RunConfig,
    networks: dict[str, nn.Module],
    log: Callable[[str], None] = print,
    kept_uri: str | None = None,
) -> dict:
    """Calibrate `cfg`'s CAM background and walk on its masked images with these networks (by
    name, as `RunConfig.networks`) and the classifier's kept seeds (`kept_uri`, if it kept
    any); writes the calibrated configuration and the report, and returns the report."""
    _check_walk(cfg)
    connect(cfg)
    images, n_classes = calibration_images(cfg, networks, kept_uri)
    log(f"calibrating on {len(images)} masked image(s): {cfg.calibrate.trials} Ray Tune trials")
    cam_background, cam_best, cam_scores = best_cam_background(images, n_classes)
    configured_cam = _cam_score(cfg.cam.background, cam_scores)
    if configured_cam is not None and configured_cam >= cam_best:
        cam_background, cam_best = cfg.cam.background, configured_cam
    before = refinement_miou(images, n_classes, cfg.labeler(networks))
    with tempfile.TemporaryDirectory(prefix="wsss-calibrate-") as folder:
        tuner = tune.Tuner(
            tune.with_resources(
                tune.with_parameters(
                    _trial,
                    images=images,
                    n_classes=n_classes,
                    networks=networks,
                    cfg=cfg,
                ),
                {"cpu": 1},
            ),
            param_space=search_space(cfg),
            tune_config=tune.TuneConfig(
                metric="final",
                mode="max",
                num_samples=cfg.calibrate.trials,
                search_alg=tune.search.BasicVariantGenerator(random_state=cfg.seed),
            ),
            run_config=tune.RunConfig(name="calibrate", storage_path=folder),
        )
        results = tuner.fit()
        trials = [
            {**r.config, **{stage: r.metrics[stage] for stage in (*cfg.refiners, "final")}}
            for r in results
            if r.error is None
        ]
    if not trials:
        raise RuntimeError("every calibration trial failed; see the log file")
    best = max(trials, key=lambda t: t["final"])
    refined = trial_config(cfg, best) if best["final"] > before["final"] else cfg
    walk = refined.random_walk
    calibrated = refined.model_copy(
        update={"cam": cfg.cam.model_copy(update={"background": cam_background})}
    )
    out = cfg.layout.calibrated
    storage.write_bytes(out, calibrated.to_yaml().encode(), cfg.storage)
    after = max(best["final"], before["final"])
    report = {
        "images": len(images),
        "config": out,
        "cam": {
            "configured": cfg.cam.background.model_dump(),
            "configured_miou": configured_cam,
            "chosen": cam_background.model_dump(),
            "chosen_miou": cam_best,
        },
        "random_walk": {
            "configured": cfg.random_walk.model_dump(),
            "configured_miou": before,
            "chosen": walk.model_dump(),
            "chosen_final_miou": after,
        },
        "crf": {"configured": cfg.crf.model_dump(), "chosen": calibrated.crf.model_dump()},
        "trials": sorted(trials, key=lambda t: -t["final"]),
    }
    report_uri = storage.join(storage.parent(out), REPORT_FILE)
    storage.write_bytes(report_uri, json.dumps(report, indent=2).encode(), cfg.storage)
    log(
        f"CAM background: {_describe(cfg.cam.background)} -> {_describe(cam_background)} "
        f"(CAM mIoU {_percent(configured_cam)} -> {_percent(cam_best)})"
    )
    log(
        f"walk: beta {cfg.random_walk.beta:g}, logt {cfg.random_walk.logt}, background "
        f"{_describe(cfg.random_walk.background)} -> beta {walk.beta:g}, logt {walk.logt}, "
        f"background {_describe(walk.background)} (final mIoU {_percent(before['final'])} -> "
        f"{_percent(after)})"
    )
    if "crf" in cfg.refiners:
        log(
            f"CRF pairwise weights: smoothness {cfg.crf.gaussian_compat:g}, appearance "
            f"{cfg.crf.bilateral_compat:g} -> {calibrated.crf.gaussian_compat:g}, "
            f"{calibrated.crf.bilateral_compat:g}"
            + (
                " (the CRF passes the walk's scores through)"
                if not calibrated.crf.iterations
                else ""
            )
        )
    log(f"calibrated configuration: {out} (report {report_uri}); use it with --config")
    return report


def _check_walk(cfg: RunConfig) -> None:
    if "random_walk" not in cfg.refiners:
        raise ConfigError(
            f"refiners: calibration searches the random walk's settings, and {list(cfg.refiners)} "
            "has no random_walk"
        )


def _cam_score(background: BackgroundParams, scores: dict[str, float]) -> float | None:
    """The sweep's mIoU for the configured background, when the sweep holds it."""
    if background.method == "otsu":
        return scores["otsu"]
    if background.method == "threshold":
        return scores.get(str(round(background.threshold, 2)))
    return None


def _describe(background: BackgroundParams) -> str:
    if background.method == "threshold":
        return f"constant {background.threshold:g}"
    return "power" if background.method == "power" else "otsu"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def run(
    cfg: RunConfig,
    records: dict[str, str | None] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Calibrate with the networks of the model records `records` (by network name; default:
    this run's)."""
    cfg.require_method("calibrate")
    _check_walk(cfg)
    # A missing record, or one for other classes, is a ConfigError naming it.
    models = label.models(cfg, records)
    networks = {name: load_network(r, cfg, name) for name, r in models.records.items()}
    return calibrate(cfg, networks, log, models.records["classifier"].kept_seeds_uri)
