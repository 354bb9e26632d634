"""Zero-shot accuracy and recovery in % of dense through the progressive flow, the store and `runs show`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tierprune.config import TierpruneConfig, config_from_flags
from tierprune.storage.runstore import RunStore

pytestmark = pytest.mark.slow

PLAN = str(Path(__file__).parents[2] / "schedules" / "plans" / "smoke.csv")
ZEROSHOT_DIR = str(Path(__file__).parents[1] / "data" / "zeroshot")
TASK = "tierprune_easy_facts"


def _config(tiny_llama_dir: Path, data_dir: Path, store: str, run: str, **extra) -> TierpruneConfig:
    # No fine-tuning: what is tested here is the evaluation, and training would only make the test slower.
    settings = {"eval_max_windows": 2, "zero_shot": TASK, "zero_shot_limit": 8, "zero_shot_include": ZEROSHOT_DIR,
                "ft_method": "none", **extra}
    return config_from_flags(model=str(tiny_llama_dir), calib=f"c4:{data_dir}/c4-subset", calib_samples=4,
                             calib_seqlen=32, calib_batch_size=2, eval=f"wikitext2:{data_dir}/wikitext-2-raw",
                             eval_seqlen=32, plan=PLAN, store=store, run=run, **settings)


def _evals(store: RunStore) -> dict[int, dict]:
    """Each finished iteration's eval record, as committed."""
    out = {}
    for rel in store.committed_steps():
        if "/iteration-" in rel:
            record = store.read_object(f"{store.uri}/{rel}", "iteration.json")
            out[record["iteration"]] = store.read_object(f"{store.uri}/{record['eval']['rel']}", "eval.json")
    return out


def test_every_iteration_records_zero_shot_and_recovery_of_dense(prefect_harness, tiny_llama_dir, data_dir,
                                                                 mem_root):
    from typer.testing import CliRunner

    from tierprune.cli import app
    from tierprune.flows.progressive import progressive_from_config as progressive
    from tierprune.tasks.runs import summary_json

    rows = progressive(_config(tiny_llama_dir, data_dir, mem_root, "r"))
    store = RunStore(mem_root, "r")
    evals = _evals(store)
    assert sorted(evals) == [0, 1, 2, 3]
    dense = evals[0]
    assert dense["recovery"]["ppl"] == pytest.approx(100.0) and dense["recovery"]["reason"] is None
    for k, record in evals.items():
        result = record["zero_shot"]
        assert result["limit"] == 8 and result["tasks"][TASK]["samples"] == 8
        assert set(result["tasks"][TASK]) == {"acc", "acc_norm", "samples"}
        recovery = record["recovery"]
        assert recovery["ppl"] == pytest.approx(100 * dense["ppl"] / record["ppl"], rel=1e-12)
        if k:
            assert recovery["dense"].startswith("iter-000/eval-")  # this run's own dense eval, relative
            assert record["ppl"] != dense["ppl"]  # pruned: a real ratio, not 100 by construction
        dense_acc, acc = dense["zero_shot"]["tasks"][TASK]["acc"], result["tasks"][TASK]["acc"]
        expected = None if not (acc and dense_acc) else 100 * acc / dense_acc
        assert recovery["zero_shot"][TASK]["acc"] == pytest.approx(expected)
        assert recovery["zero_shot_mean_acc"] == pytest.approx(expected)
    assert [r["recovery %"] for r in rows] == [round(e["recovery"]["ppl"], 1) for e in evals.values()]

    # runs show --json: the old fields as they were, plus recovery_pct, zero_shot and recovery.
    summary = summary_json(store)
    for it in summary["iterations"]:
        record = evals[it["iteration"]]
        assert {"iteration", "ppl", "sparsity", "tiers", "seconds", "status", "uri", "finished"} <= set(it)
        assert it["ppl"] == record["ppl"] and it["status"] == "ok"
        assert it["recovery_pct"] == record["recovery"]["ppl"]
        assert it["zero_shot"] == record["zero_shot"] and it["recovery"] == record["recovery"]
    shown = CliRunner().invoke(app, ["runs", "show", store.uri], env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    assert "recovery %" in shown.output and "zero-shot acc" in shown.output
    # The tier columns in the tiers' own order, not that of the stored JSON's sorted keys (2:4 first).
    header = next(line for line in shown.output.splitlines() if "tier dense" in line)
    assert header.index("tier dense") < header.index("tier 2:4") < header.index("tier topk")
    assert summary["plan_last_iteration"] == 3 and summary["done"] is True
    assert "the plan runs to" not in shown.output

    # Killed between iterations 2 and 3: nothing of iteration 3 is committed, so only the plan says it is not done.
    store._fs.rm(f"{store._path}/iter-003", recursive=True)
    store.repair()
    summary = summary_json(store)
    assert summary["in_progress"] is None and summary["done"] is False and summary["plan_last_iteration"] == 3
    shown = CliRunner().invoke(app, ["runs", "show", store.uri], env={"COLUMNS": "250"})
    assert ("the plan runs to iteration 3, and iteration 2 is the last that finished; rerun the run's command to "
            "resume") in " ".join(shown.output.split()), shown.output
    listed = CliRunner().invoke(app, ["runs", "list", mem_root], env={"COLUMNS": "250"})
    assert listed.exit_code == 0 and "2 of 3" in listed.output, listed.output
    assert f"{summary['iterations'][-1]['recovery_pct']:.4g}" in shown.output
    as_json = CliRunner().invoke(app, ["runs", "show", store.uri, "--json"])
    assert json.loads(as_json.output) == json.loads(json.dumps(summary))


def test_resumed_run_takes_dense_numbers_from_its_source_or_says_why_not(prefect_harness, tiny_llama_dir,
                                                                         data_dir, mem_root):
    from tierprune.flows.progressive import progressive_from_config as progressive

    progressive(_config(tiny_llama_dir, data_dir, mem_root, "original"))
    original = RunStore(mem_root, "original")
    dense = _evals(original)[0]
    progressive(_config(tiny_llama_dir, data_dir, mem_root, "resumed", resume_from=f"{original.uri}/iter-001"))
    resumed = _evals(RunStore(mem_root, "resumed"))
    assert sorted(resumed) == [2, 3]
    for k, record in resumed.items():
        assert record["recovery"]["dense"].startswith(f"{original.uri}/iter-000/eval-")
        assert record["recovery"]["ppl"] == pytest.approx(100 * dense["ppl"] / record["ppl"], rel=1e-12)
        assert record["recovery"] == _evals(original)[k]["recovery"] | {"dense": record["recovery"]["dense"]}
    # A resumed run of a resumed run follows the chain back to the dense evaluation.
    progressive(_config(tiny_llama_dir, data_dir, mem_root, "again", resume_from=f"{mem_root}/resumed/iter-002"))
    assert _evals(RunStore(mem_root, "again"))[3]["recovery"] == resumed[3]["recovery"]

    # Other evaluation settings than the source's: not comparable, so null with the reason.
    progressive(_config(tiny_llama_dir, data_dir, mem_root, "other", eval_max_windows=1,
                        resume_from=f"{original.uri}/iter-002"))
    record = _evals(RunStore(mem_root, "other"))[3]
    assert record["recovery"]["ppl"] is None and record["recovery"]["zero_shot"] is None
    assert "other evaluation settings" in record["recovery"]["reason"]
