"""One writer per output: a lease that a labeling or relabel run holds on the folder or S3 prefix
it writes, so that two runs (a cron overlap, a manual run beside the nightly one) never plan
against the same finished shards and label every pending image twice.

The lease is a small JSON object, `<out>/_lease.json`: who holds it, since when, when it was last
renewed. It is created only if absent and replaced only if unchanged since it was read
(compare-and-swap): on S3 with conditional writes (`If-None-Match: *`, `If-Match: <ETag>`), on
local disk with an exclusive create and, for replacing, a content check under an advisory file
lock. The holder renews it from a background thread; a lease not renewed for `timeout_s`, or
whose holder's process on this machine has ended, belongs to a run that is gone, and the next run
takes it over (and says so).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from pipelines import storage
from pipelines.storage import StorageConfig

LEASE_FILE = "_lease.json"


class LeaseHeld(RuntimeError):
    """Another run holds the output's lease (and renews it)."""

    def __init__(self, uri: str, lease: dict) -> None:
        self.lease = lease
        super().__init__(
            f"{uri} is held by {lease.get('holder')} ({lease.get('command')}) since "
            f"{lease.get('acquired_at')}, last renewed {lease.get('renewed_at')}: another run "
            "is writing this output. Wait for it to finish (or set label.lease_wait_s); a holder "
            f"that stops renewing is taken over after {lease.get('timeout_s')} s"
        )


@dataclass(frozen=True)
class _Stored:
    lease: dict
    tag: str  # what a compare-and-swap compares: the S3 ETag, or the local content's digest


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")  # timeouts may be under 1 s


def _gone(lease: dict, timeout_s: float) -> bool:
    """Whether the lease's holder is gone: it has not renewed it for its timeout, or it ran on
    this machine and its process has ended (a killed run started again need not wait)."""
    renewed = datetime.fromisoformat(lease["renewed_at"])
    if (datetime.now(UTC) - renewed).total_seconds() > lease.get("timeout_s", timeout_s):
        return True
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


class _LocalFile:
    """Compare-and-swap on a local file; an advisory lock beside it orders the swaps."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> _Stored | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return _Stored(json.loads(data), hashlib.sha256(data).hexdigest())

    def create(self, data: bytes) -> str | None:
        with self._locked():
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return hashlib.sha256(data).hexdigest()

    def replace(self, tag: str, data: bytes) -> str | None:
        with self._locked():
            current = self.read()
            if current is None or current.tag != tag:
                return None
            temporary = f"{self.path}.{os.getpid()}.tmp"
            with open(temporary, "wb") as f:
                f.write(data)
            os.replace(temporary, self.path)
        return hashlib.sha256(data).hexdigest()

    def delete(self, tag: str) -> None:
        with self._locked():
            current = self.read()
            if current is not None and current.tag == tag:
                os.remove(self.path)


class _S3Object:
    """Compare-and-swap on an S3 object with conditional writes."""

    def __init__(self, uri: str, config: StorageConfig) -> None:
        self.bucket, self.key = storage.split_s3(uri)
        self.client = storage.s3_client(config)

    def read(self) -> _Stored | None:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        return _Stored(json.loads(got["Body"].read()), got["ETag"])

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            put = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except self.client.exceptions.ClientError as exc:
            # 412: the condition failed; 409: a concurrent conditional write won the race.
            if exc.response["ResponseMetadata"]["HTTPStatusCode"] in (409, 412):
                return None
            raise
        return put["ETag"]

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, tag: str, data: bytes) -> str | None:
        return self._put(data, IfMatch=tag)

    def delete(self, tag: str) -> None:
        current = self.read()
        if current is not None and current.tag == tag:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)


class Lease:
    """The lease on the output `out` for one run (`holder`: its run id), held from `acquire` to
    `release`, renewed every `timeout_s / 4` seconds meanwhile."""

    def __init__(
        self,
        out: str,
        config: StorageConfig,
        holder: str,
        command: str,
        timeout_s: float,
        log: Callable[[str], None] = print,
    ) -> None:
        self.uri = storage.join(out, LEASE_FILE)
        self.store = _S3Object(self.uri, config) if storage.is_s3(out) else _LocalFile(self.uri)
        self.holder = f"{holder} on {socket.gethostname()} (pid {os.getpid()})"
        self._identity = {"host": socket.gethostname(), "pid": os.getpid()}
        self.command = command
        self.timeout_s = timeout_s
        self.log = log
        self.tag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._acquired_at = ""

    def _content(self) -> bytes:
        lease = {
            "holder": self.holder,
            "command": self.command,
            "acquired_at": self._acquired_at,
            "renewed_at": _now(),
            "timeout_s": self.timeout_s,
            **self._identity,
        }
        return json.dumps(lease).encode()

    def try_acquire(self) -> dict | None:
        """Take the lease if it is free or stale; otherwise the holder's lease (not taken)."""
        self._acquired_at = _now()
        self.tag = self.store.create(self._content())
        if self.tag is not None:
            return None
        current = self.store.read()
        if current is None:  # released between our create and read: try once more
            return self.try_acquire()
        if not _gone(current.lease, self.timeout_s):
            return current.lease
        self.tag = self.store.replace(current.tag, self._content())
        if self.tag is None:  # another run took the stale lease over first
            winner = self.store.read()
            return winner.lease if winner is not None else current.lease
        self.log(
            f"took over the lease of {self.uri} from {current.lease.get('holder')}, which is gone "
            f"(last renewed at {current.lease.get('renewed_at')})"
        )
        return None

    def acquire(self, wait_s: float = 0.0, poll_s: float = 1.0) -> None:
        """Take the lease, waiting up to `wait_s` for its holder; LeaseHeld if it does not end
        in time. Starts renewing it."""
        deadline = time.monotonic() + wait_s
        said = False
        while (held := self.try_acquire()) is not None:
            if time.monotonic() >= deadline:
                raise LeaseHeld(self.uri, held)
            if not said:
                self.log(f"waiting for {held.get('holder')} to release {self.uri}")
                said = True
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        self._renewer = threading.Thread(target=self._renew, name="lease-renewal", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.timeout_s / 4):
            tag = self.store.replace(self.tag, self._content())
            if tag is None:
                self.lost = True
                self.log(f"lost the lease of {self.uri}: another run took it over")
                return
            self.tag = tag

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.tag is not None and not self.lost:
            self.store.delete(self.tag)
        self.tag = None


@contextmanager
def leased(
    out: str,
    config: StorageConfig,
    holder: str,
    command: str,
    timeout_s: float,
    wait_s: float,
    log: Callable[[str], None] = print,
) -> Iterator[Lease]:
    """Hold the lease of `out` for the block (see `Lease`)."""
    lease = Lease(out, config, holder, command, timeout_s, log)
    lease.acquire(wait_s)
    try:
        yield lease
    finally:
        lease.release()
