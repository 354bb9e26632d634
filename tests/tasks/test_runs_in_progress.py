"""`runs show` names the unfinished iteration a rerun resumes, and how far its fine-tuning got."""
from __future__ import annotations

from tierprune.storage.runstore import RunStore
from tierprune.tasks.runs import in_progress


def _commit(store: RunStore, iteration: int, step: str, key: str, meta: dict | None = None) -> None:
    store.commit_step(store.step_uri(iteration, step, key), {"x.json": {"k": key}}, meta)


def test_the_iteration_after_the_last_finished_one_is_in_progress(tmp_path) -> None:
    store = RunStore(str(tmp_path), "run")
    store.create({"fingerprint": "fp", "model": "tiny"})
    _commit(store, 0, "iteration", "a0")
    assert in_progress(store) is None  # everything committed belongs to finished iterations

    _commit(store, 1, "activations", "a1")
    _commit(store, 1, "tiers", "b1")
    _commit(store, 1, "trainstate", "c1000100", {"step": 100, "of": 300})
    _commit(store, 1, "trainstate", "c1000200", {"step": 200, "of": 300})
    assert in_progress(store) == {"iteration": 1, "steps": ["activations", "tiers", "trainstate"],
                                  "finetune_step": 200, "finetune_steps": 300}

    _commit(store, 1, "iteration", "d1")
    assert in_progress(store) is None
