"""tierprune/plan.py: loading, the three file forms, round trips, fingerprints and every validation error."""
from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest
import yaml

from tierprune.config import PruneConfig
from tierprune.errors import TierpruneError
from tierprune.plan import PLAN_COLUMNS, Plan, PlanStep, load_plan, plan_fingerprint

pytestmark = pytest.mark.unit

PLANS = Path(__file__).parents[1] / "schedules" / "plans"
HEADER = ",".join(PLAN_COLUMNS)
SMOKE = f"""{HEADER}
1,0.80,0.20,0.00,0.20,0.00,0.1
2,0.55,0.35,0.10,0.25,0.10,0.1
3,0.35,0.45,0.20,0.20,0.10,0.1
"""
SMOKE_ROWS = [
    {"iteration": 1, "dense": 0.80, "mid_2_4": 0.20, "topk": 0.00, "dense_to_2_4": 0.20, "mid_2_4_to_topk": 0.00,
     "epochs": 0.1},
    {"iteration": 2, "dense": 0.55, "mid_2_4": 0.35, "topk": 0.10, "dense_to_2_4": 0.25, "mid_2_4_to_topk": 0.10,
     "epochs": 0.1},
    {"iteration": 3, "dense": 0.35, "mid_2_4": 0.45, "topk": 0.20, "dense_to_2_4": 0.20, "mid_2_4_to_topk": 0.10,
     "epochs": 0.1},
]


def _error(tmp_path: Path, text: str, name: str = "bad.csv") -> str:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TierpruneError) as info:
        load_plan(str(path))
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert str(path) in message
    return message


def _edit(row: int, column: str, value: str, text: str = SMOKE) -> str:
    """SMOKE with one cell of data row `row` (1-based) replaced."""
    lines = text.splitlines()
    cells = lines[row].split(",")
    cells[PLAN_COLUMNS.index(column)] = value
    lines[row] = ",".join(cells)
    return "\n".join(lines) + "\n"


# --- the example plans -----------------------------------------------------------------------------------


def test_smoke_plan_loads():
    plan = load_plan(str(PLANS / "smoke.csv"))
    assert [s.iteration for s in plan.steps] == [1, 2, 3]
    assert [s.fractions for s in plan.steps] == [(0.80, 0.20, 0.00), (0.55, 0.35, 0.10), (0.35, 0.45, 0.20)]
    assert all(s.epochs == 0.1 for s in plan.steps)
    assert plan.final == pytest.approx(PruneConfig().tiers)


def test_llama2_plan_loads():
    plan = load_plan(PLANS / "llama2-5iter.csv")  # a Path works too
    assert [s.iteration for s in plan.steps] == [1, 2, 3, 4, 5]
    assert plan.final == pytest.approx((0.35, 0.45, 0.20))
    assert all(s.epochs == 1 for s in plan.steps)
    assert sum(s.dense_to_2_4 for s in plan.steps) == pytest.approx(1 - 0.35)
    assert sum(s.mid_2_4_to_topk for s in plan.steps) == pytest.approx(0.20)


# --- forms ----------------------------------------------------------------------------------------------


def test_csv_text_yaml_and_json_forms_are_equal(tmp_path):
    from_text = load_plan(SMOKE)
    assert from_text == load_plan(str(PLANS / "smoke.csv"))
    forms = {
        "list.yaml": yaml.safe_dump(SMOKE_ROWS),
        "steps.yml": yaml.safe_dump({"steps": SMOKE_ROWS}),
        "list.json": json.dumps(SMOKE_ROWS),
        "steps.JSON": json.dumps({"steps": SMOKE_ROWS}),
        "plan.csv": SMOKE,
    }
    for name, text in forms.items():
        (tmp_path / name).write_text(text)
        assert load_plan(str(tmp_path / name)) == from_text, name
    assert Plan.from_rows(SMOKE_ROWS) == from_text


def test_fsspec_url(tmp_path):
    with fsspec.open("memory://plans/smoke.yaml", "w") as f:
        f.write(yaml.safe_dump({"steps": SMOKE_ROWS}))
    assert load_plan("memory://plans/smoke.yaml") == load_plan(SMOKE)
    assert load_plan(f"file://{PLANS / 'smoke.csv'}") == load_plan(SMOKE)


def test_iteration_zero_comments_blank_lines_and_spaces_are_accepted():
    text = f"# the dense start may be written out\n{HEADER}\n0, 1, 0, 0, 0, 0, 0\n" + SMOKE.split("\n", 1)[1] + "\n\n"
    assert load_plan(text) == load_plan(SMOKE)
    rows = [{"iteration": 0, **{c: 0 for c in PLAN_COLUMNS[1:]}, "dense": 1}, *SMOKE_ROWS]
    assert Plan.from_rows(rows, "x") == load_plan(SMOKE)


def test_numeric_strings_in_yaml_and_float_noise():
    rows = [{k: str(v) for k, v in row.items()} for row in SMOKE_ROWS]
    rows[0]["iteration"] = "1.0"
    assert Plan.from_rows(rows) == load_plan(SMOKE)
    noisy = [dict(row) for row in SMOKE_ROWS]
    noisy[1]["dense_to_2_4"] = 0.80 - 0.55  # 0.25000000000000006
    assert plan_fingerprint(Plan.from_rows(noisy)) == plan_fingerprint(load_plan(SMOKE))


def test_to_rows_round_trip():
    plan = load_plan(str(PLANS / "llama2-5iter.csv"))
    rows = plan.to_rows()
    assert [list(r) for r in rows] == [list(PLAN_COLUMNS)] * 5
    assert Plan.from_rows(rows, "rows") == plan
    text = HEADER + "\n" + "\n".join(",".join(str(r[c]) for c in PLAN_COLUMNS) for r in rows)
    assert load_plan(text) == plan
    assert Plan.from_rows(json.loads(json.dumps(rows))) == plan
    assert load_plan(SMOKE).to_rows() == SMOKE_ROWS


def test_step_lookup():
    plan = load_plan(SMOKE)
    assert plan.step(2).fractions == (0.55, 0.35, 0.10)
    assert plan.step(0).fractions == (1.0, 0.0, 0.0) and plan.step(0).epochs == 0
    with pytest.raises(TierpruneError, match=r"iterations 1\.\.3, no iteration 4"):
        plan.step(4)


# --- fingerprint ----------------------------------------------------------------------------------------


def test_fingerprint_stable_and_sensitive(tmp_path):
    plan = load_plan(SMOKE)
    fp = plan_fingerprint(plan)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert plan_fingerprint(load_plan(SMOKE)) == fp
    (tmp_path / "p.json").write_text(json.dumps({"steps": SMOKE_ROWS}))
    assert plan_fingerprint(load_plan(str(tmp_path / "p.json"))) == fp
    assert fp == plan_fingerprint(Plan.from_rows(SMOKE_ROWS))
    # pinned: changing the canonical form silently would orphan every recorded run manifest
    assert fp == "04758f9eaa1ff4843984700b405a44eb9d234c67d66fbede3e3831a036deeba3"
    seen = {fp}
    for row, column, value in [(3, "epochs", "0.2"), (1, "epochs", "0"),
                               (3, "dense", "0.34"), (3, "mid_2_4", "0.46")]:
        text = _edit(row, column, value)
        if column == "dense":
            text = _edit(3, "mid_2_4", "0.46", _edit(3, "dense_to_2_4", "0.21", text))
        elif column == "mid_2_4":
            text = _edit(3, "dense", "0.34", _edit(3, "dense_to_2_4", "0.21", text))
        seen.add(plan_fingerprint(load_plan(text)))
    assert len(seen) == 4  # the two dense/mid edits describe the same plan
    longer = SMOKE + "4,0.35,0.45,0.20,0.00,0.00,1\n"
    assert plan_fingerprint(load_plan(longer)) not in seen


# --- errors: each names the file, the row and the column, on one line ----------------------------------

ERROR_CASES = {
    "missing column": (SMOKE.replace(",epochs\n", "\n", 1), ["header row", "missing column 'epochs'"]),
    "extra column": (SMOKE.replace("epochs\n", "epochs,notes\n", 1), ["header row", "unknown column 'notes'"]),
    "misspelled column": (SMOKE.replace(",dense,", ",dens,", 1),
                          ["header row", "column 'dens' is misspelled", "did you mean 'dense'"]),
    "wrong case": (SMOKE.replace(",topk,", ",TopK,", 1), ["header row", "'TopK'", "'topk'"]),
    "duplicate column": (SMOKE.replace("epochs\n", "epochs,dense\n", 1), ["header row", "'dense' appears twice"]),
    "non-numeric": (_edit(2, "dense", "abc"), ["row 2 (iteration 2)", "column 'dense'", "not a number: 'abc'"]),
    "empty cell": (_edit(3, "topk", ""), ["row 3 (iteration 3)", "column 'topk'", "empty cell"]),
    "nan": (_edit(1, "epochs", "nan"), ["row 1 (iteration 1)", "column 'epochs'", "finite"]),
    "non-numeric iteration": (_edit(2, "iteration", "two"), ["row 2", "column 'iteration'", "not a number"]),
    "fractional iteration": (_edit(2, "iteration", "2.5"), ["row 2", "column 'iteration'", "whole number"]),
    "too few cells": (SMOKE.replace("0.10,0.1\n3", "0.10\n3", 1), ["row 2", "column 'epochs'", "missing cell"]),
    "too many cells": (SMOKE.replace("0.10,0.1\n3", "0.10,0.1,7\n3", 1), ["row 2", "'epochs'", "extra cell"]),
    "fraction above 1": (_edit(2, "mid_2_4", "1.2"), ["row 2 (iteration 2)", "column 'mid_2_4'", "[0, 1]"]),
    "fraction below 0": (_edit(1, "mid_2_4_to_topk", "-0.1"), ["row 1", "column 'mid_2_4_to_topk'", "[0, 1]"]),
    "sum not 1": (_edit(3, "dense", "0.30"),
                  ["row 3 (iteration 3)", "column 'dense+mid_2_4+topk'", "sum to 1", "0.3+0.45+0.2 = 0.95"]),
    "iteration gap": (_edit(3, "iteration", "4"), ["row 3 (iteration 4)", "column 'iteration'", "expected 3 (", "got 4"]),
    "iteration repeated": (_edit(3, "iteration", "2"), ["row 3 (iteration 2)", "column 'iteration'", "expected 3"]),
    "starts at 2": (f"{HEADER}\n2,0.80,0.20,0.00,0.20,0.00,0.1\n",
                    ["row 1 (iteration 2)", "column 'iteration'", "expected 1"]),
    "dense rises": (_edit(2, "mid_2_4", "0.05", _edit(2, "dense", "0.85")),
                    ["row 2 (iteration 2)", "column 'dense'", "dense rises from 0.8 (iteration 1) to 0.85"]),
    "dense rises from the start": (f"{HEADER}\n1,1.0,0.0,0.0,0.0,0.0,1\n2,0.9,0.1,0,0.1,0,1\n3,1.0,0,0,0,0,1\n",
                                   ["row 3 (iteration 3)", "column 'dense'", "rises"]),
    "topk falls": (_edit(3, "mid_2_4", "0.60", _edit(3, "topk", "0.05")),
                   ["row 3 (iteration 3)", "column 'topk'", "topk falls from 0.1 (iteration 2) to 0.05"]),
    "dense move wrong": (_edit(2, "dense_to_2_4", "0.20"),
                         ["row 2 (iteration 2)", "column 'dense_to_2_4'", "inconsistent", "a move of 0.25"]),
    "topk move wrong": (_edit(3, "mid_2_4_to_topk", "0.05"),
                        ["row 3 (iteration 3)", "column 'mid_2_4_to_topk'", "inconsistent", "a move of 0.1"]),
    "first move measured from the dense start": (_edit(1, "dense_to_2_4", "0.0"),
                                                 ["row 1", "'dense_to_2_4'", "the dense start"]),
    "negative epochs": (_edit(2, "epochs", "-1"), ["row 2 (iteration 2)", "column 'epochs'", ">= 0"]),
    "iteration 0 not dense": (f"{HEADER}\n0,0.9,0.1,0,0.1,0,0\n" + SMOKE.split("\n", 1)[1],
                              ["row 1 (iteration 0)", "column 'dense'", "all-dense start"]),
    "iteration 0 with epochs": (f"{HEADER}\n0,1,0,0,0,0,2\n" + SMOKE.split("\n", 1)[1],
                                ["row 1 (iteration 0)", "column 'epochs'", "all-dense start"]),
    "header only": (f"{HEADER}\n", ["empty plan"]),
    "only iteration 0": (f"{HEADER}\n0,1,0,0,0,0,0\n", ["empty plan"]),
    "empty file": ("\n", ["empty plan"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_csv_errors_name_file_row_and_column(tmp_path, case):
    text, expected = ERROR_CASES[case]
    message = _error(tmp_path, text)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_csv_text_errors_are_labelled():
    with pytest.raises(TierpruneError, match=r"^plan text, row 2 \(iteration 2\), column 'dense': not a number"):
        load_plan(_edit(2, "dense", "x"))


YAML_CASES = {
    "misspelled key": ([{**SMOKE_ROWS[0]}, {**{("dens" if k == "dense" else k): v for k, v in SMOKE_ROWS[1].items()}}],
                       ["row 2:", "column 'dens' is misspelled", "'dense'"]),
    "extra key": ([{**SMOKE_ROWS[0], "note": "x"}], ["row 1:", "unknown column 'note'"]),
    "missing key": ([{k: v for k, v in SMOKE_ROWS[0].items() if k != "topk"}], ["row 1:", "missing column 'topk'"]),
    "boolean": ([{**SMOKE_ROWS[0], "epochs": True}], ["row 1 (iteration 1)", "column 'epochs'", "not a number"]),
    "null": ([SMOKE_ROWS[0], {**SMOKE_ROWS[1], "topk": None}], ["row 2 (iteration 2)", "column 'topk'", "empty"]),
    "not a mapping": ([SMOKE_ROWS[0], [1, 2]], ["row 2:", "expected a mapping"]),
    "empty list": ([], ["empty plan"]),
    "empty steps": ({"steps": []}, ["empty plan"]),
    "other top-level key": ({"steps": SMOKE_ROWS, "name": "x"}, ["single key 'steps'", "'name'"]),
    "not a list": ({"steps": "abc"}, ["expected a list of rows", "str"]),
    "move wrong": ([SMOKE_ROWS[0], {**SMOKE_ROWS[1], "mid_2_4_to_topk": 0.2}],
                   ["row 2 (iteration 2)", "column 'mid_2_4_to_topk'", "inconsistent"]),
}


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("case", list(YAML_CASES))
def test_yaml_and_json_errors(tmp_path, case, suffix):
    document, expected = YAML_CASES[case]
    text = yaml.safe_dump(document) if suffix == ".yaml" else json.dumps(document)
    message = _error(tmp_path, text, "bad" + suffix)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_file_level_errors(tmp_path):
    assert "not valid YAML" in _error(tmp_path, "- iteration: 1\n  dense: [0.5\n", "broken.yaml")
    assert "not valid JSON" in _error(tmp_path, "[{", "broken.json")
    for target, part in [(str(tmp_path / "missing.csv"), "not found"), (str(tmp_path / "plan.txt"), ".csv, .yaml"),
                         ("", "nor CSV text")]:
        with pytest.raises(TierpruneError, match=part) as info:
            load_plan(target)
        assert "\n" not in str(info.value)
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(TierpruneError):
        load_plan(str(tmp_path / "dir.csv"))


def test_direct_construction_is_validated():
    steps = Plan.from_rows(SMOKE_ROWS).steps
    assert Plan(steps=steps).steps == steps
    with pytest.raises(TierpruneError, match="empty plan"):
        Plan(steps=())
    with pytest.raises(TierpruneError, match=r"plan, iteration 3, column 'iteration': expected 2"):
        Plan(steps=(steps[0], steps[2]))
    with pytest.raises(TierpruneError, match=r"iteration 1, column 'dense\+mid_2_4\+topk'"):
        PlanStep(iteration=1, dense=0.5, mid_2_4=0.2, topk=0.2, dense_to_2_4=0.5, mid_2_4_to_topk=0.2, epochs=1)
    with pytest.raises(Exception):  # frozen
        steps[0].epochs = 2  # type: ignore[misc]
