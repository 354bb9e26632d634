"""Cache keys: a change that can change a result recomputes the step; anything else does not."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tierprune.storage.runstore import RunStore
from tierprune.tasks import refs
from tierprune.tasks.refs import ArtifactRef, code_version, committed_or_compute, source_files, step_key

REPO = Path(__file__).resolve().parents[2]
PACKAGE_FOLDERS = ("tierprune", "kernels", "tasks", "flows", "storage", "schedules")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the project's source folders, README and tests, to edit freely."""
    for name in (*PACKAGE_FOLDERS, "tests"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    return tmp_path


def _version(root: Path) -> str:
    return code_version([root / name for name in PACKAGE_FOLDERS])


def test_every_source_file_of_the_package_is_covered() -> None:
    names = {f"{p.parent.name}/{p.name}" for p in source_files()}
    # Not only kernels/ and tasks/: the adapters, model loading, the store and the wiring decide results too.
    for expected in ("tierprune/adapters.py", "tierprune/models.py", "tasks/refs.py", "tasks/demote.py",
                     "storage/runstore.py", "storage/formats.py", "kernels/tiers.py", "flows/progressive.py"):
        assert expected in names, expected
    assert not any("tests" in p.parts for p in source_files())


@pytest.mark.parametrize("edit", ["kernels/tiers.py", "tierprune/adapters.py", "tierprune/models.py",
                                  "tasks/demote.py", "storage/formats.py"])
def test_a_change_to_a_source_file_changes_the_code_version(checkout: Path, edit: str) -> None:
    before = _version(checkout)
    path = checkout / edit
    path.write_text(path.read_text().replace("return", "return  ", 1))
    assert _version(checkout) != before


def test_readme_and_tests_do_not_change_the_code_version(checkout: Path) -> None:
    before = _version(checkout)
    (checkout / "README.md").write_text("another readme\n")
    (checkout / "tests" / "test_new.py").write_text("def test_x():\n    assert 1 + 1 == 2\n")
    (checkout / "tests" / "conftest.py").write_text("# edited\n")
    assert _version(checkout) == before


def test_library_versions_are_part_of_the_code_version(checkout: Path, monkeypatch) -> None:
    before = _version(checkout)
    monkeypatch.setattr(refs, "_library_versions", lambda: {"torch": "9.9", "transformers": "1.0", "peft": "absent"})
    assert _version(checkout) != before


def test_a_committed_step_is_reused_only_under_the_same_code(mem_root: str, monkeypatch) -> None:
    store = RunStore(mem_root, "r")
    store.create({"fingerprint": "test"})
    calls = []

    def compute() -> dict:
        calls.append(1)
        return {"eval.json": {"ppl": 1.0 + len(calls)}}

    first = committed_or_compute(store, 1, "eval", {"x": 1}, compute)
    again = committed_or_compute(store, 1, "eval", {"x": 1}, compute)
    assert len(calls) == 1 and again.uri == first.uri and isinstance(again, ArtifactRef)
    assert again.seconds == pytest.approx(first.seconds)  # the recorded compute time, not the lookup's
    # A result-affecting source change (a new code version): a new key, so the step is computed again.
    monkeypatch.setattr(refs, "code_version", lambda roots=None: "0.1.0+edited")
    changed = committed_or_compute(store, 1, "eval", {"x": 1}, compute)
    assert len(calls) == 2 and changed.uri != first.uri
    assert step_key("eval", {"x": 1}) != step_key("eval", {"x": 1}, code="0.1.0+other")
