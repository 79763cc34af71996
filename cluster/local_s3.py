"""A local S3-compatible service for the demo and development: moto's server on 127.0.0.1.

The demo runs the same commands and configuration a cluster user runs, against this server instead
of AWS. `run` is built for a Makefile: it starts the server, creates the bucket, uploads folders,
runs one command with the endpoint and fake credentials in its environment, and stops the server
when the command ends (also when it fails, or on Ctrl-C or SIGTERM), returning its exit status:

    python -m cluster.local_s3 run --bucket wsss-demo --upload data/synthetic:synthetic -- \\
        sh -c 'wsss train-classifier -c demo.yaml && wsss label -c demo.yaml'

`serve` does the same set-up and keeps the server up until Ctrl-C, printing the environment to
export in another shell. Objects live in memory: they are gone when the server stops.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

HOST = "127.0.0.1"  # loopback only: the server has no authentication
REGION = "us-east-1"
FAKE_KEY = "wsss-local"


class LocalS3Error(RuntimeError):
    """The local S3 service cannot be set up as asked; the message says what to change."""


class LocalS3:
    """moto's S3 server on loopback, started and stopped explicitly or as a context manager."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._server = None

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise LocalS3Error("the local S3 server is not running")
        host, port = self._server.get_host_and_port()
        return f"http://{host}:{port}"

    def start(self) -> str:
        """Start the server; returns its endpoint URL."""
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as exc:
            raise LocalS3Error(
                f"{exc}: moto[server] is a dev dependency of wsss (`uv sync` installs it)"
            ) from None

        if self.port:
            _check_port_free(self.port)  # moto's start() would wait forever on a taken port
        # werkzeug logs one line per request, which would drown the output of the command run.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(ip_address=HOST, port=self.port, verbose=False)
        self._server.start()
        return self.endpoint

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> LocalS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def environment(self) -> dict[str, str]:
        """The variables that point boto3, pyarrow and `pipelines.storage` at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": FAKE_KEY,
            "AWS_SECRET_ACCESS_KEY": FAKE_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=FAKE_KEY,
            aws_secret_access_key=FAKE_KEY,
        )

    def create_bucket(self, bucket: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client().create_bucket(Bucket=bucket)
        except ClientError as exc:
            raise LocalS3Error(f"--bucket {bucket!r}: {exc}") from None

    def upload(self, folder: str | Path, bucket: str, prefix: str = "") -> int:
        """Upload every file under `folder` to `s3://bucket/prefix/<relative path>`; returns the
        number of files."""
        folder = Path(folder)
        client = self.client()
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        for path in files:
            key = "/".join(filter(None, [prefix.strip("/"), path.relative_to(folder).as_posix()]))
            client.upload_file(str(path), bucket, key)
        return len(files)


def _check_port_free(port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            raise LocalS3Error(f"--port {port}: cannot listen on {HOST}:{port} ({exc})") from None


def parse_upload(spec: str) -> tuple[Path, str]:
    """`DIR:PREFIX` -> (DIR, PREFIX); DIR must be an existing folder, PREFIX may be empty."""
    folder, sep, prefix = spec.rpartition(":")
    if not sep or not folder:
        raise LocalS3Error(f"--upload {spec!r} must look like DIR:PREFIX (e.g. data/synthetic:ds)")
    if not Path(folder).is_dir():
        raise LocalS3Error(f"--upload {spec!r}: {folder} is not a folder")
    return Path(folder), prefix


def set_up(server: LocalS3, bucket: str, uploads: Sequence[tuple[Path, str]]) -> None:
    """Create `bucket` on the running server and upload each (folder, prefix)."""
    server.create_bucket(bucket)
    _say(f"local S3 at {server.endpoint}, bucket {bucket}")
    for folder, prefix in uploads:
        count = server.upload(folder, bucket, prefix)
        _say(f"uploaded {count} files from {folder} to s3://{bucket}/{prefix.strip('/')}")


def run(
    command: Sequence[str],
    bucket: str,
    uploads: Sequence[tuple[Path, str]] = (),
    port: int = 0,
) -> int:
    """Start the server, set up `bucket`, run `command` against it, stop the server; returns the
    command's exit status (128 + N when signal N ended it, 127 when it cannot be started)."""
    with LocalS3(port) as server:
        set_up(server, bucket, uploads)
        # The fake keys replace real ones; a real session token or profile must not mix in.
        env = {k: v for k, v in os.environ.items() if k not in ("AWS_SESSION_TOKEN", "AWS_PROFILE")}
        env.update(server.environment())
        try:
            proc = subprocess.Popen(list(command), env=env)
        except OSError as exc:
            _say(f"cannot run {command[0]!r}: {exc}")
            return 127
        try:
            status = proc.wait()
        finally:
            _end(proc)  # on Ctrl-C or SIGTERM the command goes before the server it talks to
        return 128 - status if status < 0 else status


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve(bucket: str, uploads: Sequence[tuple[Path, str]] = (), port: int = 0) -> int:
    """Start the server, set up `bucket`, print the environment to export, wait for Ctrl-C."""
    with LocalS3(port) as server:
        set_up(server, bucket, uploads)
        for name, value in server.environment().items():
            print(f"export {name}={value}", flush=True)
        _say("serving until Ctrl-C")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


def _say(message: str) -> None:
    # stderr: the command run by `run` owns stdout.
    print(f"local_s3: {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.local_s3",
        description="A local S3-compatible server (moto) on 127.0.0.1 for the demo and tests.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    for name, help_text in (
        ("run", "set up the server, run COMMAND against it, stop the server"),
        ("serve", "set up the server and keep it up until Ctrl-C"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--bucket", required=True, help="bucket to create")
        p.add_argument(
            "--upload",
            action="append",
            default=[],
            metavar="DIR:PREFIX",
            help="upload the files under DIR to s3://BUCKET/PREFIX/ (repeatable)",
        )
        p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    sub.choices["run"].add_argument(
        "command", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="command and arguments"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        uploads = [parse_upload(spec) for spec in args.upload]
        if args.action == "serve":
            return serve(args.bucket, uploads, args.port)
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            parser.error("run needs a command after --")
        return run(command, args.bucket, uploads, args.port)
    except LocalS3Error as exc:
        _say(str(exc))
        return 2
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through `finally`: the server and command stop


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())
