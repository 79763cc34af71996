import boto3
import pytest

from pipelines import storage
from pipelines.storage import StorageConfig


def test_local_round_trip(tmp_path):
    cfg = StorageConfig()
    uri = str(tmp_path / "a" / "b" / "x.bin")
    assert not storage.exists(uri, cfg)
    storage.write_bytes(uri, b"hello", cfg)
    assert storage.exists(uri, cfg)
    assert storage.read_bytes(uri, cfg) == b"hello"


def test_s3_round_trip_through_local_server(s3_endpoint, s3_bucket):
    cfg = StorageConfig(s3_endpoint_url=s3_endpoint, s3_region="us-east-1")
    uri = f"s3://{s3_bucket}/models/w.bin"
    storage.write_bytes(uri, b"\x00\x01weights", cfg)
    assert storage.exists(uri, cfg)
    assert storage.read_bytes(uri, cfg) == b"\x00\x01weights"
    # What we wrote is a real object for any other S3 client.
    body = (
        boto3.client("s3", endpoint_url=s3_endpoint)
        .get_object(Bucket=s3_bucket, Key="models/w.bin")["Body"]
        .read()
    )
    assert body == b"\x00\x01weights"
    assert not storage.exists(f"s3://{s3_bucket}/models/missing.bin", cfg)


def test_missing_s3_object_is_a_clear_error(s3_endpoint, s3_bucket):
    cfg = StorageConfig(s3_endpoint_url=s3_endpoint, s3_region="us-east-1")
    with pytest.raises(OSError, match="missing.bin"):
        storage.read_bytes(f"s3://{s3_bucket}/missing.bin", cfg)


def test_uri_helpers():
    assert storage.join("s3://b/p", "labels", "x.parquet") == "s3://b/p/labels/x.parquet"
    assert storage.join("/data/run", "a") == "/data/run/a"
    assert storage.parent("s3://b/p/manifest.jsonl") == "s3://b/p"
    assert storage.parent("data/manifest.jsonl") == "data"
    assert storage.parent("manifest.jsonl") == "."


def test_bad_endpoint_is_rejected():
    with pytest.raises(ValueError, match="s3_endpoint_url"):
        storage.filesystem("s3://b/k", StorageConfig(s3_endpoint_url="localhost:9000"))


def test_local_copy_of_an_s3_object(s3_endpoint, s3_bucket, tmp_path):
    cfg = StorageConfig(s3_endpoint_url=s3_endpoint, s3_region="us-east-1")
    uri = f"s3://{s3_bucket}/weights/backbone.pt"
    storage.write_bytes(uri, b"state", cfg)
    path = storage.local_copy(uri, cfg, cache_dir=str(tmp_path))
    assert path.startswith(str(tmp_path)) and open(path, "rb").read() == b"state"
    assert storage.local_copy(uri, cfg, cache_dir=str(tmp_path)) == path
    assert storage.local_copy("/abs/file.pt", cfg) == "/abs/file.pt"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_an_object_over_max_bytes_is_refused_before_it_is_read(where, tmp_path, request):
    if where == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        cfg = StorageConfig(s3_endpoint_url=endpoint, s3_region="us-east-1")
        uri = f"s3://{request.getfixturevalue('s3_bucket')}/big.bin"
    else:
        cfg, uri = StorageConfig(), str(tmp_path / "big.bin")
    storage.write_bytes(uri, b"x" * 1000, cfg)
    assert storage.read_bytes(uri, cfg, max_bytes=1000) == b"x" * 1000
    with pytest.raises(storage.ObjectTooLargeError, match="1000 bytes, more than .* \\(999\\)"):
        storage.read_bytes(uri, cfg, max_bytes=999)
