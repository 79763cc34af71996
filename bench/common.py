"""Helpers shared by the benchmark scripts (imported as `common`: a script's folder is on
sys.path when it runs as `python bench/x.py`)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine_info(**extra: object) -> dict:
    """The machine a benchmark ran on (core count, CPU model, Python), plus `extra` entries
    such as library versions or thread settings."""
    cpu_model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        **extra,
    }


def write_results(path: Path | None, results: dict) -> None:
    """Write a benchmark's results as JSON to `path` (its --out), when one was given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
