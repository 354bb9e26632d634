"""Triton hybrid kernels against the pure-torch reference: on CUDA if present, else in Triton's interpreter.

Without CUDA, tests/kernels/conftest.py sets TRITON_INTERPRET=1 before the kernels are imported. The
kernels are also compiled for sm_90 (Hopper) to PTX and a cubin on the CPU: the interpreter accepts code
that the compiler refuses, so this catches what the interpreter cannot.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tierprune.kernels.hybrid import hybrid_matmul_ref, pack_hybrid
from tierprune.kernels.tiers import DENSE, NM_2_4, TOPK
from tierprune.kernels.triton.flat_gemv import hybrid_mm_flat_gemv
from tierprune.kernels.triton.hybrid_mm import (
    DECODE_MAX_TOKENS,
    hybrid_mm,
    hybrid_mm_decode,
    hybrid_mm_prefill,
    hybrid_unpack,
)

from .test_hybrid import pruned_weight, random_tier_map

pytest.importorskip("triton")

pytestmark = pytest.mark.unit
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(64, 96), (40, 52), (48, 208)]  # full blocks; edge blocks both ways; 13 blocks per row


def _case(shape, dtype, seed, probs=(0.35, 0.45, 0.20)):
    g = torch.Generator().manual_seed(seed)
    tier_map = random_tier_map(shape, g, probs)
    W = pruned_weight(shape, tier_map, g, dtype)
    return W, pack_hybrid(W, tier_map).to(KERNEL_DEVICE), g


def _expected(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return x.double().cpu() @ W.double().T


def _close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(got.double().cpu(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_kernels_run_interpreted_without_cuda() -> None:
    from tierprune.kernels.triton import _hybrid_kernels as K

    kind = type(K._hybrid_decode_kernel).__name__
    assert kind == ("JITFunction" if torch.cuda.is_available() else "InterpretedFunction"), kind


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("tokens", [1, 7, DECODE_MAX_TOKENS, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prefetch", [False, True])
def test_decode_matches_reference(shape, dtype, tokens, split, prefetch) -> None:
    W, hw, g = _case(shape, dtype, seed=tokens + split)
    x = torch.randn(tokens, shape[1], generator=g).to(dtype)
    got = hybrid_mm_decode(x.to(KERNEL_DEVICE), hw, split=split, prefetch=prefetch)
    assert got.shape == (tokens, shape[0]) and got.dtype == dtype
    _close(got, _expected(x, W), dtype)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("nb", [1, 2, 8])
def test_decode_block_steps(nb, prefetch) -> None:
    W, hw, g = _case((32, 208), torch.float16, seed=nb)
    x = torch.randn(3, 208, generator=g).to(torch.float16)
    _close(hybrid_mm_decode(x.to(KERNEL_DEVICE), hw, nb=nb, prefetch=prefetch), _expected(x, W), torch.float16)


@pytest.mark.parametrize("tokens, token_tile", [(1, 16), (1, 1), (40, 16), (33, 32), (64, 64), (70, 32)])
def test_decode_token_tiles(tokens, token_tile) -> None:
    W, hw, g = _case((48, 80), torch.bfloat16, seed=tokens)
    x = torch.randn(tokens, 80, generator=g).to(torch.bfloat16)
    got = hybrid_mm_decode(x.to(KERNEL_DEVICE), hw, token_tile=token_tile, split=2)
    _close(got, _expected(x, W), torch.bfloat16)


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("nb", [1, 4, 16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prefetch", [False, True])
def test_gemv_matches_reference(shape, nb, split, prefetch) -> None:
    W, hw, g = _case(shape, torch.bfloat16, seed=nb + split)
    x = torch.randn(1, shape[1], generator=g).to(torch.bfloat16)
    got = hybrid_mm_decode(x.to(KERNEL_DEVICE), hw, nb=nb, split=split, token_tile=1, prefetch=prefetch)
    assert got.shape == (1, shape[0]) and got.dtype == torch.bfloat16
    _close(got, _expected(x, W), torch.bfloat16)
    with pytest.raises(AssertionError, match="one token"):
        hybrid_mm_decode(torch.cat([x, x]).to(KERNEL_DEVICE), hw, token_tile=1)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("tokens", [1, 2])
@pytest.mark.parametrize("tier", [DENSE, NM_2_4, TOPK])
def test_decode_single_tier(tier, tokens, prefetch) -> None:
    """Two tiers empty: their buffers are empty tensors, which the launcher stands in for without a kernel."""
    probs = [1e-9, 1e-9, 1e-9]
    probs[tier] = 1.0
    W, hw, g = _case((32, 64), torch.bfloat16, seed=tier, probs=tuple(probs))
    assert hw.tier_counts()[tier] == 8
    x = torch.randn(tokens, 64, generator=g).to(torch.bfloat16)
    _close(hybrid_mm_decode(x.to(KERNEL_DEVICE), hw, prefetch=prefetch), _expected(x, W), torch.bfloat16)


def test_empty_tiers_launch_nothing_extra() -> None:
    """An empty tier's buffers are stood in for by a view of a row-pointer array: no tensor (and no fill kernel)
    made per call, which at 90/10/0 (no TopK blocks) was three kernels more per matrix."""
    from tierprune.kernels.triton.hybrid_mm import _packed_args

    W, hw, _ = _case((32, 64), torch.bfloat16, seed=4, probs=(0.9, 0.1, 1e-9))
    assert hw.tier_counts()[2] == 0
    args = dict(zip(hw.tensors(), _packed_args(hw)))
    for name in ("topk_values", "topk_pos", "topk_cols"):
        assert args[name].numel() >= 1 and args[name].dtype == getattr(hw, name).dtype
        assert args[name].data_ptr() == hw.dense_row_ptr.data_ptr(), name
    assert args["dense_values"] is hw.dense_values  # non-empty buffers pass as they are


FLAT_MIXES = {"35/45/20": (0.35, 0.45, 0.20), "90/10/0": (0.90, 0.10, 1e-9), "all TopK": (1e-9, 1e-9, 1.0),
              "all dense": (1.0, 1e-9, 1e-9), "all 2:4": (1e-9, 1.0, 1e-9)}


# Every chunk size and both 2:4 paths in bf16; fp16 (a different load and store only) on two of them.
@pytest.mark.parametrize("dtype, nb, nm_expand", [
    *((torch.bfloat16, nb, expand) for nb, expand in [(1, False), (4, False), (16, False), (2, True), (16, True)]),
    (torch.float16, 4, False), (torch.float16, 2, True),
])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mix", FLAT_MIXES)
def test_flat_gemv_matches_reference(mix, shape, dtype, nb, nm_expand) -> None:
    W, hw, g = _case(shape, dtype, seed=len(mix) + nb, probs=FLAT_MIXES[mix])
    # The near-zero tiers are empty (no programs, stand-in buffers); the others are not.
    assert [c == 0 for c in hw.tier_counts()] == [p < 1e-6 for p in FLAT_MIXES[mix]] or mix == "90/10/0"
    assert hw.tier_counts()[0] > 0 or mix in ("all TopK", "all 2:4")
    x = torch.randn(1, shape[1], generator=g).to(dtype)
    got = hybrid_mm_flat_gemv(x.to(KERNEL_DEVICE), hw, nb=nb, num_warps=2, nm_expand=nm_expand)
    assert got.shape == (1, shape[0]) and got.dtype == dtype
    _close(got, _expected(x, W), dtype)
    _close(got, hybrid_matmul_ref(x.to(KERNEL_DEVICE), hw).double().cpu(), dtype)


def test_flat_gemv_state_is_exact_and_left_zeroed() -> None:
    """Hand-worked chunking: block-rows of every block, and how many programs write each block-row.

    (64, 64): 4 block-rows of 4 blocks. Dense 3 blocks in block-row 0, 1 in 3; 2:4 row 1 full; TopK one block
    in each of block-rows 0, 2 and 3, so that with NB 2 one TopK chunk spans rows 2 and 3 and, with NB 4,
    the only TopK chunk spans rows 0, 2 and 3 (row 2 strictly inside: its block emits on its own).
    """
    from tierprune.kernels.triton import flat_gemv as module

    D, N, T = DENSE, NM_2_4, TOPK
    tier_map = torch.tensor([[D, D, D, T], [N, N, N, N], [T, N, N, N], [N, D, N, T]], dtype=torch.int8)
    g = torch.Generator().manual_seed(21)
    W = pruned_weight((64, 64), tier_map, g, torch.bfloat16)
    hw = pack_hybrid(W, tier_map).to(KERNEL_DEVICE)
    assert hw.tier_counts() == (4, 9, 3)
    state = module._flat_state(hw, 2)
    assert state.block_rows.tolist() == [0, 0, 0, 3] + [1, 1, 1, 1, 2, 2, 2, 3, 3] + [0, 2, 3]
    # NB 2. Dense chunks [0 0] [0 3]: row 0 twice, row 3 once. 2:4 [1 1] [1 1] [2 2] [2 3] [3]: rows 1, 2 and
    # 3 twice each. TopK [0 2] [3]: rows 0, 2 and 3 once each.
    assert state.contributors[2].tolist() == [3, 2, 3, 4]
    # NB 4. Dense [0 0 0 3]; 2:4 [1 1 1 1] [2 2 2 3] [3]; TopK [0 2 3] with row 2 in between.
    assert module._flat_state(hw, 4).contributors[4].tolist() == [2, 1, 2, 4]
    assert module._flat_state(hw, 2) is state  # cached per weight
    x = torch.randn(1, 64, generator=g).to(torch.bfloat16)
    for nb in (2, 4, 2):  # repeated calls: each leaves the workspace and counters zeroed for the next
        _close(hybrid_mm_flat_gemv(x.to(KERNEL_DEVICE), hw, nb=nb), _expected(x, W), torch.bfloat16)
        assert not state.workspace.any() and not state.arrivals.any()


@pytest.mark.parametrize("nb, chunks, topk_nb", [(1, 1, 0), (4, 1, 0), (2, 3, 0), (4, 2, 0), (4, 2, 1), (2, 1, 8)])
def test_uncounted_flat_gemv_matches_and_leaves_the_workspace_zeroed(nb, chunks, topk_nb) -> None:
    """The two-launch variant: programs only add into the workspace, the second kernel writes out and zeroes it.

    (80, 112) at 35/45/20 has tier block counts that chunks of nb·chunks do not divide: the last program of a
    tier loops over fewer chunks.
    """
    from tierprune.kernels.triton import flat_gemv as module

    W, hw, g = _case((80, 112), torch.bfloat16, seed=25 + nb + chunks + topk_nb)
    assert any(n % (nb * chunks) for n in hw.tier_counts()) or nb * chunks == 1, hw.tier_counts()
    state = module._flat_state(hw, None)
    for _ in range(2):  # a stale sum left in the workspace would show in the second product
        x = torch.randn(1, 112, generator=g).to(torch.bfloat16)
        got = hybrid_mm_flat_gemv(x.to(KERNEL_DEVICE), hw, nb=nb, counted=False, chunks=chunks, topk_nb=topk_nb)
        _close(got, _expected(x, W), torch.bfloat16)
        assert not state.workspace.any() and not state.arrivals.any()


def test_flat_gemv_state_follows_the_weight() -> None:
    """Two weights of one shape never share state; a weight's state goes with it."""
    import dataclasses
    import gc

    from tierprune.kernels.triton import flat_gemv as module

    W1, hw1, g = _case((48, 80), torch.bfloat16, seed=22)
    W2, hw2, _ = _case((48, 80), torch.bfloat16, seed=23)
    x = torch.randn(1, 80, generator=g).to(torch.bfloat16).to(KERNEL_DEVICE)
    for _ in range(2):
        _close(hybrid_mm_flat_gemv(x, hw1, nb=4), _expected(x, W1), torch.bfloat16)
        _close(hybrid_mm_flat_gemv(x, hw2, nb=4), _expected(x, W2), torch.bfloat16)
    assert module._flat_state(hw1, 4) is not module._flat_state(hw2, 4)
    key = id(hw2.dense_row_ptr)
    assert key in module._FLAT_STATES
    del hw2
    gc.collect()
    assert key not in module._FLAT_STATES
    # A weight that shares the dense row pointers of another but not its 2:4 ones gets its own state, which
    # outlives the other weight (whose dying 2:4 row pointers must not take the shared key's entry with them).
    hw3 = dataclasses.replace(hw1, nm_row_ptr=hw1.nm_row_ptr.clone())
    _close(hybrid_mm_flat_gemv(x, hw3, nb=4), _expected(x, W1), torch.bfloat16)
    state3 = module._FLAT_STATES[id(hw1.dense_row_ptr)][1]
    assert state3 is not module._flat_state(hw1, 4)  # hw1 takes the key back: a new entry for hw1
    assert module._flat_state(hw3, 4) is not state3  # and hw3 again (one entry per key: they alternate)
    state3 = module._flat_state(hw3, 4)
    del hw1
    gc.collect()
    assert module._FLAT_STATES[id(hw3.dense_row_ptr)][1] is state3
    _close(hybrid_mm_flat_gemv(x, hw3, nb=4), _expected(x, W1), torch.bfloat16)


def test_flat_gemv_refuses_bad_inputs() -> None:
    W, hw, _ = _case((32, 64), torch.bfloat16, seed=24)
    x = torch.zeros(1, 64, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    with pytest.raises(AssertionError):
        hybrid_mm_flat_gemv(torch.cat([x, x]), hw)  # one token only
    with pytest.raises(AssertionError, match="nb 6"):
        hybrid_mm_flat_gemv(x, hw, nb=6)
    with pytest.raises(AssertionError):
        hybrid_mm_flat_gemv(x.half(), hw)  # dtype
    with pytest.raises(AssertionError):
        hybrid_mm_flat_gemv(torch.zeros(1, 128, dtype=torch.bfloat16, device=KERNEL_DEVICE)[:, ::2], hw)  # strided


def test_the_op_sends_one_token_to_the_flat_gemv() -> None:
    """Which weights the op's one-token product takes to the flat GEMV (on by default, can be turned off), and
    when its state is ready (a CUDA graph capture never builds it: it keeps the per-block-row kernel until an
    eager call has). The uncounted default takes every weight; the counted kernel only mostly sparse ones."""
    import tierprune.kernels.triton.flat_gemv as module

    _, sparse, g = _case((64, 96), torch.bfloat16, seed=31, probs=(0.2, 0.5, 0.3))
    W, mostly_dense, _ = _case((64, 96), torch.bfloat16, seed=32, probs=(0.9, 0.1, 0.0))
    assert 2 * sparse.tier_counts()[0] < 24 < 2 * mostly_dense.tier_counts()[0]  # of 4 x 6 blocks
    assert module.FLAT_GEMV_CONFIG == (4, 1, False, 3, 8)
    assert module.prefers_flat_gemv(sparse) and module.prefers_flat_gemv(mostly_dense)
    previous = module.set_flat_gemv_config(module.FlatGemvConfig(nb=8, num_warps=1, counted=True))
    try:
        assert module.prefers_flat_gemv(sparse) and not module.prefers_flat_gemv(mostly_dense)
    finally:
        assert module.set_flat_gemv_config(previous).counted
    module.use_flat_gemv(False)
    try:
        assert not module.prefers_flat_gemv(sparse) and not module.prefers_flat_gemv(mostly_dense)
    finally:
        module.use_flat_gemv(True)

    assert not module.flat_gemv_ready(sparse, None) and not module.flat_gemv_ready(sparse, 8)
    x = torch.randn(1, 96, generator=g).to(torch.bfloat16).to(KERNEL_DEVICE)
    module.hybrid_mm_flat_gemv(x, sparse, nb=8)  # counted: builds the state and the counts for nb 8
    assert module.flat_gemv_ready(sparse, 8) and not module.flat_gemv_ready(sparse, 16)
    assert module.flat_gemv_ready(sparse, None) and not module.flat_gemv_ready(mostly_dense, None)
    # Through the op, eagerly: a mostly dense weight goes to the row kernel (mma_decode.prefers_rows_decode),
    # which builds no flat state; with the row kernel off, the default (uncounted) flat GEMV builds it.
    from tierprune.kernels.cuda import mma_decode

    xd = torch.randn(1, 96, generator=g).to(torch.bfloat16)
    _close(hybrid_mm(xd.to(KERNEL_DEVICE), mostly_dense), _expected(xd, W), torch.bfloat16)
    assert not module.flat_gemv_ready(mostly_dense, None)
    mma_decode.use_rows_decode(False)
    try:
        _close(hybrid_mm(xd.to(KERNEL_DEVICE), mostly_dense), _expected(xd, W), torch.bfloat16)
    finally:
        mma_decode.use_rows_decode(True)
    assert module.flat_gemv_ready(mostly_dense, None) == (KERNEL_DEVICE == "cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_unpack_is_exact(shape, dtype) -> None:
    W, hw, _ = _case(shape, dtype, seed=11)
    for split in (1, 2):
        assert torch.equal(hybrid_unpack(hw, split=split).cpu(), W)


def test_prefill_matches_reference() -> None:
    W, hw, g = _case((40, 52), torch.bfloat16, seed=12)
    x = torch.randn(33, 52, generator=g).to(torch.bfloat16)
    _close(hybrid_mm_prefill(x.to(KERNEL_DEVICE), hw), _expected(x, W), torch.bfloat16)


def test_decode_refuses_bad_inputs() -> None:
    W, hw, _ = _case((32, 64), torch.bfloat16, seed=13)
    x = torch.zeros(4, 64, dtype=torch.bfloat16, device=KERNEL_DEVICE)
    with pytest.raises(AssertionError, match="token tile 24"):
        hybrid_mm_decode(x, hw, token_tile=24)
    with pytest.raises(AssertionError):
        hybrid_mm_decode(torch.zeros(2, 64, dtype=torch.float16, device=KERNEL_DEVICE), hw)  # dtype
    with pytest.raises(AssertionError):
        hybrid_mm_decode(torch.zeros(64, 2, dtype=torch.bfloat16, device=KERNEL_DEVICE).t(), hw)  # layout


def test_custom_op_matches_reference_and_passes_opcheck() -> None:
    W, hw, g = _case((40, 52), torch.bfloat16, seed=14)
    x = torch.randn(2, 5, 52, generator=g).to(torch.bfloat16).to(KERNEL_DEVICE)
    got = hybrid_mm(x, hw)
    assert got.shape == (2, 5, 40)
    _close(got, _expected(x, W), torch.bfloat16)
    _close(hybrid_mm(x.reshape(10, 52), hw), _expected(x.reshape(10, 52), W), torch.bfloat16)
    # Schema, fake (meta) implementation and dispatcher registration, as torch.compile relies on them.
    args = (x, *hw.tensors().values(), hw.shape[0], hw.shape[1], hw.block_size, hw.topk)
    torch.library.opcheck(torch.ops.tierprune.hybrid_mm.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_custom_op_traces_under_torch_compile() -> None:
    W, hw, g = _case((32, 48), torch.float32, seed=15)
    x = torch.randn(4, 48, generator=g)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, *tensors):
        return torch.ops.tierprune.hybrid_mm(x, *tensors, 32, 48, 16, 10) * 2

    got = f(x.to(KERNEL_DEVICE), *hw.tensors().values())
    _close(got / 2, _expected(x, W), torch.float32)


# Run in a fresh interpreter: a process whose triton was imported in interpreter mode cannot compile
# (Triton's own standard library is decorated for the interpreter at import).
COMPILE_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tierprune.kernels.triton import _hybrid_kernels as K

PACKED = {"dv_ptr": "*{w}", "dc_ptr": "*i16", "dp_ptr": "*i32", "nv_ptr": "*{w}", "meta_ptr": "*u8",
          "nc_ptr": "*i16", "np_ptr": "*i32", "tv_ptr": "*{w}", "tp_ptr": "*u8", "tc_ptr": "*i16", "tpp_ptr": "*i32"}
target = GPUTarget("cuda", 90, 32)
ALIGNED_INTS = ("N_OUT", "K_IN", "stride_xt", "stride_ot", "stride_w")


def aligned(sig):
    # What the JIT specializes at launch for 16-byte-aligned tensors and multiples of 16 (LLaMA shapes).
    return {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(sig.items())
            if ty.startswith("*") or name in ALIGNED_INTS}


report = {}
for dtype, atomic, tp in [("bf16", True, 16), ("bf16", False, 16), ("fp16", False, 16), ("bf16", True, 64)]:
    packed = {name: t.format(w=dtype) for name, t in PACKED.items()}
    consts = dict(TOPK=10, KP=16, NB=4, TP=tp, SPLIT=2 if atomic else 1, ATOMIC=atomic, UPCAST=False)
    sig = {"x_ptr": "*" + dtype, "out_ptr": "*fp32" if atomic else "*" + dtype, **packed,
           **{n: "i32" for n in ("T", "N_OUT", "K_IN", "stride_xt", "stride_ot")}, **{n: "constexpr" for n in consts}}
    k = triton.compile(ASTSource(fn=K._hybrid_decode_kernel, signature=sig, constexprs=consts, attrs=aligned(sig)),
                       target=target, options={"num_warps": 4})
    report[f"decode-{dtype}-{atomic}-{tp}"] = {"mma": k.asm["ptx"].count("mma.sync"), "cubin": len(k.asm["cubin"]),
                                          "async_copies": k.asm["ttgir"].count("ttg.async_copy_global_to_local"),
                                          "nm_values_prefetched": "async_copy_global_to_local" in "".join(
                                              line for line in k.asm["ttgir"].splitlines() if "tensor<16x4x8x" in line)}
    if tp == 16:
        consts = dict(TOPK=10, KP=16, NB=8, SPLIT=2 if atomic else 1, ATOMIC=atomic)
        sig = {"x_ptr": "*" + dtype, "out_ptr": "*fp32" if atomic else "*" + dtype, **packed,
               **{n: "i32" for n in ("N_OUT", "K_IN")}, **{n: "constexpr" for n in consts}}
        k = triton.compile(ASTSource(fn=K._hybrid_gemv_kernel, signature=sig, constexprs=consts, attrs=aligned(sig)),
                           target=target, options={"num_warps": 4})
        report[f"gemv-{dtype}-{atomic}"] = {"cubin": len(k.asm["cubin"]),
                                            "async_copies": k.asm["ttgir"].count("ttg.async_copy_global_to_local")}
for dtype, atomic in [("bf16", False), ("bf16", True), ("fp16", False)]:  # atomic: here, SPLIT 2 (a workspace)
    packed = {name: t.format(w=dtype) for name, t in PACKED.items()}
    out = "*" + dtype
    consts = dict(TOPK=10, KP=16, NB=8, TP=16, SPLIT=2 if atomic else 1, UPCAST=False)
    sig = {"x_ptr": "*" + dtype, "out_ptr": out, "ws_ptr": "*fp32", "cnt_ptr": "*i32", **packed,
           **{n: "i32" for n in ("T", "N_OUT", "K_IN", "stride_xt", "stride_ot")}, **{n: "constexpr" for n in consts}}
    k = triton.compile(ASTSource(fn=K._hybrid_decode_prefetch_kernel, signature=sig, constexprs=consts,
                                 attrs=aligned(sig)), target=target, options={"num_warps": 4})
    report[f"prefetch-decode-{dtype}-{atomic}-16"] = {"mma": k.asm["ptx"].count("mma.sync"),
                                                      "cubin": len(k.asm["cubin"])}
    consts = dict(TOPK=10, KP=16, NB=16, SPLIT=2 if atomic else 1)
    sig = {"x_ptr": "*" + dtype, "out_ptr": out, "ws_ptr": "*fp32", "cnt_ptr": "*i32", **packed,
           **{n: "i32" for n in ("N_OUT", "K_IN")},
           **{n: "constexpr" for n in consts}}
    k = triton.compile(ASTSource(fn=K._hybrid_gemv_prefetch_kernel, signature=sig, constexprs=consts,
                                 attrs=aligned(sig)), target=target, options={"num_warps": 8})
    report[f"prefetch-gemv-{dtype}-{atomic}"] = {"cubin": len(k.asm["cubin"])}
for dtype in ("bf16", "fp16"):
    packed = {name: t.format(w=dtype) for name, t in PACKED.items()}
    consts = dict(TOPK=10, KP=16, NB=4, SPLIT=1)
    sig = {"w_ptr": "*" + dtype, **packed, **{n: "i32" for n in ("N_OUT", "K_IN", "stride_w")},
           **{n: "constexpr" for n in consts}}
    k = triton.compile(ASTSource(fn=K._hybrid_unpack_kernel, signature=sig, constexprs=consts, attrs=aligned(sig)),
                       target=target, options={"num_warps": 4})
    report[f"unpack-{dtype}"] = {"mma": 0, "cubin": len(k.asm["cubin"])}
print(json.dumps(report))
"""


def test_kernels_compile_for_hopper() -> None:
    """PTX and a cubin for sm_90, built on the CPU with the ptxas that ships in the triton wheel."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"decode-bf16-True-16", "decode-bf16-False-16", "decode-fp16-False-16", "decode-bf16-True-64",
                "gemv-bf16-True", "gemv-bf16-False", "gemv-fp16-False", "unpack-bf16", "unpack-fp16",
                "prefetch-decode-bf16-False-16", "prefetch-decode-bf16-True-16", "prefetch-decode-fp16-False-16",
                "prefetch-gemv-bf16-False", "prefetch-gemv-bf16-True", "prefetch-gemv-fp16-False"}
    assert set(report) == expected, report
    for name, item in report.items():
        assert item["cubin"] > 0, name
        if "decode" in name:
            assert item["mma"] > 0, (name, item)
        if name.startswith("decode"):
            assert item["mma"] > 0, (name, item)  # the tile products run on the tensor cores
            # The software pipeliner prefetches the dense tile, the 2:4 values and x with async copies
            # (vector loads): two tensors per loop, at least two stages each, in both loops.
            assert item["async_copies"] >= 8 and item["nm_values_prefetched"], (name, item)


FLAT_COMPILE_SCRIPT = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tierprune.kernels.triton import _flat_gemv as F

PACKED = {"dv_ptr": "*{w}", "dc_ptr": "*i16", "dp_ptr": "*i32", "nv_ptr": "*{w}", "meta_ptr": "*u8",
          "nc_ptr": "*i16", "np_ptr": "*i32", "tv_ptr": "*{w}", "tp_ptr": "*u8", "tc_ptr": "*i16", "tpp_ptr": "*i32"}
report = {}
for dtype, nb, warps, expand in [("bf16", 4, 1, False), ("bf16", 8, 2, False), ("fp16", 16, 4, False),
                                 ("bf16", 32, 4, False), ("bf16", 16, 4, True), ("fp16", 8, 2, True)]:
    consts = dict(TOPK=10, KP=16, NB=nb, NM_EXPAND=expand)
    sig = {"x_ptr": "*" + dtype, "out_ptr": "*" + dtype, "ws_ptr": "*fp32", "cnt_ptr": "*i32", "need_ptr": "*i32",
           "brow_ptr": "*i16", **{k: v.format(w=dtype) for k, v in PACKED.items()},
           **{n: "i32" for n in ("N_DENSE", "N_NM", "N_TOPK", "P_DENSE", "P_NM", "N_OUT", "K_IN")},
           **{n: "constexpr" for n in consts}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
             if t.startswith("*") or n in ("N_OUT", "K_IN")}
    k = triton.compile(ASTSource(fn=F._hybrid_flat_gemv_kernel, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx = k.asm["ptx"]
    report[f"{dtype}-{nb}-{warps}-{int(expand)}"] = {"cubin": len(k.asm["cubin"]),
                                       "atomics": sorted(set(re.findall(r"atom\.global\.[a-z0-9._]+", ptx)))}
for dtype, nb, warps, chunks, topk_nb in [("bf16", 4, 1, 1, 0), ("fp16", 8, 2, 4, 0), ("bf16", 4, 1, 2, 16)]:
    consts = dict(TOPK=10, KP=16, NB=nb, NM_EXPAND=False, CHUNKS=chunks, TOPK_NB=topk_nb)
    unread = ("dp_ptr", "np_ptr", "tpp_ptr")
    sig = {"x_ptr": "*" + dtype, "ws_ptr": "*fp32", "brow_ptr": "*i16",
           **{k: v.format(w=dtype) for k, v in PACKED.items() if k not in unread},
           **{n: "i32" for n in ("N_DENSE", "N_NM", "N_TOPK", "P_DENSE", "P_NM", "K_IN")},
           **{n: "constexpr" for n in consts}}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items()) if t.startswith("*") or n == "K_IN"}
    k = triton.compile(ASTSource(fn=F._hybrid_flat_gemv_uncounted_kernel, signature=sig, constexprs=consts,
                                 attrs=attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    report[f"{dtype}-{nb}-{warps}-uncounted-{chunks}-{topk_nb}"] = {
        "cubin": len(k.asm["cubin"]), "atomics": sorted(set(re.findall(r"atom\.global\.[a-z0-9._]+", k.asm["ptx"])))}
print(json.dumps(report))
"""


def test_flat_gemv_compiles_for_hopper() -> None:
    """A cubin for sm_90 per config; one ordered atomic (the block-row counter), the partial sums relaxed.

    Ordered (acq_rel) fp32 additions would put a fence before every one of them. The uncounted kernel has the
    relaxed additions only: no counter, no exchange.
    """
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", FLAT_COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"bf16-4-1-0", "bf16-8-2-0", "fp16-16-4-0", "bf16-32-4-0", "bf16-16-4-1", "fp16-8-2-1",
                "bf16-4-1-uncounted-1-0", "fp16-8-2-uncounted-4-0", "bf16-4-1-uncounted-2-16"}
    assert set(report) == expected, report
    for name in ("bf16-4-1-uncounted-1-0", "fp16-8-2-uncounted-4-0", "bf16-4-1-uncounted-2-16"):
        item = report.pop(name)
        assert item["cubin"] > 0 and item["atomics"], (name, item)
        assert all(re.fullmatch(r"atom\.global\.gpu\.relaxed\.add(\.v\d)?\.f32", a) for a in item["atomics"]), item
    for name, item in report.items():
        assert item["cubin"] > 0, name
        ordered = [a for a in item["atomics"] if ".acq_rel." in a or ".release." in a or ".acquire." in a]
        assert ordered == ["atom.global.gpu.acq_rel.add.u32"], (name, item["atomics"])
        assert any(".relaxed.add." in a and "f32" in a for a in item["atomics"]), (name, item["atomics"])
        assert any(".relaxed.exch.b32" in a for a in item["atomics"]), (name, item["atomics"])


def test_tuned_configs_override_the_heuristic(monkeypatch) -> None:
    from tierprune.kernels.triton import hybrid_mm as module

    monkeypatch.setattr(module, "_TUNED_DECODE", {})
    W, hw, g = _case((40, 52), torch.bfloat16, seed=16)
    nb, split, warps, tile, prefetch = module.decode_config(hw, 5)
    assert tile == 16 and split >= 1 and nb in (4, 8)
    assert module.decode_config(hw, 1)[3] == 1  # one token: the GEMV kernel
    assert module.decode_config(hw, 40)[3] == 64  # one token tile of 64 for a short prefill
    module.set_decode_config((40, 52), 5, (2, 1, 4, 0))  # token tile 0: unpack + cuBLAS wins at 5 tokens
    assert module.decode_config(hw, 5) == (2, 1, 4, 0, False)  # a 4-tuple: the per-tier loops
    x = torch.randn(5, 52, generator=g).to(torch.bfloat16)
    _close(hybrid_mm(x.to(KERNEL_DEVICE), hw), _expected(x, W), torch.bfloat16)
