"""benchmarks/ncu_stalls.py on a raw page written by hand in ncu's layout; --profile's and --ablate's refusal of
a bad variant name."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from .conftest import BENCHMARKS, load_benchmark

STALL = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
HEADER = ["ID", "Process ID", "Kernel Name", "gpu__time_duration.sum", STALL.format("long_scoreboard"),
          STALL.format("barrier"), STALL.format("math_pipe_throttle"), "smsp__warps_active.avg"]
UNITS = ["", "", "", "usecond", "", "", "", "warp"]


def _write(path, rows) -> None:
    path.write_text("\n".join(",".join(f'"{cell}"' for cell in row) for row in rows) + "\n")


def test_ranks_each_launchs_stall_reasons(tmp_path) -> None:
    csv_path = tmp_path / "prof.csv"
    _write(csv_path, [HEADER, UNITS, ["0", "77", "wgmma_prefill", "312.5", "1.25", "3.50", "0.75", "8"],
                      ["1", "77", "wgmma_prefill", "1,204.0", "n/a", "0.10", "2.00", "8"]])
    with open(csv_path, newline="") as f:
        found = load_benchmark("ncu_stalls").launches(list(csv.reader(f)))
    assert [launch["id"] for launch in found] == [0, 1]
    assert found[0]["stalls"] == {"long_scoreboard": 1.25, "barrier": 3.5, "math_pipe_throttle": 0.75}
    assert found[1]["stalls"] == {"barrier": 0.1, "math_pipe_throttle": 2.0}  # "n/a" left out
    assert found[0]["duration"] == "312.5 usecond"
    out = subprocess.run([sys.executable, str(BENCHMARKS / "ncu_stalls.py"), str(csv_path), "--top", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first.startswith("launch 0 wgmma_prefill 312.5 usecond: 5.5 cycles per issue; barrier 3.50, "
                            "long_scoreboard 1.25"), first
    assert "math_pipe_throttle 2.00, barrier 0.10" in second and "long_scoreboard" not in second, second


def test_a_report_without_stall_reasons_is_one_line(tmp_path) -> None:
    csv_path = tmp_path / "prof.csv"
    _write(csv_path, [["ID", "Kernel Name", "gpu__time_duration.sum"], ["", "", "usecond"], ["0", "k", "1.0"]])
    out = subprocess.run([sys.executable, str(BENCHMARKS / "ncu_stalls.py"), str(csv_path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "--section WarpStateStats" in out.stderr


def test_profile_and_ablate_refuse_an_unknown_variant_before_touching_a_gpu(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports hybrid_kernels as a sibling
    bench = load_benchmark("wgmma_prefill")
    with pytest.raises(SystemExit, match="unknown variant.*no-such-thing.*choose from kernel"):
        bench.profile(["kernel", "no-such-thing"], 2048)
    with pytest.raises(SystemExit, match="--ablate: unknown variant.*no-such-thing"):
        bench.ablate(["no-such-thing"], None, 2048)
