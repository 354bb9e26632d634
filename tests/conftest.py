"""Shared fixtures: the shared data folder and tiny randomly initialised causal LMs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA = Path(os.environ.get("TIERPRUNE_DATA", Path(__file__).parents[1] / ".." / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip(f"shared data not found in {DATA} (set TIERPRUNE_DATA)")
    return DATA


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2, hidden: int = 64,
                    intermediate: int = 128, vocab: int = 128):
    """A randomly initialised LLaMA small enough for exact comparisons on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True, use_cache=False)
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()
