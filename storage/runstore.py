"""One pruning run as one folder on any fsspec store, written so that a crash costs at most the running step.

Layout of a run folder (``{root}/{run}``)::

    RUN.json                          what the run is (caller's keys, "fingerprint"), written once by create()
    manifest.json                     RUN.json's keys plus the steps it recorded; rebuilt from RUN.json and the
                                      steps' COMMIT.json when missing (`tierprune runs repair` when garbled)
    LOCK                              present while a writer holds the run (see RunLock)
    PRUNED.json                       the iterations whose checkpoints were deleted (`tierprune runs prune`,
                                      `run --keep-checkpoints`; absent until then); a pruned run goes on after its
                                      last finished iteration, never walking the pruned ones again
    blobs/ab/ab12…ef.safetensors      content-addressed tensors (one per file, named by its sha256): a tensor
                                      that did not change between checkpoints is stored once
    iter-001/scores-0123456789abcdef/ one step: its files, then COMMIT.json, written last
        scores.parquet
        COMMIT.json                   {"files": {name: sha256}, "sizes": {name: bytes}, "blobs": {sha256: bytes},
                                       "meta": ..., "committed": time}

A step exists only once its COMMIT.json does, and it counts as committed while every file and blob it lists is
there with its recorded size (load_step: no bytes read, so cache checks stay cheap on multi-GB checkpoints).
Bytes are hashed when written and verified the first time a process uses them (verify_step, read, read_blob): a
damaged step loses its COMMIT.json and is recomputed, never used.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from tierprune.errors import TierpruneError
from tierprune.faults import crash_point
from tierprune.lifecycle import cancel_on_termination, cleanup_on_termination, on_termination

from .formats import decode, encode
from .tables import _atomic_open

__all__ = ["RunStore", "RunLock", "CorruptArtifactError", "StepStatus", "sha256_bytes", "blob_rel", "run_names",
           "PRUNED"]

log = logging.getLogger(__name__)

FORMAT = "tierprune-run/1"
MANIFEST = "manifest.json"
IDENTITY = "RUN.json"
COMMIT = "COMMIT.json"
LOCK = "LOCK"
PRUNED = "PRUNED.json"
# Run, step and file names become path components on every backend: no separators, no "." or "..".
_NAME = re.compile(r"[A-Za-z0-9._-]+")
# A step folder relative to the run folder, as step_uri builds it.
_STEP_REL = re.compile(r"iter-(\d{3,})/([A-Za-z0-9._-]+)")
# What a crash during create() or a lock taken before create() may leave in a run folder with no manifest yet.
_CREATE_LEFTOVERS = re.compile(rf"(({re.escape(MANIFEST)}|{re.escape(IDENTITY)})\.tmp-[0-9a-f]+|{LOCK})")
_RESERVED_KEYS = ("format", "created", "steps")
_HASH_CHUNK = 8 * 2**20
_RECENT_OBJECTS = 6


class CorruptArtifactError(TierpruneError):
    """A committed file no longer has the sha256 its step recorded (truncated, overwritten or missing)."""


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of data, the checksum every committed file is recorded and checked with."""
    return hashlib.sha256(data).hexdigest()


def blob_rel(digest: str) -> str:
    """Where a content-addressed blob lives, relative to the run folder."""
    return f"blobs/{digest[:2]}/{digest}.safetensors"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise TierpruneError(f"invalid {kind} name {name!r}: use letters, digits, '.', '_' and '-' only")
    return name


def _decoded_or_none(data: bytes) -> Any:
    """The JSON value of data, or None if it is not JSON (a garbled file)."""
    try:
        return json.loads(data)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both
        return None


def _json_bytes(obj: Any, what: str) -> bytes:
    # Serialised before anything is written, so that a value json cannot store fails with nothing changed.
    try:
        return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise TierpruneError(f"{what} cannot be stored as JSON: {e}") from e


@dataclass(frozen=True)
class StepStatus:
    """One step's health: status is "committed", "damaged" (a file missing or differing) or "missing" (no COMMIT.json)."""

    step: str
    status: str
    detail: str


class RunStore:
    """The folder of one run (``{root}/{run}``) on any fsspec store: manifest, committed steps and the lock."""

    def __init__(self, root: str, run: str):
        if not isinstance(root, str) or not root:
            raise TierpruneError("a run store needs a root folder or URI")
        _check_name("run", run)
        base = root.rstrip("/")
        if base.endswith(":"):
            # A bare "memory://" or "file:///" root: keep the protocol's slashes rather than strip them away.
            base = root[: len(base) + 2]
        self.run = run
        self.uri = f"{base}/{run}"
        self._fs, self._path = url_to_fs(self.uri)
        # Only these two make "xb" truly exclusive and reads immediately consistent for every writer
        # (O_EXCL on one host, one process's dict); other stores get the lock's read-back check.
        self._atomic_create = isinstance(self._fs, (LocalFileSystem, MemoryFileSystem))
        # (path, sha256) pairs this object wrote or has hashed: each file is hashed at most once per process.
        self._verified: set[tuple[str, str]] = set()
        # Seconds and bytes of this object's I/O and hashing, for benchmarks (steps record the deltas).
        self.io: dict[str, float] = {"write_seconds": 0.0, "hash_seconds": 0.0, "read_seconds": 0.0,
                                     "copy_seconds": 0.0, "bytes_written": 0, "bytes_read": 0}
        self._io_lock = threading.Lock()
        # The last few objects this object committed (DataFrames, JSON), by (path, sha256): the next step of
        # the same process reads them back without parsing the file again. Callers never modify them.
        self._recent: OrderedDict[tuple[str, str], Any] = OrderedDict()

    @contextmanager
    def timed(self, key: str, nbytes: int = 0, bytes_key: str | None = None):
        """Add the block's seconds (and nbytes) to this store's io counters (summed over threads)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            with self._io_lock:
                self.io[key] += time.perf_counter() - started
                if bytes_key:
                    self.io[bytes_key] += nbytes

    def _hash(self, data: bytes) -> str:
        with self.timed("hash_seconds"):
            return sha256_bytes(data)

    def __repr__(self) -> str:
        return f"RunStore({self.uri!r})"

    # ---- paths -------------------------------------------------------------------------------------------

    def _p(self, rel: str) -> str:
        return f"{self._path}/{rel}"

    def _u(self, rel: str) -> str:
        return f"{self.uri}/{rel}"

    def _step_rel(self, step_uri: str) -> str:
        prefix = f"{self.uri}/"
        rel = step_uri[len(prefix):].rstrip("/") if step_uri.startswith(prefix) else ""
        if not _STEP_REL.fullmatch(rel):
            raise TierpruneError(f"{step_uri!r} is not a step of run {self.uri} (build it with step_uri())")
        return rel

    def _cat(self, rel: str) -> bytes:
        """The bytes at rel, read from the store itself (fsspec's listing caches can be stale across writers)."""
        path = self._p(rel)
        self._fs.invalidate_cache(path)
        return self._fs.cat_file(path)

    def _write_atomic(self, rel: str, data: bytes) -> None:
        # Temp + rename (copy + delete on object stores): readers see the old file or the whole new one.
        with _atomic_open(self._u(rel)) as f:
            f.write(data)
            if isinstance(self._fs, LocalFileSystem):
                # Rename without fsync can leave an empty file under the real name after a power cut.
                f.flush()
                os.fsync(f.fileno())

    # ---- manifest ----------------------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the run folder holds a manifest or a RUN.json (garbled or not: create() will not overwrite it)."""
        for name in (MANIFEST, IDENTITY):
            path = self._p(name)
            self._fs.invalidate_cache(path)
            if self._fs.isfile(path):
                return True
        return False

    def manifest(self) -> dict:
        """The run's manifest.json as a dict."""
        try:
            raw = self._cat(MANIFEST)
        except FileNotFoundError:
            rebuilt = self._rebuilt_manifest()  # from RUN.json and the COMMIT.json files; nothing is written
            if rebuilt is None:
                raise TierpruneError(f"no tierprune run at {self.uri} (no {MANIFEST})") from None
            return rebuilt
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TierpruneError(f"{self._u(MANIFEST)} is garbled ({e}); {self._repair_hint()}") from e
        if not isinstance(data, dict) or not isinstance(data.get("steps"), dict):
            raise TierpruneError(f"{self._u(MANIFEST)} is garbled (not a tierprune run manifest); {self._repair_hint()}")
        if data.get("format") != FORMAT:
            fmt = data.get("format")
            raise TierpruneError(f"{self._u(MANIFEST)} has format {fmt!r}; this tierprune reads {FORMAT}")
        return data

    def create(self, manifest: dict) -> None:
        """Start the run with manifest (plus format, created time and no steps), or accept the same run again."""
        # Same "fingerprint" on an existing run: a resume, so nothing is rewritten and recorded steps stay.
        # A different fingerprint is a different run under the same name and is refused.
        if not isinstance(manifest, dict):
            raise TierpruneError(f"a run manifest must be a dict, got {type(manifest).__name__}")
        reserved = [k for k in _RESERVED_KEYS if k in manifest]
        if reserved:
            raise TierpruneError(f"run manifest keys {reserved} are set by the run store, not by the caller")
        if self.exists():
            existing = self.manifest()
            if existing.get("fingerprint") != manifest.get("fingerprint"):
                raise TierpruneError(
                    f"run {self.uri} already exists with fingerprint {existing.get('fingerprint')!r}, not "
                    f"{manifest.get('fingerprint')!r}: a different run under the same name; pick another run name"
                )
            self._complete_identity(existing)
            return
        self._refuse_foreign_folder()
        identity = {**manifest, "format": FORMAT, "created": _now()}
        data = _json_bytes({**identity, "steps": {}}, "the run manifest")
        # RUN.json first: from then on the run exists, and a lost or damaged manifest can be rebuilt from it.
        self._write_atomic(IDENTITY, _json_bytes(identity, "the run identity"))
        self._write_atomic(MANIFEST, data)

    def check_can_create(self) -> None:
        """Refuse, without writing, a run folder that create() would refuse (a file, or someone else's files)
        or could not make (on a local disk: under a file, or in a folder this user may not write)."""
        if not self.exists():
            self._refuse_foreign_folder()
            if isinstance(self._fs, LocalFileSystem):
                self._refuse_unmakeable_local_folder()

    def _refuse_unmakeable_local_folder(self) -> None:
        folder = os.path.abspath(self._path)
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise TierpruneError(f"{self.uri} cannot be created: {folder} is a file")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise TierpruneError(f"{self.uri} cannot be created: {folder} is not writable")

    # ---- identity, rebuild and repair --------------------------------------------------------------------

    def _json_file(self, rel: str) -> Any:
        """The decoded JSON file at rel, or None when there is none; a garbled one is refused."""
        try:
            raw = self._cat(rel)
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TierpruneError(f"{self._u(rel)} is garbled: {e}") from e

    def _identity(self) -> dict | None:
        """RUN.json (what create() was given, plus format and created time), or None for a run without one."""
        data = self._json_file(IDENTITY)
        if data is None:
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TierpruneError(f"{self._u(IDENTITY)} is not a {FORMAT} run identity")
        return data

    def _marker_rels(self) -> list[str]:
        """Step folders (relative to the run) that hold a COMMIT.json, readable or not."""
        self._fs.invalidate_cache(self._path)
        rels = set()
        for path in self._fs.glob(f"{self._path}/iter-*/*/{COMMIT}"):
            rel = posixpath.relpath(posixpath.dirname(path), self._path)
            if _STEP_REL.fullmatch(rel):
                rels.add(rel)
        return sorted(rels)

    def _rebuilt_manifest(self) -> dict | None:
        """The manifest as RUN.json and the steps' COMMIT.json files describe it; None without a RUN.json."""
        # COMMIT.json holds exactly what _record_step puts into the manifest (files and meta), so nothing is lost.
        identity = self._identity()
        if identity is None:
            return None
        steps = {}
        for rel in self._marker_rels():
            marker = self._marker(rel)
            if marker is not None:
                steps[rel] = {"files": marker["files"], "meta": marker.get("meta")}
        return {**identity, "steps": steps}

    def _repair_hint(self) -> str:
        if self._identity_exists():
            return f"rebuild it from the committed steps with `tierprune runs repair {self.uri}`"
        return f"it cannot be rebuilt: the run has no {IDENTITY} (made by an older tierprune)"

    def _identity_exists(self) -> bool:
        path = self._p(IDENTITY)
        self._fs.invalidate_cache(path)
        return self._fs.isfile(path)

    def _complete_identity(self, manifest: dict) -> None:
        # A run reopened by its writer: write back a manifest that was missing (rebuilt in memory by manifest()),
        # and give a run made before RUN.json existed its identity, so that its manifest can be rebuilt later.
        if not self._identity_exists():
            identity = {k: v for k, v in manifest.items() if k != "steps"}
            self._write_atomic(IDENTITY, _json_bytes(identity, "the run identity"))
        path = self._p(MANIFEST)
        self._fs.invalidate_cache(path)
        if not self._fs.isfile(path):
            log.warning("run %s: %s was missing; rebuilt it from %s and the committed steps", self.uri, MANIFEST,
                        IDENTITY)
            self._write_atomic(MANIFEST, _json_bytes(manifest, "the run manifest"))

    def repair(self) -> dict:
        """Rebuild manifest.json from RUN.json and the steps' COMMIT.json; a previous one is kept as manifest.json.bak.

        Returns {"steps": number of steps recorded, "backup": URI of the old manifest or None, "unchanged": whether
        the manifest already said exactly that (then nothing is written, and an earlier backup stays).}
        """
        identity = self._identity()
        if identity is None:
            if not self._fs.isfile(self._p(MANIFEST)):
                raise TierpruneError(f"no tierprune run at {self.uri} (no {MANIFEST}, no {IDENTITY})")
            raise TierpruneError(f"cannot repair {self.uri}: it has no {IDENTITY} (made by an older tierprune), "
                                 "so what the run is cannot be restored")
        rebuilt = self._rebuilt_manifest()
        assert rebuilt is not None
        backup = None
        try:
            old = self._cat(MANIFEST)
        except FileNotFoundError:
            old = None
        if old is not None and _decoded_or_none(old) == rebuilt:
            return {"steps": len(rebuilt["steps"]), "backup": None, "unchanged": True}
        if old is not None:
            backup = self._u(f"{MANIFEST}.bak")
            self._write_atomic(f"{MANIFEST}.bak", old)
        self._write_atomic(MANIFEST, _json_bytes(rebuilt, "the run manifest"))
        return {"steps": len(rebuilt["steps"]), "backup": backup, "unchanged": False}

    def _refuse_foreign_folder(self) -> None:
        # Never write a manifest into a folder that holds someone else's files: a later cleanup of the run
        # would take them along, and a mistyped root must not turn a data folder into a "run".
        self._fs.invalidate_cache(self._path)
        if self._fs.isfile(self._path):
            raise TierpruneError(f"{self.uri} is not a tierprune run folder: it is a file")
        try:
            entries = self._fs.ls(self._path, detail=False)
        except (FileNotFoundError, NotADirectoryError):  # not there yet, or under a file (check_can_create says)
            return
        foreign = [e for e in entries if not _CREATE_LEFTOVERS.fullmatch(posixpath.basename(e.rstrip("/")))]
        if foreign:
            raise TierpruneError(
                f"{self.uri} is not a tierprune run folder (no {MANIFEST} but other files, "
                f"e.g. {posixpath.basename(foreign[0].rstrip('/'))}); pick an empty folder or another run name"
            )

    def _record_step(self, rel: str, files: dict[str, str], meta: dict | None) -> None:
        # Read-modify-write of the whole manifest; concurrent writers are kept out by RunLock, not here.
        manifest = self.manifest()
        manifest["steps"][rel] = {"files": files, "meta": meta}
        self._write_atomic(MANIFEST, _json_bytes(manifest, "the run manifest"))

    def committed_steps(self) -> dict[str, dict]:
        """The steps the manifest recorded: {"iter-001/score-…": {"files": {name: sha256}, "meta": …}}."""
        # A summary for listing runs; whether a step is still intact is load_step()'s answer, not this one's.
        return self.manifest()["steps"]

    # ---- steps -------------------------------------------------------------------------------------------

    def step_uri(self, iteration: int, step: str, key: str) -> str:
        """The folder of one step of one iteration; key (a hash of the step's inputs) keeps differing inputs apart."""
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise TierpruneError(f"iteration must be an int >= 0, got {iteration!r}")
        _check_name("step", step)
        if not isinstance(key, str) or not key:
            raise TierpruneError(f"step key must be a non-empty string, got {key!r}")
        _check_name("step key", key[:16])
        return f"{self.uri}/iter-{iteration:03d}/{step}-{key[:16]}"

    def _marker(self, rel: str) -> dict | None:
        """The step's COMMIT.json, or None when there is none or it is unreadable (both mean: not committed)."""
        try:
            marker = json.loads(self._cat(f"{rel}/{COMMIT}"))
        except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
            return None
        if not isinstance(marker.get("sizes"), dict) or set(marker["sizes"]) != set(marker["files"]):
            return None  # a marker of an older format: its step is recomputed
        return marker

    def _size(self, path: str) -> int | None:
        self._fs.invalidate_cache(path)
        try:
            return self._fs.size(path)
        except (FileNotFoundError, IsADirectoryError):
            return None

    def _blob_sizes(self, blobs: dict[str, int]) -> dict[str, int | None]:
        if len(blobs) <= 8:
            return {sha: self._size(self._p(blob_rel(sha))) for sha in blobs}
        # One listing instead of a request per blob (object stores).
        root = self._p("blobs")
        self._fs.invalidate_cache(root)
        try:
            listing = self._fs.find(root, detail=True)
        except FileNotFoundError:
            listing = {}
        by_name = {posixpath.basename(path): info.get("size") for path, info in listing.items()}
        return {sha: by_name.get(posixpath.basename(blob_rel(sha))) for sha in blobs}

    def load_step(self, step_uri: str) -> dict[str, str] | None:
        """{name: sha256} of a committed step whose files and blobs are all there with their recorded sizes, else None.

        Cheap on purpose (COMMIT.json and sizes, no bytes): cache checks call it for every step. Whether the
        bytes still have their sha256 is verify_step()'s question, asked once per process before a result is used.
        """
        rel = self._step_rel(step_uri)
        marker = self._marker(rel)
        if marker is None:
            return None
        files: dict[str, str] = marker["files"]
        for name in files:
            if self._size(self._p(f"{rel}/{name}")) != marker["sizes"][name]:
                log.warning("step %s: %s is missing or has the wrong size; the step will be recomputed", step_uri, name)
                return None
        blobs: dict[str, int] = marker.get("blobs") or {}
        for sha, size in self._blob_sizes(blobs).items():
            if size != blobs[sha]:
                log.warning("step %s: blob %s is missing or has the wrong size; the step will be recomputed",
                            step_uri, sha[:12])
                return None
        self._heal_manifest(rel, files, marker.get("meta"))
        return dict(files)

    def _heal_manifest(self, rel: str, files: dict[str, str], meta: dict | None) -> None:
        # An intact step missing from the manifest means a crash between COMMIT.json and the manifest update;
        # the caller will skip this step, so this is the only place left to record it.
        try:
            if rel in self.committed_steps():
                return
        except TierpruneError as e:
            # A missing or garbled manifest is the run's problem, not this step's: the step is still valid.
            log.warning("run %s: step %s not recorded: %s", self.uri, rel, e)
            return
        self._record_step(rel, files, meta)

    def step_meta(self, step_uri: str) -> dict:
        """The meta a committed step was recorded with (e.g. its compute seconds), also for a step deleted by `runs
        prune` or --keep-checkpoints; {} if none."""
        rel = self._step_rel(step_uri)
        marker = self._marker(rel)
        if marker is None:
            return dict(self.pruned_steps().get(rel) or {})
        return dict(marker.get("meta") or {})

    def step_file_bytes(self, step_uri: str) -> int:
        """The bytes of a committed step's own files (its blobs not counted), from its COMMIT.json; 0 if none."""
        marker = self._marker(self._step_rel(step_uri)) or {}
        return sum((marker.get("sizes") or {}).values())

    def step_blobs(self, step_uri: str) -> dict[str, int]:
        """{sha256: size} of the content-addressed blobs a committed step refers to (a checkpoint's tensors)."""
        marker = self._marker(self._step_rel(step_uri))
        return dict((marker or {}).get("blobs") or {})

    def verify_step(self, step_uri: str) -> bool:
        """Whether every file and blob of a committed step still has its sha256; a damaged step is uncommitted.

        Each file is hashed at most once per RunStore object (files this object wrote count as verified).
        A damaged step loses its COMMIT.json and its damaged files, so that the caller recomputes it cleanly.
        """
        rel = self._step_rel(step_uri)
        files = self.load_step(step_uri)
        if files is None:
            return False
        marker = self._marker(rel)
        if marker is None:
            return False
        todo = [(self._p(f"{rel}/{name}"), sha) for name, sha in files.items()]
        todo += [(self._p(blob_rel(sha)), sha) for sha in (marker.get("blobs") or {})]
        todo = [(path, sha) for path, sha in todo if (path, sha) not in self._verified]
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(todo)))) as pool:
            actual = list(pool.map(lambda item: self._sha256_file(item[0]), todo))
        damaged = [path for (path, sha), got in zip(todo, actual) if got != sha]
        if damaged:
            log.warning("step %s: %d file(s) do not match their sha256 (%s); the step will be recomputed",
                        step_uri, len(damaged), posixpath.basename(damaged[0]))
            self._invalidate(rel, damaged)
            return False
        self._verified.update(todo)
        return True

    def _invalidate(self, rel: str, damaged: list[str]) -> None:
        # The marker goes first: from then on the step reads as not committed, whatever else fails.
        for path in [self._p(f"{rel}/{COMMIT}"), *damaged]:
            try:
                self._fs.rm(path)
            except FileNotFoundError:
                pass

    def commit_step(self, step_uri: str, files: dict[str, Any], meta: dict | None = None,
                    blobs: dict[str, int] | None = None) -> dict[str, str]:
        """Store files as one step and commit it (COMMIT.json last); returns {name: sha256}.

        files maps a file name to bytes, or to a DataFrame (.parquet), tensor dict (.safetensors) or JSON dict
        (.json); blobs lists the content-addressed blobs ({sha256: size}, put with put_blob) the step refers to.
        """
        # Each file goes to a temporary name, its size is checked, then it is renamed into place; only then is
        # COMMIT.json written, atomically. The marker is the commit point (on object stores a rename is a copy
        # plus delete, so the marker written last is what makes the step visible): a crash at any moment before
        # it leaves a step that load_step() reports as missing. The manifest is updated after the marker.
        rel = self._step_rel(step_uri)
        if not isinstance(files, dict) or not files:
            raise TierpruneError(f"step {step_uri} needs at least one file")
        for name in files:
            _check_name("file", name)
            if name == COMMIT or ".tmp-" in name:
                raise TierpruneError(f"file name {name!r} is reserved by the run store")
        if meta is not None and not isinstance(meta, dict):
            raise TierpruneError(f"step meta must be a dict or None, got {type(meta).__name__}")
        started, io_before = time.perf_counter(), dict(self.io)
        with ThreadPoolExecutor(max_workers=len(files)) as pool:  # pyarrow and sha256 release the GIL
            payload = dict(zip(files, pool.map(lambda item: encode(*item), files.items())))
            hashes = dict(zip(payload, pool.map(self._hash, payload.values())))
        sizes = {name: len(data) for name, data in payload.items()}
        blobs = dict(blobs or {})
        _json_bytes({"files": hashes, "meta": meta}, f"meta of step {step_uri}")  # refused before anything is written

        # The same files again is a no-op; other files are refused while the old step is intact, so nothing
        # committed ever changes. A damaged step (load_step None) is simply written over.
        existing = self.load_step(step_uri)
        if existing is not None:
            if existing == hashes:
                return hashes
            raise TierpruneError(
                f"step {step_uri} is already committed with other files; a step's key must change with its inputs"
            )

        self._remove_stale_temps(rel)
        point = f"commit:{rel.rsplit('-', 1)[0]}"  # e.g. commit:iter-002/checkpoint (tierprune.faults)
        crash_point(f"{point}:before-files")
        step_path = self._p(rel)
        self._fs.makedirs(step_path, exist_ok=True)
        with ThreadPoolExecutor(max_workers=len(payload)) as pool:  # a tier table and its masks side by side
            list(pool.map(lambda item: self._put_checked(f"{step_path}/{item[0]}", item[1], hashes[item[0]]),
                          payload.items()))
        for name, value in files.items():
            if not isinstance(value, (bytes, bytearray, memoryview)):
                self._recent[(f"{step_path}/{name}", hashes[name])] = value
        while len(self._recent) > _RECENT_OBJECTS:
            self._recent.popitem(last=False)
        if meta is not None and "compute_seconds" in meta:
            # A step's commit: what committing cost (serialising, hashing, writing), beside what computing it cost.
            meta = {**meta, "commit_seconds": round(time.perf_counter() - started, 4),
                    "commit_io": {k: round(self.io[k] - io_before[k], 4) for k in self.io}}
            meta["seconds"] = meta["compute_seconds"] + meta["commit_seconds"]
        marker_bytes = _json_bytes({"files": hashes, "sizes": sizes, "blobs": blobs, "meta": meta,
                                    "committed": _now()}, f"meta of step {step_uri}")
        crash_point(f"{point}:before-marker")
        self._write_atomic(f"{rel}/{COMMIT}", marker_bytes)
        crash_point(f"{point}:before-manifest")
        self._record_step(rel, hashes, meta)
        return hashes

    def _put_checked(self, path: str, data: bytes | tuple[bytes | memoryview, ...], digest: str) -> None:
        # A failure anywhere here leaves at most a temp file and uncommitted files: no marker, nothing visible.
        # The sha256 was computed from these bytes (hash once); the size read back catches short writes.
        parts = (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data
        size = sum(len(p) for p in parts)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        with cleanup_on_termination(lambda: self._fs.rm(tmp)):
            self._put_checked_via(tmp, path, parts, size, digest)

    def _put_checked_via(self, tmp: str, path: str, parts: tuple[bytes | memoryview, ...], size: int,
                         digest: str) -> None:
        try:
            # No fsync here (it made a 13 GB checkpoint disk-bound): after a power cut a data file may be short
            # or zero-filled under its name, and then its size (load_step) or its sha256 (first read in the next
            # process) says so and the step is recomputed. COMMIT.json and the manifest are still synced.
            with self.timed("write_seconds", size, "bytes_written"), self._fs.open(tmp, "wb") as f:
                for part in parts:
                    f.write(part)
            if self._size(tmp) != size:
                raise TierpruneError(f"{path}: {self._size(tmp)} bytes arrived of {size}; nothing was committed")
            self._fs.mv(tmp, path)
            self._verified.add((path, digest))
        finally:
            try:
                if self._fs.exists(tmp):
                    self._fs.rm(tmp)
            except OSError:
                pass  # a stray temp file is harmless: no marker lists it

    # ---- content-addressed blobs (a checkpoint's tensors) ----------------------------------------------------

    def put_blob(self, data: bytes | tuple[bytes | memoryview, ...], digest: str | None = None) -> tuple[str, int]:
        """Store bytes (or the concatenation of several buffers) under their sha256; returns (sha256, size).

        The same bytes again cost one size check: a blob is written once per run, whatever refers to it.
        """
        parts = (data,) if isinstance(data, (bytes, bytearray, memoryview)) else tuple(data)
        size = sum(len(p) for p in parts)
        if digest is None:
            with self.timed("hash_seconds"):
                h = hashlib.sha256()
                for part in parts:
                    h.update(part)  # releases the GIL on large buffers: threads hash in parallel
                digest = h.hexdigest()
        path = self._p(blob_rel(digest))
        if self._size(path) == size:
            return digest, size
        for stale in self._fs.glob(f"{path}.tmp-*"):  # left by a crash mid-upload
            try:
                self._fs.rm(stale)
            except FileNotFoundError:
                pass
        self._fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self._put_checked(path, parts, digest)
        return digest, size

    def read_blob(self, digest: str) -> bytes:
        """The bytes of a blob, checked against their sha256 the first time this object reads them."""
        path = self._p(blob_rel(digest))
        try:
            with self.timed("read_seconds"):
                data = self._cat(blob_rel(digest))
        except (FileNotFoundError, IsADirectoryError):
            raise CorruptArtifactError(f"blob {digest[:12]}… of run {self.uri} is missing") from None
        with self._io_lock:
            self.io["bytes_read"] += len(data)
        if (path, digest) not in self._verified:
            if self._hash(data) != digest:
                raise CorruptArtifactError(f"blob {digest[:12]}… of run {self.uri} is corrupt")
            self._verified.add((path, digest))
        return data

    def _sha256_file(self, path: str) -> str:
        # Streamed, so that checking a multi-GB checkpoint never holds it in memory twice.
        self._fs.invalidate_cache(path)
        h = hashlib.sha256()
        try:
            with self.timed("hash_seconds"), self._fs.open(path, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    h.update(chunk)
        except (FileNotFoundError, IsADirectoryError):
            return ""
        return h.hexdigest()

    def read(self, step_uri: str, name: str) -> bytes:
        """The bytes of one file of a committed step, checked against its sha256 the first time this object reads it."""
        rel = self._step_rel(step_uri)
        marker = self._marker(rel)
        if marker is None:
            raise TierpruneError(f"step {step_uri} is not committed")
        digest = marker["files"].get(name)
        if digest is None:
            raise TierpruneError(f"step {step_uri} has no file {name!r} (it has {sorted(marker['files'])})")
        try:
            with self.timed("read_seconds"):
                data = self._cat(f"{rel}/{name}")
        except (FileNotFoundError, IsADirectoryError):
            raise CorruptArtifactError(f"{step_uri}/{name} is missing although its step is committed") from None
        with self._io_lock:
            self.io["bytes_read"] += len(data)
        path = self._p(f"{rel}/{name}")
        if (path, digest) not in self._verified:
            if self._hash(data) != digest:
                raise CorruptArtifactError(
                    f"{step_uri}/{name} is corrupt: sha256 {sha256_bytes(data)[:12]}… != recorded {digest[:12]}…"
                )
            self._verified.add((path, digest))
        return data

    def read_object(self, step_uri: str, name: str) -> Any:
        """A step file decoded by its name: a DataFrame (.parquet), tensor dict (.safetensors) or JSON (.json).

        Do not modify the result: an object this store committed a moment ago is returned as it was given.
        """
        rel = self._step_rel(step_uri)
        marker = self._marker(rel)
        digest = (marker or {}).get("files", {}).get(name)
        key = (self._p(f"{rel}/{name}"), digest)
        if digest is not None and key in self._recent and self._size(key[0]) == marker["sizes"][name]:
            self._recent.move_to_end(key)
            return self._recent[key]
        return decode(name, self.read(step_uri, name))

    def steps_of(self, iteration: int, step: str, key_prefix: str = "") -> list[str]:
        """URIs of the step folders `iter-NNN/<step>-<key_prefix>…` that hold a COMMIT.json, sorted by name."""
        _check_name("step", step)
        pattern = f"{self._path}/iter-{iteration:03d}/{step}-{key_prefix}*/{COMMIT}"
        self._fs.invalidate_cache(self._p(f"iter-{iteration:03d}"))
        rels = sorted(posixpath.relpath(posixpath.dirname(path), self._path) for path in self._fs.glob(pattern))
        return [self._u(rel) for rel in rels if _STEP_REL.fullmatch(rel)]

    def drop_step(self, step_uri: str) -> None:
        """Remove a committed step and its manifest entry: for scratch state (a training state) that a later
        commit supersedes. The marker goes first, so a crash half-way leaves a step that reads as missing."""
        rel = self._step_rel(step_uri)
        self._invalidate(rel, [])
        try:
            self._fs.rm(self._p(rel), recursive=True)
        except FileNotFoundError:
            pass
        manifest = self.manifest()
        if manifest["steps"].pop(rel, None) is not None:
            self._write_atomic(MANIFEST, _json_bytes(manifest, "the run manifest"))

    def iterations(self) -> list[int]:
        """Sorted iteration numbers with at least one step whose COMMIT.json exists (files not re-hashed)."""
        self._fs.invalidate_cache(self._path)
        found = set()
        for path in self._fs.glob(f"{self._path}/iter-*/*/{COMMIT}"):
            rel = posixpath.relpath(posixpath.dirname(path), self._path)
            m = _STEP_REL.fullmatch(rel)
            if m:
                found.add(int(m.group(1)))
        return sorted(found)

    # ---- pruning: deleting what finished iterations no longer need ---------------------------------------

    def pruned(self) -> dict | None:
        """PRUNED.json ({"iterations": [...], "kept": [...], "steps": {rel: meta}, "pruned": time}), or None for a
        run never pruned."""
        data = self._json_file(PRUNED)
        if data is None:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("iterations"), list):
            raise TierpruneError(f"{self._u(PRUNED)} does not list pruned iterations")
        return data

    def pruned_steps(self) -> dict[str, dict]:
        """{rel: the meta it was committed with} of every step deleted by `runs prune` or --keep-checkpoints; {} for
        a run never pruned."""
        return dict((self.pruned() or {}).get("steps") or {})

    def mark_pruned(self, rels: list[str], kept: list[int]) -> None:
        """Record, before anything is deleted, that these steps go, with the meta each was committed with
        (step_meta keeps answering for them: seconds, tokens trained); merged with earlier prunes."""
        metas = {**self.pruned_steps(), **{rel: self.step_meta(self._u(rel)) for rel in rels}}
        iterations = sorted({int(_STEP_REL.fullmatch(rel).group(1)) for rel in metas})  # for a reader of the file
        record = {"iterations": iterations, "kept": sorted(kept), "steps": metas, "pruned": _now()}
        self._write_atomic(PRUNED, _json_bytes(record, "the pruned iterations"))

    def referenced_blobs(self, excluding: set[str] | frozenset[str] = frozenset()) -> dict[str, int]:
        """{sha256: size} of every blob some step's COMMIT.json lists (but the steps `excluding`, as rels). Refuses
        when a COMMIT.json cannot be read: what it refers to cannot be told apart from garbage then."""
        referenced: dict[str, int] = {}
        for rel in self._marker_rels():
            if rel in excluding:
                continue
            marker = self._marker(rel)
            if marker is None:
                raise TierpruneError(f"step {self._u(rel)} has an unreadable {COMMIT}; check the run with "
                                     "`tierprune runs verify` first (nothing was deleted)")
            referenced.update(marker.get("blobs") or {})
        return referenced

    def remove_unreferenced_blobs(self) -> tuple[int, int]:
        """Delete the blobs (and blob temp files) that no step's COMMIT.json lists; returns (files, bytes).
        Only for the lock holder: a writer puts a step's blobs before its COMMIT.json."""
        keep = {posixpath.basename(blob_rel(sha)) for sha in self.referenced_blobs()}
        root = self._p("blobs")
        self._fs.invalidate_cache(root)
        try:
            listing = self._fs.find(root, detail=True)
        except FileNotFoundError:
            return 0, 0
        removed = freed = 0
        for path, info in listing.items():
            if posixpath.basename(path) in keep:
                continue
            try:
                self._fs.rm(path)
            except FileNotFoundError:
                continue
            removed, freed = removed + 1, freed + int(info.get("size") or 0)
        return removed, freed


    def step_status(self, rel: str, deep: bool = True) -> StepStatus:
        """Whether one step (``iter-001/score-…``) is committed, damaged or missing, and why.

        deep hashes every file (as load_step does); otherwise only COMMIT.json and the files' presence (and
        sizes, where the marker records them) are checked: cheap enough for listing many runs.
        """
        if not _STEP_REL.fullmatch(rel):
            raise TierpruneError(f"{rel!r} is not a step folder (iter-NNN/step-key)")
        try:
            self._cat(f"{rel}/{COMMIT}")
        except (FileNotFoundError, IsADirectoryError):
            return StepStatus(rel, "missing", f"no {COMMIT}: the step was never committed or its marker was lost")
        marker = self._marker(rel)
        if marker is None:
            return StepStatus(rel, "damaged", f"{COMMIT} is unreadable")
        sizes = marker.get("sizes") if isinstance(marker.get("sizes"), dict) else {}
        for name, digest in sorted(marker["files"].items()):
            path = self._p(f"{rel}/{name}")
            self._fs.invalidate_cache(path)
            try:
                size = self._fs.size(path)
                if name in sizes and size != sizes[name]:
                    return StepStatus(rel, "damaged", f"{name} has {size} bytes, {sizes[name]} were committed")
                if deep and self._sha256_file(path) != digest:
                    return StepStatus(rel, "damaged", f"{name} does not match its sha256")
            except (FileNotFoundError, IsADirectoryError):
                return StepStatus(rel, "damaged", f"{name} is missing")
        for digest, size in sorted((marker.get("blobs") or {}).items()):  # a checkpoint's tensors
            path = self._p(blob_rel(digest))
            if self._size(path) != size:
                return StepStatus(rel, "damaged", f"blob {digest[:12]}… is missing or has the wrong size")
            if deep and self._sha256_file(path) != digest:
                return StepStatus(rel, "damaged", f"blob {digest[:12]}… does not match its sha256")
        return StepStatus(rel, "committed", "")

    def verify(self, deep: bool = True) -> list[StepStatus]:
        """The status of every step the manifest records or that holds a COMMIT.json, plus the manifest's own
        status when it is not intact (as a StepStatus named manifest.json). Reads only; nothing is repaired."""
        problems: list[StepStatus] = []
        recorded: dict = {}
        try:
            raw = self._cat(MANIFEST)
        except FileNotFoundError:
            problems.append(StepStatus(MANIFEST, "missing", f"rebuilt from {IDENTITY} when the run is next written"
                                       if self._identity_exists() else "and no RUN.json to rebuild it from"))
        else:
            try:
                recorded = json.loads(raw)["steps"]
                if not isinstance(recorded, dict):
                    raise TypeError("steps is not a dict")
            except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
                recorded = {}
                problems.append(StepStatus(MANIFEST, "damaged", f"garbled ({e}); {self._repair_hint()}"))
        rels = sorted(set(recorded) | set(self._marker_rels()))
        return problems + [self.step_status(rel, deep) for rel in rels if _STEP_REL.fullmatch(rel)]

    def _remove_stale_temps(self, rel: str) -> int:
        """Remove the *.tmp-* files a crashed attempt at this step left in its folder; returns how many."""
        # No marker lists them, so they are never read, but on object stores they are whole checkpoints
        # that nobody else would ever delete. Only called by the lock holder, so no writer is using them.
        folder = self._p(rel)
        self._fs.invalidate_cache(folder)
        try:
            entries = self._fs.ls(folder, detail=False)
        except FileNotFoundError:
            return 0
        stale = [e for e in entries if ".tmp-" in posixpath.basename(e.rstrip("/"))]
        for path in stale:
            try:
                self._fs.rm(path)
            except FileNotFoundError:
                pass
        if stale:
            log.warning("step %s: removed %d temporary file(s) left by an earlier attempt", self._u(rel), len(stale))
        return len(stale)

    # ---- lock --------------------------------------------------------------------------------------------

    def lock(self, owner: str | None = None) -> RunLock:
        """A context manager that holds the run's LOCK for one writer; see RunLock."""
        return RunLock(self, owner)

    def lock_holder(self) -> dict | None:
        """What LOCK says (owner, pid, host, since, token), {"owner": ...} if unreadable, None if unlocked."""
        return RunLock(self)._holder() or None

    def lock_state(self) -> str:
        """"unlocked", "alive" (held by a running process of this host), "dead" (its process of this host is
        gone) or "foreign" (held from another host, or unreadable: this host cannot tell whether it is alive)."""
        holder = self.lock_holder()
        if holder is None:
            return "unlocked"
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return "foreign"
        return "dead" if _pid_is_gone(holder["pid"]) else "alive"

    def break_lock(self, token: str | None = None) -> bool:
        """Remove LOCK (only if it still holds token, when given); True if removed. Only for a writer known to be gone."""
        path = self._p(LOCK)
        self._fs.invalidate_cache(path)
        if not self._fs.exists(path):
            return False
        if token is not None and (self.lock_holder() or {}).get("token") != token:
            return False  # taken over since the caller looked: that is someone else's lock now
        try:
            self._fs.rm(path)
        except FileNotFoundError:
            return False
        return True


class RunLock:
    """Exclusive writer lock of a run: the file LOCK with owner, pid, host, time and a random token."""

    # Local folders: LOCK is created with mode "xb" (O_EXCL), so exactly one process wins; memory:// is one
    # process. Object stores: also "xb", which s3fs sends as a conditional put (If-None-Match: *) that AWS S3
    # (and moto) enforce. Stores that ignore the condition (or an fsspec backend without "xb") overwrite
    # instead, so the writer reads LOCK back and holds it only if its own token is there. Race window left on
    # such stores: writer A puts and reads back its token, then B (which checked before A's put landed) puts and
    # reads back its own: both believe they hold the run. It needs both puts within about one round trip.
    # Releasing removes LOCK only if it still holds our token, so a broken-and-retaken lock survives.

    def __init__(self, store: RunStore, owner: str | None = None):
        self.store = store
        self.owner = owner or _default_owner()
        self.token = uuid.uuid4().hex
        self.held = False
        self._on_termination: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take LOCK, or raise TierpruneError naming its holder and how to break it.

        A LOCK left by a process of this host that no longer exists (a crash, SIGKILL, a reboot) is
        stale: it is broken with a warning, so that rerunning after a crash just works. A lock held
        from another host can only be broken explicitly (`tierprune runs unlock`).
        """
        try:
            self._acquire_once()
        except TierpruneError:
            if not self._holder_is_dead_here():
                raise
            log.warning("run %s: breaking the stale lock of dead pid %s", self.store.uri, self._holder().get("pid"))
            self.store.break_lock()
            self._acquire_once()

    def check_free(self) -> None:
        """Raise the locked error if a live writer (or one on another host) holds the run; never writes."""
        holder = self._holder()
        if holder and not self._holder_is_dead_here():
            raise self._locked_error()

    def _holder_is_dead_here(self) -> bool:
        holder = self._holder()
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
            return False
        return _pid_is_gone(pid)

    def _acquire_once(self) -> None:
        store = self.store
        fs, path = store._fs, store._p(LOCK)
        body = _json_bytes(
            {"owner": self.owner, "pid": os.getpid(), "host": socket.gethostname(), "since": _now(),
             "token": self.token},
            "the lock",
        )
        fs.makedirs(store._path, exist_ok=True)
        fs.invalidate_cache(path)
        try:
            f = fs.open(path, "xb")
        except FileExistsError:  # local O_EXCL, memory://
            raise self._locked_error() from None
        except (ValueError, NotImplementedError, TypeError):
            f = None
        if f is None:
            # A store without exclusive create: check, then put; the read-back below decides.
            if fs.exists(path):
                raise self._locked_error()
            fs.pipe_file(path, body)
        else:
            try:
                with f:
                    f.write(body)
            except FileExistsError:  # s3fs: the conditional put was refused on close
                raise self._locked_error() from None
            except BaseException:
                if store._atomic_create:
                    # We created LOCK (exclusively) but could not fill it: an empty LOCK would block everyone.
                    try:
                        fs.rm(path)
                    except OSError:
                        pass
                raise
        if not store._atomic_create and self._holder().get("token") != self.token:
            raise self._locked_error()
        self.held = True
        # A SIGTERM that cannot unwind in time still releases the lock (tierprune.lifecycle).
        self._on_termination = on_termination(self.release)

    def release(self) -> None:
        """Remove LOCK if it is still ours."""
        if not self.held:
            return
        self.held = False
        cancel_on_termination(self._on_termination)
        # Remove only our own LOCK: after a break_lock another writer may hold the run now.
        if self._holder().get("token") == self.token:
            try:
                self.store._fs.rm(self.store._p(LOCK))
            except FileNotFoundError:
                pass
        else:
            log.warning("run %s: our lock was broken while we held it", self.store.uri)

    def _holder(self) -> dict:
        try:
            data = json.loads(self.store._cat(LOCK))
        except FileNotFoundError:
            return {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            # A lock being written right now (empty) or damaged: it still counts as held.
            return {"owner": "an unknown writer (unreadable LOCK)"}
        return data if isinstance(data, dict) else {"owner": "an unknown writer (unreadable LOCK)"}

    def _locked_error(self) -> TierpruneError:
        h = self._holder()
        uri = self.store.uri
        return TierpruneError(
            f"run {uri} is locked by {h.get('owner', 'an unknown writer')} since {h.get('since', '?')} "
            f"(pid {h.get('pid', '?')} on {h.get('host', '?')}); if that process is gone, break the lock with "
            f"`tierprune runs unlock {uri}`"
        )


def _pid_is_gone(pid: int) -> bool:
    """Whether no process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by someone else
    return False


def _default_owner() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        # No passwd entry for the uid (common in containers).
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def run_names(root: str) -> list[str]:
    """Names of the run folders directly under `root` (those holding a manifest)."""
    fs, path = url_to_fs(root)
    if not fs.exists(path):
        if "://" in root:
            try:
                fs.ls(path)  # exists() swallows why: no credentials, no permission; listing says it
            except FileNotFoundError:
                pass
        raise TierpruneError(f"store {root} does not exist")
    if fs.isfile(path):
        raise TierpruneError(f"store {root} is a file, not a folder of runs")
    names = sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))
    return [n for n in names if _NAME.fullmatch(n) and n not in (".", "..") and RunStore(root, n).exists()]
