"""Reading runs back: which runs a store holds, each run's finished iterations, and each step's health; and
pruning a finished run's old checkpoints."""
from __future__ import annotations

from contextlib import nullcontext

from tierprune.errors import TierpruneError
from tierprune.kernels.tiers import TIER_NAMES
from tierprune.storage.runstore import RunStore, StepStatus, run_names

from .recovery import recovery_pct

__all__ = ["in_tier_order", "split_run_uri", "list_runs", "run_summary", "in_progress", "summary_json", "verify_run",
           "finished_records", "prune_checkpoints"]


def in_tier_order(fractions: dict) -> dict:
    """Tier fractions as dense, 2:4, topk (a stored record's JSON has its keys sorted: 2:4 first)."""
    return {t: fractions[t] for t in TIER_NAMES if t in fractions}


def split_run_uri(uri: str) -> RunStore:
    """The run store of a run folder URI `STORE/RUN`."""
    root, _, run = uri.rstrip("/").rpartition("/")
    if not root or not run:
        raise TierpruneError(f"expected a run folder like STORE/RUN, got {uri!r}")
    return RunStore(root, run)


def _health(store: RunStore, rels: dict[str, str], deep: bool, pruned: dict) -> str:
    """"ok", or which of the named steps ({label: rel}) is not intact and why (deep: every file hashed; pruned:
    the steps `runs prune` or --keep-checkpoints deleted)."""
    problems, seen = [], set()
    for label, rel in rels.items():
        if rel in seen:
            continue  # iteration 0's tier map is its checkpoint's step: said once, under the first label
        seen.add(rel)
        if rel in pruned:
            problems.append(f"{label} pruned")  # deleted on purpose (runs prune, --keep-checkpoints)
            continue
        status = store.step_status(rel, deep)
        if status.status != "committed":
            problems.append(f"{label} {status.status}: {status.detail}")
    return "ok" if not problems else "; ".join(problems)


def run_summary(store: RunStore, deep: bool = True) -> list[dict]:
    """One row per finished iteration: iteration, status, tier fractions, sparsity, ppl, zero_shot, recovery, uri.

    status is "ok" only when the iteration's record, tier map, checkpoint and evaluation are all intact (every
    file hashed; without deep only markers, presence and sizes); otherwise it names what is damaged or missing,
    and the row stays listed.
    """
    if not store.exists():
        raise TierpruneError(f"no tierprune run at {store.uri}")
    rows, pruned = {}, store.pruned_steps()
    for rel, step in sorted(store.committed_steps().items()):
        folder, _, name = rel.partition("/")
        if not name.startswith("iteration-"):
            continue
        step_uri = f"{store.uri}/{rel}"
        finished = (step.get("meta") or {}).get("finished", "")
        row = {"iteration": int(folder.removeprefix("iter-")), "finished": finished, "status": "",
               "sparsity": None, "ppl": None, "ppl_before_finetune": None, "finetune_tokens": None, "tiers": None,
               "seconds": None, "uri": f"{store.uri}/{folder}", "record": step_uri, "zero_shot": None,
               "recovery": None}
        record_status = store.step_status(rel, deep)
        if record_status.status != "committed":
            row["status"] = f"record {record_status.status}: {record_status.detail}"
        else:
            record = store.read_object(step_uri, "iteration.json")
            row["iteration"] = record["iteration"]
            row["status"] = _health(store, {k: record[k]["rel"] for k in ("checkpoint", "tiers", "eval")}, deep,
                                    pruned)
            row["seconds"] = _seconds(store, record)
            try:
                evaluation = store.read_object(f"{store.uri}/{record['eval']['rel']}", "eval.json")
            except TierpruneError:
                evaluation = None  # damaged: the status says so
            if evaluation is not None:
                row.update(sparsity=evaluation["sparsity"], ppl=evaluation.get("ppl"),
                           tiers=in_tier_order(evaluation["tiers"]), zero_shot=evaluation.get("zero_shot"),
                           recovery=evaluation.get("recovery"))
            if row["iteration"] > 0:
                row.update(_finetune_summary(store, record, row["ppl"]))
        k = row["iteration"]
        if k not in rows or finished > rows[k]["finished"]:
            rows[k] = row
    dense = rows.get(0)
    for row in rows.values():
        if row["recovery"] is None and row["ppl"] is not None and dense is not None and dense["ppl"] is not None:
            # Evaluated before eval records carried recovery: the same numbers from this run's iteration 0.
            row["recovery"] = {**recovery_pct(row, dense), "dense": "iteration 0 of this run", "reason": None}
    return [rows[k] for k in sorted(rows)]


def in_progress(store: RunStore) -> dict | None:
    """The iteration after the last finished one, if any of its steps is committed: what a rerun resumes from.

    {"iteration", "steps": [step kinds committed, in the order the manifest has them], "finetune_step",
    "finetune_steps"} (the last committed training state's step and the iteration's total, or None).
    """
    by_iteration: dict[int, dict[str, dict]] = {}
    for rel, step in store.committed_steps().items():
        folder, _, name = rel.partition("/")
        if folder.startswith("iter-") and name:
            by_iteration.setdefault(int(folder.removeprefix("iter-")), {})[name] = step
    finished = [k for k, steps in by_iteration.items() if any(n.startswith("iteration-") for n in steps)]
    pending = sorted(k for k in by_iteration if k > max(finished, default=-1))
    if not pending:
        return None
    k = pending[0]
    kinds = list(dict.fromkeys(name.rsplit("-", 1)[0] for name in by_iteration[k]))
    states = [(step.get("meta") or {}) for name, step in by_iteration[k].items() if name.startswith("trainstate-")]
    last = max(states, key=lambda meta: meta.get("step", 0), default={})
    return {"iteration": k, "steps": kinds, "finetune_step": last.get("step"), "finetune_steps": last.get("of")}


def _finetune_summary(store: RunStore, record: dict, ppl: float | None) -> dict:
    """The iteration's ppl before fine-tuning and the tokens trained, from its finetune step's COMMIT.json."""
    meta = store.step_meta(f"{store.uri}/{record['checkpoint']['rel']}")
    tokens = meta.get("tokens", 0)
    # Without training the model evaluated after the step is the model before it.
    before = meta.get("ppl_before_finetune") if tokens else ppl
    return {"ppl_before_finetune": before, "finetune_tokens": tokens}


def _seconds(store: RunStore, record: dict) -> float:
    """What an iteration's steps took when they were computed (recorded in their COMMIT.json), not a rerun's time."""
    # Each step once: iteration 0's checkpoint and tier map are the same start step.
    rels = {value["rel"] for value in record.values() if isinstance(value, dict) and "rel" in value}
    return round(sum(float(store.step_meta(f"{store.uri}/{rel}").get("seconds", 0.0)) for rel in rels), 3)


def verify_run(store: RunStore) -> list[StepStatus]:
    """Every step of the run with its status (committed, damaged, missing), every file hashed."""
    if not store.exists():
        raise TierpruneError(f"no tierprune run at {store.uri}")
    return store.verify(deep=True)


def _quick_status(store: RunStore) -> str:
    # For a listing of many runs: markers, presence and sizes only (runs verify hashes every file).
    bad = [s for s in store.verify(deep=False) if s.status != "committed"]
    if not bad:
        status = "ok"
    elif bad[0].step == "manifest.json":
        status = f"manifest {bad[0].status}" + (f", {len(bad) - 1} step(s) not committed" if len(bad) > 1 else "")
    else:
        status = f"{len(bad)} step(s) not committed"
    lock = store.lock_state()
    return status if lock == "unlocked" else f"{status}, locked ({'stale' if lock == 'dead' else lock})"


def plan_last_iteration(store: RunStore) -> int | None:
    """The last iteration of the run's plan, or None when the manifest cannot be read (its status says why)."""
    try:
        plan = store.manifest().get("plan")
    except TierpruneError:
        return None
    return max(int(step["iteration"]) for step in plan) if plan else None


def plan_progress(last_finished: int | None, planned: int | None) -> str:
    """`runs list`'s plan column: "done", "3 of 5", or "" when the plan is unknown."""
    if planned is None:
        return ""
    if last_finished is not None and last_finished >= planned:
        return "done"
    return f"{0 if last_finished is None else last_finished} of {planned}"


def list_runs(root: str) -> list[dict]:
    """Every run folder directly under `root` (with a manifest or a RUN.json), its status and last iteration."""
    out = []
    for name in run_names(root):
        store = RunStore(root, name)
        row = {"run": name, "status": _quick_status(store), "iterations": None, "last iteration": None,
               "ppl": None, "sparsity": None}
        try:
            summary = run_summary(store, deep=False)  # hashing every checkpoint of every run is runs verify's job
        except TierpruneError:
            summary = []  # a garbled manifest: listed, its status says so
        else:
            row["iterations"] = len(summary)
        if summary:
            last = summary[-1]
            row.update({"last iteration": last["iteration"], "ppl": last["ppl"], "sparsity": last["sparsity"]})
        # A run killed between iterations has nothing unfinished to show; only its plan says it is not done.
        row["plan"] = plan_progress(row["last iteration"], plan_last_iteration(store))
        out.append(row)
    return out


def summary_json(store: RunStore) -> dict:
    """`runs show --json`: {"run", "in_progress", "iterations": [{"iteration", "ppl", "ppl_before_finetune",
    "finetune_tokens", "sparsity", "tiers", "seconds", ...}, ...]}.

    in_progress: the unfinished iteration a rerun resumes (see in_progress), or null. plan_last_iteration: the
    plan's last iteration (null if unreadable); done: whether that iteration is finished.

    recovery_pct is the ppl's recovery in % of dense (null with recovery.reason when unknown); zero_shot the
    accuracies when asked for (else null); recovery the eval record's whole entry, zero-shot tasks included.
    """
    pending = in_progress(store)  # first: listing the steps says why a store cannot be reached (credentials)
    rows = run_summary(store)
    planned = plan_last_iteration(store)
    return {"run": store.uri, "in_progress": pending, "plan_last_iteration": planned,
            "done": planned is not None and bool(rows) and rows[-1]["iteration"] >= planned, "iterations": [
        {"iteration": r["iteration"], "ppl": r["ppl"], "ppl_before_finetune": r["ppl_before_finetune"],
         "finetune_tokens": r["finetune_tokens"], "sparsity": r["sparsity"], "tiers": r["tiers"],
         "seconds": r["seconds"], "status": r["status"], "uri": r["uri"], "finished": r["finished"],
         "recovery_pct": (r["recovery"] or {}).get("ppl"), "zero_shot": r["zero_shot"], "recovery": r["recovery"]}
        for r in rows]}


def finished_records(store: RunStore) -> dict[int, dict]:
    """{iteration: its record}, the latest record of each finished iteration whose record is intact."""
    found: dict[int, tuple[str, dict]] = {}
    for rel, step in store.committed_steps().items():
        folder, _, name = rel.partition("/")
        if not name.startswith("iteration-") or store.load_step(f"{store.uri}/{rel}") is None:
            continue
        finished = (step.get("meta") or {}).get("finished", "")
        record = store.read_object(f"{store.uri}/{rel}", "iteration.json")
        k = int(record["iteration"])
        if k not in found or finished > found[k][0]:
            found[k] = (finished, record)
    return {k: record for k, (_, record) in sorted(found.items())}


def prune_checkpoints(store: RunStore, keep_last: int = 1, dry_run: bool = False, *, locked: bool = False) -> dict:
    """Delete the checkpoints of a run's finished iterations but the last `keep_last`, and the tensors (blobs)
    nothing else refers to. Records, tier maps, masks, scores and evaluations stay: `runs show` still lists every
    iteration; `runs export` and `--resume-from` take the kept ones; rerun, the run goes on from its last finished
    iteration (tasks.start.finished_start). locked: the caller holds the run's lock (the flow, --keep-checkpoints).

    Returns {"pruned": [iterations], "kept": [iterations], "steps": [rels], "blobs": files, "bytes": freed,
    "dry_run"}; with dry_run nothing is deleted and blobs/bytes are what the steps' deletion would free (blobs a
    crashed writer left, which a real prune also removes, not counted). Refuses a run with an iteration in progress.
    """
    if keep_last < 1:
        raise TierpruneError(f"--keep-last must be at least 1 (the iteration a new run resumes from), got {keep_last}")
    if not store.exists():
        raise TierpruneError(f"no tierprune run at {store.uri}")
    with (nullcontext() if dry_run or locked else store.lock(owner="tierprune runs prune")):
        records = finished_records(store)
        if not records:
            raise TierpruneError(f"run {store.uri} has no finished iteration: nothing to prune")
        pending = in_progress(store)
        if pending is not None:  # runs are pruned between iterations only: a crashed one is finished first
            raise TierpruneError(f"run {store.uri} has iteration {pending['iteration']} in progress; finish it by "
                                 "running the run's command again, then prune")
        kept = sorted(records)[-keep_last:]
        # Every step a kept iteration's record names stays (iteration 0's checkpoint and tier map are one step).
        keep = {value["rel"] for k in kept for value in records[k].values() if isinstance(value, dict)}
        committed = store.committed_steps()
        doomed = {}
        for k, record in records.items():
            rel = record["checkpoint"]["rel"]
            if k not in kept and rel not in keep and rel in committed:
                doomed[rel] = k
        for rel in committed:  # a resumed run's start step: the checkpoint it started from, copied in
            folder, _, name = rel.partition("/")
            k = int(folder.removeprefix("iter-"))
            if name.startswith("start-") and k < kept[0] and rel not in keep:
                doomed[rel] = k
        # Refused here, before anything is deleted, if some COMMIT.json is unreadable.
        still_referenced = store.referenced_blobs(excluding=set(doomed))
        step_bytes = sum(store.step_file_bytes(f"{store.uri}/{rel}") for rel in doomed)
        result = {"pruned": sorted(set(doomed.values())), "kept": kept, "steps": sorted(doomed), "dry_run": dry_run}
        if dry_run:
            freed = {sha: size for rel in doomed for sha, size in store.step_blobs(f"{store.uri}/{rel}").items()
                     if sha not in still_referenced}
            return {**result, "blobs": len(freed), "bytes": step_bytes + sum(freed.values())}
        if doomed:
            # First: a run with PRUNED.json is resumed from its last finished iteration, so a prune killed part-way
            # never has a rerun walk (and fine-tune again) the iterations whose checkpoints it was deleting.
            store.mark_pruned(list(doomed), kept)
            for rel in doomed:
                store.drop_step(f"{store.uri}/{rel}")
        removed, freed = store.remove_unreferenced_blobs()  # also what an earlier, interrupted prune left
        return {**result, "blobs": removed, "bytes": step_bytes + freed}
