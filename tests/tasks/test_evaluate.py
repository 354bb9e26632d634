"""Perplexity against a hand-written per-window loop; evaluation text; the sparsity report."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_tiny_llama
from tierprune.errors import TierpruneError
from tierprune.kernels.tiers import DENSE, NM_2_4, TOPK
from tierprune.tasks.evaluate import PREFIX_MARGIN_TOKENS, eval_token_ids, perplexity, sparsity_report

pytestmark = pytest.mark.unit

SEQLEN = 16


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(seed=0, dtype=torch.float64)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (1, 7 * SEQLEN + 5), generator=g)  # 7 windows and a remainder of 5


@torch.no_grad()
def hand_ppl(model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> float:
    """The protocol, one window at a time: exp of the mean of the windows' mean shifted token losses."""
    losses = []
    n = ids.shape[1] // seqlen
    for w in range(n if max_windows is None else min(n, max_windows)):
        x = ids[:, w * seqlen:(w + 1) * seqlen]
        logits = model(x).logits[0]  # (L, V)
        losses.append(F.cross_entropy(logits[:-1].double(), x[0, 1:]).item())
    return math.exp(sum(losses) / len(losses))


def test_perplexity_equals_the_per_window_loop(model, ids) -> None:
    ppl, windows = perplexity(model, ids, SEQLEN)
    assert windows == 7  # remainder dropped
    assert ppl == pytest.approx(hand_ppl(model, ids, SEQLEN), rel=1e-6)  # our loss is fp32, the loop fp64
    # The dropped remainder does not matter: the same ids without it give the same number.
    assert perplexity(model, ids[:, : 7 * SEQLEN], SEQLEN)[0] == pytest.approx(ppl, rel=1e-12)


def test_max_windows_caps(model, ids) -> None:
    ppl, windows = perplexity(model, ids, SEQLEN, max_windows=3)
    assert windows == 3
    assert ppl == pytest.approx(hand_ppl(model, ids, SEQLEN, max_windows=3), rel=1e-6)
    assert perplexity(model, ids, SEQLEN, max_windows=100)[1] == 7


def test_batch_size_changes_nothing(model, ids) -> None:
    fp32 = make_tiny_llama(seed=0)
    for m, tol in ((model, 1e-12), (fp32, 1e-5)):
        one = perplexity(m, ids, SEQLEN, batch_size=1)
        three = perplexity(m, ids, SEQLEN, batch_size=3)  # batches 3, 3, 1
        assert one[1] == three[1] == 7
        assert math.isclose(one[0], three[0], rel_tol=tol)


def test_progress_reports_every_batch(model, ids) -> None:
    seen = []
    perplexity(model, ids, SEQLEN, batch_size=3, on_progress=lambda d, t: seen.append((d, t)))
    assert seen == [(0, 7), (3, 7), (6, 7), (7, 7)]  # (0, n) first: the stage's clock starts before the work


def test_text_shorter_than_a_window_is_a_user_error(model) -> None:
    with pytest.raises(TierpruneError, match="fewer than one window"):
        perplexity(model, torch.zeros(1, SEQLEN - 1, dtype=torch.long), SEQLEN)


class RecordingTokenizer:
    def __init__(self):
        self.texts: list[str] = []

    def __call__(self, text: str, return_tensors: str | None = None):
        self.texts.append(text)
        return SimpleNamespace(input_ids=torch.arange(len(text)).unsqueeze(0))


def test_wikitext_rows_are_joined_with_blank_lines() -> None:
    rows = ["", " = Title = \n", "", " Some text .\n", ""]
    tok = RecordingTokenizer()
    ids = eval_token_ids("wikitext2", rows, tok, 4)
    assert tok.texts == ["\n\n = Title = \n\n\n\n\n Some text .\n\n\n"]  # tokenized once, joined with "\n\n"
    assert ids.shape == (1, len(tok.texts[0]))  # nothing truncated


def test_wikitext_test_split_is_tokenized_once_as_one_text(data_dir) -> None:
    from tierprune.storage.datasets import load_texts

    rows = load_texts(f"wikitext2:{data_dir / 'wikitext-2-raw'}", "test")
    tok = RecordingTokenizer()
    eval_token_ids("wikitext2", rows, tok, 2048)
    assert len(tok.texts) == 1 and tok.texts[0] == "\n\n".join(rows)
    assert tok.texts[0].startswith("\n\n = Robert Boulter = \n")


def test_c4_validation_text_as_the_reference() -> None:
    docs = [f"doc{i}" for i in range(1200)]
    tok = RecordingTokenizer()
    ids = eval_token_ids("c4", docs, tok, 2)
    assert ids.shape == (1, 256 * 2)  # truncated to 256 windows
    # The first 1,100 documents joined with spaces; only as many as its 512 tokens need (and the margin) tokenized.
    assert all(" ".join(docs[:1100]).startswith(text) for text in tok.texts)
    assert 512 + PREFIX_MARGIN_TOKENS <= len(tok.texts[-1]) < len(" ".join(docs[:1100]))


def test_a_few_windows_tokenize_a_prefix_with_the_whole_corpus_tokens(data_dir) -> None:
    import pandas as pd

    from tierprune.storage.datasets import load_texts

    from ..conftest import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer(pd.read_parquet(data_dir / "c4-subset").text[:100].tolist())
    rows = load_texts(f"wikitext2:{data_dir / 'wikitext-2-raw'}", "test")[:600]  # 600 lines: ~100k tokens
    whole = eval_token_ids("wikitext2", rows, tokenizer, 32)
    for windows in (1, 2, 50):
        quick = eval_token_ids("wikitext2", rows, tokenizer, 32, max_windows=windows)
        assert torch.equal(quick, whole[:, :32 * windows])
    assert torch.equal(eval_token_ids("wikitext2", rows, tokenizer, 32, max_windows=10**6), whole)  # all of it
    tok = RecordingTokenizer()
    eval_token_ids("wikitext2", rows, tok, 32, max_windows=2)
    assert len(tok.texts[-1]) < len("\n\n".join(rows)) / 10  # a prefix, not the whole corpus


def test_sparsity_report_counts_zeros_and_tiers() -> None:
    model = make_tiny_llama(seed=0)  # hidden 64, MLP 128: q (64, 64), gate (128, 64), down (64, 128)
    layer = model.model.layers[0]
    q, gate = layer.self_attn.q_proj.weight, layer.mlp.gate_proj.weight
    with torch.no_grad():
        q[:, :16] = 0  # 1,024 zeros
        gate[:3] = 0  # 192 zeros
    q_map = torch.tensor([[DENSE, NM_2_4, TOPK, TOPK]] * 4, dtype=torch.int8)  # 16 x 16 blocks of (64, 64)
    gate_map = torch.full((8, 4), DENSE, dtype=torch.int8)  # 32 blocks of (128, 64)
    gate_map[0, :3] = NM_2_4
    maps = {"model.layers.0.self_attn.q_proj": q_map, "model.layers.0.mlp.gate_proj": gate_map}
    report = sparsity_report(model, maps)

    total = sum(m.weight.numel() for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and ".layers." in n)
    assert report["prunable_params"] == total
    assert report["sparsity"] == pytest.approx((1024 + 192) / total)
    mods = report["modules"]
    assert len(mods) == 2 * 7 and "lm_head" not in " ".join(mods)
    assert mods["model.layers.0.self_attn.q_proj"]["sparsity"] == pytest.approx(0.25)
    assert mods["model.layers.0.mlp.gate_proj"]["sparsity"] == pytest.approx(3 / 128)
    assert mods["model.layers.0.mlp.up_proj"]["sparsity"] == 0.0 and "tiers" not in mods["model.layers.0.mlp.up_proj"]
    assert mods["model.layers.0.self_attn.q_proj"]["tiers"] == {"dense": 0.25, "2:4": 0.25, "topk": 0.5}
    assert mods["model.layers.0.mlp.gate_proj"]["tiers"] == {"dense": 29 / 32, "2:4": 3 / 32, "topk": 0.0}
    # Overall tier fractions are of blocks, over the modules with a tier map: 16 + 32 blocks.
    assert report["tiers"] == pytest.approx({"dense": (4 + 29) / 48, "2:4": (4 + 3) / 48, "topk": 8 / 48})
    assert sum(report["tiers"].values()) == pytest.approx(1.0)


def test_sparsity_report_without_tier_maps_is_all_dense() -> None:
    report = sparsity_report(make_tiny_llama(seed=0))
    assert report["sparsity"] == 0.0
    assert report["tiers"] == {"dense": 1.0, "2:4": 0.0, "topk": 0.0}
