"""docker/: what can be checked without Docker: the files parse, the commands exist, the versions agree."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONSTRAINTS = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                   if "==" in line and not line.startswith("#"))


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(row.split(None, 1)[0].upper(), row.split(None, 1)[1] if " " in row else "") for row in rows]


def test_dockerfile_is_a_cuda_runtime_image_run_by_a_non_root_user():
    instructions = _instructions()
    assert instructions[0][0] == "FROM" and re.search(r"nvidia/cuda:[\d.]+-.*runtime", instructions[0][1])
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    entrypoint = next(args for op, args in instructions if op == "ENTRYPOINT")
    assert entrypoint == '["tierprune"]' and "tierprune" in PYPROJECT["project"]["scripts"]


def test_dockerfile_copies_what_exists_and_installs_the_pinned_versions():
    for op, args in _instructions():
        if op == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
    # The package list the wheel is built from: every package folder is copied into the image.
    copied = {s for op, args in _instructions() if op == "COPY" for s in args.split()[:-1]}
    folders = {path.split("/")[0] for path in PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    assert folders <= copied
    runs = " ".join(args for op, args in _instructions() if op == "RUN")
    assert "bash install.sh" in runs  # install.sh installs with -c constraints.txt
    assert "-c constraints.txt" in (ROOT / "install.sh").read_text()
    for install in re.findall(r"pip install ([^&]+)", runs):
        assert "-c constraints.txt" in install, install  # nothing unpinned on top
    # The same torch release as install.sh's CPU default, from the CUDA index.
    torch_spec = re.search(r'ARG TORCH_SPEC="(torch==[\d.]+)', DOCKERFILE).group(1)
    assert re.search(r"TORCH_SPEC:-(torch==[\d.]+)", (ROOT / "install.sh").read_text()).group(1) == torch_spec
    assert "triton" in runs and "triton" in CONSTRAINTS


def test_compose_has_postgres_a_matching_prefect_server_and_a_gpu_worker():
    services = COMPOSE["services"]
    assert {"postgres", "prefect-server", "gpu-worker"} <= set(services)
    server = services["prefect-server"]
    assert server["image"].split(":")[1].startswith(CONSTRAINTS["prefect"] + "-")
    database = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert database.startswith("postgresql+asyncpg://") and "@postgres:" in database and "asyncpg" in CONSTRAINTS
    worker = services["gpu-worker"]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile"
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert re.fullmatch(r"\d+[gm]b", worker["shm_size"])
    assert any(volume.split(":")[1] == "/runs" for volume in worker["volumes"])
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    pool = yaml.safe_load((ROOT / "schedules" / "prefect.yaml").read_text())["definitions"]["work_pools"]["gpu"]
    command = worker["entrypoint"]
    assert command[:3] == ["prefect", "worker", "start"]
    assert command[command.index("--pool") + 1] == pool["name"] and command[command.index("--type") + 1] == "process"
    store = yaml.safe_load((ROOT / "schedules" / "prefect.yaml").read_text())["definitions"]["parameters"]
    assert store["progressive"]["store"] == "/runs"  # the deployments write to the worker's volume


def _prefect_help(args: list[str]) -> str:
    done = subprocess.run([str(Path(sys.executable).parent / "prefect"), *args, "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_compose_commands_are_real_cli_commands_with_these_options():
    for service in ("gpu-worker", "deploy"):
        command = COMPOSE["services"][service]["entrypoint"]
        assert command[0] == "prefect"
        words = [w for w in command[1:] if not w.startswith("-")]
        subcommand = words[:2] if words[:2] == ["worker", "start"] else words[:1]
        help_text = _prefect_help(subcommand)
        for option in (w for w in command if w.startswith("--")):
            assert option in help_text, (service, option)
    deploy = COMPOSE["services"]["deploy"]
    prefect_file = deploy["entrypoint"][deploy["entrypoint"].index("--prefect-file") + 1]
    assert (ROOT / prefect_file).is_file() and deploy["working_dir"] == "/opt/tierprune"
    assert "WORKDIR /opt/tierprune" in DOCKERFILE


def test_the_image_carries_prefect_toml_settings_as_environment():
    """The worker runs flows outside the repository, where prefect.toml is not read: its settings are ENV."""
    prefect_toml = tomllib.loads((ROOT / "prefect.toml").read_text())
    env = " ".join(args for op, args in _instructions() if op == "ENV")
    assert prefect_toml["tasks"]["default_no_cache"] is True and "PREFECT_TASKS_DEFAULT_NO_CACHE=true" in env
    assert prefect_toml["server"]["analytics_enabled"] is False and "PREFECT_SERVER_ANALYTICS_ENABLED=false" in env
    home = re.search(r"PREFECT_HOME=(\S+)", env).group(1)
    assert home.startswith(re.search(r"HOME=(/home/\S+)", env).group(1))  # writable by the non-root user
