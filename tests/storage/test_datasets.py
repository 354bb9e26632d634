"""Tests for tierprune.storage.datasets: local, memory:// and (offline) hub corpora."""
from __future__ import annotations

import gzip
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pandas as pd
import pytest

from tierprune.errors import TierpruneError
from tierprune.storage.datasets import held_out_split, join_rows, load_texts

pytestmark = pytest.mark.unit

# The shared data sits next to the repository (../shared/data) unless TIERPRUNE_DATA says otherwise.
DATA = Path(os.environ.get("TIERPRUNE_DATA", Path(__file__).parents[2] / ".." / "shared" / "data"))
WIKITEXT = DATA / "wikitext-2-raw"
C4_PARQUET = DATA / "c4-subset" / "c4_validation_2k.parquet"

needs_wikitext = pytest.mark.skipif(
    not (WIKITEXT / "wiki.test.raw").is_file(), reason=f"WikiText-2 not found in {WIKITEXT} (set TIERPRUNE_DATA)"
)
needs_c4 = pytest.mark.skipif(
    not C4_PARQUET.is_file(), reason=f"C4 subset not found at {C4_PARQUET} (set TIERPRUNE_DATA)"
)


@needs_wikitext
def test_wikitext_local_test_split_matches_protocol() -> None:
    rows = load_texts(f"wikitext2:{WIKITEXT}", "test")
    assert len(rows) == 4358
    assert rows[:4] == ["", " = Robert Boulter = \n", "", rows[3]]
    assert rows[3].startswith(" Robert Boulter is an English film") and rows[3].endswith("\n")
    assert join_rows(rows).startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    # Every row is either empty or exactly one newline-terminated line.
    assert all(r == "" or (r.endswith("\n") and r.count("\n") == 1 and r.strip()) for r in rows)


@needs_wikitext
def test_wikitext_local_validation_split() -> None:
    rows = load_texts(f"wikitext2:{WIKITEXT}", "validation")
    assert len(rows) == 3760


@needs_wikitext
def test_wikitext_missing_split_file_names_path() -> None:
    # The shared copy has no train split.
    with pytest.raises(TierpruneError, match=r"wiki\.train\.raw") as info:
        load_texts(f"wikitext2:{WIKITEXT}", "train")
    assert str(WIKITEXT) in str(info.value)


@needs_wikitext
def test_wikitext_memory_copy_loads_identically(mem_root: str) -> None:
    fs = fsspec.filesystem("memory")
    folder = f"{mem_root}/wikitext"
    fs.pipe(f"{folder}/wiki.test.raw", (WIKITEXT / "wiki.test.raw").read_bytes())
    assert load_texts(f"wikitext2:{folder}", "test") == load_texts(f"wikitext2:{WIKITEXT}", "test")


@needs_c4
def test_c4_local_parquet_file_and_folder() -> None:
    docs = load_texts(f"c4:{C4_PARQUET}", "train")
    assert len(docs) == 2000
    assert all(isinstance(d, str) and d for d in docs)
    # No splits in a local subset: every split and the folder form give the same documents.
    assert load_texts(f"c4:{C4_PARQUET.parent}", "validation") == docs


@needs_c4
def test_c4_memory_parquet_loads_identically(mem_root: str) -> None:
    small = pd.read_parquet(C4_PARQUET).head(50)
    with fsspec.open(f"{mem_root}/c4/part.parquet", "wb") as f:
        small.to_parquet(f)
    expected = small["text"].tolist()
    assert load_texts(f"c4:{mem_root}/c4/part.parquet", "train") == expected
    assert load_texts(f"c4:{mem_root}/c4", "train") == expected


def test_c4_json_lines_plain_gzip_and_folder(tmp_path: Path) -> None:
    docs = [{"text": f"document {i}\nsecond line", "url": f"u{i}"} for i in range(5)]
    (tmp_path / "a.json").write_bytes(b"".join(json.dumps(d).encode() + b"\n" for d in docs[:2]))
    (tmp_path / "b.json.gz").write_bytes(gzip.compress(b"".join(json.dumps(d).encode() + b"\n" for d in docs[2:])))
    texts = [d["text"] for d in docs]
    assert load_texts(f"c4:{tmp_path / 'b.json.gz'}", "train") == texts[2:]
    assert load_texts(f"c4:{tmp_path}", "validation") == texts


def test_text_glob_one_document_per_file(tmp_path: Path, mem_root: str) -> None:
    for name, body in [("b.txt", "second\nfile\n"), ("a.txt", "first file"), ("c.md", "not matched")]:
        (tmp_path / name).write_text(body, encoding="utf-8")
        fsspec.filesystem("memory").pipe(f"{mem_root}/{name}", body.encode())
    assert load_texts(f"text:{tmp_path}/*.txt", "train") == ["first file", "second\nfile\n"]
    assert load_texts(f"text:{mem_root}/*.txt", "test") == ["first file", "second\nfile\n"]


@pytest.mark.parametrize("spec", ["wikitext3", "c5:/x", "text", "parquet:/x.parquet", "c4:", "wikitext2:"])
def test_unknown_spec_lists_accepted_forms(spec: str) -> None:
    with pytest.raises(TierpruneError, match="accepted forms: wikitext2, wikitext2:FOLDER, c4, c4:PATH") as info:
        load_texts(spec, "train")
    assert repr(spec) in str(info.value)


def test_unknown_split() -> None:
    with pytest.raises(TierpruneError, match="unknown split 'dev'"):
        load_texts("wikitext2:/somewhere", "dev")  # type: ignore[arg-type]


def test_missing_paths_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    for spec in [f"wikitext2:{missing}", f"c4:{missing}", f"c4:{missing}.parquet", f"text:{missing}/*.txt"]:
        with pytest.raises(TierpruneError) as info:
            load_texts(spec, "test")
        assert str(missing) in str(info.value), spec


def test_c4_bad_inputs_name_the_file(tmp_path: Path, mem_root: str) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(TierpruneError, match="has no .parquet") as info:
        load_texts(f"c4:{empty}", "train")
    assert str(empty) in str(info.value)

    other = tmp_path / "data.csv"
    other.write_text("text\nx\n")
    with pytest.raises(TierpruneError, match="neither parquet nor JSON lines") as info:
        load_texts(f"c4:{other}", "train")
    assert str(other) in str(info.value)

    no_text = f"{mem_root}/no_text.parquet"
    with fsspec.open(no_text, "wb") as f:
        pd.DataFrame({"body": ["a", "b"]}).to_parquet(f)
    with pytest.raises(TierpruneError, match="has no 'text' column") as info:
        load_texts(f"c4:{no_text}", "train")
    assert no_text in str(info.value)

    no_text_json = tmp_path / "no_text.jsonl"
    no_text_json.write_text('{"body": "a"}\n')
    with pytest.raises(TierpruneError, match="has no 'text' field") as info:
        load_texts(f"c4:{no_text_json}", "train")
    assert str(no_text_json) in str(info.value)

    not_jsonl = tmp_path / "array.json"
    not_jsonl.write_text('[{"text": "a"},\n {"text": "b"}]\n')
    with pytest.raises(TierpruneError, match="cannot read") as info:
        load_texts(f"c4:{not_jsonl}", "train")
    assert str(not_jsonl) in str(info.value)

    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"text": 1}\n{"text": 2}\n')
    with pytest.raises(TierpruneError, match="must be strings") as info:
        load_texts(f"c4:{numbers}", "train")
    assert str(numbers) in str(info.value)


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Offline hub with an empty cache, so load_dataset fails at once without touching the network."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read these at import time, so the environment alone is too late once imported.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # An empty cache: a machine that once downloaded wikitext would otherwise load it from there.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize(("spec", "split"), [("wikitext2", "test"), ("c4", "train"), ("c4", "validation")])
def test_hub_forms_fail_clearly_offline(hub_offline: None, spec: str, split: str) -> None:
    with pytest.raises(TierpruneError, match=rf"could not load hub dataset .*use {spec}:PATH"):
        load_texts(spec, split)  # type: ignore[arg-type]


def test_a_hub_spec_without_the_hub_is_refused_before_a_run_exists(hub_offline: None, tmp_path: Path,
                                                                  data_dir: Path) -> None:
    """`run` with the default hub data on a machine without the hub: one line before the run is created. It used to
    commit the start step and fail at the first evaluation, leaving a run the corrected command called other."""
    from tierprune.config import config_from_flags
    from tierprune.storage.datasets import check_data_spec
    from tierprune.tasks.run_state import check_run_inputs

    with pytest.raises(TierpruneError, match=r"^--eval: could not load hub dataset 'Salesforce/wikitext' for "
                                             r"'wikitext2' \(the Hugging Face hub is unreachable"):
        check_data_spec("wikitext2", "--eval", "test")
    check_data_spec(f"c4:{data_dir}/c4-subset", "--calib")  # local: no hub needed
    store = tmp_path / "store"
    local = {"calib": f"c4:{data_dir}/c4-subset", "eval": f"wikitext2:{data_dir}/wikitext-2-raw"}
    for flag, spec in (("calib", "c4"), ("eval", "wikitext2")):
        cfg = config_from_flags(**{**local, flag: spec}, plan="smoke", store=str(store), run="r", ft_method="none")
        with pytest.raises(TierpruneError, match=rf"^--{flag}: could not load hub dataset .*use {spec}:PATH"):
            check_run_inputs(cfg)
    assert not store.exists()


def test_an_unreachable_hub_fails_at_once_and_leaves_the_process_offline(monkeypatch, tmp_path: Path) -> None:
    """No hub: one two-second probe, then offline mode (a cached dataset would still load), not ~25 s of retries."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    from tierprune.storage import hub

    probes = []
    monkeypatch.setattr(hub, "hub_reachable", lambda: probes.append(1) or False)
    # Registered so that the offline switch below is undone after the test.
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(TierpruneError, match=r"^could not load hub dataset 'allenai/c4' for 'c4' \(the Hugging "
                                             r"Face hub is unreachable .* not in the local cache\); use c4:PATH"):
        load_texts("c4", "train")
    assert probes == [1]
    assert datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_c4_hub_has_no_test_split() -> None:
    with pytest.raises(TierpruneError, match="no test split"):
        load_texts("c4", "test")


def test_evaluation_uses_c4_validation_and_wikitext_test() -> None:
    # C4 has no test split: `--eval c4` (and c4:PATH) report on validation, as the reference's C4 numbers do.
    from tierprune.storage.datasets import evaluation_split

    assert evaluation_split("c4") == "validation"
    assert evaluation_split("c4:/data/c4-subset") == "validation"
    assert evaluation_split("wikitext2") == "test"
    assert evaluation_split("wikitext2:/data/wikitext-2-raw") == "test"
    assert evaluation_split("text:/data/*.txt") == "test"


@needs_wikitext
def test_held_out_split_only_where_it_differs_from_the_evaluation_text(tmp_path: Path) -> None:
    assert held_out_split(f"wikitext2:{WIKITEXT}") == "validation"
    assert held_out_split("wikitext2") == "validation"  # the hub dataset has all three splits
    test_only = tmp_path / "wikitext"
    test_only.mkdir()
    (test_only / "wiki.test.raw").write_text(" = A = \n")
    assert held_out_split(f"wikitext2:{test_only}") is None
    # C4 is evaluated on its validation split; text and pydoc give the same documents for every split.
    assert held_out_split(f"c4:{DATA / 'c4-subset'}") is None
    assert held_out_split(f"text:{test_only}/*.raw") is None
    assert held_out_split("pydoc") is None
    assert held_out_split(None) is None
