"""Parquet tables (scores, plans, metrics) at any fsspec URI: local paths, memory://, s3://."""
from __future__ import annotations

import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from tierprune.errors import TierpruneError
from tierprune.lifecycle import cleanup_on_termination

__all__ = ["save_table", "load_table", "save_file", "load_file", "file_exists", "read_text"]

# pyarrow's DNF filters: [("col", "op", value), ...] (AND) or a list of such lists (OR of ANDs).
Filters = list[tuple[str, str, Any]] | list[list[tuple[str, str, Any]]]


@contextmanager
def _atomic_open(uri: str) -> Iterator[IO[bytes]]:
    """Open uri for binary writing so that readers only ever see the old file or the complete new one."""
    fs, path = url_to_fs(uri)
    if fs.isdir(path):
        raise TierpruneError(f"cannot write {uri}: it is a folder")
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    # A crash mid-write leaves only a .tmp-* sibling, never a truncated file under the real name.
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        # A SIGTERM that cannot unwind in time removes it too (tierprune.lifecycle).
        with cleanup_on_termination(lambda: fs.rm(tmp)), fs.open(tmp, "wb") as f:
            yield f
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def save_table(df: pd.DataFrame, uri: str) -> str:
    """Write df as one Parquet file at uri (atomically) and return uri."""
    table = pa.Table.from_pandas(df)
    with _atomic_open(uri) as f:
        pq.write_table(table, f)
    return uri


def load_table(uri: str, columns: list[str] | None = None, filters: Filters | None = None) -> pd.DataFrame:
    """Read the Parquet file or folder at uri, optionally only some columns and rows."""
    fs, path = url_to_fs(uri)
    if not fs.exists(path):
        raise TierpruneError(f"no table at {uri}")
    try:
        table = pq.read_table(path, filesystem=fs, columns=columns, filters=filters)
    except pa.ArrowInvalid as e:
        # Unknown columns, bad filters and non-Parquet files all land here; the first line says which.
        reason = str(e).splitlines()[0]
        raise TierpruneError(f"cannot read table {uri}: {reason}") from e
    return table.to_pandas()


def save_file(value: Any, uri: str) -> str:
    """Write bytes, or a DataFrame / tensor dict / JSON dict (by uri's extension, see formats.encode), atomically."""
    from .formats import encode

    data = encode(posixpath.basename(uri), value)
    with _atomic_open(uri) as f:
        f.write(data)
    return uri


def load_file(uri: str) -> Any:
    """What save_file wrote at uri (decoded by its extension, see formats.decode); TierpruneError if missing."""
    from .formats import decode

    fs, path = url_to_fs(uri)
    if not fs.isfile(path):
        raise TierpruneError(f"no file at {uri}")
    return decode(posixpath.basename(uri), fs.cat_file(path))


def file_exists(uri: str) -> bool:
    """Whether uri names an existing file (not a folder), on any fsspec filesystem."""
    fs, path = url_to_fs(uri)
    return fs.isfile(path)


def remove_file(uri: str) -> bool:
    """Delete the file at uri if there is one (any fsspec filesystem); whether there was."""
    fs, path = url_to_fs(uri)
    if not fs.isfile(path):
        return False
    fs.rm_file(path)
    return True


def read_text(uri: str) -> str:
    """The UTF-8 text of a small file at any fsspec URI (a byte-order mark dropped); FileNotFoundError if none."""
    import fsspec

    with fsspec.open(uri, "r", encoding="utf-8-sig") as f:
        return f.read()
