"""Where a profiled kernel's warps wait: the stall reasons of each launch in an Nsight Compute raw CSV, ranked.

Reads what `ncu --import REPORT.ncu-rep --csv --page raw` prints (a row of metric names, a row of units, then one
row per profiled launch) for a report that holds the WarpStateStats section, and prints per launch its duration
and its stall reasons (smsp__average_warps_issue_stalled_<reason>_per_issue_active.ratio, largest first): how
many of a warp's cycles between two of its instructions each reason takes, their sum being ncu's "warp cycles
per issued instruction".

    python benchmarks/ncu_stalls.py prof.csv [--top 8]

docs/kernels.md ("Profiling the wgmma prefill loop") has the ncu commands that make the report.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
DURATION = "gpu__time_duration.sum"


def launches(rows: list[list[str]]) -> list[dict]:
    """[{id, kernel, duration (with unit), stalls {reason: warps per issue}}] of a raw page's rows."""
    if len(rows) < 2:
        raise ValueError("not an ncu raw page: fewer than two rows (names, units)")
    names, units = rows[0], rows[1]
    if "ID" not in names or "Kernel Name" not in names:
        raise ValueError("not an ncu raw page: no 'ID' and 'Kernel Name' columns")
    column = {name: i for i, name in enumerate(names)}
    stall_columns = {m.group(1): i for name, i in column.items() if (m := STALL.match(name))}
    if not stall_columns:
        raise ValueError("no stall reasons in this report: profile with --section WarpStateStats")
    out = []
    for row in rows[2:]:
        if len(row) != len(names) or not row[column["ID"]].strip().isdigit():
            continue  # a units row repeated, a blank line
        stalls = {reason: _number(row[i]) for reason, i in stall_columns.items()}
        duration = (f"{row[column[DURATION]]} {units[column[DURATION]]}".strip() if DURATION in column else "")
        out.append({"id": int(row[column["ID"]]), "kernel": row[column["Kernel Name"]], "duration": duration,
                    "stalls": {r: v for r, v in stalls.items() if v is not None}})
    return out


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path, help="ncu --import REPORT --csv --page raw > this file")
    parser.add_argument("--top", type=int, default=8, help="reasons shown per launch")
    args = parser.parse_args(argv)
    try:
        with open(args.csv, newline="") as f:
            found = launches([row for row in csv.reader(f) if row])
    except (OSError, ValueError) as error:
        sys.exit(f"error: {args.csv}: {error}")
    for launch in found:
        total = sum(launch["stalls"].values())
        ranked = sorted(launch["stalls"].items(), key=lambda item: -item[1])[: args.top]
        print(f"launch {launch['id']} {launch['kernel'][:60]} {launch['duration']}: {total:.1f} cycles per "
              "issue; " + ", ".join(f"{reason} {value:.2f}" for reason, value in ranked))


if __name__ == "__main__":
    main()
