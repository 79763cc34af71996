"""Helpers shared by the benchmark scripts (imported as `common`: a script's folder is on
sys.path when it runs as `python bench/x.py`)."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
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


class PeakMemory:
    """Samples, until stopped, the RSS of this process (the driver), the summed RSS of it and
    all its descendants (Ray's GCS, raylet and workers) and the largest private memory (USS)
    of any one Ray worker process (a task or an actor), every `interval_s`. Processes in
    `exclude` (and their descendants), e.g. a local S3 server, do not count. Shared pages (the
    object store) count once per process mapping them."""

    def __init__(self, interval_s: float = 0.2, exclude: tuple[int, ...] = ()) -> None:
        self.interval_s = interval_s
        self.exclude = set(exclude)
        self.peak_total = self.peak_driver = self.peak_worker = 0
        self.peak_worker_name = ""
        self._titles: dict[int, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil  # vendored by Ray, importable once ray is imported

        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            skip = set(self.exclude)
            for process in me.children(recursive=True):
                try:
                    if process.pid in skip or process.ppid() in skip:
                        skip.add(process.pid)
                        continue
                    rss = process.memory_info().rss
                    total += rss
                    title = process.cmdline()[:1]
                    if title and title[0].startswith("ray::"):
                        # A worker is renamed for each task it runs (ray::IDLE between
                        # them): keep every name it had.
                        names = self._titles.setdefault(process.pid, set())
                        names.add(title[0])
                        # Its private memory: RSS also counts the object store pages it wrote.
                        uss = process.memory_full_info().uss
                        if uss > self.peak_worker:
                            self.peak_worker = uss
                            self.peak_worker_name = ", ".join(sorted(names))
                except psutil.Error:  # it ended between listing and reading
                    pass
            driver = me.memory_info().rss
            self.peak_total = max(self.peak_total, total + driver)
            self.peak_driver = max(self.peak_driver, driver)
            self._stop.wait(self.interval_s)

    def mib(self) -> dict:
        """The peaks in MiB."""
        return {
            "peak_rss_mib": round(self.peak_total / 2**20),
            "peak_driver_rss_mib": round(self.peak_driver / 2**20),
            "peak_worker_uss_mib": round(self.peak_worker / 2**20),
            "peak_worker": self.peak_worker_name,
        }

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def settle(quiet_s: float = 5.0, timeout_s: float = 60.0) -> None:
    """Wait until the processes of the run before have exited (the number of this process's
    descendants unchanged for `quiet_s`), so that they do not count in the next run's peak
    memory. Ray keeps its daemons, idle workers and Ray Data's helper actors between runs."""
    import psutil  # vendored by Ray

    deadline = time.monotonic() + timeout_s
    count, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = len(psutil.Process().children(recursive=True))
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.5)
