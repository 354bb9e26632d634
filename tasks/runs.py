"""Reading runs back: which runs a store holds, and each run's finished iterations."""
from __future__ import annotations

from tierprune.errors import TierpruneError
from tierprune.storage.runstore import RunStore, run_names

__all__ = ["split_run_uri", "list_runs", "run_summary", "summary_json"]


def split_run_uri(uri: str) -> RunStore:
    """The run store of a run folder URI `STORE/RUN`."""
    root, _, run = uri.rstrip("/").rpartition("/")
    if not root or not run:
        raise TierpruneError(f"expected a run folder like STORE/RUN, got {uri!r}")
    return RunStore(root, run)


def run_summary(store: RunStore) -> list[dict]:
    """One row per finished iteration: iteration, tier fractions, sparsity, ppl."""
    if not store.exists():
        raise TierpruneError(f"no tierprune run at {store.uri}")
    rows = {}
    for rel, step in sorted(store.committed_steps().items()):
        folder, _, name = rel.partition("/")
        if not name.startswith("iteration-"):
            continue
        step_uri = f"{store.uri}/{rel}"
        if store.load_step(step_uri) is None:
            continue  # damaged: not a valid starting point, not listed
        record = store.read_object(step_uri, "iteration.json")
        eval_uri = f"{store.uri}/{record['eval']['rel']}"
        evaluation = store.read_object(eval_uri, "eval.json")
        finished = (step.get("meta") or {}).get("finished", "")
        k = record["iteration"]
        if k not in rows or finished > rows[k]["finished"]:
            rows[k] = {"iteration": k, "finished": finished, "uri": f"{store.uri}/{folder}",
                       "sparsity": evaluation["sparsity"], "ppl": evaluation.get("ppl"),
                       "tiers": dict(evaluation["tiers"]), "seconds": _seconds(store, record),
                       "record": f"{store.uri}/{rel}"}
    return [rows[k] for k in sorted(rows)]


def _seconds(store: RunStore, record: dict) -> float:
    """What an iteration's steps took when they were computed (recorded in their COMMIT.json), not a rerun's time."""
    total = 0.0
    for key, value in record.items():
        if isinstance(value, dict) and "rel" in value:
            total += float(store.step_meta(f"{store.uri}/{value['rel']}").get("seconds", 0.0))
    return round(total, 3)


def list_runs(root: str) -> list[dict]:
    """Every run folder directly under `root`, with its last finished iteration."""
    out = []
    for name in run_names(root):
        try:
            summary = run_summary(RunStore(root, name))
        except TierpruneError:
            continue  # a garbled manifest: not listed as a run
        last = summary[-1] if summary else {}
        out.append({"run": name, "iterations": len(summary), "last iteration": last.get("iteration"),
                    "ppl": last.get("ppl"), "sparsity": last.get("sparsity")})
    return out


def summary_json(store: RunStore) -> dict:
    """`runs show --json`: {"run", "iterations": [{"iteration", "ppl", "sparsity", "tiers", "seconds"}, ...]}."""
    return {"run": store.uri, "iterations": [
        {"iteration": r["iteration"], "ppl": r["ppl"], "sparsity": r["sparsity"], "tiers": r["tiers"],
         "seconds": r["seconds"], "uri": r["uri"], "finished": r["finished"]} for r in run_summary(store)]}
