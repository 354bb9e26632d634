"""Prefill (many tokens) through a packed hybrid weight on Hopper's warpgroup tensor cores: plan and launch.

wgmma_prefill.cu holds the kernel and says how it works. Compiled at first use with NVRTC for sm_90a, like
mma_decode.cu. Each weight gets a plan once (PrefillPlan: where each block is packed, which (group, step) runs
sparse, which block-rows form each group of four), built with torch ops on the weight's device and kept by the
caller (the op keeps one per weight).

Measured on an H100 (session 33, benchmarks/wgmma_prefill.py): correct (the GPU tests), but 0.18-0.30x cuBLAS at
2048 tokens on the LLaMA-2-7B shapes, against 0.72-0.80x for the op's unpack + cuBLAS; even all-dense steps run at
0.25-0.30x, so the loop itself, not the sparse steps, is what is slow. The op therefore keeps unpack + cuBLAS
unless use_wgmma_prefill(True).

wgmma_prefill_ws.cu is the same product, plan and tiles with a producer warpgroup that decodes and copies every
step into shared memory ahead of two consumer warpgroups that only issue wgmmas (warp_specialized=True, not used
by the op). Built and assembled on the CPU in session 37; not yet run on a GPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from ..hybrid import HybridWeight
from ..tiers import DENSE, NM_2_4, TOPK

__all__ = ["PrefillPlan", "prefill_plan", "wgmma_prefill_source", "wgmma_prefill_ws_source", "prefill_kernel_source",
           "compile_wgmma_prefill",
           "hybrid_wgmma_prefill", "wgmma_prefill_supported", "grouped_block_rows", "topk_fits_2_4",
           "prefers_wgmma_prefill", "use_wgmma_prefill", "WGMMA_PREFILL_MIN_TOKENS"]

TIER_SHIFT = 28  # slot = tier << 28 | index into that tier's packed blocks
TIER_NONE = 3  # a padding member of the last group
TOKENS_PER_CTA = 256
MEMBERS_PER_CTA = 8  # two warpgroups, each a group of 4 block-rows
WS_THREADS = 384  # the warp-specialized kernel: a producer warpgroup and two consumer warpgroups
WS_SHARED_BYTES = 8 * (TOKENS_PER_CTA * 64 + 2 * 4096 + 512 + 32)  # its 8 stages: x, A, metadata, flags, barriers
OVERLAP = True  # one step's wgmma in flight while the next is prepared (4 stages of x, 64 KiB; else 3, 48 KiB)
# Where enabled, the op sends products of at least this many tokens here (below: the streaming kernels or unpack +
# cuBLAS). Off by default: slower than unpack + cuBLAS (above).
WGMMA_PREFILL_MIN_TOKENS = 256
_ENABLED = [False]

_SOURCE = Path(__file__).with_name("wgmma_prefill.cu")
_WS_SOURCE = Path(__file__).with_name("wgmma_prefill_ws.cu")  # the warp-specialized kernel
_WS_BLOCKS = Path(__file__).with_name("wgmma_ws_blocks.cuh")  # its producer's decoding (a CPU test runs it too)
_CONVERT = Path(__file__).with_name("convert.cuh")  # from_float, shared with mma_decode.cu
_COMMON = Path(__file__).with_name("wgmma_common.cuh")  # tier codes, x's layout, 2:4 helpers: both prefill kernels
_MODULES: dict[tuple, object] = {}


class PrefillPlan(NamedTuple):
    slots: torch.Tensor  # (groups * 4, in / 16) int32: tier << 28 | index, per group member and block column
    sparse_steps: torch.Tensor  # (groups, in / 32) uint8: 1 where the step is one wgmma.sp
    group_rows: torch.Tensor  # (groups * 4,) int32: each member's block-row, -1 for padding (groups even)

    @property
    def sparse_fraction(self) -> float:
        """The share of (group, step) pairs that run sparse."""
        return float(self.sparse_steps.float().mean())


def _block_rows(row_ptr: torch.Tensor) -> torch.Tensor:
    """The block-row of each packed block of one tier."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(counts), device=row_ptr.device), counts)


def topk_fits_2_4(hw: HybridWeight) -> torch.Tensor:
    """Per TopK block, whether its nonzero entries put at most 2 in every row's group of 4 columns (so it can run
    as a 2:4 block on the sparse tensor cores; a block with fewer than k nonzero weights stores zeros)."""
    pos = hw.topk_pos.long()
    cells = pos // 16 * 4 + pos % 16 // 4  # (nt, k): row * 4 + group
    counts = torch.zeros(len(pos), 64, dtype=torch.int32, device=pos.device)
    counts.scatter_add_(1, cells, (hw.topk_values != 0).to(torch.int32))
    return counts.amax(1) <= 2 if len(pos) else torch.zeros(0, dtype=torch.bool, device=pos.device)


def grouped_block_rows(dense: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Block-rows in groups of `group` whose dense (not sparse-capable) columns overlap most, greedy: each group
    starts from the left-over row with the fewest such blocks and adds, one at a time, the row that grows the
    group's dense columns least (starting from the most dense instead left more work on the demo's tier maps:
    0.733 against 0.716 of dense, benchmarks/prefill_ceiling.py). Returns the block-rows in group order, -1
    padding the last group."""
    left = torch.argsort(dense.sum(1), stable=True).tolist()
    order = []
    remaining = torch.ones(len(dense), dtype=torch.bool, device=dense.device)
    while left:
        first = left.pop(0)
        remaining[first] = False
        members, union = [first], dense[first].clone()
        while len(members) < group and left:
            candidates = torch.tensor(left, device=dense.device)
            growth = (dense[candidates] & ~union).sum(1)
            pick = left.pop(int(torch.argmin(growth)))
            members.append(pick)
            union |= dense[pick]
        order += members + [-1] * (group - len(members))
    return torch.tensor(order, dtype=torch.int32)


def prefill_plan(hw: HybridWeight, grouped: bool = True) -> PrefillPlan:
    """The plan of `hw` for hybrid_wgmma_prefill (torch ops on hw's device; grouping runs on the CPU)."""
    out_features, in_features = hw.shape
    nbr, nbc = -(-out_features // 16), in_features // 16
    device = hw.device
    table = torch.full((nbr, nbc), TIER_NONE << TIER_SHIFT, dtype=torch.int64, device=device)
    capable = torch.zeros(nbr, nbc, dtype=torch.bool, device=device)  # may run on the sparse tensor cores
    for tier, row_ptr, cols in ((DENSE, hw.dense_row_ptr, hw.dense_cols), (NM_2_4, hw.nm_row_ptr, hw.nm_cols),
                                (TOPK, hw.topk_row_ptr, hw.topk_cols)):
        rows, cols = _block_rows(row_ptr), cols.long()
        index = torch.arange(len(cols), device=device)
        table[rows, cols] = (tier << TIER_SHIFT) | index
        if tier == NM_2_4:
            capable[rows, cols] = True
        elif tier == TOPK:
            capable[rows, cols] = topk_fits_2_4(hw)
    if grouped:
        group_rows = grouped_block_rows(~capable.cpu()).to(device)
    else:
        group_rows = torch.arange(-(-nbr // 4) * 4, dtype=torch.int32, device=device)
        group_rows[nbr:] = -1
    if len(group_rows) % MEMBERS_PER_CTA:  # a CTA takes two groups: the last one gets an empty second group
        group_rows = torch.cat([group_rows, group_rows.new_full((4,), -1)])
    present = group_rows >= 0
    member_rows = group_rows.clamp(min=0).long()
    slots = torch.where(present[:, None], table[member_rows], TIER_NONE << TIER_SHIFT)
    member_capable = torch.where(present[:, None], capable[member_rows], True)
    sparse_steps = member_capable.view(-1, 4, nbc // 2, 2).all(3).all(1)
    return PrefillPlan(slots.to(torch.int32).contiguous(), sparse_steps.to(torch.uint8).contiguous(),
                       group_rows.to(torch.int32).contiguous())


def _kernel_source(kernels: list[Path], half: bool, topk: int, **constants: int) -> str:
    """A prefill kernel's source (`kernels`: its files in order) behind its constants (the 128 accumulators' asm
    operands written out), convert.cuh and wgmma_common.cuh."""
    defines = dict(HALF_T=int(half), TOPK=topk, **constants,
                   WGMMA_D='"{' + ", ".join(f"%{i}" for i in range(128)) + '}"',
                   WGMMA_D_OPERANDS=", ".join(f'"+f"(d[{i}])' for i in range(128)))
    header = "".join(f"#define {k} {v}\n" for k, v in defines.items())
    return header + _CONVERT.read_text() + _COMMON.read_text() + "".join(path.read_text() for path in kernels)


def wgmma_prefill_source(half: bool, topk: int, overlap: bool = OVERLAP) -> str:
    """wgmma_prefill.cu with its constants defined."""
    return _kernel_source([_SOURCE], half, topk, OVERLAP=int(overlap))


def wgmma_prefill_ws_source(half: bool, topk: int) -> str:
    """wgmma_prefill_ws.cu (the warp-specialized kernel) after wgmma_ws_blocks.cuh, with its constants defined."""
    return _kernel_source([_WS_BLOCKS, _WS_SOURCE], half, topk, LAUNCH_SHARED_BYTES=WS_SHARED_BYTES)


def prefill_kernel_source(half: bool, topk: int, warp_specialized: bool = False, overlap: bool = OVERLAP) -> str:
    """The source of either prefill kernel (`overlap`: the register kernel's only)."""
    return wgmma_prefill_ws_source(half, topk) if warp_specialized else wgmma_prefill_source(half, topk, overlap)


def use_wgmma_prefill(enabled: bool) -> None:
    """Let the op send long prefills here on sm_90 (off by default: slower than unpack + cuBLAS), or not."""
    _ENABLED[0] = bool(enabled)


def prefers_wgmma_prefill(tokens: int) -> bool:
    """Whether the op sends a product of `tokens` tokens here (where wgmma_prefill_supported)."""
    return _ENABLED[0] and tokens >= WGMMA_PREFILL_MIN_TOKENS


def wgmma_prefill_supported(x: torch.Tensor, hw: HybridWeight) -> bool:
    """Hopper (sm_90), 16-bit x of the weight's dtype, 16x16 blocks, TopK k <= 32, in-features a multiple of 32."""
    return (x.is_cuda and torch.cuda.get_device_capability(x.device) == (9, 0) and x.dtype == hw.dtype
            and x.dtype in (torch.bfloat16, torch.float16) and hw.block_size == 16 and 1 <= hw.topk <= 32
            and hw.shape[1] % 32 == 0)


def _launch_shape(overlap: bool, warp_specialized: bool) -> tuple[int, int]:
    """(threads, shared-memory bytes) of a CTA of the kernel."""
    if warp_specialized:
        return WS_THREADS, WS_SHARED_BYTES
    return 256, (4 if overlap else 3) * TOKENS_PER_CTA * 64  # stages of 32 columns of x


def _kernel_name(warp_specialized: bool) -> str:
    return "hybrid_wgmma_prefill_ws" if warp_specialized else "hybrid_wgmma_prefill"


def compile_wgmma_prefill(source: str, device_index: int, overlap: bool = OVERLAP, warp_specialized: bool = False):
    """The kernel of `source` (wgmma_prefill_source's or wgmma_prefill_ws_source's, or a variant of one:
    benchmarks/wgmma_prefill.py --ablate), loaded on a device."""
    from torch.cuda._utils import _cuda_load_module, _nvrtc_compile

    name = _kernel_name(warp_specialized)
    with torch.cuda.device(device_index):
        binary, _ = _nvrtc_compile(source, name, "90a", nvcc_options=["-std=c++17"])
        kernel = _cuda_load_module(binary, [name])[name]
        kernel.set_shared_memory_config(_launch_shape(overlap, warp_specialized)[1])  # past the default 48 KiB
    return kernel


def _kernel(half: bool, topk: int, device_index: int, overlap: bool, warp_specialized: bool):
    key = (half, topk, device_index, overlap, warp_specialized)
    if key not in _MODULES:
        source = prefill_kernel_source(half, topk, warp_specialized, overlap)
        _MODULES[key] = compile_wgmma_prefill(source, device_index, overlap, warp_specialized)
    return _MODULES[key]


def hybrid_wgmma_prefill(x: torch.Tensor, hw: HybridWeight, plan: PrefillPlan, overlap: bool = OVERLAP,
                         kernel=None, warp_specialized: bool = False) -> torch.Tensor:
    """x (T, in) @ W.T -> (T, out) in x's dtype. `kernel`: a compile_wgmma_prefill variant instead of the kernel;
    `warp_specialized`: wgmma_prefill_ws.cu's kernel (or `kernel` is a variant of it)."""
    assert wgmma_prefill_supported(x, hw), "hybrid_wgmma_prefill: needs sm_90, bf16/fp16, in-features % 32 == 0"
    x = x.contiguous() if x.data_ptr() % 16 == 0 else x.clone()  # x arrives by 16-byte copies
    T, K = x.shape
    R = hw.shape[0]
    y = torch.empty(T, R, dtype=x.dtype, device=x.device)
    kernel = kernel or _kernel(x.dtype == torch.float16, hw.topk, x.device.index, overlap, warp_specialized)
    assert len(plan.group_rows) % MEMBERS_PER_CTA == 0, "hybrid_wgmma_prefill: a plan from prefill_plan"
    grid = (-(-T // TOKENS_PER_CTA), len(plan.group_rows) // MEMBERS_PER_CTA, 1)
    threads, shared_bytes = _launch_shape(overlap, warp_specialized)
    with torch.cuda.device(x.device):
        kernel(grid=grid, block=(threads, 1, 1),
               args=[x, y, hw.dense_values, hw.nm_values, hw.nm_meta, hw.topk_values, hw.topk_pos, plan.slots,
                     plan.sparse_steps, plan.group_rows, T, K, R],
               shared_mem=shared_bytes)
    return y
