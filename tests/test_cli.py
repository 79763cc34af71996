import subprocess
import sys
from pathlib import Path

from pipelines.cli import main
from pipelines.config import load_config


def test_console_command_help_lists_subcommands():
    wsss = Path(sys.executable).parent / "wsss"  # the console script the package installs
    out = subprocess.run([wsss, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("synth", "run-local", "config"):
        assert command in out


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "--set", "name=nightly", "--set", "crf.iterations=3"]) == 0
    out = capsys.readouterr().out
    assert "name: nightly" in out
    assert "iterations: 3" in out


def test_invalid_config_fails_before_work_and_names_field(capsys, tmp_path):
    out_dir = tmp_path / "synth"
    code = main(["synth", "--out", str(out_dir), "--n", "2", "--set", "synthetic.seed=-3"])
    assert code == 2
    assert "synthetic.seed" in capsys.readouterr().err
    assert not out_dir.exists()


def test_bad_manifest_is_reported_not_a_traceback(capsys, tmp_path):
    (tmp_path / "classes.txt").write_text("background\ncat\n")
    (tmp_path / "manifest.jsonl").write_text('{"image": "a.png", "labels": ["dog"]}\n')
    code = main(["run-local", "--set", f"dataset.manifest={tmp_path / 'manifest.jsonl'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "row 1" in err and "dog" in err


def test_synth_writes_dataset_and_its_config(tmp_path):
    out = tmp_path / "ds"
    assert main(["synth", "--out", str(out), "--n", "3", "--seed", "5"]) == 0
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 3
    cfg = load_config(out / "config.yaml")
    assert (cfg.synthetic.n, cfg.synthetic.seed, cfg.synthetic.out) == (3, 5, str(out))
