"""The wgmma prefill kernels (wgmma_prefill.cu, and the warp-specialized wgmma_prefill_ws.cu): their plan on the CPU
(where each block is, which steps run sparse, the grouping), their sources assembled for sm_90a, and on an H100/H200
their products against the dense one."""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tierprune.kernels.cuda import wgmma_prefill as wp
from tierprune.kernels.hybrid import pack_hybrid
from tierprune.kernels.tiers import NM_2_4, TOPK, tier_keep_mask

from .test_hybrid import random_tier_map

pytestmark = pytest.mark.unit


def _weight(shape, probs, seed, k=10, dtype=torch.bfloat16, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    tier_map = random_tier_map(shape, g, probs)
    W = torch.randn(shape, generator=g).to(dtype)
    W = W * tier_keep_mask(W.float().abs(), tier_map, 16, k)
    return W.to(device), tier_map.to(device)


@pytest.mark.parametrize("grouped", [False, True])
def test_the_plan_finds_every_block_and_runs_sparse_only_where_all_eight_can(grouped) -> None:
    W, tier_map = _weight((200, 512), (0.2, 0.6, 0.2), seed=0)  # 13 block-rows: the last group padded
    hw = pack_hybrid(W, tier_map)
    plan = wp.prefill_plan(hw, grouped=grouped)
    rows = plan.group_rows.tolist()
    assert sorted(r for r in rows if r >= 0) == list(range(13)) and rows.count(-1) == 3
    padded = torch.cat([hw.to_dense(), torch.zeros(8, 512, dtype=W.dtype)])  # the last block-row: 8 rows
    dense = padded.view(13, 16, 32, 16).transpose(1, 2)  # (block-row, block column, 16, 16)
    blocks = {0: hw.dense_values, NM_2_4: None, TOPK: None}
    fits = wp.topk_fits_2_4(hw)
    for member, block_row in enumerate(rows):
        tiers = plan.slots[member] >> wp.TIER_SHIFT
        if block_row < 0:
            assert (tiers == wp.TIER_NONE).all()
            continue
        assert torch.equal(tiers.to(torch.int8), tier_map[block_row])
        index = plan.slots[member] & ((1 << wp.TIER_SHIFT) - 1)
        for col in torch.nonzero(tiers == 0).flatten().tolist():  # dense blocks: the packed block is the block
            assert torch.equal(blocks[0][index[col]], dense[block_row, col])
    capable = torch.ones(len(rows), 32, dtype=torch.bool)
    for member, block_row in enumerate(rows):
        if block_row >= 0:
            tiers = plan.slots[member] >> wp.TIER_SHIFT
            index = plan.slots[member] & ((1 << wp.TIER_SHIFT) - 1)
            capable[member] = (tiers == NM_2_4) | ((tiers == TOPK) & fits[index.clamp(max=len(fits) - 1)])
    expected = capable.view(-1, 4, 16, 2).all(3).all(1)
    assert torch.equal(plan.sparse_steps.bool(), expected)
    assert 0 < plan.sparse_fraction < 1


@pytest.mark.parametrize("out_features", [64, 128, 200])
def test_the_plan_fills_whole_ctas_of_two_groups(out_features) -> None:
    W, tier_map = _weight((out_features, 64), (0.35, 0.45, 0.2), seed=4)
    plan = wp.prefill_plan(pack_hybrid(W, tier_map))
    rows = plan.group_rows.tolist()
    assert len(rows) == 8 * -(-out_features // 128) and rows.count(-1) == len(rows) - -(-out_features // 16)
    assert plan.slots.shape == (len(rows), 4) and plan.sparse_steps.shape == (len(rows) // 4, 2)
    assert (plan.slots[plan.group_rows < 0] >> wp.TIER_SHIFT == wp.TIER_NONE).all()


def test_topk_blocks_fit_2_4_unless_a_group_of_four_holds_three_nonzeros() -> None:
    W, tier_map = _weight((32, 32), (0, 0, 1.0), seed=1)
    hw = pack_hybrid(W, tier_map)
    hw.topk_pos[0] = torch.tensor([0, 1, 2, 16, 17, 32, 48, 64, 80, 96], dtype=torch.uint8)  # row 0, group 0: 3
    hw.topk_pos[1] = torch.tensor([0, 1, 4, 5, 16, 20, 32, 36, 48, 52], dtype=torch.uint8)  # 2 per group at most
    hw.topk_pos[2] = hw.topk_pos[0]
    hw.topk_values[2, 2] = 0  # the third entry of row 0's group 0 is a stored zero: it takes no slot
    assert wp.topk_fits_2_4(hw)[:3].tolist() == [False, True, True]


def test_grouping_puts_block_rows_with_the_same_dense_columns_together() -> None:
    dense = torch.zeros(8, 6, dtype=torch.bool)
    dense[0::2, 0] = True
    dense[1::2, 1] = True
    order = wp.grouped_block_rows(dense).tolist()
    assert sorted(map(sorted, (order[:4], order[4:]))) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def _ptxas(source: str, tmp_path) -> str:
    from .test_mma_decode import nvrtc_ptx, ptxas_report

    return ptxas_report(nvrtc_ptx(source, "sm_90a"), tmp_path, arch="sm_90a", isa="8.2")


@pytest.mark.parametrize("half", [False, True])
def test_the_kernel_assembles_for_sm_90a_without_spills(half, tmp_path) -> None:
    report = _ptxas(wp.wgmma_prefill_source(half, 10), tmp_path)
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in report, report
    assert "wgmma.mma_async instructions are serialized" not in report, report  # C7520: no overlap at all


@pytest.mark.parametrize("half,topk", [(False, 10), (True, 10), (False, 32)])
def test_the_warp_specialized_kernel_assembles_for_sm_90a_without_spills(half, topk, tmp_path) -> None:
    report = _ptxas(wp.wgmma_prefill_ws_source(half, topk), tmp_path)
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in report, report
    assert "wgmma.mma_async instructions are serialized" not in report, report
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    assert registers <= 65536 // wp.WS_THREADS // 8 * 8, report  # its 384 threads fit one SM's registers


def test_the_warp_specialized_kernel_refuses_to_assemble_for_less_shared_memory_than_it_uses() -> None:
    from .test_mma_decode import nvrtc_ptx

    source = wp.wgmma_prefill_ws_source(False, 10)
    short = source.replace(f"#define LAUNCH_SHARED_BYTES {wp.WS_SHARED_BYTES}\n",
                           f"#define LAUNCH_SHARED_BYTES {wp.WS_SHARED_BYTES - 16}\n")
    assert short != source
    with pytest.raises(AssertionError, match="launches with less shared memory"):
        nvrtc_ptx(short, "sm_90a")
    assert wp.WS_SHARED_BYTES <= 227 * 1024  # what an sm_90 CTA may have


A_BYTES, META_BYTES = 4096, 512  # wgmma_ws_blocks.cuh: a group's A tile for one step, a step's metadata words


@pytest.fixture(scope="module")
def kernel_on_cpu(tmp_path_factory):
    """(half, topk, warp_specialized=True) -> tests/kernels/wgmma_on_cpu.cpp built with g++ around that kernel's
    source: the kernel on the CPU, each of its threads a thread."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("needs g++ (C++20) to run the wgmma prefill kernels on the CPU")
    built = {}

    def build(half: bool, topk: int, warp_specialized: bool = True) -> Path:
        key = (half, topk, warp_specialized)
        if key not in built:
            folder = tmp_path_factory.mktemp("kernel-on-cpu")
            (folder / "kernel_source.cuh").write_text(wp.prefill_kernel_source(half, topk, warp_specialized))
            library = folder / "wgmma_on_cpu.so"
            subprocess.run([compiler, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", f"-DHALF_T={int(half)}",
                            f"-DWARP_SPECIALIZED={int(warp_specialized)}", f"-I{folder}",
                            str(Path(__file__).with_name("wgmma_on_cpu.cpp")), "-o", str(library)],
                           check=True, capture_output=True, timeout=180)
            built[key] = library
        return built[key]

    return build


def _producer_stage(lib, hw, plan: wp.PrefillPlan, cta: int, step: int) -> torch.Tensor:
    """The bytes the CTA's producer writes for one step: both groups' A tiles, then the metadata words."""
    stage = torch.zeros(2 * A_BYTES + META_BYTES, dtype=torch.uint8)
    steps = plan.sparse_steps.shape[1]
    tensors = [hw.dense_values, hw.nm_values, hw.nm_meta, hw.topk_values, hw.topk_pos, plan.slots, plan.sparse_steps]
    lib.build_producer_step(ctypes.c_void_p(stage.data_ptr()), *(ctypes.c_void_p(x.contiguous().data_ptr())
                                                                  for x in tensors),
                            cta, step, steps * 2, steps)
    return stage


def _tile_values(stage: torch.Tensor, group: int, columns: int) -> torch.Tensor:
    """(64, columns) 16-bit values of a group's A tile: core matrices 1024 bytes apart along k, 128 along rows."""
    rows, cols = torch.arange(64)[:, None], torch.arange(columns)[None, :]
    offset = group * A_BYTES + (cols >> 3) * 1024 + (rows >> 3) * 128 + (rows & 7) * 16 + (cols & 7) * 2
    return stage.view(torch.int16)[offset // 2]


def _expand_sparse(kept: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """(64, 32) values from a compressed tile (64, 16) and its group's 4 members' metadata words (4, 16): word
    2g + c of member w holds block c's rows g (low half) and g+8 (high half), a nibble (p0 | p1 << 2) per group of
    4 columns, p0 < p1 (the only pairs wgmma.sp takes)."""
    dense = torch.zeros(64, 32, dtype=kept.dtype)
    for w in range(4):
        for r in range(16):
            for c in range(2):
                nibbles = (int(words[w, (r & 7) * 2 + c]) >> (16 * (r >> 3))) & 0xFFFF
                for group in range(4):
                    nibble = nibbles >> (4 * group) & 15
                    p0, p1 = nibble & 3, nibble >> 2
                    assert p0 < p1, (w, r, c, group, nibble)
                    row, base = 16 * w + r, 8 * c + 2 * group
                    dense[row, 16 * c + 4 * group + p0] = kept[row, base]
                    dense[row, 16 * c + 4 * group + p1] = kept[row, base + 1]
    return dense


@pytest.mark.parametrize("probs,k,half", [((0.35, 0.45, 0.2), 10, False), ((0, 0, 1.0), 10, False),
                                          ((0, 1.0, 0), 10, True), ((0.1, 0.1, 0.8), 32, False),
                                          ((0.9, 0.1, 0.0), 10, False)])
@pytest.mark.parametrize("grouped", [False, True])
def test_the_warp_specialized_producer_writes_every_step_of_the_weight(probs, k, half, grouped, kernel_on_cpu) -> None:
    """Run on the CPU, the producer's decoding (wgmma_ws_blocks.cuh's build_step) fills each step's A tiles and
    metadata so that, read as wgmma reads them, every group of 4 block-rows holds exactly its 64 x 32 slice of the
    weight: dense steps as they are, sparse steps as kept pairs plus positions."""
    dtype = torch.float16 if half else torch.bfloat16
    W, tier_map = _weight((200, 512), probs, seed=7 + k, k=k, dtype=dtype)  # 13 block-rows: a padded group
    hw = pack_hybrid(W, tier_map, topk=k)
    plan = wp.prefill_plan(hw, grouped=grouped)
    lib = ctypes.CDLL(str(kernel_on_cpu(half, k)))
    padded = torch.zeros(len(plan.group_rows) * 16, W.shape[1], dtype=dtype)
    rows = plan.group_rows.long()
    for member, block_row in enumerate(rows.tolist()):  # each member's 16 rows, in plan order
        if block_row >= 0:
            part = W[block_row * 16:(block_row + 1) * 16]
            padded[member * 16:member * 16 + len(part)] = part
    kinds = set()
    for cta in range(len(rows) // 8):
        for step in range(plan.sparse_steps.shape[1]):
            stage = _producer_stage(lib, hw, plan, cta, step)
            words = stage[2 * A_BYTES:].view(torch.int32).view(8, 16)
            for group in range(2):
                expected = padded[(cta * 8 + group * 4) * 16:(cta * 8 + group * 4 + 4) * 16, step * 32:step * 32 + 32]
                sparse = bool(plan.sparse_steps[cta * 2 + group, step])
                kinds.add(sparse)
                if sparse:
                    got = _expand_sparse(_tile_values(stage, group, 16), words[group * 4:group * 4 + 4])
                else:
                    got = _tile_values(stage, group, 32)
                assert torch.equal(got.view(dtype).float(), expected.float()), (cta, step, group, sparse)
    assert kinds == ({True} if probs == (0, 1.0, 0) else {False} if probs[0] >= 0.9 else {False, True})


_RUN_KERNEL_ON_CPU = """
import ctypes, sys
import torch
library, inputs, output = sys.argv[1:]
args = torch.load(inputs)
pointers = [ctypes.c_void_p(t.data_ptr()) for t in args["tensors"]]
ctypes.CDLL(library).run_kernel(*map(ctypes.c_int, args["grid"]), *pointers, *map(ctypes.c_int, args["sizes"]))
torch.save(args["tensors"][1], output)
"""


def _run_kernel_on_cpu(library: Path, x: torch.Tensor, hw, plan: wp.PrefillPlan, folder: Path) -> torch.Tensor:
    """A prefill kernel on the CPU (wgmma_on_cpu.cpp, `library` from kernel_on_cpu), in a process of its own: a
    wait that never ends aborts it."""
    T, K = x.shape
    y = torch.zeros(T, hw.shape[0], dtype=x.dtype)
    tensors = [x, y, hw.dense_values, hw.nm_values, hw.nm_meta, hw.topk_values, hw.topk_pos, plan.slots,
               plan.sparse_steps, plan.group_rows]
    grid = (-(-T // wp.TOKENS_PER_CTA), len(plan.group_rows) // wp.MEMBERS_PER_CTA)
    torch.save({"tensors": [t.contiguous() for t in tensors], "grid": grid, "sizes": (T, K, hw.shape[0])},
               folder / "inputs.pt")
    proc = subprocess.run([sys.executable, "-c", _RUN_KERNEL_ON_CPU, str(library), str(folder / "inputs.pt"),
                           str(folder / "y.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(folder / "y.pt")


@pytest.mark.parametrize("probs,k,half,grouped", [((0.35, 0.45, 0.2), 10, False, True),
                                                  ((0.35, 0.45, 0.2), 10, True, False), ((0, 0, 1.0), 10, False, True),
                                                  ((0, 1.0, 0), 10, False, True), ((0.1, 0.1, 0.8), 32, False, True),
                                                  ((1.0, 0, 0), 10, False, False)])
def test_the_warp_specialized_kernel_run_on_the_cpu_gives_the_dense_product(probs, k, half, grouped, kernel_on_cpu,
                                                                            tmp_path) -> None:
    """The whole kernel, its barriers and both roles, on the CPU (wgmma_on_cpu.cpp: each thread a thread, wgmma
    computed from the descriptors as the PTX documents them): two CTAs of block-rows (the last group padded) x two of
    tokens (the second partly past T), every step through the 8-stage ring twice."""
    dtype = torch.float16 if half else torch.bfloat16
    W, tier_map = _weight((200, 512), probs, seed=11 + k, k=k, dtype=dtype)
    hw = pack_hybrid(W, tier_map, topk=k)
    plan = wp.prefill_plan(hw, grouped=grouped)
    x = torch.randn(300, 512, generator=torch.Generator().manual_seed(3)).to(dtype)
    y = _run_kernel_on_cpu(kernel_on_cpu(half, k), x, hw, plan, tmp_path)
    reference = x.float() @ W.float().T
    error = float((y.float() - reference).abs().max() / reference.abs().max())
    assert error < 1e-2, error


@pytest.mark.parametrize("probs,k,half", [((0.35, 0.45, 0.2), 10, False), ((0, 1.0, 0), 10, True),
                                          ((0.1, 0.1, 0.8), 32, False)])
def test_the_cpu_model_of_wgmma_runs_the_kernel_the_h100_checked(probs, k, half, kernel_on_cpu, tmp_path) -> None:
    """wgmma_on_cpu.cpp's wgmma (its B descriptors, sparse metadata and accumulator layout) on wgmma_prefill.cu,
    whose products the H100 checked (sessions 33-36): the dense product, dense and sparse steps alike. What the
    model then says of the warp-specialized kernel rests on the same rules, and on its A descriptors alone."""
    dtype = torch.float16 if half else torch.bfloat16
    W, tier_map = _weight((200, 512), probs, seed=5 + k, k=k, dtype=dtype)
    hw = pack_hybrid(W, tier_map, topk=k)
    plan = wp.prefill_plan(hw)
    assert plan.sparse_steps.any() and not plan.sparse_steps.all() or probs == (0, 1.0, 0)
    x = torch.randn(300, 512, generator=torch.Generator().manual_seed(4)).to(dtype)
    y = _run_kernel_on_cpu(kernel_on_cpu(half, k, warp_specialized=False), x, hw, plan, tmp_path)
    reference = x.float() @ W.float().T
    assert float((y.float() - reference).abs().max() / reference.abs().max()) < 1e-2


_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not _HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("shape", [(256, 256), (200, 512), (1000, 4096), (4096, 96)])
@pytest.mark.parametrize("probs,k", [((0.35, 0.45, 0.2), 10), ((0.9, 0.1, 0.0), 10), ((0, 0, 1.0), 10),
                                     ((0, 1.0, 0), 10), ((0.2, 0.2, 0.6), 16), ((0.1, 0.1, 0.8), 32),
                                     ((1.0, 0, 0), 10)])  # all dense: every step two dense wgmmas
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("warp_specialized", [False, True], ids=["register-fragments", "warp-specialized"])
def test_the_kernel_matches_the_dense_product(shape, probs, k, dtype, grouped, warp_specialized) -> None:
    W, tier_map = _weight(shape, probs, seed=shape[0] + k, k=k, dtype=dtype, device="cuda")
    hw = pack_hybrid(W, tier_map, topk=k)
    plan = wp.prefill_plan(hw, grouped=grouped)
    for tokens in (1, 130, 300):
        x = torch.randn(tokens, shape[1], device="cuda", dtype=dtype)
        y = wp.hybrid_wgmma_prefill(x, hw, plan, warp_specialized=warp_specialized)
        reference = x.float() @ W.float().T
        error = float((y.float() - reference).abs().max() / reference.abs().max())
        assert error < 1e-2, (tokens, error)


def test_the_op_keeps_a_plan_per_weight_until_its_buffers_change(monkeypatch) -> None:
    from tierprune.kernels.triton import hybrid_mm as op

    monkeypatch.setattr(wp, "wgmma_prefill_supported", lambda x, hw: True)  # the plan's logic, on the CPU
    monkeypatch.setattr(wp, "_ENABLED", [True])
    W, tier_map = _weight((64, 64), (0.35, 0.45, 0.2), seed=3)
    hw = pack_hybrid(W, tier_map)
    x = torch.zeros(wp.WGMMA_PREFILL_MIN_TOKENS, 64, dtype=W.dtype)
    plan = op._prefill_plan(x, hw)
    assert plan is not None and op._prefill_plan(x, hw) is plan  # built once
    assert op._prefill_plan(x[:wp.WGMMA_PREFILL_MIN_TOKENS - 1], hw) is None  # shorter: not this kernel
    hw.dense_cols.add_(0)  # an in-place write (a checkpoint loaded into the buffers): a new plan
    assert op._prefill_plan(x, hw) is not plan
    wp.use_wgmma_prefill(False)  # (monkeypatch puts back the module's own switch)
    assert op._prefill_plan(x, hw) is None
    op.forget_prepared_launches()
    assert len(op._PREFILL_PLANS) == 0
    wp.use_wgmma_prefill(True)
    with torch.inference_mode():  # weights made there have no version counter: the addresses still key the plan
        hw_inference = pack_hybrid(W, tier_map)
        assert op._prefill_plan(x, hw_inference) is op._prefill_plan(x, hw_inference)


@pytest.mark.gpu
@pytest.mark.skipif(not _HOPPER, reason="needs an sm_90 GPU")
def test_the_op_takes_long_prefills_here_on_hopper_when_asked(monkeypatch) -> None:
    from tierprune.kernels.triton import hybrid_mm as op

    monkeypatch.setattr(wp, "_ENABLED", [True])  # off by default: slower than unpack + cuBLAS
    W, tier_map = _weight((512, 1024), (0.35, 0.45, 0.2), seed=4, device="cuda")
    hw = pack_hybrid(W, tier_map)
    x = torch.randn(2, 150, 1024, device="cuda", dtype=W.dtype)  # 300 tokens
    y = op.hybrid_mm(x, hw)
    assert hw.dense_row_ptr in op._PREFILL_PLANS
    reference = x.float() @ W.float().T
    assert float((y.float() - reference).abs().max() / reference.abs().max()) < 1e-2


def test_the_benchmarks_ablations_still_apply_to_the_kernel_and_compile(monkeypatch) -> None:
    from ..benchmark_loader import BENCHMARKS, load_benchmark  # not conftest: the device copy runs without it
    from .test_mma_decode import nvrtc_ptx

    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports hybrid_kernels as a sibling
    bench = load_benchmark("wgmma_prefill")
    sources = {name: bench.ablated_source(edits) for name, edits in bench.ABLATIONS.items()}
    assert len(set(sources.values())) == len(sources)  # every edit changed something
    assert "if (s & 1)" in sources["commit-pairs"] and "__syncthreads" not in sources["no-x-no-barrier-pairs"]
    assert "dense_fragment(a" not in sources["bare-loop"] and "__syncthreads" not in sources["bare-loop"]
    for name in ("no-x-no-barrier-pairs", "bare-loop"):
        assert "wgmma.mma_async" in nvrtc_ptx(sources[name], "sm_90a")
    with pytest.raises(SystemExit, match="no longer applies"):
        bench.ablated_source([("a line the kernel does not have", "")])
    ws_sources = {name: bench.ablated_source(edits, warp_specialized=True)
                  for name, edits in bench.WS_ABLATIONS.items()}
    assert len(set(ws_sources.values())) == len(ws_sources)
    assert ws_sources["ws"] == wp.wgmma_prefill_ws_source(False, 10)
    assert "i < 0; ++i" in ws_sources["ws-no-x"] and "#define STAGES 4" in ws_sources["ws-4-stages"]
    assert "wgmma.mma_async" in nvrtc_ptx(ws_sources["ws-no-x-no-stores"], "sm_90a")
