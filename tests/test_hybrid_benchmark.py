"""The GPU benchmark script's logic on the CPU (--tiny): tier placement, packing, table rows, end-to-end model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tierprune.kernels.tiers import target_counts

from .conftest import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hybrid_kernels.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("hybrid_kernels")


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
    assert [r["model"] for r in e2e] == ["dense", "hybrid", "hybrid-flat", "hybrid-chunk"]
    assert e2e[1]["first_logits_max_abs_diff"] == 0.0  # same pruned weights, same function
    assert e2e[1]["linear_weight_gib"] < 0.7 * e2e[0]["linear_weight_gib"]
    out = capsys.readouterr().out
    assert "x cuBLAS" in out and "hybrid (row kernel) / dense tokens/s" in out
    assert sum(line.startswith("{") for line in out.splitlines()) == len(rows)


# In a fresh interpreter with TRITON_INTERPRET=1: Triton reads it when a kernel module is first imported.
FLAT_SWEEP_SCRIPT = r"""
import importlib.util, json, sys
sys.path.insert(0, sys.argv[1])  # the sweep imports hybrid_kernels as a sibling
spec = importlib.util.spec_from_file_location("decode_sweep", sys.argv[1] + "/decode_sweep.py")
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)
sweep.GEMV = [(4, 2, 2, 1, True)]  # the interpreter is slow: one config of each kernel
sweep.FLAT = [(4, 1, False), (16, 2, True), (4, 1, False, False, 2)]  # the last: uncounted, two chunks
common = ["--tiny", "--device", "cpu", "--tokens", "1", "--inner", "1", "--reps", "1"]
rows = sweep.main(common + ["--mixes", "35/45/20", "--flat"]) + sweep.main(common + ["--mixes", "0/100/0"])
print("ROWS " + json.dumps(rows))
"""


def test_end_to_end_times_each_flat_alternative_and_restores_the_default(bench) -> None:
    import argparse

    from tierprune.kernels.triton import flat_gemv

    default = flat_gemv.FLAT_GEMV_CONFIG
    counted = flat_gemv.FlatGemvConfig(nb=8, num_warps=1, counted=True)
    args = argparse.Namespace(tiny=True, layers=2, steps=3, no_graph=True, flat_alternatives=[counted])
    rows = bench.bench_end_to_end(args, "cpu")
    assert [r["model"] for r in rows] == ["dense", "hybrid", "hybrid-flat", "hybrid-chunk",
                                          "hybrid-flat (8, 1, True, 1, 0)"]
    assert rows[3]["first_logits_max_abs_diff"] == 0.0 and rows[3]["speedup_vs_dense"] > 0
    assert flat_gemv.FLAT_GEMV_CONFIG == default


def test_end_to_end_compiled_computes_what_the_eager_model_does(bench) -> None:
    """--compile layers step: dense and hybrid each compiled both ways, each hybrid against its dense twin."""
    import argparse

    args = argparse.Namespace(tiny=True, layers=2, steps=3, no_graph=True, compile=["layers", "step"])
    rows = bench.bench_end_to_end(args, "cpu")
    compiled = {r["model"]: r for r in rows[-4:]}
    assert list(compiled) == ["dense, layers compiled", "dense, step compiled", "hybrid, layers compiled",
                              "hybrid, step compiled"]
    scale = rows[1]["first_logits_max_abs"]
    for r in compiled.values():  # inductor fuses the bf16 norms and RoPE differently from eager: close, not equal
        assert r["first_logits_max_abs_diff"] < 0.05 * scale
    for scope in ("layers", "step"):
        hybrid, dense = compiled[f"hybrid, {scope} compiled"], compiled[f"dense, {scope} compiled"]
        assert hybrid["speedup_vs_dense_compiled"] == pytest.approx(hybrid["tokens_per_s"] / dense["tokens_per_s"])
        assert "speedup_vs_dense_compiled" not in dense


def test_compile_model_puts_the_eager_model_back(bench) -> None:
    model = bench.TinyLlama(layers=2, hidden=64, inter=128, heads=4, vocab=128, max_len=8, device="cpu",
                            dtype=torch.bfloat16)
    bench.compile_model(model, "layers")
    assert all("forward" in block.__dict__ for block in model.blocks)
    bench.compile_model(model, "step")
    assert "step" in model.__dict__ and all("forward" not in block.__dict__ for block in model.blocks)
    bench.compile_model(model, None)
    assert "step" not in model.__dict__
    with pytest.raises(ValueError, match="compile scope"):
        bench.compile_model(model, "everything")


def test_decode_sweep_flat_dry_run() -> None:
    """decode_sweep.py --flat on the CPU: the flat GEMV's calls, checks and report beside the other kernels."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", FLAT_SWEEP_SCRIPT, str(SCRIPT.parent)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    rows = json.loads(out.split("ROWS ", 1)[1])
    flat, plain = rows[:2], rows[2:]  # the two tiny shapes with --flat, then without
    assert len(flat) == len(plain) == 2
    for r in flat:
        assert set(r["flat"]) == {"(4, 1, False)", "(16, 2, True)", "(4, 1, False, False, 2)"}
        assert r["flat_best"] in ([4, 1, False], [16, 2, True], [4, 1, False, False, 2])
        assert r["flat_err"] < 2e-2 and r["cublas_us"] > 0
    assert out.count("flat tier stream, one launch") == 2 and "flat (16, 2, True)" in out
    assert all("flat" not in r for r in plain)  # without --flat the sweep is what it was
    # A mix outside the script's table is parsed: 0/100/0 packs every block as 2:4 (0.56 of dense + index).
    assert all(r["mix"] == "0/100/0" and r["packed_bytes"] < 0.6 * r["out"] * r["inp"] * 2 for r in plain)


MMA_SCRIPT = SCRIPT.with_name("mma_decode.py")


def _run_mma_script(*args: str) -> subprocess.CompletedProcess:
    # Run as a user runs it: its folder first on sys.path, where it finds hybrid_kernels.
    return subprocess.run([sys.executable, str(MMA_SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_mma_benchmark_refuses_bad_configs_and_needs_cuda() -> None:
    bad = _run_mma_script("--configs", "8,8,12,8,4,1")  # six fields
    assert bad.returncode == 2 and "bad --configs" in bad.stderr and "is not CHUNK,TOPK_CHUNK" in bad.stderr, bad.stderr
    bad = _run_mma_script("--configs", "64,12,4")
    assert bad.returncode == 2 and "chunks must be 1..32" in bad.stderr, bad.stderr
    if not torch.cuda.is_available():
        run = _run_mma_script("--configs", "8,12,4", "16,12,4")
        assert run.returncode == 2 and run.stderr.strip() == "mma_decode: needs a CUDA GPU (sm_80 or newer)"
        # the op's own pick and the row kernel with the driver's carve-out parse: only the GPU is missing
        run = _run_mma_script("--configs", "ladder", "2,6,16,0,2", "--kernels", "rows", "rows-driver-carveout")
        assert run.returncode == 2 and run.stderr.strip() == "mma_decode: needs a CUDA GPU (sm_80 or newer)"


def test_generate_compiled_dry_run() -> None:
    """benchmarks/generate_compiled.py --tiny on the CPU: transformers' generate, dense and hybrid, eager and
    compiled (the hybrid op inside the compiled step), the same greedy tokens in each mode and in every generation."""
    script = SCRIPT.with_name("generate_compiled.py")
    proc = subprocess.run([sys.executable, str(script), "--tiny", "--device", "cpu"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    for mode in ("eager", "compiled"):
        line = next(line for line in lines if line.strip().startswith(mode))
        assert "the same tokens: True; each model's 2 generations alike: dense True, hybrid True" in line, line
    summary = json.loads(lines[-1])
    assert set(summary) == {"dense eager", "dense compiled", "hybrid eager", "hybrid compiled"}
    assert all(v > 0 for v in summary.values())


def test_eager_overhead_dry_run() -> None:
    """benchmarks/eager_overhead.py --tiny on the CPU: the three ways agree (checked inside) and each row has a
    positive time per call."""
    script = SCRIPT.with_name("eager_overhead.py")
    proc = subprocess.run([sys.executable, str(script), "--tiny", "--device", "cpu", "--tokens", "1", "5"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert set(summary) == {"1", "5"}
    assert all(set(row) == {"nn.Linear", "HybridLinear", "op"} and min(row.values()) > 0 for row in summary.values())
