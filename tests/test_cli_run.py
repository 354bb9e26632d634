"""`tierprune run` refuses bad input in seconds: one line, exit 2, nothing already stored changed."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import prefect_home

pytestmark = pytest.mark.slow

SMOKE = Path(__file__).parents[1] / "schedules" / "plans" / "smoke.csv"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "PREFECT_HOME": prefect_home(cwd / ".prefect")}
    return subprocess.run([sys.executable, "-m", "tierprune.cli", "run", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_run_inputs(tmp_path, tiny_llama_dir, data_dir):
    store = tmp_path / "store"
    store.mkdir()
    common = ["--model", str(tiny_llama_dir), "--calib", f"c4:{data_dir}/c4-subset", "--calib-samples", "2",
              "--calib-seqlen", "16", "--eval", "none", "--store", str(store)]
    malformed = tmp_path / "malformed.csv"
    malformed.write_text(SMOKE.read_text().replace("0.55,", "0.5x,", 1))
    upward = tmp_path / "upward.csv"
    upward.write_text("iteration,dense,mid_2_4,topk,dense_to_2_4,mid_2_4_to_topk,epochs\n"
                      "1,0.5,0.5,0,0.5,0,0\n2,0.6,0.4,0,-0.1,0,0\n")
    (store / "locked").mkdir()  # a writer that is alive (this test's own process) holds run "locked"
    (store / "locked" / "LOCK").write_text(json.dumps({"owner": "someone", "pid": os.getpid(),
                                                       "host": socket.gethostname(), "since": "now"}))
    foreign = store / "someone-elses"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run")
    before = _snapshot(store)

    test_only = tmp_path / "wikitext-test-only"
    test_only.mkdir()
    (test_only / "wiki.test.raw").write_bytes((data_dir / "wikitext-2-raw" / "wiki.test.raw").read_bytes())
    cases = {
        "malformed": (["--plan", str(malformed), "--run", "a"], ("malformed.csv", "row", "dense")),
        "upward": (["--plan", str(upward), "--run", "a"], ("upward.csv", "iteration 2")),
        "missing data": (["--plan", str(SMOKE), "--run", "a", "--calib", f"c4:{tmp_path / 'nowhere'}"],
                         ("--calib", "nowhere", "does not exist")),
        "missing eval data": (["--plan", str(SMOKE), "--run", "a", "--eval", f"wikitext2:{tmp_path / 'nowhere'}"],
                              ("--eval", "nowhere", "does not exist")),
        "live lock": (["--plan", str(SMOKE), "--run", "locked"], ("locked by someone",)),
        "foreign folder": (["--plan", str(SMOKE), "--run", "someone-elses"], ("not a tierprune run",)),
        "bad resume": (["--plan", str(SMOKE), "--run", "a", "--resume-from", str(store / "ghost" / "iter-001")],
                       ("--resume-from",)),
        "missing plan": (["--plan", str(tmp_path / "none.csv"), "--run", "a"], ("none.csv",)),
        # Fine-tuning on the text the run is evaluated on (what the seed did with WikiText-2).
        "ft data overlaps eval": (["--plan", str(SMOKE), "--run", "a", "--eval", f"wikitext2:{data_dir}/wikitext-2-raw",
                                   "--ft-data", f"text:{data_dir}/wikitext-2-raw/wiki.test.raw"],
                                  ("fine-tuning data overlaps the evaluation text",)),
        "missing ft data": (["--plan", str(SMOKE), "--run", "a", "--ft-data", f"c4:{tmp_path / 'nowhere'}"],
                            ("--ft-data", "nowhere")),
        "bad ft method": (["--plan", str(SMOKE), "--run", "a", "--ft-method", "qlora"], ("method",)),
        # --export is checked before the run, not after it: the base model's own folder, a file.
        "export over the model": (["--plan", str(SMOKE), "--run", "a", "--export", str(tiny_llama_dir)],
                                  ("--export", "is the folder --model", "is loaded from")),
        "export to a file": (["--plan", str(SMOKE), "--run", "a", "--export", str(malformed)],
                             ("--export", "malformed.csv is a file")),
        "export field": (["--plan", str(SMOKE), "--run", "a", "--export", str(tmp_path / "models" / "{name}")],
                         ("--export", "unknown field(s) name; use {run}")),
        # Early stopping needs held-out text, and this WikiText folder holds only the test file.
        "patience without held-out": (["--plan", str(SMOKE), "--run", "a", "--eval", f"wikitext2:{test_only}",
                                       "--ft-patience", "2", "--ft-eval-every", "10"],
                                      ("--ft-patience", "wiki.valid.raw")),
    }
    import torch

    if not torch.cuda.is_available():
        cases["cuda without CUDA"] = (["--plan", str(SMOKE), "--run", "a", "--device", "cuda"], ("CUDA",))

    def timed(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
        began = time.perf_counter()
        return _run(common + args, tmp_path), time.perf_counter() - began

    # A few at a time: each case is a process that spends its seconds importing (CI time).
    with ThreadPoolExecutor(max_workers=3) as pool:
        outcomes = dict(zip(cases, pool.map(timed, (args for args, _ in cases.values()))))
    for name, (proc, seconds) in outcomes.items():
        # The later --store wins in click, so cases may point elsewhere.
        _assert_one_line_error(proc, *cases[name][1])
        # Before Prefect starts and before the model loads: seconds (imports, mostly), on a loaded CI machine too.
        assert seconds < 60, (name, seconds)
        assert "prefect" not in proc.stdout.lower(), (name, proc.stdout)
    assert _snapshot(store) == before  # nothing was written or changed
