"""Keep-masks from scores: unstructured, whole-matrix, N:M, block and top-k-in-block.

Every function takes a score matrix (out, in) where higher means more important and returns a bool
keep-mask of the same shape (True = weight survives). N:M groups run along the input dimension.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .scores import block_counts, block_mean

__all__ = [
    "unstructured_mask",
    "matrix_mask",
    "nm_mask",
    "block_mask",
    "expand_blocks",
    "to_blocks",
    "from_blocks",
    "topk_in_blocks_mask",
]


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the floor(in·sparsity) lowest scores of every output row (Wanda's comparison group)."""
    n_prune = int(scores.shape[1] * sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune == 0:
        return keep
    # A stable sort, as the reference, so that ties are broken by column index.
    order = torch.sort(scores, dim=-1, stable=True).indices[:, :n_prune]
    return keep.scatter_(1, order, False)


def matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the floor(numel·sparsity) lowest scores of the whole matrix (one threshold per matrix)."""
    n_prune = int(scores.numel() * sparsity)
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_prune:
        order = torch.sort(scores.flatten(), stable=True).indices[:n_prune]
        keep[order] = False
    return keep.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive input columns in each row; (out, in) -> (out, in).

    Ties go to the lower column. Each element's rank in its group is counted with m elementwise
    comparisons: on a GPU that is a few bandwidth-bound passes, where topk over millions of
    4-element slices is slow.
    """
    rows, cols = scores.shape
    assert cols % m == 0 and 0 < n <= m, (cols, n, m)
    G = scores.reshape(rows, cols // m, m)  # (out, groups, m)
    position = torch.arange(m, device=scores.device)
    rank = torch.zeros(G.shape, dtype=torch.uint8, device=scores.device)  # how many in the group beat it
    for j in range(m):
        Gj = G[..., j:j + 1]
        rank += (Gj > G) | ((Gj == G) & (position > j))
    return (rank < n).reshape(rows, cols)


def expand_blocks(block_values: torch.Tensor, shape: tuple[int, int], block_size: int) -> torch.Tensor:
    """Broadcast a per-block map (nbr, nbc) to elements (out, in), cropping edge blocks."""
    rows, cols = shape
    full = block_values.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    return full[:rows, :cols]


def block_mask(scores: torch.Tensor, sparsity: float, block_size: int) -> torch.Tensor:
    """Zero the floor(n_blocks·sparsity) blocks with the lowest mean score in the matrix."""
    means = block_mean(scores, block_size)  # (nbr, nbc)
    keep_blocks = matrix_mask(means, sparsity)
    return expand_blocks(keep_blocks, tuple(scores.shape), block_size)


def to_blocks(X: torch.Tensor, block_size: int, pad_value: float = 0.0) -> torch.Tensor:
    """(out, in) -> (nbr·nbc, bs·bs), one row per block in row-major block order; edges padded."""
    rows, cols = X.shape
    P = F.pad(X, (0, -cols % block_size, 0, -rows % block_size), value=pad_value)
    nbr, nbc = P.shape[0] // block_size, P.shape[1] // block_size
    B = P.reshape(nbr, block_size, nbc, block_size).permute(0, 2, 1, 3)  # (nbr, nbc, bs, bs)
    return B.reshape(nbr * nbc, block_size * block_size)


def from_blocks(B: torch.Tensor, shape: tuple[int, int], block_size: int) -> torch.Tensor:
    """Inverse of to_blocks: (nbr·nbc, bs·bs) -> (out, in), dropping the padding."""
    rows, cols = shape
    nbr, nbc = -(-rows // block_size), -(-cols // block_size)
    X = B.reshape(nbr, nbc, block_size, block_size).permute(0, 2, 1, 3)
    return X.reshape(nbr * block_size, nbc * block_size)[:rows, :cols]


def topk_in_blocks_mask(scores: torch.Tensor, k: int, block_size: int,
                        blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the k highest scores inside each block; only `blocks` (bool (nbr, nbc)) if given.

    An edge block with r real elements keeps round(k·r/bs²) (at least 1 when k ≥ 1), so every
    TopK block has the same density.
    """
    shape = tuple(scores.shape)
    area = block_size * block_size
    assert 0 <= k <= area, (k, area)
    Sb = to_blocks(scores.float(), block_size, pad_value=float("-inf"))  # (nblocks, bs²)
    real = block_counts(shape, block_size, scores.device).flatten()  # (nblocks,)
    k_eff = torch.round(real * (k / area)).clamp(min=1 if k else 0).long()  # (nblocks,)
    keep_b = torch.zeros_like(Sb, dtype=torch.bool)
    rows = torch.arange(Sb.shape[0], device=scores.device)
    if blocks is not None:
        rows = rows[blocks.flatten()]
    if k and rows.numel():
        top = torch.topk(Sb[rows], k, dim=1, sorted=True).indices  # (nsel, k), best first
        ranks = torch.arange(k, device=scores.device).unsqueeze(0)
        keep_top = ranks < k_eff[rows].unsqueeze(1)  # edge blocks keep fewer
        keep_b[rows] = torch.zeros_like(Sb[rows], dtype=torch.bool).scatter_(1, top, keep_top)
    return from_blocks(keep_b, shape, block_size)
