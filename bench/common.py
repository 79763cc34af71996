"""Helpers shared by the benchmark scripts (imported as `common`: a script's folder is on
sys.path when it runs as `python bench/x.py`)."""

from __future__ import annotations

import os
import platform


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
