"""What a person at the console sees of a Ray job: our own lines on the terminal, the rest of
the output in a log file.

Ray, its workers (whose output Ray forwards to the driver), Ray Data, Ray Train, torch and the
C++ core all write to this process's stdout and stderr: a demo run printed about 54 kB, nearly
all of it theirs, around the dozen lines a user wants (stages, training progress, counts, the
per-stage table, where the gallery is). `library_output_to` points file descriptors 1 and 2 at
a log file, so whatever writes there (Python or C++) lands in it, and hands back a writer to the
terminal as it was for our lines. On an interactive terminal stderr stays there: it carries Ray
Data's progress bars, which help a person watching; their non-terminal form (a log line per
operator every 10 s) goes to the file with the rest.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pipelines import storage
from pipelines.config import RunConfig


def log_path(cfg: RunConfig, command: str) -> Path:
    """The log file of one `command` run of `cfg`: in `cfg.log_dir`, else in the run folder's
    logs/ when that is local, else in ./logs/<name>/."""
    if cfg.log_dir is not None:
        folder = Path(cfg.log_dir)
    elif not storage.is_s3(cfg.run_uri):
        folder = Path(cfg.layout.logs)
    else:
        folder = Path("logs") / cfg.name
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return folder / f"{command}-{stamp}-{os.getpid()}.log"


@contextmanager
def library_output_to(path: Path) -> Iterator[Callable[[str], None]]:
    """Within the block, stdout (and stderr unless it is a terminal) go to the file `path`;
    yields a function that writes a line to the terminal's stdout as it was before."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    streams = [1] if sys.stderr.isatty() else [1, 2]
    saved = {fd: os.dup(fd) for fd in streams}
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for fd in streams:
        os.dup2(log_fd, fd)
    os.close(log_fd)

    def say(line: str) -> None:
        print(line, file=terminal, flush=True)

    try:
        yield say
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        terminal.close()
