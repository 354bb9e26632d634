"""x @ W.T for a packed hybrid weight: Triton wrappers and the `tierprune::hybrid_mm` custom op.

Decode and short prefills (at most SKINNY_MAX_TOKENS tokens) stream the packed bytes once per tile of
16-64 tokens (`_hybrid_decode_kernel`); longer prefills unpack the weight into a dense workspace with
`_hybrid_unpack_kernel` and hand it to cuBLAS, which is compute-bound there anyway. The custom op
has a fake implementation, so torch.compile traces it and CUDA graphs capture it (no host syncs);
its CPU path is the pure-torch reference. This module imports triton only when a kernel runs.
From 1 to 16 tokens the row kernel of ../cuda/mma_decode.py (CUDA C++ through NVRTC, one CTA per block-row)
takes them where it can: 2-16 tokens always, one token where at least half of the blocks are dense or where
the block-rows fit the GPU at once (mma_decode.prefers_rows_decode; mma_decode.use_rows_decode(False) turns
it off). Other one-token products go to the flat GEMV (flat_gemv.py; flat_gemv.use_flat_gemv(False) turns
that off), and without the row kernel 2-16 tokens go to the chunk kernel of the same file
(mma_decode.use_mma_decode(False) turns that off). On an H100 / H200, wgmma_prefill.use_wgmma_prefill(True) sends
products of 256 tokens or more to ../cuda/wgmma_prefill.py's kernel instead of unpack + cuBLAS (off by default: it
is correct but slower there, 0.18-0.30x cuBLAS at 2048 tokens against unpack + cuBLAS's 0.72-0.80x, session 33).

Eager calls skip the op where they can (`hybrid_mm`): a plain eager decode product through a weight seen before
goes straight to its prepared row-kernel launch (`_prepared_rows_decode`), since the custom op's dispatch and the
per-call checks cost more host time than the kernel takes on the GPU.
"""
from __future__ import annotations

import functools
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..cuda import mma_decode, wgmma_prefill  # CUDA C++ compiled at first use (NVRTC); importing touches no GPU
from ..hybrid import HYBRID_TENSOR_NAMES, HybridWeight, hybrid_matmul_ref

__all__ = ["DECODE_MAX_TOKENS", "SKINNY_MAX_TOKENS", "hybrid_mm", "hybrid_mm_decode", "hybrid_mm_prefill",
           "hybrid_unpack", "decode_config", "set_decode_config"]

DECODE_MAX_TOKENS = 16  # decode proper: one token tile of 16
SKINNY_MAX_TOKENS = 128  # up to here the op streams the packed weight; above, unpack + cuBLAS
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def _kernels():
    from . import _hybrid_kernels  # triton is imported here, not at module import

    return _hybrid_kernels


def _pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def _packed_args(hw: HybridWeight) -> list[torch.Tensor]:
    # A tier with no blocks still passes a pointer, never read (its row pointers are all zero). A view of a
    # row-pointer array (never empty) stands in: allocating one element per call would launch a fill kernel
    # for every empty buffer, three extra kernels per matrix at 90/10/0.
    stand_in = hw.dense_row_ptr
    return [t if t.numel() else stand_in.view(t.dtype)[:1] for t in hw.tensors().values()]


def _check(hw: HybridWeight) -> None:
    assert hw.block_size == 16, f"the Triton kernels need 16x16 blocks, got {hw.block_size}"
    for name, t in hw.tensors().items():
        assert t.is_contiguous(), f"{name} is not contiguous"


# (NB blocks per step, SPLIT programs per block-row, num_warps, token tile, prefetch). Token tile 1 is a GEMV
# kernel (one token, no tensor cores); 0 sends the op to unpack + cuBLAS (a tuning result may find that
# faster for a short prefill). prefetch: the `*_prefetch_kernel`s, which issue each step's loads a step ahead.
# SPLIT > 1: the prefetching kernels sum the splits' partials in a workspace (the last split of a
# block-row adds them); the others add into a zeroed fp32 output with atomics, two kernels more (zero, cast).
DecodeConfig = tuple[int, int, int, int, bool]
_TUNED_DECODE: dict[tuple[int, int, int], DecodeConfig] = {}


def set_decode_config(shape: tuple[int, int], tokens: int, config: tuple) -> None:
    """Use `config` for weights of `shape` (out, in) at `tokens` tokens (a benchmark's tuning result).

    A 4-tuple (without `prefetch`) means the GEMV kernel without prefetching.
    """
    config = tuple(config)
    _TUNED_DECODE[(shape[0], shape[1], tokens)] = (*config, False) if len(config) == 4 else config


def decode_config(hw: HybridWeight, tokens: int = 1, num_sms: int = 132) -> DecodeConfig:
    """(NB, SPLIT, num_warps, token tile, prefetch) for the decode kernels: a tuned entry if set, else a heuristic.

    From benchmarks/decode_sweep.py on an H200 (README): at one token the prefetching GEMV, with 4 blocks per
    step, 8 splits per block-row and 2 warps, is the fastest config for 4096-row matrices (256 block-rows,
    too few programs alone) and for any matrix that is mostly 2:4 and TopK; a mostly dense matrix with
    enough block-rows does best with one program per block-row. From 2 tokens, the tile kernel without
    prefetching, split until the grid covers every SM about four times.
    """
    tuned = _TUNED_DECODE.get((hw.shape[0], hw.shape[1], tokens))
    if tuned is not None:
        return tuned
    nbr = len(hw.dense_row_ptr) - 1
    counts = hw.tier_counts()
    per_row = max(1, sum(counts) // max(nbr, 1))
    if tokens == 1:  # the GEMV kernel: no tensor-core tiles to rebuild, fewer instructions per byte
        if nbr >= 4 * num_sms and counts[0] >= sum(counts) / 2:
            return 8, 1, 4, 1, True
        return 4, _pow2_at_least(max(1, min(8, per_row // 16))), 2, 1, True
    token_tile = min(64, _pow2_at_least(tokens, 16))  # tl.dot needs 16; x tiles beyond 64 crowd the SM
    tiles = -(-tokens // token_tile)
    split = _pow2_at_least(max(1, min(-(-4 * num_sms // max(nbr * tiles, 1)), per_row // 32)))
    return (8 if token_tile <= 16 else 4), split, 4, token_tile, False


def hybrid_mm_decode(x: torch.Tensor, hw: HybridWeight, *, nb: int | None = None, split: int | None = None,
                     num_warps: int | None = None, token_tile: int | None = None,
                     prefetch: bool | None = None) -> torch.Tensor:
    """x (T, in) @ W.T -> (T, out) streaming the packed weight: every byte read once per token tile.

    Meant for decode and short prefills (T <= SKINNY_MAX_TOKENS); longer inputs go to hybrid_mm_prefill.
    """
    assert x.dim() == 2 and x.is_contiguous(), (tuple(x.shape), x.stride())
    assert x.shape[1] == hw.shape[1], (tuple(x.shape), hw.shape)
    assert x.dtype == hw.dtype and x.dtype in _KERNEL_DTYPES, (x.dtype, hw.dtype)
    assert x.device == hw.device, (x.device, hw.device)
    _check(hw)
    K = _kernels()
    T, (n_out, k_in) = x.shape[0], hw.shape
    nbr = len(hw.dense_row_ptr) - 1
    default = decode_config(hw, T, _num_sms(x.device))
    nb, split = nb or default[0], split or default[1]
    num_warps, token_tile = num_warps or default[2], token_tile or default[3]
    prefetch = default[4] if prefetch is None else prefetch
    assert token_tile == 1 or (token_tile >= 16 and token_tile & (token_tile - 1) == 0), \
        f"token tile {token_tile}: 1 (the GEMV kernel, one token) or a power of 2 >= 16"
    kp = _pow2_at_least(hw.topk)
    tiles = -(-T // token_tile)
    if prefetch:  # one kernel: splits meet in a workspace, the last one of a tile writes the output
        out = x.new_empty(T, n_out)
        ws = torch.empty(split if split > 1 else 0, T, n_out, dtype=torch.float32, device=x.device)
        cnt = _split_counters(x.device, nbr * tiles) if split > 1 else out
        args = (x, out, ws if split > 1 else out, cnt, *_packed_args(hw))
        if token_tile == 1:
            assert T == 1, f"the GEMV kernel (token tile 1) takes one token, got {T}"
            K._hybrid_gemv_prefetch_kernel[(nbr, split)](*args, n_out, k_in, TOPK=hw.topk, KP=kp, NB=nb,
                                                         SPLIT=split, num_warps=num_warps)
        else:
            K._hybrid_decode_prefetch_kernel[(nbr, split, tiles)](
                *args, T, n_out, k_in, x.stride(0), out.stride(0), TOPK=hw.topk, KP=kp, NB=nb, TP=token_tile,
                SPLIT=split, UPCAST=x.dtype == torch.bfloat16 and _interpreting(), num_warps=num_warps)
        return out
    atomic = split > 1
    out = torch.zeros(T, n_out, dtype=torch.float32, device=x.device) if atomic else x.new_empty(T, n_out)
    if token_tile == 1:
        assert T == 1, f"the GEMV kernel (token tile 1) takes one token, got {T}"
        K._hybrid_gemv_kernel[(nbr, split)](
            x, out, *_packed_args(hw), n_out, k_in, TOPK=hw.topk, KP=kp, NB=nb, SPLIT=split, ATOMIC=atomic,
            num_warps=num_warps,
        )
    else:
        K._hybrid_decode_kernel[(nbr, split, tiles)](
            x, out, *_packed_args(hw), T, n_out, k_in, x.stride(0), out.stride(0), TOPK=hw.topk, KP=kp, NB=nb,
            TP=token_tile, SPLIT=split, ATOMIC=atomic, UPCAST=x.dtype == torch.bfloat16 and _interpreting(),
            num_warps=num_warps,
        )
    return out.to(x.dtype) if atomic else out


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """n zeroed int32 counters for the split reduction, kept per device: each launch leaves them at zero.

    Kernels on one stream run one after another, so they can share them; the first call allocates (and
    zeroes) them, so call once before capturing a CUDA graph on another stream.
    """
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < n:
        counters = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters


def hybrid_unpack(hw: HybridWeight, *, nb: int = 4, split: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """The dense weight (out, in) written by the unpack kernel (the prefill workspace)."""
    _check(hw)
    if split is None:  # cover every SM about four times: unpacking writes the dense bytes, it needs the programs
        nbr = len(hw.dense_row_ptr) - 1
        per_row = max(1, sum(hw.tier_counts()) // max(nbr, 1))
        split = _pow2_at_least(max(1, min(-(-4 * _num_sms(hw.device) // max(nbr, 1)), per_row // 32)))
    K = _kernels()
    n_out, k_in = hw.shape
    nbr = len(hw.dense_row_ptr) - 1
    W = torch.empty(n_out, k_in, dtype=hw.dtype, device=hw.device)  # every block is written
    K._hybrid_unpack_kernel[(nbr, split)](
        W, *_packed_args(hw), n_out, k_in, W.stride(0),
        TOPK=hw.topk, KP=_pow2_at_least(hw.topk), NB=nb, SPLIT=split, num_warps=num_warps,
    )
    return W


def hybrid_mm_prefill(x: torch.Tensor, hw: HybridWeight) -> torch.Tensor:
    """x (T, in) @ W.T -> (T, out): unpack into a dense workspace, then the dense GEMM (cuBLAS on CUDA)."""
    assert x.dim() == 2 and x.shape[1] == hw.shape[1], (tuple(x.shape), hw.shape)
    assert x.dtype == hw.dtype, (x.dtype, hw.dtype)
    return F.linear(x, hybrid_unpack(hw))


def _interpreting() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter on CPU: any number works, an H100/H200's keeps the grid realistic


def _as_hybrid(tensors: list[torch.Tensor], out_features: int, in_features: int, block_size: int,
               topk: int) -> HybridWeight:
    return HybridWeight((out_features, in_features), block_size, topk, *tensors)


# Prepared row-kernel launches by product: GPU, tokens, dtype, the weight's shape, k, tier counts and buffer
# addresses (all the launch depends on). None: the row kernel does not take the product. The switches that pick
# a kernel (use_rows_decode, use_flat_gemv) empty it.
_ROWS_DECODE: dict[tuple, Callable[[torch.Tensor], torch.Tensor] | None] = {}
_ROWS_DECODE_MAX = 1 << 16  # products kept (a 7B model has 224 weights x 16 token counts); then start over
_PACKED_BUFFERS = operator.attrgetter(*HYBRID_TENSOR_NAMES)  # one C call per product, not eleven getattrs
_DATA_PTR = torch.Tensor.data_ptr


def forget_prepared_launches() -> None:
    """Drop every prepared launch and prefill plan (the switches that pick a kernel call this)."""
    _ROWS_DECODE.clear()
    _PREFILL_PLANS.clear()


def _prepared_rows_decode(x2: torch.Tensor, hw: HybridWeight) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The row kernel's prepared launch for x2 (T <= 16 tokens, contiguous, hw's dtype) through hw, or None where
    the op sends the product elsewhere (mma_decode.prefers_rows_decode) or the kernel cannot take it. Every eager
    decode call looks here, so the key is built from C calls only (no Python-level len or generator)."""
    if x2.data_ptr() % 8:  # the kernel's 8-byte loads; the weight's buffers are checked with the launch
        return None
    buffers = _PACKED_BUFFERS(hw)
    key = (x2.get_device(), x2.shape[0], x2.dtype, hw.shape, hw.topk, buffers[1].shape[0], buffers[5].shape[0],
           buffers[9].shape[0], *map(_DATA_PTR, buffers))  # tier counts: the cols of each tier
    try:
        return _ROWS_DECODE[key]
    except KeyError:
        pass
    T = x2.shape[0]
    takes = mma_decode.prefers_rows_decode(T, hw) and mma_decode.mma_decode_supported(x2, hw)
    if takes and torch.cuda.is_current_stream_capturing():  # no compiling here: use the kernel only if built
        return mma_decode.prepare_rows_decode(x2, hw) if mma_decode.rows_decode_ready(x2, hw) else None
    if len(_ROWS_DECODE) >= _ROWS_DECODE_MAX:
        _ROWS_DECODE.clear()
    _ROWS_DECODE[key] = mma_decode.prepare_rows_decode(x2, hw) if takes else None
    return _ROWS_DECODE[key]


# Prefill plans (wgmma_prefill.PrefillPlan) by weight, held for as long as its dense_row_ptr tensor lives, with the
# address and version (in-place writes bump it) of every buffer the plan reads: a weight loaded in place, or a new
# one at freed addresses, gets a new plan. Built at the first long prefill through a weight, not inside a CUDA
# graph capture (there the product takes unpack + cuBLAS).
_PREFILL_PLANS = torch.utils.weak.WeakIdKeyDictionary()


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return -1


def _plan_stamp(hw: HybridWeight) -> tuple:
    return tuple((t.data_ptr(), _version(t)) for t in (hw.dense_cols, hw.dense_row_ptr, hw.nm_cols, hw.nm_row_ptr,
                                                       hw.topk_cols, hw.topk_row_ptr, hw.topk_pos, hw.topk_values))


def _prefill_plan(x2: torch.Tensor, hw: HybridWeight) -> wgmma_prefill.PrefillPlan | None:
    """The wgmma prefill plan for x2 through hw, or None where the op sends the product to unpack + cuBLAS."""
    if not (wgmma_prefill.prefers_wgmma_prefill(x2.shape[0]) and wgmma_prefill.wgmma_prefill_supported(x2, hw)):
        return None
    stamp, (held_stamp, plan) = _plan_stamp(hw), _PREFILL_PLANS.get(hw.dense_row_ptr, (None, None))
    if held_stamp != stamp:
        if x2.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        plan = wgmma_prefill.prefill_plan(hw)
        _PREFILL_PLANS[hw.dense_row_ptr] = (stamp, plan)
    return plan


def _plain_eager(x: torch.Tensor) -> bool:
    """Whether a call on x may bypass the op: a plain CUDA tensor, not traced by torch.compile, under no torch
    function or dispatch mode (FakeTensor, FlopCounter, a `with torch.device(...)` block), wanting no gradient."""
    return (type(x) is torch.Tensor and x.is_cuda and not torch.compiler.is_compiling()
            and not torch._C._is_torch_function_mode_enabled() and not torch._C._len_torch_dispatch_stack()
            and not (x.requires_grad and torch.is_grad_enabled()))


@torch.library.custom_op("tierprune::hybrid_mm", mutates_args=())
def _hybrid_mm_op(x: torch.Tensor, dense_values: torch.Tensor, dense_cols: torch.Tensor,
                  dense_row_ptr: torch.Tensor, nm_values: torch.Tensor, nm_meta: torch.Tensor,
                  nm_cols: torch.Tensor, nm_row_ptr: torch.Tensor, topk_values: torch.Tensor,
                  topk_pos: torch.Tensor, topk_cols: torch.Tensor, topk_row_ptr: torch.Tensor,
                  out_features: int, in_features: int, block_size: int, topk: int) -> torch.Tensor:
    hw = _as_hybrid([dense_values, dense_cols, dense_row_ptr, nm_values, nm_meta, nm_cols, nm_row_ptr,
                     topk_values, topk_pos, topk_cols, topk_row_ptr], out_features, in_features, block_size, topk)
    if not x.is_cuda or block_size != 16:
        return hybrid_matmul_ref(x, hw)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).contiguous()
    T = x2.shape[0]
    if T == 0:  # an empty grid is not a launch
        return x.new_empty(*lead, out_features)
    kernel_dtype = x2.dtype in _KERNEL_DTYPES and x2.dtype == hw.dtype
    if T <= DECODE_MAX_TOKENS and kernel_dtype:
        rows_decode = _prepared_rows_decode(x2, hw)
        if rows_decode is not None:
            return rows_decode(x2).reshape(*lead, out_features)
    if T == 1 and kernel_dtype:
        from . import flat_gemv  # here, not at the top: it imports this module's helpers

        cfg = flat_gemv.FLAT_GEMV_CONFIG
        # The first call per weight builds the flat state (allocations and small kernels). Inside a CUDA graph
        # capture that would leave the state in the graph's private memory, so a capture that comes before
        # any eager call (warm-up) keeps the per-block-row kernel.
        if flat_gemv.prefers_flat_gemv(hw) and (flat_gemv.flat_gemv_ready(hw, cfg.nb if cfg.counted else None)
                                                or not torch.cuda.is_current_stream_capturing()):
            out = flat_gemv.hybrid_mm_flat_gemv(x2, hw, nb=cfg.nb, num_warps=cfg.num_warps, counted=cfg.counted,
                                                chunks=cfg.chunks, topk_nb=cfg.topk_nb)
            return out.reshape(*lead, out_features)
    if T <= DECODE_MAX_TOKENS and kernel_dtype:
        # Same rule as the flat GEMV's: a capture before any eager call keeps the Triton kernels.
        if mma_decode.prefers_mma_decode(T) and mma_decode.mma_decode_supported(x2, hw) and (
                mma_decode.mma_decode_ready(hw, T) or not torch.cuda.is_current_stream_capturing()):
            return mma_decode.hybrid_mm_mma(x2, hw).reshape(*lead, out_features)
    stream = T <= SKINNY_MAX_TOKENS and decode_config(hw, T, _num_sms(x.device))[3] != 0
    plan = None if stream or not kernel_dtype else _prefill_plan(x2, hw)
    if stream and kernel_dtype:
        out = hybrid_mm_decode(x2, hw)
    elif plan is not None:
        out = wgmma_prefill.hybrid_wgmma_prefill(x2, hw, plan)
    else:
        out = hybrid_mm_prefill(x2.to(hw.dtype), hw).to(x.dtype)
    return out.reshape(*lead, out_features)


@_hybrid_mm_op.register_fake
def _(x, dense_values, dense_cols, dense_row_ptr, nm_values, nm_meta, nm_cols, nm_row_ptr, topk_values,
      topk_pos, topk_cols, topk_row_ptr, out_features, in_features, block_size, topk):
    torch._check(x.shape[-1] == in_features)
    return x.new_empty(*x.shape[:-1], out_features)


def hybrid_mm(x: torch.Tensor, hw: HybridWeight) -> torch.Tensor:
    """x (..., in) @ W.T -> (..., out) through the `tierprune::hybrid_mm` op."""
    if x.shape[-1] != hw.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {hw.shape[1]}")
    if _plain_eager(x) and x.dtype == hw.dtype and hw.block_size == 16 and 1 <= x.numel() // hw.shape[1] <= \
            DECODE_MAX_TOKENS:
        x2 = x.reshape(-1, hw.shape[1])
        rows_decode = _prepared_rows_decode(x2, hw) if x2.is_contiguous() else None
        if rows_decode is not None:  # what the op would do, without its dispatch
            return rows_decode(x2).reshape(*x.shape[:-1], hw.shape[0])
    tensors = [getattr(hw, name) for name in HYBRID_TENSOR_NAMES]
    return torch.ops.tierprune.hybrid_mm(x, *tensors, hw.shape[0], hw.shape[1], hw.block_size, hw.topk)
