"""Triton kernels of the hybrid Dense / 2:4 / TopK format (16x16 blocks); imported only when used.

One program handles one 16-row block-row (or a split of its blocks) and walks each tier's contiguous
blocks NB at a time, so every packed byte is read once. Each tier is turned into a (16, NB·16) tile
in registers:
  Dense  a plain load;
  2:4    values (16, NB, 8) and metadata (16, NB) 16-bit words are loaded as contiguous tiles, then
         each group of 4 is rebuilt with two compares and two selects per element (scattered
         per-element loads would make the metadata, not the bandwidth, the limit);
  TopK   k entries become a one-hot (16, NB·KP) matrix against x gathered at the entries' columns.
"""
from __future__ import annotations

import triton
import triton.language as tl

BS = 16  # the kernels are written for 16x16 blocks


@triton.jit
def _split_range(row_ptr, br, split, SPLIT: tl.constexpr):
    """Blocks [lo, hi) of block-row `br` that split `split` of SPLIT handles."""
    start = tl.load(row_ptr + br)
    end = tl.load(row_ptr + br + 1)
    n = end - start
    return start + n * split // SPLIT, start + n * (split + 1) // SPLIT


@triton.jit
def _tile_cols(c_ptr, b, hi, NB: tl.constexpr):
    """Input column of each of the NB·16 tile columns of blocks b..b+NB, and whether its block exists."""
    blk = b + tl.arange(0, NB)
    first = tl.load(c_ptr + blk, mask=blk < hi, other=0).to(tl.int32) * 16  # (NB,) one load per block
    col = tl.reshape(first[:, None] + tl.arange(0, 16)[None, :], (NB * 16,))
    col = tl.max_contiguous(tl.multiple_of(col, 16), 16)  # runs of 16 from a multiple of 16: vector loads of x
    valid = (b + tl.arange(0, NB * 16) // 16) < hi
    return col, valid


@triton.jit
def _dense_tile(dv_ptr, dc_ptr, b, hi, NB: tl.constexpr):
    """(16, NB·16) weights of dense blocks b..b+NB and the input column of each tile column."""
    rows = tl.arange(0, 16)
    kk = tl.arange(0, NB * 16)
    blk = b + kk // 16  # (NB·16,)
    w = tl.load(dv_ptr + blk[None, :] * 256 + rows[:, None] * 16 + (kk % 16)[None, :],
                mask=(blk < hi)[None, :], other=0.0)  # (16, NB·16)
    col, valid = _tile_cols(dc_ptr, b, hi, NB)
    return w, col, valid


@triton.jit
def _nm_tile(nv_ptr, meta_ptr, nc_ptr, b, hi, NB: tl.constexpr):
    """(16, NB·16) weights of 2:4 blocks b..b+NB, decompressed in registers, and their input columns.

    Values and metadata are read as contiguous tiles (vector loads the pipeliner can prefetch), then
    expanded: a row's 8 positions are one little-endian 16-bit word, group g's two at bits 4g and 4g+2.
    """
    rows = tl.arange(0, 16)
    blk = b + tl.arange(0, NB)  # (NB,)
    ok = blk < hi
    vals = tl.load(nv_ptr + blk[None, :, None] * 128 + rows[:, None, None] * 8 + tl.arange(0, 8)[None, None, :],
                   mask=ok[None, :, None], other=0.0)  # (16, NB, 8)
    meta = tl.load(meta_ptr.to(tl.pointer_type(tl.int16)) + blk[None, :] * 16 + rows[:, None],
                   mask=ok[None, :], other=0).to(tl.int32)  # (16, NB)
    v0, v1 = tl.split(tl.reshape(vals, (16, NB, 4, 2)))  # (16, NB, 4) kept values of each group
    nib = (meta[:, :, None] >> (tl.arange(0, 4) * 4)[None, None, :]) & 15  # (16, NB, 4)
    i0 = (nib & 3)[:, :, :, None]
    i1 = (nib >> 2)[:, :, :, None]
    j = tl.arange(0, 4)[None, None, None, :]
    w = tl.where(j == i0, v0[:, :, :, None], tl.where(j == i1, v1[:, :, :, None], 0.0))  # (16, NB, 4, 4)
    col, valid = _tile_cols(nc_ptr, b, hi, NB)
    return tl.reshape(w, (16, NB * 16)), col, valid


@triton.jit
def _topk_entries(tv_ptr, tp_ptr, tc_ptr, b, hi, TOPK: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr):
    """Entries of TopK blocks b..b+NB: value, row in the block and input column; (NB·KP,) each."""
    ee = tl.arange(0, NB * KP)
    blk = b + ee // KP
    slot = ee % KP
    valid = (blk < hi) & (slot < TOPK)
    v = tl.load(tv_ptr + blk * TOPK + slot, mask=valid, other=0.0)
    p = tl.load(tp_ptr + blk * TOPK + slot, mask=valid, other=0).to(tl.int32)
    col = tl.load(tc_ptr + blk, mask=valid, other=0).to(tl.int32) * 16 + p % 16
    return v, p // 16, col, valid


@triton.jit
def _x_tile(x_ptr, stride_xt, col, valid, T, K_IN, TP: tl.constexpr):
    """x gathered at input columns `col` (K,) for the first TP tokens -> (K, TP)."""
    toks = tl.arange(0, TP)
    mask = valid[:, None] & (col[:, None] < K_IN) & (toks[None, :] < T)
    return tl.load(x_ptr + toks[None, :] * stride_xt + col[:, None], mask=mask, other=0.0)


@triton.jit
def _mma(acc, w, xv, UPCAST: tl.constexpr):
    """acc + w @ xv. UPCAST works around Triton 3.7's interpreter, whose dot multiplies bf16 bit
    patterns as integers; compiled kernels never set it."""
    if UPCAST:
        return acc + tl.dot(w.to(tl.float32), xv.to(tl.float32))
    return acc + tl.dot(w, xv)


@triton.jit(do_not_specialize=["T"])  # one binary for 1..16 tokens, not one for T == 1
def _hybrid_decode_kernel(
    x_ptr, out_ptr,
    dv_ptr, dc_ptr, dp_ptr,
    nv_ptr, meta_ptr, nc_ptr, np_ptr,
    tv_ptr, tp_ptr, tc_ptr, tpp_ptr,
    T, N_OUT, K_IN, stride_xt, stride_ot,
    TOPK: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr, TP: tl.constexpr,
    SPLIT: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr,
):
    """out (T, N_OUT) = x (T, K_IN) @ W.T; grid (nbr, SPLIT, cdiv(T, TP)), one token tile per axis-2 step."""
    br = tl.program_id(0)
    split = tl.program_id(1)
    tile = tl.program_id(2)
    x_ptr += tile * TP * stride_xt
    out_ptr += tile * TP * stride_ot
    T = T - tile * TP  # tokens left from this tile on; the masks keep the first min(T, TP)
    rows = tl.arange(0, 16)
    acc = tl.zeros((16, TP), dtype=tl.float32)  # (rows of the block-row, tokens)

    lo, hi = _split_range(dp_ptr, br, split, SPLIT)
    for b in range(lo, hi, NB):
        w, col, valid = _dense_tile(dv_ptr, dc_ptr, b, hi, NB)
        acc = _mma(acc, w, _x_tile(x_ptr, stride_xt, col, valid, T, K_IN, TP), UPCAST)

    lo, hi = _split_range(np_ptr, br, split, SPLIT)
    for b in range(lo, hi, NB):
        w, col, valid = _nm_tile(nv_ptr, meta_ptr, nc_ptr, b, hi, NB)
        acc = _mma(acc, w, _x_tile(x_ptr, stride_xt, col, valid, T, K_IN, TP), UPCAST)

    lo, hi = _split_range(tpp_ptr, br, split, SPLIT)
    for b in range(lo, hi, NB):
        v, r, col, valid = _topk_entries(tv_ptr, tp_ptr, tc_ptr, b, hi, TOPK, KP, NB)
        w = (rows[:, None] == r[None, :]).to(v.dtype) * v[None, :]  # (16, NB·KP) one-hot rows
        acc = _mma(acc, w, _x_tile(x_ptr, stride_xt, col, valid, T, K_IN, TP), UPCAST)

    toks = tl.arange(0, TP)
    orow = br * 16 + rows
    optr = out_ptr + toks[None, :] * stride_ot + orow[:, None]
    omask = (orow[:, None] < N_OUT) & (toks[None, :] < T)
    if ATOMIC:
        tl.atomic_add(optr, acc, mask=omask)  # out is fp32 and zeroed: splits of a block-row add up
    else:
        tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _hybrid_gemv_kernel(
    x_ptr, out_ptr,
    dv_ptr, dc_ptr, dp_ptr,
    nv_ptr, meta_ptr, nc_ptr, np_ptr,
    tv_ptr, tp_ptr, tc_ptr, tpp_ptr,
    N_OUT, K_IN,
    TOPK: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr, SPLIT: tl.constexpr, ATOMIC: tl.constexpr,
):
    """out (N_OUT,) = W @ x (K_IN,) for one token, without tensor cores; grid (nbr, SPLIT).

    2:4 blocks are not expanded: each kept value gathers its own x (x stays in L1), which costs
    about a third of the instructions of rebuilding dense tiles and needs no shared memory.
    """
    br = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, 16)
    acc = tl.zeros((16,), dtype=tl.float32)

    lo, hi = _split_range(dp_ptr, br, split, SPLIT)
    for b in tl.range(lo, hi, NB, num_stages=3):
        w, col, valid = _dense_tile(dv_ptr, dc_ptr, b, hi, NB)  # (16, NB·16)
        xv = tl.load(x_ptr + col, mask=valid & (col < K_IN), other=0.0).to(tl.float32)  # (NB·16,)
        acc += tl.sum(w.to(tl.float32) * xv[None, :], axis=1)

    lo, hi = _split_range(np_ptr, br, split, SPLIT)
    slot = tl.arange(0, 8)
    for b in tl.range(lo, hi, NB, num_stages=3):
        blk = b + tl.arange(0, NB)
        ok = blk < hi
        vals = tl.load(nv_ptr + blk[None, :, None] * 128 + rows[:, None, None] * 8 + slot[None, None, :],
                       mask=ok[None, :, None], other=0.0)  # (16, NB, 8)
        meta = tl.load(meta_ptr.to(tl.pointer_type(tl.int16)) + blk[None, :] * 16 + rows[:, None],
                       mask=ok[None, :], other=0).to(tl.int32)  # (16, NB)
        first = tl.load(nc_ptr + blk, mask=ok, other=0).to(tl.int32) * 16  # (NB,)
        # Kept value s of a row sits in group s//2 at the 2-bit position s of the row's word.
        pos = (meta[:, :, None] >> (slot * 2)[None, None, :]) & 3  # (16, NB, 8)
        col = first[None, :, None] + (slot // 2 * 4)[None, None, :] + pos
        xv = tl.load(x_ptr + col, mask=ok[None, :, None] & (col < K_IN), other=0.0).to(tl.float32)
        acc += tl.sum(tl.sum(vals.to(tl.float32) * xv, axis=2), axis=1)

    lo, hi = _split_range(tpp_ptr, br, split, SPLIT)
    for b in tl.range(lo, hi, NB, num_stages=3):
        v, r, col, valid = _topk_entries(tv_ptr, tp_ptr, tc_ptr, b, hi, TOPK, KP, NB)  # (NB·KP,) each
        xv = tl.load(x_ptr + col, mask=valid & (col < K_IN), other=0.0).to(tl.float32)
        contrib = v.to(tl.float32) * xv
        acc += tl.sum(tl.where(rows[:, None] == r[None, :], contrib[None, :], 0.0), axis=1)

    orow = br * 16 + rows
    if ATOMIC:
        tl.atomic_add(out_ptr + orow, acc, mask=orow < N_OUT)
    else:
        tl.store(out_ptr + orow, acc.to(out_ptr.dtype.element_ty), mask=orow < N_OUT)


@triton.jit
def _hybrid_unpack_kernel(
    w_ptr,
    dv_ptr, dc_ptr, dp_ptr,
    nv_ptr, meta_ptr, nc_ptr, np_ptr,
    tv_ptr, tp_ptr, tc_ptr, tpp_ptr,
    N_OUT, K_IN, stride_w,
    TOPK: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr, SPLIT: tl.constexpr,
):
    """Write the dense weight W (N_OUT, K_IN) of the blocks of one block-row split; grid (nbr, SPLIT)."""
    br = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, 16)
    orow = br * 16 + rows
    rmask = orow < N_OUT

    lo, hi = _split_range(dp_ptr, br, split, SPLIT)
    for b in range(lo, hi, NB):
        w, col, valid = _dense_tile(dv_ptr, dc_ptr, b, hi, NB)
        tl.store(w_ptr + orow[:, None] * stride_w + col[None, :], w,
                 mask=rmask[:, None] & (valid & (col < K_IN))[None, :])

    lo, hi = _split_range(np_ptr, br, split, SPLIT)
    for b in range(lo, hi, NB):
        w, col, valid = _nm_tile(nv_ptr, meta_ptr, nc_ptr, b, hi, NB)
        tl.store(w_ptr + orow[:, None] * stride_w + col[None, :], w,
                 mask=rmask[:, None] & (valid & (col < K_IN))[None, :])

    lo, hi = _split_range(tpp_ptr, br, split, SPLIT)
    for b in range(lo, hi, NB):
        # Zero the blocks, then scatter their k entries; the barrier orders the two stores.
        col, valid = _tile_cols(tc_ptr, b, hi, NB)
        zeros = tl.zeros((16, NB * 16), dtype=w_ptr.dtype.element_ty)
        tl.store(w_ptr + orow[:, None] * stride_w + col[None, :], zeros,
                 mask=rmask[:, None] & (valid & (col < K_IN))[None, :])
        tl.debug_barrier()
        v, r, vcol, vvalid = _topk_entries(tv_ptr, tp_ptr, tc_ptr, b, hi, TOPK, KP, NB)
        vrow = br * 16 + r
        tl.store(w_ptr + vrow * stride_w + vcol, v, mask=vvalid & (vrow < N_OUT) & (vcol < K_IN))
        tl.debug_barrier()


# ---------------------------------------------------------------- prefetching kernels
# Measured on an H200 (benchmarks/decode_sweep.py), the kernels above move 0.6-2.2 TB/s. The software
# pipeliner prefetches the wide loads (dense tiles, 2:4 values) but not the small ones that the x loads
# depend on: block columns (int16 per block), 2:4 metadata words and TopK entries, which are plain loads
# waited for in the step that issues them. The prefetching kernels below are the same loops with those
# small loads issued one step ahead (loop-carried registers), every tier's row range read up front, and
# every tier's first small loads issued before the first loop.


@triton.jit
def _nm_meta(meta_ptr, nc_ptr, b, hi, NB: tl.constexpr):
    """Metadata words (16, NB) and block columns (NB,) of 2:4 blocks b..b+NB (column -1: no block)."""
    blk = b + tl.arange(0, NB)
    ok = blk < hi
    meta = tl.load(meta_ptr.to(tl.pointer_type(tl.int16)) + blk[None, :] * 16 + tl.arange(0, 16)[:, None],
                   mask=ok[None, :], other=0)
    return meta, tl.load(nc_ptr + blk, mask=ok, other=-1).to(tl.int32)


@triton.jit
def _topk_small(tv_ptr, tp_ptr, tc_ptr, b, hi, TOPK: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr):
    """_topk_entries with the column -1 where there is no entry (one validity test fewer downstream)."""
    v, r, col, valid = _topk_entries(tv_ptr, tp_ptr, tc_ptr, b, hi, TOPK, KP, NB)
    return v, r, tl.where(valid, col, -1)


@triton.jit
def _store_split(acc, optr, omask, ws_ptr, ws_stride, cnt_ptr, split, SPLIT: tl.constexpr):
    """Store one split's fp32 partial `acc`; the last split of the tile to finish sums them into `optr`.

    Splits write partials (ws_stride apart in the workspace) and count themselves on a per-tile counter; the
    one that counts last adds the partials in split order and resets the counter to 0, so that the counters
    stay zero between launches. One kernel, where atomics into an fp32 output need two more (zero it before,
    cast it after), which at decode sizes cost microseconds each.
    """
    if SPLIT == 1:
        tl.store(optr, acc.to(optr.dtype.element_ty), mask=omask)
    else:
        tl.store(ws_ptr + split * ws_stride, acc, mask=omask)
        tl.debug_barrier()  # every thread's partial is written before the count says so
        arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for s in range(SPLIT):
                total += tl.load(ws_ptr + s * ws_stride, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(optr, total.to(optr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(cnt_ptr, 0)


@triton.jit
def _hybrid_gemv_prefetch_kernel(
    x_ptr, out_ptr, ws_ptr, cnt_ptr,
    dv_ptr, dc_ptr, dp_ptr,
    nv_ptr, meta_ptr, nc_ptr, np_ptr,
    tv_ptr, tp_ptr, tc_ptr, tpp_ptr,
    N_OUT, K_IN,
    TOPK: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr, SPLIT: tl.constexpr,
):
    """_hybrid_gemv_kernel with block columns, 2:4 metadata and TopK entries loaded a step ahead; grid (nbr, SPLIT)."""
    br = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, 16)
    slot = tl.arange(0, 8)
    d_lo, d_hi = _split_range(dp_ptr, br, split, SPLIT)
    n_lo, n_hi = _split_range(np_ptr, br, split, SPLIT)
    t_lo, t_hi = _split_range(tpp_ptr, br, split, SPLIT)
    dfirst = tl.load(dc_ptr + d_lo + tl.arange(0, NB), mask=d_lo + tl.arange(0, NB) < d_hi, other=-1).to(tl.int32)
    meta, nfirst = _nm_meta(meta_ptr, nc_ptr, n_lo, n_hi, NB)
    tv, tr, tcol = _topk_small(tv_ptr, tp_ptr, tc_ptr, t_lo, t_hi, TOPK, KP, NB)
    acc = tl.zeros((16,), dtype=tl.float32)

    for b in tl.range(d_lo, d_hi, NB, num_stages=3):
        nxt = b + NB + tl.arange(0, NB)
        dfirst_next = tl.load(dc_ptr + nxt, mask=nxt < d_hi, other=-1).to(tl.int32)
        blk = b + tl.arange(0, NB * 16) // 16
        w = tl.load(dv_ptr + blk[None, :] * 256 + rows[:, None] * 16 + (tl.arange(0, NB * 16) % 16)[None, :],
                    mask=(blk < d_hi)[None, :], other=0.0)  # (16, NB·16)
        col = tl.reshape(dfirst[:, None] * 16 + tl.arange(0, 16)[None, :], (NB * 16,))
        col = tl.max_contiguous(tl.multiple_of(col, 16), 16)
        xv = tl.load(x_ptr + col, mask=(col >= 0) & (col < K_IN), other=0.0).to(tl.float32)  # (NB·16,)
        acc += tl.sum(w.to(tl.float32) * xv[None, :], axis=1)
        dfirst = dfirst_next

    for b in tl.range(n_lo, n_hi, NB, num_stages=3):
        meta_next, nfirst_next = _nm_meta(meta_ptr, nc_ptr, b + NB, n_hi, NB)
        blk = b + tl.arange(0, NB)
        vals = tl.load(nv_ptr + blk[None, :, None] * 128 + rows[:, None, None] * 8 + slot[None, None, :],
                       mask=(blk < n_hi)[None, :, None], other=0.0)  # (16, NB, 8)
        # Kept value s of a row sits in group s//2 at the 2-bit position s of the row's word.
        pos = (meta.to(tl.int32)[:, :, None] >> (slot * 2)[None, None, :]) & 3  # (16, NB, 8)
        col = nfirst[None, :, None] * 16 + (slot // 2 * 4)[None, None, :] + pos
        xn = tl.load(x_ptr + col, mask=(nfirst >= 0)[None, :, None] & (col < K_IN), other=0.0).to(tl.float32)
        acc += tl.sum(tl.sum(vals.to(tl.float32) * xn, axis=2), axis=1)
        meta, nfirst = meta_next, nfirst_next

    for b in tl.range(t_lo, t_hi, NB, num_stages=3):
        tv_next, tr_next, tcol_next = _topk_small(tv_ptr, tp_ptr, tc_ptr, b + NB, t_hi, TOPK, KP, NB)
        xt = tl.load(x_ptr + tcol, mask=(tcol >= 0) & (tcol < K_IN), other=0.0).to(tl.float32)
        contrib = tv.to(tl.float32) * xt
        acc += tl.sum(tl.where(rows[:, None] == tr[None, :], contrib[None, :], 0.0), axis=1)
        tv, tr, tcol = tv_next, tr_next, tcol_next

    orow = br * 16 + rows
    _store_split(acc, out_ptr + orow, orow < N_OUT, ws_ptr + orow, N_OUT, cnt_ptr + br, split, SPLIT)


@triton.jit
def _nm_expand(vals, meta, NB: tl.constexpr):
    """(16, NB·16) dense tile of 2:4 kept values (16, NB, 8) and their metadata words (16, NB); see _nm_tile."""
    v0, v1 = tl.split(tl.reshape(vals, (16, NB, 4, 2)))  # (16, NB, 4)
    nib = (meta.to(tl.int32)[:, :, None] >> (tl.arange(0, 4) * 4)[None, None, :]) & 15  # (16, NB, 4)
    i0 = (nib & 3)[:, :, :, None]
    i1 = (nib >> 2)[:, :, :, None]
    j = tl.arange(0, 4)[None, None, None, :]
    w = tl.where(j == i0, v0[:, :, :, None], tl.where(j == i1, v1[:, :, :, None], 0.0))  # (16, NB, 4, 4)
    return tl.reshape(w, (16, NB * 16))


@triton.jit
def _block_cols(first, NB: tl.constexpr):
    """Input column of each of the NB·16 tile columns from each block's column (-1: no block)."""
    col = tl.reshape(tl.where(first[:, None] >= 0, first[:, None] * 16 + tl.arange(0, 16)[None, :], -1), (NB * 16,))
    return col, col >= 0


@triton.jit(do_not_specialize=["T"])
def _hybrid_decode_prefetch_kernel(
    x_ptr, out_ptr, ws_ptr, cnt_ptr,
    dv_ptr, dc_ptr, dp_ptr,
    nv_ptr, meta_ptr, nc_ptr, np_ptr,
    tv_ptr, tp_ptr, tc_ptr, tpp_ptr,
    T, N_OUT, K_IN, stride_xt, stride_ot,
    TOPK: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr, TP: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr,
):
    """_hybrid_decode_kernel with block columns, 2:4 metadata and TopK entries loaded a step ahead;
    grid (nbr, SPLIT, cdiv(T, TP)); the split partials go through ws (SPLIT, T, N_OUT) fp32."""
    br = tl.program_id(0)
    split = tl.program_id(1)
    tile = tl.program_id(2)
    x_ptr += tile * TP * stride_xt
    out_ptr += tile * TP * stride_ot
    ws_ptr += tile * TP * N_OUT
    n_tiles = tl.num_programs(2)
    T_ALL = T
    T = T - tile * TP
    rows = tl.arange(0, 16)
    acc = tl.zeros((16, TP), dtype=tl.float32)
    d_lo, d_hi = _split_range(dp_ptr, br, split, SPLIT)
    n_lo, n_hi = _split_range(np_ptr, br, split, SPLIT)
    t_lo, t_hi = _split_range(tpp_ptr, br, split, SPLIT)
    dfirst = tl.load(dc_ptr + d_lo + tl.arange(0, NB), mask=d_lo + tl.arange(0, NB) < d_hi, other=-1).to(tl.int32)
    meta, nfirst = _nm_meta(meta_ptr, nc_ptr, n_lo, n_hi, NB)
    tv, tr, tcol = _topk_small(tv_ptr, tp_ptr, tc_ptr, t_lo, t_hi, TOPK, KP, NB)

    for b in range(d_lo, d_hi, NB):
        nxt = b + NB + tl.arange(0, NB)
        dfirst_next = tl.load(dc_ptr + nxt, mask=nxt < d_hi, other=-1).to(tl.int32)
        kk = tl.arange(0, NB * 16)
        blk = b + kk // 16
        w = tl.load(dv_ptr + blk[None, :] * 256 + rows[:, None] * 16 + (kk % 16)[None, :],
                    mask=(blk < d_hi)[None, :], other=0.0)  # (16, NB·16)
        col, valid = _block_cols(dfirst, NB)
        acc = _mma(acc, w, _x_tile(x_ptr, stride_xt, col, valid, T, K_IN, TP), UPCAST)
        dfirst = dfirst_next

    for b in range(n_lo, n_hi, NB):
        meta_next, nfirst_next = _nm_meta(meta_ptr, nc_ptr, b + NB, n_hi, NB)
        blk = b + tl.arange(0, NB)
        vals = tl.load(nv_ptr + blk[None, :, None] * 128 + rows[:, None, None] * 8 + tl.arange(0, 8)[None, None, :],
                       mask=(blk < n_hi)[None, :, None], other=0.0)  # (16, NB, 8)
        col, valid = _block_cols(nfirst, NB)
        acc = _mma(acc, _nm_expand(vals, meta, NB), _x_tile(x_ptr, stride_xt, col, valid, T, K_IN, TP), UPCAST)
        meta, nfirst = meta_next, nfirst_next

    for b in range(t_lo, t_hi, NB):
        tv_next, tr_next, tcol_next = _topk_small(tv_ptr, tp_ptr, tc_ptr, b + NB, t_hi, TOPK, KP, NB)
        wt = (rows[:, None] == tr[None, :]).to(tv.dtype) * tv[None, :]  # (16, NB·KP) one-hot rows
        acc = _mma(acc, wt, _x_tile(x_ptr, stride_xt, tcol, tcol >= 0, T, K_IN, TP), UPCAST)
        tv, tr, tcol = tv_next, tr_next, tcol_next

    toks = tl.arange(0, TP)
    orow = br * 16 + rows
    omask = (orow[:, None] < N_OUT) & (toks[None, :] < T)
    _store_split(acc, out_ptr + toks[None, :] * stride_ot + orow[:, None], omask,
                 ws_ptr + toks[None, :] * N_OUT + orow[:, None], T_ALL * N_OUT, cnt_ptr + br * n_tiles + tile,
                 split, SPLIT)
