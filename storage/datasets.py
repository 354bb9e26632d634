"""Text corpora for calibration, fine-tuning and evaluation, from the hub or any fsspec location."""
from __future__ import annotations

import os
import posixpath
from typing import Any, Literal

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

from tierprune.errors import TierpruneError

__all__ = ["Split", "SPEC_FORMS", "default_data_spec", "evaluation_split", "check_data_spec", "data_identity", "load_texts", "join_rows"]

Split = Literal["train", "validation", "test"]

SPEC_FORMS = "wikitext2, wikitext2:FOLDER, c4, c4:PATH (parquet/json/json.gz file or folder), text:GLOB, pydoc (offline smoke corpus: Python's help topics; not a benchmark)"

_SPLITS = ("train", "validation", "test")
_WIKITEXT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
# Wanda's shards: calibration comes from the first train shard, validation from the first validation shard.
_C4_HUB_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
_PARQUET_SUFFIXES = (".parquet",)
_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


def default_data_spec(kind: str) -> str:
    """`c4` / `wikitext2` from the hub, or the local copies under $TIERPRUNE_DATA when it is set."""
    root = os.environ.get("TIERPRUNE_DATA")
    if not root:
        return kind
    folder = {"c4": "c4-subset", "wikitext2": "wikitext-2-raw"}[kind]
    return f"{kind}:{posixpath.join(root, folder)}"


def evaluation_split(spec: str) -> Split:
    """The split perplexity is reported on: C4 has no test split, so its validation split (as the reference)."""
    return "validation" if spec.split(":", 1)[0] == "c4" else "test"


def held_out_split(spec: str | None) -> Split | None:
    """The split that may serve as held-out text beside the evaluation split, or None where there is none.

    Only WikiText-2 has one (valid beside test): C4 evaluates on its validation split, and text globs and
    pydoc give the same documents for every split, so a "held-out" loss there would be the evaluation text.
    A local WikiText folder without wiki.valid.raw (many copies hold only the test file) has none either.
    """
    if not spec or spec.split(":", 1)[0] != "wikitext2":
        return None
    path = spec.partition(":")[2]
    if not path:
        return "validation"
    fs, root = url_to_fs(path)
    return "validation" if fs.isfile(posixpath.join(root, _WIKITEXT_FILES["validation"])) else None


def check_data_spec(spec: str, flag: str = "data", split: Split = "train") -> None:
    """Refuse, in milliseconds, a spec of an unknown form or whose local path or glob finds nothing (no data read);
    a hub spec without the hub, in seconds, unless `split` is in the local cache."""
    kind, sep, path = spec.partition(":")
    if kind not in ("wikitext2", "c4", "text", "pydoc") or (sep and not path) or (kind == "pydoc" and sep) or (
            kind == "text" and not path):
        raise TierpruneError(f"{flag}: unknown data spec {spec!r}; accepted forms: {SPEC_FORMS}")
    if kind in ("wikitext2", "c4") and not path:
        from .hub import hub_or_offline

        if not hub_or_offline():
            # Offline only the local cache can answer, and it answers now: found, the step reads it again in
            # seconds; not found, the run is refused before it exists, not after its first steps are committed.
            try:
                load_texts(spec, split)
            except TierpruneError as exc:
                raise TierpruneError(f"{flag}: {exc}") from None
        return
    if not path:
        return
    fs, root = url_to_fs(path)
    if kind == "text":
        if not fs.glob(root):
            raise TierpruneError(f"{flag}: no files match {path}")
    elif not fs.exists(root):
        raise TierpruneError(f"{flag}: {kind} path {path} does not exist")


def data_identity(spec: str | None) -> dict | str | None:
    """What a data spec reads, independent of how its path is spelled: hub specs as they are, local ones as
    their files' names (relative to the spec's path) and sizes."""
    if spec is None:
        return None
    kind, sep, path = spec.partition(":")
    if not path:
        return spec
    fs, root = url_to_fs(path)
    if kind == "text":
        found = {posixpath.basename(p): info.get("size") for p, info in fs.glob(root, detail=True).items()}
    elif fs.isdir(root):
        found = {posixpath.relpath(p, root): info.get("size") for p, info in fs.find(root, detail=True).items()}
    else:
        found = {posixpath.basename(root): fs.size(root) if fs.exists(root) else None}
    return {"kind": kind, "files": dict(sorted(found.items()))}


def load_texts(spec: str, split: Split) -> list[str]:
    """Return the documents (rows) of one split of the corpus named by spec."""
    if split not in _SPLITS:
        raise TierpruneError(f"unknown split {split!r} for {spec!r}: use one of {', '.join(_SPLITS)}")
    kind, sep, path = spec.partition(":")
    if sep and not path:
        raise TierpruneError(f"data spec {spec!r} has no path after ':'; accepted forms: {SPEC_FORMS}")
    if kind == "wikitext2":
        return _wikitext_folder(path, split) if path else _wikitext_hub(split)
    if kind == "c4":
        return _c4_path(path) if path else _c4_hub(split)
    if kind == "text" and path:
        return _text_glob(path)
    if kind == "pydoc" and not sep:
        return _pydoc_topics(split)
    raise TierpruneError(f"unknown data spec {spec!r}; accepted forms: {SPEC_FORMS}")


def _pydoc_topics(split: Split) -> list[str]:
    # The offline corpus of last resort: Python's own help topics ship with every Python. It is
    # English prose with code, fine for a smoke run and NOT a benchmark. Topics alternate between
    # the splits (sorted by name), so calibration and evaluation never share a document.
    from pydoc_data.topics import topics

    names = sorted(topics)
    chosen = names[0::2] if split == "train" else names[1::2]
    return [topics[n] for n in chosen]


def join_rows(rows: list[str]) -> str:
    """Join WikiText rows into the one evaluation text, as the reference protocol does."""
    return "\n\n".join(rows)


def _wikitext_folder(folder: str, split: Split) -> list[str]:
    fs, root = url_to_fs(folder)
    if not fs.isdir(root):
        raise TierpruneError(f"wikitext2 folder {folder} does not exist")
    name = _WIKITEXT_FILES[split]
    file = posixpath.join(root, name)
    if not fs.isfile(file):
        raise TierpruneError(f"wikitext2 folder {folder} has no {name} for the {split} split")
    with fs.open(file, "rb") as f:
        raw = f.read().decode("utf-8")
    # The rows load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1") gives: one per line, blank lines
    # as "", the trailing empty piece after the last "\n" dropped (4,358 test rows).
    return [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]


def _c4_path(location: str) -> list[str]:
    fs, root = url_to_fs(location)
    if fs.isdir(root):
        found = sorted(p for p in fs.find(root) if p.endswith(_PARQUET_SUFFIXES + _JSON_SUFFIXES))
        if not found:
            raise TierpruneError(f"c4 folder {location} has no .parquet, .json, .jsonl or .json.gz files")
        # Errors name each file under the location as the user wrote it (fsspec strips and rewrites protocols).
        files = [(p, f"{location.rstrip('/')}/{posixpath.relpath(p, root)}") for p in found]
    elif fs.isfile(root):
        if not root.endswith(_PARQUET_SUFFIXES + _JSON_SUFFIXES):
            raise TierpruneError(f"c4 file {location} is neither parquet nor JSON lines (.json, .jsonl, .json.gz)")
        files = [(root, location)]
    else:
        raise TierpruneError(f"c4 path {location} does not exist")
    # A local subset has no splits of its own: every split gets all documents and the caller splits by index.
    texts: list[str] = []
    for file, label in files:
        texts.extend(_read_text_column(fs, file, label))
    return texts


def _read_text_column(fs: AbstractFileSystem, file: str, label: str) -> list[str]:
    try:
        if file.endswith(_PARQUET_SUFFIXES):
            with fs.open(file, "rb") as f:
                parquet = pq.ParquetFile(f)
                if "text" not in parquet.schema_arrow.names:
                    raise TierpruneError(f"{label} has no 'text' column")
                column = parquet.read(columns=["text"]).column("text")
        else:
            with fs.open(file, "rb", compression="infer") as f:
                table = pa_json.read_json(f)
            if "text" not in table.column_names:
                raise TierpruneError(f"{label} has no 'text' field")
            column = table.column("text")
    except pa.ArrowInvalid as e:
        reason = str(e).splitlines()[0]
        raise TierpruneError(f"cannot read {label}: {reason}") from e
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)) or column.null_count:
        raise TierpruneError(f"'text' in {label} must be strings without nulls, got {column.type}")
    return column.to_pylist()


def _text_glob(pattern: str) -> list[str]:
    fs, root = url_to_fs(pattern)
    # Sorted so that document indices (and so calibration draws) do not depend on listing order.
    files = sorted(p for p, info in fs.glob(root, detail=True).items() if info["type"] == "file")
    if not files:
        raise TierpruneError(f"no files match {pattern}")
    texts = []
    for file in files:
        with fs.open(file, "rb", compression="infer") as f:
            texts.append(f.read().decode("utf-8"))
    return texts


def _wikitext_hub(split: Split) -> list[str]:
    # The canonical repo id; the legacy alias "wikitext" that Wanda uses redirects to it.
    dataset = _load_hub("wikitext2", "Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
    return list(dataset["text"])


def _c4_hub(split: Split) -> list[str]:
    if split not in _C4_HUB_FILES:
        raise TierpruneError(f"c4 on the hub has no {split} split: use train or validation")
    data_files = {split: _C4_HUB_FILES[split]}
    dataset = _load_hub("c4", "allenai/c4", data_files=data_files, split=split)
    return list(dataset["text"])


def _load_hub(spec: str, *args: str, **kwargs: Any) -> Any:
    """datasets.load_dataset, with a failure to reach the hub turned into a one-line user error."""
    try:
        import datasets  # optional (tierprune[hub]); heavy, so imported only when the hub is used
    except ImportError as e:
        raise TierpruneError(
            f"data spec {spec!r} needs the 'datasets' package (pip install tierprune[hub]); "
            f"or use {spec}:PATH with local files"
        ) from e
    from .hub import hub_or_offline

    online = hub_or_offline()  # offline, a cached dataset still loads and a missing one fails now, not after retries
    try:
        return datasets.load_dataset(*args, **kwargs)
    except (OSError, datasets.exceptions.DatasetsError) as e:
        # Offline mode, no network, unknown repo or file: all mean "use local files instead".
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not online:
            reason = ("the Hugging Face hub is unreachable (or offline mode is on), and the dataset is not in the "
                      "local cache")
        raise TierpruneError(
            f"could not load hub dataset {args[0]!r} for {spec!r} ({reason}); use {spec}:PATH with local files"
        ) from e
