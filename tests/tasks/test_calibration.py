"""sample_calibration against a plain re-implementation of the protocol (locuslab/wanda `get_c4`)."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from tierprune.errors import TierpruneError
from tierprune.tasks.calibration import sample_calibration

pytestmark = pytest.mark.unit


class WordTokenizer:
    """A fake tokenizer: one token per whitespace-separated word, id from the word's characters."""

    def __init__(self):
        self.calls = 0

    def __call__(self, text: str, return_tensors: str | None = None):
        self.calls += 1
        ids = [sum(map(ord, w)) % 1000 + 7 * len(w) for w in text.split()]
        return SimpleNamespace(input_ids=torch.tensor([ids], dtype=torch.long))


def _corpus(n_docs: int = 40, seed: int = 3) -> list[str]:
    """Documents of 1..60 words, word i of document d spelled so that positions are recognisable."""
    rng = random.Random(seed)
    return [" ".join(f"d{d}w{i}" for i in range(rng.randint(1, 60))) for d in range(n_docs)]


def reference_get_c4(traindata: list[str], tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """The protocol, written as the reference writes it (the global `random`, re-tokenizing every draw)."""
    state = random.getstate()
    try:
        random.seed(seed)
        trainloader = []
        for _ in range(nsamples):
            while True:
                i = random.randint(0, len(traindata) - 1)
                trainenc = tokenizer(traindata[i], return_tensors="pt")
                if trainenc.input_ids.shape[1] > seqlen:
                    break
            i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
            j = i + seqlen
            trainloader.append(trainenc.input_ids[:, i:j])
        return torch.cat(trainloader)
    finally:
        random.setstate(state)


@pytest.mark.parametrize("seed", [0, 1, 17])
@pytest.mark.parametrize("seqlen", [8, 30])
def test_matches_reference_draws(seed: int, seqlen: int) -> None:
    texts, tok = _corpus(), WordTokenizer()
    got = sample_calibration(texts, tok, nsamples=12, seqlen=seqlen, seed=seed)
    want = reference_get_c4(texts, tok, nsamples=12, seqlen=seqlen, seed=seed)
    assert got.shape == (12, seqlen) and got.dtype == torch.long
    assert torch.equal(got, want)


def test_matches_reference_on_the_c4_subset(data_dir) -> None:
    from tierprune.storage.datasets import load_texts

    texts, tok = load_texts(f"c4:{data_dir / 'c4-subset'}", "train"), WordTokenizer()
    got = sample_calibration(texts, tok, nsamples=16, seqlen=256, seed=0)
    assert torch.equal(got, reference_get_c4(texts, tok, nsamples=16, seqlen=256, seed=0))


def test_deterministic_for_a_seed_and_different_for_another() -> None:
    texts = _corpus()
    a = sample_calibration(texts, WordTokenizer(), nsamples=8, seqlen=10, seed=0)
    b = sample_calibration(texts, WordTokenizer(), nsamples=8, seqlen=10, seed=0)
    c = sample_calibration(texts, WordTokenizer(), nsamples=8, seqlen=10, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_does_not_touch_the_global_random_state() -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    sample_calibration(_corpus(), WordTokenizer(), nsamples=4, seqlen=10, seed=0)
    assert random.random() == expected


def test_windows_are_slices_of_documents_longer_than_seqlen() -> None:
    texts, tok, seqlen = _corpus(), WordTokenizer(), 20
    long_docs = [tok(t).input_ids[0] for t in texts if len(t.split()) > seqlen]
    for window in sample_calibration(texts, tok, nsamples=10, seqlen=seqlen, seed=5):
        assert any(any(torch.equal(window, d[s:s + seqlen]) for s in range(len(d) - seqlen)) for d in long_docs)


def test_corpus_without_a_long_document_raises() -> None:
    texts = ["a b c", "d e", "f g h i"]
    with pytest.raises(TierpruneError, match="longer than 4 tokens"):
        sample_calibration(texts, WordTokenizer(), nsamples=2, seqlen=4, seed=0)
    # Exactly seqlen tokens is not enough (the reference needs > seqlen to draw a start).
    with pytest.raises(TierpruneError):
        sample_calibration(["a b c d"] * 5, WordTokenizer(), nsamples=1, seqlen=4, seed=0)
    with pytest.raises(TierpruneError, match="empty"):
        sample_calibration([], WordTokenizer(), nsamples=1, seqlen=4, seed=0)


def test_large_corpus_without_a_long_document_raises_quickly() -> None:
    tok = WordTokenizer()
    with pytest.raises(TierpruneError):
        sample_calibration([f"short doc {i}" for i in range(100_000)], tok, nsamples=4, seqlen=8, seed=0)
    assert tok.calls < 5_000  # gives up after a bounded number of draws, never loops forever


def test_a_rare_long_document_is_found_not_refused() -> None:
    # 1 long document among 3,000: ~3,000 draws per sample, as the reference would make.
    texts = [f"short doc {i}" for i in range(3000)]
    texts[1234] = " ".join(f"w{i}" for i in range(50))
    tok = WordTokenizer()
    got = sample_calibration(texts, tok, nsamples=3, seqlen=10, seed=0)
    assert torch.equal(got, reference_get_c4(texts, WordTokenizer(), nsamples=3, seqlen=10, seed=0))
