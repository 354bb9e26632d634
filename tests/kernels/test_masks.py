"""Keep-masks: unstructured, whole-matrix, N:M, block, top-k-in-block, and the block layout helpers."""
from __future__ import annotations

import math

import pytest
import torch

from tierprune.kernels.masks import (
    block_mask,
    expand_blocks,
    from_blocks,
    matrix_mask,
    nm_mask,
    to_blocks,
    topk_in_blocks_mask,
    unstructured_mask,
)

pytestmark = pytest.mark.unit

SEEDS = [0, 1, 2]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _distinct_scores(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A random permutation of 1..rows·cols: no ties anywhere, exact in fp32."""
    return (torch.randperm(rows * cols, generator=_gen(seed)) + 1).float().view(rows, cols)


def _blocks_of(rows: int, cols: int, bs: int):
    """(i, j, row slice, col slice) for every block, edge blocks cropped."""
    for i in range(-(-rows // bs)):
        for j in range(-(-cols // bs)):
            yield i, j, slice(i * bs, min((i + 1) * bs, rows)), slice(j * bs, min((j + 1) * bs, cols))


def _assert_highest_kept(scores: torch.Tensor, keep: torch.Tensor) -> None:
    """Every kept score is at least every pruned score of the same group."""
    if keep.any() and (~keep).any():
        assert scores[keep].min() >= scores[~keep].max()


# --------------------------------------------------------------------------- unstructured_mask


def test_unstructured_mask_hand_worked() -> None:
    scores = torch.tensor([
        [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0],
        [7.0, 7.0, 7.0, 0.5, 7.0, 7.0, 7.0, 7.0],
    ])
    keep = unstructured_mask(scores, 0.5)  # floor(8·0.5) = 4 per row
    expected = torch.tensor([
        [0, 0, 1, 0, 1, 1, 0, 1],  # 1, 1, 2, 3 pruned (the two 1s both go)
        [0, 0, 0, 0, 1, 1, 1, 1],  # 0.5, then the tied 7s by column index: 0, 1, 2
    ], dtype=torch.bool)
    assert keep.dtype == torch.bool
    assert torch.equal(keep, expected)


def test_unstructured_mask_floor_and_ties() -> None:
    scores = torch.arange(1, 17, dtype=torch.float32).view(2, 8)
    # floor(8·0.3) = 2 per row: the two smallest of each row.
    expected = torch.ones(2, 8, dtype=torch.bool)
    expected[:, :2] = False
    assert torch.equal(unstructured_mask(scores, 0.3), expected)
    assert torch.equal(unstructured_mask(scores.flip(1), 0.3), expected.flip(1))
    # All tied: the lowest column indices are pruned first (stable sort).
    tied = torch.full((3, 8), 2.5)
    keep = unstructured_mask(tied, 0.375)  # floor(3) = 3
    assert torch.equal(keep, torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]] * 3, dtype=torch.bool))
    assert unstructured_mask(scores, 0.0).all()
    assert not unstructured_mask(scores, 1.0).any()


@pytest.mark.parametrize("shape", [(1, 8), (7, 13), (40, 56), (16, 100)])
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("seed", SEEDS)
def test_unstructured_mask_per_row_count_and_order(shape: tuple[int, int], sparsity: float, seed: int,
                                                   device: str) -> None:
    g = _gen(seed)
    # Rounded to a coarse grid so that ties occur, and the stable tie-break is checked too.
    scores = torch.round(torch.rand(shape, generator=g) * 8)
    keep = unstructured_mask(scores.to(device), sparsity).cpu()
    n_prune = math.floor(shape[1] * sparsity)
    assert ((~keep).sum(dim=1) == n_prune).all()
    for r in range(shape[0]):
        _assert_highest_kept(scores[r], keep[r])
    ref_order = torch.sort(scores, dim=1, stable=True).indices[:, :n_prune]
    expected = torch.ones(shape, dtype=torch.bool).scatter_(1, ref_order, False)
    assert torch.equal(keep, expected)


# --------------------------------------------------------------------------- matrix_mask


def test_matrix_mask_hand_worked() -> None:
    scores = torch.tensor([
        [9.0, 2.0, 16.0, 4.0, 11.0, 6.0, 13.0, 8.0],
        [1.0, 10.0, 3.0, 12.0, 5.0, 14.0, 7.0, 15.0],
    ])
    keep = matrix_mask(scores, 0.25)  # floor(16·0.25) = 4 lowest of the whole matrix: 1, 2, 3, 4
    expected = torch.tensor([
        [1, 0, 1, 0, 1, 1, 1, 1],
        [0, 1, 0, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(keep, expected)
    # Row 0 loses 2 and row 1 loses 2 here, but with one threshold rows need not lose equally:
    keep = matrix_mask(torch.arange(1, 17, dtype=torch.float32).view(2, 8), 0.5)
    assert torch.equal(keep, torch.tensor([[0] * 8, [1] * 8], dtype=torch.bool))
    # All tied: still exactly floor(8·0.75) = 6 pruned, and the same 6 every time.
    keep = matrix_mask(torch.ones(2, 4), 0.75)
    assert int((~keep).sum()) == 6
    assert torch.equal(keep, matrix_mask(torch.ones(2, 4), 0.75))


@pytest.mark.parametrize("shape", [(7, 13), (40, 56), (3, 100)])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("seed", SEEDS)
def test_matrix_mask_global_count_and_order(shape: tuple[int, int], sparsity: float, seed: int,
                                            device: str) -> None:
    n_prune = math.floor(shape[0] * shape[1] * sparsity)
    scores = _distinct_scores(*shape, seed)
    keep = matrix_mask(scores.to(device), sparsity).cpu()
    expected = torch.ones(scores.numel(), dtype=torch.bool)
    expected[torch.argsort(scores.flatten())[:n_prune]] = False
    assert torch.equal(keep, expected.view(shape))
    # With ties (a coarse grid) the count is still exact, and no pruned score beats a kept one.
    tied = torch.round(torch.rand(shape, generator=_gen(seed)) * 16)
    keep = matrix_mask(tied.to(device), sparsity).cpu()
    assert int((~keep).sum()) == n_prune
    _assert_highest_kept(tied, keep)
    assert torch.equal(keep, matrix_mask(tied.clone().to(device), sparsity).cpu())


# --------------------------------------------------------------------------- nm_mask


def test_nm_mask_weights_1_to_8() -> None:
    scores = torch.arange(1, 9, dtype=torch.float32).view(1, 8)
    assert torch.equal(nm_mask(scores, 2, 4), torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1]], dtype=torch.bool))
    assert torch.equal(nm_mask(scores, 4, 8), torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool))
    assert torch.equal(nm_mask(scores, 1, 4), torch.tensor([[0, 0, 0, 1, 0, 0, 0, 1]], dtype=torch.bool))
    assert torch.equal(nm_mask(scores.flip(1), 2, 4), torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0]], dtype=torch.bool))


def test_nm_mask_hand_worked_2x8() -> None:
    scores = torch.tensor([
        [9.0, 2.0, 16.0, 4.0, 11.0, 6.0, 13.0, 8.0],
        [1.0, 10.0, 3.0, 12.0, 5.0, 14.0, 7.0, 15.0],
    ])
    expected = torch.tensor([
        [1, 0, 1, 0, 1, 0, 1, 0],
        [0, 1, 0, 1, 0, 1, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(nm_mask(scores, 2, 4), expected)
    # 3:8 per row: row 0 keeps 16, 13, 11; row 1 keeps 15, 14, 12.
    expected = torch.tensor([
        [0, 0, 1, 0, 1, 0, 1, 0],
        [0, 0, 0, 1, 0, 1, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(nm_mask(scores, 3, 8), expected)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 8)])
@pytest.mark.parametrize("shape", [(1, 8), (40, 56), (17, 64)])
@pytest.mark.parametrize("seed", SEEDS)
def test_nm_mask_keeps_n_highest_of_every_m(n: int, m: int, shape: tuple[int, int], seed: int, device: str) -> None:
    scores = _distinct_scores(*shape, seed)
    keep = nm_mask(scores.to(device), n, m).cpu()
    assert keep.shape == shape and keep.dtype == torch.bool
    G, K = scores.view(shape[0], -1, m), keep.view(shape[0], -1, m)
    assert (K.sum(dim=-1) == n).all()
    kept_min = G.masked_fill(~K, float("inf")).amin(dim=-1)
    dropped_max = G.masked_fill(K, float("-inf")).amax(dim=-1)
    assert (kept_min > dropped_max).all()


@pytest.mark.parametrize(("n", "m"), [(2, 4), (3, 8)])
def test_nm_mask_with_ties_is_deterministic_and_exact(n: int, m: int) -> None:
    scores = torch.round(torch.rand(24, 48, generator=_gen(5)) * 3)  # many ties
    keep = nm_mask(scores, n, m)
    assert torch.equal(keep, nm_mask(scores.clone(), n, m))
    K, G = keep.view(24, -1, m), scores.view(24, -1, m)
    assert (K.sum(dim=-1) == n).all()
    assert (G.masked_fill(~K, float("inf")).amin(-1) >= G.masked_fill(K, float("-inf")).amax(-1)).all()


# --------------------------------------------------------------------------- to_blocks / from_blocks / expand


def test_to_blocks_hand_worked() -> None:
    X = torch.arange(1, 10, dtype=torch.float32).view(3, 3)
    expected = torch.tensor([
        [1.0, 2.0, 4.0, 5.0],  # block (0,0), row-major inside the block
        [3.0, 0.0, 6.0, 0.0],  # block (0,1): one real column
        [7.0, 8.0, 0.0, 0.0],  # block (1,0): one real row
        [9.0, 0.0, 0.0, 0.0],  # block (1,1): the corner
    ])
    assert torch.equal(to_blocks(X, 2), expected)
    padded = to_blocks(X, 2, pad_value=-1.0)
    assert torch.equal(padded, torch.where(expected == 0, -1.0, expected))
    assert torch.equal(from_blocks(expected, (3, 3), 2), X)


@pytest.mark.parametrize(("rows", "cols", "bs"), [(32, 32, 16), (40, 56, 16), (20, 20, 16), (5, 3, 16), (21, 13, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bool])
def test_to_from_blocks_round_trip(rows: int, cols: int, bs: int, dtype: torch.dtype, device: str) -> None:
    X = (torch.randperm(rows * cols, generator=_gen(rows + cols)).view(rows, cols) % 7).to(dtype)
    B = to_blocks(X.to(device), bs).cpu()
    nbr, nbc = -(-rows // bs), -(-cols // bs)
    assert B.shape == (nbr * nbc, bs * bs)
    for i, j, rs, cs in _blocks_of(rows, cols, bs):
        blk = B[i * nbc + j].view(bs, bs)
        assert torch.equal(blk[: rs.stop - rs.start, : cs.stop - cs.start], X[rs, cs])
    assert torch.equal(from_blocks(B.to(device), (rows, cols), bs).cpu(), X)


def test_expand_blocks_hand_worked() -> None:
    values = torch.tensor([[1, 2], [3, 4]], dtype=torch.int8)
    expected = torch.tensor([[1, 1, 2], [1, 1, 2], [3, 3, 4]], dtype=torch.int8)
    assert torch.equal(expand_blocks(values, (3, 3), 2), expected)
    assert torch.equal(expand_blocks(values, (4, 4), 2)[2:, 2:], torch.full((2, 2), 4, dtype=torch.int8))


@pytest.mark.parametrize(("rows", "cols", "bs"), [(40, 56, 16), (20, 20, 16), (5, 3, 16), (21, 13, 4)])
def test_expand_blocks_crops_edge_blocks(rows: int, cols: int, bs: int) -> None:
    nbr, nbc = -(-rows // bs), -(-cols // bs)
    values = torch.arange(nbr * nbc).view(nbr, nbc)
    out = expand_blocks(values, (rows, cols), bs)
    assert out.shape == (rows, cols)
    r = torch.arange(rows)[:, None] // bs
    c = torch.arange(cols)[None, :] // bs
    assert torch.equal(out, values[r, c])


# --------------------------------------------------------------------------- block_mask


def test_block_mask_hand_worked() -> None:
    means = torch.tensor([[1.0, 4.0], [3.0, 2.0]])
    scores = means.repeat_interleave(16, 0).repeat_interleave(16, 1)  # 32×32, constant per block
    keep = block_mask(scores, 0.5, 16)  # floor(4·0.5) = 2 blocks: the means 1 and 2
    expected = torch.tensor([[0, 1], [1, 0]], dtype=torch.bool).repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert torch.equal(keep, expected)


def test_block_mask_edge_blocks_ranked_by_mean_not_sum() -> None:
    # 20×20, block 16: block (0,0) has 256 elements of 1.0 (sum 256, mean 1); the 4×4 corner has 16
    # elements of 2.0 (sum 32, mean 2). A sum or a padded mean would drop the corner.
    scores = torch.empty(20, 20)
    scores[:16, :16] = 1.0
    scores[:16, 16:] = 3.0
    scores[16:, :16] = 4.0
    scores[16:, 16:] = 2.0
    keep = block_mask(scores, 0.25, 16)  # floor(4·0.25) = 1 block
    expected = torch.ones(20, 20, dtype=torch.bool)
    expected[:16, :16] = False
    assert torch.equal(keep, expected)
    keep = block_mask(scores, 0.5, 16)  # 2 blocks: mean 1 and the corner (mean 2)
    expected[16:, 16:] = False
    assert torch.equal(keep, expected)
    # An edge block is pruned whole when it is the lowest.
    scores[16:, 16:] = 0.5
    keep = block_mask(scores, 0.25, 16)
    expected = torch.ones(20, 20, dtype=torch.bool)
    expected[16:, 16:] = False
    assert torch.equal(keep, expected)


@pytest.mark.parametrize(("rows", "cols", "bs"), [(64, 64, 16), (40, 56, 16), (20, 20, 16), (33, 17, 8)])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("seed", SEEDS)
def test_block_mask_prunes_lowest_mean_blocks(rows: int, cols: int, bs: int, sparsity: float, seed: int,
                                              device: str) -> None:
    g = _gen(seed)
    scores = torch.rand(rows, cols, generator=g) * torch.exp(torch.randn(cols, generator=g))
    keep = block_mask(scores.to(device), sparsity, bs).cpu()
    n_blocks = -(-rows // bs) * -(-cols // bs)
    kept_means, pruned_means = [], []
    for _, _, rs, cs in _blocks_of(rows, cols, bs):
        blk = keep[rs, cs]
        assert blk.all() or not blk.any(), "a block is pruned whole or not at all"
        (kept_means if blk.all() else pruned_means).append(scores[rs, cs].double().mean().item())
    assert len(pruned_means) == math.floor(n_blocks * sparsity)
    if pruned_means and kept_means:
        assert max(pruned_means) <= min(kept_means)


# --------------------------------------------------------------------------- topk_in_blocks_mask


def test_topk_in_blocks_mask_hand_worked_full_blocks() -> None:
    scores = torch.tensor([
        [9.0, 2.0, 16.0, 4.0],
        [11.0, 6.0, 13.0, 8.0],
        [1.0, 10.0, 3.0, 12.0],
        [5.0, 14.0, 7.0, 15.0],
    ])
    expected = torch.tensor([
        [1, 0, 1, 0],  # block (0,0) {9, 2, 11, 6} keeps 11, 9; block (0,1) {16, 4, 13, 8} keeps 16, 13
        [1, 0, 1, 0],
        [0, 1, 0, 1],  # block (1,0) {1, 10, 5, 14} keeps 14, 10; block (1,1) {3, 12, 7, 15} keeps 15, 12
        [0, 1, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(topk_in_blocks_mask(scores, 2, 2), expected)
    assert topk_in_blocks_mask(scores, 4, 2).all()
    assert not topk_in_blocks_mask(scores, 0, 2).any()


def test_topk_in_blocks_mask_hand_worked_edge_blocks() -> None:
    scores = torch.tensor([
        [1.0, 2.0, 3.0],
        [4.0, 5.0, 6.0],
        [7.0, 8.0, 9.0],
    ])
    # Block 2, k = 2 of 4: full block keeps 2 (5, 4); edge blocks of 2 real keep round(2·2/4) = 1
    # (6 and 8); the corner of 1 real keeps round(0.5) = 0 -> at least 1 (9).
    expected = torch.tensor([[0, 0, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    assert torch.equal(topk_in_blocks_mask(scores, 2, 2), expected)
    # k = 3 of 4: round(1.5) = 2 of 2 real, round(0.75) = 1 of 1 real.
    expected = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(topk_in_blocks_mask(scores, 3, 2), expected)


def test_topk_in_blocks_mask_only_selected_blocks() -> None:
    scores = torch.arange(1, 10, dtype=torch.float32).view(3, 3)
    blocks = torch.tensor([[False, True], [True, False]])
    expected = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=torch.bool)
    assert torch.equal(topk_in_blocks_mask(scores, 2, 2, blocks=blocks), expected)
    assert not topk_in_blocks_mask(scores, 2, 2, blocks=torch.zeros(2, 2, dtype=torch.bool)).any()


def _expected_k(k: int, real: int, bs: int) -> int:
    return max(round(k * real / (bs * bs)), 1 if k else 0)


@pytest.mark.parametrize(("rows", "cols"), [(32, 48), (40, 56), (20, 20), (5, 37)])
@pytest.mark.parametrize("k", [1, 3, 8, 64, 200, 256])
@pytest.mark.parametrize("use_blocks", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_topk_in_blocks_mask_counts_and_order(rows: int, cols: int, k: int, use_blocks: bool, seed: int,
                                              device: str) -> None:
    bs = 16
    scores = _distinct_scores(rows, cols, seed)
    nbr, nbc = -(-rows // bs), -(-cols // bs)
    blocks = torch.rand(nbr, nbc, generator=_gen(seed + 100)) < 0.5 if use_blocks else None
    keep = topk_in_blocks_mask(scores.to(device), k, bs,
                               blocks=None if blocks is None else blocks.to(device)).cpu()
    assert keep.shape == (rows, cols) and keep.dtype == torch.bool
    for i, j, rs, cs in _blocks_of(rows, cols, bs):
        blk_keep, blk_scores = keep[rs, cs], scores[rs, cs]
        if blocks is not None and not blocks[i, j]:
            assert not blk_keep.any(), f"block {(i, j)} not selected but has kept weights"
            continue
        assert int(blk_keep.sum()) == _expected_k(k, blk_scores.numel(), bs), (i, j)
        _assert_highest_kept(blk_scores, blk_keep)


def test_topk_in_blocks_mask_edge_counts_40x56() -> None:
    # Blocks of 256, 128 (8×16 and 16×8) and 64 (8×8) real elements; k = 8 -> 8, 4, 4, 2 kept.
    keep = topk_in_blocks_mask(_distinct_scores(40, 56, 3), 8, 16)
    counts = torch.zeros(3, 4, dtype=torch.int64)
    for i, j, rs, cs in _blocks_of(40, 56, 16):
        counts[i, j] = keep[rs, cs].sum()
    assert torch.equal(counts, torch.tensor([[8, 8, 8, 4], [8, 8, 8, 4], [4, 4, 4, 2]]))
