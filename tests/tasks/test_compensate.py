"""Compensated demotion (--obs-update): the masks hold exactly, and the model's outputs move less than with masks alone."""
from __future__ import annotations

import pytest
import torch

from tierprune.adapters import weight_view
from tierprune.errors import TierpruneError
from tierprune.tasks.collect_activations import activation_stats, collect_activations
from tierprune.tasks.compensate import compensate_demotion_
from tierprune.tasks.demote import demote, initial_tiers, keep_masks
from tierprune.tasks.finetune import apply_masks_
from tierprune.tasks.prune import named_linears
from tierprune.tasks.score_blocks import score_blocks

from ..conftest import make_tiny_llama

pytestmark = pytest.mark.unit


def _demotion(model, calib):
    stats = activation_stats(collect_activations(model, calib))
    tiers = demote(initial_tiers(model), score_blocks(model, stats), (0.35, 0.45, 0.20), 1)
    return keep_masks(model, tiers, stats, None)


@torch.no_grad()
def test_obs_update_keeps_the_masks_exactly_and_moves_the_outputs_less_than_masking():
    dense = make_tiny_llama(seed=3, layers=3, hidden=64, intermediate=128).eval()
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 128, (8, 32), generator=g)
    masks = _demotion(dense, calib)
    masked, compensated = make_tiny_llama(seed=3, layers=3).eval(), make_tiny_llama(seed=3, layers=3).eval()
    apply_masks_(masked, masks)
    changed = compensate_demotion_(compensated, masks.mask_for, calib, batch_size=4)
    assert changed == {f"{n}.weight" for n in named_linears(compensated)}
    for name, module in named_linears(compensated).items():
        W, keep = weight_view(module), masks.mask(name)
        assert not W[~keep].any(), name  # exactly the demotion's sparsity
        assert not torch.equal(W, weight_view(named_linears(masked)[name])), name  # the kept weights moved
    reference = dense(calib).logits

    def error(model) -> float:
        return (model(calib).logits - reference).square().mean().item()
    assert error(compensated) < 0.8 * error(masked), (error(compensated), error(masked))


def test_masks_of_another_model_are_refused():
    """The checks the finetune step makes before compensating (and apply_masks_ makes): names, then shapes."""
    model = make_tiny_llama(layers=2)
    masks = _demotion(model, torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1)))
    with pytest.raises(TierpruneError, match="masks do not match the model"):
        masks.check_covers(named_linears(make_tiny_llama(layers=3)))
    wider = named_linears(make_tiny_llama(layers=2, hidden=128))
    name = next(iter(wider))
    with pytest.raises(TierpruneError, match=f"the mask of {name} is"):
        masks.mask_for(name, weight_view(wider[name]))


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # gpt2: Conv1D, the weight stored transposed
@pytest.mark.parametrize("pattern, scope", [("tiers", "matrix"), ("tiers", "global"), ("block", "matrix")])
@torch.no_grad()
def test_one_shot_sparsegpt_for_blocks_and_tiers_obeys_the_pattern_and_beats_wanda(model_type, pattern, scope):
    """prune --method sparsegpt --pattern tiers|block: Wanda's masks, SparseGPT's weights for what is kept."""
    import copy

    from tierprune.config import PruneConfig
    from tierprune.kernels.tiers import tier_violations
    from tierprune.tasks.prune import prune_model_

    from ..test_adapters import ARCHS, _build

    arch = next(a for a in ARCHS if a.model_type == model_type)
    dense = _build(arch, seed=2)
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    options = {"pattern": pattern, "scope": scope, **({"sparsity": 0.5} if pattern == "block" else {})}
    models, results = {}, {}
    for method in ("wanda", "sparsegpt"):
        models[method] = copy.deepcopy(dense)
        results[method] = prune_model_(models[method], PruneConfig(method=method, block_size=8, **options), ids,
                                       batch_size=4)
    reference = dense(ids).logits
    for name, module in named_linears(models["sparsegpt"]).items():
        W = weight_view(module)
        if pattern == "tiers":
            assert tier_violations(W, results["sparsegpt"].tier_maps[name], 8, 10) == (0, 0), name
        else:  # 8×8 blocks entirely zero or entirely kept, half of them zero
            zero_blocks = (W.reshape(W.shape[0] // 8, 8, -1, 8) == 0).all(dim=(1, 3))
            assert zero_blocks.float().mean().item() == pytest.approx(0.5, abs=0.07), name
    if scope == "global":  # one ranking on the unpruned model: the same masks as Wanda's
        for name, module in named_linears(models["sparsegpt"]).items():
            wanda_zeros = weight_view(named_linears(models["wanda"])[name]) == 0
            assert torch.equal(weight_view(module) == 0, wanda_zeros), name

    def error(model) -> float:
        return (model(ids).logits - reference).square().mean().item()
    assert error(models["sparsegpt"]) < error(models["wanda"]), (error(models["sparsegpt"]), error(models["wanda"]))
