"""Tier tables: a model's tier maps as one DataFrame row per block, and back.

A LLaMA-2-7B has 25 million blocks, so the module name is a pandas Categorical in memory (one small
code per row, not 25 million string objects) and a plain string column on disk (Parquet dictionary-
encodes it): `pd.read_parquet` gives strings, tierprune's own reader categories again.

Columns (TIER_COLUMNS): module (str, full module name), layer (int32), block_row, block_col (int32),
tier (int8: 0 Dense, 1 2:4, 2 TopK), iteration_demoted (int16: the progressive iteration in which
the block last changed tier, -1 = never), score (float32: the score the block was ranked on in the
latest demotion, NaN if none). Rows are ordered by layer, then module (in the order given), then
block_row, block_col (row-major, as `tier_map.flatten()`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

__all__ = [
    "TIER_COLUMNS",
    "module_column",
    "block_index_columns",
    "layer_of",
    "block_coords",
    "tier_table",
    "block_maps",
    "tier_maps_from_table",
    "iteration_demoted_from_table",
]

TIER_COLUMNS = ["module", "layer", "block_row", "block_col", "tier", "iteration_demoted", "score"]
_DTYPES = {"module": "str", "layer": "int32", "block_row": "int32", "block_col": "int32", "tier": "int8",
           "iteration_demoted": "int16", "score": "float32"}
NEVER = -1  # iteration_demoted of a block that never changed tier


def layer_of(module: str) -> int:
    """Decoder-layer index in a full module name ('model.layers.3.mlp.up_proj' -> 3); -1 if none."""
    return next((int(p) for p in module.split(".") if p.isdigit()), -1)


def block_coords(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(block_row, block_col) int32 of every block of a (nbr, nbc) map, row-major."""
    nbr, nbc = shape
    return (np.repeat(np.arange(nbr, dtype=np.int32), nbc), np.tile(np.arange(nbc, dtype=np.int32), nbr))


def module_column(names: list[str], counts: list[int]) -> pd.Categorical:
    """The module column of a per-block table: names[i] repeated counts[i] times, as a Categorical."""
    codes = np.repeat(np.arange(len(names), dtype=np.int32), np.asarray(counts, dtype=np.int64))
    return pd.Categorical.from_codes(codes, categories=pd.Index(names, dtype="str"))


def block_index_columns(names: list[str], shapes: list[tuple[int, int]]) -> dict[str, object]:
    """module, layer, block_row, block_col of every block of the (nbr, nbc) maps of `names`, as whole columns:
    a 7B model has 25 million blocks, so a per-block table is never built a frame per module."""
    coords = [block_coords(shape) for shape in shapes]
    return {
        "module": module_column(names, [r * c for r, c in shapes]),
        "layer": np.concatenate([np.full(r * c, layer_of(n), dtype=np.int32) for n, (r, c) in zip(names, shapes)]),
        "block_row": np.concatenate([rows for rows, _ in coords]),
        "block_col": np.concatenate([cols for _, cols in coords]),
    }


def _per_block(name: str, values: dict[str, torch.Tensor] | None, shape: tuple[int, int], what: str,
               fill: float, dtype: str) -> np.ndarray:
    if values is None or name not in values:
        return np.full(shape[0] * shape[1], fill, dtype=dtype)
    v = values[name]
    if tuple(v.shape) != shape:
        raise ValueError(f"{what} of {name} has shape {tuple(v.shape)}, its tier map {shape}")
    return v.detach().cpu().flatten().numpy().astype(dtype)


def tier_table(tier_maps: dict[str, torch.Tensor], iteration_demoted: dict[str, torch.Tensor] | None = None,
               scores: dict[str, torch.Tensor] | None = None) -> pd.DataFrame:
    """One row per block of every tier map (nbr, nbc); modules missing from the optional maps get -1 / NaN."""
    # Stable: modules of one layer keep the order they were given in (q, k, v, o, gate, up, down).
    names = sorted(tier_maps, key=layer_of)
    if not names:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in _DTYPES.items()})
    shapes = [tuple(tier_maps[n].shape) for n in names]
    return pd.DataFrame({
        **block_index_columns(names, shapes),
        "tier": np.concatenate([tier_maps[n].detach().cpu().flatten().numpy().astype(np.int8) for n in names]),
        "iteration_demoted": np.concatenate([_per_block(n, iteration_demoted, shape, "iteration_demoted", NEVER,
                                                        "int16") for n, shape in zip(names, shapes)]),
        "score": np.concatenate([_per_block(n, scores, shape, "score", np.nan, "float32")
                                 for n, shape in zip(names, shapes)]),
    })


def block_maps(df: pd.DataFrame, column: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Per-module (nbr, nbc) maps of one column of a per-block table, modules in order of appearance.

    Each module's rows must cover its blocks exactly once (in any row order); nbr and nbc are one past
    the largest block_row and block_col.
    """
    codes, names = _module_codes(df["module"])  # modules in order of first appearance
    counts = np.bincount(codes, minlength=len(names))
    if np.all(codes[1:] >= codes[:-1]):
        order = None  # tier_table's own order: each module's rows are contiguous, no sort needed
    else:
        order = np.argsort(codes, kind="stable")
    all_r = df["block_row"].to_numpy(dtype=np.int64)
    all_c = df["block_col"].to_numpy(dtype=np.int64)
    all_v = df[column].to_numpy()
    out: dict[str, torch.Tensor] = {}
    start = 0
    for name, n in zip(names, counts):
        rows = slice(start, start + n) if order is None else order[start:start + n]
        start += n
        r, c, values = all_r[rows], all_c[rows], all_v[rows]
        nbr, nbc = int(r.max()) + 1, int(c.max()) + 1
        flat = r * nbc + c
        if n != nbr * nbc or min(r.min(), c.min()) < 0 or np.bincount(flat, minlength=n).max() != 1:
            raise ValueError(f"table rows of {name} do not cover its {nbr}×{nbc} blocks exactly once ({n} rows)")
        grid = np.empty(nbr * nbc, dtype=values.dtype)
        grid[flat] = values
        t = torch.from_numpy(grid.reshape(nbr, nbc))
        out[str(name)] = t if dtype is None else t.to(dtype)
    return out


def _module_codes(column: pd.Series) -> tuple[np.ndarray, list[str]]:
    """(codes, names): codes[i] indexes names; names in order of first appearance."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        raw = column.cat.codes.to_numpy()
        order = pd.unique(raw)  # category codes in order of first appearance (hashing, no sort of 25M rows)
        remap = np.full(len(column.cat.categories), -1, dtype=np.int64)
        remap[order] = np.arange(len(order))
        return remap[raw], [str(column.cat.categories[c]) for c in order]
    codes, names = pd.factorize(column, sort=False)
    return codes, [str(n) for n in names]


def tier_maps_from_table(df: pd.DataFrame) -> dict[str, torch.Tensor]:
    """The inverse of tier_table: module -> (nbr, nbc) int8 tier map."""
    return block_maps(df, "tier", torch.int8)


def iteration_demoted_from_table(df: pd.DataFrame) -> dict[str, torch.Tensor]:
    """module -> (nbr, nbc) int16 iteration in which each block last changed tier (-1 = never)."""
    return block_maps(df, "iteration_demoted", torch.int16)
