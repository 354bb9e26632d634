"""Where a progressive run starts: the dense model (iteration 0), a finished iteration of any run, or, for a run
whose older checkpoints were deleted, its own last finished iteration.

A start step commits a full checkpoint (every tensor of the model, as content-addressed blobs) and a
tier table; a start copied from another run also brings that iteration's keep masks. Later steps
refer to it as both their checkpoint and their tier map.
"""
from __future__ import annotations

from prefect import task

from tierprune.errors import TierpruneError
from tierprune.storage.checkpoints import checkpoint_blobs

from .demote import initial_tiers
from .refs import ArtifactRef, committed_or_compute, store_cache_policy
from .report import report_row
from .run_state import RunState, check_resume_shapes, find_iteration, model_tensors
from .runs import finished_records
from .score_blocks import FISHER_FILE

__all__ = ["dense_start", "dense_start_task", "resume_start_task", "finished_start", "finished_start_task"]


def dense_start(state: RunState) -> tuple[dict, dict[str, int]]:
    """(files, blobs) of iteration 0: the model as loaded, every block Dense, no masks (all weights kept)."""
    loaded = state.base_model()
    index, blobs = state.save_checkpoint(changed=set(model_tensors(loaded.model)))
    return {"checkpoint.json": index, "tiers.parquet": initial_tiers(loaded.model, state.cfg.prune.block_size)}, blobs


def _start_material(p: dict) -> dict:
    state: RunState = p["state"]
    return {"model": state.identity["model"], "block_size": state.cfg.prune.block_size}


@task(name="dense-start", persist_result=True, cache_policy=store_cache_policy("start", _start_material))
def dense_start_task(state: RunState, iteration: int = 0) -> ArtifactRef:
    """Iteration 0: the dense checkpoint (the model's full state) and the all-Dense tier map."""
    return committed_or_compute(state.store, iteration, "start", _start_material({"state": state}),
                                lambda: dense_start(state), {"source": "dense"})


@task(name="resume-start", persist_result=True)
def resume_start_task(state: RunState) -> tuple[int, ArtifactRef]:
    """Start from a finished iteration of any run: its checkpoint, tier map and masks, copied into this run."""
    source, iteration, ckpt_ref, tiers_ref = find_iteration(state.cfg.run.resume_from)
    tiers_bytes = source.read(tiers_ref.uri, "tiers.parquet")
    check_resume_shapes(state.cfg, source.read_object(tiers_ref.uri, "tiers.parquet"))

    def compute() -> tuple[dict, dict[str, int]]:
        index = source.read_object(ckpt_ref.uri, "checkpoint.json")
        for digest in checkpoint_blobs(index):  # copied, so this run stays valid if the source goes away
            state.store.put_blob(source.read_blob(digest), digest)
        files = {"checkpoint.json": index, "tiers.parquet": tiers_bytes}
        if "masks.safetensors" in tiers_ref.files:
            files["masks.safetensors"] = source.read(tiers_ref.uri, "masks.safetensors")
        if FISHER_FILE in ckpt_ref.files:  # a --saliency fisher run ranks the next iteration by it
            files[FISHER_FILE] = source.read(ckpt_ref.uri, FISHER_FILE)
        return files, checkpoint_blobs(index)

    material = {"resume": [ckpt_ref.digest, tiers_ref.digest]}
    ref = committed_or_compute(state.store, iteration, "start", material, compute,
                               {"source": state.cfg.run.resume_from})
    state.model_at(ref)  # refuses a checkpoint that does not fit the model
    return iteration, ref


def finished_start(state: RunState) -> list[tuple[int, dict[str, ArtifactRef], dict]]:
    """[(iteration, {step: ref}, its table row)] of every finished iteration of a run some of whose checkpoints
    were deleted (`runs prune`, --keep-checkpoints), oldest first: the run goes on after the last, whose checkpoint
    and tier map are checked intact here. [] for a run never pruned: its rerun finds every step committed as it
    goes, and reports each iteration again.

    A pruned run cannot be walked from iteration 0 like that: the steps after a deleted checkpoint would be looked
    up under it, found missing, and fine-tuned again.
    """
    store = state.store
    if not store.exists() or store.pruned() is None:
        return []
    records = finished_records(store)
    finished = []
    for k, record in records.items():
        refs = {key: ArtifactRef(uri=f"{store.uri}/{value['rel']}", files=value["files"],
                                 seconds=float(store.step_meta(f"{store.uri}/{value['rel']}").get("seconds", 0.0)))
                for key, value in record.items() if isinstance(value, dict) and "rel" in value}
        seconds = sum({ref.uri: ref.seconds for ref in refs.values()}.values())  # iteration 0: one start step
        # Iteration 0 (the dense start) has no fine-tuning to report, as when the flow reported it first.
        evaluation = store.read_object(refs["eval"].uri, "eval.json")
        finished.append((k, refs, report_row(store, k, evaluation, seconds, refs["checkpoint"] if k else None)))
    last, refs, _ = finished[-1]
    for key in ("checkpoint", "tiers"):  # what the next iteration starts from; the ones before it may be gone
        if store.load_step(refs[key].uri) != refs[key].files:
            raise TierpruneError(f"run {store.uri}: iteration {last}'s {key} at {refs[key].uri} is missing or damaged, "
                                 "and the checkpoints before it were deleted, so the run cannot go on; see `tierprune "
                                 f"runs verify {store.uri}`")
    return finished


@task(name="finished-start")
def finished_start_task(state: RunState) -> list[tuple[int, dict[str, ArtifactRef], dict]]:
    """A pruned run's finished iterations and their rows, to go on after the last (see finished_start)."""
    return finished_start(state)
