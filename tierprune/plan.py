"""Progressive plans: per iteration, the tier fractions to reach, the blocks moved and the fine-tuning epochs.

A plan is a CSV (or YAML/JSON list of mappings) with the columns of ``PLAN_COLUMNS``. Row k holds the
fractions of blocks that are dense / 2:4 / TopK after iteration k, the fractions of *all* blocks moved
in that iteration (dense -> 2:4, 2:4 -> TopK) and the epochs to fine-tune afterwards. Blocks only move
down, so dense never rises and topk never falls. Iteration 0, the dense start, may be written out and is
dropped after it is checked.
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, model_validator

from .errors import TierpruneError

__all__ = ["PLAN_COLUMNS", "PlanStep", "Plan", "load_plan", "plan_fingerprint", "shipped_plans"]

PLAN_COLUMNS = ("iteration", "dense", "mid_2_4", "topk", "dense_to_2_4", "mid_2_4_to_topk", "epochs")
_FRACTIONS = PLAN_COLUMNS[1:6]
_TOL = 1e-6  # fractions are written with a few decimals; sums of them carry float noise
_DENSE_START = {"dense": 1.0, "mid_2_4": 0.0, "topk": 0.0,
                "dense_to_2_4": 0.0, "mid_2_4_to_topk": 0.0, "epochs": 0.0}
_SUFFIXES = {".csv": "csv", ".yaml": "yaml", ".yml": "yaml", ".json": "json"}
_FINGERPRINT_FORMAT = "tierprune.plan/1"


def _error(message: str) -> TierpruneError:
    """TierpruneError whose message is guaranteed to be one line (the CLI prints it as such)."""
    return TierpruneError(" ".join(message.split()))


def _fail(where: str, column: str, problem: str) -> NoReturn:
    raise _error(f"{where}, column {column!r}: {problem}")


def _check_step(values: Mapping[str, Any], where: str) -> None:
    """One row on its own: fractions in [0, 1] summing to 1, epochs >= 0, all finite."""
    for column in PLAN_COLUMNS[1:]:
        if not math.isfinite(values[column]):
            _fail(where, column, f"must be a finite number, got {values[column]}")
    for column in _FRACTIONS:
        if not 0.0 <= values[column] <= 1.0:
            _fail(where, column, f"fraction must lie in [0, 1], got {values[column]:g}")
    total = values["dense"] + values["mid_2_4"] + values["topk"]
    if abs(total - 1.0) > _TOL:
        _fail(where, "dense+mid_2_4+topk",
              f"tier fractions must sum to 1, got {values['dense']:g}+{values['mid_2_4']:g}+{values['topk']:g}"
              f" = {total:g}")
    if values["epochs"] < 0:
        _fail(where, "epochs", f"must be >= 0, got {values['epochs']:g}")


class PlanStep(BaseModel):
    """Targets after one iteration, the moves that reach them (fractions of all blocks) and the epochs after."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    iteration: int
    dense: float
    mid_2_4: float
    topk: float
    dense_to_2_4: float
    mid_2_4_to_topk: float
    epochs: float

    @model_validator(mode="after")
    def _valid(self) -> PlanStep:
        _check_step(self.__dict__, f"plan step, iteration {self.iteration}")
        return self

    @property
    def fractions(self) -> tuple[float, float, float]:
        """(dense, 2:4, topk) fractions of blocks after this iteration."""
        return (self.dense, self.mid_2_4, self.topk)


_START = PlanStep(iteration=0, **_DENSE_START)


def _check_sequence(steps: Sequence[PlanStep], wheres: Sequence[str]) -> None:
    """Iterations 1..n, tiers only moving down from the dense start, moves equal to the target changes."""
    prev = _START
    for index, (step, where) in enumerate(zip(steps, wheres)):
        if step.iteration != index + 1:
            _fail(where, "iteration", f"expected {index + 1} (iterations count up by one from 1, "
                                      f"or from 0 for the dense start), got {step.iteration}")
        before = "the dense start" if prev.iteration == 0 else f"iteration {prev.iteration}"
        if step.dense > prev.dense + _TOL:
            _fail(where, "dense", f"tiers only move down, but dense rises from {prev.dense:g} ({before}) "
                                  f"to {step.dense:g}")
        if step.topk < prev.topk - _TOL:
            _fail(where, "topk", f"tiers only move down, but topk falls from {prev.topk:g} ({before}) "
                                 f"to {step.topk:g}")
        moved = prev.dense - step.dense
        if abs(moved - step.dense_to_2_4) > _TOL:
            _fail(where, "dense_to_2_4", f"move inconsistent with the targets: dense goes {prev.dense:g} -> "
                                         f"{step.dense:g} ({before} -> this row), a move of {moved:g}, "
                                         f"but dense_to_2_4 is {step.dense_to_2_4:g}")
        moved = step.topk - prev.topk
        if abs(moved - step.mid_2_4_to_topk) > _TOL:
            _fail(where, "mid_2_4_to_topk", f"move inconsistent with the targets: topk goes {prev.topk:g} -> "
                                            f"{step.topk:g} ({before} -> this row), a move of {moved:g}, "
                                            f"but mid_2_4_to_topk is {step.mid_2_4_to_topk:g}")
        prev = step


class Plan(BaseModel):
    """Iterations 1..n in order; mid_2_4 follows from the two moves since the fractions sum to 1."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: tuple[PlanStep, ...]

    @model_validator(mode="after")
    def _valid(self) -> Plan:
        if not self.steps:
            raise _error("plan: empty plan, it needs at least one iteration")
        _check_sequence(self.steps, [f"plan, iteration {s.iteration}" for s in self.steps])
        return self

    def step(self, iteration: int) -> PlanStep:
        """The step of an iteration, 1..n; 0 gives the all-dense start."""
        if iteration == 0:
            return _START
        if not 1 <= iteration <= len(self.steps):
            raise _error(f"plan has iterations 1..{len(self.steps)}, no iteration {iteration}")
        return self.steps[iteration - 1]

    @property
    def final(self) -> tuple[float, float, float]:
        """(dense, 2:4, topk) fractions after the last iteration."""
        return self.steps[-1].fractions

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]], source: str = "plan rows") -> Plan:
        """Rows keyed by PLAN_COLUMNS (cells numbers or numeric strings); source names them in errors."""
        if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Sequence):
            raise _error(f"{source}: expected a list of rows with columns {','.join(PLAN_COLUMNS)}, "
                         f"got {type(rows).__name__}")
        parsed: list[tuple[str, dict[str, Any]]] = []
        for number, row in enumerate(rows, 1):
            where = f"{source}, row {number}"
            if not isinstance(row, Mapping):
                raise _error(f"{where}: expected a mapping with columns {','.join(PLAN_COLUMNS)}, "
                             f"got {type(row).__name__}")
            _check_columns([str(key) for key in row], where)
            row = {str(key): value for key, value in row.items()}
            iteration = _number(row["iteration"], where, "iteration", whole=True)
            where = f"{where} (iteration {iteration})"
            values = {"iteration": iteration} | {c: _number(row[c], where, c) for c in PLAN_COLUMNS[1:]}
            _check_step(values, where)
            parsed.append((where, values))
        if parsed and parsed[0][1]["iteration"] == 0:
            where, values = parsed.pop(0)
            for column, want in _DENSE_START.items():
                if abs(values[column] - want) > _TOL:
                    _fail(where, column, f"iteration 0 is the all-dense start "
                                         f"(dense 1, mid_2_4 0, topk 0, no moves, epochs 0), so {column} must "
                                         f"be {want:g}, got {values[column]:g}")
        if not parsed:
            raise _error(f"{source}: empty plan, it needs at least one iteration after the dense start")
        steps = [PlanStep(**values) for _, values in parsed]
        _check_sequence(steps, [where for where, _ in parsed])
        return cls(steps=tuple(steps))

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per iteration 1..n keyed by PLAN_COLUMNS; from_rows(to_rows()) gives the plan back."""
        return [step.model_dump() for step in self.steps]


def _check_columns(names: Sequence[str], where: str) -> None:
    """Exactly PLAN_COLUMNS, each once; every problem in one line, misspellings with a suggestion."""
    problems: list[str] = []
    seen: set[str] = set()
    for name in names:
        if name in seen:
            problems.append(f"column {name!r} appears twice")
        seen.add(name)
    missing = [c for c in PLAN_COLUMNS if c not in seen]
    for name in dict.fromkeys(n for n in names if n not in PLAN_COLUMNS):
        close = difflib.get_close_matches(name.lower(), missing, n=1, cutoff=0.6)
        if close:
            problems.append(f"column {name!r} is misspelled, did you mean {close[0]!r}?")
            missing.remove(close[0])
        else:
            problems.append(f"unknown column {name!r}")
    problems += [f"missing column {c!r}" for c in missing]
    if problems:
        raise _error(f"{where}: {'; '.join(problems)} (the columns are {','.join(PLAN_COLUMNS)})")


def _number(value: Any, where: str, column: str, whole: bool = False) -> Any:
    """A cell as float (int for whole=True); numeric strings are accepted, booleans are not."""
    if value is None or (isinstance(value, str) and not value.strip()):
        _fail(where, column, "empty cell, expected a number")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        _fail(where, column, f"not a number: {value!r}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        _fail(where, column, f"not a number: {value!r}")
    if not math.isfinite(number):
        _fail(where, column, f"must be a finite number, got {value!r}")
    if whole:
        if not number.is_integer():
            _fail(where, column, f"not a whole number: {value!r}")
        return int(number)
    return number


def _csv_rows(text: str, source: str) -> list[dict[str, str]]:
    """Header + data rows; blank lines and lines starting with '#' are skipped and not counted as rows."""
    lines = [line for line in text.lstrip("\ufeff").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise _error(f"{source}: empty plan, no header and no rows")
    reader = csv.reader(lines)
    header = [name.strip() for name in next(reader)]
    _check_columns(header, f"{source}, header row")
    rows = []
    for number, cells in enumerate(reader, 1):
        where = f"{source}, row {number}"
        if len(cells) > len(header):
            raise _error(f"{where}: {len(cells)} cells for {len(header)} columns "
                         f"(extra cell after column {header[-1]!r})")
        if len(cells) < len(header):
            _fail(where, header[len(cells)], f"missing cell ({len(cells)} cells for {len(header)} columns)")
        rows.append({name: cell.strip() for name, cell in zip(header, cells)})
    return rows


def _document_rows(document: Any, source: str) -> Any:
    """A YAML/JSON document: a list of mappings, or {"steps": [...]}."""
    if document is None:
        raise _error(f"{source}: empty plan, no rows")
    if isinstance(document, Mapping):
        if set(map(str, document)) != {"steps"}:
            raise _error(f"{source}: expected a list of rows or a mapping with the single key 'steps', "
                         f"got keys {', '.join(map(repr, map(str, document)))}")
        return document["steps"]
    return document


def _parse(text: str, kind: str, source: str) -> Plan:
    if kind == "csv":
        return Plan.from_rows(_csv_rows(text, source), source)
    if kind == "json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _error(f"{source}: not valid JSON: {exc}") from None
    else:
        import yaml

        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise _error(f"{source}: not valid YAML: {exc}") from None
    return Plan.from_rows(_document_rows(document, source), source)


def _kind(path: str) -> str | None:
    name = urlsplit(path).path if "://" in path else path
    return next((kind for suffix, kind in _SUFFIXES.items() if name.lower().endswith(suffix)), None)


def shipped_plans() -> dict[str, str]:
    """name -> file of every plan shipped in schedules/plans/ (`smoke` -> .../plans/smoke.csv)."""
    from importlib.resources import files

    folder = files("tierprune.schedules") / "plans"
    return {entry.name.rsplit(".", 1)[0]: str(entry) for entry in sorted(folder.iterdir(), key=lambda e: e.name)
            if _kind(entry.name)}


def load_plan(path_or_text: str | os.PathLike[str]) -> Plan:
    """A plan from a .csv/.yaml/.yml/.json path or fsspec URL, CSV text (anything with a newline), or the name
    of a shipped plan (`smoke`, `llama2-5iter`)."""
    source = os.fspath(path_or_text)
    kind = _kind(source)
    if "\n" in source.strip() or (kind is None and "," in source):
        return _parse(source, "csv", "plan text")
    if kind is None:
        shipped = shipped_plans()
        if source not in shipped:
            raise _error(f"plan {source!r}: not a .csv, .yaml, .yml or .json file, nor CSV text with a header, nor "
                         f"a shipped plan ({', '.join(shipped)})")
        source = shipped[source]
        kind = _kind(source)
    from tierprune.storage.tables import read_text

    try:
        text = read_text(source)
    except FileNotFoundError:
        raise _error(f"plan file {source} not found") from None
    except IsADirectoryError:
        raise _error(f"plan file {source} is a folder") from None
    except (ValueError, ImportError) as exc:  # unknown protocol, or its filesystem package is missing
        raise _error(f"cannot open plan file {source}: {exc}") from None
    return _parse(text, kind, source)


def _canonical(value: float) -> float:
    # Round far below the 1e-6 tolerance so 0.8-0.65 and 0.15 hash alike; +0.0 turns -0.0 into 0.0.
    return round(float(value), 9) + 0.0


def plan_fingerprint(plan: Plan) -> str:
    """sha256 hex of the plan's canonical JSON: the same for every file form, changed by any value."""
    canonical = {
        "format": _FINGERPRINT_FORMAT,
        "columns": list(PLAN_COLUMNS),
        "steps": [[s.iteration, *(_canonical(getattr(s, c)) for c in PLAN_COLUMNS[1:])] for s in plan.steps],
    }
    data = json.dumps(canonical, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()
