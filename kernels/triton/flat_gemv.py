"""One token through a packed hybrid weight as a flat stream of blocks: the wrapper, its state and dispatch.

The kernels are _flat_gemv.py's (one program per chunk of NB blocks of one tier; then a cast kernel, or,
counted, one launch in all). Beside the packed buffers they need a block-row index of every block, a zeroed
fp32 workspace and, counted, per-block-row counters (the last contributor of a block-row writes the output
and zeroes them again); these are built on the first call per weight and kept in a cache keyed by the
weight's row-pointer tensors. The op (hybrid_mm.py) sends one-token products here while use_flat_gemv(True),
with FLAT_GEMV_CONFIG.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..hybrid import HybridWeight
from .hybrid_mm import _KERNEL_DTYPES, _check, _packed_args, _pow2_at_least, forget_prepared_launches

__all__ = ["FLAT_GEMV_CONFIG", "FlatGemvConfig", "hybrid_mm_flat_gemv", "use_flat_gemv", "set_flat_gemv_config",
           "prefers_flat_gemv", "flat_gemv_ready", "flat_gemv_enabled", "decode_workspace"]


@dataclass
class _FlatState:
    """What the flat-stream GEMV needs beside the packed buffers, built once per weight (kept by _flat_state)."""

    block_rows: torch.Tensor  # (nd+nn+nt,) int16: block-row of every block, the three tiers one after another
    workspace: torch.Tensor  # (nbr·16,) fp32, zero between launches
    arrivals: torch.Tensor  # (nbr,) int32, zero between launches
    contributors: dict[int, torch.Tensor] = field(default_factory=dict)  # NB -> (nbr,) int32 programs per block-row
    # tokens (8 or 16) -> (tokens·nbr·16,) fp32, zero between launches: the tensor-core decode's (kernels/cuda)
    token_workspaces: dict[int, torch.Tensor] = field(default_factory=dict)


# Keyed by id() of the weight's dense row pointers, with weak references to the three row-pointer tensors it was
# derived from: an entry goes when one of them goes (a replaced entry's references die with it, callbacks
# unrun, so they never remove a later entry under the same key), and a reused id() is caught by the identity
# check. The packed format stays as it is (HybridWeight, its nbytes and the custom op's tensor list unchanged).
_FLAT_STATES: dict[int, tuple[tuple[weakref.ref, ...], _FlatState]] = {}


def _flat_block_rows(row_ptr: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) int32 block-row of each of the tier's n blocks, from its (nbr+1,) row pointers."""
    counts = row_ptr[1:] - row_ptr[:-1]
    # output_size from the host's block count: repeat_interleave would otherwise read the total from the device.
    return torch.repeat_interleave(torch.arange(len(counts), device=row_ptr.device, dtype=torch.int32), counts,
                                   output_size=n)


def _flat_state(hw: HybridWeight, nb: int | None) -> _FlatState:
    """The block-row index, zeroed workspace and counters of `hw`, and the contributor counts for chunks of nb
    (None: no counts, which the uncounted kernel does not need).

    The first call per weight (and per nb) builds them with a few small kernels: call once before capturing
    a CUDA graph, as the benchmarks' warm-up does.
    """
    sources = (hw.dense_row_ptr, hw.nm_row_ptr, hw.topk_row_ptr)
    key = id(hw.dense_row_ptr)
    entry = _FLAT_STATES.get(key)
    if entry is None or any(ref() is not t for ref, t in zip(entry[0], sources)):
        nbr = len(hw.dense_row_ptr) - 1
        assert nbr <= torch.iinfo(torch.int16).max, f"{nbr} block-rows do not fit the int16 block-row index"
        counts = hw.tier_counts()
        rows = [_flat_block_rows(rp, n) for rp, n in zip(sources, counts)]
        state = _FlatState(
            block_rows=torch.cat(rows).to(torch.int16),
            workspace=torch.zeros(nbr * 16, dtype=torch.float32, device=hw.device),
            arrivals=torch.zeros(nbr, dtype=torch.int32, device=hw.device),
        )
        refs = tuple(weakref.ref(t, lambda _, key=key: _FLAT_STATES.pop(key, None)) for t in sources)
        entry = _FLAT_STATES[key] = (refs, state)
    state = entry[1]
    if nb is not None and nb not in state.contributors:
        # Mirrors the kernel's emitters: per chunk, its first block (for the chunk's first block-row), its
        # last block if that lies in another block-row, and every block of a block-row strictly in between.
        nbr = len(hw.dense_row_ptr) - 1
        need = torch.zeros(nbr, dtype=torch.int32, device=hw.device)
        start = 0
        for n in hw.tier_counts():
            rows = state.block_rows[start:start + n].to(torch.int64)  # (n,)
            start += n
            if n == 0:
                continue
            i = torch.arange(n, device=hw.device)
            chunk_start = i - i % nb
            chunk_tail = torch.clamp(chunk_start + nb, max=n) - 1
            first, final = rows[chunk_start], rows[chunk_tail]
            emits = (i == chunk_start) | ((i == chunk_tail) & (final != first)) | ((rows != first) & (rows != final))
            need.index_add_(0, rows, emits.to(torch.int32))
        state.contributors[nb] = need
    return state


class FlatGemvConfig(NamedTuple):
    """How the op runs the flat GEMV: nb blocks per chunk, num_warps per program, the one-launch counted kernel
    or the two-launch uncounted one, and (uncounted only) chunks per program and TopK blocks per chunk added
    entry by entry (0: TopK chunks like the other tiers')."""

    nb: int
    num_warps: int
    counted: bool
    chunks: int = 1
    topk_nb: int = 0


# One-token decode goes to the flat GEMV with this config. Session 7 timed the counted kernel (NB 8, 1 warp):
# 1.05-1.16x the per-block-row kernels at 35/45/20 and 0.86-0.93x at 90/10/0, so only weights with fewer
# than half of their blocks dense took it (end to end 0.759x -> 0.809x dense, session 8). Session 10 timed the
# uncounted kernel with TopK entries added one by one faster than both at both mixes, on the H200 1.05-1.12x
# cuBLAS at 35/45/20 and 0.90-0.97x at 90/10/0, end to end 1.060x dense (README), so it takes every weight.
# Three chunks per program rather than two: 1.060x against 1.046x end to end, side by side, though 2% slower
# at 4096² alone.
FLAT_GEMV_CONFIG = FlatGemvConfig(nb=4, num_warps=1, counted=False, chunks=3, topk_nb=8)
_FLAT_GEMV_ENABLED = [True]


def use_flat_gemv(enabled: bool) -> None:
    """Let the op send one-token products to the flat GEMV (the default), or not."""
    _FLAT_GEMV_ENABLED[0] = bool(enabled)
    forget_prepared_launches()  # the op's cached choices (one token: row kernel or here) follow the switch


def flat_gemv_enabled() -> bool:
    """Whether the op sends one-token products here (use_flat_gemv)."""
    return _FLAT_GEMV_ENABLED[0]


def set_flat_gemv_config(config: FlatGemvConfig) -> FlatGemvConfig:
    """Make `config` the op's flat GEMV config; returns the previous one (for benchmarks that compare them)."""
    global FLAT_GEMV_CONFIG
    previous, FLAT_GEMV_CONFIG = FLAT_GEMV_CONFIG, FlatGemvConfig(*config)
    return previous


def prefers_flat_gemv(hw: HybridWeight) -> bool:
    """Whether the op's one-token product of `hw` takes the flat GEMV: always with the uncounted kernel; with
    the counted one only when fewer than half of its blocks are dense (where it was the faster)."""
    counts = hw.tier_counts()
    return _FLAT_GEMV_ENABLED[0] and (not FLAT_GEMV_CONFIG.counted or 2 * counts[0] < sum(counts))


def flat_gemv_ready(hw: HybridWeight, nb: int | None) -> bool:
    """Whether `hw`'s flat GEMV state (for counted chunks of nb; None: uncounted) exists, so a call builds nothing."""
    entry = _FLAT_STATES.get(id(hw.dense_row_ptr))
    sources = (hw.dense_row_ptr, hw.nm_row_ptr, hw.topk_row_ptr)
    return (entry is not None and all(ref() is t for ref, t in zip(entry[0], sources))
            and (nb is None or nb in entry[1].contributors))


def decode_workspace(hw: HybridWeight, tokens: int, *, create: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(block-row index, zeroed fp32 workspace) of `hw` for up to `tokens` tokens: 1, 8 or 16 rows of nbr·16.

    Shared by the decode kernels of one weight, this GEMV at one token and the tensor-core kernel
    (kernels/cuda) at 1-16, so the index is built once. With create=False, None where they do not exist yet
    (a call would allocate: not inside a CUDA graph capture).
    """
    if not create and not flat_gemv_ready(hw, None):
        return None
    state = _flat_state(hw, None)
    rows = 1 if tokens == 1 else 8 if tokens <= 8 else 16
    if rows == 1:
        return state.block_rows, state.workspace
    wide = state.token_workspaces.get(rows)
    if wide is None:
        if not create:
            return None
        wide = state.token_workspaces[rows] = torch.zeros(rows * len(state.workspace), dtype=torch.float32,
                                                          device=hw.device)
    return state.block_rows, wide


def hybrid_mm_flat_gemv(x: torch.Tensor, hw: HybridWeight, *, nb: int = 8, num_warps: int = 2,
                        nm_expand: bool = False, counted: bool = True, chunks: int = 1,
                        topk_nb: int = 0) -> torch.Tensor:
    """x (1, in) @ W.T -> (1, out): one program per chunk of nb consecutive blocks of a tier (_flat_gemv.py).

    The weight's workspace and counters are shared by its calls, which must therefore run one after another
    (one stream), as decode does; the first call per weight (and, counted, per nb) builds them: call it once
    before capturing a CUDA graph.
    nm_expand: rebuild 2:4 blocks as dense rows against 16-wide x vectors instead of gathering x per kept value.
    counted False: two launches, the programs only adding into the workspace and a second kernel writing the
    output (see _flat_gemv.py); no per-block-row counters. chunks: consecutive chunks per program; topk_nb > 0:
    TopK chunks of topk_nb blocks whose entries are added one by one (both uncounted only).
    """
    assert x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous(), (tuple(x.shape), x.stride())
    assert x.shape[1] == hw.shape[1], (tuple(x.shape), hw.shape)
    assert x.dtype == hw.dtype and x.dtype in _KERNEL_DTYPES, (x.dtype, hw.dtype)
    assert x.device == hw.device, (x.device, hw.device)
    assert nb >= 1 and nb & (nb - 1) == 0, f"nb {nb}: a power of 2"
    assert topk_nb >= 0 and topk_nb & (topk_nb - 1) == 0, f"topk_nb {topk_nb}: 0 or a power of 2"
    assert chunks >= 1, f"chunks {chunks}"
    _check(hw)
    from . import _flat_gemv

    n_dense, n_nm, n_topk = hw.tier_counts()
    out = x.new_empty(1, hw.shape[0])
    if not counted:
        block_rows, workspace = decode_workspace(hw, 1, create=True)
        p_dense, p_nm = (-(-n // (nb * chunks)) for n in (n_dense, n_nm))
        p_topk = -(-n_topk // ((topk_nb or nb) * chunks))
        (dv, dc, _, nv, meta, nc, _, tv, tp, tc, _) = _packed_args(hw)
        _flat_gemv._hybrid_flat_gemv_uncounted_kernel[(p_dense + p_nm + p_topk,)](
            x, workspace, block_rows, dv, dc, nv, meta, nc, tv, tp, tc,
            n_dense, n_nm, n_topk, p_dense, p_nm, hw.shape[1],
            TOPK=hw.topk, KP=_pow2_at_least(hw.topk), NB=nb, NM_EXPAND=nm_expand, CHUNKS=chunks, TOPK_NB=topk_nb,
            num_warps=num_warps,
        )
        block = 1024
        _flat_gemv._cast_and_zero_kernel[(-(-hw.shape[0] // block),)](workspace, out, hw.shape[0],
                                                                       BLOCK=block, num_warps=4)
        return out
    assert chunks == 1 and not topk_nb, "chunks > 1 and topk_nb: the uncounted kernel only"
    state = _flat_state(hw, nb)
    p_dense, p_nm, p_topk = (-(-n // nb) for n in (n_dense, n_nm, n_topk))
    _flat_gemv._hybrid_flat_gemv_kernel[(p_dense + p_nm + p_topk,)](
        x, out, state.workspace, state.arrivals, state.contributors[nb], state.block_rows, *_packed_args(hw),
        n_dense, n_nm, n_topk, p_dense, p_nm, hw.shape[0], hw.shape[1],
        TOPK=hw.topk, KP=_pow2_at_least(hw.topk), NB=nb, NM_EXPAND=nm_expand, num_warps=num_warps,
    )
    return out
