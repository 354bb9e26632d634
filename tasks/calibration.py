"""Calibration windows, drawn exactly as the reference (locuslab/wanda `get_c4`) draws them."""
from __future__ import annotations

import random

import torch

from tierprune.errors import TierpruneError

__all__ = ["sample_calibration", "calibration_windows", "run_calibration_windows"]


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
    # The reference loops forever on a corpus without a long enough document; we stop and say why, but
    # only while none has been seen: a rare long document (e.g. 0.75% of C4 at seqlen 4096) is just slow.
    max_tries = 1000 + 100 * nsamples
    tries = n_long = 0
    for _ in range(nsamples):
        while True:
            doc = rng.randint(0, len(texts) - 1)
            if doc not in tokenized:
                tokenized[doc] = tokenizer(texts[doc], return_tensors="pt").input_ids[0]
                n_long += tokenized[doc].shape[0] > seqlen
            ids = tokenized[doc]
            if ids.shape[0] > seqlen:
                break
            tries += 1
            if not n_long and (tries > max_tries or len(tokenized) == len(texts)):
                raise TierpruneError(f"no calibration document drawn ({len(tokenized)} of {len(texts)}) is longer "
                                     f"than {seqlen} tokens; lower --calib-seqlen or use longer documents")
        start = rng.randint(0, ids.shape[0] - seqlen - 1)
        samples.append(ids[start:start + seqlen])
    return torch.stack(samples)


def calibration_windows(calibration, tokenizer) -> torch.Tensor:
    """The run's calibration windows (n_samples, seqlen) from its CalibrationConfig: the same draw in every step."""
    from tierprune.storage.datasets import load_texts

    c = calibration
    return sample_calibration(load_texts(c.data, "train"), tokenizer, c.nsamples, c.seqlen, c.seed)


def run_calibration_windows(state, tokenizer) -> torch.Tensor:
    """A progressive run's calibration windows, drawn once per run state: every iteration calibrates (and
    `--obs-update` compensates) on the same draw, which takes seconds to read and tokenize at 128 × 2048."""
    if state.calibration_ids is None:
        state.calibration_ids = calibration_windows(state.cfg.calibration, tokenizer)
    return state.calibration_ids
