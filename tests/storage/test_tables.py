"""Tests for tierprune.storage.tables: Parquet round trips on local paths and memory://."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pandas as pd
import pytest

from tierprune.errors import TierpruneError
from tierprune.storage import tables
from tierprune.storage.tables import load_table, save_table

pytestmark = pytest.mark.unit


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "layer": [0, 0, 1, 1],
            "module": ["q_proj", "k_proj", "q_proj", "k_proj"],
            "score": [0.5, 1.25, -3.0, 2.0],
            "dense": [True, False, True, False],
        }
    )


def _listing(root: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(root)
    return sorted(fs.find(path))


def test_round_trip_and_no_tmp_files(root: str) -> None:
    uri = f"{root}/runs/r1/scores.parquet"  # parent folders do not exist yet
    assert save_table(_frame(), uri) == uri
    pd.testing.assert_frame_equal(load_table(uri), _frame())
    assert [p.rsplit("/", 1)[-1] for p in _listing(root)] == ["scores.parquet"]


def test_overwrite_replaces(root: str) -> None:
    uri = f"{root}/t.parquet"
    save_table(_frame(), uri)
    save_table(_frame().head(1), uri)
    pd.testing.assert_frame_equal(load_table(uri), _frame().head(1))
    assert len(_listing(root)) == 1


def test_columns_and_filters(root: str) -> None:
    uri = f"{root}/t.parquet"
    save_table(_frame(), uri)
    got = load_table(uri, columns=["module", "score"], filters=[("layer", "=", 1)])
    expected = _frame().loc[lambda d: d.layer == 1, ["module", "score"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected)


def test_non_range_index_survives(root: str) -> None:
    df = _frame().set_index("module")
    uri = f"{root}/t.parquet"
    save_table(df, uri)
    pd.testing.assert_frame_equal(load_table(uri), df)


def test_failed_write_leaves_old_file_and_no_tmp(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"{root}/t.parquet"
    save_table(_frame(), uri)

    def crash_midway(table: object, where: object) -> None:
        where.write(b"PAR1 half a file")  # type: ignore[attr-defined]
        raise RuntimeError("disk full")

    monkeypatch.setattr(tables.pq, "write_table", crash_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        save_table(_frame().head(1), uri)
    monkeypatch.undo()
    pd.testing.assert_frame_equal(load_table(uri), _frame())
    assert len(_listing(root)) == 1


def test_missing_table_names_uri(root: str) -> None:
    uri = f"{root}/missing.parquet"
    with pytest.raises(TierpruneError, match="no table at") as info:
        load_table(uri)
    assert uri in str(info.value)


def test_unknown_column_names_uri(root: str) -> None:
    uri = f"{root}/t.parquet"
    save_table(_frame(), uri)
    with pytest.raises(TierpruneError, match="cannot read table") as info:
        load_table(uri, columns=["nope"])
    assert uri in str(info.value)


def test_not_parquet_names_uri(root: str) -> None:
    uri = f"{root}/t.parquet"
    with fsspec.open(uri, "wb") as f:
        f.write(b"definitely not parquet")
    with pytest.raises(TierpruneError, match="cannot read table") as info:
        load_table(uri)
    assert uri in str(info.value)


def test_save_onto_folder_refused(root: str) -> None:
    fs, path = fsspec.core.url_to_fs(f"{root}/folder")
    fs.makedirs(path, exist_ok=True)
    fs.pipe(f"{path}/inside.txt", b"x")
    with pytest.raises(TierpruneError, match="is a folder"):
        save_table(_frame(), f"{root}/folder")
