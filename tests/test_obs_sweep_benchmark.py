"""benchmarks/obs_sweep.py on the CPU: both forms of the fixed-mask OBS sweep timed and agreeing; bad shapes refused."""
from __future__ import annotations

import pytest

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("obs_sweep")


def test_both_forms_are_timed_and_agree(bench, capsys) -> None:
    from tierprune.kernels import sparsegpt

    rows = bench.main(["--device", "cpu", "--shapes", "24x64,40x48", "--tokens", "256", "--dtype", "float32"])
    assert [r["shape"] for r in rows] == ["24x64", "40x48"]
    assert all(r["solves_ms"] > 0 and r["columns_ms"] > 0 and r["max_diff"] < 1e-3 for r in rows), rows
    assert "24x64: solves" in capsys.readouterr().out
    assert sparsegpt._solve_fixed_masks_on.__name__ == "_solve_fixed_masks_on"  # the dispatch is put back


@pytest.mark.parametrize("shapes", ["12", "0x16", "axb", ""])
def test_bad_shapes_are_one_argparse_error(bench, shapes, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--shapes", shapes])
    assert exit_info.value.code == 2
    assert "--shapes: expected OUTxIN" in capsys.readouterr().err
