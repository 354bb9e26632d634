"""Every stage reports (0, total) before its first unit of work, so that a progress line's seconds
(`prune: 30/30 (18.6 s)`) cover the whole stage, not the stage less its first layer or window."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_llama
from tierprune.config import PruneConfig
from tierprune.tasks.prune import prune_model_


@pytest.mark.parametrize("method", ["wanda", "magnitude"])  # layer by layer / matrix by matrix
def test_pruning_reports_zero_done_first(method: str) -> None:
    model = make_tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    seen: list[tuple[int, int]] = []
    prune_model_(model, PruneConfig(method=method, pattern="unstructured", sparsity=0.5),
                 ids if method == "wanda" else None, on_progress=lambda d, t: seen.append((d, t)))
    total = seen[0][1]
    assert seen == [(i, total) for i in range(total + 1)], seen
