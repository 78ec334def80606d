"""``s3://`` sources through fsspec/s3fs, against moto's local S3 server; and
the error that names the extra to install when s3fs is missing."""

import importlib
import json
import socket
import sys

import pytest

from pipeline.data.sources import read_labeled_source
from pipeline.data.tabular import ColumnMapping, read_table

BUCKET = "finsent-test"
CSV = b'headline,sentiment\nProfit rose,positive\n"Sales fell,\nagain",negative\n'
ROWS = [{"headline": "Profit rose", "sentiment": "positive"}, {"headline": "Flat quarter", "sentiment": "neutral"}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(request):
    server_module = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    port = _free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    request.addfinalizer(server.stop)
    return f"http://127.0.0.1:{port}"


@pytest.fixture()
def bucket(s3_endpoint, monkeypatch):
    """Credentials and endpoint only through the environment, as a user would
    set them: botocore (under s3fs) reads AWS_ENDPOINT_URL when a client is made."""
    import boto3
    import s3fs

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep an older endpoint
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="in/x.csv", Body=CSV)
    client.put_object(Bucket=BUCKET, Key="in/y.jsonl", Body="\n".join(json.dumps(r) for r in ROWS).encode())
    yield BUCKET
    s3fs.S3FileSystem.clear_instance_cache()


def test_read_table_reads_csv_from_s3(bucket):
    url = f"s3://{bucket}/in/x.csv"
    frame = read_table(url, ColumnMapping(text="headline", label="sentiment"))
    assert frame[["text", "label", "line"]].values.tolist() == [
        ["Profit rose", "positive", 2], ["Sales fell,\nagain", "negative", 3],
    ]
    assert set(frame["file"]) == {url}


def test_read_labeled_source_reads_jsonl_and_csv_from_s3(bucket):
    raw, agreement = read_labeled_source(f"s3://{bucket}/in/y.jsonl", "headline", "sentiment")
    assert agreement == {}
    assert raw[["text", "label", "source", "line"]].values.tolist() == [
        ["Profit rose", "positive", "y.jsonl", 1], ["Flat quarter", "neutral", "y.jsonl", 2],
    ]
    raw, _ = read_labeled_source(f"s3://{bucket}/in/x.csv", "headline", "sentiment")
    assert raw["text"].tolist() == ["Profit rose", "Sales fell,\nagain"]


def test_without_s3fs_the_error_names_the_extra(monkeypatch):
    registry = importlib.import_module("fsspec.registry")  # the attribute fsspec.registry is a mapping, not the module

    monkeypatch.delitem(registry._registry, "s3", raising=False)  # forget an s3fs imported earlier
    monkeypatch.setitem(sys.modules, "s3fs", None)  # `import s3fs` now fails
    with pytest.raises(ImportError, match=r"s3://b/x\.csv: .*pip install 'finsent\[s3\]'"):
        read_table("s3://b/x.csv", ColumnMapping())
