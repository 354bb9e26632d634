"""Storage tests run against a local folder and a memory:// one."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest


@pytest.fixture
def mem_root() -> Iterator[str]:
    """A fresh memory:// folder, removed afterwards (the memory filesystem is process-global)."""
    root = f"memory://tierprune-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path, mem_root: str) -> str:
    return str(tmp_path) if request.param == "local" else mem_root


# ---- s3:// against a local moto server (tests/storage/test_runstore.py) ----------------------------------

S3_BUCKET = "tierprune-test"


@pytest.fixture(scope="session")
def s3_base() -> Iterator[str]:
    """s3://tierprune-test on a moto server on 127.0.0.1 for the whole session; plain s3:// URIs reach it.

    fsspec applies fsspec.config.conf["s3"] to every S3FileSystem it makes, so RunStore("s3://…", …) needs no
    storage options; s3fs's instance cache is cleared so that no filesystem made before keeps other settings.
    """
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import logging

    import boto3
    import fsspec.config
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **credentials).create_bucket(Bucket=S3_BUCKET)

    saved = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield f"s3://{S3_BUCKET}"
    finally:
        if saved is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@pytest.fixture(params=["local", "memory", "s3"])
def store_root(request: pytest.FixtureRequest, tmp_path: Path, mem_root: str) -> str:
    """A fresh, empty root folder on each of the three backends."""
    if request.param == "local":
        return str(tmp_path)
    if request.param == "memory":
        return mem_root
    return f"{request.getfixturevalue('s3_base')}/test-{uuid.uuid4().hex}"
