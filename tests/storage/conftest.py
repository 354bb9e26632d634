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
