"""Zero-shot accuracy through lm-eval-harness on an in-memory model, against a hand-written scoring loop.

The task is tests/data/zeroshot/easy_facts.yaml: 20 hand-written four-way questions read from a local JSONL
file (the hub is unreachable here), given to lm-eval as a user include folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import lm_eval  # the eval extra is part of the test install: missing, these tests fail rather than skip
import pytest
import torch

from tests.conftest import make_tiny_llama, make_tiny_tokenizer
from tierprune.config import WANDA_ZERO_SHOT_TASKS, config_from_flags, parse_zero_shot
from tierprune.errors import TierpruneError
from tierprune.tasks.zeroshot import check_zero_shot_tasks, zero_shot_accuracy, zero_shot_identity

ZEROSHOT_DIR = Path(__file__).parents[1] / "data" / "zeroshot"
TASK = "tierprune_easy_facts"


def items() -> list[dict]:
    return [json.loads(line) for line in (ZEROSHOT_DIR / "easy_facts.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): a random fp64 LLaMA and a BPE trained on the task's own words."""
    texts = [f"Question: {d['question']}\nAnswer: {c}" for d in items() for c in d["choices"]]
    tokenizer = make_tiny_tokenizer(texts * 3)
    return make_tiny_llama(seed=1, dtype=torch.float64, vocab=len(tokenizer)), tokenizer


@torch.no_grad()
def hand_scores(model, tokenizer, limit: int | None = None) -> tuple[float, float]:
    """(acc, acc_norm) by hand: sum of the choice tokens' log-probabilities after "Question: …\\nAnswer:"."""
    hits = hits_norm = 0
    docs = items()[:limit]
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        lls = []
        for choice in doc["choices"]:
            # As lm-eval encodes a pair: the whole text once, the continuation is what follows the context's tokens.
            context_ids = tokenizer.encode(context)
            whole = tokenizer.encode(context + " " + choice)
            ids = torch.tensor([whole])
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)  # (T-1, V)
            lls.append(sum(logprobs[t - 1, whole[t]].item() for t in range(len(context_ids), len(whole))))
        hits += max(range(4), key=lambda i: lls[i]) == doc["answer"]
        hits_norm += max(range(4), key=lambda i: lls[i] / len(doc["choices"][i])) == doc["answer"]
    return hits / len(docs), hits_norm / len(docs)


def test_accuracy_equals_hand_scoring_of_every_choice(tiny) -> None:
    model, tokenizer = tiny
    pad_before = tokenizer.pad_token
    result = zero_shot_accuracy(model, tokenizer, [TASK], include_path=str(ZEROSHOT_DIR))
    acc, acc_norm = hand_scores(model, tokenizer)
    entry = result["tasks"][TASK]
    assert entry["samples"] == 20
    assert entry["acc"] == pytest.approx(acc, abs=1e-12)
    assert entry["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
    assert result["mean_acc"] == entry["acc"]
    assert result["limit"] is None and result["lm_eval"] == lm_eval.__version__
    assert tokenizer.pad_token == pad_before  # lm-eval got a copy: the run's tokenizer stays as loaded
    assert not model.training


def test_limit_scores_the_first_items_only(tiny) -> None:
    model, tokenizer = tiny
    seen = []
    result = zero_shot_accuracy(model, tokenizer, [TASK], limit=6, include_path=str(ZEROSHOT_DIR),
                                on_progress=lambda d, t: seen.append((d, t)))
    assert result["tasks"][TASK]["samples"] == 6 and result["limit"] == 6
    assert result["tasks"][TASK]["acc"] == pytest.approx(hand_scores(model, tokenizer, limit=6)[0], abs=1e-12)
    # Progress counts loglikelihood requests (4 choices per item), ending at the total.
    assert seen[0] == (0, 24) and seen[-1] == (24, 24) and all(t == 24 for _, t in seen)


def test_unknown_task_is_a_one_line_error_before_any_model_runs() -> None:
    with pytest.raises(TierpruneError, match=r"unknown zero-shot task\(s\): tierprune_easy_fact \(did you mean"):
        check_zero_shot_tasks(("tierprune_easy_fact",), str(ZEROSHOT_DIR))
    with pytest.raises(TierpruneError, match="not a folder of lm-eval task YAMLs"):
        check_zero_shot_tasks((TASK,), str(ZEROSHOT_DIR / "missing"))


def test_wanda_task_names_are_lm_eval_task_names() -> None:
    # lm-eval's own index (no dataset is loaded): the names Wanda's tables use exist as tasks. With the include
    # folder too, as the test above: one index of lm-eval's ~15,000 task YAMLs for both.
    check_zero_shot_tasks(WANDA_ZERO_SHOT_TASKS, str(ZEROSHOT_DIR))


def test_zero_shot_flags_map_to_the_config() -> None:
    assert parse_zero_shot("wanda") == WANDA_ZERO_SHOT_TASKS
    assert parse_zero_shot("boolq, wanda,mytask") == (*WANDA_ZERO_SHOT_TASKS, "mytask")  # boolq once
    assert parse_zero_shot(None) == parse_zero_shot("") == ()
    with pytest.raises(TierpruneError, match="comma list"):
        parse_zero_shot("boolq,,rte")
    e = config_from_flags(eval="none", zero_shot="rte", zero_shot_limit=5, zero_shot_include="tasks/").eval
    assert (e.zero_shot, e.zero_shot_limit, e.zero_shot_include) == (("rte",), 5, "tasks/")
    assert config_from_flags(eval="none").eval.zero_shot == ()
    with pytest.raises(TierpruneError, match="need --zero-shot"):
        config_from_flags(eval="none", zero_shot_limit=5)
    with pytest.raises(TierpruneError, match="--zero-shot-limit"):
        config_from_flags(eval="none", zero_shot="rte", zero_shot_limit=0)


def test_identity_is_the_include_folders_content_not_its_path(tmp_path) -> None:
    import shutil

    assert zero_shot_identity(config_from_flags(eval="none").eval) == {}  # older runs keep their identity
    copy = tmp_path / "copy"
    shutil.copytree(ZEROSHOT_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    here = zero_shot_identity(config_from_flags(eval="none", zero_shot=TASK, zero_shot_include=str(ZEROSHOT_DIR)).eval)
    there = zero_shot_identity(config_from_flags(eval="none", zero_shot=TASK, zero_shot_include=str(copy)).eval)
    assert here == there and here["zero_shot"] == [TASK]
    (copy / "easy_facts.jsonl").write_text((copy / "easy_facts.jsonl").read_text().replace("blue", "azure", 1))
    changed = zero_shot_identity(config_from_flags(eval="none", zero_shot=TASK, zero_shot_include=str(copy)).eval)
    assert changed["zero_shot_include"] != here["zero_shot_include"]


@pytest.mark.slow
def test_smollm2_beats_chance_on_easy_questions() -> None:
    from tierprune.models import load_model

    loaded = load_model("smollm2-135m", None, "auto", "cpu")
    result = zero_shot_accuracy(loaded.model, loaded.tokenizer, [TASK], include_path=str(ZEROSHOT_DIR))
    # Four choices: chance is 0.25 (5 of 20); the dense model answers most of these (16 of 20 when written).
    assert result["tasks"][TASK]["acc"] >= 0.6
