"""Storage tests run against a local folder and a memory:// one."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path, mem_root: str) -> str:
    return str(tmp_path) if request.param == "local" else mem_root


# ---- s3:// against a local moto server (tests/storage/test_runstore.py) ----------------------------------

@pytest.fixture(params=["local", "memory", "s3"])
def store_root(request: pytest.FixtureRequest, tmp_path: Path, mem_root: str) -> str:
    """A fresh, empty root folder on each of the three backends."""
    if request.param == "local":
        return str(tmp_path)
    if request.param == "memory":
        return mem_root
    return f"{request.getfixturevalue('s3_base')}/test-{uuid.uuid4().hex}"
