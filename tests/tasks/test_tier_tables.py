"""Tier tables: one row per block, exact round trip to tier maps, dtypes and row order."""
from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pandas as pd
import pytest
import torch

from tierprune.storage.tables import load_table, save_table
from tierprune.tasks import oneshot
from tierprune.tasks.tier_tables import (
    TIER_COLUMNS,
    block_maps,
    iteration_demoted_from_table,
    layer_of,
    tier_maps_from_table,
    tier_table,
)

pytestmark = pytest.mark.unit

DTYPES = {"layer": np.int32, "block_row": np.int32, "block_col": np.int32, "tier": np.int8,
          "iteration_demoted": np.int16, "score": np.float32}


def _maps(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.layers.0.self_attn.q_proj": (4, 4), "model.layers.0.mlp.down_proj": (4, 8),
              "model.layers.1.self_attn.k_proj": (2, 4), "model.layers.1.mlp.up_proj": (3, 5)}
    return {n: torch.randint(0, 3, s, generator=g, dtype=torch.int8) for n, s in shapes.items()}


def _check_dtypes(df: pd.DataFrame) -> None:
    assert list(df.columns) == TIER_COLUMNS
    assert pd.api.types.is_string_dtype(df["module"])
    for column, dtype in DTYPES.items():
        assert df[column].dtype == dtype, column


def test_layer_of() -> None:
    assert layer_of("model.layers.3.mlp.up_proj") == 3
    assert layer_of("transformer.h.11.attn.c_attn") == 11
    assert layer_of("lm_head") == -1


def test_tier_table_hand_worked() -> None:
    df = tier_table({"model.layers.2.mlp.up_proj": torch.tensor([[0, 1, 2], [2, 1, 0]], dtype=torch.int8)},
                    iteration_demoted={"model.layers.2.mlp.up_proj": torch.tensor([[-1, 0, 1], [0, 3, -1]])},
                    scores={"model.layers.2.mlp.up_proj": torch.tensor([[0.5, 1.0, 2.0], [3.0, 4.0, 5.0]])})
    _check_dtypes(df)
    assert df["module"].tolist() == ["model.layers.2.mlp.up_proj"] * 6
    assert df["layer"].tolist() == [2] * 6
    assert df["block_row"].tolist() == [0, 0, 0, 1, 1, 1]
    assert df["block_col"].tolist() == [0, 1, 2, 0, 1, 2]
    assert df["tier"].tolist() == [0, 1, 2, 2, 1, 0]
    assert df["iteration_demoted"].tolist() == [-1, 0, 1, 0, 3, -1]
    assert df["score"].tolist() == [0.5, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_defaults_never_demoted_and_unscored() -> None:
    maps = _maps()
    df = tier_table(maps)
    _check_dtypes(df)
    assert (df["iteration_demoted"] == -1).all()
    assert df["score"].isna().all()
    # Modules missing from the optional maps get the defaults too.
    name = "model.layers.1.mlp.up_proj"
    df = tier_table(maps, {name: torch.full((3, 5), 4, dtype=torch.int16)}, {name: torch.ones(3, 5)})
    mine = df["module"] == name
    assert (df.loc[mine, "iteration_demoted"] == 4).all() and (df.loc[~mine, "iteration_demoted"] == -1).all()
    assert (df.loc[mine, "score"] == 1.0).all() and df.loc[~mine, "score"].isna().all()


def test_optional_maps_must_match_the_tier_map_shape() -> None:
    name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=name):
        tier_table(_maps(), scores={name: torch.zeros(4, 5)})


def test_empty() -> None:
    df = tier_table({})
    _check_dtypes(df)
    assert len(df) == 0
    assert tier_maps_from_table(df) == {}


def test_rows_ordered_by_layer_then_given_module_order_then_row_major() -> None:
    maps = _maps()
    names = list(maps)
    shuffled = {names[3]: maps[names[3]], names[0]: maps[names[0]], names[2]: maps[names[2]],
                names[1]: maps[names[1]]}
    df = tier_table(shuffled)
    # Layer 0 first; inside a layer, the order given (layer 1: up_proj before k_proj).
    assert list(dict.fromkeys(df["module"])) == [names[0], names[1], names[3], names[2]]
    assert df["layer"].is_monotonic_increasing
    for name, g in df.groupby("module", sort=False):
        nbc = maps[name].shape[1]
        flat = (g["block_row"] * nbc + g["block_col"]).to_numpy()
        assert (flat == np.arange(maps[name].numel())).all()
        assert (g["tier"].to_numpy() == maps[name].flatten().numpy()).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_is_exact_in_any_row_order(seed: int) -> None:
    maps = _maps(seed)
    iters = {n: torch.randint(-1, 5, t.shape, dtype=torch.int16) for n, t in maps.items()}
    df = tier_table(maps, iters)
    for table in (df, df.sample(frac=1.0, random_state=seed)):
        back = tier_maps_from_table(table)
        assert set(back) == set(maps)
        for name, t in maps.items():
            assert back[name].dtype == torch.int8 and torch.equal(back[name], t)
            it = iteration_demoted_from_table(table)[name]
            assert it.dtype == torch.int16 and torch.equal(it, iters[name])
    pd.testing.assert_frame_equal(tier_table(tier_maps_from_table(df), iteration_demoted_from_table(df)), df)


def test_round_trip_through_parquet() -> None:
    mem_root = f"memory://tierprune-test-{uuid.uuid4().hex}"
    maps = _maps()
    scores = {n: torch.rand(t.shape) for n, t in maps.items()}
    df = tier_table(maps, scores=scores)
    back = load_table(save_table(df, f"{mem_root}/tiers.parquet"))
    _check_dtypes(back)
    pd.testing.assert_frame_equal(back, df)
    assert all(torch.equal(tier_maps_from_table(back)[n], t) for n, t in maps.items())
    assert all(torch.equal(block_maps(back, "score")[n], s) for n, s in scores.items())
    fsspec.filesystem("memory").rm(mem_root, recursive=True)


def test_incomplete_or_duplicated_blocks_are_refused() -> None:
    df = tier_table(_maps())
    with pytest.raises(ValueError, match="exactly once"):
        tier_maps_from_table(df.drop(index=3))
    with pytest.raises(ValueError, match="exactly once"):
        tier_maps_from_table(pd.concat([df, df.iloc[[0]]], ignore_index=True).drop(index=1))


def test_oneshot_reexports_tier_table() -> None:
    assert oneshot.tier_table is tier_table
