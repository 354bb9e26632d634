"""The progressive run's steps as Prefect tasks over the run store.

Each step is a thin wrapper: it loads its inputs from the store by reference, calls the plain
function (tasks.collect_activations, score_blocks, demote, finetune, evaluate), commits the
result to a location derived from its inputs' hashes, its config and the code version, and returns
a small reference. A step whose output is already committed (and verifies) returns at once, so a
rerun after a crash recomputes nothing that was committed. Prefect never sees a tensor.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import re
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.context import TaskRunContext
from pydantic import BaseModel, ConfigDict

from tierprune import __version__
from tierprune.config import ProgressiveConfig
from tierprune.errors import TierpruneError
from tierprune.faults import crash_point
from tierprune.plan import load_plan, plan_fingerprint
from tierprune.storage.datasets import load_texts
from tierprune.storage.runstore import RunStore

__all__ = [
    "ArtifactRef", "code_version", "open_run", "run_lock",
    "dense_start_task", "resume_start_task", "collect_activations_task", "score_blocks_task",
    "demote_task", "finetune_task", "evaluate_task", "record_iteration_task", "find_iteration", "read_eval",
]


class ArtifactRef(BaseModel):
    """A committed step output: where it is and the sha256 of each of its files."""

    model_config = ConfigDict(frozen=True)
    uri: str
    files: dict[str, str]

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus a hash of the code a step's output depends on."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(__version__.encode())
    for folder in ("kernels", "tasks"):
        pkg = root / folder if (root / folder).is_dir() else Path(__file__).resolve().parent.parent / folder
        for path in sorted(pkg.glob("*.py")):
            if path.name != "steps.py":  # wiring, not results
                h.update(path.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


def _store(cfg: ProgressiveConfig) -> RunStore:
    return RunStore(cfg.store, cfg.run)


def _key(step: str, material: dict) -> str:
    blob = json.dumps({"step": step, "code": code_version(), **material}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _committed_or_compute(cfg: ProgressiveConfig, iteration: int, step: str, material: dict, compute,
                          meta: dict | None = None) -> ArtifactRef:
    store = _store(cfg)
    uri = store.step_uri(iteration, step, _key(step, material))
    files = store.load_step(uri)
    if files is not None:
        get_run_logger().info("%s of iteration %d already committed at %s", step, iteration, uri)
        return ArtifactRef(uri=uri, files=files)
    crash_point(f"step:iter-{iteration:03d}/{step}:start")  # tests only (tierprune.faults)
    started = time.perf_counter()
    payload = compute()
    files = store.commit_step(uri, payload, {**(meta or {}), "seconds": time.perf_counter() - started})
    return ArtifactRef(uri=uri, files=files)


def _store_cache_policy(step: str, material_fn) -> CacheKeyFnPolicy:
    """The store-backed cache key below as a Prefect cache policy (overrides the project's no-cache default)."""
    return CacheKeyFnPolicy(cache_key_fn=_store_cache_key(step, material_fn))


def _store_cache_key(step: str, material_fn):
    """A Prefect cache key that exists only while the store holds a verified committed output.

    The store is the truth: the key lets the UI show Cached steps, and it changes the moment
    the committed output is missing or fails its hash, so a stale Prefect cache is never used.
    """
    def cache_key(context: TaskRunContext, parameters: dict) -> str | None:
        cfg: ProgressiveConfig = parameters["cfg"]
        iteration: int = parameters["iteration"]
        key = _key(step, material_fn(parameters))
        store = _store(cfg)
        if store.load_step(store.step_uri(iteration, step, key)) is None:
            return None
        # Prefect uses the key as a file name in its result storage: a hash, not a path.
        return hashlib.sha256(f"{store.uri}|{iteration}|{step}|{key}".encode()).hexdigest()
    return cache_key


# ---------------------------------------------------------------------------- tables and tensors
def _table_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def _read_table(cfg: ProgressiveConfig, ref: ArtifactRef, name: str) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(_store(cfg).read(ref.uri, name)))


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous().cpu() for k, v in tensors.items()})


def _read_tensors(cfg: ProgressiveConfig, ref: ArtifactRef, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(_store(cfg).read(ref.uri, name))


# ---------------------------------------------------------------------------- the working model
@lru_cache(maxsize=2)
def _base_model(name: str, gguf_file: str | None, dtype: str, device: str):
    # One model object per process: every step overwrites its prunable weights from the step's
    # input checkpoint, so steps never see each other's state.
    from tierprune.models import load_model

    loaded = load_model(name, gguf_file, dtype, device)
    loaded.model.to(device)
    return loaded


def _model_at(cfg: ProgressiveConfig, checkpoint: ArtifactRef):
    from .finetune import load_prunable_state_

    loaded = _base_model(cfg.model.name, cfg.model.gguf_file, cfg.model.dtype, cfg.device)
    load_prunable_state_(loaded.model, _read_tensors(cfg, checkpoint, "checkpoint.safetensors"))
    return loaded


@lru_cache(maxsize=4)
def _eval_ids(spec: str, seqlen: int, tokenizer) -> torch.Tensor:
    # Every iteration evaluates on the same text: tokenize it once per process (seconds each time).
    from .evaluate import eval_token_ids

    return eval_token_ids(spec.split(":", 1)[0], load_texts(spec, "test"), tokenizer, seqlen)


def _calibration_ids(cfg: ProgressiveConfig, tokenizer) -> torch.Tensor:
    from .calibration import sample_calibration

    c = cfg.calibration
    return sample_calibration(load_texts(c.data, "train"), tokenizer, c.nsamples, c.seqlen, c.seed)


# ---------------------------------------------------------------------------- run lifecycle
def open_run(cfg: ProgressiveConfig) -> dict:
    """Create the run folder (or check it is this run's) and return its manifest."""
    plan = load_plan(cfg.plan)
    fingerprint = hashlib.sha256(json.dumps(
        {"config": cfg.model_dump(mode="json", exclude={"resume_from"}), "plan": plan_fingerprint(plan)},
        sort_keys=True).encode()).hexdigest()
    store = _store(cfg)
    store.create({
        "fingerprint": fingerprint,
        "model": cfg.model.model_dump(mode="json"),
        "plan": plan.to_rows(),
        "config": cfg.model_dump(mode="json"),
        "code_version": code_version(),
        "versions": _versions(),
    })
    return store.manifest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("tierprune", "torch", "transformers", "prefect", "pyarrow", "fsspec", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


@contextmanager
def run_lock(cfg: ProgressiveConfig):
    """Hold the run's writer lock for the whole flow: a second writer is refused."""
    with _store(cfg).lock():
        yield


# ---------------------------------------------------------------------------- the steps
@task(name="dense-start", persist_result=True,
      cache_policy=_store_cache_policy("start", lambda p: {"model": p["cfg"].model.model_dump(mode="json"),
                                                          "block_size": p["cfg"].block_size}))
def dense_start_task(cfg: ProgressiveConfig, iteration: int = 0) -> tuple[ArtifactRef, ArtifactRef]:
    """Iteration 0: the dense checkpoint (prunable weights) and the all-Dense tier map."""
    from .demote import initial_tiers
    from .finetune import prunable_state

    material = {"model": cfg.model.model_dump(mode="json"), "block_size": cfg.block_size}

    def compute() -> dict[str, bytes]:
        from tierprune.models import load_model

        # A fresh load, not the process's working model: that one holds whatever the last step
        # loaded into it, possibly another run's pruned weights.
        loaded = load_model(cfg.model.name, cfg.model.gguf_file, cfg.model.dtype, cfg.device)
        return {"checkpoint.safetensors": _tensor_bytes(prunable_state(loaded.model)),
                "tiers.parquet": _table_bytes(initial_tiers(loaded.model, cfg.block_size))}

    ref = _committed_or_compute(cfg, iteration, "start", material, compute, {"source": "dense"})
    return ref, ref


def _iteration_store(uri: str) -> tuple[RunStore, int]:
    """The run store and iteration number of an iteration folder URI such as `.../runs/r1/iter-002`."""
    parts = uri.rstrip("/").rsplit("/", 2)
    match = re.fullmatch(r"iter-(\d+)", parts[-1]) if len(parts) == 3 else None
    if match is None:
        raise TierpruneError(f"--resume-from wants an iteration folder like STORE/RUN/iter-002, got {uri!r}")
    store = RunStore(parts[0], parts[1])
    if not store.exists():
        raise TierpruneError(f"--resume-from {uri}: no tierprune run at {store.uri}")
    return store, int(match.group(1))


def find_iteration(uri: str) -> tuple[int, ArtifactRef, ArtifactRef]:
    """(iteration, checkpoint ref, tiers ref) recorded as finished in an iteration folder of any run."""
    store, iteration = _iteration_store(uri)
    prefix = f"iter-{iteration:03d}/iteration-"
    done = [(rel, step) for rel, step in store.committed_steps().items() if rel.startswith(prefix)]
    if not done:
        raise TierpruneError(f"--resume-from {uri}: iteration {iteration} never finished in that run")
    rel, _ = max(done, key=lambda item: (item[1].get("meta") or {}).get("finished", ""))
    files = store.load_step(f"{store.uri}/{rel}")
    if files is None:
        raise TierpruneError(f"--resume-from {uri}: its record {rel} is damaged (hash mismatch)")
    record = json.loads(store.read(f"{store.uri}/{rel}", "iteration.json"))
    refs = []
    for key in ("checkpoint", "tiers"):
        step_uri = f"{store.uri}/{record[key]['rel']}"
        if store.load_step(step_uri) != record[key]["files"]:
            raise TierpruneError(f"--resume-from {uri}: its {key} at {step_uri} is missing or damaged")
        refs.append(ArtifactRef(uri=step_uri, files=record[key]["files"]))
    return iteration, refs[0], refs[1]


@task(name="resume-start", persist_result=True)
def resume_start_task(cfg: ProgressiveConfig) -> tuple[int, ArtifactRef, ArtifactRef]:
    """Start from a finished iteration of any run: copy its tier map and checkpoint into this run."""
    from tierprune.adapters import weight_view

    from .finetune import load_prunable_state_
    from .prune import named_linears
    from .tier_tables import tier_maps_from_table

    iteration, ckpt_ref, tiers_ref = find_iteration(cfg.resume_from)
    source, _ = _iteration_store(cfg.resume_from)
    tiers_bytes = source.read(tiers_ref.uri, "tiers.parquet")
    ckpt_bytes = source.read(ckpt_ref.uri, "checkpoint.safetensors")
    loaded = _base_model(cfg.model.name, cfg.model.gguf_file, cfg.model.dtype, cfg.device)
    shapes = {n: tuple(weight_view(m).shape) for n, m in named_linears(loaded.model).items()}
    maps = tier_maps_from_table(pd.read_parquet(io.BytesIO(tiers_bytes)))
    if set(maps) != set(shapes):
        raise TierpruneError(f"tier map at {cfg.resume_from} does not match the model's shapes: "
                             f"{len(set(maps) ^ set(shapes))} modules differ")
    for name, tier_map in maps.items():
        expected = tuple(-(-d // cfg.block_size) for d in shapes[name])
        if tuple(tier_map.shape) != expected:
            raise TierpruneError(f"tier map at {cfg.resume_from} does not match the model's shapes: {name} has "
                                 f"{tuple(tier_map.shape)} blocks, the model {expected}")
    from safetensors.torch import load

    load_prunable_state_(loaded.model, load(ckpt_bytes))  # shape-checked too
    # The start is copied into this run, so the run stays valid if the source goes away.
    material = {"resume": [ckpt_ref.digest, tiers_ref.digest]}
    ref = _committed_or_compute(cfg, iteration, "start", material,
                                lambda: {"checkpoint.safetensors": ckpt_bytes, "tiers.parquet": tiers_bytes},
                                {"source": cfg.resume_from})
    return iteration, ref, ref


@task(name="record-iteration", persist_result=True)
def record_iteration_task(cfg: ProgressiveConfig, iteration: int, checkpoint: ArtifactRef, tiers: ArtifactRef,
                          evaluation: ArtifactRef) -> ArtifactRef:
    """Mark the iteration finished: which checkpoint, tier map and eval belong together."""
    store = _store(cfg)

    def rel(ref: ArtifactRef) -> dict:
        return {"rel": ref.uri[len(store.uri) + 1:], "files": ref.files}

    record = {"iteration": iteration, "checkpoint": rel(checkpoint), "tiers": rel(tiers), "eval": rel(evaluation)}
    material = {"record": record}
    return _committed_or_compute(cfg, iteration, "iteration", material,
                                 lambda: {"iteration.json": json.dumps(record, indent=2).encode()},
                                 {"finished": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _calib_material(p: dict) -> dict:
    return {"checkpoint": p["checkpoint"].digest, "calibration": p["cfg"].calibration.model_dump(mode="json"),
            "model": p["cfg"].model.model_dump(mode="json")}


@task(name="collect-activations", persist_result=True, cache_policy=_store_cache_policy("activations", _calib_material))
def collect_activations_task(cfg: ProgressiveConfig, iteration: int, checkpoint: ArtifactRef) -> ArtifactRef:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from .collect_activations import collect_activations

    def compute() -> dict[str, bytes]:
        loaded = _model_at(cfg, checkpoint)
        ids = _calibration_ids(cfg, loaded.tokenizer)
        progress = create_progress_artifact(0.0, description=f"iteration {iteration}: layers calibrated")

        def on_progress(done: int, total: int) -> None:
            update_progress_artifact(progress, 100.0 * done / total)
            crash_point(f"step:iter-{iteration:03d}/activations:layer-{done}")  # tests only (tierprune.faults)

        c = cfg.calibration
        df = collect_activations(loaded.model, ids, batch_size=c.batch_size, device=cfg.device, compile=c.compile,
                                 on_progress=on_progress)
        return {"activations.parquet": _table_bytes(df)}

    return _committed_or_compute(cfg, iteration, "activations", _calib_material(
        {"cfg": cfg, "checkpoint": checkpoint}), compute)


def _score_material(p: dict) -> dict:
    return {"checkpoint": p["checkpoint"].digest, "activations": p["activations"].digest,
            "block_size": p["cfg"].block_size, "select": p["cfg"].select}


@task(name="score-blocks", persist_result=True, cache_policy=_store_cache_policy("scores", _score_material))
def score_blocks_task(cfg: ProgressiveConfig, iteration: int, checkpoint: ArtifactRef,
                      activations: ArtifactRef) -> ArtifactRef:
    from .collect_activations import activation_stats
    from .score_blocks import score_blocks

    def compute() -> dict[str, bytes]:
        loaded = _model_at(cfg, checkpoint)
        stats = activation_stats(_read_table(cfg, activations, "activations.parquet"))
        df = score_blocks(loaded.model, stats, block_size=cfg.block_size, select=cfg.select, device=cfg.device)
        return {"scores.parquet": _table_bytes(df)}

    return _committed_or_compute(cfg, iteration, "scores", _score_material(
        {"cfg": cfg, "checkpoint": checkpoint, "activations": activations}), compute)


def _demote_material(p: dict) -> dict:
    step = load_plan(p["cfg"].plan).step(p["iteration"])
    return {"tiers": p["tiers"].digest, "scores": p["scores"].digest, "fractions": list(step.fractions),
            "scope": p["cfg"].scope}


@task(name="demote", persist_result=True, cache_policy=_store_cache_policy("tiers", _demote_material))
def demote_task(cfg: ProgressiveConfig, iteration: int, tiers: ArtifactRef, scores: ArtifactRef) -> ArtifactRef:
    from .demote import demote

    def compute() -> dict[str, bytes]:
        step = load_plan(cfg.plan).step(iteration)
        df = demote(_read_table(cfg, tiers, "tiers.parquet"), _read_table(cfg, scores, "scores.parquet"),
                    step.fractions, iteration, scope=cfg.scope)
        return {"tiers.parquet": _table_bytes(df)}

    return _committed_or_compute(cfg, iteration, "tiers", _demote_material(
        {"cfg": cfg, "iteration": iteration, "tiers": tiers, "scores": scores}), compute)


def _finetune_material(p: dict) -> dict:
    step = load_plan(p["cfg"].plan).step(p["iteration"])
    cfg = p["cfg"]
    return {"checkpoint": p["checkpoint"].digest, "tiers": p["tiers"].digest, "activations": p["activations"].digest,
            "epochs": step.epochs, "block_size": cfg.block_size, "topk": cfg.topk, "select": cfg.select}


@task(name="finetune", persist_result=True, cache_policy=_store_cache_policy("checkpoint", _finetune_material))
def finetune_task(cfg: ProgressiveConfig, iteration: int, checkpoint: ArtifactRef, tiers: ArtifactRef,
                  activations: ArtifactRef) -> ArtifactRef:
    from .collect_activations import activation_stats
    from .finetune import finetune_, prunable_state

    result: dict = {}

    def compute() -> dict[str, bytes]:
        loaded = _model_at(cfg, checkpoint)
        stats = activation_stats(_read_table(cfg, activations, "activations.parquet"))
        step = load_plan(cfg.plan).step(iteration)
        result.update(finetune_(loaded.model, _read_table(cfg, tiers, "tiers.parquet"), stats,
                                block_size=cfg.block_size, topk=cfg.topk, select=cfg.select, epochs=step.epochs))
        return {"checkpoint.safetensors": _tensor_bytes(prunable_state(loaded.model))}

    return _committed_or_compute(cfg, iteration, "checkpoint", _finetune_material(
        {"cfg": cfg, "iteration": iteration, "checkpoint": checkpoint, "tiers": tiers, "activations": activations}),
        compute, result)


def _eval_material(p: dict) -> dict:
    return {"checkpoint": p["checkpoint"].digest, "tiers": p["tiers"].digest,
            "eval": p["cfg"].eval.model_dump(mode="json")}


@task(name="evaluate", persist_result=True, cache_policy=_store_cache_policy("eval", _eval_material))
def evaluate_task(cfg: ProgressiveConfig, iteration: int, checkpoint: ArtifactRef, tiers: ArtifactRef) -> ArtifactRef:
    from .evaluate import perplexity, sparsity_report
    from .tier_tables import tier_maps_from_table

    def compute() -> dict[str, bytes]:
        loaded = _model_at(cfg, checkpoint)
        maps = tier_maps_from_table(_read_table(cfg, tiers, "tiers.parquet"))
        report = sparsity_report(loaded.model, maps)
        record = {"iteration": iteration, "sparsity": report["sparsity"], "tiers": report["tiers"], "ppl": None}
        e = cfg.eval
        if e.data:
            ids = _eval_ids(e.data, e.seqlen, loaded.tokenizer)
            ppl, windows = perplexity(loaded.model, ids, e.seqlen, max_windows=e.max_windows,
                                      batch_size=e.batch_size, device=cfg.device)
            record.update(ppl=ppl, eval_windows=windows, eval=e.model_dump(mode="json"))
        return {"eval.json": json.dumps(record, indent=2).encode()}

    return _committed_or_compute(cfg, iteration, "eval", _eval_material(
        {"cfg": cfg, "checkpoint": checkpoint, "tiers": tiers}), compute)


def read_eval(cfg: ProgressiveConfig, ref: ArtifactRef) -> dict:
    """The eval record of a committed evaluate step."""
    record = json.loads(_store(cfg).read(ref.uri, "eval.json"))
    if record.get("ppl") is not None and not math.isfinite(record["ppl"]):
        record["ppl"] = float("inf")
    return record
