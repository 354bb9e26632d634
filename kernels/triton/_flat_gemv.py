"""One-token GEMV over the hybrid format as a flat stream of blocks, in two kernels or one.

The per-block-row kernels in _hybrid_kernels.py loop over a block-row's blocks, and every step waits on
small dependent loads (block column -> x gather, 2:4 metadata -> x gather) that the pipeliner does not
prefetch; their block-rows also differ in work. Here each tier's flat block array (sorted by block-row)
is cut into chunks of NB consecutive blocks: programs [0, P_DENSE) take the dense chunks, the next P_NM
the 2:4 chunks, the rest the TopK chunks, one launch for all three. A program issues all of a chunk's
loads at once, so the latency is hidden by the many short programs resident on each SM rather than by a
pipeliner, and every program does the same amount of work within its tier.

A chunk's blocks can belong to several block-rows (a row boundary inside the chunk, or a chunk that
spans rows with no blocks of this tier). Each program sums its blocks' (16,) partials per block-row
(_chunk_sums) and adds each sum into an fp32 workspace row with relaxed atomics. Then either:
- uncounted (the op's default): the program ends there, and a second small kernel writes the output in
  its dtype and zeroes the workspace (_cast_and_zero_kernel);
- counted (one launch): the program also counts itself on the block-row's counter, and the contributor
  that counts last (the count of contributors per block-row is known from the chunking, see flat_gemv.py's
  _flat_state) reads the row back while zeroing it, writes the output and resets the counter.
Either way the workspace (and the counters) stay zeroed between calls: no zero-fill before a call. The
counted handshake costs each program a release fence and two more round trips to L2 after its atomics;
on the H200 the second launch costs less (README, session 10).
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_hybrid_flat_gemv_kernel", "_hybrid_flat_gemv_uncounted_kernel", "_cast_and_zero_kernel"]


@triton.jit
def _dense_partials(x_ptr, dv_ptr, dc_ptr, blk, ok, K_IN):
    """(NB, 16) fp32: each dense block's product with x at its 16 input columns.

    The weights are laid out (row, block, column), not (block, row, column): Triton then gives each thread
    several rows of one block rather than one row of several blocks, so a thread converts each x value it
    holds once for all of its rows. On the H200 that took one token from 1.00-1.08x to 1.03-1.10x cuBLAS
    at 35/45/20 (README, session 10); compiled for sm_90 the dense path went from 194 to 142 instructions.
    """
    r = tl.arange(0, 16)
    w = tl.load(dv_ptr + blk[None, :, None] * 256 + r[:, None, None] * 16 + r[None, None, :],
                mask=ok[None, :, None], other=0.0)  # (16, NB, 16): row, block, column
    col = tl.load(dc_ptr + blk, mask=ok, other=0).to(tl.int32)[:, None] * 16 + r[None, :]
    xv = tl.load(x_ptr + col, mask=ok[:, None] & (col < K_IN), other=0.0).to(tl.float32)  # (NB, 16)
    return tl.trans(tl.sum(w.to(tl.float32) * xv[None, :, :], axis=2))


@triton.jit
def _nm_partials(x_ptr, nv_ptr, meta_ptr, nc_ptr, blk, ok, K_IN):
    """(NB, 16) fp32 of 2:4 blocks, each kept value multiplied by x gathered at its own column.

    A row's 8 two-bit positions are one 16-bit word (little-endian bytes, low bits first): kept value s sits
    in group s//2 at column (s//2)*4 + ((word >> 2s) & 3). Gathering x per kept value costs 8 gathers per row
    instead of rebuilding a 16-wide dense row (two compares and two selects per weight); x is L1-resident.
    Laid out (row, block, value) like _dense_partials, which shares its index arithmetic.
    """
    r = tl.arange(0, 16)
    s = tl.arange(0, 8)
    vals = tl.load(nv_ptr + blk[None, :, None] * 128 + r[:, None, None] * 8 + s[None, None, :],
                   mask=ok[None, :, None], other=0.0)  # (16, NB, 8)
    word = tl.load(meta_ptr.to(tl.pointer_type(tl.int16)) + blk[None, :] * 16 + r[:, None],
                   mask=ok[None, :], other=0).to(tl.int32)  # (16, NB)
    first = tl.load(nc_ptr + blk, mask=ok, other=0).to(tl.int32) * 16  # (NB,)
    col = first[None, :, None] + (s // 2 * 4)[None, None, :] + ((word[:, :, None] >> (s * 2)[None, None, :]) & 3)
    xv = tl.load(x_ptr + col, mask=ok[None, :, None] & (col < K_IN), other=0.0).to(tl.float32)  # (16, NB, 8)
    return tl.trans(tl.sum(vals.to(tl.float32) * xv, axis=2))


@triton.jit
def _nm_partials_expanded(x_ptr, nv_ptr, meta_ptr, nc_ptr, blk, ok, K_IN):
    """_nm_partials by rebuilding each block's dense (16, 16) rows in registers against x read as 16-wide vectors.

    Two compares and two selects per weight instead of a gathered x per kept value: fewer memory instructions
    (the load units, not the ALUs, may be what limits the gathers), more arithmetic.
    """
    r = tl.arange(0, 16)
    s = tl.arange(0, 8)
    vals = tl.load(nv_ptr + blk[:, None, None] * 128 + r[None, :, None] * 8 + s[None, None, :],
                   mask=ok[:, None, None], other=0.0)  # (NB, 16, 8)
    word = tl.load(meta_ptr.to(tl.pointer_type(tl.int16)) + blk[:, None] * 16 + r[None, :],
                   mask=ok[:, None], other=0).to(tl.int32)  # (NB, 16)
    col = tl.load(nc_ptr + blk, mask=ok, other=0).to(tl.int32)[:, None] * 16 + r[None, :]  # (NB, 16)
    xv = tl.load(x_ptr + col, mask=ok[:, None] & (col < K_IN), other=0.0).to(tl.float32)  # (NB, 16)
    v0, v1 = tl.split(tl.reshape(vals, (vals.shape[0], 16, 4, 2)))  # (NB, 16, 4) each group's two kept values
    nib = (word[:, :, None] >> (tl.arange(0, 4) * 4)[None, None, :]) & 15  # (NB, 16, 4) group g: bits 4g..4g+3
    j = tl.arange(0, 4)[None, None, None, :]
    w = tl.where(j == (nib & 3)[:, :, :, None], v0[:, :, :, None],
                 tl.where(j == (nib >> 2)[:, :, :, None], v1[:, :, :, None], 0.0))  # (NB, 16, 4, 4)
    w = tl.reshape(w, (vals.shape[0], 16, 16))
    return tl.sum(w.to(tl.float32) * xv[:, None, :], axis=2)


@triton.jit
def _topk_entries(x_ptr, tv_ptr, tp_ptr, tc_ptr, blk, ok, K_IN, TOPK: tl.constexpr, KP: tl.constexpr):
    """Each TopK entry's position in its block (row-major), its value times x at its column, and whether it exists.

    All (NB, KP): the TOPK entries padded to a power of 2.
    """
    e = tl.arange(0, KP)
    valid = ok[:, None] & (e < TOPK)[None, :]
    v = tl.load(tv_ptr + blk[:, None] * TOPK + e[None, :], mask=valid, other=0.0)
    p = tl.load(tp_ptr + blk[:, None] * TOPK + e[None, :], mask=valid, other=0).to(tl.int32)
    col = tl.load(tc_ptr + blk, mask=ok, other=0).to(tl.int32)[:, None] * 16 + p % 16
    xv = tl.load(x_ptr + col, mask=valid & (col < K_IN), other=0.0).to(tl.float32)
    return p, v.to(tl.float32) * xv, valid


@triton.jit
def _topk_partials(x_ptr, tv_ptr, tp_ptr, tc_ptr, blk, ok, K_IN, TOPK: tl.constexpr, KP: tl.constexpr):
    """(NB, 16) fp32 of TopK blocks: each entry's value times x at its column, summed into its row."""
    p, contrib, _ = _topk_entries(x_ptr, tv_ptr, tp_ptr, tc_ptr, blk, ok, K_IN, TOPK, KP)
    rows = tl.arange(0, 16)
    return tl.sum(tl.where((p // 16)[:, :, None] == rows[None, None, :], contrib[:, :, None], 0.0), axis=1)


@triton.jit
def _chunk_sums(x_ptr, brow_ptr, dv_ptr, dc_ptr, nv_ptr, meta_ptr, nc_ptr, tv_ptr, tp_ptr, tc_ptr,
                tier, start, N_DENSE, N_NM, N_TOPK, K_IN,
                TOPK: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr, NM_EXPAND: tl.constexpr):
    """One chunk (NB blocks of `tier` from its block `start`): each block's row, its sum to emit, whether it emits.

    Returns brow (NB,) int32, seg (NB, 16) fp32 and head (NB,) bool: adding seg[j] into block-row brow[j] for
    every j with head[j] adds each block's product exactly once.
    """
    if tier == 0:  # the tier's block count and its rows in brow_ptr
        n, tier_rows = N_DENSE, brow_ptr
    elif tier == 1:
        n, tier_rows = N_NM, brow_ptr + N_DENSE
    else:
        n, tier_rows = N_TOPK, brow_ptr + N_DENSE + N_NM
    i = tl.arange(0, NB)
    blk = start + i
    ok = blk < n
    brow = tl.load(tier_rows + blk, mask=ok, other=-1).to(tl.int32)  # (NB,)
    if tier == 0:
        part = _dense_partials(x_ptr, dv_ptr, dc_ptr, blk, ok, K_IN)
    elif tier == 1:
        if NM_EXPAND:
            part = _nm_partials_expanded(x_ptr, nv_ptr, meta_ptr, nc_ptr, blk, ok, K_IN)
        else:
            part = _nm_partials(x_ptr, nv_ptr, meta_ptr, nc_ptr, blk, ok, K_IN)
    else:
        part = _topk_partials(x_ptr, tv_ptr, tp_ptr, tc_ptr, blk, ok, K_IN, TOPK, KP)

    # Sum the partials per block-row before the atomics, so that a block-row costs one atomic per output row
    # rather than one per block (NB·16 atomics per chunk, all of a block-row's on the same 16 addresses, would
    # make the atomics the limit). The blocks are sorted by block-row, and a chunk is short beside a tier's
    # blocks per block-row (tens to hundreds in LLaMA shapes), so a chunk nearly always lies in one or two
    # block-rows: its first and its last. Those two are summed (a masked sum over the NB blocks each) and
    # emitted from the chunk's first and last block; a block of any row in between emits its own partial.
    # A one-hot (NB, NB) segment sum is general but costs NB·NB·16 selects and, compiled for sm_90, about as
    # many instructions as the products themselves (the first version of this kernel). The first and last
    # rows are read as two scalars (same cache line as brow) rather than reduced over the chunk: fewer
    # cross-thread steps.
    last_i = tl.minimum(n - start, NB) - 1  # the chunk's last block
    first = tl.load(tier_rows + start).to(tl.int32)
    final = tl.load(tier_rows + start + last_i).to(tl.int32)
    tail = i == last_i  # (NB,)
    sum_first = tl.sum(tl.where((brow == first)[:, None], part, 0.0), axis=0)  # (16,)
    sum_final = tl.sum(tl.where(((brow == final) & (brow != first))[:, None], part, 0.0), axis=0)  # (16,)
    head = (i == 0) | (tail & (final != first)) | (ok & (brow != first) & (brow != final))  # (NB,) emitters
    seg = tl.where((i == 0)[:, None], sum_first[None, :], tl.where(tail[:, None], sum_final[None, :], part))
    return brow, seg, head


@triton.jit
def _topk_add_entries(x_ptr, ws_ptr, tier_rows, tv_ptr, tp_ptr, tc_ptr, start, n, K_IN,
                      TOPK: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr):
    """ws += each TopK entry's value times x at its column, one relaxed atomic per entry, for NB blocks from start.

    No partial per block: the one-hot (NB, KP, 16) sum into block rows and the per-row segment sums cost
    more instructions than the k bytes they save, and with k = 10 a block has fewer entries than rows.
    """
    blk = start + tl.arange(0, NB)
    ok = blk < n
    p, contrib, valid = _topk_entries(x_ptr, tv_ptr, tp_ptr, tc_ptr, blk, ok, K_IN, TOPK, KP)
    brow = tl.load(tier_rows + blk, mask=ok, other=0).to(tl.int32)  # (NB,)
    tl.atomic_add(ws_ptr + brow[:, None] * 16 + p // 16, contrib, mask=valid, sem="relaxed")


# The block and chunk counts only bound the masks: one binary for every weight of a shape, not one per
# combination of counts that happen to be multiples of 16 (or 1), which Triton would otherwise specialize on.
@triton.jit(do_not_specialize=["N_DENSE", "N_NM", "N_TOPK", "P_DENSE", "P_NM"])
def _hybrid_flat_gemv_kernel(
    x_ptr, out_ptr, ws_ptr, cnt_ptr, need_ptr, brow_ptr,
    dv_ptr, dc_ptr, dp_ptr,
    nv_ptr, meta_ptr, nc_ptr, np_ptr,
    tv_ptr, tp_ptr, tc_ptr, tpp_ptr,
    N_DENSE, N_NM, N_TOPK, P_DENSE, P_NM, N_OUT, K_IN,
    TOPK: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr, NM_EXPAND: tl.constexpr,
):
    """out (N_OUT,) = W @ x (K_IN,); grid (P_DENSE + P_NM + P_TOPK,), one chunk of NB blocks per program.

    brow_ptr: block-row of every block, the three tiers one after another (int16). ws_ptr (nbr·16,) fp32 and
    cnt_ptr (nbr,) int32 are zero on entry and left zero; need_ptr (nbr,) int32 is the number of programs
    that contribute to each block-row. The row pointers (dp/np/tpp) are not read: the chunking replaces them.
    NM_EXPAND: 2:4 blocks rebuilt as dense rows (_nm_partials_expanded) rather than gathering x per kept value.
    """
    pid = tl.program_id(0)
    if pid < P_DENSE:  # this program's tier and its chunk's first block
        tier, start = 0, pid * NB
    elif pid < P_DENSE + P_NM:
        tier, start = 1, (pid - P_DENSE) * NB
    else:
        tier, start = 2, (pid - P_DENSE - P_NM) * NB
    brow, seg, head = _chunk_sums(x_ptr, brow_ptr, dv_ptr, dc_ptr, nv_ptr, meta_ptr, nc_ptr, tv_ptr, tp_ptr, tc_ptr,
                                  tier, start, N_DENSE, N_NM, N_TOPK, K_IN, TOPK, KP, NB, NM_EXPAND)
    rows = tl.arange(0, 16)
    orow = brow[:, None] * 16 + rows[None, :]  # (NB, 16); the workspace covers the padded last block-row
    # Masks as full (NB, 16) tensors: Triton 3.7's interpreter drops the broadcast of an (1, 1) mask at NB = 1.
    every = rows[None, :] >= 0
    tl.atomic_add(ws_ptr + orow, seg, mask=head[:, None] & every, sem="relaxed")
    tl.debug_barrier()  # every thread's additions are issued before the count says so
    need = tl.load(need_ptr + brow, mask=head, other=0)  # (NB,) contributors of each emitter's block-row
    arrived = tl.atomic_add(cnt_ptr + brow, 1, mask=head, sem="acq_rel")  # (NB,)
    last = head & (arrived == need - 1)
    tl.debug_barrier()
    # Read back and zero in one atomic (the sums live in L2; a plain load could hit a stale L1 line). On the
    # 32-bit pattern: an exchange is the same instruction for both, and Triton's interpreter exchanges ints only.
    bits = tl.atomic_xchg(ws_ptr.to(tl.pointer_type(tl.int32)) + orow, 0, mask=last[:, None] & every,
                          sem="relaxed")
    total = bits.to(tl.float32, bitcast=True)  # (NB, 16)
    tl.store(out_ptr + orow, total.to(out_ptr.dtype.element_ty), mask=last[:, None] & (orow < N_OUT))
    tl.atomic_xchg(cnt_ptr + brow, 0, mask=last, sem="relaxed")


@triton.jit(do_not_specialize=["N_DENSE", "N_NM", "N_TOPK", "P_DENSE", "P_NM"])
def _hybrid_flat_gemv_uncounted_kernel(
    x_ptr, ws_ptr, brow_ptr,
    dv_ptr, dc_ptr, nv_ptr, meta_ptr, nc_ptr, tv_ptr, tp_ptr, tc_ptr,
    N_DENSE, N_NM, N_TOPK, P_DENSE, P_NM, K_IN,
    TOPK: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr, NM_EXPAND: tl.constexpr, CHUNKS: tl.constexpr,
    TOPK_NB: tl.constexpr = 0,
):
    """ws (nbr·16,) fp32 += W @ x; grid (P_DENSE + P_NM + P_TOPK,), CHUNKS consecutive chunks of NB per program.

    The first pass of two: programs only add into the workspace (relaxed atomics whose results nobody waits
    for) and end there, and _cast_and_zero_kernel then writes the output and zeroes the workspace. The
    counted kernel's handshake (a release fence, the counter's round trip, the read-back) made every program
    wait on about two more round trips to L2 after its atomics; a second launch costs less. CHUNKS > 1 loops
    over consecutive chunks in one program: fewer programs to launch, the same work each. TOPK_NB > 0: TopK
    chunks of TOPK_NB blocks whose entries are added one by one (_topk_add_entries).
    """
    pid = tl.program_id(0)
    if pid < P_DENSE:  # this program's tier, first chunk and the tier's chunk count
        tier, chunk0, n = 0, pid * CHUNKS, N_DENSE
    elif pid < P_DENSE + P_NM:
        tier, chunk0, n = 1, (pid - P_DENSE) * CHUNKS, N_NM
    else:
        tier, chunk0, n = 2, (pid - P_DENSE - P_NM) * CHUNKS, N_TOPK
    if TOPK_NB > 0 and tier == 2:
        for c in range(tl.minimum(CHUNKS, tl.cdiv(n, TOPK_NB) - chunk0)):
            _topk_add_entries(x_ptr, ws_ptr, brow_ptr + N_DENSE + N_NM, tv_ptr, tp_ptr, tc_ptr,
                              (chunk0 + c) * TOPK_NB, n, K_IN, TOPK, KP, TOPK_NB)
        return
    rows = tl.arange(0, 16)
    every = rows[None, :] >= 0  # full (NB, 16) masks, as in the counted kernel
    for c in range(tl.minimum(CHUNKS, tl.cdiv(n, NB) - chunk0)):
        brow, seg, head = _chunk_sums(x_ptr, brow_ptr, dv_ptr, dc_ptr, nv_ptr, meta_ptr, nc_ptr, tv_ptr, tp_ptr,
                                      tc_ptr, tier, (chunk0 + c) * NB, N_DENSE, N_NM, N_TOPK, K_IN,
                                      TOPK, KP, NB, NM_EXPAND)
        tl.atomic_add(ws_ptr + brow[:, None] * 16 + rows[None, :], seg, mask=head[:, None] & every, sem="relaxed")


@triton.jit
def _cast_and_zero_kernel(ws_ptr, out_ptr, N_OUT, BLOCK: tl.constexpr):
    """out = ws in out's dtype, and ws zeroed again: the second pass after the uncounted flat GEMV."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N_OUT
    total = tl.load(ws_ptr + i, mask=ok, other=0.0)
    tl.store(out_ptr + i, total.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(ws_ptr + i, tl.zeros_like(total), mask=ok)
