"""What the steps of one progressive run share inside one flow process, and the run's lifecycle.

`RunState` is passed explicitly to every step: the config, the run store, the plan and the working
model. The model is loaded once; moving it to another checkpoint loads only the tensors whose
content hash differs from what it holds, and writing a checkpoint writes only the tensors a step
declared changed. `open_run` creates the run (or checks it is the same run), `check_run_inputs`
refuses bad input before anything is written or Prefect starts.
"""
from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from tierprune.config import TierpruneConfig
from tierprune.errors import TierpruneError
from tierprune.models import LoadedModel, check_window_lengths, load_model, model_identity, require_device
from tierprune.plan import Plan, load_plan, plan_fingerprint
from tierprune.storage.checkpoints import checkpoint_blobs, load_checkpoint, save_checkpoint
from tierprune.storage.runstore import RunStore

from .refs import ArtifactRef, code_version, package_versions

__all__ = ["RunState", "NothingToDo", "run_identity", "open_run", "check_run_inputs", "find_iteration",
           "model_tensors"]

_MISMATCH = "tier map / checkpoint does not match the model's shapes"
_ZERO_SHOT_FIELDS = ("zero_shot", "zero_shot_limit", "zero_shot_include")


class NothingToDo(TierpruneError):
    """The run has no iteration left to compute (e.g. resuming from the plan's last iteration)."""


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state (parameters and persistent buffers) by name, each shared tensor once (tied weights)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor
    return out


class RunState:
    """The config, store, plan and working model of one run in one process (a plain object, passed along)."""

    def __init__(self, cfg: TierpruneConfig, store: RunStore | None = None, plan: Plan | None = None):
        if cfg.run is None:
            raise TierpruneError("a progressive run needs a plan, a store and a run name")
        self.cfg = cfg
        self.store = store or RunStore(cfg.run.store, cfg.run.name)
        self.plan = plan or load_plan(cfg.run.plan)
        self._loaded: LoadedModel | None = None
        self._held: dict[str, dict] = {}  # tensor name -> checkpoint index entry that the model holds now
        self._masks: tuple[str, dict[str, torch.Tensor]] | None = None  # (step digest, module -> keep mask)
        self._fisher: tuple[str, dict[str, torch.Tensor]] | None = None  # (step digest, module -> F (out, in))
        self._identity: dict | None = None
        self._teacher: nn.Module | None = None
        self.eval_ids: torch.Tensor | None = None  # (1, T) evaluation tokens, tokenized once per run state
        self.calibration_ids: torch.Tensor | None = None  # (n, seqlen) calibration windows, drawn once per state
        self.finetune_corpus: tuple[torch.Tensor, dict] | None = None  # fine-tuning tokens (T,) and their summary
        self.held_out_ids: tuple[torch.Tensor | None] | None = None  # (held-out windows or None,), once per state

    @property
    def identity(self) -> dict:
        """run_identity of this run (computed once: it hashes the model file)."""
        if self._identity is None:
            self._identity = run_identity(self.cfg, self.plan)
        return self._identity

    def __repr__(self) -> str:  # Prefect may print task parameters
        return f"RunState({self.store.uri!r})"

    # ---- the working model ----------------------------------------------------------------------------------

    def base_model(self) -> LoadedModel:
        """The model as loaded from its source, once per process (later steps overwrite its tensors)."""
        if self._loaded is None:
            m = self.cfg.model
            self._loaded = load_model(m.name, m.gguf_file, m.dtype, self.cfg.device)
            check_window_lengths(self._loaded.model, window_lengths(self.cfg, self.plan))  # before calibration
            if not self.cfg.offload:  # offloaded, it lives in CPU memory and steps stream it through the device
                self._loaded.model.to(self.cfg.device)
            self._held = {}
        return self._loaded

    def model_at(self, checkpoint: ArtifactRef) -> LoadedModel:
        """The working model holding exactly the tensors of a committed checkpoint (only differing ones are read)."""
        index = self.store.read_object(checkpoint.uri, "checkpoint.json")
        loaded = self.base_model()
        tensors = model_tensors(loaded.model)
        entries = index["tensors"]
        if set(entries) != set(tensors):
            missing, extra = sorted(set(tensors) - set(entries)), sorted(set(entries) - set(tensors))
            raise TierpruneError(f"{_MISMATCH}: checkpoint lacks {missing[:3]}, has unknown {extra[:3]}")
        stale = [n for n, e in entries.items() if self._held.get(n, {}).get("sha256") != e["sha256"]]
        self._held = {}  # until every stale tensor is in place, the model holds no known checkpoint
        with torch.no_grad():
            for name, value in load_checkpoint(self.store, index, stale):
                target = tensors[name]
                if value.shape != target.shape or value.dtype != target.dtype:
                    raise TierpruneError(f"{_MISMATCH}: {name} is {tuple(target.shape)} {target.dtype}, "
                                         f"the checkpoint's {tuple(value.shape)} {value.dtype}")
                target.copy_(value)
        self._held = dict(entries)
        return loaded

    def teacher(self) -> nn.Module:
        """The dense model as loaded from its source, frozen: the teacher of distillation (loaded once)."""
        if self._teacher is None:
            m = self.cfg.model
            loaded = load_model(m.name, m.gguf_file, m.dtype, self.cfg.device)
            self._teacher = loaded.model.to(self.cfg.device).eval().requires_grad_(False)
        return self._teacher

    def forget_teacher(self) -> None:
        """Free the teacher (its top-k logits are cached): the memory goes to the student's training."""
        self._teacher = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def forget_model_state(self) -> None:
        """Say that the model's tensors are unknown (a step that changed them failed half-way)."""
        self._held = {}

    def release_models(self) -> None:
        """Free the working model and the teacher (the run is done; an export loads what it needs itself)."""
        self._loaded, self._held = None, {}
        self.forget_teacher()

    def save_checkpoint(self, changed: set[str]) -> tuple[dict, dict[str, int]]:
        """(index, blobs) of the working model: the `changed` tensors are written, the others are referenced."""
        tensors = model_tensors(self.base_model().model)
        unknown = set(tensors) - set(self._held)
        changed = set(changed) | unknown
        index = save_checkpoint(self.store, {n: tensors[n] for n in tensors if n in changed},
                                {n: e for n, e in self._held.items() if n not in changed and n in tensors})
        self._held = dict(index["tensors"])
        return index, checkpoint_blobs(index)

    # ---- keep masks -----------------------------------------------------------------------------------------

    def masks_of(self, tiers: ArtifactRef) -> dict[str, torch.Tensor] | None:
        """module -> keep mask (out, in) bool of a committed demote step; None for a start with no masks (all kept)."""
        from .demote import read_masks

        if "masks.safetensors" not in tiers.files:
            return None
        if self._masks is None or self._masks[0] != tiers.digest:
            self._masks = (tiers.digest, read_masks(self.store.read(tiers.uri, "masks.safetensors")))
        return self._masks[1]

    def remember_masks(self, digest: str, masks: dict[str, torch.Tensor]) -> None:
        self._masks = (digest, masks)

    def fisher_of(self, checkpoint: ArtifactRef) -> dict[str, torch.Tensor]:
        """module -> F (out, in) stored with a checkpoint (--saliency fisher), read once for its iteration's steps."""
        from .score_blocks import FISHER_FILE

        if self._fisher is None or self._fisher[0] != checkpoint.digest:
            self._fisher = (checkpoint.digest, self.store.read_object(checkpoint.uri, FISHER_FILE))
        return self._fisher[1]


# ---- identity and lifecycle -------------------------------------------------------------------------------------

def window_lengths(cfg: TierpruneConfig, plan: Plan) -> dict[str, int]:
    """{flag: tokens per window} of every kind of window the run feeds the model."""
    from .finetune import needs_training

    lengths = {"--calib-seqlen": cfg.calibration.seqlen}
    if cfg.eval.data:
        lengths["--eval-seqlen"] = cfg.eval.seqlen
    if any(needs_training(cfg, step.epochs) for step in plan.steps):
        lengths["--ft-seqlen"] = cfg.finetune.seqlen
    return lengths


def run_identity(cfg: TierpruneConfig, plan: Plan) -> dict:
    """What determines a run's results, in slices the steps' keys use: model, plan, calibration, prune, eval.

    Not where things are: the store, the run name, the plan file's path, or how a model or data path is
    spelled (a relative path from another directory, an absolute one, a moved or copied folder).
    """
    from tierprune.storage.datasets import data_identity

    from .zeroshot import zero_shot_identity

    c, e, ft = cfg.calibration, cfg.eval, cfg.finetune
    # How often training commits its state changes no result, so a resume may choose another interval.
    # Compiled training, fading and OBS updates only when asked for: runs made before the options existed keep their identity.
    ft_untracked = ({"data", "commit_every", "commit_minutes"} | (set() if ft.compile else {"compile"})
                    | (set() if ft.fade_fraction else {"fade_fraction"})
                    | (set() if ft.obs_update else {"obs_update"}))
    return {
        "model": {**model_identity(cfg.model.name, cfg.model.gguf_file), "dtype": cfg.model.dtype},
        "plan": plan.to_rows(), "plan_fingerprint": plan_fingerprint(plan),
        "calibration": {**c.model_dump(mode="json", exclude={"data", "batch_size"}), "data": data_identity(c.data)},
        # The saliency only when not Wanda: runs made before --saliency keep their identity.
        "prune": cfg.prune.model_dump(mode="json", exclude=set() if cfg.prune.saliency != "wanda" else {"saliency"}),
        # Zero-shot settings only when asked for: runs made before they existed keep their identity.
        "eval": {**e.model_dump(mode="json", exclude={"data", "batch_size", *_ZERO_SHOT_FIELDS}),
                 "data": data_identity(e.data), **zero_shot_identity(e)},
        "finetune": {**ft.model_dump(mode="json", exclude=ft_untracked),
                     "data": data_identity(ft.data) if ft.data else None},
        "device": "cuda" if cfg.device.startswith("cuda") else "cpu",
        "offload": cfg.offload,
    }


def _fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            show = (lambda v: json.dumps(v)[:40])
            out.append(f"{prefix}{key} ({show(a)} -> {show(b)})")
    return out


def _check_same_run(store: RunStore, identity: dict) -> bool:
    """True if the run exists and is this run; False if it does not exist; refuses a different run."""
    if not store.exists():
        return False
    existing = store.manifest()
    if existing.get("fingerprint") == _fingerprint(identity):
        return True
    old = existing.get("identity")
    what = ", ".join(_differences(old, identity)[:6]) if isinstance(old, dict) else "made by an older tierprune"
    raise TierpruneError(f"run {store.uri} already exists with other settings: {what}; "
                         "rerun with the same settings to resume, or pick another --run name")


def open_run(state: RunState) -> dict:
    """Create the run folder (or check it is this run's) and return its manifest."""
    cfg, store = state.cfg, state.store
    identity = state.identity
    if not _check_same_run(store, identity):
        store.create({
            "fingerprint": _fingerprint(identity),
            "identity": identity,
            "model": cfg.model.model_dump(mode="json"),
            "plan": state.plan.to_rows(),
            "config": cfg.model_dump(mode="json"),
            "code_version": code_version(),
            "versions": package_versions(("tierprune", "torch", "transformers", "peft", "prefect", "pyarrow",
                                          "fsspec", "safetensors")),
        })
    return store.manifest()


@contextmanager
def run_lock(state: RunState):
    """Hold the run's writer lock for the whole flow: a second writer is refused."""
    with state.store.lock():
        yield


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


def find_iteration(uri: str) -> tuple[RunStore, int, ArtifactRef, ArtifactRef]:
    """(store, iteration, checkpoint ref, tiers ref) recorded as finished in an iteration folder of any run."""
    store, iteration = _iteration_store(uri)
    prefix = f"iter-{iteration:03d}/iteration-"
    done = [(rel, step) for rel, step in store.committed_steps().items() if rel.startswith(prefix)]
    if not done:
        raise TierpruneError(f"--resume-from {uri}: iteration {iteration} never finished in that run")
    rel, _ = max(done, key=lambda item: (item[1].get("meta") or {}).get("finished", ""))
    if store.load_step(f"{store.uri}/{rel}") is None:
        raise TierpruneError(f"--resume-from {uri}: its record {rel} is damaged")
    record = store.read_object(f"{store.uri}/{rel}", "iteration.json")
    refs = []
    pruned = store.pruned_steps()
    for key in ("checkpoint", "tiers"):
        step_uri = f"{store.uri}/{record[key]['rel']}"
        if record[key]["rel"] in pruned:
            raise TierpruneError(f"--resume-from {uri}: its {key} was deleted by `tierprune runs prune` or "
                                 f"--keep-checkpoints (kept: iterations {', '.join(map(str, store.pruned()['kept']))})")
        if store.load_step(step_uri) != record[key]["files"]:
            raise TierpruneError(f"--resume-from {uri}: its {key} at {step_uri} is missing or damaged")
        refs.append(ArtifactRef(uri=step_uri, files=record[key]["files"]))
    return store, iteration, refs[0], refs[1]


def check_resume_shapes(cfg: TierpruneConfig, tiers: pd.DataFrame) -> None:
    """Refuse a tier table whose modules or block grid do not fit the model (its shapes, no weights loaded)."""
    from tierprune.models import linear_shapes

    from .tier_tables import tier_maps_from_table

    shapes = linear_shapes(cfg.model.name, cfg.model.gguf_file)
    maps = tier_maps_from_table(tiers)
    where = cfg.run.resume_from if cfg.run else "the tier map"
    if set(maps) != set(shapes):
        raise TierpruneError(f"tier map at {where} does not match the model's shapes: "
                             f"{len(set(maps) ^ set(shapes))} modules differ")
    b = cfg.prune.block_size
    for name, tier_map in maps.items():
        expected = tuple(-(-d // b) for d in shapes[name])
        if tuple(tier_map.shape) != expected:
            raise TierpruneError(f"tier map at {where} does not match the model's shapes: {name} has "
                                 f"{tuple(tier_map.shape)} blocks, the model {expected}")


def check_run_inputs(cfg: TierpruneConfig) -> list[str]:
    """Everything that can be checked in seconds, before Prefect starts and before anything is written.

    Raises TierpruneError (one line) for bad input, NothingToDo when the plan has no iteration left; returns
    warnings (one line each) for what may still go wrong, such as fine-tuning that may not fit in memory.
    """
    from tierprune.storage.datasets import check_data_spec, evaluation_split

    run = cfg.run
    if run is None:
        raise TierpruneError("a progressive run needs --plan, --store and --run")
    plan = load_plan(run.plan)
    require_device(cfg.device)
    check_data_spec(cfg.calibration.data, "--calib")
    if cfg.eval.data:
        check_data_spec(cfg.eval.data, "--eval", evaluation_split(cfg.eval.data))
    if cfg.eval.zero_shot:
        from .zeroshot import check_zero_shot_tasks

        check_zero_shot_tasks(cfg.eval.zero_shot, cfg.eval.zero_shot_include)
    from .finetune import check_finetune_data, needs_training

    check_finetune_data(cfg, [step.epochs for step in plan.steps])
    trains = any(needs_training(cfg, step.epochs) for step in plan.steps)
    if cfg.offload and trains:
        raise TierpruneError("--offload streams calibration and evaluation through the device, but fine-tuning "
                             "needs the whole model there: use --ft-method none (or a plan with epochs 0), or "
                             "fine-tune across GPUs under FSDP (README: scale-out)")
    store = RunStore(run.store, run.name)  # a bad run name
    if "://" not in run.store and Path(run.store).is_file():
        raise TierpruneError(f"--store {run.store} is a file; give a folder (it is created if missing)")
    from tierprune.models import check_window_lengths_early, resolve_model

    resolve_model(cfg.model.name, cfg.model.gguf_file)  # a missing local model or GGUF file
    # Before the run exists: with the store written, the corrected rerun would be "another run".
    check_window_lengths_early(cfg.model.name, cfg.model.gguf_file, window_lengths(cfg, plan))
    store.check_can_create()
    _check_same_run(store, run_identity(cfg, plan))
    store.lock().check_free()
    if run.resume_from:
        source, iteration, _, tiers = find_iteration(run.resume_from)
        if iteration >= plan.steps[-1].iteration:
            raise NothingToDo(f"nothing to do: {run.resume_from} is iteration {iteration}, and the plan's last "
                              f"iteration is {plan.steps[-1].iteration}")
        check_resume_shapes(cfg, source.read_object(tiers.uri, "tiers.parquet"))
    if not trains:
        return []
    from .finetune import few_steps_warning
    from .training_memory import training_memory_warning

    # Warnings: the run goes on.
    warnings = [few_steps_warning(cfg, [step.epochs for step in plan.steps]), training_memory_warning(cfg)]
    return [w for w in warnings if w]
