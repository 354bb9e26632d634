"""Score kernels: Wanda |W|·sqrt(S), the running activation statistic S, and per-block means."""
from __future__ import annotations

import pytest
import torch

from tierprune.kernels.scores import (
    accumulate_sq_norm_,
    block_mean,
    block_sums,
    magnitude_scores,
    masked_block_mean,
    wanda_scores,
)

pytestmark = pytest.mark.unit

# (out, in, block): full blocks only, edge blocks of 8 (40, 56), and ragged edges in both directions.
BLOCK_SHAPES = [(32, 32, 16), (40, 56, 16), (20, 20, 16), (17, 33, 16), (5, 3, 16), (21, 13, 4)]
SEEDS = [0, 1, 2]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _naive_block_stat(scores: torch.Tensor, block_size: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of each block's real (and, with `keep`, kept) elements by explicit slicing; 0 if none."""
    rows, cols = scores.shape
    nbr, nbc = -(-rows // block_size), -(-cols // block_size)
    out = torch.zeros(nbr, nbc, dtype=torch.float64)
    for i in range(nbr):
        for j in range(nbc):
            blk = scores[i * block_size:(i + 1) * block_size, j * block_size:(j + 1) * block_size].double()
            if keep is not None:
                blk = blk[keep[i * block_size:(i + 1) * block_size, j * block_size:(j + 1) * block_size]]
            out[i, j] = blk.mean() if blk.numel() else 0.0
    return out


# --------------------------------------------------------------------------- wanda / magnitude


def test_wanda_scores_hand_worked() -> None:
    # Weights ±1..16 in a 2×8 matrix; S chosen as perfect squares so sqrt(S) is exact.
    W = torch.arange(1, 17, dtype=torch.float32).view(2, 8) * torch.tensor([1.0, -1.0]).repeat(8).view(2, 8)
    S = torch.tensor([1.0, 4.0, 9.0, 16.0, 0.0, 0.25, 100.0, 1.0])
    expected = torch.tensor([
        [1 * 1, 2 * 2, 3 * 3, 4 * 4, 5 * 0, 6 * 0.5, 7 * 10, 8 * 1],
        [9 * 1, 10 * 2, 11 * 3, 12 * 4, 13 * 0, 14 * 0.5, 15 * 10, 16 * 1],
    ], dtype=torch.float32)
    out = wanda_scores(W, S)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_wanda_scores_low_precision_weights_give_fp32() -> None:
    W = torch.tensor([[-2.0, 3.0], [0.5, -0.25]], dtype=torch.bfloat16)
    S = torch.tensor([4.0, 9.0])
    out = wanda_scores(W, S)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[4.0, 9.0], [1.0, 0.75]]), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (40, 56), (64, 32)])
@pytest.mark.parametrize("seed", SEEDS)
def test_wanda_scores_broadcast_per_input_column(shape: tuple[int, int], seed: int, device: str) -> None:
    g = _gen(seed)
    W = torch.randn(shape, generator=g)
    S = torch.rand(shape[1], generator=g) * 10
    out = wanda_scores(W.to(device), S.to(device)).cpu()
    torch.testing.assert_close(out, W.abs() * S.sqrt().unsqueeze(0))
    # Column j is |W[:, j]| scaled by the single factor sqrt(S_j).
    j = shape[1] // 2
    torch.testing.assert_close(out[:, j], W[:, j].abs() * S[j].sqrt())


def test_magnitude_scores() -> None:
    W = torch.tensor([[-1.5, 0.0, 2.0]], dtype=torch.float16)
    out = magnitude_scores(W)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[1.5, 0.0, 2.0]]), rtol=0, atol=0)


# --------------------------------------------------------------------------- accumulate_sq_norm_


def test_accumulate_sq_norm_hand_worked() -> None:
    S = torch.zeros(2)
    n = accumulate_sq_norm_(S, 0, torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]))  # 1 sequence of 2 tokens
    assert n == 1
    torch.testing.assert_close(S, torch.tensor([1.0 + 9.0, 4.0 + 16.0]))
    n = accumulate_sq_norm_(S, n, torch.tensor([[[1.0, 0.0]], [[3.0, 2.0]]]))  # 2 sequences of 1 token
    assert n == 3
    # Σ over all 4 tokens of x², divided by N = 3 sequences (not 4 tokens).
    torch.testing.assert_close(S, torch.tensor([(1 + 9 + 1 + 9) / 3, (4 + 16 + 0 + 4) / 3]))


@pytest.mark.parametrize(("b1", "b2", "seq", "d"), [(3, 5, 7, 16), (1, 4, 2, 40), (6, 1, 9, 5)])
@pytest.mark.parametrize("seed", SEEDS)
def test_accumulate_sq_norm_two_uneven_batches_equal_one_pass(b1: int, b2: int, seq: int, d: int, seed: int,
                                                               device: str) -> None:
    g = _gen(seed)
    x = torch.randn(b1 + b2, seq, d, generator=g) * torch.exp(torch.randn(d, generator=g))
    x = x.to(device)

    S_two = torch.zeros(d, device=device)
    n = accumulate_sq_norm_(S_two, 0, x[:b1])
    n = accumulate_sq_norm_(S_two, n, x[b1:])
    assert n == b1 + b2

    S_one = torch.zeros(d, device=device)
    assert accumulate_sq_norm_(S_one, 0, x) == b1 + b2

    expected = x.double().square().sum(dim=(0, 1)) / (b1 + b2)
    torch.testing.assert_close(S_two.cpu(), S_one.cpu(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(S_one.double().cpu(), expected.cpu(), rtol=1e-5, atol=1e-6)
    assert S_two.dtype == torch.float32


def test_accumulate_sq_norm_low_precision_inputs_accumulate_in_fp32() -> None:
    x = torch.full((2, 3, 4), 300.0, dtype=torch.float16)  # x² = 90000 overflows fp16 (max 65504)
    S = torch.zeros(4)
    assert accumulate_sq_norm_(S, 0, x) == 2
    torch.testing.assert_close(S, torch.full((4,), 3 * 90000.0))


# --------------------------------------------------------------------------- block_sums / block_mean


def test_block_mean_20x20_edge_blocks_hand_worked() -> None:
    X = torch.arange(400, dtype=torch.float32).view(20, 20)  # X[r, c] = 20r + c
    # mean over a block = 20·mean(rows) + mean(cols); rows 0..15 -> 7.5, 16..19 -> 17.5 (cols alike).
    expected = torch.tensor([
        [20 * 7.5 + 7.5, 20 * 7.5 + 17.5],  # 256 and 64 real elements
        [20 * 17.5 + 7.5, 20 * 17.5 + 17.5],  # 64 and 16 real elements (the corner)
    ])
    torch.testing.assert_close(block_mean(X, 16), expected, rtol=0, atol=0)
    # The corner block holds 16 real elements: its sum is that of X[16:, 16:] only.
    sums = block_sums(X, 16)
    assert sums.shape == (2, 2)
    assert sums[1, 1].item() == X[16:, 16:].sum().item()
    assert sums[0, 1].item() == X[:16, 16:].sum().item()


def test_block_mean_of_ones_is_one_everywhere() -> None:
    # Averaging over the padded 16×16 area would give 64/256 and 16/256 for the edge blocks.
    torch.testing.assert_close(block_mean(torch.ones(20, 20), 16), torch.ones(2, 2), rtol=0, atol=0)
    torch.testing.assert_close(block_mean(torch.ones(40, 56), 16), torch.ones(3, 4), rtol=0, atol=0)


@pytest.mark.parametrize(("rows", "cols", "bs"), BLOCK_SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_block_mean_matches_naive(rows: int, cols: int, bs: int, seed: int, device: str) -> None:
    X = torch.rand(rows, cols, generator=_gen(seed)) * 5
    out = block_mean(X.to(device), bs).cpu()
    assert out.shape == (-(-rows // bs), -(-cols // bs))
    torch.testing.assert_close(out.double(), _naive_block_stat(X, bs), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- masked_block_mean


def test_masked_block_mean_hand_worked() -> None:
    X = torch.arange(1, 17, dtype=torch.float32).view(4, 4)  # 1..16
    keep = torch.tensor([
        [1, 0, 1, 1],
        [0, 1, 1, 1],
        [0, 0, 1, 0],
        [0, 0, 0, 0],
    ], dtype=torch.bool)
    # Block (0,0): kept 1, 6 -> 3.5;  block (0,1): kept 3, 4, 7, 8 -> 5.5;
    # block (1,0): nothing kept -> 0;  block (1,1): kept 11 -> 11.
    expected = torch.tensor([[3.5, 5.5], [0.0, 11.0]])
    torch.testing.assert_close(masked_block_mean(X, keep, 2), expected, rtol=0, atol=0)


def test_masked_block_mean_all_pruned_is_zero_and_all_kept_is_block_mean() -> None:
    X = torch.rand(20, 20, generator=_gen(0)) + 1
    zeros = masked_block_mean(X, torch.zeros(20, 20, dtype=torch.bool), 16)
    torch.testing.assert_close(zeros, torch.zeros(2, 2), rtol=0, atol=0)
    full = masked_block_mean(X, torch.ones(20, 20, dtype=torch.bool), 16)
    torch.testing.assert_close(full, block_mean(X, 16))


@pytest.mark.parametrize(("rows", "cols", "bs"), BLOCK_SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_masked_block_mean_matches_naive(rows: int, cols: int, bs: int, seed: int, device: str) -> None:
    g = _gen(seed)
    X = torch.rand(rows, cols, generator=g) * 5
    keep = torch.rand(rows, cols, generator=g) < 0.4
    if -(-rows // bs) > 1 or -(-cols // bs) > 1:
        keep[:bs, :bs] = False  # at least one block with nothing kept (when there are several)
    out = masked_block_mean(X.to(device), keep.to(device), bs).cpu()
    torch.testing.assert_close(out.double(), _naive_block_stat(X, bs, keep), rtol=1e-5, atol=1e-6)
