"""torch.compile'd calibration gives the statistics and masks of the reference-order walk."""
from __future__ import annotations

import copy

import pytest
import torch

from tierprune.config import PruneConfig
from tierprune.tasks.layerwise import walk_layers
from tierprune.tasks.prune import named_linears, prune_model_
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.slow


def test_compiled_walk_matches_reference_walk():
    model = make_tiny_llama(layers=3)
    ids = torch.randint(0, 128, (5, 32), generator=torch.Generator().manual_seed(0))
    eager = walk_layers(model, ids, None, batch_size=2)
    compiled = walk_layers(model, ids, None, batch_size=2, compile=True)
    assert eager.keys() == compiled.keys()
    for name in eager:
        assert compiled[name].n_samples == eager[name].n_samples == 5
        assert compiled[name].n_tokens == eager[name].n_tokens == 5 * 32
        torch.testing.assert_close(compiled[name].sq_norm, eager[name].sq_norm, rtol=1e-5, atol=0)
    # No statistics buffer is left behind in the model (it would end up in checkpoints).
    assert not any("_tierprune" in key for key in model.state_dict())
    assert not any(m._buffers for m in named_linears(model).values())


def test_compiled_wanda_prunes_like_eager_wanda():
    base = make_tiny_llama(layers=2)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    masks = {}
    for compile in (False, True):
        model = copy.deepcopy(base)
        prune_model_(model, PruneConfig(method="wanda", pattern="2:4"), ids, batch_size=2, compile=compile)
        masks[compile] = {n: m.weight == 0 for n, m in named_linears(model).items()}
    for name in masks[False]:
        assert torch.equal(masks[False][name], masks[True][name]), name


def test_compile_refuses_hessian():
    with pytest.raises(ValueError, match="compile"):
        walk_layers(make_tiny_llama(), torch.zeros(1, 8, dtype=torch.long), None, hessian=True, compile=True)
