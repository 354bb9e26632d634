"""`tierprune prune --zero-shot`, run as a subprocess: the accuracies in --json, bad task names in one line."""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.test_cli import _cli_env, checkpoints  # noqa: F401  (the module fixture of tiny checkpoints)


ZEROSHOT_DIR = Path(__file__).parent / "data" / "zeroshot"
TASK = "tierprune_easy_facts"


@pytest.fixture(scope="module")
def runs(data_dir: Path, checkpoints: dict[str, Path]) -> dict[str, subprocess.CompletedProcess]:  # noqa: F811
    root, llama = checkpoints["root"], str(checkpoints["llama"])
    quick = ["--model", llama, "--calib", f"c4:{data_dir / 'c4-subset'}", "--calib-samples", "2",
             "--calib-seqlen", "16", "--eval", "none"]
    cases = {
        "unknown_task": [*quick, "--zero-shot", "tierprune_easy_fact", "--zero-shot-include", str(ZEROSHOT_DIR)],
        "limit_without_tasks": [*quick, "--zero-shot-limit", "3"],
        "offline_builtin_task": [*quick, "--zero-shot", "boolq", "--zero-shot-limit", "3"],  # _cli_env: offline
        "pruned": [*quick, "--pattern", "2:4", "--zero-shot", TASK, "--zero-shot-limit", "5",
                   "--zero-shot-include", str(ZEROSHOT_DIR), "--json", str(root / "zs.json")],
    }
    env = _cli_env(root)

    def run(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tierprune.cli", "prune", *args], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run, args) for name, args in cases.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("case,message", [
    ("unknown_task", "unknown zero-shot task(s): tierprune_easy_fact (did you mean tierprune_easy_facts?)"),
    ("limit_without_tasks", "need --zero-shot TASKS"),
    ("offline_builtin_task", "zero-shot tasks boolq: the Hugging Face hub is unreachable (offline)"),
])
def test_bad_zero_shot_input_is_one_line_and_exit_2(runs, case: str, message: str) -> None:
    proc = runs[case]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert message in lines[0]


def test_prune_json_has_the_zero_shot_accuracies_of_the_pruned_model(runs, checkpoints) -> None:  # noqa: F811
    from tierprune.models import load_model
    from tierprune.tasks.oneshot import run_oneshot

    proc = runs["pruned"]
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "pretrained" not in proc.stderr  # lm-eval's warnings kept quiet
    record = json.loads((checkpoints["root"] / "zs.json").read_text())
    result = record["zero_shot"]
    assert result["limit"] == 5 and result["tasks"][TASK]["samples"] == 5
    assert 0.0 <= result["tasks"][TASK]["acc"] <= 1.0 and result["mean_acc"] == result["tasks"][TASK]["acc"]
    assert record["settings"]["eval"]["zero_shot"] == [TASK]
    assert f"zero-shot {TASK}" in proc.stdout and "zero-shot mean acc" in proc.stdout
    # The same prune in-process, scored on the pruned model (not the dense one): the same accuracies.
    from tierprune.config import config_from_flags

    settings = record["settings"]
    cfg = config_from_flags(model=str(checkpoints["llama"]), calib=settings["calibration"]["data"], calib_samples=2,
                            calib_seqlen=16, eval="none", pattern="2:4", zero_shot=TASK, zero_shot_limit=5,
                            zero_shot_include=str(ZEROSHOT_DIR))
    loaded = load_model(str(checkpoints["llama"]))
    again = run_oneshot(cfg, loaded=loaded)
    assert again["zero_shot"]["tasks"] == result["tasks"]
    assert again["sparsity"] == pytest.approx(0.5, abs=0.01)
