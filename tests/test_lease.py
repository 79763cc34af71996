"""The output lease: one writer per output, on local disk and on S3 (the local S3 server)."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from pipelines import storage
from pipelines.config import ConfigError, load_config
from pipelines.lease import LEASE_FILE, Lease, LeaseHeld, leased
from pipelines.storage import StorageConfig


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path) -> tuple[str, StorageConfig]:
    if request.param == "local":
        return str(tmp_path / "out"), StorageConfig()
    bucket = request.getfixturevalue("s3_bucket")
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://{bucket}/out", StorageConfig(s3_endpoint_url=endpoint, s3_region="us-east-1")


def test_a_second_run_is_refused_naming_the_holder_until_the_first_releases(out):
    uri, config = out
    first = Lease(uri, config, "run-1", "wsss label", timeout_s=60, log=lambda _: None)
    first.acquire()
    second = Lease(uri, config, "run-2", "wsss relabel", timeout_s=60, log=lambda _: None)
    with pytest.raises(LeaseHeld, match=r"held by run-1 on .* \(wsss label\) since 20\d\d-"):
        second.acquire()
    first.release()
    assert not storage.exists(storage.join(uri, LEASE_FILE), config)
    second.acquire()
    stored = json.loads(storage.read_bytes(storage.join(uri, LEASE_FILE), config))
    assert stored["holder"].startswith("run-2 on ") and stored["command"] == "wsss relabel"
    second.release()


def test_of_many_runs_started_together_exactly_one_holds_the_lease(out):
    uri, config = out
    leases = [Lease(uri, config, f"run-{i}", "wsss label", 60, lambda _: None) for i in range(6)]
    outcomes: list[str] = []
    start = threading.Barrier(len(leases))

    def contend(lease: Lease) -> None:
        start.wait()
        try:
            lease.acquire()
            outcomes.append("held")
        except LeaseHeld:
            outcomes.append("refused")

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["held"] + ["refused"] * 5
    for lease in leases:
        lease.release()


def test_a_stale_lease_is_taken_over_and_said_so_a_renewed_one_is_not(out):
    uri, config = out
    gone = {
        "holder": "run-0 on lost-node (pid 1)",
        "command": "wsss label",
        "acquired_at": "2026-01-01T00:00:00+00:00",
        "renewed_at": (datetime.now(UTC) - timedelta(seconds=120)).isoformat(),
        "timeout_s": 60,
    }
    storage.write_bytes(storage.join(uri, LEASE_FILE), json.dumps(gone).encode(), config)
    said: list[str] = []
    taker = Lease(uri, config, "run-1", "wsss label", timeout_s=2.0, log=said.append)
    taker.acquire()
    assert said and "took over the lease" in said[0] and "from run-0 on lost-node" in said[0]
    # Renewed every timeout / 4: never stale while its holder runs, past its timeout too. (At
    # 0.4 s a loaded 2-core machine once delayed a renewal past the timeout.)
    time.sleep(3.0)
    with pytest.raises(LeaseHeld):
        Lease(uri, config, "run-2", "wsss label", 2.0, lambda _: None).acquire()
    assert not taker.lost
    taker.release()


def test_a_lease_whose_process_on_this_machine_ended_is_taken_over_at_once(tmp_path):
    import socket
    import subprocess
    import sys

    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    now = datetime.now(UTC).isoformat()
    killed = {
        "holder": "run-0",
        "command": "wsss label",
        "acquired_at": now,
        "renewed_at": now,
        "timeout_s": 600,
        "host": socket.gethostname(),
        "pid": int(ended.stdout),
    }
    out, config = str(tmp_path / "out"), StorageConfig()
    storage.write_bytes(storage.join(out, LEASE_FILE), json.dumps(killed).encode(), config)
    said: list[str] = []
    Lease(out, config, "run-1", "wsss label", 600, said.append).acquire()
    assert "from run-0" in said[0]
    # A live holder on this machine (this test's process) keeps it.
    with pytest.raises(LeaseHeld):
        Lease(out, config, "run-2", "wsss label", 600, lambda _: None).acquire()


def test_a_waiting_run_starts_when_the_holder_releases(out):
    uri, config = out
    said: list[str] = []
    with leased(uri, config, "run-1", "wsss label", 60, 0, lambda _: None) as first:
        threading.Timer(0.5, first.release).start()
        waiting = Lease(uri, config, "run-2", "wsss label", 60, said.append)
        waiting.acquire(wait_s=30, poll_s=0.1)
        assert said == [f"waiting for {first.holder} to release {first.uri}"]
        waiting.release()


def test_lease_and_every_float_setting_refuse_infinity():
    for setting in ("label.lease_timeout_s", "crf.gaussian_sxy", "random_walk.beta"):
        with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
            load_config(None, [f"{setting}=.inf"])
