"""`tierprune run` / `tierprune runs` fail safely: signals, locks, orphaned servers, damaged runs, offline hub.

One real `tierprune run` (tiny model, ephemeral Prefect server) is started, found holding its lock, refused by
`runs unlock`, then SIGTERMed; the same command is run again and SIGKILLed at a step boundary. The run folder it
leaves is then used for `runs unlock` of a dead writer, `runs verify`, `runs list`, `runs show` and
`runs repair`. The other tests need no run (a few seconds each).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import prefect_home

REPO = Path(__file__).resolve().parents[1]
RUN = "u"


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERPRUNE_", "PREFECT_"))}
    env.update(COLUMNS="200", NO_COLOR="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PREFECT_HOME=prefect_home(tmp / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", TIERPRUNE_CACHE=str(tmp / "cache"),
               OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tierprune.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = _lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _live_group_members(pgid: int) -> list[str]:
    """Processes of process group pgid that are not zombies (a zombie holds no port and runs nothing)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(text.split(")", 1)[0] + ")")
    return members


def _wait_until(condition, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)  # the session of a CLI this file started, if a test failed half-way
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------------------------------
# One real run: a live lock, SIGTERM, then SIGKILL
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, tiny_llama_dir: Path, data_dir: Path) -> dict:
    tmp = tmp_path_factory.mktemp("reliability")
    common = ["run", "--plan", "schedules/plans/smoke.csv", "--run", RUN, "--model", str(tiny_llama_dir),
              "--calib", f"c4:{data_dir / 'c4-subset'}", "--calib-samples", "4", "--calib-seqlen", "32",
              "--ft-tokens", "2560", "--ft-seqlen", "32", "--ft-batch-size", "4"]
    out: dict = {"tmp": tmp}

    def start(args: list[str], log: Path, **extra: str) -> subprocess.Popen:
        with open(log, "wb") as f:
            return subprocess.Popen([sys.executable, "-m", "tierprune.cli", *common, *args], cwd=REPO,
                                    env=_env(tmp, **extra), stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    # 1. A live writer: its lock must survive `runs unlock`; then SIGTERM to its whole process group, as a
    #    terminal's Ctrl-C or a service manager does (its Prefect server gets the signal too). Iteration 0
    #    evaluates on all of WikiText-2's test split (thousands of windows): a step that runs for a while.
    store = tmp / "term"
    store.mkdir()
    run_dir = store / RUN
    proc = start(["--store", str(store), "--eval", f"wikitext2:{data_dir / 'wikitext-2-raw'}", "--eval-seqlen",
                  "32"], tmp / "term.log")
    try:
        running = _wait_until(lambda: (run_dir / "LOCK").exists() and any(run_dir.glob("iter-000/start-*/COMMIT.json")),
                              240)
        assert running, (tmp / "term.log").read_text()[-3000:]
        lock_before = (run_dir / "LOCK").read_bytes()
        out["unlock_live"] = _cli(["runs", "unlock", str(run_dir)], _env(tmp))
        out["unlock_live_force"] = _cli(["runs", "unlock", str(run_dir), "--force"], _env(tmp))
        out["lock_kept"] = (run_dir / "LOCK").exists() and (run_dir / "LOCK").read_bytes() == lock_before
        out["still_running"] = proc.poll() is None
        began = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out["term_rc"] = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            out["term_rc"] = None
        out["term_seconds"] = time.monotonic() - began
        out["term_log"] = (tmp / "term.log").read_text(errors="replace")
        out["term_lock"] = (run_dir / "LOCK").exists()
        out["term_temps"] = [str(p) for p in store.rglob("*.tmp-*")]
        out["term_group_gone"] = _wait_until(lambda: not _live_group_members(proc.pid), 10)
    finally:
        _kill_group(proc.pid)
        proc.wait()

    # 2. Another run, killed with SIGKILL at a step boundary: its Prefect server must not outlive it.
    store = out["store"] = tmp / "kill"
    store.mkdir()
    out["run"] = store / RUN
    proc = start(["--store", str(store), "--eval", "none"], tmp / "kill.log",
                 TIERPRUNE_CRASH_AT="step:iter-001/activations:start")
    try:
        out["kill_rc"] = proc.wait(timeout=400)
        killed_at = time.monotonic()
        out["kill_group_gone"] = _wait_until(lambda: not _live_group_members(proc.pid), 10)
        out["kill_group_seconds"] = time.monotonic() - killed_at
        out["kill_group_left"] = _live_group_members(proc.pid)
        out["kill_log"] = (tmp / "kill.log").read_text(errors="replace")
    finally:
        _kill_group(proc.pid)
        proc.wait()
    return out


@pytest.mark.slow
def test_unlock_refuses_the_lock_of_a_live_writer(killed_run) -> None:
    _one_error_line(killed_run["unlock_live"], "still running on this host")
    _one_error_line(killed_run["unlock_live_force"], "still running on this host")  # --force does not help
    assert killed_run["lock_kept"], "the live writer's LOCK was touched"
    assert killed_run["still_running"], "the writer ended before it could be asked (not a test of a live lock)"


@pytest.mark.slow
def test_sigterm_stops_within_seconds_with_one_error_line_and_no_lock(killed_run) -> None:
    log = killed_run["term_log"]
    assert killed_run["term_rc"] == 128 + signal.SIGTERM, (killed_run["term_rc"], log[-3000:])
    assert killed_run["term_seconds"] < 10, killed_run["term_seconds"]
    errors = [line for line in _lines(log) if line.startswith("error:")]
    assert errors == [line for line in errors if line.startswith("error: terminated (SIGTERM)")] and len(errors) == 1, log
    assert "Traceback" not in log and "Connection refused" not in log, log[-3000:]
    assert not killed_run["term_lock"], "the lock was not released"
    assert killed_run["term_temps"] == [], "temporary files left behind"
    assert killed_run["term_group_gone"], "a process of the terminated CLI lives on"


@pytest.mark.slow
def test_sigkill_takes_the_ephemeral_prefect_server_along(killed_run) -> None:
    assert killed_run["kill_rc"] == -signal.SIGKILL, killed_run["kill_log"][-3000:]
    assert killed_run["kill_group_gone"], f"left running: {killed_run['kill_group_left']}"
    assert killed_run["kill_group_seconds"] < 10


@pytest.mark.slow
def test_unlock_removes_a_dead_writers_lock_and_breaks_another_hosts_only_with_force(killed_run) -> None:
    run_dir: Path = killed_run["run"]
    env = _env(killed_run["tmp"])
    holder = json.loads((run_dir / "LOCK").read_text())  # left by the SIGKILLed run
    proc = _cli(["runs", "unlock", str(run_dir)], env)
    assert proc.returncode == 0, proc.stderr
    assert "no longer exists" in proc.stdout and f"pid {holder['pid']}" in proc.stdout, proc.stdout
    assert not (run_dir / "LOCK").exists()

    foreign = {"owner": "ann@gpu-7", "pid": 4242, "host": "gpu-7", "since": "2026-01-02T03:04:05+00:00",
               "token": "t0"}
    (run_dir / "LOCK").write_text(json.dumps(foreign))
    _one_error_line(_cli(["runs", "unlock", str(run_dir)], env), "ann@gpu-7", "gpu-7", "--force",
                    "2026-01-02T03:04:05")
    assert (run_dir / "LOCK").exists()
    proc = _cli(["runs", "unlock", str(run_dir), "--force"], env)
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stdout.split())
    for fragment in ("removed the lock of ann@gpu-7", "pid 4242 on gpu-7", "since 2026-01-02T03:04:05", "--force"):
        assert fragment in said, said
    assert not (run_dir / "LOCK").exists()
    assert _cli(["runs", "unlock", str(run_dir)], env).stdout.strip() == "the run was not locked"


@pytest.mark.slow
def test_verify_list_show_and_repair_report_damage_instead_of_hiding_it(killed_run) -> None:
    store: Path = killed_run["store"]
    run_dir: Path = killed_run["run"]
    env = _env(killed_run["tmp"])
    narrow = {**env, "COLUMNS": "80"}

    proc = _cli(["runs", "verify", str(run_dir)], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "damaged or missing" in proc.stdout and " 0 damaged" in proc.stdout.replace("\n", " ")
    [iteration0] = run_dir.glob("iter-000")
    proc = _cli(["runs", "show", str(run_dir)], narrow)
    assert proc.returncode == 0, proc.stderr
    assert f"iteration 0: {iteration0}" in proc.stdout.splitlines(), proc.stdout  # whole, on one line, at 80 columns

    # A lost marker (iteration 0's start step) and a damaged file (its eval step).
    [start] = run_dir.glob("iter-000/start-*")
    (start / "COMMIT.json").unlink()
    [evaluation] = run_dir.glob("iter-000/eval-*/eval.json")
    evaluation.write_bytes(evaluation.read_bytes().replace(b"sparsity", b"sparsitz"))

    proc = _cli(["runs", "verify", str(run_dir)], env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in proc.stdout.splitlines()
            if line.startswith("│") and "iter-" in line}
    assert rows[start.relative_to(run_dir).as_posix()] == "missing", proc.stdout
    assert rows[evaluation.parent.relative_to(run_dir).as_posix()] == "damaged", proc.stdout

    proc = _cli(["runs", "list", str(store)], env)
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"│ {RUN} +│ [^│]*not committed", proc.stdout), proc.stdout

    proc = _cli(["runs", "show", str(run_dir)], env)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint missing" in proc.stdout and "eval damaged" in proc.stdout, proc.stdout

    # A garbled manifest: refused with the command that repairs it; the repair keeps the old one.
    (run_dir / "manifest.json").write_text('{"steps": ')
    line = _one_error_line(_cli(["runs", "show", str(run_dir)], env), "garbled")
    assert f"tierprune runs repair {run_dir}" in line
    proc = _cli(["runs", "repair", str(run_dir)], env)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "manifest.json.bak").read_text() == '{"steps": '
    assert _cli(["runs", "show", str(run_dir)], env).returncode == 0
    # A missing one is rebuilt on the fly.
    (run_dir / "manifest.json").unlink()
    proc = _cli(["runs", "list", str(store)], env)
    assert re.search(rf"│ {RUN} +│ manifest missing", proc.stdout), proc.stdout


# ---------------------------------------------------------------------------------------------------
# No run needed
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable endpoint"])
def test_unknown_model_offline_is_one_line_in_seconds(tmp_path, data_dir, how: str) -> None:
    env = _env(tmp_path, TIERPRUNE_DATA=str(data_dir))
    if how != "HF_HUB_OFFLINE":
        with socket.socket() as sock:  # a port nothing listens on: connection refused at once
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            env.pop(key)
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{port}"
    began = time.monotonic()
    proc = _cli(["prune", "--model", "no-such/model", "--eval", "none"], env, timeout=120)
    seconds = time.monotonic() - began
    _one_error_line(proc, "cannot load model 'no-such/model': not a local path, and the Hugging Face hub is "
                          "unreachable (offline)")
    # Its imports alone take 5-10 s on a loaded 2-core CI machine (11.4 s once, when the venv had no .pyc files).
    assert seconds < 25, seconds


def test_a_remote_store_without_credentials_is_one_line_before_any_work(tmp_path, data_dir) -> None:
    """s3:// with no AWS credentials anywhere: one line from each command, nothing pruned or written first."""
    env = {k: v for k, v in _env(tmp_path, TIERPRUNE_DATA=str(data_dir)).items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    no_credentials = "the store could not be reached: NoCredentialsError: Unable to locate credentials"
    began = time.monotonic()
    proc = _cli(["prune", "--method", "magnitude", "--pattern", "2:4", "--eval", "none",
                 "--output", "s3://tierprune-no-bucket/out"], env)
    assert _one_error_line(proc, no_credentials).startswith("error: --output s3://tierprune-no-bucket/out: ")
    assert "prune:" not in proc.stdout + proc.stderr  # refused before the model was pruned
    _one_error_line(_cli(["runs", "show", "s3://tierprune-no-bucket/r"], env), no_credentials)
    _one_error_line(_cli(["runs", "list", "s3://tierprune-no-bucket"], env), no_credentials)  # not "does not exist"
    _one_error_line(_cli(["run", "--plan", "smoke", "--store", "s3://tierprune-no-bucket/runs", "--run", "r"], env),
                    no_credentials)
    assert time.monotonic() - began < 90


def test_nan_and_inf_sparsity_are_refused_clearly(tmp_path) -> None:
    for value in ("nan", "inf"):
        line = _one_error_line(_cli(["prune", "--sparsity", value], _env(tmp_path)), "sparsity")
        assert "finite" in line and "less than 1" not in line, line


def test_topk_zero_is_documented_and_removes_topk_blocks(tmp_path) -> None:
    import torch

    from tierprune.config import PruneConfig
    from tierprune.kernels.tiers import DENSE, TOPK, tier_keep_mask

    assert PruneConfig(pattern="tiers", topk=0).topk == 0
    scores = torch.rand(32, 32) + 0.1
    tier_map = torch.tensor([[DENSE, TOPK], [TOPK, DENSE]], dtype=torch.int8)
    keep = tier_keep_mask(scores, tier_map, 16, topk=0)
    assert not keep[:16, 16:].any() and not keep[16:, :16].any()  # the TopK blocks: nothing kept
    assert keep[:16, :16].all() and keep[16:, 16:].all()
    for command in ("prune", "run"):
        proc = _cli([command, "--help"], _env(tmp_path), timeout=60)  # _env makes its PREFECT_HOME
        assert "0: TopK blocks are removed entirely" in " ".join(proc.stdout.split()), proc.stdout
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "--topk 0" in readme and "removed entirely" in readme


def test_prefect_home_defaults_to_tierprunes_cache_outside_a_prefect_project(tmp_path, monkeypatch) -> None:
    from tierprune.cli import default_prefect_home

    home = Path.home()
    assert default_prefect_home({}, tmp_path) == str(home / ".cache" / "tierprune" / "prefect")
    assert default_prefect_home({"TIERPRUNE_CACHE": "/c"}, tmp_path) == "/c/prefect"
    assert default_prefect_home({"PREFECT_HOME": "/p"}, tmp_path) is None  # the user's choice
    (tmp_path / "prefect.toml").write_text("[server]\nanalytics_enabled = false\n")
    assert default_prefect_home({}, tmp_path) == str(home / ".cache" / "tierprune" / "prefect")  # no home there
    (tmp_path / "prefect.toml").write_text('home = ".prefect"\n')
    assert default_prefect_home({}, tmp_path) is None  # a project that says where (like this repository)
    (tmp_path / "prefect.toml").unlink()
    (tmp_path / "pyproject.toml").write_text('[tool.prefect]\nhome = "/x"\n')
    assert default_prefect_home({}, tmp_path) is None
    assert default_prefect_home({}, REPO) is None


def test_the_cli_uses_the_default_prefect_home(tmp_path) -> None:
    # Outside any Prefect project, the CLI process itself runs with PREFECT_HOME under TIERPRUNE_CACHE.
    env = _env(tmp_path, TIERPRUNE_CACHE=str(tmp_path / "cache"))
    env.pop("PREFECT_HOME")
    code = ("import os, sys; from tierprune import cli; sys.argv = ['tierprune', '--help']\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\nprint('HOME=' + os.environ['PREFECT_HOME'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert f"HOME={tmp_path / 'cache' / 'prefect'}" in proc.stdout, proc.stdout + proc.stderr


def test_progress_reports_reach_the_listener_only_while_it_listens() -> None:
    from tierprune import progress

    heard: list[tuple[str, int, int]] = []
    progress.report("ignored", 1, 2)
    with progress.reporting(lambda step, done, total: heard.append((step, done, total))):
        progress.report("iteration 1: collect activations", 1, 30)
        progress.report("iteration 1: collect activations", 30, 30)
    progress.report("ignored", 2, 2)
    assert heard == [("iteration 1: collect activations", 1, 30), ("iteration 1: collect activations", 30, 30)]
