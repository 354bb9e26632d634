"""One pruning run as one folder on any fsspec store, written so that a crash costs at most the running step.

Layout of a run folder (``{root}/{run}``)::

    RUN.json                          what the run is (caller's keys, "fingerprint"), written once by create()
    manifest.json                     RUN.json's keys plus the steps it recorded; rebuilt from RUN.json and the
                                      steps' COMMIT.json when missing (`tierprune runs repair` when garbled)
    LOCK                              present while a writer holds the run (see RunLock)
    iter-001/score-0123456789abcdef/  one step: its files, then COMMIT.json, written last
        scores.parquet
        COMMIT.json                   {"files": {name: sha256}, "meta": ..., "committed": time}

A step exists only once its COMMIT.json does, and it is a valid starting point only while every file that the
marker lists still has the recorded sha256: load_step checks both, so a crash mid-step or a damaged file is
never mistaken for a result, and the caller simply recomputes that step.
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
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from tierprune.errors import TierpruneError
from tierprune.faults import crash_point
from tierprune.lifecycle import cancel_on_termination, cleanup_on_termination, on_termination

from .tables import _atomic_open

__all__ = ["RunStore", "RunLock", "CorruptArtifactError", "StepStatus", "sha256_bytes", "run_names"]

log = logging.getLogger(__name__)

FORMAT = "tierprune-run/1"
MANIFEST = "manifest.json"
IDENTITY = "RUN.json"
COMMIT = "COMMIT.json"
LOCK = "LOCK"
# Run, step and file names become path components on every backend: no separators, no "." or "..".
_NAME = re.compile(r"[A-Za-z0-9._-]+")
# A step folder relative to the run folder, as step_uri builds it.
_STEP_REL = re.compile(r"iter-(\d{3,})/([A-Za-z0-9._-]+)")
# What a crash during create() or a lock taken before create() may leave in a run folder with no manifest yet.
_CREATE_LEFTOVERS = re.compile(rf"(({re.escape(MANIFEST)}|{re.escape(IDENTITY)})\.tmp-[0-9a-f]+|{LOCK})")
_RESERVED_KEYS = ("format", "created", "steps")
_HASH_CHUNK = 8 * 2**20


class CorruptArtifactError(TierpruneError):
    """A committed file no longer has the sha256 its step recorded (truncated, overwritten or missing)."""


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of data, the checksum every committed file is recorded and checked with."""
    return hashlib.sha256(data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise TierpruneError(f"invalid {kind} name {name!r}: use letters, digits, '.', '_' and '-' only")
    return name


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

    # ---- identity, rebuild and repair --------------------------------------------------------------------

    def _identity(self) -> dict | None:
        """RUN.json (what create() was given, plus format and created time), or None for a run without one."""
        try:
            raw = self._cat(IDENTITY)
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TierpruneError(f"{self._u(IDENTITY)} is garbled: {e}") from e
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

        Returns {"steps": number of steps recorded, "backup": URI of the old manifest or None}.
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
        if old is not None:
            backup = self._u(f"{MANIFEST}.bak")
            self._write_atomic(f"{MANIFEST}.bak", old)
        self._write_atomic(MANIFEST, _json_bytes(rebuilt, "the run manifest"))
        return {"steps": len(rebuilt["steps"]), "backup": backup}

    def _refuse_foreign_folder(self) -> None:
        # Never write a manifest into a folder that holds someone else's files: a later cleanup of the run
        # would take them along, and a mistyped root must not turn a data folder into a "run".
        self._fs.invalidate_cache(self._path)
        if self._fs.isfile(self._path):
            raise TierpruneError(f"{self.uri} is not a tierprune run folder: it is a file")
        try:
            entries = self._fs.ls(self._path, detail=False)
        except FileNotFoundError:
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
        return marker

    def load_step(self, step_uri: str) -> dict[str, str] | None:
        """{name: sha256} of a committed step whose files all still match, else None (the caller recomputes it)."""
        # Every file is read and hashed: a truncated or flipped file must never become a starting point.
        rel = self._step_rel(step_uri)
        marker = self._marker(rel)
        if marker is None:
            return None
        files: dict[str, str] = marker["files"]
        for name, digest in files.items():
            try:
                actual = self._sha256_file(self._p(f"{rel}/{name}"))
            except (FileNotFoundError, IsADirectoryError):
                log.warning("step %s: %s is missing; the step will be recomputed", step_uri, name)
                return None
            if actual != digest:
                log.warning("step %s: %s does not match its sha256; the step will be recomputed", step_uri, name)
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

    def commit_step(self, step_uri: str, files: dict[str, bytes], meta: dict | None = None) -> dict[str, str]:
        """Store files as one step and commit it (COMMIT.json last); returns {name: sha256}."""
        # Each file goes to a temporary name, is read back and checked, then renamed into place; only then is
        # COMMIT.json written, atomically. The marker is the commit point (on object stores a rename is a copy
        # plus delete, so the marker written last is what makes the step visible): a crash at any moment before
        # it leaves a step that load_step() reports as missing. The manifest is updated after the marker.
        rel = self._step_rel(step_uri)
        if not isinstance(files, dict) or not files:
            raise TierpruneError(f"step {step_uri} needs at least one file")
        for name, data in files.items():
            _check_name("file", name)
            if name == COMMIT or ".tmp-" in name:
                raise TierpruneError(f"file name {name!r} is reserved by the run store")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TierpruneError(f"file {name!r} of step {step_uri} must be bytes, got {type(data).__name__}")
        if meta is not None and not isinstance(meta, dict):
            raise TierpruneError(f"step meta must be a dict or None, got {type(meta).__name__}")
        hashes = {name: sha256_bytes(bytes(data)) for name, data in files.items()}
        marker_bytes = _json_bytes({"files": hashes, "meta": meta, "committed": _now()}, f"meta of step {step_uri}")

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
        for name, data in files.items():
            self._put_verified(f"{step_path}/{name}", bytes(data), hashes[name])
        crash_point(f"{point}:before-marker")
        self._write_atomic(f"{rel}/{COMMIT}", marker_bytes)
        crash_point(f"{point}:before-manifest")
        self._record_step(rel, hashes, meta)
        return hashes

    def _put_verified(self, path: str, data: bytes, digest: str) -> None:
        # A failure anywhere here leaves at most a temp file and uncommitted files: no marker, nothing visible.
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        with cleanup_on_termination(lambda: self._fs.rm(tmp)):
            self._put_verified_via(tmp, path, data, digest)

    def _put_verified_via(self, tmp: str, path: str, data: bytes, digest: str) -> None:
        try:
            with self._fs.open(tmp, "wb") as f:
                f.write(data)
                if isinstance(self._fs, LocalFileSystem):
                    f.flush()
                    os.fsync(f.fileno())
            # Read back from the store, not from our buffer: catches short writes and broken uploads.
            if self._sha256_file(tmp) != digest:
                raise TierpruneError(f"{path}: the bytes read back differ from those written; nothing was committed")
            self._fs.mv(tmp, path)
        finally:
            try:
                if self._fs.exists(tmp):
                    self._fs.rm(tmp)
            except OSError:
                pass  # a stray temp file is harmless: no marker lists it

    def _sha256_file(self, path: str) -> str:
        # Streamed, so that checking a multi-GB checkpoint never holds it in memory twice.
        self._fs.invalidate_cache(path)
        h = hashlib.sha256()
        with self._fs.open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def read(self, step_uri: str, name: str) -> bytes:
        """The bytes of one file of a committed step, checked against the sha256 its COMMIT.json recorded."""
        rel = self._step_rel(step_uri)
        marker = self._marker(rel)
        if marker is None:
            raise TierpruneError(f"step {step_uri} is not committed")
        digest = marker["files"].get(name)
        if digest is None:
            raise TierpruneError(f"step {step_uri} has no file {name!r} (it has {sorted(marker['files'])})")
        try:
            data = self._cat(f"{rel}/{name}")
        except (FileNotFoundError, IsADirectoryError):
            raise CorruptArtifactError(f"{step_uri}/{name} is missing although its step is committed") from None
        if sha256_bytes(data) != digest:
            raise CorruptArtifactError(
                f"{step_uri}/{name} is corrupt: sha256 {sha256_bytes(data)[:12]}… != recorded {digest[:12]}…"
            )
        return data

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

    # ---- health ------------------------------------------------------------------------------------------

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
        raise TierpruneError(f"store {root} does not exist")
    names = sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False))
    return [n for n in names if _NAME.fullmatch(n) and n not in (".", "..") and RunStore(root, n).exists()]
