"""RunStore: manifest, committed steps, corruption detection and the lock, on local, memory:// and s3:// (moto)."""
from __future__ import annotations

import json
import os
import posixpath
from datetime import datetime

import pytest
from fsspec.core import url_to_fs

from tierprune.errors import TierpruneError
from tierprune.storage.runstore import COMMIT, CorruptArtifactError, RunStore, sha256_bytes

pytestmark = pytest.mark.unit

FILES = {"scores.parquet": b"\x00scores" * 100, "plan.json": b'{"layers": [1, 2, 3]}'}


def _fs_path(uri: str):
    return url_to_fs(uri)


def _put(uri: str, data: bytes) -> None:
    """Write a file behind the store's back (a crashed writer, a foreign file, a damaged artifact)."""
    fs, path = _fs_path(uri)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)
    fs.invalidate_cache(path)


def _exists(uri: str) -> bool:
    fs, path = _fs_path(uri)
    fs.invalidate_cache(path)
    return fs.exists(path)


def _raw(uri: str) -> bytes:
    fs, path = _fs_path(uri)
    return fs.cat_file(path)


def _manifest_bytes(store: RunStore) -> bytes:
    return _raw(f"{store.uri}/manifest.json")


@pytest.fixture
def store(store_root: str) -> RunStore:
    s = RunStore(store_root, "r1")
    s.create({"fingerprint": "fp-1", "model": "tiny"})
    return s


def test_create_and_manifest_round_trip(store_root: str) -> None:
    s = RunStore(store_root + "/", "r1")
    assert s.uri == f"{store_root}/r1"
    assert not s.exists()
    with pytest.raises(TierpruneError, match="no tierprune run"):
        s.manifest()
    s.create({"fingerprint": "fp-1", "model": "tiny", "tiers": [1, 2]})
    assert s.exists()
    m = s.manifest()
    assert m["fingerprint"] == "fp-1" and m["model"] == "tiny" and m["tiers"] == [1, 2]
    assert m["format"] == "tierprune-run/1" and m["steps"] == {}
    datetime.fromisoformat(m["created"])
    # The same run again (a resume) changes nothing, recorded steps included.
    before = _manifest_bytes(s)
    RunStore(store_root, "r1").create({"fingerprint": "fp-1", "model": "tiny", "tiers": [1, 2]})
    assert _manifest_bytes(s) == before
    with pytest.raises(TierpruneError, match="set by the run store"):
        RunStore(store_root, "r2").create({"steps": {}})


def test_foreign_folder_refused(store_root: str) -> None:
    s = RunStore(store_root, "r1")
    _put(f"{s.uri}/notes.txt", b"mine")
    with pytest.raises(TierpruneError, match="not a tierprune run folder"):
        s.create({"fingerprint": "fp-1"})
    assert not s.exists()
    assert _raw(f"{s.uri}/notes.txt") == b"mine"


def test_a_local_run_folder_that_cannot_be_made_is_refused_before_writing(tmp_path, monkeypatch) -> None:
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(TierpruneError, match=r"cannot be created: .*a-file is a file"):
        RunStore(str(tmp_path / "a-file" / "store"), "r1").check_can_create()
    assert (tmp_path / "a-file").read_text() == "mine"
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Root may write anywhere, so the test plays a user without write permission on `locked`.
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    with pytest.raises(TierpruneError, match=r"cannot be created: .*locked is not writable"):
        RunStore(str(locked / "store"), "r1").check_can_create()
    RunStore(str(tmp_path / "new" / "store"), "r1").check_can_create()  # a folder that can be made: fine
    assert not (tmp_path / "new").exists()  # and nothing was written


def test_listing_a_store_that_is_a_file_or_missing_is_one_line(tmp_path) -> None:
    from tierprune.storage.runstore import run_names

    (tmp_path / "a-file").write_text("")
    with pytest.raises(TierpruneError, match="is a file, not a folder of runs"):
        run_names(str(tmp_path / "a-file"))
    with pytest.raises(TierpruneError, match="does not exist"):
        run_names(str(tmp_path / "nothere"))
    assert run_names(str(tmp_path)) == []


def test_a_missing_store_is_said_so_on_every_backend(store_root: str) -> None:
    from tierprune.storage.runstore import run_names

    with pytest.raises(TierpruneError, match=r"^store .*/nothere does not exist$"):
        run_names(f"{store_root}/nothere")


def test_same_name_different_fingerprint_refused(store: RunStore, store_root: str) -> None:
    before = _manifest_bytes(store)
    with pytest.raises(TierpruneError, match="different run under the same name"):
        RunStore(store_root, "r1").create({"fingerprint": "fp-2", "model": "tiny"})
    assert _manifest_bytes(store) == before


def test_garbled_manifest_refused_and_kept(store: RunStore) -> None:
    _put(f"{store.uri}/manifest.json", b"{not json")
    with pytest.raises(TierpruneError, match="garbled"):
        store.manifest()
    with pytest.raises(TierpruneError, match="garbled"):
        store.create({"fingerprint": "fp-1"})
    assert _manifest_bytes(store) == b"{not json"


@pytest.mark.parametrize("bad", ["", "a/b", "..", ".", "r 1", "ü"])
def test_invalid_run_names(store_root: str, bad: str) -> None:
    with pytest.raises(TierpruneError, match="invalid run name"):
        RunStore(store_root, bad)


def test_commit_then_load_step(store: RunStore) -> None:
    uri = store.step_uri(1, "score", "0123456789abcdef-ignored-tail")
    assert uri == f"{store.uri}/iter-001/score-0123456789abcdef"
    assert store.load_step(uri) is None
    hashes = store.commit_step(uri, FILES, meta={"tokens": 4096})
    assert hashes == {name: sha256_bytes(data) for name, data in FILES.items()}
    assert store.load_step(uri) == hashes
    assert store.read(uri, "plan.json") == FILES["plan.json"]
    marker = json.loads(_raw(f"{uri}/{COMMIT}"))
    assert marker["files"] == hashes and marker["meta"] == {"tokens": 4096}
    datetime.fromisoformat(marker["committed"])
    assert store.committed_steps() == {"iter-001/score-0123456789abcdef": {"files": hashes, "meta": {"tokens": 4096}}}
    # No temp files are left behind.
    fs, path = _fs_path(uri)
    fs.invalidate_cache(path)
    assert sorted(posixpath.basename(p) for p in fs.ls(path, detail=False)) == sorted([*FILES, COMMIT])
    # The same files again are a no-op; other files under the same key are refused while the step is intact.
    assert store.commit_step(uri, FILES) == hashes
    with pytest.raises(TierpruneError, match="already committed"):
        store.commit_step(uri, {"plan.json": b"other"})
    assert store.read(uri, "plan.json") == FILES["plan.json"]


def test_uncommitted_step_is_not_loaded(store: RunStore) -> None:
    uri = store.step_uri(0, "score", "k")
    for name, data in FILES.items():  # a crash after the files, before COMMIT.json
        _put(f"{uri}/{name}", data)
    assert store.load_step(uri) is None
    assert store.iterations() == []
    with pytest.raises(TierpruneError, match="not committed"):
        store.read(uri, "plan.json")
    _put(f"{uri}/{COMMIT}", b"{garbled")  # a half-written marker counts as no marker
    assert store.load_step(uri) is None
    # Recomputing commits over the leftovers.
    assert store.load_step(uri) is None
    store.commit_step(uri, FILES)
    assert store.load_step(uri) is not None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupted_file_is_detected(store: RunStore, damage: str) -> None:
    uri = store.step_uri(2, "prune", "abc")
    hashes = store.commit_step(uri, FILES)
    manifest = _manifest_bytes(store)
    data = FILES["scores.parquet"]
    if damage == "truncate":
        _put(f"{uri}/scores.parquet", data[: len(data) // 2])
    elif damage == "flip":
        _put(f"{uri}/scores.parquet", bytes([data[0] ^ 0x01]) + data[1:])
    else:
        fs, path = _fs_path(f"{uri}/scores.parquet")
        fs.rm(path)
    # load_step only compares sizes (cache checks must be cheap): a flipped byte passes it...
    assert (store.load_step(uri) is None) == (damage != "flip")
    # ...but never the first read or verification in another process (this object wrote the bytes: it trusts them).
    with pytest.raises(CorruptArtifactError, match="scores.parquet"):
        _fresh(store).read(uri, "scores.parquet")
    assert isinstance(CorruptArtifactError("x"), TierpruneError)
    assert _fresh(store).read(uri, "plan.json") == FILES["plan.json"]  # the intact file is still readable
    assert not _fresh(store).verify_step(uri)  # a damaged step loses its COMMIT.json: it is recomputed, never used
    assert store.load_step(uri) is None
    assert _exists(f"{uri}/{COMMIT}") == (damage != "flip")  # sizes already said "not committed" otherwise
    assert _manifest_bytes(store) == manifest  # nothing was recorded
    # The caller recomputes and commits again over the damaged step.
    assert store.commit_step(uri, FILES) == hashes
    assert store.load_step(uri) == hashes


def _fail_on(monkeypatch: pytest.MonkeyPatch, store: RunStore, method: str, when) -> None:
    """Make the store's filesystem raise from method on the calls for which when(path, mode) is true."""
    fs, _ = _fs_path(store.uri)
    original = getattr(fs, method)

    def failing(path, *args, **kwargs):
        mode = (args[0] if args else kwargs.get("mode", "rb")) if method == "open" else ""
        if when(str(path), mode):
            raise OSError(f"injected failure in {method}({path})")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(fs, method, failing)


def _fresh(store: RunStore) -> RunStore:
    """The same run as another process sees it: nothing hashed yet."""
    root, run = store.uri.rsplit("/", 1)
    return RunStore(root, run)


def _nth_data_temp(n: int, modes: tuple[str, ...]):
    """True on the n-th call, in one of modes, for a temp file of a step's data (not COMMIT.json)."""
    seen: list[str] = []

    def when(path: str, mode: str) -> bool:
        if ".tmp-" in path and COMMIT not in path and "/iter-" in path and mode in modes:
            seen.append(path)
            return len(seen) == n
        return False

    return when


@pytest.mark.parametrize("failure", ["write-2nd-file", "rename-2nd-file", "verify-2nd-file", "write-marker"])
def test_commit_step_is_atomic(store: RunStore, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    done = store.step_uri(0, "score", "done")
    store.commit_step(done, {"a.bin": b"a"})
    manifest = _manifest_bytes(store)
    uri = store.step_uri(1, "score", "k")
    if failure == "write-2nd-file":
        _fail_on(monkeypatch, store, "open", _nth_data_temp(2, ("wb",)))
    elif failure == "rename-2nd-file":
        _fail_on(monkeypatch, store, "mv", _nth_data_temp(2, ("",)))
    elif failure == "write-marker":
        _fail_on(monkeypatch, store, "open", lambda path, mode: COMMIT in path and mode == "wb")
    else:
        # The store loses bytes of the 2nd file after the write (a broken upload, a full disk): the size
        # check must catch it before anything is renamed into place or committed.
        fs, _ = _fs_path(store.uri)
        size_ = fs.size
        second = _nth_data_temp(2, ("",))

        def lossy_size(path, *args, **kwargs):
            if second(str(path), ""):
                fs.pipe_file(path, fs.cat_file(path)[:-1])
                fs.invalidate_cache(path)
            return size_(path, *args, **kwargs)

        monkeypatch.setattr(fs, "size", lossy_size)
    with pytest.raises((OSError, TierpruneError)) as e:
        store.commit_step(uri, FILES)
    if failure == "verify-2nd-file":
        assert "bytes arrived" in str(e.value)
    monkeypatch.undo()
    assert not _exists(f"{uri}/{COMMIT}")
    assert store.load_step(uri) is None
    assert _manifest_bytes(store) == manifest
    assert store.iterations() == [0]
    assert store.load_step(done) == {"a.bin": sha256_bytes(b"a")}
    # Temp files are cleaned up even on failure.
    fs, path = _fs_path(uri)
    fs.invalidate_cache(path)
    leftovers = fs.ls(path, detail=False) if fs.exists(path) else []
    assert not [p for p in leftovers if ".tmp-" in p]
    # Retrying after the failure commits normally.
    store.commit_step(uri, FILES)
    assert store.load_step(uri) is not None
    assert store.iterations() == [0, 1]


def test_crash_between_marker_and_manifest_is_healed(store: RunStore, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = store.step_uri(3, "score", "k")
    _fail_on(monkeypatch, store, "open", lambda path, mode: "manifest.json" in path and mode == "wb")
    with pytest.raises(OSError):
        store.commit_step(uri, FILES)
    monkeypatch.undo()
    assert store.committed_steps() == {}  # the marker made it, the manifest update did not
    hashes = store.load_step(uri)
    assert hashes is not None
    assert store.committed_steps()["iter-003/score-k"]["files"] == hashes


def test_lock_is_exclusive(store: RunStore, store_root: str) -> None:
    other = RunStore(store_root, "r1")
    with store.lock(owner="alice"):
        for s in (store, other):
            with pytest.raises(TierpruneError) as e:
                with s.lock(owner="bob"):
                    pass
            msg = str(e.value)
            assert "\n" not in msg
            assert f"run {store.uri} is locked by alice since " in msg
            assert f"`tierprune runs unlock {store.uri}`" in msg and "pid " in msg
    # Released on exit: the next writer gets it.
    with other.lock(owner="bob"):
        pass
    assert store.break_lock() is False


def test_break_lock(store: RunStore, store_root: str) -> None:
    first = store.lock(owner="crashed")
    first.acquire()
    with pytest.raises(TierpruneError, match="locked by crashed"):
        store.lock().acquire()
    assert store.break_lock() is True
    with RunStore(store_root, "r1").lock(owner="new"):
        first.release()  # the old holder must not remove the new holder's lock
        with pytest.raises(TierpruneError, match="locked by new"):
            store.lock().acquire()
    assert store.break_lock() is False


def test_lock_before_create(store_root: str) -> None:
    s = RunStore(store_root, "fresh")
    with s.lock():
        s.create({"fingerprint": "f"})  # a LOCK alone does not make the folder foreign
        assert s.exists()


def test_iterations(store: RunStore) -> None:
    assert store.iterations() == []
    for it in (10, 0, 2):
        store.commit_step(store.step_uri(it, "score", "k"), {"x": b"%d" % it})
    store.commit_step(store.step_uri(2, "prune", "k"), {"x": b"p"})
    _put(f"{store.step_uri(5, 'score', 'k')}/x", b"no marker")
    assert store.iterations() == [0, 2, 10]
    assert sorted(store.committed_steps()) == ["iter-000/score-k", "iter-002/prune-k", "iter-002/score-k",
                                               "iter-010/score-k"]


def test_step_uri_checks(store: RunStore, store_root: str) -> None:
    with pytest.raises(TierpruneError):
        store.step_uri(-1, "score", "k")
    with pytest.raises(TierpruneError):
        store.step_uri(0, "a/b", "k")
    with pytest.raises(TierpruneError):
        store.step_uri(0, "score", "")
    foreign = RunStore(store_root, "r2").step_uri(0, "score", "k")
    with pytest.raises(TierpruneError, match="not a step of run"):
        store.load_step(foreign)
    with pytest.raises(TierpruneError, match="reserved"):
        store.commit_step(store.step_uri(0, "score", "k"), {COMMIT: b"x"})


def test_manifest_untouched_by_failing_operations(store: RunStore, store_root: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    uri = store.step_uri(0, "score", "k")
    store.commit_step(uri, FILES, meta={"n": 1})
    before = _manifest_bytes(store)
    failing = [
        lambda: RunStore(store_root, "r1").create({"fingerprint": "other"}),
        lambda: store.commit_step(uri, {"plan.json": b"different"}),
        lambda: store.commit_step(store.step_uri(1, "score", "k"), FILES, meta={"bad": object()}),
        lambda: store.commit_step(store.step_uri(1, "score", "k"), {"bad name": b"x"}),
        lambda: store.read(uri, "missing.bin"),
        lambda: store.read(store.step_uri(9, "score", "k"), "plan.json"),
    ]
    with store.lock(owner="holder"):
        failing.append(lambda: store.lock().acquire())
        for op in failing:
            with pytest.raises(TierpruneError):
                op()
    _put(f"{uri}/plan.json", b"damaged")
    assert store.load_step(uri) is None
    with pytest.raises(CorruptArtifactError):
        _fresh(store).read(uri, "plan.json")
    assert _manifest_bytes(store) == before
    assert not _exists(f"{store.step_uri(1, 'score', 'k')}/{COMMIT}")


class _RivalAfterClose:
    """A file for writing whose close is followed by another writer's put of the same object."""

    def __init__(self, f, rival) -> None:
        self.f, self.rival = f, rival

    def write(self, data: bytes) -> int:
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()
        self.rival()


@pytest.mark.parametrize("xb", ["supported", "unsupported"])
def test_lock_read_back_loses_to_a_racing_writer(store: RunStore, monkeypatch: pytest.MonkeyPatch, xb: str) -> None:
    """On stores without a trustworthy exclusive create, the writer whose token is not in LOCK does not hold it."""
    monkeypatch.setattr(store, "_atomic_create", False)  # take the object-store path on every backend
    fs, _ = _fs_path(store.uri)
    open_, pipe_file = fs.open, fs.pipe_file
    rival = json.dumps({"owner": "rival", "pid": 1, "host": "h", "since": "t", "token": "theirs"}).encode()

    def racing_open(path, mode="rb", *args, **kwargs):
        if str(path).endswith("/LOCK") and mode == "xb":
            if xb == "unsupported":
                raise ValueError("mode xb not supported")
            # A store that ignores If-None-Match: our put succeeds, then the rival's lands on top of it.
            return _RivalAfterClose(open_(path, "wb", *args, **kwargs), lambda: pipe_file(path, rival))
        return open_(path, mode, *args, **kwargs)

    def racing_pipe(path, data, *args, **kwargs):
        pipe_file(path, data, *args, **kwargs)
        if str(path).endswith("/LOCK") and data != rival:
            pipe_file(path, rival)

    monkeypatch.setattr(fs, "open", racing_open)
    monkeypatch.setattr(fs, "pipe_file", racing_pipe)
    with pytest.raises(TierpruneError, match="locked by rival"):
        store.lock(owner="me").acquire()
    monkeypatch.undo()
    # Without a rival the read-back finds our own token.
    assert store.break_lock() is True
    monkeypatch.setattr(store, "_atomic_create", False)
    with store.lock(owner="me"):
        assert json.loads(_raw(f"{store.uri}/LOCK"))["owner"] == "me"
    assert not _exists(f"{store.uri}/LOCK")


def test_file_url_root(tmp_path) -> None:
    s = RunStore(f"file://{tmp_path}", "r1")
    s.create({"fingerprint": "f"})
    uri = s.step_uri(0, "score", "k")
    assert uri.startswith("file://")
    s.commit_step(uri, {"x": b"1"})
    assert (tmp_path / "r1" / "iter-000" / "score-k" / "x").read_bytes() == b"1"
    assert RunStore(str(tmp_path), "r1").iterations() == [0]


def test_unreferenced_blobs_go_and_referenced_ones_stay(store: RunStore) -> None:
    """runs prune's garbage collection: a blob goes once no COMMIT.json lists it, with the temp files of a crashed
    upload; a blob two steps share stays while one of them does; a dropped step's meta is still answered."""
    shared, own = store.put_blob(b"shared tensor" * 50), store.put_blob(b"own tensor" * 70)
    kept = store.step_uri(1, "checkpoint", "k1")
    dropped = store.step_uri(2, "checkpoint", "k2")
    store.commit_step(kept, FILES, meta={"tokens": 10}, blobs=dict([shared]))
    store.commit_step(dropped, FILES, meta={"tokens": 20}, blobs=dict([shared, own]))
    _put(f"{store.uri}/blobs/ab/abandoned.safetensors.tmp-1234", b"half an upload")
    assert store.referenced_blobs() == dict([shared, own])
    assert store.referenced_blobs(excluding={"iter-002/checkpoint-k2"}) == dict([shared])
    assert store.remove_unreferenced_blobs() == (1, len(b"half an upload"))
    store.mark_pruned(["iter-002/checkpoint-k2"], kept=[1])
    store.drop_step(dropped)
    assert store.step_meta(dropped) == {"tokens": 20} and store.pruned()["iterations"] == [2]
    assert store.remove_unreferenced_blobs() == (1, own[1])
    assert store.load_step(kept) is not None and store.read_blob(shared[0]) == b"shared tensor" * 50
    assert not _exists(f"{store.uri}/blobs/{own[0][:2]}/{own[0]}.safetensors")


def test_blob_collection_refuses_a_run_with_an_unreadable_commit(store: RunStore) -> None:
    digest, _ = store.put_blob(b"tensor" * 10)
    uri = store.step_uri(1, "checkpoint", "k1")
    store.commit_step(uri, FILES, blobs={digest: 60})
    _put(f"{uri}/{COMMIT}", b"{not json")
    with pytest.raises(TierpruneError, match="unreadable COMMIT.json; check the run with `tierprune runs verify`"):
        store.remove_unreferenced_blobs()
    assert _exists(f"{store.uri}/blobs/{digest[:2]}/{digest}.safetensors")
