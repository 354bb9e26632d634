"""benchmarks/prefill_ceiling.py's tier-map part on the CPU: hand-worked work counts and a run's tier table."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tierprune.kernels.tiers import DENSE, NM_2_4, TOPK
from tierprune.tasks.tier_tables import tier_table

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("prefill_ceiling")


def test_per_block_pairs_sparse_blocks_in_each_row(bench) -> None:
    # Row 0: 3 sparse of 4 -> one pair (1) + a lone one (1) + the dense block (1) = 3; row 1: two pairs = 2.
    sparse = np.array([[True, True, True, False], [True, True, True, True]])
    assert bench.per_block_work(sparse) == pytest.approx(5 / 8)


def test_a_64_row_tile_runs_dense_where_any_of_its_rows_is(bench) -> None:
    dense = np.zeros((4, 4), bool)
    dense[0, 0] = True  # column 0 dense for all 4 rows; columns 1-3: a pair and a lone one
    assert bench.tile_work(dense, [np.arange(4)]) == pytest.approx(12 / 16)
    assert bench.sparse_pair_fraction(dense, [np.arange(4)]) == pytest.approx(8 / 16)  # columns 1-2, all 4 rows


def test_rows_grouped_by_their_dense_columns(bench) -> None:
    dense = np.zeros((8, 5), bool)
    dense[0::2, 0] = True
    dense[1::2, 1] = True
    groups = bench.grouped_rows(dense)
    assert sorted(map(sorted, (g.tolist() for g in groups))) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    natural = [np.arange(0, 4), np.arange(4, 8)]
    # Grouped: 1 dense column + 2 pairs = 3 of 5 per row; in order: 2 dense + a pair + a lone one = 4 of 5.
    assert bench.tile_work(dense, groups) == pytest.approx(3 / 5)
    assert bench.tile_work(dense, natural) == pytest.approx(4 / 5)


def test_report_reads_a_runs_tier_table(bench, tmp_path, capsys) -> None:
    tier_map = torch.full((8, 5), NM_2_4, dtype=torch.int8)
    tier_map[0::2, 0] = DENSE
    tier_map[1::2, 1] = DENSE
    tier_map[0, 4] = TOPK  # sparse, like a 2:4 block
    path = tmp_path / "tiers.parquet"
    tier_table({"model.layers.0.mlp.up_proj": tier_map}).to_parquet(path)
    bench.main(["--tier-table", str(path)])
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("model.layers.0.mlp.up_proj")).split()
    # Every row: a dense block and 2 pairs (3 of 5); 64-row tiles in order: 2 dense columns, a pair, a lone one.
    assert row[1:] == ["40", "0.20", "0.600", "0.800", "0.600"]
    assert lines[-1] == "blocks Dense / 2:4 / TopK: 20.0% / 77.5% / 2.5%"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_without_a_gpu_it_asks_for_a_tier_table(bench) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main([])
    assert exit_info.value.code == 2


def _assert_no_spills(report: str, name: str) -> None:
    """ptxas -v's report (ptxas_report) says kernel `name` has no stack frame and no spills."""
    properties = report.split(f"Function properties for {name}\n")[1].split("Function properties for")[0]
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in properties, (name, properties)


def test_the_wgmma_rate_kernels_assemble_for_sm_90a_without_spills(bench, tmp_path) -> None:
    from .kernels.test_mma_decode import nvrtc_ptx, ptxas_report

    ptx = nvrtc_ptx(bench.wgmma_source(), "sm_90a")
    for name, (sparse, _) in bench._WGMMA_KERNELS.items():
        body = ptx.split(f".entry {name}(")[1].split(".entry ")[0]
        shape = "sp.sync.aligned.m64n256k32" if sparse else "sync.aligned.m64n256k16"
        assert f"wgmma.mma_async.{shape}.f32.bf16.bf16" in body, name
    report = ptxas_report(ptx, tmp_path, arch="sm_90a", isa="8.2")
    for name in bench._WGMMA_KERNELS:
        _assert_no_spills(report, name)


def test_the_wgmma_loop_variants_assemble_for_sm_90a_without_spills_or_serialization(tmp_path) -> None:
    from .kernels.test_mma_decode import nvrtc_ptx, ptxas_report

    loops = load_benchmark("wgmma_loop_rates")
    ptx = nvrtc_ptx(loops.source(), "sm_90a")
    report = ptxas_report(ptx, tmp_path, arch="sm_90a", isa="8.2")
    for index in range(len(loops.VARIANTS)):
        name = loops.kernel_name(index)
        assert f".entry {name}(" in ptx
        _assert_no_spills(report, name)
    assert "serialized" not in report, report  # C7514/C7520: wgmma would not overlap, the rate would mean nothing
