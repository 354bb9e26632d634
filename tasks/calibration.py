"""Calibration windows, drawn exactly as the reference (locuslab/wanda `get_c4`) draws them."""
from __future__ import annotations

import random

import torch

from tierprune.errors import TierpruneError

__all__ = ["sample_calibration"]


def sample_calibration(texts: list[str], tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """(nsamples, seqlen) token ids: a uniform document longer than seqlen, then a uniform window.

    The draws are Python's `random` seeded with `seed`, in the reference's order, so the same
    documents and offsets come out for the same corpus and tokenizer.
    """
    if not texts:
        raise TierpruneError("the calibration corpus is empty")
    rng = random.Random(seed)
    tokenized: dict[int, torch.Tensor] = {}
    samples = []
    max_tries = 1000 + 100 * nsamples  # the reference loops forever; we say why instead
    tries = 0
    for _ in range(nsamples):
        while True:
            tries += 1
            if tries > max_tries:
                raise TierpruneError(f"calibration corpus has (almost) no document longer than {seqlen} tokens; "
                                     "lower --calib-seqlen or use a corpus of longer documents")
            doc = rng.randint(0, len(texts) - 1)
            if doc not in tokenized:
                tokenized[doc] = tokenizer(texts[doc], return_tensors="pt").input_ids[0]
            ids = tokenized[doc]
            if ids.shape[0] > seqlen:
                break
        start = rng.randint(0, ids.shape[0] - seqlen - 1)
        samples.append(ids[start:start + seqlen])
    return torch.stack(samples)
