"""The packed hybrid Dense / 2:4 / TopK format of one weight matrix, its round trip and reference matmul.

Storage is per 16-row block-row, with the blocks of each tier contiguous (CSR per tier: `*_row_ptr`
(nbr+1,) int32 gives each block-row's slice, `*_cols` int16 the block column of each block):
  Dense  values (n, bs, bs)                        bs² values             (512 B in bf16)
  2:4    values (n, bs, bs/2) + meta (n, bs, bs/8)  kept values + 2-bit    (256 + 32 = 288 B)
         positions inside each group of 4, four positions per byte, low bits first
  TopK   values (n, k) + positions (n, k) uint8     k values + 0..bs²-1    (10·2 + 10 = 30 B)
Edge blocks (dims not multiples of bs) are packed padded with zeros. A weight that breaks its tier
map (3 non-zeros in a 2:4 group, more than k in a TopK block) is refused: packing never drops weights.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .masks import from_blocks, to_blocks
from .tiers import DENSE, NM_2_4, TOPK

__all__ = [
    "HybridWeight",
    "pack_hybrid",
    "hybrid_matmul",
    "hybrid_matmul_ref",
    "ideal_nbytes",
    "HYBRID_TENSOR_NAMES",
]

HYBRID_TENSOR_NAMES = (
    "dense_values", "dense_cols", "dense_row_ptr",
    "nm_values", "nm_meta", "nm_cols", "nm_row_ptr",
    "topk_values", "topk_pos", "topk_cols", "topk_row_ptr",
)


@dataclass
class HybridWeight:
    """A weight (out, in) packed per block-row, Dense / 2:4 / TopK blocks each contiguous."""

    shape: tuple[int, int]
    block_size: int
    topk: int
    dense_values: torch.Tensor  # (nd, bs, bs) weight dtype
    dense_cols: torch.Tensor  # (nd,) int16 block column
    dense_row_ptr: torch.Tensor  # (nbr+1,) int32
    nm_values: torch.Tensor  # (nn, bs, bs/2) weight dtype
    nm_meta: torch.Tensor  # (nn, bs, bs/8) uint8, four 2-bit positions per byte
    nm_cols: torch.Tensor  # (nn,) int16
    nm_row_ptr: torch.Tensor  # (nbr+1,) int32
    topk_values: torch.Tensor  # (nt, k) weight dtype
    topk_pos: torch.Tensor  # (nt, k) uint8, row-major position inside the block
    topk_cols: torch.Tensor  # (nt,) int16
    topk_row_ptr: torch.Tensor  # (nbr+1,) int32

    def tensors(self) -> dict[str, torch.Tensor]:
        """The packed buffers by name (safetensors-friendly: plain contiguous tensors)."""
        return {name: getattr(self, name) for name in HYBRID_TENSOR_NAMES}

    @property
    def dtype(self) -> torch.dtype:
        return self.dense_values.dtype

    @property
    def device(self) -> torch.device:
        return self.dense_values.device

    @property
    def nbytes(self) -> int:
        """Bytes of every packed buffer, index arrays included."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tier_counts(self) -> tuple[int, int, int]:
        """Number of (Dense, 2:4, TopK) blocks."""
        return len(self.dense_cols), len(self.nm_cols), len(self.topk_cols)

    def to(self, device: torch.device | str) -> HybridWeight:
        """A copy on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved.update({name: t.to(device) for name, t in self.tensors().items()})
        return HybridWeight(**moved)

    def to_dense(self) -> torch.Tensor:
        """The dense-with-zeros weight (out, in), in the packed dtype; exact inverse of pack_hybrid."""
        out, inp = self.shape
        bs = self.block_size
        nbr, nbc = -(-out // bs), -(-inp // bs)
        Wb = torch.zeros(nbr * nbc, bs * bs, dtype=self.dtype, device=self.device)  # (nblocks, bs²)
        Wb[_block_index(self.dense_row_ptr, self.dense_cols, nbc)] = self.dense_values.reshape(-1, bs * bs)
        if len(self.nm_cols):
            n = len(self.nm_cols)
            pos = _unpack_2bit(self.nm_meta, bs // 2)  # (n, bs, bs/2) position in its group
            group = torch.arange(bs // 2, device=self.device) // 2  # kept value j sits in group j//2
            col = group * 4 + pos.long()  # (n, bs, bs/2)
            tiles = torch.zeros(n, bs, bs, dtype=self.dtype, device=self.device)
            tiles.scatter_(2, col, self.nm_values)
            Wb[_block_index(self.nm_row_ptr, self.nm_cols, nbc)] = tiles.reshape(n, bs * bs)
        if len(self.topk_cols):
            tiles = torch.zeros(len(self.topk_cols), bs * bs, dtype=self.dtype, device=self.device)
            tiles.scatter_(1, self.topk_pos.long(), self.topk_values)
            Wb[_block_index(self.topk_row_ptr, self.topk_cols, nbc)] = tiles
        return from_blocks(Wb, self.shape, bs)


def ideal_nbytes(tier_counts: tuple[int, int, int], block_size: int = 16, topk: int = 10,
                 element_size: int = 2) -> int:
    """Bytes of the values and in-block positions alone (no block index): 512 / 288 / 30 per block in bf16."""
    n_dense, n_nm, n_topk = tier_counts
    area = block_size * block_size
    return (n_dense * area * element_size
            + n_nm * (area // 2 * element_size + area // 2 * 2 // 8)
            + n_topk * topk * (element_size + 1))


def _block_index(row_ptr: torch.Tensor, cols: torch.Tensor, nbc: int) -> torch.Tensor:
    """Flat block index row·nbc + col of each packed block; (n,) int64."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(len(counts), device=cols.device), counts)
    return rows * nbc + cols.long()


def _pack_2bit(pos: torch.Tensor) -> torch.Tensor:
    """(..., m) values 0..3 -> (..., m/4) uint8, position j of each four at bits 2j."""
    P = pos.to(torch.int32).reshape(*pos.shape[:-1], pos.shape[-1] // 4, 4)  # (..., m/4, 4)
    shifts = torch.arange(0, 8, 2, dtype=torch.int32, device=pos.device)
    return (P << shifts).sum(-1).to(torch.uint8)


def _unpack_2bit(packed: torch.Tensor, m: int) -> torch.Tensor:
    """Inverse of _pack_2bit: (..., m/4) uint8 -> (..., m) int32."""
    shifts = torch.arange(0, 8, 2, dtype=torch.int32, device=packed.device)
    P = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 3  # (..., m/4, 4)
    return P.reshape(*packed.shape[:-1], m)


def _check_args(weight: torch.Tensor, tier_map: torch.Tensor, block_size: int, topk: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if block_size not in (8, 16):
        raise ValueError(f"block_size must be 8 or 16 (2:4 positions pack four per byte, TopK "
                         f"positions fit a uint8), got {block_size}")
    if not 1 <= topk <= block_size * block_size:
        raise ValueError(f"topk must be in 1..{block_size * block_size}, got {topk}")
    rows, cols = weight.shape
    expected = (-(-rows // block_size), -(-cols // block_size))
    if tuple(tier_map.shape) != expected:
        raise ValueError(f"tier map shape {tuple(tier_map.shape)} does not fit weight {tuple(weight.shape)} "
                         f"with {block_size}x{block_size} blocks: expected {expected}")
    if tier_map.numel() and not ((tier_map >= DENSE) & (tier_map <= TOPK)).all():
        raise ValueError(f"tier map holds values outside {DENSE}..{TOPK}: {sorted(set(tier_map.flatten().tolist()))}")
    if expected[1] > torch.iinfo(torch.int16).max:
        raise ValueError(f"too many block columns for int16 column indices: {expected[1]}")


def _refuse(what: str, bad_blocks: torch.Tensor, nbc: int, detail: str) -> None:
    first = int(bad_blocks[0])
    raise ValueError(f"weight breaks its tier map: {what} block (row {first // nbc}, col {first % nbc}) {detail} "
                     f"({len(bad_blocks)} such blocks); apply the tier keep-mask before packing")


def pack_hybrid(weight: torch.Tensor, tier_map: torch.Tensor, *, block_size: int = 16,
                topk: int = 10) -> HybridWeight:
    """Pack a weight (out, in) that obeys `tier_map` (nbr, nbc) losslessly; ValueError names a breaking block."""
    _check_args(weight, tier_map, block_size, topk)
    bs = block_size
    W = weight.detach()
    nbr, nbc = tier_map.shape
    tiers = tier_map.to(W.device).flatten()  # (nblocks,) row-major: blocks come out sorted by row, then col
    Wb = to_blocks(W, bs)  # (nblocks, bs²)

    def csr(tier: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.nonzero(tiers == tier).flatten()  # (n,)
        per_row = torch.bincount(idx // nbc, minlength=nbr)
        row_ptr = F.pad(torch.cumsum(per_row, 0), (1, 0)).to(torch.int32)
        return idx, (idx % nbc).to(torch.int16), row_ptr

    d_idx, dense_cols, dense_row_ptr = csr(DENSE)
    dense_values = Wb[d_idx].reshape(-1, bs, bs).contiguous()

    n_idx, nm_cols, nm_row_ptr = csr(NM_2_4)
    G = Wb[n_idx].reshape(-1, bs, bs // 4, 4)  # (n, bs, groups, 4)
    nz = G != 0
    bad = nz.sum(-1).gt(2).flatten(1).any(1)
    if bad.any():
        _refuse("2:4", n_idx[bad], nbc, "has more than 2 non-zeros in a group of 4")
    # The non-zeros first, then the lowest free positions, so that every group stores 2 distinct slots.
    order = torch.arange(4, 0, -1, device=W.device)
    slots = torch.topk(nz.to(torch.int64) * 8 + order, 2, dim=-1).indices.sort(-1).values  # (n, bs, groups, 2)
    nm_values = G.gather(-1, slots).reshape(-1, bs, bs // 2).contiguous()
    nm_meta = _pack_2bit(slots.reshape(-1, bs, bs // 2)).contiguous()

    t_idx, topk_cols, topk_row_ptr = csr(TOPK)
    B = Wb[t_idx]  # (n, bs²)
    nz = B != 0
    bad = nz.sum(-1) > topk
    if bad.any():
        _refuse("TopK", t_idx[bad], nbc, f"has more than {topk} non-zeros")
    order = torch.arange(bs * bs, 0, -1, device=W.device)
    pos = torch.topk(nz.to(torch.int64) * (2 * bs * bs) + order, topk, dim=-1).indices.sort(-1).values  # (n, k)
    topk_values = B.gather(1, pos).contiguous()

    return HybridWeight(
        shape=(int(W.shape[0]), int(W.shape[1])), block_size=bs, topk=topk,
        dense_values=dense_values, dense_cols=dense_cols, dense_row_ptr=dense_row_ptr,
        nm_values=nm_values, nm_meta=nm_meta, nm_cols=nm_cols, nm_row_ptr=nm_row_ptr,
        topk_values=topk_values, topk_pos=pos.to(torch.uint8).contiguous(), topk_cols=topk_cols,
        topk_row_ptr=topk_row_ptr,
    )


def hybrid_matmul_ref(x: torch.Tensor, hw: HybridWeight) -> torch.Tensor:
    """x (..., in) @ W.T -> (..., out) through the dense weight; the CPU path and the test oracle."""
    if x.shape[-1] != hw.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {hw.shape[1]}")
    return F.linear(x, hw.to_dense().to(x.dtype))


def hybrid_matmul(x: torch.Tensor, hw: HybridWeight) -> torch.Tensor:
    """x (..., in) @ W.T -> (..., out): the Triton kernels on CUDA, the reference elsewhere."""
    from .triton.hybrid_mm import hybrid_mm  # registers tierprune::hybrid_mm; imports no triton on CPU

    return hybrid_mm(x, hw)
