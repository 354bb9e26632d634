"""RunStore's health: RUN.json and manifest rebuild/repair, per-step status, stale temporaries, lock states."""
from __future__ import annotations

import json
import os
import posixpath
import socket
import subprocess
import sys

import pytest
from fsspec.core import url_to_fs

from tierprune.errors import TierpruneError
from tierprune.storage.runstore import RunStore

pytestmark = pytest.mark.unit

FILES = {"scores.parquet": b"\x00scores" * 100, "plan.json": b'{"layers": [1, 2, 3]}'}


def _fs(uri: str):
    fs, path = url_to_fs(uri)
    fs.invalidate_cache(path)
    return fs, path


def _put(uri: str, data: bytes) -> None:
    fs, path = _fs(uri)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


def _exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.exists(path)


def _rm(uri: str) -> None:
    fs, path = _fs(uri)
    fs.rm(path)


def _run_with_steps(root: str) -> tuple[RunStore, list[str]]:
    store = RunStore(root, "r1")
    store.create({"fingerprint": "fp-1", "model": {"name": "tiny"}, "plan": [[1, 0.5]], "versions": {"torch": "x"}})
    uris = [store.step_uri(1, "scores", "a" * 16), store.step_uri(1, "tiers", "b" * 16),
            store.step_uri(2, "scores", "c" * 16)]
    for i, uri in enumerate(uris):
        store.commit_step(uri, {**FILES, "n.txt": str(i).encode()}, {"seconds": i})
    return store, [uri[len(store.uri) + 1:] for uri in uris]


def test_create_writes_an_identity_file_that_never_changes(root: str) -> None:
    store, _ = _run_with_steps(root)
    identity = json.loads(_fs(f"{store.uri}/RUN.json")[0].cat_file(_fs(f"{store.uri}/RUN.json")[1]))
    manifest = store.manifest()
    assert identity == {k: v for k, v in manifest.items() if k != "steps"}
    assert identity["fingerprint"] == "fp-1" and identity["model"] == {"name": "tiny"}


def test_missing_manifest_is_rebuilt_from_run_json_and_commit_markers(root: str) -> None:
    store, rels = _run_with_steps(root)
    original = store.manifest()
    _rm(f"{store.uri}/manifest.json")

    assert store.exists()  # RUN.json alone keeps it a run (listed, and not a "foreign folder" for create)
    assert store.manifest() == original  # rebuilt in memory: identity and every step, files and meta
    assert not _exists(f"{store.uri}/manifest.json"), "a reader must not write"
    assert set(store.committed_steps()) == set(rels)

    store.create({"fingerprint": "fp-1", "model": {"name": "tiny"}})  # the writer reopens the run...
    assert _exists(f"{store.uri}/manifest.json")  # ...and writes the rebuilt manifest back
    assert store.manifest() == original
    # and the run goes on: a new step is recorded next to the rebuilt ones
    store.commit_step(store.step_uri(3, "scores", "d" * 16), FILES)
    assert len(store.committed_steps()) == 4


def test_garbled_manifest_is_refused_with_the_repair_command_then_repaired(root: str) -> None:
    store, rels = _run_with_steps(root)
    original = store.manifest()
    garbled = b'{"format": "tierprune-run/1", "steps": {"iter-0'
    _put(f"{store.uri}/manifest.json", garbled)

    with pytest.raises(TierpruneError, match=f"tierprune runs repair {store.uri}") as info:
        store.manifest()
    assert "\n" not in str(info.value)
    with pytest.raises(TierpruneError, match="runs repair"):
        store.create({"fingerprint": "fp-1"})  # a rerun tells the user the same command

    result = store.repair()
    assert result == {"steps": 3, "backup": f"{store.uri}/manifest.json.bak", "unchanged": False}
    assert _fs(result["backup"])[0].cat_file(_fs(result["backup"])[1]) == garbled  # kept for a post-mortem
    assert store.manifest() == original
    # Repaired again: the manifest is already right, so nothing is written and the garbled backup stays.
    assert store.repair() == {"steps": 3, "backup": None, "unchanged": True}
    assert _fs(result["backup"])[0].cat_file(_fs(result["backup"])[1]) == garbled


def test_repair_drops_a_step_whose_marker_is_gone_and_adds_one_the_manifest_missed(root: str) -> None:
    store, rels = _run_with_steps(root)
    _rm(f"{store.uri}/{rels[0]}/COMMIT.json")
    manifest = store.manifest()
    del manifest["steps"][rels[2]]
    _put(f"{store.uri}/manifest.json", json.dumps(manifest).encode())

    store.repair()
    assert set(store.committed_steps()) == {rels[1], rels[2]}


def test_a_run_without_run_json_cannot_be_rebuilt_and_says_so(root: str) -> None:
    store, _ = _run_with_steps(root)
    _rm(f"{store.uri}/RUN.json")  # a run made before RUN.json existed
    _put(f"{store.uri}/manifest.json", b"garbage")
    with pytest.raises(TierpruneError, match="no RUN.json"):
        store.manifest()
    with pytest.raises(TierpruneError, match="no RUN.json"):
        store.repair()


def test_an_older_run_gets_its_run_json_when_reopened(root: str) -> None:
    store, _ = _run_with_steps(root)
    _rm(f"{store.uri}/RUN.json")
    store.create({"fingerprint": "fp-1"})
    assert _exists(f"{store.uri}/RUN.json")
    _rm(f"{store.uri}/manifest.json")
    assert len(store.manifest()["steps"]) == 3


def test_verify_reports_committed_damaged_and_missing_steps(root: str) -> None:
    store, rels = _run_with_steps(root)
    assert [(s.step, s.status) for s in store.verify()] == [(rel, "committed") for rel in sorted(rels)]

    path = f"{store.uri}/{rels[0]}/scores.parquet"
    data = bytearray(_fs(path)[0].cat_file(_fs(path)[1]))
    data[3] ^= 0xFF  # same size, other bytes
    _put(path, bytes(data))
    _rm(f"{store.uri}/{rels[1]}/COMMIT.json")  # recorded in the manifest, marker lost
    _rm(f"{store.uri}/{rels[2]}/plan.json")

    status = {s.step: s for s in store.verify()}
    assert status[rels[0]].status == "damaged" and "scores.parquet" in status[rels[0]].detail
    assert "sha256" in status[rels[0]].detail
    assert status[rels[1]].status == "missing"
    assert status[rels[2]].status == "damaged" and "plan.json is missing" in status[rels[2]].detail
    # The quick check (markers and presence only) sees what needs no hashing.
    quick = {s.step: s.status for s in store.verify(deep=False)}
    assert quick == {rels[0]: "committed", rels[1]: "missing", rels[2]: "damaged"}


def test_verify_reports_a_garbled_manifest_but_still_checks_the_steps(root: str) -> None:
    store, rels = _run_with_steps(root)
    _put(f"{store.uri}/manifest.json", b"{")
    statuses = store.verify()
    assert statuses[0].step == "manifest.json" and statuses[0].status == "damaged"
    assert "runs repair" in statuses[0].detail
    assert [s.status for s in statuses[1:]] == ["committed"] * 3


def test_recomputing_a_step_removes_the_temporaries_of_a_crashed_attempt(store_root: str) -> None:
    # On S3 a crash mid-upload leaves a whole checkpoint under a *.tmp-* name that no marker lists.
    store = RunStore(store_root, "r1")
    store.create({"fingerprint": "fp-1"})
    uri = store.step_uri(2, "checkpoint", "e" * 16)
    stale = [f"{uri}/checkpoint.safetensors.tmp-0123456789ab", f"{uri}/COMMIT.json.tmp-ba9876543210"]
    for path in stale:
        _put(path, b"\x00" * 4096)
    other_step = store.step_uri(2, "tiers", "f" * 16)
    _put(f"{other_step}/tiers.parquet.tmp-aaaaaaaaaaaa", b"x")  # another step's: not this commit's business

    store.commit_step(uri, {"checkpoint.safetensors": b"weights"})
    assert not any(_exists(p) for p in stale)
    assert _exists(f"{other_step}/tiers.parquet.tmp-aaaaaaaaaaaa")
    assert store.load_step(uri) is not None
    fs, path = _fs(uri)
    assert sorted(posixpath.basename(p) for p in fs.ls(path, detail=False)) == ["COMMIT.json",
                                                                               "checkpoint.safetensors"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_states(root: str) -> None:
    store = RunStore(root, "r1")
    store.create({"fingerprint": "fp-1"})
    assert store.lock_state() == "unlocked" and store.lock_holder() is None
    with store.lock():
        assert store.lock_state() == "alive"  # this very process
        assert store.lock_holder()["pid"] == os.getpid()
    lock = f"{store.uri}/LOCK"
    _put(lock, json.dumps({"owner": "x", "pid": _dead_pid(), "host": socket.gethostname(), "token": "t"}).encode())
    assert store.lock_state() == "dead"
    _put(lock, json.dumps({"owner": "x", "pid": os.getpid(), "host": "elsewhere", "token": "t"}).encode())
    assert store.lock_state() == "foreign"
    _put(lock, b"")  # being written, or damaged: nobody here can tell whose it is
    assert store.lock_state() == "foreign"


def test_break_lock_with_a_token_leaves_a_lock_taken_over_since(root: str) -> None:
    store = RunStore(root, "r1")
    store.create({"fingerprint": "fp-1"})
    _put(f"{store.uri}/LOCK", json.dumps({"owner": "new", "pid": 1, "host": "elsewhere", "token": "new"}).encode())
    assert not store.break_lock(token="old")
    assert store.lock_holder()["owner"] == "new"
    assert store.break_lock(token="new")
    assert store.lock_holder() is None


def test_a_hard_termination_releases_the_held_lock(root: str) -> None:
    # What tierprune.lifecycle runs when SIGTERM cannot unwind in time.
    from tierprune import lifecycle

    store = RunStore(root, "r1")
    store.create({"fingerprint": "fp-1"})
    lock = store.lock()
    lock.acquire()
    try:
        lifecycle.run_cleanups()
        assert store.lock_holder() is None
        assert not lock.held
    finally:
        lock.release()
    with store.lock():  # and a released lock is no longer in the cleanups
        pass
    lifecycle.run_cleanups()
