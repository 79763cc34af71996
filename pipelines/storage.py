"""One way to reach bytes by URI: local paths and `s3://bucket/key` through pyarrow's filesystems.

Every pipeline stage reads and writes through these functions, so a run moves from this machine
to a cluster by changing URIs in the config, not code. S3 settings (endpoint, region, retries) come
from `StorageConfig`; credentials come from the standard AWS chain (environment, ~/.aws, instance
role), never from the config file.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
from urllib.parse import urlparse

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field


class StorageConfig(BaseModel):
    """How to reach object storage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    s3_endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint, e.g. http://127.0.0.1:9000 for a local server; "
        "None means AWS (or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL from the environment).",
    )
    s3_region: str | None = Field(None, description="Region; None lets the AWS chain decide.")
    s3_max_attempts: int = Field(
        5, ge=1, le=50, description="Attempts per S3 request; throttling and 5xx are retried."
    )
    s3_anonymous: bool = Field(False, description="Unsigned requests (public buckets).")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    if is_s3(base):
        return "s3://" + posixpath.join(base[len("s3://") :], *parts)
    return posixpath.join(base, *parts)


def parent(uri: str) -> str:
    """The folder containing `uri` (local path or s3:// URI)."""
    if is_s3(uri):
        return "s3://" + posixpath.dirname(uri[len("s3://") :].rstrip("/"))
    return posixpath.dirname(uri.rstrip("/")) or "."


def endpoint_url(config: StorageConfig) -> str | None:
    """The S3 endpoint in force: the config's, else the standard AWS environment variables."""
    return (
        config.s3_endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )


@functools.lru_cache(maxsize=16)
def _s3_filesystem(config: StorageConfig, endpoint: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": config.s3_region,
        "anonymous": config.s3_anonymous,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=config.s3_max_attempts),
    }
    if endpoint:
        url = urlparse(endpoint)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(
                f"storage.s3_endpoint_url must look like http(s)://host[:port], got {endpoint!r}"
            )
        kwargs.update(endpoint_override=url.netloc, scheme=url.scheme)
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str, config: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `uri` and the path to use with it."""
    if is_s3(uri):
        return _s3_filesystem(config, endpoint_url(config)), uri[len("s3://") :]
    return pafs.LocalFileSystem(), posixpath.abspath(uri)


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key)."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


@functools.lru_cache(maxsize=16)
def _s3_client(config: StorageConfig, endpoint: str | None):
    # boto3 where pyarrow has no call: object ETags, and listings streamed page by page.
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    settings = Config(
        retries={"max_attempts": config.s3_max_attempts, "mode": "standard"},
        signature_version=UNSIGNED if config.s3_anonymous else None,
    )
    return boto3.client("s3", endpoint_url=endpoint, region_name=config.s3_region, config=settings)


def s3_client(config: StorageConfig):
    """A boto3 S3 client with the same endpoint, region and retries as `filesystem`."""
    return _s3_client(config, endpoint_url(config))


class ObjectTooLargeError(OSError):
    """An object over the size a caller accepts, found from its metadata before reading it: an
    I/O error like EFBIG, so every reader that handles unreadable objects handles it."""


def read_bytes(uri: str, config: StorageConfig, max_bytes: int | None = None) -> bytes:
    """The object or file at `uri`. With `max_bytes`, one larger than that is refused from its
    size (S3: the HEAD request a random-access read makes anyway) before any of it is read."""
    fs, path = filesystem(uri, config)
    if max_bytes is None:
        with fs.open_input_stream(path) as f:
            return f.read()
    with fs.open_input_file(path) as f:
        if f.size() > max_bytes:
            raise ObjectTooLargeError(
                errno.EFBIG, f"{uri}: {f.size()} bytes, more than dataset.max_bytes ({max_bytes})"
            )
        return f.read()


def read_text(uri: str, config: StorageConfig) -> str:
    return read_bytes(uri, config).decode("utf-8")


def write_bytes(uri: str, data: bytes, config: StorageConfig) -> None:
    fs, path = filesystem(uri, config)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def exists(uri: str, config: StorageConfig) -> bool:
    fs, path = filesystem(uri, config)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def local_copy(uri: str, config: StorageConfig, cache_dir: str | None = None) -> str:
    """A local path holding the bytes of `uri`: the path itself when local, else a copy in a
    cache folder keyed by the URI (for libraries that only read local files)."""
    if not is_s3(uri):
        return uri
    import hashlib
    import tempfile

    folder = cache_dir or os.path.join(tempfile.gettempdir(), "wsss-cache")
    os.makedirs(folder, exist_ok=True)
    key = hashlib.sha256(uri.encode()).hexdigest()[:24]
    path = os.path.join(folder, f"{key}-{posixpath.basename(uri)}")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.part"
        with open(tmp, "wb") as f:
            f.write(read_bytes(uri, config))
        os.replace(tmp, path)  # atomic: concurrent readers never see a partial file
    return path


def remove_tree(uri: str, config: StorageConfig) -> None:
    """Delete the file or folder (s3:// prefix) `uri` and everything under it; nothing when it
    is not there."""
    fs, path = filesystem(uri, config)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)
