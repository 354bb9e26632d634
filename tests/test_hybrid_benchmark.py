"""The GPU benchmark script's logic on the CPU (--tiny): tier placement, packing, table rows, end-to-end model."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tierprune.kernels.tiers import target_counts

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hybrid_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("hybrid_kernels_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("placement", ["random", "clustered"])
def test_tier_maps_have_exact_counts(bench, placement) -> None:
    g = torch.Generator().manual_seed(0)
    tier_map = bench.make_tier_map((4096, 11008), (0.35, 0.45, 0.20), placement, g)
    assert tier_map.shape == (256, 688)
    counts = torch.bincount(tier_map.flatten().long(), minlength=3).tolist()
    assert counts == [61645, 79257, 35226] == list(target_counts(256 * 688, (0.35, 0.45, 0.20)))
    # Clustered: most horizontal neighbours share a tier; random: about 1 - sum(p²) = 0.63 differ.
    differ = (tier_map[:, 1:] != tier_map[:, :-1]).float().mean().item()
    assert differ < 0.2 if placement == "clustered" else 0.55 < differ < 0.7


def test_tiny_run_end_to_end(bench, capsys) -> None:
    rows = bench.main(["--tiny", "--device", "cpu", "--tokens", "1", "32"])
    kernel = [r for r in rows if r["kind"] == "kernel"]
    e2e = [r for r in rows if r["kind"] == "e2e"]
    assert len(kernel) == 2 * 2 * 2 * 2  # shapes x mixes x placements x tokens
    for r in kernel:
        assert r["bytes_vs_ideal"] < 1.05 + 0.1, r  # tiny matrices: the index is a larger share
        assert r["cublas_us"] > 0 and r["hybrid_us"] > 0
        if r["mix"] == "35/45/20":
            assert 0.6 < r["bytes_vs_dense"] < 0.65, r
    assert [r["model"] for r in e2e] == ["dense", "hybrid"]
    assert e2e[1]["first_logits_max_abs_diff"] == 0.0  # same pruned weights, same function
    assert e2e[1]["linear_weight_gib"] < 0.7 * e2e[0]["linear_weight_gib"]
    out = capsys.readouterr().out
    assert "x cuBLAS" in out and "hybrid / dense tokens/s" in out
    assert sum(line.startswith("{") for line in out.splitlines()) == len(rows)
