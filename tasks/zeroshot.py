"""Zero-shot accuracy through lm-eval-harness on the model in memory (no save, no reload).

The tasks are lm-eval's own definitions: Wanda reports boolq, rte, hellaswag, winogrande, arc_easy,
arc_challenge and openbookqa (acc, 0-shot). Any other lm-eval task name works, and so do task YAMLs in a
user's folder (lm-eval's include path). lm-eval is the optional extra `tierprune[eval]`.
"""
from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tierprune.config import WANDA_ZERO_SHOT_TASKS
from tierprune.errors import TierpruneError
from tierprune.storage.hub import hub_or_offline

if TYPE_CHECKING:
    from torch import nn

    from tierprune.config import EvalConfig

__all__ = ["WANDA_ZERO_SHOT_TASKS", "check_zero_shot_tasks", "load_zero_shot_tasks", "zero_shot_accuracy",
           "zero_shot_identity"]

# Requests per forward pass. Continuations are scored right-padded, so this changes speed, not results.
BATCH_SIZE = 16
# lm-eval's defaults (python's random, then numpy and the few-shot sampler), as its simple_evaluate uses them.
_LM_EVAL_SEEDS = (0, 1234)


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise TierpruneError("zero-shot evaluation needs lm-eval-harness: pip install 'tierprune[eval]'") from None
    return lm_eval


def _include_dir(include_path: str | None) -> Path | None:
    if include_path is None:
        return None
    folder = Path(include_path).expanduser()
    if not folder.is_dir():
        raise TierpruneError(f"--zero-shot-include {include_path} is not a folder of lm-eval task YAMLs")
    return folder.resolve()


@functools.lru_cache(maxsize=4)
def _task_manager(include_dir: Path | None, with_defaults: bool):
    # Indexing lm-eval's ~15,000 built-in task YAMLs takes 10+ s: once per process and include folder.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_dir) if include_dir else None, include_defaults=with_defaults)


def _manager_for(tasks: tuple[str, ...], include_path: str | None):
    """lm-eval's TaskManager that knows every name in `tasks`; TierpruneError naming the unknown ones."""
    _lm_eval()
    folder = _include_dir(include_path)
    if folder is not None:
        # Only the user's folder when it holds every task asked for: seconds faster than the full index.
        local = _task_manager(folder, False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = _task_manager(folder, True)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hints = [f"{t} (did you mean {', '.join(close)}?)" if (close := difflib.get_close_matches(t, manager.all_tasks, 2))
                 else t for t in unknown]
        raise TierpruneError(f"unknown zero-shot task(s): {'; '.join(hints)} — lm-eval task names, 'wanda', "
                             "or task YAMLs in --zero-shot-include DIR")
    return manager


def check_zero_shot_tasks(tasks: tuple[str, ...], include_path: str | None = None) -> None:
    """Refuse unknown task names or a missing include folder in seconds, before any pruning."""
    if tasks:
        _manager_for(tuple(tasks), include_path)


def zero_shot_identity(cfg: EvalConfig) -> dict:
    """What of the zero-shot settings determines results: tasks, limit, and the include folder's content.

    Empty when no zero-shot task is asked for, so runs made before zero-shot existed keep their identity.
    """
    if not cfg.zero_shot:
        return {}
    identity: dict = {"zero_shot": list(cfg.zero_shot), "zero_shot_limit": cfg.zero_shot_limit}
    folder = _include_dir(cfg.zero_shot_include)
    if folder is not None:
        # The content, not the path: a moved or differently spelled folder is the same task definition.
        h = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
        identity["zero_shot_include"] = h.hexdigest()
    return identity


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    # lm-eval warns on every in-memory model ("pretrained is not a str") and every custom dataset; the CLI's
    # stderr carries progress bars and one-line errors only. Errors still come through.
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _progress_lm(lm_class, on_progress: Callable[[int, int], None] | None):
    """An HFLM that reports (done, total) loglikelihood requests through on_progress instead of a tqdm bar."""
    class ProgressLM(lm_class):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._progress_total, self._progress_done = len(requests), 0
            if on_progress is not None:
                on_progress(0, len(requests))  # the stage's clock starts now
            out = super().loglikelihood(requests, disable_tqdm=True)
            if on_progress is not None:
                on_progress(len(requests), len(requests))
            return out

        def _model_call(self, inps, *args, **kwargs):
            out = super()._model_call(inps, *args, **kwargs)
            total = getattr(self, "_progress_total", 0)
            if on_progress is not None and total:
                # One row per request, or fewer when lm-eval scores requests sharing a context in one row.
                self._progress_done = min(total, self._progress_done + inps.shape[0])
                on_progress(self._progress_done, total)
            return out

    return ProgressLM


def _metric(result: dict, name: str) -> float | None:
    value = result.get(f"{name},none")
    return float(value) if isinstance(value, (int, float)) else None


def load_zero_shot_tasks(tasks: tuple[str, ...] | list[str], include_path: str | None = None) -> dict:
    """lm-eval's loaded tasks ({"tasks", "groups", "group_map"}), each set to 0-shot; their datasets are read here.

    Call it before slow steps so that a dataset that cannot be had fails in seconds; hand the result to
    zero_shot_accuracy(task_dict=...), which otherwise loads the tasks itself.
    """
    tasks = tuple(dict.fromkeys(tasks))
    if not tasks:
        raise TierpruneError("no zero-shot task given")
    manager = _manager_for(tasks, include_path)
    online = hub_or_offline()
    try:
        with _quiet_lm_eval(), _seeded():
            loaded = manager.load(list(tasks))
    except OSError as exc:  # a dataset not reachable (no hub) or not where its task definition says
        first = str(exc).splitlines()[0] if str(exc) else ""
        where = "" if online else "the Hugging Face hub is unreachable (offline) and "
        raise TierpruneError(f"zero-shot tasks {','.join(tasks)}: {where}a dataset could not be loaded "
                             f"({type(exc).__name__}: {first})") from None
    for task in loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=0)  # zero-shot whatever the task's default
        task.set_fewshot_seed(seed=_LM_EVAL_SEEDS[1])
    return loaded


@contextmanager
def _seeded() -> Iterator[None]:
    # lm-eval's default seeds, as simple_evaluate sets them, without leaving the run's random state changed.
    import random

    import numpy as np

    state = random.getstate(), np.random.get_state()
    random.seed(_LM_EVAL_SEEDS[0])
    np.random.seed(_LM_EVAL_SEEDS[1])
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])


def zero_shot_accuracy(model: nn.Module, tokenizer, tasks: tuple[str, ...] | list[str], *, limit: int | None = None,
                       include_path: str | None = None, batch_size: int = BATCH_SIZE,
                       on_progress: Callable[[int, int], None] | None = None, task_dict: dict | None = None) -> dict:
    """Accuracy of an in-memory causal LM on lm-eval tasks, 0-shot, on the device the model is on.

    Returns {"tasks": {name: {"acc", "acc_norm" (where lm-eval reports it), "samples"}}, "mean_acc",
    "limit", "lm_eval": version}; mean_acc is the plain mean of the tasks' acc, as Wanda's table.
    """
    lm_eval = _lm_eval()
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = tuple(dict.fromkeys(tasks))
    loaded = task_dict if task_dict is not None else load_zero_shot_tasks(tasks, include_path)
    # lm-eval's evaluate(), not simple_evaluate(): that one also runs `git describe` in the working directory
    # and collects the machine's environment report, neither of which belongs in an eval record.
    with _quiet_lm_eval(), _seeded():
        # A copy of the tokenizer: HFLM sets a pad token on the one it gets, and the run's tokenizer stays as loaded.
        lm = _progress_lm(HFLM, on_progress)(pretrained=model, tokenizer=copy.deepcopy(tokenizer),
                                             batch_size=batch_size)
        was_training = model.training
        try:
            results = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=False)
        finally:
            model.train(was_training)
    per_task = {}
    for name, counts in sorted(results["n-samples"].items()):
        result = results["results"].get(name, {})
        acc = _metric(result, "acc")
        if acc is None:
            continue  # a task without accuracy (e.g. generation): not a zero-shot accuracy
        entry = {"acc": acc, "samples": int(counts["effective"])}
        if (acc_norm := _metric(result, "acc_norm")) is not None:
            entry["acc_norm"] = acc_norm
        per_task[name] = entry
    if not per_task:
        raise TierpruneError(f"zero-shot tasks {','.join(tasks)} report no accuracy (acc): use multiple-choice tasks")
    mean = sum(t["acc"] for t in per_task.values()) / len(per_task)
    return {"tasks": per_task, "mean_acc": mean, "limit": limit, "lm_eval": lm_eval.__version__}
