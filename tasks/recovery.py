"""Recovery in % of dense: how much of the dense model's quality an iteration keeps.

ppl: dense_ppl / ppl × 100; each zero-shot task: acc / dense_acc × 100 (and acc_norm alike). The dense
numbers are iteration 0's evaluation of the same run; a run resumed from another run's iteration has none
of its own, so it takes the dense evaluation of the run it started from (followed back through resumed
runs) when that run evaluated with the same model and evaluation settings, and records null with the
reason otherwise.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from tierprune.errors import TierpruneError
from tierprune.storage.runstore import RunStore

if TYPE_CHECKING:
    from .run_state import RunState

__all__ = ["recovery_pct", "iteration_eval", "dense_eval", "recovery_of"]


def _pct(value: float | None, dense: float | None, *, lower_is_better: bool = False) -> float | None:
    if value is None or dense is None or value <= 0 or dense <= 0:
        return None  # no number, or a ratio of nothing (an accuracy of 0): not a percentage
    return 100.0 * (dense / value if lower_is_better else value / dense)


def recovery_pct(record: dict, dense: dict) -> dict:
    """{"ppl", "zero_shot": {task: {"acc", "acc_norm"}}, "zero_shot_mean_acc"} in % of the dense eval record."""
    out: dict = {"ppl": _pct(record.get("ppl"), dense.get("ppl"), lower_is_better=True),
                 "zero_shot": None, "zero_shot_mean_acc": None}
    mine, base = record.get("zero_shot"), dense.get("zero_shot")
    if mine and base:
        tasks = {}
        for name, result in mine["tasks"].items():
            reference = base["tasks"].get(name)
            if reference is None:
                continue
            tasks[name] = {metric: _pct(result[metric], reference.get(metric))
                           for metric in ("acc", "acc_norm") if metric in result}
        out["zero_shot"] = tasks
        if set(mine["tasks"]) == set(base["tasks"]):
            out["zero_shot_mean_acc"] = _pct(mine["mean_acc"], base["mean_acc"])
    return out


def iteration_eval(store: RunStore, iteration: int) -> tuple[dict, str] | None:
    """(eval record, eval step URI) of a finished iteration of a run (its latest record); None if there is none."""
    prefix = f"iter-{iteration:03d}/iteration-"
    done = [(rel, step) for rel, step in store.committed_steps().items() if rel.startswith(prefix)]
    if not done:
        return None
    rel, _ = max(done, key=lambda item: (item[1].get("meta") or {}).get("finished", ""))
    try:
        record = store.read_object(f"{store.uri}/{rel}", "iteration.json")
        uri = f"{store.uri}/{record['eval']['rel']}"
        return store.read_object(uri, "eval.json"), uri
    except (TierpruneError, KeyError):
        return None  # a damaged record or evaluation: runs verify reports it; here there is just no number


def _source_run(resume_from: str) -> RunStore:
    # resume_from is an iteration folder STORE/RUN/iter-00K.
    run_uri = resume_from.rstrip("/").rpartition("/")[0]
    root, _, name = run_uri.rpartition("/")
    return RunStore(root, name)


def dense_eval(state: RunState) -> tuple[dict, str] | str:
    """(iteration 0's eval record, its URI) comparable with this run's evaluations, or why there is none."""
    identity = state.identity
    if not state.cfg.run.resume_from:
        found = iteration_eval(state.store, 0)
        return found if found is not None else f"iteration 0 of {state.store.uri} has no committed evaluation"
    resume_from, seen = state.cfg.run.resume_from, set()
    while resume_from and resume_from not in seen:
        seen.add(resume_from)
        source = _source_run(resume_from)
        if not source.exists():
            return f"the run {source.uri} that this run resumed from is gone"
        manifest = source.manifest()
        theirs = manifest.get("identity") or {}
        if (theirs.get("model"), theirs.get("eval")) != (identity["model"], identity["eval"]):
            return f"{source.uri} (resumed from) evaluated another model or with other evaluation settings"
        found = iteration_eval(source, 0)
        if found is not None:
            return found
        resume_from = ((manifest.get("config") or {}).get("run") or {}).get("resume_from")
    return "no run this run descends from (through --resume-from) evaluated the dense model"


def recovery_of(state: RunState, iteration: int, record: dict) -> dict:
    """The `recovery` entry of an eval record: % of dense, where the dense numbers came from, or why null."""
    if iteration == 0 and not state.cfg.run.resume_from:
        dense, source = record, "itself (iteration 0 is the dense model)"
    else:
        found = dense_eval(state)
        if isinstance(found, str):
            return {"ppl": None, "zero_shot": None, "zero_shot_mean_acc": None, "dense": None, "reason": found}
        dense, source = found
        if source.startswith(f"{state.store.uri}/"):
            source = source[len(state.store.uri) + 1:]  # this run's own step: relative, so a moved store stays valid
    return {**recovery_pct(record, dense), "dense": source, "reason": None}
