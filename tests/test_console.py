import subprocess
import sys
import textwrap

from pipelines import console
from pipelines.config import load_config

SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from pipelines.console import library_output_to

    with library_output_to(Path(sys.argv[1])) as say:
        print("a library's line")
        sys.stderr.write("a warning\\n")
        os.write(1, b"C++ output on fd 1\\n")
        os.write(2, b"C++ output on fd 2\\n")
        say("our line")
    print("after the block")
    """
)


def test_library_output_goes_to_the_log_file_and_our_lines_to_the_terminal(tmp_path):
    log = tmp_path / "logs" / "run.log"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, check=True
    )
    # stdout and stderr are pipes here, not a terminal: both go to the file.
    assert done.stdout == "our line\nafter the block\n"
    assert done.stderr == ""
    text = log.read_text()
    for line in ("a library's line", "a warning", "C++ output on fd 1", "C++ output on fd 2"):
        assert line in text
    assert "our line" not in text


def test_log_path_is_in_the_run_folder_when_local(tmp_path):
    local = load_config(overrides=[f"output={tmp_path}", "name=r"])
    path = console.log_path(local, "run")
    assert path.parent == tmp_path / "r" / "logs" and path.name.startswith("run-")
    remote = load_config(overrides=["output=s3://bucket/runs", "name=r"])
    assert console.log_path(remote, "label").parent.as_posix() == "logs/r"
    chosen = load_config(overrides=["output=s3://bucket/runs", f"log_dir={tmp_path}"])
    assert console.log_path(chosen, "label").parent == tmp_path
