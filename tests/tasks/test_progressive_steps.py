"""The plain functions of one progressive iteration: collect → score → demote → apply, on tiny LLaMAs."""
from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import make_tiny_llama
from tierprune.adapters import weight_view
from tierprune.errors import TierpruneError
from tierprune.kernels.masks import expand_blocks, nm_mask
from tierprune.kernels.scores import (
    block_counts,
    block_mean,
    block_sums,
    magnitude_scores,
    masked_block_mean,
    wanda_scores,
)
from tierprune.kernels.tiers import (
    DENSE,
    NM_2_4,
    TOPK,
    demote_tiers,
    demote_tiers_global,
    demotion_counts,
    target_counts,
    tier_counts,
)
from tierprune.storage.tables import load_table, save_table
from tierprune.tasks.collect_activations import ACTIVATION_COLUMNS, activation_stats, collect_activations
from tierprune.tasks.demote import demote, initial_tiers, keep_masks, masks_file, read_masks
from tierprune.tasks.finetune import apply_masks_
from tierprune.tasks.layerwise import walk_layers
from tierprune.tasks.prune import named_linears
from tierprune.tasks.score_blocks import SCORE_COLUMNS, score_blocks
from tierprune.tasks.tier_tables import (
    TIER_COLUMNS,
    block_maps,
    iteration_demoted_from_table,
    tier_maps_from_table,
    tier_table,
)

pytestmark = pytest.mark.unit

SCHEDULE = [(0.8, 0.2, 0.0), (0.55, 0.35, 0.10), (0.35, 0.45, 0.20)]
BS, TOPK_K = 16, 10
DOWN = "model.layers.1.mlp.down_proj"  # (64, 128) in the tiny LLaMA: 4×8 blocks of 16


def _calib_ids(seed: int = 0, n: int = 8, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _random_scores(tiers: pd.DataFrame, g: torch.Generator) -> pd.DataFrame:
    """A scores table for the blocks of `tiers`, continuous random values (no ties)."""
    df = tiers[["module", "layer", "block_row", "block_col"]].copy()
    df["score"] = torch.rand(len(df), generator=g).numpy()
    df["score_2_4"] = torch.rand(len(df), generator=g).numpy()
    return df


def prunable_state(model) -> dict[str, torch.Tensor]:
    """Copies of every prunable linear's weight as stored, keyed '<module>.weight'."""
    return {f"{name}.weight": m.weight.detach().clone() for name, m in named_linears(model).items()}


def _iteration(model, tiers: pd.DataFrame, ids: torch.Tensor, fractions, iteration: int, *, block_size: int = BS,
               topk: int = TOPK_K, select: str = "wanda", scope: str = "matrix", masks=None):
    """One iteration without training: statistics, scores, demotion, stored masks, masks applied."""
    stats = activation_stats(collect_activations(model, ids, batch_size=4))
    scores = score_blocks(model, stats, block_size=block_size, select=select)
    tiers = demote(tiers, scores, fractions, iteration, scope=scope)
    masks = read_masks(masks_file(keep_masks(model, tiers, stats, masks, block_size=block_size, topk=topk,
                                             select=select)))  # through the stored bytes, as the steps do
    apply_masks_(model, masks)
    return tiers, masks


def _check_weights_realise(model, tiers: pd.DataFrame, original: dict[str, torch.Tensor], block_size: int,
                           topk: int) -> None:
    """Dense blocks untouched; 2:4 blocks 2 of every 4; TopK blocks k each (edge blocks pro rata)."""
    maps = tier_maps_from_table(tiers)
    for name, module in named_linears(model).items():
        W, W0 = weight_view(module), original[f"{name}.weight"]  # nn.Linear: stored as (out, in)
        tier_map = maps[name]
        assert (W0 != 0).all(), "the random init has no exact zeros"
        tiers_e = expand_blocks(tier_map, tuple(W.shape), block_size)  # (out, in)
        dense = tiers_e == DENSE
        assert torch.equal(W[dense], W0[dense]), f"{name}: a Dense block changed"
        kept = W != 0
        assert torch.equal(W[kept], W0[kept]), f"{name}: a surviving weight changed"
        real = block_counts(tuple(W.shape), block_size)  # (nbr, nbc)
        expected = torch.where(tier_map == DENSE, real,
                               torch.where(tier_map == NM_2_4, real / 2,
                                           torch.round(real * topk / block_size ** 2).clamp_min(1)))
        assert torch.equal(block_sums(kept.float(), block_size), expected), name
        groups = kept.reshape(W.shape[0], -1, 4).sum(-1)  # (out, in/4) survivors per 2:4 group
        assert (groups[tiers_e[:, ::4] == NM_2_4] == 2).all(), name


# --------------------------------------------------------------------------- collect_activations


def test_collect_activations_equals_walk_layers_and_has_the_schema() -> None:
    model, ids = make_tiny_llama(), _calib_ids()
    before = prunable_state(model)
    df = collect_activations(model, ids, batch_size=3)  # a smaller last batch
    assert list(df.columns) == ACTIVATION_COLUMNS
    assert pd.api.types.is_string_dtype(df["module"])
    dtypes = {"layer": np.int32, "in_features": np.int32, "n_tokens": np.int64, "n_samples": np.int64}
    for column, dtype in dtypes.items():
        assert df[column].dtype == dtype, column
    assert all(isinstance(s, np.ndarray) and s.dtype == np.float32 for s in df["sq_norm"])
    linears = named_linears(model)
    assert df["module"].tolist() == list(linears)
    assert df["layer"].tolist() == [int(n.split(".")[2]) for n in linears]
    assert df["in_features"].tolist() == [weight_view(m).shape[1] for m in linears.values()]
    assert (df["n_tokens"] == 8 * 32).all() and (df["n_samples"] == 8).all()
    assert all(torch.equal(a, b) for a, b in zip(before.values(), prunable_state(model).values()))

    ref = walk_layers(make_tiny_llama(), ids, None, batch_size=3)
    stats = activation_stats(df)
    assert list(stats) == list(ref)
    for name, s in ref.items():
        assert stats[name].dtype == torch.float32 and torch.equal(stats[name], s.sq_norm)


def test_activation_stats_survive_parquet() -> None:
    df = collect_activations(make_tiny_llama(layers=1), _calib_ids(n=4, seqlen=16), batch_size=4)
    uri = f"memory://tierprune-test-{uuid.uuid4().hex}/activations.parquet"
    back = load_table(save_table(df, uri))
    fsspec.filesystem("memory").rm(uri)
    a, b = activation_stats(df), activation_stats(back)
    assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert (back.dtypes == df.dtypes).all()


# --------------------------------------------------------------------------- score_blocks


def test_score_blocks_hand_worked() -> None:
    model = make_tiny_llama(layers=1)
    name = "model.layers.0.self_attn.q_proj"  # (64, 64)
    W = weight_view(named_linears(model)[name])
    with torch.no_grad():
        W.fill_(1.0)
        W[:16, :16] = torch.tensor([1.0, -2.0, 3.0, -4.0]).repeat(16, 4)  # block (0, 0)
        W[:16, 16:32] = torch.tensor([0.0, 0.0, 3.0, -4.0]).repeat(16, 4)  # block (0, 1): already 2:4
    stats = {n: torch.ones(weight_view(m).shape[1]) for n, m in named_linears(model).items()}
    stats[name] = torch.full((64,), 4.0)  # sqrt(S) = 2: every Wanda score is 2·|W|
    for select in ("wanda", "magnitude"):
        df = score_blocks(model, stats, block_size=16, select=select)
        q = df[df["module"] == name].set_index(["block_row", "block_col"])
        assert q.loc[(0, 0), "score"] == 2 * 2.5 and q.loc[(0, 0), "score_2_4"] == 2 * 3.5
        assert q.loc[(0, 1), "score"] == 2 * 1.75 and q.loc[(0, 1), "score_2_4"] == 2 * 3.5  # mean of non-zeros
        assert q.loc[(1, 1), "score"] == 2.0 and q.loc[(1, 1), "score_2_4"] == 2.0


@pytest.mark.parametrize("block_size", [16, 12])  # 12: edge blocks of 4 columns / rows
@pytest.mark.parametrize("select", ["wanda", "magnitude"])
def test_score_blocks_equals_the_kernels(block_size: int, select: str) -> None:
    model, ids = make_tiny_llama(), _calib_ids()
    stats = activation_stats(collect_activations(model, ids, batch_size=4))
    df = score_blocks(model, stats, block_size=block_size, select=select)
    assert list(df.columns) == SCORE_COLUMNS
    for column, dtype in {"layer": np.int32, "block_row": np.int32, "block_col": np.int32,
                          "score": np.float32, "score_2_4": np.float32}.items():
        assert df[column].dtype == dtype, column
    # Same blocks in the same order as the tier table.
    tiers = initial_tiers(model, block_size)
    pd.testing.assert_frame_equal(df[["module", "layer", "block_row", "block_col"]],
                                  tiers[["module", "layer", "block_row", "block_col"]])
    W = weight_view(named_linears(model)[DOWN])
    scores = wanda_scores(W, stats[DOWN])
    chooser = scores if select == "wanda" else magnitude_scores(W)
    assert torch.equal(block_maps(df, "score")[DOWN], block_mean(scores, block_size))
    assert torch.equal(block_maps(df, "score_2_4")[DOWN],
                       masked_block_mean(scores, nm_mask(chooser, 2, 4), block_size))


def test_score_blocks_needs_the_stats_of_every_module() -> None:
    model = make_tiny_llama(layers=1)
    stats = {n: torch.ones(weight_view(m).shape[1]) for n, m in named_linears(model).items()}
    del stats["model.layers.0.mlp.up_proj"]
    with pytest.raises(TierpruneError, match="model.layers.0.mlp.up_proj"):
        score_blocks(model, stats)


# --------------------------------------------------------------------------- demote


def test_initial_tiers() -> None:
    model = make_tiny_llama()
    df = initial_tiers(model)
    assert list(df.columns) == TIER_COLUMNS
    pd.testing.assert_frame_equal(df, tier_table(tier_maps_from_table(df)))
    assert (df["tier"] == DENSE).all() and (df["iteration_demoted"] == -1).all() and df["score"].isna().all()
    # q 4×4, k 2×4, v 2×4, o 4×4, gate 8×4, up 8×4, down 4×8 = 144 blocks per layer
    assert len(df) == 2 * 144
    assert tier_maps_from_table(df)["model.layers.0.self_attn.k_proj"].shape == (2, 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_demote_schedule_per_matrix(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tiers = initial_tiers(make_tiny_llama())
    for it, fractions in enumerate(SCHEDULE):
        scores = _random_scores(tiers, g)
        new = demote(tiers, scores, fractions, it)
        assert list(new.columns) == TIER_COLUMNS
        old_maps, new_maps = tier_maps_from_table(tiers), tier_maps_from_table(new)
        old_it, new_it = iteration_demoted_from_table(tiers), iteration_demoted_from_table(new)
        dense_s, nm_s, ranked = block_maps(scores, "score"), block_maps(scores, "score_2_4"), block_maps(new, "score")
        for name, old in old_maps.items():
            t = new_maps[name]
            assert tuple(tier_counts(t).tolist()) == target_counts(old.numel(), fractions), (it, name)
            assert (t >= old).all(), "tiers never move up"
            changed = t != old
            assert (new_it[name][changed] == it).all()
            assert torch.equal(new_it[name][~changed], old_it[name][~changed]), "earlier moves are kept"
            # The score column: what each block was ranked on this iteration.
            # Phase 1 ranks the Dense blocks, phase 2 (if it moves any) every 2:4 block after phase 1.
            to_topk = int((t == TOPK).sum() - (old == TOPK).sum())
            phase2 = (t == NM_2_4) | (changed & (t == TOPK)) if to_topk else torch.zeros_like(changed)
            to_2_4 = int((old == DENSE).sum() - (t == DENSE).sum())
            phase1 = (old == DENSE) & ~phase2 if to_2_4 else torch.zeros_like(changed)
            assert torch.equal(ranked[name][phase1], dense_s[name][phase1])
            assert torch.equal(ranked[name][phase2], nm_s[name][phase2])
            assert ranked[name][~phase1 & ~phase2].isnan().all()
        tiers = new
    it_final = iteration_demoted_from_table(tiers)
    assert {int(v) for t in it_final.values() for v in t.unique()} == {-1, 0, 1, 2}


@pytest.mark.parametrize("seed", [0, 1])
def test_demote_schedule_global(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tiers = initial_tiers(make_tiny_llama())
    total = len(tiers)
    for it, fractions in enumerate(SCHEDULE):
        new = demote(tiers, _random_scores(tiers, g), fractions, it, scope="global")
        old_maps, new_maps = tier_maps_from_table(tiers), tier_maps_from_table(new)
        assert tuple(sum(tier_counts(t) for t in new_maps.values()).tolist()) == target_counts(total, fractions)
        for name, old in old_maps.items():
            assert (new_maps[name] >= old).all()
        changed = new["tier"].to_numpy() != tiers["tier"].to_numpy()
        assert (new["iteration_demoted"].to_numpy()[changed] == it).all()
        kept_before, kept_after = tiers["iteration_demoted"].to_numpy(), new["iteration_demoted"].to_numpy()
        assert (kept_after[~changed] == kept_before[~changed]).all()
        tiers = new


def test_demote_on_real_scores_equals_the_kernels() -> None:
    """score_blocks + demote gives the same tier maps as demote_tiers(_global) on the weights directly."""
    model, ids = make_tiny_llama(), _calib_ids()
    tiers, _ = _iteration(model, initial_tiers(model), ids, SCHEDULE[0], 0)  # a mixed start
    stats = activation_stats(collect_activations(model, ids, batch_size=4))
    scores = score_blocks(model, stats)
    maps = tier_maps_from_table(tiers)
    linears = named_linears(model)
    wanda = {n: wanda_scores(weight_view(m), stats[n]) for n, m in linears.items()}
    per_matrix = tier_maps_from_table(demote(tiers, scores, SCHEDULE[1], 1))
    for name in linears:
        counts = demotion_counts(tier_counts(maps[name]), target_counts(maps[name].numel(), SCHEDULE[1]))
        assert torch.equal(per_matrix[name], demote_tiers(wanda[name], maps[name], *counts, BS))
    total = sum(t.numel() for t in maps.values())
    counts = demotion_counts(sum(tier_counts(t) for t in maps.values()), target_counts(total, SCHEDULE[1]))
    expected = demote_tiers_global(list(wanda.values()), list(maps.values()), *counts, BS, relative=True)
    got = tier_maps_from_table(demote(tiers, scores, SCHEDULE[1], 1, scope="global"))
    assert all(torch.equal(got[n], e) for n, e in zip(linears, expected))
    # relative=False (Fisher's scores, one unit across matrices) ranks the raw scores model-wide.
    expected = demote_tiers_global(list(wanda.values()), list(maps.values()), *counts, BS, relative=False)
    raw = demote(tiers, scores, SCHEDULE[1], 1, scope="global", relative=False)
    assert all(torch.equal(tier_maps_from_table(raw)[n], e) for n, e in zip(linears, expected))
    assert any(not torch.equal(tier_maps_from_table(raw)[n], got[n]) for n in linears)
    ranked = raw["score"].to_numpy()
    moved = ~np.isnan(ranked)
    assert np.isin(ranked[moved], np.concatenate([scores["score"].to_numpy(), scores["score_2_4"].to_numpy()])).all()


@pytest.mark.parametrize("scope", ["matrix", "global"])
@pytest.mark.parametrize("bad", [(0.8, 0.2, 0.0), (0.55, 0.45, 0.0)])  # 2:4 -> Dense; TopK -> 2:4
def test_demote_refuses_upward_moves(scope: str, bad) -> None:
    g = torch.Generator().manual_seed(0)
    tiers = initial_tiers(make_tiny_llama())
    tiers = demote(tiers, _random_scores(tiers, g), SCHEDULE[1], 0, scope=scope)
    where = "model.layers.0.self_attn.q_proj" if scope == "matrix" else "whole model"
    with pytest.raises(TierpruneError, match=f"iteration 1, {where}.*up a tier"):
        demote(tiers, _random_scores(tiers, g), bad, 1, scope=scope)


def test_demote_refuses_scores_of_another_model() -> None:
    g = torch.Generator().manual_seed(0)
    tiers = initial_tiers(make_tiny_llama())
    other = initial_tiers(make_tiny_llama(intermediate=96))
    with pytest.raises(TierpruneError, match="mlp.gate_proj"):
        demote(tiers, _random_scores(other, g), SCHEDULE[0], 0)


# --------------------------------------------------------------------------- the loop, apply and state


@pytest.mark.parametrize("block_size,select", [(16, "wanda"), (16, "magnitude"), (12, "wanda")])
def test_two_iterations_give_exactly_the_zeros_of_the_tier_map(block_size: int, select: str) -> None:
    model, ids = make_tiny_llama(), _calib_ids()
    original = prunable_state(model)
    tiers, masks = initial_tiers(model, block_size), None
    for it, fractions in enumerate(SCHEDULE[1:]):
        tiers, masks = _iteration(model, tiers, ids, fractions, it, block_size=block_size, select=select, masks=masks)
        _check_weights_realise(model, tiers, original, block_size, TOPK_K)
    counts = tier_counts(torch.cat([t.flatten() for t in tier_maps_from_table(tiers).values()]))
    assert counts.tolist()[2] > 0 and counts.tolist()[1] > 0


def _run_loop(seed: int) -> tuple[dict[str, torch.Tensor], pd.DataFrame]:
    model, ids = make_tiny_llama(seed=seed), _calib_ids(seed)
    tiers, masks = initial_tiers(model), None
    for it, fractions in enumerate(SCHEDULE[1:]):
        tiers, masks = _iteration(model, tiers, ids, fractions, it, scope="global", masks=masks)
    return prunable_state(model), tiers


def test_the_loop_is_deterministic() -> None:
    (a, ta), (b, tb) = _run_loop(3), _run_loop(3)
    assert list(a) == list(b)
    assert all(a[n].numpy().tobytes() == b[n].numpy().tobytes() for n in a)
    pd.testing.assert_frame_equal(ta, tb)


def test_stored_masks_zero_a_perturbed_pruned_weight_and_never_grow() -> None:
    model, ids = make_tiny_llama(), _calib_ids()
    tiers, masks = _iteration(model, initial_tiers(model), ids, SCHEDULE[1], 1)
    name = next(n for n in masks if not masks.mask(n).all())
    W = weight_view(named_linears(model)[name])
    pruned = (~masks.mask(name)).nonzero()[0].tolist()
    with torch.no_grad():
        W[pruned[0], pruned[1]] = 1.5  # drift, a weight decay step, a LoRA merge: the weight is non-zero now
    state = prunable_state(model)
    changed = apply_masks_(model, masks)  # what the finetune step does first with the stored mask
    assert W[pruned[0], pruned[1]] == 0
    assert changed == set(state)
    after = prunable_state(model)
    assert sum(int((state[n] != after[n]).sum()) for n in state) == 1  # only the perturbed weight changed
    # A later iteration's mask is a subset of the earlier one, whatever the weights say now.
    _, later = _iteration(model, tiers, ids, SCHEDULE[2], 2, masks=masks)
    for n in masks:
        assert not (later.mask(n) & ~masks.mask(n)).any(), n


def test_masks_round_trip_through_their_file_as_bits() -> None:
    model, ids = make_tiny_llama(), _calib_ids()
    _, masks = _iteration(model, initial_tiers(model), ids, SCHEDULE[2], 1)
    data = masks_file(masks)
    back = read_masks(data)
    assert list(back) == list(masks)
    for n in masks:
        assert back.bits[n].dtype == torch.uint8 and torch.equal(back.mask(n), masks.mask(n))
    n_weights = sum(weight_view(m).numel() for m in named_linears(model).values())
    assert len(data) < n_weights / 8 + 4096  # bits, not bytes, plus the header


def test_keep_masks_refuse_a_table_of_another_shape() -> None:
    tiers = initial_tiers(make_tiny_llama(intermediate=96))
    with pytest.raises(TierpruneError, match="does not match the model.*mlp.gate_proj"):
        keep_masks(make_tiny_llama(), tiers, None, None, select="magnitude")
