"""`wsss calibrate`: Ray Tune over the walk's settings on a few masked images."""

import json

import pytest
import torch
from conftest import tiny_networks

from pipelines import calibrate
from pipelines.cli import main
from pipelines.config import ConfigError, load_config
from wsss import synthetic
from wsss.calibration import refinement_miou
from wsss.networks import build_network
from wsss.random_walk import RandomWalkParams
from wsss.synthetic import SyntheticParams


def test_walk_params_take_a_trials_settings():
    base = RandomWalkParams()
    otsu = calibrate.walk_params(base, {"beta": 4, "logt": 2, "background": "otsu"})
    assert (otsu.beta, otsu.logt, otsu.background.method) == (4.0, 2, "otsu")
    constant = calibrate.walk_params(base, {"beta": 16, "logt": 8, "background": 0.3})
    assert constant.background.method == "threshold" and constant.background.threshold == 0.3
    assert constant.background.alpha == base.background.alpha  # the rest is kept


def test_a_trial_scales_the_crfs_pairwise_weights_and_at_zero_runs_no_step():
    cfg = load_config(overrides=["crf.bilateral_compat=8", "crf.iterations=6"])
    trial = {"beta": 4, "logt": 2, "background": "otsu"}
    half = calibrate.trial_config(cfg, trial | {"crf_weight": 0.5}).crf
    assert (half.gaussian_compat, half.bilateral_compat, half.iterations) == (1.5, 4.0, 6)
    off = calibrate.trial_config(cfg, trial | {"crf_weight": 0.0}).crf
    assert (off.bilateral_compat, off.iterations) == (0.0, 0)
    assert off.bilateral_srgb == cfg.crf.bilateral_srgb  # the rest is kept
    assert calibrate.trial_config(cfg, trial).crf == cfg.crf  # no CRF among the refiners' draws
    assert "crf_weight" in calibrate.search_space(cfg)
    without = calibrate.search_space(load_config(overrides=["refiners=[random_walk]"]))
    assert "crf_weight" not in without


@pytest.mark.slow
def test_calibration_writes_settings_that_score_what_it_reports(ray_cluster, tmp_path):
    params = SyntheticParams(n_classes=3, min_side=48, max_side=64, max_objects=2)
    manifest = synthetic.generate(tmp_path / "data", 6, seed=4, params=params)
    cfg = load_config(
        overrides=[
            f"dataset.manifest={manifest}",
            f"output={tmp_path / 'runs'}",
            *tiny_networks(),
            "cam.scales=[1.0]",
            "crf.iterations=2",
            "calibrate.images=4",
            "calibrate.trials=3",
        ]
    )
    torch.manual_seed(0)  # untrained networks: calibration must work on whatever they give
    networks = {
        "classifier": build_network("classifier", cfg.classifier.model, 3).eval(),
        "affinity": build_network("affinity", cfg.affinity.model, 3).eval(),
    }
    lines: list[str] = []
    report = calibrate.calibrate(cfg, networks, log=lines.append)

    assert report["images"] == 4 and len(report["trials"]) == 3
    walk = report["random_walk"]
    assert walk["chosen_final_miou"] >= walk["configured_miou"]["final"]
    assert walk["chosen_final_miou"] == max(
        walk["configured_miou"]["final"], *(t["final"] for t in report["trials"])
    )
    assert report["cam"]["chosen_miou"] >= report["cam"]["configured_miou"]
    # The written configuration holds the chosen settings and, rerun on the same images, scores
    # the reported mIoU.
    calibrated = load_config(report["config"])
    assert calibrated.random_walk.model_dump() == walk["chosen"]
    assert calibrated.crf.model_dump() == report["crf"]["chosen"]
    assert calibrated.cam.background.model_dump() == report["cam"]["chosen"]
    images, n_classes = calibrate.calibration_images(calibrated, networks)
    again = refinement_miou(images, n_classes, calibrated.labeler(networks))
    assert again["final"] == pytest.approx(walk["chosen_final_miou"], abs=1e-6)
    saved = json.loads((tmp_path / "runs" / "demo" / calibrate.REPORT_FILE).read_text())
    assert saved["trials"] == report["trials"]
    assert any(line.startswith("walk: beta ") for line in lines)


def test_cli_without_model_records_names_them_and_exits_2(tmp_path, capsys):
    code = main(["calibrate", "--set", f"output={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "classifier model record" in err and "--classifier" in err


def test_calibration_without_a_walk_fails_naming_refiners(tmp_path):
    cfg = load_config(overrides=[f"output={tmp_path}", "refiners=[crf]"])
    with pytest.raises(ConfigError, match="refiners: .*no random_walk"):
        calibrate.run(cfg)
