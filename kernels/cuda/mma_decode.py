"""Decode (1-16 tokens) through a packed hybrid weight on the tensor cores: the CUDA kernels' wrappers.

mma_decode.cu holds the kernels and says how they work. They are compiled at first use with NVRTC, through
torch's own binding (torch ships libnvrtc with its CUDA builds), so the project needs no compiler at install
time and the CPU install never touches CUDA. The compiled module is cached per (dtype, TopK k, token tiles,
config, device) for the process, and launched through launch.PreparedLaunch (a few microseconds of Python).

Two kernels share the per-block tensor-core recipe:
- the row kernel (hybrid_mm_rows, what the op uses): one CTA per block-row, whose warps keep their sums in
  registers, then add them in shared memory in warp order and write the output: the same bits on every call.
  One launch, no workspace, no per-weight state.
- the chunk kernel (hybrid_mm_mma, the design before it): one warp per chunk of blocks of one tier, which adds
  fp32 partial sums into a per-weight workspace with atomics; hybrid_cast_and_zero then writes the output and
  zeroes the workspace, so calls on one weight must run one after another (one stream), as decode does. The
  workspace and the block-row index are shared with the flat GEMV (flat_gemv.decode_workspace), built on the
  first call per weight: make one call before capturing a CUDA graph.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import torch

from ..hybrid import HYBRID_TENSOR_NAMES, HybridWeight
from .launch import PreparedLaunch, current_raw_stream, fit_shared_memory_carveout

__all__ = ["MMA_DECODE_MAX_TOKENS", "MmaDecodeConfig", "MMA_DECODE_CONFIG", "ROWS_DECODE_LADDERS", "RowsChoice",
           "hybrid_mm_mma", "hybrid_mm_rows", "kernel_source", "mma_decode_supported", "mma_decode_ready",
           "prefers_mma_decode", "prefers_rows_decode", "prepare_rows_decode", "rows_resident_at_once",
           "rows_decode_config", "rows_decode_ready", "selector_table",
           "set_mma_decode_config", "use_mma_decode", "use_rows_decode", "x_by_block_columns",
           "X_BLOCK_MAJOR_MIN_BYTES", "X_BLOCK_MAJOR_TILES", "SPARSE_24_MAX_TOKENS", "SPARSE_24_FORCED"]

MMA_DECODE_MAX_TOKENS = 16  # two 8-token mma tiles


class MmaDecodeConfig(NamedTuple):
    """Dense and 2:4 blocks per warp, TopK blocks per warp (both at most 32: a lane holds one block's column and
    block-row), and warps per CTA. The row kernel also reads `nm_chunk`, its 2:4 blocks per warp step (0: as
    `chunk`), and `min_ctas`, the CTAs per SM its registers must allow (0: no bound)."""

    chunk: int = 8
    topk_chunk: int = 12
    warps: int = 4
    nm_chunk: int = 0
    min_ctas: int = 0


# Chunks of 8 blocks, 4 warps: the fastest, or within a few percent, of 5-9 configs swept at 1, 4 and 16
# tokens on every LLaMA-2-7B shape and both mixes (H200, session 11; README).
MMA_DECODE_CONFIG = MmaDecodeConfig()
_MMA_DECODE_ENABLED = [True]


def use_mma_decode(enabled: bool) -> None:
    """Let the op send 2-16 token products to the tensor-core kernel (the default where it runs), or not."""
    _MMA_DECODE_ENABLED[0] = bool(enabled)


def prefers_mma_decode(tokens: int) -> bool:
    """Whether the op sends a product of `tokens` tokens here: 2-16 (one token goes to the flat GEMV, which was
    faster on the H200: 1.03-1.11x cuBLAS at 35/45/20 against 0.87-0.98x here), or one token when the flat
    GEMV is turned off."""
    from ..triton.flat_gemv import flat_gemv_enabled

    one_token_here = tokens == 1 and not flat_gemv_enabled()
    return _MMA_DECODE_ENABLED[0] and (2 <= tokens <= MMA_DECODE_MAX_TOKENS or one_token_here)


class RowsChoice(NamedTuple):
    """A row kernel config and how many of its CTAs an SM holds at once, reading x row-major and block-major (with
    2:4 blocks on the sparse tensor cores, as the op then runs it): their registers on sm_90, as ptxas allocates
    them (tests/kernels/test_mma_decode.py checks both counts against ptxas)."""

    config: MmaDecodeConfig
    ctas_per_sm: int
    ctas_per_sm_x_block_major: int


# The row kernel's configs for one 8-token tile (1-8 tokens) and for two (9-16), most warps per CTA first: a
# weight takes the first whose CTAs, one per block-row, are all resident at once (the last where none is).
# Why by residency: the kernel waits on each warp's chain of dependent loads (Nsight Compute, sessions 20 and 24),
# so what pays is every block-row in flight at once with as many warps per SM as the registers allow; more warps
# per CTA over several waves measured slower. Two tiles need more registers per warp, hence the caps (min_ctas)
# that keep 32 warps per SM without spilling. Each rung was timed side by side against the one it replaced on an
# H100 (sessions 21, 23 and 24; docs/kernels.md has every sweep); the rows below are for its 132 SMs.
ROWS_DECODE_LADDERS = {
    1: (RowsChoice(MmaDecodeConfig(chunk=4, topk_chunk=6, warps=16), 2, 2),    # <= 4096 rows (7B attention, down)
        RowsChoice(MmaDecodeConfig(chunk=4, topk_chunk=12, warps=8), 3, 3),    # 5120 rows (13B attention, down)
        RowsChoice(MmaDecodeConfig(chunk=4, topk_chunk=6, warps=8), 4, 4),     # 8192 rows (LLaMA-3.2-1B gate, up)
        RowsChoice(MmaDecodeConfig(chunk=4, topk_chunk=6, warps=4), 8, 8),     # 11008-13824 rows (up, fused QKV)
        RowsChoice(MmaDecodeConfig(chunk=4, topk_chunk=6, warps=2), 16, 16)),  # 22016 rows (7B fused gate-up)
    # Each rung at 9 / 16 tokens, 35/45/20, x cuBLAS, against the config it replaced (session 24):
    # <= 4096 rows, 4096x4096: 1.16 / 1.00x (8 warps of 4 blocks: 1.04 / 0.97x)
    2: (RowsChoice(MmaDecodeConfig(chunk=2, topk_chunk=6, warps=16, min_ctas=2), 2, 2),
        # 5120 rows, 5120x13824: 1.17 / 1.01x (8 warps of 2 blocks capped, 4 per SM: 1.08 / 0.96x)
        RowsChoice(MmaDecodeConfig(chunk=4, topk_chunk=6, warps=8), 3, 3),
        # 8192 rows, 8192x2048: 1.00 / 0.89x (4 warps of 2 blocks, 6 per SM: 0.85 / 0.80x)
        RowsChoice(MmaDecodeConfig(chunk=2, topk_chunk=6, warps=8, min_ctas=4), 4, 4),
        # 11008-13824 rows, 13824x5120: 1.19 / 1.06x (2 warps of 4 blocks: 1.02 / 0.96x)
        RowsChoice(MmaDecodeConfig(chunk=4, topk_chunk=6, warps=4), 7, 6),
        # 22016 rows
        RowsChoice(MmaDecodeConfig(chunk=4, topk_chunk=6, warps=2), 14, 12)),
}
_ROWS_DECODE_ENABLED = [True]


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    """The SM count of a CUDA device (0 elsewhere: no row kernel there); asked on every decode product."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def _token_tiles(tokens: int) -> int:
    return 1 if tokens <= 8 else 2


def _resident_choice(hw: HybridWeight, device: torch.device, tokens: int) -> RowsChoice | None:
    """The first config of the ladder whose CTAs, one per block-row of `hw`, an SM count of `device` holds at once."""
    block_rows, sms = len(hw.dense_row_ptr) - 1, _multiprocessors(device)
    return next((c for c in ROWS_DECODE_LADDERS[_token_tiles(tokens)] if block_rows <= c.ctas_per_sm * sms), None)


def rows_resident_at_once(hw: HybridWeight, device: torch.device, tokens: int = 1) -> bool:
    """Whether the row kernel's CTAs for `hw` at `tokens` tokens, one per block-row, are all resident at once."""
    return _resident_choice(hw, device, tokens) is not None


def rows_decode_config(hw: HybridWeight, device: torch.device, tokens: int = 1) -> MmaDecodeConfig:
    """The row kernel's config for `hw` at `tokens` tokens (ROWS_DECODE_LADDERS)."""
    choice = _resident_choice(hw, device, tokens)
    return (choice or ROWS_DECODE_LADDERS[_token_tiles(tokens)][-1]).config


def use_rows_decode(enabled: bool) -> None:
    """Let the op send decode products to the row kernel (the default where it runs, see prefers_rows_decode),
    or not (then the chunk kernel and the flat GEMV take them as before)."""
    from ..triton.hybrid_mm import forget_prepared_launches  # the op's cached choices follow the switch

    _ROWS_DECODE_ENABLED[0] = bool(enabled)
    forget_prepared_launches()


def prefers_rows_decode(tokens: int, hw: HybridWeight) -> bool:
    """Whether the op sends a product of `tokens` tokens through `hw` to the row kernel: 2-16 tokens always
    (faster than the chunk kernel at 2-8 tokens at every shape and mix timed, and at 16 on all but the fused
    gate-up shape on the H100); one token where at least half of the blocks are dense, where the row kernel's CTAs
    are all resident at once (rows_resident_at_once), or where the flat GEMV is off. (At one token and 35/45/20
    on an H100, session 21: the row kernel 1.31x, 1.36x, 1.33x, 1.29x and 1.39x cuBLAS at 4096x4096, 4096x11008,
    11008x4096, 12288x4096 and 22016x4096 against the flat GEMV's 1.20-1.29x and 1.37x.)"""
    from ..triton.flat_gemv import flat_gemv_enabled

    if not _ROWS_DECODE_ENABLED[0] or not 1 <= tokens <= MMA_DECODE_MAX_TOKENS:
        return False
    if tokens > 1 or not flat_gemv_enabled():
        return True
    n_dense, n_nm, n_topk = hw.tier_counts()
    return 2 * n_dense >= n_dense + n_nm + n_topk or rows_resident_at_once(hw, hw.device)


def rows_decode_ready(x: torch.Tensor, hw: HybridWeight) -> bool:
    """Whether the row kernel for this product is compiled already (a call inside a CUDA graph capture must not
    compile); it keeps no other state."""
    return _module_key(x, hw, rows_decode_config(hw, x.device, x.shape[0])) in _MODULES


def set_mma_decode_config(config: MmaDecodeConfig) -> MmaDecodeConfig:
    """Make `config` the kernel's config; returns the previous one (for benchmarks that compare them)."""
    global MMA_DECODE_CONFIG
    previous, MMA_DECODE_CONFIG = MMA_DECODE_CONFIG, MmaDecodeConfig(*config)
    return previous


def selector_table() -> torch.Tensor:
    """(16, 2) int32: for each nibble p0 | p1 << 2 of a 2:4 group, the two __byte_perm selectors that spread
    its kept values (v0 in bytes 0-1 of a word, v1 in bytes 2-3) to the group's columns (0, 1) and (2, 3),
    zeros elsewhere (byte 4 and up of the permute's second operand, which is 0)."""
    table = torch.zeros(16, 2, dtype=torch.int64)
    for nibble in range(16):
        p0, p1 = nibble & 3, nibble >> 2
        for column in range(4):
            low, high = (0, 1) if p0 == column else (2, 3) if p1 == column else (4, 4)
            shift = 8 * (column % 2)
            table[nibble, column // 2] |= (low << shift) | (high << (shift + 4))
    return table.to(torch.int32)


def mma_decode_supported(x: torch.Tensor, hw: HybridWeight) -> bool:
    """Whether the kernel takes this product: CUDA sm_80+, bf16/fp16 matching the weight, 1-16 tokens,
    16x16 blocks, TopK k <= 32, in features a multiple of 16 (whole 8-byte x loads), 8-byte aligned buffers."""
    if not (x.is_cuda and x.dim() == 2 and 1 <= x.shape[0] <= MMA_DECODE_MAX_TOKENS):
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) or x.dtype != hw.dtype or hw.block_size != 16 or hw.topk > 32:
        return False
    if hw.shape[1] % 16 or torch.cuda.get_device_capability(x.device)[0] < 8:
        return False
    aligned = (x, hw.dense_values, hw.nm_values, hw.nm_meta)
    return all(t.data_ptr() % 8 == 0 for t in aligned) and _compiler_available()


@functools.lru_cache(maxsize=None)
def _compiler_available() -> bool:
    """torch's NVRTC helpers that _module uses (private: a torch without them keeps the Triton path)."""
    from torch.cuda import _utils

    return hasattr(_utils, "_nvrtc_compile") and hasattr(_utils, "_cuda_load_module")


def kernel_source(half: bool, topk: int, ntile: int, config: MmaDecodeConfig, x_block_major: bool = False,
                  sparse_24: bool = False) -> str:
    """mma_decode.cu with its compile-time constants defined: fp16 (else bf16), TopK k, 8-token tiles, config,
    whether the row kernel reads x laid out block-major (see X_BLOCK_MAJOR_MIN_BYTES), and whether 2:4 blocks go
    to the sparse tensor cores (see SPARSE_24_MAX_TOKENS)."""
    assert 1 <= config.chunk <= 32 and 1 <= config.topk_chunk <= 32 and 0 <= config.nm_chunk <= 32 \
        and config.warps >= 1 and config.min_ctas >= 0, \
        f"chunks must be 1..32 blocks (a lane holds one block's index): {config}"
    assert 1 <= topk <= 32 and ntile in (1, 2), (topk, ntile)
    defines = dict(TOPK=topk, NTILE=ntile, WARPS=config.warps, CHUNK=config.chunk, TOPK_CHUNK=config.topk_chunk,
                   NM_CHUNK=config.nm_chunk or config.chunk, ROWS_MIN_CTAS=config.min_ctas, HALF_T=int(half),
                   X_BLOCK_MAJOR=int(x_block_major), SPARSE_24=int(sparse_24))
    selectors = ", ".join(f"{{{lo:#x}u, {hi:#x}u}}" for lo, hi in selector_table().tolist())
    defines["SELECTORS"] = f"{{{selectors}}}"
    source = _SOURCE.read_text()
    # convert.cuh's from_float, unless the source defines its own (a benchmark's --baseline-source from before it).
    convert = "" if "from_float(float v) {" in source else _CONVERT.read_text()
    return "".join(f"#define {k} {v}\n" for k, v in defines.items()) + convert + source


_SOURCE = Path(__file__).with_name("mma_decode.cu")
_CONVERT = Path(__file__).with_name("convert.cuh")  # from_float, shared with wgmma_prefill.cu


_MODULES: dict[tuple, dict] = {}


# x read block-major, (K/16, 16, 16), copied so by one small transpose before the row kernel, at 9-16 tokens:
# - where x is larger than an SM's 256 KiB of L1 and shared memory. Read row-major, each x load of a tile touches 8
#   L1 lines (32 bytes of each of 8 tokens), and an x that does not fit in L1 makes that pay: 4096x11008 at 16 tokens
#   took 36.2-37.3 us row-major and 27.9-28.6 us block-major on two H100s (35/45/20; 0.95-1.02x cuBLAS ->
#   1.26-1.30x), and 34.3-34.5 against 37.0-37.2 us at 90/10/0 (session 30);
# - where a third or more of the blocks are 2:4, the matrix has more than two block-rows per SM, and its rung's CTAs
#   stay resident block-major: then its 2:4 blocks take the sparse tensor cores (SPARSE_24_MAX_TOKENS), whose x
#   loads cost little block-major. At 35/45/20 and 9 / 12 / 16 tokens on an H100 (session 31), against row-major:
#   11008x4096 1.27 / 1.27 / 1.27x cuBLAS (1.22 / 1.20 / 1.13x), fused QKV 1.33 / 1.33 / 1.25x (1.32 / 1.28 / 1.14x),
#   fused gate-up 1.33x (1.26 / 1.25 / 1.19x), 13B's 5120x5120 1.11x (1.06 / 1.03 / 0.93x); 4096x4096 (1.94
#   block-rows per SM) 1.21 / 1.21 / 1.17x (1.33 / 1.24 / 1.16x); at 90/10/0 block-major lost up to 11%; 13B's
#   13824x5120, whose 864 block-rows do not fit block-major's 6 CTAs per SM, 1.08x (1.28x).
# Elsewhere the transpose (1.5-2 us) costs about what it saves or more (session 30, docs/kernels.md).
X_BLOCK_MAJOR_MIN_BYTES = 256 * 1024
# The token tiles (1: 1-8 tokens, 2: 9-16) at which x is read block-major whatever the weight (benchmarks); None:
# the op's rule above.
X_BLOCK_MAJOR_TILES: tuple[int, ...] | None = None


def _x_block_major(tokens: int, hw: HybridWeight, device: torch.device) -> bool:
    """Whether the row kernel reads x (tokens, in) of 16-bit values block-major for `hw` on `device`."""
    if X_BLOCK_MAJOR_TILES is not None:
        return _token_tiles(tokens) in X_BLOCK_MAJOR_TILES
    if _token_tiles(tokens) != 2:
        return False
    if tokens * hw.shape[1] * 2 > X_BLOCK_MAJOR_MIN_BYTES:
        return True
    n_dense, n_nm, n_topk = hw.tier_counts()
    block_rows, sms = len(hw.dense_row_ptr) - 1, _multiprocessors(device)
    choice = _resident_choice(hw, device, tokens)
    return (3 * n_nm >= n_dense + n_nm + n_topk and block_rows > 2 * sms and choice is not None
            and block_rows <= choice.ctas_per_sm_x_block_major * sms)


def x_by_block_columns(x: torch.Tensor, tile_tokens: int) -> torch.Tensor:
    """x (T, in) laid out as the row kernel reads it where _x_block_major says: (in / 16, tile_tokens, 16),
    block column c's tokens together; the rows of tokens T..tile_tokens-1 are left unwritten (never read)."""
    T, k_in = x.shape
    by_block = x.new_empty(k_in // 16, tile_tokens, 16)
    by_block[:, :T].copy_(x.view(T, k_in // 16, 16).transpose(0, 1))
    return by_block


# 2:4 blocks on the sparse tensor cores (mma.sp, positions as stored) rather than spread to a dense fragment by
# byte permutes and a table in shared memory: at 1-6 tokens, and wherever x is read block-major. The sparse mma
# takes x in its own k order, two 4-byte loads per token tile where the permuted dense fragment takes one 8-byte
# load, and a load of row-major x touches one L1 line per token: little at 1-6 tokens, and block-major a tile's
# tokens share two lines. Side by side on an H100 (session 31, docs/kernels.md), x cuBLAS, permutes -> sparse, on
# the five LLaMA-2-7B shapes at 35/45/20: 1-4 tokens 1.32-1.45x -> 1.36-1.51x, 5-6 tokens 1.30-1.43x -> 1.33-1.47x;
# at 8 tokens 0.98-1.02x the permutes' speed, at 16 (row-major x) 0.87-0.94x on four shapes; 4096x11008 at 16
# tokens, block-major, 1.26x -> 1.30x. (All-2:4 4096x4096 loses 2-4% at 2-6 tokens; no mix timed did.)
SPARSE_24_MAX_TOKENS = 6
# Sparse at every token count (True) or none (False), whatever the rule above says (benchmarks); None: the rule.
SPARSE_24_FORCED: bool | None = None


def _sparse_24(tokens: int, x_block_major: bool) -> bool:
    """Whether 2:4 blocks of a product of `tokens` tokens go to the sparse tensor cores."""
    if SPARSE_24_FORCED is not None:
        return SPARSE_24_FORCED
    return tokens <= SPARSE_24_MAX_TOKENS or x_block_major


def _module_key(x: torch.Tensor, hw: HybridWeight, config: MmaDecodeConfig) -> tuple:
    major, minor = torch.cuda.get_device_capability(x.device)
    T = x.shape[0]
    block_major = _x_block_major(T, hw, x.device)
    return (x.dtype == torch.float16, hw.topk, _token_tiles(T), config, f"{major}{minor}", x.device.index,
            block_major, _sparse_24(T, block_major))


def _module(half: bool, topk: int, ntile: int, config: MmaDecodeConfig, arch: str, device_index: int,
            x_block_major: bool = False, sparse_24: bool = False) -> dict:
    """The compiled kernels {name: kernel} for one set of compile-time constants on one GPU (compiled once per
    process; loaded per GPU, as a loaded function belongs to the device's context)."""
    key = (half, topk, ntile, config, arch, device_index, x_block_major, sparse_24)
    if key not in _MODULES:
        from torch.cuda._utils import _cuda_load_module, _nvrtc_compile

        source = kernel_source(half, topk, ntile, config, x_block_major, sparse_24)
        with torch.cuda.device(device_index):
            binary, _ = _nvrtc_compile(source, "hybrid_mma_decode", arch, nvcc_options=["-std=c++17"])
            kernels = _cuda_load_module(binary, ["hybrid_mma_decode", "hybrid_cast_and_zero", "hybrid_rows_decode"])
            fit_shared_memory_carveout(kernels["hybrid_rows_decode"].func, 32 * config.warps, device_index)
            _MODULES[key] = kernels
    return _MODULES[key]


def _launch(kernel, grid: tuple[int, int, int], block: tuple[int, int, int], args: list, device: torch.device) -> None:
    """One launch of a compiled kernel on `device`'s current stream."""
    with torch.cuda.device(device):
        PreparedLaunch(kernel.func, grid, block, args)(stream=current_raw_stream(device))


def mma_decode_ready(hw: HybridWeight, tokens: int) -> bool:
    """Whether a call at `tokens` tokens allocates nothing (safe inside a CUDA graph capture)."""
    from ..triton.flat_gemv import decode_workspace

    return decode_workspace(hw, tokens, create=False) is not None


def _check_inputs(x: torch.Tensor, hw: HybridWeight, caller: str) -> None:
    assert x.dim() == 2 and x.is_contiguous(), (tuple(x.shape), x.stride())
    assert mma_decode_supported(x, hw), f"{caller}: unsupported input (see mma_decode_supported)"
    for name, t in hw.tensors().items():
        assert t.is_contiguous(), f"{name} is not contiguous"


def _buffers(hw: HybridWeight, names) -> list[torch.Tensor]:
    """The packed buffers `names` as kernel arguments; an empty tier's buffers are never read (its row pointers
    are all zero), so any pointer stands in for them."""
    return [getattr(hw, n) if getattr(hw, n).numel() else hw.dense_row_ptr for n in names]


def hybrid_mm_mma(x: torch.Tensor, hw: HybridWeight, config: MmaDecodeConfig | None = None) -> torch.Tensor:
    """x (T, in) @ W.T -> (T, out) for T <= 16 on the tensor cores (mma_decode.cu); see mma_decode_supported."""
    from ..triton.flat_gemv import decode_workspace

    _check_inputs(x, hw, "hybrid_mm_mma")
    config = config or MMA_DECODE_CONFIG
    T, (n_out, k_in) = x.shape[0], hw.shape
    kernels = _module(*_module_key(x, hw, config))
    block_rows, ws = decode_workspace(hw, T, create=True)
    n_dense, n_nm, n_topk = hw.tier_counts()
    w_dense, w_nm, w_topk = -(-n_dense // config.chunk), -(-n_nm // config.chunk), -(-n_topk // config.topk_chunk)
    warps = w_dense + w_nm + w_topk
    npad = 16 * (len(hw.dense_row_ptr) - 1)
    out = x.new_empty(T, n_out)
    if warps:
        buffers = _buffers(hw, ("dense_values", "dense_cols", "nm_values", "nm_meta", "nm_cols", "topk_values",
                                "topk_pos", "topk_cols"))
        _launch(kernels["hybrid_mma_decode"], (-(-warps // config.warps), 1, 1), (32 * config.warps, 1, 1),
                [x, ws, block_rows, *buffers, n_dense, n_nm, n_topk, w_dense, w_nm, warps, T, k_in, npad], x.device)
    threads = 256
    _launch(kernels["hybrid_cast_and_zero"], (-(-(T * n_out) // threads), 1, 1), (threads, 1, 1),
            [ws, out, T, n_out, npad], x.device)
    return out


def prepare_rows_decode(x: torch.Tensor, hw: HybridWeight, config: MmaDecodeConfig | None = None):
    """The row kernel's launch for `hw` at x's token count, dtype and GPU, prepared once: a function that takes any
    such x (contiguous, 8-byte aligned) and returns x @ W.T, with a few microseconds of host work. It compiles the
    kernel if needed (not inside a CUDA graph capture, see rows_decode_ready) and holds `hw`'s buffer pointers, not
    the buffers: keep them alive while it is used. See hybrid_mm_rows for `config`."""
    _check_inputs(x, hw, "prepare_rows_decode")
    config = config or rows_decode_config(hw, x.device, x.shape[0])
    T, (n_out, k_in), device = x.shape[0], hw.shape, x.device
    kernel = _module(*_module_key(x, hw, config))["hybrid_rows_decode"]
    launch = PreparedLaunch(kernel.func, (len(hw.dense_row_ptr) - 1, 1, 1), (32 * config.warps, 1, 1),
                            [x, x, *_buffers(hw, HYBRID_TENSOR_NAMES), T, k_in, n_out])  # x, out, weight, sizes

    index, current_device, raw_stream = device.index, torch._C._cuda_getDevice, torch._C._cuda_getCurrentRawStream
    block_major, tile_tokens = _x_block_major(T, hw, device), 8 * _token_tiles(T)

    def rows_decode(x: torch.Tensor) -> torch.Tensor:  # (T, in) -> (T, out); runs on every eager decode call
        out = x.new_empty(T, n_out)
        if block_major:
            x = x_by_block_columns(x, tile_tokens)
        if current_device() == index:
            launch(x.data_ptr(), out.data_ptr(), stream=raw_stream(index))
        else:  # the kernel is loaded in its GPU's context, which the launch must run in
            with torch.cuda.device(device):
                launch(x.data_ptr(), out.data_ptr(), stream=raw_stream(index))
        return out

    return rows_decode


def hybrid_mm_rows(x: torch.Tensor, hw: HybridWeight, config: MmaDecodeConfig | None = None) -> torch.Tensor:
    """x (T, in) @ W.T -> (T, out) for T <= 16 with one CTA per block-row (mma_decode.cu's row kernel): one launch,
    no workspace and no per-weight state, so once compiled (rows_decode_ready) it is safe in a CUDA graph capture,
    and calls on one weight may overlap on several streams. The config's `chunk`
    is the dense blocks a warp loads per step (`nm_chunk` the 2:4 blocks, `topk_chunk` the TopK blocks) and `warps`
    the warps per block-row; rows_decode_config by default."""
    return prepare_rows_decode(x, hw, config)(x)
