"""Crash safety of `tierprune run`: SIGKILL at every step boundary and in the middle of steps, then rerun.

Each crash is injected with tierprune.faults (``TIERPRUNE_CRASH_AT=<point>``: the CLI process SIGKILLs
itself there). After each kill the same command is run again; it must not recompute (rewrite) any step that
was committed before the kill. Kills come in chains (CHAINS), one store each: the rerun after a kill is itself
killed at the chain's next point, and the rerun after the last kill, run without the variable, must complete
and end with a final tier map and checkpoint byte-identical to an uninterrupted reference run. Damaged
committed files (a flipped byte, a truncated file) must be recomputed, never used.

Every CLI run is a subprocess (~15-40 s: imports, Prefect's server, a tiny model), so all of them are
started from one module fixture, a few at a time, and the tests only look at the outcomes. To keep the
whole file to a few minutes on two cores:

- kills are chained (one process per kill plus one per chain, not two per kill);
- the crash scenarios talk to one Prefect API server that the fixture starts (PREFECT_API_URL; one
  process owns its SQLite database, each CLI run still has its own PREFECT_HOME), instead of each
  starting an ephemeral server (~7 s of CPU per run); the reference run and one crash scenario
  (EPHEMERAL_POINT) use the default ephemeral server, as a user's `tierprune run` does, and in that
  scenario the killed CLI's server must be gone within seconds (tierprune.lifecycle's watchdog);
- evaluation reads the first lines of wikitext-2's test split (a copy): every evaluate step tokenizes the
  whole file (~2.5 s each, 4 per run), while 2 windows of 32 tokens need a few hundred tokens.
"""
from __future__ import annotations

import hashlib
import json
import re
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import prefect_home

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RUN = "r"
STEPS = ("activations", "scores", "tiers", "checkpoint", "eval", "iteration")  # one iteration, in order
WORKERS = 3

# Every step boundary of iteration 2, plus kills in the middle of steps. The kills of a chain happen one after
# another in one store: the rerun after each kill is killed at the chain's next point (later in the run), and only
# the last rerun completes. Every rerun still shows what it skipped, and every kill what it left; a chain costs one
# process per kill plus one, not two per kill.
CHAINS = [
    ["commit:iter-001/checkpoint:before-manifest",  # committed, but the manifest does not know it yet
     "step:iter-002/activations:start",
     "step:iter-002/scores:start",
     "commit:iter-002/tiers:before-marker",         # mid-demote: tiers.parquet written, no COMMIT.json
     "commit:iter-002/checkpoint:before-files"],    # mid-checkpoint write: nothing written yet
    ["step:iter-002/activations:layer-1",           # mid-activations: layer 1 of 2 calibrated
     "step:iter-002/tiers:start",
     "step:iter-002/checkpoint:start",
     "step:iter-002/eval:start"],
    # A chain of its own on ephemeral Prefect servers (a user's `tierprune run`), whose servers must end with
    # their SIGKILLed CLI.
    ["commit:iter-002/checkpoint:before-marker"],   # mid-checkpoint write: file in place, no COMMIT.json
]
CRASH_POINTS = [point for chain in CHAINS for point in chain]
EPHEMERAL_POINT = CHAINS[-1][0]
WIKITEXT_LINES = 300


# ---------------------------------------------------------------------------------------------------
# Running the CLI
# ---------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(home: Path, crash_at: str | None = None, api_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERPRUNE_", "PREFECT_"))}
    env.update(
        COLUMNS="200", NO_COLOR="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        TIERPRUNE_CACHE=str(home / "tierprune-cache"),
        # Its own Prefect home (SQLite database) per scenario: concurrent runs never share a database.
        PREFECT_HOME=prefect_home(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        # Several runs share a few cores: one thread each (the same in every run, so results stay comparable).
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
        # The CLI silences Prefect's console log; the reruns' "already committed at" lines are read from it.
        PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="INFO",
    )
    if crash_at is not None:
        env["TIERPRUNE_CRASH_AT"] = crash_at
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    return env


def _group_alive(pgid: int) -> bool:
    """Whether a process of group pgid still runs (zombies, which hold no port, do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _group_gone_within(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)  # the process group (session) of a subprocess this file started
    except (ProcessLookupError, PermissionError):
        pass


class Runner:
    """Starts `tierprune run` subprocesses; owns the shared Prefect API server and the data they use."""

    def __init__(self, base: Path, model: Path, data: Path):
        self.base, self.model, self.data = base, model, data
        self.wikitext = base / "wikitext-2-raw"
        self.wikitext.mkdir()
        with open(data / "wikitext-2-raw" / "wiki.test.raw", "rb") as f:
            head = b"".join(f.readline() for _ in range(WIKITEXT_LINES))
        (self.wikitext / "wiki.test.raw").write_bytes(head)
        self.server: subprocess.Popen | None = None
        self.api_url: str | None = None

    def start_server(self) -> None:
        """One Prefect API server (what `prefect server start` runs, without UI) for the crash scenarios."""
        home = self.home("server")
        port = _free_port()
        env = {**_env(home), "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
        self._server_log = open(self.base / "server.log", "wb")
        self.server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host",
             "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self._server_log,
            stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise AssertionError(f"the Prefect server exited: {(self.base / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        self.api_url = url
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("the Prefect server did not start in 180 s")

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            _kill_group(self.server.pid)
            self.server.wait()
            self.server = None
            self._server_log.close()

    def home(self, name: str) -> Path:
        return self.base / f"prefect-{name}"  # _env gives it a copy of a migrated database (conftest.prefect_home)

    def run(self, store: Path, home: Path, log: Path, crash_at: str | None = None, *, ephemeral: bool = False,
            leave_orphans: bool = False) -> tuple[int, int]:
        """(exit status, process group id) of one `tierprune run` into store.

        Output goes to a file, not a pipe, and the CLI gets a session of its own, which is killed here (a server
        that outlived its CLI must not outlive the test), unless leave_orphans: the caller then checks that the
        group ends by itself, and kills what is left with _kill_group.
        """
        args = ["--plan", "schedules/plans/smoke.csv", "--store", str(store), "--run", RUN, "--model", str(self.model),
                "--calib", f"c4:{self.data / 'c4-subset'}", "--calib-samples", "4", "--calib-seqlen", "32",
                "--eval", f"wikitext2:{self.wikitext}", "--eval-seqlen", "32", "--eval-max-windows", "2",
                # Two optimizer steps of distillation per iteration: the finetune step trains, as in a real run.
                "--ft-tokens", "2560", "--ft-seqlen", "32", "--ft-batch-size", "4"]
        env = _env(home, crash_at, None if ephemeral else self.api_url)
        with open(log, "ab") as out:
            out.write(f"\n===== tierprune run (TIERPRUNE_CRASH_AT={crash_at})\n".encode())
            out.flush()
            proc = subprocess.Popen([sys.executable, "-m", "tierprune.cli", "run", *args], cwd=REPO, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=400)
            except subprocess.TimeoutExpired:
                rc = None
            if rc is None or not leave_orphans:
                _kill_group(proc.pid)
            proc.wait()
        if rc is None:
            raise AssertionError(f"tierprune run timed out; log in {log}")
        return rc, proc.pid


# ---------------------------------------------------------------------------------------------------
# Looking at a run folder
# ---------------------------------------------------------------------------------------------------

def _stat(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def _committed(run: Path) -> dict[str, dict]:
    """Every step folder with a COMMIT.json: its marker's bytes and the inode/mtime/size of each file in it."""
    out = {}
    for marker in sorted(run.glob("iter-*/*/COMMIT.json")):
        step = marker.parent
        out[f"{step.parent.name}/{step.name}"] = {
            "marker": marker.read_bytes(),
            "stat": {p.name: _stat(p) for p in sorted(step.iterdir()) if ".tmp-" not in p.name},
        }
    return out


def _uncommitted(run: Path) -> dict[str, list[str]]:
    """Step folders without a COMMIT.json, with the files they hold."""
    return {f"{d.parent.name}/{d.name}": sorted(p.name for p in d.iterdir())
            for d in sorted(run.glob("iter-*/*")) if d.is_dir() and not (d / "COMMIT.json").exists()}


def _artifacts(run: Path) -> dict[str, bytes]:
    """{step folder/file: bytes} of every committed step's files (not the markers, which hold times), and
    {blobs/xx/name: bytes} of every content-addressed blob (a checkpoint's tensors)."""
    files = [p for marker in run.glob("iter-*/*/COMMIT.json") for p in marker.parent.iterdir()
             if p.name != "COMMIT.json"] + list(run.glob("blobs/*/*"))
    return {f"{p.parent.parent.name}/{p.parent.name}/{p.name}": p.read_bytes() for p in files if ".tmp-" not in p.name}


def _final(run: Path) -> dict[str, bytes]:
    """The final tier map, masks and checkpoint (index and tensors), found through the iteration-3 record."""
    records = list(run.glob("iter-003/iteration-*/iteration.json"))
    assert len(records) == 1, records
    record = json.loads(records[0].read_text())
    tiers = run / record["tiers"]["rel"]
    ckpt = run / record["checkpoint"]["rel"] / "checkpoint.json"
    assert [tiers] == list(run.glob("iter-003/tiers-*"))
    assert [ckpt] == list(run.glob("iter-003/checkpoint-*/checkpoint.json"))
    index = json.loads(ckpt.read_text())
    return {"tiers.parquet": (tiers / "tiers.parquet").read_bytes(),
            "masks.safetensors": (tiers / "masks.safetensors").read_bytes(),
            "checkpoint.json": ckpt.read_bytes(),
            **{name: (run / path).read_bytes() for name, path in index["weight_map"].items()}}


def _changed_blob(run: Path, iteration: int) -> Path:
    """A blob of iteration's checkpoint that no other checkpoint refers to (a weight that changed there)."""
    def blobs(k: int) -> set[str]:
        return {p for ckpt in run.glob(f"iter-{k:03d}/checkpoint-*/checkpoint.json")
                for p in json.loads(ckpt.read_text())["weight_map"].values()}
    others = set().union(*(blobs(k) for k in range(4) if k != iteration),
                         *(set(json.loads(c.read_text())["weight_map"].values())
                           for c in run.glob("iter-000/start-*/checkpoint.json")))
    return run / sorted(blobs(iteration) - others)[0]


def _digests(files: dict[str, bytes]) -> dict[str, str]:
    # Compared as sha256s: a failing comparison then prints names and hashes, not megabytes.
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def _manifest_steps(run: Path) -> dict[str, dict]:
    return json.loads((run / "manifest.json").read_text())["steps"]


def _snapshot(run: Path) -> dict:
    return {"committed": _committed(run), "uncommitted": _uncommitted(run), "manifest": _manifest_steps(run),
            "lock": (run / "LOCK").exists()}


# ---------------------------------------------------------------------------------------------------
# All scenarios, started together
# ---------------------------------------------------------------------------------------------------

def _chain_scenario(runner: Runner, index: int, points: list[str]) -> dict:
    """Kill a run at each of points in turn (each rerun dies at the next), then rerun it to the end.

    {point: what its kill left and what the process after it skipped}; each also holds the chain's end: the last
    rerun's status and the run folder it left."""
    name = f"chain-{index:02d}"
    store, log = runner.base / name, runner.base / f"{name}.log"
    store.mkdir()
    ephemeral = points == [EPHEMERAL_POINT]
    run_uri = str(store / RUN)
    began = time.perf_counter()
    kills: dict[str, dict] = {}
    previous: str | None = None
    for k, crash_at in enumerate([*points, None]):
        offset = log.stat().st_size if log.exists() else 0
        # A Prefect home per run: a run whose home holds the run before's task results takes committed steps from
        # Prefect's cache and logs no "already committed" line for them, and the lines are what is checked here.
        home = runner.home(f"{name}-{k}")
        rc, group = runner.run(store, home, log, crash_at=crash_at, ephemeral=ephemeral,
                               leave_orphans=ephemeral and crash_at is not None)
        with open(log, "rb") as f:
            f.seek(offset)
            output = f.read().decode(errors="replace")
        if previous is not None:  # this run is the rerun after previous's kill
            kills[previous]["skipped"] = {uri[len(run_uri) + 1:] for uri in
                                          re.findall(r"already committed at (\S+)", output)
                                          if uri.startswith(f"{run_uri}/")}
            kills[previous]["rerun_rc"] = rc
        if crash_at is not None:
            # The SIGKILLed CLI's ephemeral Prefect server (and the watchdog that ends it) must be gone within seconds.
            orphaned = ephemeral and not _group_gone_within(group, 10)
            _kill_group(group)
            kills[crash_at] = {"point": crash_at, "crash_rc": rc, "orphaned": orphaned,
                               "before": _snapshot(store / RUN)}
        previous = crash_at
    end = {"log": log, "final_rc": rc, "after": _snapshot(store / RUN), "artifacts": _artifacts(store / RUN),
           "final": _final(store / RUN) if rc == 0 else None, "seconds": time.perf_counter() - began}
    return {point: {**kill, **end} for point, kill in kills.items()}


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2:]
    path.write_bytes(bytes(data))


def _reference_scenario(runner: Runner) -> dict:
    """The uninterrupted run; then, on its finished folder, a flipped byte in a tensor of iteration 2's checkpoint
    and a truncated tier map."""
    store, log = runner.base / "ref", runner.base / "ref.log"
    store.mkdir()
    home = runner.home("ref")
    run = store / RUN
    out: dict = {"log": log, "rc": runner.run(store, home, log, ephemeral=True)[0]}
    if out["rc"] != 0:
        return out
    out.update(committed=_committed(run), artifacts=_artifacts(run), final=_final(run))
    [checkpoint_step] = run.glob("iter-002/checkpoint-*")
    [tiers_file] = run.glob("iter-002/tiers-*/tiers.parquet")
    for label, target, step, how in (("flip", _changed_blob(run, 2), checkpoint_step, "flip"),
                                     ("truncate", tiers_file, tiers_file.parent, "truncate")):
        _damage(target, how)
        before, inode = _committed(run), _stat(target)[0]
        rc, _ = runner.run(store, home, log)
        out[label] = {"target": target, "step": f"{step.parent.name}/{step.name}", "rc": rc, "before": before,
                      "after": _committed(run), "inode_before": inode,
                      "inode_after": _stat(target)[0] if target.exists() else None,
                      "artifacts": _artifacts(run), "final": _final(run) if rc == 0 else None}
        if rc != 0:
            break
    return out


def _outcome(future) -> dict:
    # One scenario's failure (a timeout, a missing file) fails its own test, not the whole module.
    error = future.exception()
    return future.result() if error is None else {"error": "".join(traceback.format_exception(error))}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_llama_dir: Path, data_dir: Path) -> dict:
    began = time.perf_counter()
    runner = Runner(tmp_path_factory.mktemp("crash-safety"), tiny_llama_dir, data_dir)
    runner.start_server()
    try:
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            # The reference (3 runs) and the two long chains (6 and 5) first, the ephemeral chain (2) after it.
            ref = pool.submit(_reference_scenario, runner)
            chains = [pool.submit(_chain_scenario, runner, i, points) for i, points in enumerate(CHAINS)]
            result = {"ref": _outcome(ref), "crash": {}}
            for points, future in zip(CHAINS, chains):
                outcome = _outcome(future)
                result["crash"].update({p: outcome.get(p, outcome) for p in points})
    finally:
        runner.stop_server()
    result["seconds"] = time.perf_counter() - began
    print(f"crash-safety scenarios: {result['seconds']:.0f} s in all; chains " + ", ".join(
        f"{result['crash'][chain[0]].get('seconds', 0):.0f} s" for chain in CHAINS))
    return result


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:]


# ---------------------------------------------------------------------------------------------------
# What each kill must have left, step by step
# ---------------------------------------------------------------------------------------------------

def _expected_at_kill(point: str) -> tuple[int, str, str]:
    """(iteration, step, where) of a crash point: where is 'start', 'mid', or a commit stage."""
    kind, rest, where = point.split(":")
    iteration, step = rest.split("/")
    return int(iteration.removeprefix("iter-")), step, (where if kind == "commit" else
                                                         "start" if where == "start" else "mid")


def _steps_of(snapshot_keys, iteration: int) -> set[str]:
    return {rel.split("/")[1].rsplit("-", 1)[0] for rel in snapshot_keys if rel.startswith(f"iter-{iteration:03d}/")}


def test_reference_run_completes(outcomes) -> None:
    ref = outcomes["ref"]
    assert "error" not in ref, ref.get("error")
    assert ref["rc"] == 0, _tail(ref["log"])
    committed = ref["committed"]
    assert _steps_of(committed, 0) == {"start", "eval", "iteration"}
    for k in (1, 2, 3):
        assert _steps_of(committed, k) == set(STEPS), k


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_then_rerun_recomputes_nothing_committed_and_ends_identical(outcomes, point: str) -> None:
    ref, c = outcomes["ref"], outcomes["crash"][point]
    assert "error" not in ref and "error" not in c, ref.get("error") or c.get("error")
    assert ref["rc"] == 0, _tail(ref["log"])
    # The kill happened where it was asked for: SIGKILL, the writer's LOCK left behind.
    assert c["crash_rc"] == -signal.SIGKILL, (c["crash_rc"], _tail(c["log"]))
    before, after = c["before"], c["after"]
    assert before["lock"], "a SIGKILLed writer leaves its LOCK"

    iteration, step, where = _expected_at_kill(point)
    order = STEPS.index(step)
    committed_then = set(before["committed"])
    for k in range(iteration):
        expected = {"start", "eval", "iteration"} if k == 0 else set(STEPS)
        assert _steps_of(committed_then, k) == expected, (k, sorted(committed_then))
    landed = order + (1 if where == "before-manifest" else 0)  # before-manifest: COMMIT.json is already there
    assert _steps_of(committed_then, iteration) == set(STEPS[:landed]), sorted(committed_then)
    assert not any(rel.startswith(f"iter-{iteration + 1:03d}/") for rel in committed_then)
    # Half-written steps are visible only as folders without a marker.
    half = {rel: files for rel, files in before["uncommitted"].items()
            if rel.startswith(f"iter-{iteration:03d}/{step}-")}
    if where == "before-marker":
        assert len(half) == 1 and [n for n in next(iter(half.values())) if ".tmp-" not in n] == \
            {"tiers": ["masks.safetensors", "tiers.parquet"], "checkpoint": ["checkpoint.json"]}[step], \
            before["uncommitted"]
    elif where == "before-files":
        assert all(not files for files in half.values()), half
    elif where == "before-manifest":
        rel = next(r for r in committed_then if r.startswith(f"iter-{iteration:03d}/{step}-"))
        assert rel not in before["manifest"], "the kill came before the manifest update"
        assert set(before["manifest"]) == committed_then - {rel}
    if where != "before-manifest":
        assert set(before["manifest"]) == committed_then

    # The rerun ran until the chain's next kill (or to the end), and the chain's last rerun completed...
    chain = next(chain for chain in CHAINS if point in chain)
    last = chain.index(point) == len(chain) - 1
    assert c["rerun_rc"] == (0 if last else -signal.SIGKILL), (c["rerun_rc"], _tail(c["log"]))
    assert c["final_rc"] == 0, _tail(c["log"])
    assert not after["lock"], "the last rerun broke the stale LOCK and released its own"
    # ...the rerun recomputed no step committed before the kill: its task found it committed and returned at once
    # (and computed every other step), and its COMMIT.json and files are still the very same at the chain's end
    # (bytes, inode, mtime)...
    assert c["skipped"] == set(before["committed"]), (sorted(c["skipped"] ^ set(before["committed"])))
    for rel, state in before["committed"].items():
        assert after["committed"][rel]["marker"] == state["marker"], f"{rel} was recomputed"
        assert after["committed"][rel]["stat"] == state["stat"], f"{rel} was rewritten"
    # ...records every committed step in the manifest (the one a before-manifest kill missed too)...
    assert set(after["manifest"]) == set(after["committed"])
    for rel, state in after["committed"].items():
        assert after["manifest"][rel]["files"] == json.loads(state["marker"])["files"], rel
    # ...and ends where the uninterrupted run ended, byte for byte: the same steps (keys) and the same files.
    assert set(after["committed"]) == set(ref["committed"])
    assert _digests(c["final"]) == _digests(ref["final"])
    assert _digests(c["artifacts"]) == _digests(ref["artifacts"])


def test_sigkill_leaves_no_ephemeral_prefect_server(outcomes) -> None:
    c = outcomes["crash"][EPHEMERAL_POINT]
    assert "error" not in c, c.get("error")
    assert c["crash_rc"] == -signal.SIGKILL, _tail(c["log"])
    assert not c["orphaned"], "the ephemeral Prefect server outlived its SIGKILLed CLI"


# ---------------------------------------------------------------------------------------------------
# Damaged committed files are recomputed, never used
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label", ["flip", "truncate"])
def test_damaged_committed_file_is_recomputed(outcomes, label: str) -> None:
    ref = outcomes["ref"]
    assert "error" not in ref, ref.get("error")
    assert ref["rc"] == 0, _tail(ref["log"])
    assert label in ref, "an earlier rerun of the reference run failed"
    d = ref[label]
    assert d["rc"] == 0, _tail(ref["log"])
    target: Path = d["target"]
    rel = d["step"]  # the step the damaged file belongs to (a blob: the checkpoint that refers to it)
    name = f"{target.parent.parent.name}/{target.parent.name}/{target.name}"
    # The damaged file was rewritten with the reference bytes, and its step committed anew...
    assert _digests(d["artifacts"])[name] == _digests(ref["artifacts"])[name]
    assert d["inode_after"] != d["inode_before"], "not rewritten"
    assert d["after"][rel]["stat"]["COMMIT.json"] != d["before"][rel]["stat"]["COMMIT.json"], "not recommitted"
    # ...every other step stayed as it was...
    assert set(d["after"]) == set(d["before"])
    for other, state in d["before"].items():
        if other != rel:
            assert d["after"][other] == state, f"{other} was recomputed"
    # ...and the run ends byte-identical to the reference.
    assert _digests(d["final"]) == _digests(ref["final"])
    assert _digests(d["artifacts"]) == _digests(ref["artifacts"])


# ---------------------------------------------------------------------------------------------------
# The hook itself
# ---------------------------------------------------------------------------------------------------

def test_crash_point_kills_only_on_an_exact_match() -> None:
    code = ("from tierprune.faults import crash_point; crash_point('commit:iter-002/tiers:before-marker'); "
            "print('alive')")

    def run(value: str | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "TIERPRUNE_CRASH_AT"}
        if value is not None:
            env["TIERPRUNE_CRASH_AT"] = value
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)

    for value in (None, "", "commit:iter-002/tiers:before-manifest", "commit:iter-002/tiers"):
        proc = run(value)
        assert proc.returncode == 0 and proc.stdout.strip() == "alive", (value, proc.stderr)
    proc = run("commit:iter-002/tiers:before-marker")
    assert proc.returncode == -signal.SIGKILL and proc.stdout == "", proc
