"""A real Prefect server on a free loopback port and `tierprune serve` against it, shared by the live tests.

Everything runs as a user runs it: separate processes, a temporary PREFECT_HOME, PREFECT_API_URL pointing
at the server. The tiny LLaMA of tests/conftest.py and the shared data keep each flow run to seconds.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
SERVER_START_SECONDS = 120
SERVE_START_SECONDS = 120
# The smoke plan's 0.1 epochs of 2,560 tokens: two optimizer steps of distillation per iteration (as tests/flows).
TINY_FINETUNE = {"ft_tokens": 2560, "ft_seqlen": 32, "ft_batch_size": 4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LivePrefect:
    url: str  # the UI; the API is at url + "/api"
    env: dict[str, str]  # the environment a user's shell would have (PREFECT_API_URL, PREFECT_HOME)
    store: Path  # the run store the served forms propose
    workdir: Path
    logs: Path

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    def post(self, path: str, body: dict) -> list | dict:
        request = urllib.request.Request(f"{self.api}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def get(self, path: str) -> list | dict:
        with urllib.request.urlopen(f"{self.api}{path}", timeout=30) as response:
            return json.loads(response.read())

    def prefect(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """The `prefect` CLI, as a user runs it against this server."""
        return subprocess.run([str(BIN / "prefect"), *args], env=self.env, cwd=self.workdir, capture_output=True,
                              text=True, timeout=timeout)

    def flow_params(self, tiny_llama_dir: Path, data_dir: Path, **extra) -> dict:
        """Flat parameters of a quick progressive run on the tiny LLaMA."""
        return {"plan": "smoke", "model": str(tiny_llama_dir), "store": str(self.store),
                "calib": f"c4:{data_dir}/c4-subset", "calib_samples": 4, "calib_seqlen": 32, "calib_batch_size": 2,
                "eval": f"wikitext2:{data_dir}/wikitext-2-raw", "eval_seqlen": 32, "eval_max_windows": 2,
                "device": "cpu", **TINY_FINETUNE, **extra}


def _wait(what: str, check, seconds: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what}: the process ended with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what}: not ready after {seconds} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group we started (the server's uvicorn, serve's flow-run children), then SIGKILL."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@contextmanager
def prefect_server(workdir: Path, data_dir: Path) -> Iterator[LivePrefect]:
    """`prefect server start` on a free port, as a user starts it, with a user's environment pointing at it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(workdir / "prefect-home"), PREFECT_API_URL=f"{url}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_API_HOST="127.0.0.1",
               PREFECT_SERVER_API_PORT=str(port), TIERPRUNE_DATA=str(data_dir),
               TIERPRUNE_CACHE=str(workdir / "cache"),
               PREFECT_RUNNER_POLL_FREQUENCY="2")  # the served runner picks a new run up within 2 s
    logs = workdir / "logs"
    logs.mkdir()
    server_log = logs / "server.log"
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, cwd=workdir, stdout=server_log.open("w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        _wait("prefect server", lambda: urllib.request.urlopen(f"{url}/api/health", timeout=2).status == 200,
              SERVER_START_SECONDS, server, server_log)
        yield LivePrefect(url=url, env=env, store=workdir / "store", workdir=workdir, logs=logs)
    finally:
        _stop(server)


@pytest.fixture(scope="session")
def live_prefect(tmp_path_factory, data_dir) -> Iterator[LivePrefect]:
    """A server with `tierprune serve` registered on it: the served deployments, shared by the live tests."""
    with prefect_server(tmp_path_factory.mktemp("live-prefect"), data_dir) as live:
        serve_log = live.logs / "serve.log"
        serve = subprocess.Popen([str(BIN / "tierprune"), "serve", "--store", str(live.store)], env=live.env,
                                 cwd=live.workdir, stdout=serve_log.open("w"), stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            served = {"progressive/manual", "progressive/overnight", "oneshot/manual", "evaluate/manual"}

            def registered() -> bool:
                rows = live.post("/deployments/filter", {})
                flows = {d["flow_id"]: live.get("/flows/" + d["flow_id"])["name"] for d in rows}
                names = {f"{flows[d['flow_id']]}/{d['name']}" for d in rows}
                return served <= names

            _wait("tierprune serve", registered, SERVE_START_SECONDS, serve, serve_log)
            yield live
        finally:
            _stop(serve)


@pytest.fixture
def bare_prefect(tmp_path, data_dir) -> Iterator[LivePrefect]:
    """A server of its own, nothing served: for tests that replace deployments the other live tests use."""
    with prefect_server(tmp_path, data_dir) as live:
        yield live
