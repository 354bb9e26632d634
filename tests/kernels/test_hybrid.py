"""The hybrid packed format: exact round trip, refusal of weights that break their tier map, bytes, matmul."""
from __future__ import annotations

import pytest
import torch

from tierprune.kernels.hybrid import (
    HybridWeight,
    hybrid_matmul,
    hybrid_matmul_ref,
    ideal_nbytes,
    pack_hybrid,
)
from tierprune.kernels.tiers import DENSE, NM_2_4, TOPK, tier_keep_mask

pytestmark = pytest.mark.unit

BS, K = 16, 10
# Full blocks, edge blocks on both sides, a 2:4-compatible ragged width (cols % 4 == 0).
SHAPES = [(64, 96), (40, 56), (20, 20), (24, 44), (16, 4)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_tier_map(shape: tuple[int, int], g: torch.Generator, probs=(0.35, 0.45, 0.20)) -> torch.Tensor:
    nbr, nbc = -(-shape[0] // BS), -(-shape[1] // BS)
    tiers = torch.multinomial(torch.tensor(probs), nbr * nbc, replacement=True, generator=g)
    return tiers.view(nbr, nbc).to(torch.int8)


def pruned_weight(shape: tuple[int, int], tier_map: torch.Tensor, g: torch.Generator,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A random weight with the tier keep-mask applied (survivors chosen by |w|)."""
    W = torch.randn(shape, generator=g).to(dtype)
    return W * tier_keep_mask(W.float().abs(), tier_map, BS, K)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_is_exact(shape, dtype, seed, device) -> None:
    g = _gen(seed)
    tier_map = random_tier_map(shape, g)
    W = pruned_weight(shape, tier_map, g, dtype).to(device)
    hw = pack_hybrid(W, tier_map.to(device))
    back = hw.to_dense()
    assert back.dtype == dtype and back.shape == W.shape and back.device == W.device
    assert torch.equal(back, W)
    counts = torch.bincount(tier_map.flatten().long(), minlength=3).tolist()
    assert list(hw.tier_counts()) == counts


def test_layout_is_tier_contiguous_per_block_row() -> None:
    tier_map = torch.tensor([[TOPK, DENSE, NM_2_4, DENSE],
                             [NM_2_4, NM_2_4, TOPK, DENSE]], dtype=torch.int8)
    g = _gen(3)
    W = pruned_weight((32, 64), tier_map, g)
    hw = pack_hybrid(W, tier_map)
    assert hw.dense_row_ptr.tolist() == [0, 2, 3] and hw.dense_cols.tolist() == [1, 3, 3]
    assert hw.nm_row_ptr.tolist() == [0, 1, 3] and hw.nm_cols.tolist() == [2, 0, 1]
    assert hw.topk_row_ptr.tolist() == [0, 1, 2] and hw.topk_cols.tolist() == [0, 2]
    # Dense block (row 0, col 3) is stored verbatim; TopK entries are the block's non-zeros.
    assert torch.equal(hw.dense_values[1], W[:16, 48:64])
    block = W[16:32, 32:48].flatten()
    assert torch.equal(hw.topk_pos[1].long(), torch.nonzero(block).flatten())
    assert torch.equal(hw.topk_values[1], block[block != 0])


def test_nm_metadata_hand_worked() -> None:
    # Row 0 of the only block: groups keep positions (1, 3), (0, 2), (2, 3), (0, 1).
    W = torch.zeros(16, 16)
    W[0, [1, 3, 4, 6, 10, 11, 12, 13]] = torch.arange(1.0, 9.0)
    hw = pack_hybrid(W, torch.tensor([[NM_2_4]], dtype=torch.int8))
    assert hw.nm_values[0, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    # Positions 1,3,0,2 -> 0b10_00_11_01 = 0x8D; 2,3,0,1 -> 0b01_00_11_10 = 0x4E.
    assert hw.nm_meta[0, 0].tolist() == [0x8D, 0x4E]
    assert torch.equal(hw.to_dense(), W)


def test_gpt2_conv1d_weight_through_weight_view() -> None:
    from transformers.pytorch_utils import Conv1D

    from tierprune.adapters import weight_view

    conv = Conv1D(nf=48, nx=40)  # weight stored (in=40, out=48)
    g = _gen(4)
    tier_map = random_tier_map((48, 40), g)
    with torch.no_grad():
        conv.weight.normal_(generator=g)
        W = weight_view(conv)  # (48, 40) view
        W.mul_(tier_keep_mask(W.abs(), tier_map, BS, K))
    hw = pack_hybrid(weight_view(conv), tier_map)
    assert hw.shape == (48, 40)
    assert torch.equal(hw.to_dense(), conv.weight.t())
    x = torch.randn(3, 40, generator=g)
    torch.testing.assert_close(hybrid_matmul(x, hw), conv(x) - conv.bias)


def test_refuses_a_weight_that_breaks_2_4() -> None:
    tier_map = torch.tensor([[DENSE, NM_2_4]], dtype=torch.int8)
    W = pruned_weight((16, 32), tier_map, _gen(5))
    W[7, 16:19] = 1.0  # three non-zeros in one group of block (0, 1)
    with pytest.raises(ValueError, match=r"2:4 block \(row 0, col 1\)"):
        pack_hybrid(W, tier_map)


def test_refuses_a_topk_block_with_too_many_non_zeros() -> None:
    tier_map = torch.tensor([[DENSE], [TOPK]], dtype=torch.int8)
    W = pruned_weight((32, 16), tier_map, _gen(6))
    W[16:32, 0] = 1.0  # 16 non-zeros in block (1, 0)
    with pytest.raises(ValueError, match=r"TopK block \(row 1, col 0\).*more than 10"):
        pack_hybrid(W, tier_map)


def test_an_unpruned_dense_weight_is_refused_for_any_pruned_tier() -> None:
    W = torch.randn(16, 32, generator=_gen(7))
    with pytest.raises(ValueError, match="breaks its tier map"):
        pack_hybrid(W, torch.tensor([[DENSE, TOPK]], dtype=torch.int8))


@pytest.mark.parametrize("bad", [
    dict(tier_map=torch.zeros(2, 2, dtype=torch.int8)),  # wrong shape for (16, 32)
    dict(tier_map=torch.full((1, 2), 3, dtype=torch.int8)),  # unknown tier
    dict(block_size=4),
    dict(topk=0),
])
def test_bad_arguments_raise(bad) -> None:
    args = dict(tier_map=torch.zeros(1, 2, dtype=torch.int8), block_size=16, topk=10) | bad
    with pytest.raises(ValueError):
        pack_hybrid(torch.zeros(16, 32), args.pop("tier_map"), **args)


def test_fewer_non_zeros_than_slots_still_round_trip() -> None:
    # All-zero 2:4 and TopK blocks (a fully pruned corner) store zeros at distinct positions.
    tier_map = torch.tensor([[NM_2_4, TOPK]], dtype=torch.int8)
    W = torch.zeros(16, 32)
    W[3, 20] = 2.5
    hw = pack_hybrid(W, tier_map)
    assert torch.equal(hw.to_dense(), W)
    assert len(set(hw.topk_pos[0].tolist())) == K


@pytest.mark.parametrize("mix", [(0.90, 0.10, 0.0), (0.35, 0.45, 0.20), (0.0, 0.0, 1.0)])
def test_nbytes_within_5_percent_of_ideal(mix) -> None:
    shape = (256, 512)
    g = _gen(8)
    tier_map = random_tier_map(shape, g, probs=tuple(p + 1e-9 for p in mix))
    hw = pack_hybrid(pruned_weight(shape, tier_map, g), tier_map)
    counts = hw.tier_counts()
    ideal = ideal_nbytes(counts)
    assert ideal == counts[0] * 512 + counts[1] * 288 + counts[2] * 30
    n_blocks, nbr = sum(counts), tier_map.shape[0]
    index_bytes = 2 * n_blocks + 3 * 4 * (nbr + 1)  # int16 column per block, three int32 row pointers
    assert hw.nbytes == ideal + index_bytes
    assert hw.nbytes <= 1.05 * ideal + 4 * n_blocks


def test_35_45_20_is_about_0_62_of_dense() -> None:
    ratio = ideal_nbytes((35, 45, 20)) / ideal_nbytes((100, 0, 0))
    assert abs(ratio - 0.62) < 0.01, ratio


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 96), (40, 52)])
def test_hybrid_matmul_matches_the_dense_product(shape, dtype, device) -> None:
    g = _gen(9)
    tier_map = random_tier_map(shape, g)
    W = pruned_weight(shape, tier_map, g, dtype)
    x = torch.randn(2, 3, shape[1], generator=g).to(dtype)
    hw = pack_hybrid(W, tier_map).to(device)
    expected = (x.double() @ W.double().T).to(device)
    for got in (hybrid_matmul(x.to(device), hw), hybrid_matmul_ref(x.to(device), hw)):
        assert got.shape == (2, 3, shape[0]) and got.dtype == dtype
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_hybrid_matmul_rejects_a_wrong_width() -> None:
    hw = pack_hybrid(torch.zeros(16, 32), torch.zeros(1, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="32"):
        hybrid_matmul(torch.zeros(2, 31), hw)


def test_to_moves_every_buffer() -> None:
    hw = pack_hybrid(torch.zeros(16, 32), torch.zeros(1, 2, dtype=torch.int8))
    moved = hw.to("cpu")
    assert isinstance(moved, HybridWeight) and moved.shape == hw.shape and moved.topk == hw.topk
