"""The wheel installs everything under `tierprune.*` and no top-level kernels/tasks/flows/storage package.

The project is built from a copy of its sources (so no build/ or egg-info lands in the working tree) and
installed NON-editable into a fresh venv. That venv gets the main environment's site-packages appended
through a .pth file, after its own: torch and friends come from there, tierprune only from the wheel
(a .pth line adds a plain path, so the main environment's editable-install hook is not run).
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "tierprune", "kernels", "tasks", "flows", "storage", "schedules")
SUBPACKAGES = ("kernels", "tasks", "flows", "storage", "schedules")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif path.exists():
            shutil.copy2(path, src / name)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONPATH": ""}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
          str(src)], env=env, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("tierprune-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], env=env)
    py = venv / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], env=env, cwd=tmp)
    purelib = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        env=env).stdout.strip())
    # Dependencies (torch, transformers, ...) from the main environment, searched after the venv's own.
    main_site = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "zz_main_env_deps.pth").write_text("\n".join(dict.fromkeys(main_site)) + "\n")
    return {"tmp": tmp, "wheel": wheel, "venv": venv, "python": py, "purelib": purelib}


def test_wheel_holds_only_the_tierprune_namespace(installed) -> None:
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"tierprune", installed["wheel"].name.split("-py")[0] + ".dist-info"}, tops
    for sub in SUBPACKAGES:
        assert f"tierprune/{sub}/__init__.py" in names, sub
    for module in ("kernels/masks.py", "kernels/hybrid.py", "kernels/triton/hybrid_mm.py",
                   "kernels/triton/_hybrid_kernels.py", "hybrid_linear.py", "tasks/prune.py", "tasks/oneshot.py",
                   "storage/tables.py", "cli.py"):
        assert f"tierprune/{module}" in names, module
    # The CUDA kernels are compiled from their sources at first use: every one of them must travel.
    sources = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "kernels" / "cuda").glob("*.cu*"))
    assert len(sources) >= 6 and all(f"tierprune/{source}" in names for source in sources), sources


def test_non_editable_install_imports_from_the_venv(installed) -> None:
    purelib = installed["purelib"]
    listing = {p.name for p in purelib.iterdir()}
    assert "tierprune" in listing
    assert not listing & set(SUBPACKAGES), listing & set(SUBPACKAGES)
    assert not any("editable" in name and "tierprune" in name for name in listing), listing

    code = (
        "import importlib.util, json, tierprune, tierprune.kernels, tierprune.tasks, tierprune.storage, "
        "tierprune.flows, tierprune.schedules\n"
        "import tierprune.kernels.masks, tierprune.tasks.prune, tierprune.storage.tables, tierprune.cli\n"
        "print(json.dumps({'files': {m: __import__(m, fromlist=['x']).__file__ for m in "
        "['tierprune', 'tierprune.kernels', 'tierprune.tasks', 'tierprune.storage', 'tierprune.flows', "
        "'tierprune.kernels.masks', 'tierprune.tasks.prune']}, "
        "'top_level': {m: importlib.util.find_spec(m) is not None for m in "
        "['kernels', 'tasks', 'flows', 'storage', 'schedules']}}))"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    env.pop("PYTHONHOME", None)
    out = json.loads(_run([str(installed["python"]), "-c", code], env=env, cwd=installed["tmp"]).stdout)
    for module, file in out["files"].items():
        assert Path(file).resolve().is_relative_to(purelib.resolve()), (module, file)
    assert not any(out["top_level"].values()), out["top_level"]


def test_console_script_runs(installed) -> None:
    env = {**os.environ, "PYTHONPATH": "", "COLUMNS": "200"}
    proc = _run([str(installed["venv"] / "bin" / "tierprune"), "prune", "--help"], env=env, cwd=installed["tmp"])
    assert "--calib-samples" in proc.stdout
