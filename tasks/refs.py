"""References to committed step outputs, and the keys that say when a step's output can be reused.

A step's folder is `iter-K/<step>-<key>`, where the key hashes the step's inputs (their sha256s), its
own slice of the config and `code_version()`: every source file of the package plus the versions of
torch, transformers and peft. A step whose committed output exists (and verifies) is not recomputed;
change anything that could change its result and the key, hence the folder, changes with it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext
from pydantic import BaseModel, ConfigDict

from tierprune import __version__
from tierprune.faults import crash_point
from tierprune.storage.runstore import RunStore

__all__ = ["ArtifactRef", "code_version", "source_files", "package_versions", "step_key", "committed_or_compute",
           "store_cache_policy"]

log = logging.getLogger(__name__)

# The packages whose source decides results (tierprune.* maps top-level folders, see pyproject.toml).
_PACKAGES = ("tierprune", "tierprune.kernels", "tierprune.tasks", "tierprune.flows", "tierprune.storage",
             "tierprune.schedules")
# Libraries whose upgrade can change a number: part of every key.
_LIBRARIES = ("torch", "transformers", "peft")


class ArtifactRef(BaseModel):
    """A committed step output: where it is, the sha256 of each of its files, and what computing it took."""

    model_config = ConfigDict(frozen=True)
    uri: str
    files: dict[str, str]
    seconds: float = 0.0  # the compute time recorded when it was committed (not the time to find it again)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()


def source_files(roots: list[Path] | None = None) -> list[Path]:
    """Every .py file of the package (folders searched recursively), in a stable order."""
    if roots is None:
        import importlib

        roots = [Path(p) for name in _PACKAGES for p in importlib.import_module(name).__path__]
    files = {p.resolve() for root in roots for p in Path(root).rglob("*.py") if "__pycache__" not in p.parts}
    return sorted(files)


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """The installed version of each named distribution ("absent" if it is not installed)."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def _library_versions() -> dict[str, str]:
    return package_versions(_LIBRARIES)


def code_version(roots: list[Path] | None = None) -> str:
    """tierprune's version, a hash of every source file's bytes and the versions of torch/transformers/peft."""
    if roots is None:
        return _installed_code_version()
    return _code_version(source_files(roots))


@lru_cache(maxsize=1)
def _installed_code_version() -> str:
    return _code_version(source_files())


def _code_version(files: list[Path]) -> str:
    h = hashlib.sha256(__version__.encode())
    h.update(json.dumps(_library_versions(), sort_keys=True).encode())
    for path in files:
        # The file's name within its package folder (not where the package is installed) and its bytes.
        h.update(f"{path.parent.name}/{path.name}".encode())
        h.update(path.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


def step_key(step: str, material: dict, code: str | None = None) -> str:
    """The hash that names a step's folder: its inputs, its config slice and the code version."""
    blob = json.dumps({"step": step, "code": code or code_version(), **material}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _logger() -> logging.Logger | logging.LoggerAdapter:
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:  # called as a plain function (tests, scripts)
        return log


def committed_or_compute(store: RunStore, iteration: int, step: str, material: dict,
                         compute: Callable[[], dict[str, Any] | tuple[dict[str, Any], dict[str, int]]],
                         meta: dict | None = None) -> ArtifactRef:
    """The committed output of this step and inputs, verified; else compute() it and commit the result.

    compute returns {file name: bytes | DataFrame | tensor dict | JSON dict}, or that and the
    {sha256: size} of the blobs the step refers to (a checkpoint's tensors).
    """
    uri = store.step_uri(iteration, step, step_key(step, material))
    if store.verify_step(uri):
        marker_meta = store.step_meta(uri)
        _logger().info("%s of iteration %d already committed at %s", step, iteration, uri)
        return ArtifactRef(uri=uri, files=store.load_step(uri) or {}, seconds=marker_meta.get("seconds", 0.0))
    crash_point(f"step:iter-{iteration:03d}/{step}:start")  # tests only (tierprune.faults)
    started, io_before = time.perf_counter(), dict(store.io)
    output = compute()
    files, blobs = output if isinstance(output, tuple) else (output, {})
    # The step's compute time and how much of it went to the store (io); commit_step adds its own and the sum.
    meta = {**(meta or {}), "compute_seconds": round(time.perf_counter() - started, 4),
            "io": {k: round(store.io[k] - io_before[k], 4) for k in store.io}}
    hashes = store.commit_step(uri, files, meta, blobs=blobs)
    return ArtifactRef(uri=uri, files=hashes, seconds=store.step_meta(uri).get("seconds", 0.0))


def store_cache_policy(step: str, material_fn: Callable[[dict], dict]) -> CacheKeyFnPolicy:
    """A Prefect cache policy whose key exists only while the store holds this step's committed output.

    The store is the truth: the key lets the UI show Cached steps, and it changes the moment the committed
    output is missing, so a stale Prefect cache is never used. Tasks take the run state as `state`.
    """
    def cache_key(context: TaskRunContext, parameters: dict) -> str | None:
        store: RunStore = parameters["state"].store
        key = step_key(step, material_fn(parameters))
        uri = store.step_uri(parameters["iteration"], step, key)
        if not store.verify_step(uri):  # hashed once per process; a damaged step is recomputed, never reused
            return None
        # Prefect uses the key as a file name in its result storage: a hash, not a path.
        return hashlib.sha256(f"{store.uri}|{uri}".encode()).hexdigest()
    return CacheKeyFnPolicy(cache_key_fn=cache_key)
