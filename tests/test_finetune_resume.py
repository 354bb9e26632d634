"""A run killed (SIGKILL) during fine-tuning resumes from the last committed training step, not from the start,
and ends with exactly the weights of a run that never stopped."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import prefect_home

pytestmark = pytest.mark.slow

# One iteration with one epoch of 384 tokens: 12 windows of 32, batch 2 → 6 optimizer steps, a state every 2.
PLAN = "iteration,dense,mid_2_4,topk,dense_to_2_4,mid_2_4_to_topk,epochs\n1,0.6,0.3,0.1,0.4,0.1,1\n"


def _cli(args: list[str], cwd: Path, crash_at: str | None = None,
         home: str = ".prefect") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERPRUNE_", "PREFECT_"))}
    env.update(COLUMNS="200", NO_COLOR="1", HF_HUB_OFFLINE="1", PREFECT_HOME=prefect_home(cwd / home),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    if crash_at:
        env["TIERPRUNE_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "tierprune.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=400)


def _finetune_step(run: Path) -> tuple[dict, dict]:
    """(COMMIT.json meta, checkpoint index tensors) of iteration 1's finetune step."""
    [folder] = [p.parent for p in run.glob("iter-001/checkpoint-*/COMMIT.json")]
    marker = json.loads((folder / "COMMIT.json").read_text())
    return marker["meta"], json.loads((folder / "checkpoint.json").read_text())["tensors"]


@pytest.mark.parametrize("fade", [None, "1"], ids=["removed-at-once", "fading"])
def test_sigkill_mid_finetune_resumes_from_the_last_committed_step(tmp_path, tiny_llama_dir, data_dir, fade):
    """With --ft-fade 1 the kill at step 4 of 6 falls in the middle of the fade (the demoted weights at 1/3)."""
    (tmp_path / "plan.csv").write_text(PLAN)

    def args(store: str) -> list[str]:
        return ["run", "--plan", "plan.csv", "--store", store, "--run", "r", "--model", str(tiny_llama_dir),
                "--calib", f"c4:{data_dir}/c4-subset", "--calib-samples", "4", "--calib-seqlen", "32",
                "--eval", f"wikitext2:{data_dir}/wikitext-2-raw", "--eval-seqlen", "32", "--eval-max-windows", "2",
                "--ft-method", "full", "--kd-weight", "0.5", "--ft-tokens", "384", "--ft-seqlen", "32",
                "--ft-batch-size", "2", "--ft-lr", "1e-3", "--ft-commit-every", "2",
                *(["--ft-fade", fade] if fade else [])]

    # The reference and the run to kill side by side (CI time), each with its own Prefect home (database).
    with ThreadPoolExecutor(max_workers=2) as pool:
        reference_run = pool.submit(_cli, args("reference"), tmp_path, None, ".prefect-reference")
        killed = _cli(args("killed"), tmp_path, crash_at="step:iter-001/finetune:state-4")
        reference = reference_run.result()
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / "killed" / "r"
    states = sorted(p.parent.name for p in run.glob("iter-001/trainstate-*/COMMIT.json"))
    assert len(states) == 1 and states[0].endswith("000004"), states  # only the newest state is kept
    assert not list(run.glob("iter-001/checkpoint-*/COMMIT.json"))

    resumed = _cli(args("killed"), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    meta, tensors = _finetune_step(run)
    ref_meta, ref_tensors = _finetune_step(tmp_path / "reference" / "r")
    assert meta["resumed_from_step"] == 4 and ref_meta["resumed_from_step"] is None
    assert meta["steps"] == ref_meta["steps"] == 6
    assert meta.get("fade_fraction") == ref_meta.get("fade_fraction") == (float(fade) if fade else None)
    # Bit-identical weights (same sha256 per tensor), the same ppl before fine-tuning and the same loss curve.
    assert tensors == ref_tensors
    assert meta["ppl_before_finetune"] == ref_meta["ppl_before_finetune"]
    assert meta["last_loss"] == ref_meta["last_loss"]
    # Training states are scratch: gone once the checkpoint is committed, and the run verifies clean.
    assert not list(run.glob("iter-001/trainstate-*"))
    verify = _cli(["runs", "verify", str(run)], tmp_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr
