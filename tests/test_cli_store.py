"""`tierprune run` as a user drives it: a new store folder, `runs show --json`, `runs export` into plain
transformers (weights that obey the tier map, perplexity recomputed independently), reruns under other
spellings of the same paths, a copied store, a changed setting, and resuming from the last iteration."""
from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import prefect_home

pytestmark = pytest.mark.slow

PLAN = "iteration,dense,mid_2_4,topk,dense_to_2_4,mid_2_4_to_topk,epochs\n1,0.6,0.3,0.1,0.4,0.1,0\n2,0.35,0.45,0.2,0.25,0.1,0\n"
EVAL_SEQLEN, EVAL_WINDOWS, TOPK = 64, 6, 10


def _cli(args: list[str], cwd: Path, home: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERPRUNE_", "PREFECT_"))}
    env.update(COLUMNS="200", NO_COLOR="1", HF_HUB_OFFLINE="1", PREFECT_HOME=prefect_home(home),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", TIERPRUNE_CACHE=str(home / "cache"))
    return subprocess.run([sys.executable, "-m", "tierprune.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def _markers(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.glob("iter-*/*/COMMIT.json"))}


def _ppl_independently(model_dir: Path, wikitext_test: Path) -> float:
    """WikiText-2 test perplexity by the protocol, with transformers and torch only (no tierprune)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    raw = wikitext_test.read_text()
    rows = [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]
    ids = tokenizer("\n\n".join(rows), return_tensors="pt").input_ids[0]
    losses = []
    with torch.no_grad():
        for w in range(EVAL_WINDOWS):
            x = ids[w * EVAL_SEQLEN:(w + 1) * EVAL_SEQLEN][None]
            logits = model(x).logits.float()
            losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:]).item())
    return math.exp(sum(losses) / len(losses))


def _check_obeys_tier_maps(model_dir: Path, tiers: pd.DataFrame, block: int = 16) -> int:
    """Every 2:4 block has at most 2 non-zeros per group of 4 along the input dim, every TopK block at most k."""
    from safetensors.numpy import load_file

    weights = load_file(model_dir / "model.safetensors")
    checked = 0
    for module, t in tiers.groupby("module"):
        W = weights[f"{module}.weight"]  # (out, in) for LLaMA's nn.Linear
        for r, c, tier in zip(t.block_row, t.block_col, t.tier):
            blk = W[r * block:(r + 1) * block, c * block:(c + 1) * block] != 0
            if tier == 1:
                assert (blk.reshape(blk.shape[0], -1, 4).sum(-1) <= 2).all(), (module, r, c)
            elif tier == 2:
                assert blk.sum() <= TOPK, (module, r, c)
            checked += int(tier != 0)
    return checked


def test_new_store_show_export_and_every_spelling_resumes(tmp_path: Path, tiny_llama_dir: Path, data_dir: Path):
    home, a, b = tmp_path / "home", tmp_path / "a", tmp_path / "b"
    for d in (home, a, b):
        d.mkdir()
    (a / "plan.csv").write_text(PLAN)
    wikitext = data_dir / "wikitext-2-raw"
    common = ["--calib-samples", "4", "--calib-seqlen", "32", "--eval-seqlen", str(EVAL_SEQLEN),
              "--eval-max-windows", str(EVAL_WINDOWS), "--topk", str(TOPK)]

    def args(store: str, run_name: str = "r", *extra: str, plan: str = "plan.csv") -> list[str]:
        return ["run", "--plan", plan, "--store", store, "--run", run_name, "--model", str(tiny_llama_dir),
                "--calib", f"c4:{data_dir}/c4-subset", "--eval", f"wikitext2:{wikitext}", *common, *extra]

    proc = _cli(args("new/store"), a, home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = a / "new" / "store" / "r"
    assert (run / "manifest.json").is_file(), "the store folder did not exist and is created"
    assert f"tierprune runs export {run}" in proc.stdout  # what to do next, with the absolute location
    before = _markers(run)

    # runs show --json
    shown = _cli(["runs", "show", str(run), "--json"], a, home)
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["run"] == str(run)
    assert [it["iteration"] for it in summary["iterations"]] == [0, 1, 2]
    for it in summary["iterations"]:
        assert set(it) >= {"iteration", "ppl", "sparsity", "tiers", "seconds"}
        assert set(it["tiers"]) == {"dense", "2:4", "topk"} and it["seconds"] > 0
    last = summary["iterations"][-1]
    assert last["tiers"]["topk"] == pytest.approx(0.2, abs=0.05) and last["sparsity"] > 0.3

    # runs export: plain transformers loads it; the weights obey the tier map; the ppl is the reported one.
    out = tmp_path / "exported"
    exported = _cli(["runs", "export", str(run), "--output", str(out)], a, home)
    assert exported.returncode == 0, exported.stderr
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("hello").input_ids
    tiers = pd.read_parquet(out / "tier_maps.parquet")
    assert list(tiers.columns) == ["module", "layer", "block_row", "block_col", "tier", "iteration_demoted", "score"]
    assert tiers["tier"].dtype == np.int8 and tiers["iteration_demoted"].dtype == np.int16
    assert _check_obeys_tier_maps(out, tiers) > 0
    assert (out / "masks.safetensors").is_file()
    mode = {name: stat.S_IMODE((out / name).stat().st_mode) for name in ("model.safetensors", "config.json")}
    assert mode["model.safetensors"] == mode["config.json"], mode  # safetensors alone would write 0600
    # An --output that cannot be a folder: one line, exit 2, before any work, and no folder left behind.
    (tmp_path / "a-file").write_text("")
    refused = _cli(["runs", "export", str(run), "--output", str(tmp_path / "a-file" / "deep" / "out")], a, home)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "--output" in refused.stderr and "cannot be written" in refused.stderr
    ppl = _ppl_independently(out, wikitext / "wiki.test.raw")
    assert ppl == pytest.approx(last["ppl"], rel=0.005), (ppl, last["ppl"])

    # The same run under other spellings: absolute paths with a trailing slash, from another directory,
    # model and data spelled relative to it. Everything is found committed; nothing is rewritten.
    rel = os.path.relpath
    again = ["run", "--plan", str(a / "plan.csv"), "--store", f"{a / 'new' / 'store'}/", "--run", "r",
             "--model", rel(tiny_llama_dir, b), "--calib", f"c4:{rel(data_dir, b)}/c4-subset",
             "--eval", f"wikitext2:{rel(wikitext, b)}/", *common]
    # A copied store resumes too (the run does not remember where it was). Both reruns side by side (CI
    # time): different stores, and each its own Prefect home (database).
    shutil.copytree(a / "new", b / "copy")
    other_home = tmp_path / "home-copy"
    other_home.mkdir()
    with ThreadPoolExecutor(max_workers=2) as pool:
        copied = pool.submit(_cli, args("copy/store", plan=str(a / "plan.csv")), b, other_home)
        proc = _cli(again, b, home)
        copied = copied.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _markers(run) == before
    assert copied.returncode == 0, copied.stderr[-3000:]
    assert _markers(b / "copy" / "store" / "r") == before

    # A changed setting is another run: refused in one line that names what differs; nothing written.
    proc = _cli(args("new/store", "r", "--topk", "12"), a, home)  # the later --topk wins
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "prune.topk (10 -> 12)" in proc.stderr
    assert _markers(run) == before

    # Resuming from the plan's last iteration: nothing to do, nothing written.
    proc = _cli(args("new/store", "r2", "--resume-from", str(run / "iter-002")), a, home)
    assert proc.returncode == 0 and "nothing to do" in proc.stdout, proc.stdout + proc.stderr
    assert not (a / "new" / "store" / "r2").exists()

    # Pruning the finished run: the checkpoints of iterations 0-1 go, iteration 2's stays, show still lists all,
    # and its command run again goes on after iteration 2 (the plan's last): nothing is trained again or written.
    proc = _cli(["runs", "prune", str(run), "--dry-run"], a, home)
    assert proc.returncode == 0 and "would delete the checkpoints of iterations 0, 1 of" in proc.stdout, proc.stdout
    assert _markers(run) == before
    proc = _cli(["runs", "prune", str(run)], a, home)
    assert proc.returncode == 0, proc.stderr
    assert "deleted the checkpoints of iterations 0, 1" in proc.stdout and "kept: iterations 2" in proc.stdout
    shown = _cli(["runs", "show", str(run), "--json"], a, home)
    statuses = [r["status"] for r in json.loads(shown.stdout)["iterations"]]
    assert "checkpoint pruned" in statuses[1] and statuses[-1] == "ok", statuses
    pruned = _markers(run)
    proc = _cli(args("new/store"), a, home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _markers(run) == pruned
