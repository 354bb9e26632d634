"""Tiers: the keep-mask of a tier map, tier counts, and the two-phase one-way demotion."""
from __future__ import annotations

import pytest
import torch

from tierprune.kernels.scores import block_mean
from tierprune.kernels.tiers import (
    DENSE,
    NM_2_4,
    TOPK,
    demote_tiers,
    demote_tiers_global,
    demotion_counts,
    dense_tier_map,
    fitting_tier_map,
    target_counts,
    tier_counts,
    tier_keep_mask,
    tier_violations,
)

pytestmark = pytest.mark.unit

SEEDS = [0, 1, 2]
BS = 16
# Weight shapes with full blocks only, with edge blocks of 8, and with ragged edges (cols % 4 == 0 for 2:4).
SHAPES = [(32, 32), (40, 56), (20, 20), (24, 44)]
MULTI_SHAPES = [(40, 56), (32, 32), (64, 16), (24, 44)]  # 12 + 4 + 4 + 6 = 26 blocks


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _nblocks(shape: tuple[int, int], bs: int = BS) -> tuple[int, int]:
    return -(-shape[0] // bs), -(-shape[1] // bs)


def _blocks_of(rows: int, cols: int, bs: int = BS):
    """(i, j, row slice, col slice) for every block, edge blocks cropped."""
    for i in range(-(-rows // bs)):
        for j in range(-(-cols // bs)):
            yield i, j, slice(i * bs, min((i + 1) * bs, rows)), slice(j * bs, min((j + 1) * bs, cols))


def _wanda_like(shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """|W|·sqrt(S)-like scores: positive, continuous (no ties), uneven per input column."""
    return torch.randn(shape, generator=g).abs() * torch.exp(torch.randn(shape[1], generator=g))


def _random_tier_map(shape: tuple[int, int], g: torch.Generator, probs=(0.4, 0.35, 0.25)) -> torch.Tensor:
    nbr, nbc = _nblocks(shape)
    tiers = torch.multinomial(torch.tensor(probs), nbr * nbc, replacement=True, generator=g)
    return tiers.view(nbr, nbc).to(torch.int8)


def _ref_nm_2_4(select: torch.Tensor) -> torch.Tensor:
    """2:4 keep-mask by an explicit sort; defined for scores without ties."""
    rows, cols = select.shape
    G = select.view(rows, cols // 4, 4)
    drop = G.argsort(dim=-1)[..., :2]
    return torch.ones_like(G, dtype=torch.bool).scatter_(-1, drop, False).view(rows, cols)


def _ref_block_means(scores: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-block mean over real (and kept) elements, in float64; 0 where nothing is kept."""
    out = torch.zeros(_nblocks(tuple(scores.shape)), dtype=torch.float64)
    for i, j, rs, cs in _blocks_of(*scores.shape):
        blk = scores[rs, cs].double()
        if keep is not None:
            blk = blk[keep[rs, cs]]
        out[i, j] = blk.mean() if blk.numel() else 0.0
    return out


def _ref_lowest(values: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the `count` lowest candidate values (ties by flat index)."""
    idx = [i for i in sorted(range(values.numel()), key=lambda i: (values.flatten()[i].item(), i))
           if candidates.flatten()[i]]
    chosen = torch.zeros(values.numel(), dtype=torch.bool)
    chosen[idx[:count]] = True
    return chosen.view_as(values)


def _ref_demote_global(scores, maps, to_2_4, to_topk, selects=None, relative=False):
    """The documented two-phase demotion over concatenated block scores, written out plainly."""
    selects = scores if selects is None else selects
    norm = (lambda v: v / v.mean()) if relative else (lambda v: v)
    flat = torch.cat([m.flatten() for m in maps]).clone()
    dense = torch.cat([norm(_ref_block_means(s)).flatten() for s in scores])
    flat[_ref_lowest(dense, flat == DENSE, to_2_4)] = NM_2_4
    nm = torch.cat([norm(_ref_block_means(s, _ref_nm_2_4(sel))).flatten() for s, sel in zip(scores, selects)])
    flat[_ref_lowest(nm, flat == NM_2_4, to_topk)] = TOPK
    return [p.view_as(m) for p, m in zip(flat.split([m.numel() for m in maps]), maps)]


def _valid_counts(tier_map: torch.Tensor, g: torch.Generator) -> tuple[int, int]:
    """Random legal (to_2_4, to_topk) for a map: no more moves than there are blocks to move."""
    c = tier_counts(tier_map).tolist()
    to_2_4 = int(torch.randint(0, c[0] + 1, (1,), generator=g))
    to_topk = int(torch.randint(0, c[1] + to_2_4 + 1, (1,), generator=g))
    return to_2_4, to_topk


def _abc_scores() -> torch.Tensor:
    """16×48: blocks A, B, C (block 16) where the plain mean and the 2:4-kept mean disagree.

    A: every group of 4 is [10, 10, 0, 0] -> plain mean 5, 2:4-kept mean 10.
    B: every weight is 7               -> plain mean 7, 2:4-kept mean 7.
    C: every weight is 20              -> plain mean 20, 2:4-kept mean 20.
    """
    A = torch.tensor([10.0, 10.0, 0.0, 0.0]).repeat(16, 4)
    return torch.cat([A, torch.full((16, 16), 7.0), torch.full((16, 16), 20.0)], dim=1)


# --------------------------------------------------------------------------- maps and the keep-mask


def test_dense_tier_map() -> None:
    m = dense_tier_map((40, 56), 16)
    assert m.shape == (3, 4) and m.dtype == torch.int8 and (m == DENSE).all()
    assert dense_tier_map((32, 32), 16).shape == (2, 2)
    assert dense_tier_map((5, 3), 16).shape == (1, 1)


def test_tier_keep_mask_hand_worked() -> None:
    select = torch.arange(64, dtype=torch.float32).view(8, 8)  # select[r, c] = 8r + c
    tier_map = torch.tensor([[DENSE, NM_2_4], [TOPK, DENSE]], dtype=torch.int8)
    keep = tier_keep_mask(select, tier_map, 4, 4)
    expected = torch.tensor([
        [1, 1, 1, 1, 0, 0, 1, 1],  # Dense | 2:4 keeps the 2 highest of cols 4..7: 6, 7
        [1, 1, 1, 1, 0, 0, 1, 1],
        [1, 1, 1, 1, 0, 0, 1, 1],
        [1, 1, 1, 1, 0, 0, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],  # TopK keeps its 4 highest (row 7: 56..59) | Dense
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(keep, expected)
    assert tier_keep_mask(select, torch.zeros(2, 2, dtype=torch.int8), 4, 4).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("topk", [1, 8, 64])
@pytest.mark.parametrize("seed", SEEDS)
def test_tier_keep_mask_realises_the_map(shape: tuple[int, int], topk: int, seed: int, device: str) -> None:
    g = _gen(seed)
    select = (torch.randperm(shape[0] * shape[1], generator=g) + 1).float().view(shape)  # no ties
    tier_map = _random_tier_map(shape, g)
    keep = tier_keep_mask(select.to(device), tier_map.to(device), BS, topk).cpu()
    assert keep.shape == shape and keep.dtype == torch.bool
    for i, j, rs, cs in _blocks_of(*shape):
        k, s = keep[rs, cs], select[rs, cs]
        tier = int(tier_map[i, j])
        if tier == DENSE:
            assert k.all()
        elif tier == NM_2_4:
            K, G = k.reshape(k.shape[0], -1, 4), s.reshape(s.shape[0], -1, 4)
            assert (K.sum(dim=-1) == 2).all(), (i, j)
            assert (G.masked_fill(~K, float("inf")).amin(-1) > G.masked_fill(K, float("-inf")).amax(-1)).all()
        else:
            expected = max(round(topk * s.numel() / BS**2), 1)
            assert int(k.sum()) == expected, (i, j)
            if 0 < expected < s.numel():
                assert s[k].min() > s[~k].max()


def test_fitting_tier_map_hand_worked() -> None:
    W = torch.randn(20, 36, generator=_gen(0)) + 3  # no zeros: every block Dense to start with
    W[:16, :16] = 0
    W[0, :10] = 1.0  # 10 non-zeros: TopK at k=10, not at k=9 (the first row's groups hold 4: not 2:4 either)
    W[:16, 16:32].view(16, 4, 4)[..., 1:3] = 0  # 2 of every 4 kept: 2:4
    W[3, 18] = 0  # a group with 1 kept is still 2:4
    W[16:, 32:] = 0
    W[16, 32:36] = 1.0  # the 4x4 edge block: 4 non-zeros, TopK
    assert fitting_tier_map(W, BS, 10).tolist() == [[TOPK, NM_2_4, DENSE], [DENSE, DENSE, TOPK]]
    assert fitting_tier_map(W, BS, 9).tolist() == [[DENSE, NM_2_4, DENSE], [DENSE, DENSE, TOPK]]
    W[5, 16:20] = 1.0  # one group of 4 with 4 kept: that block is Dense now
    assert fitting_tier_map(W, BS, 10)[0, 1] == DENSE
    assert fitting_tier_map(W.to(torch.bfloat16), BS, 10).dtype == torch.int8


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_fitting_tier_map_of_a_pruned_weight_is_never_dearer_than_its_own(shape: tuple[int, int], seed: int,
                                                                          device: str) -> None:
    """A weight pruned to a tier map gets back that map, or a cheaper tier where a block happens to hold fewer
    non-zeros; the inferred map always holds the weight exactly."""
    g = _gen(seed)
    tier_map = _random_tier_map(shape, g)
    W = torch.randn(shape, generator=g) * tier_keep_mask(_wanda_like(shape, g), tier_map, BS, 10)
    fitted = fitting_tier_map(W.to(device), BS, 10).cpu()
    assert fitted.shape == tier_map.shape and (fitted >= tier_map).all()
    assert tier_violations(W, fitted, BS, 10) == (0, 0)
    full = torch.tensor([(i, j) for i, j, rs, cs in _blocks_of(*shape) if (rs.stop - rs.start) * (cs.stop - cs.start)
                         == BS * BS])  # full blocks: a TopK block keeps exactly 10, a 2:4 block 128
    assert torch.equal(fitted[full[:, 0], full[:, 1]], tier_map[full[:, 0], full[:, 1]])


# --------------------------------------------------------------------------- counts


def test_tier_counts() -> None:
    m = torch.tensor([[0, 1, 2], [2, 2, 1]], dtype=torch.int8)
    assert tier_counts(m).tolist() == [1, 2, 3]
    assert tier_counts(dense_tier_map((40, 56), 16)).tolist() == [12, 0, 0]


def test_target_counts_hand_worked() -> None:
    assert target_counts(100, (0.35, 0.45, 0.20)) == (35, 45, 20)
    assert target_counts(7, (0.35, 0.45, 0.20)) == (2, 4, 1)  # round(2.45) = 2, round(1.4) = 1, remainder 4
    assert target_counts(26, (0.35, 0.45, 0.20)) == (9, 12, 5)  # round(9.1), round(5.2)
    assert target_counts(9, (1 / 3, 1 / 3, 1 / 3)) == (3, 3, 3)
    assert target_counts(10, (0.0, 1.0, 0.0)) == (0, 10, 0)
    assert target_counts(10, (1.0, 0.0, 0.0)) == (10, 0, 0)
    assert target_counts(8, (0.26, 0.48, 0.26)) == (2, 4, 2)  # 2.08 -> 2 twice; 2:4 takes 4


@pytest.mark.parametrize("fractions", [
    (0.35, 0.45, 0.20), (0.5, 0.25, 0.25), (0.5, 0.0, 0.5), (0.3, 0.0, 0.7), (0.45, 0.1, 0.45), (0.0, 0.5, 0.5),
])
def test_target_counts_are_a_valid_split_for_every_size(fractions: tuple[float, float, float]) -> None:
    # Fractions like these pass PruneConfig's validation (each in [0, 1], sum 1).
    for n in range(1, 60):
        counts = target_counts(n, fractions)
        assert sum(counts) == n, (n, counts)
        assert all(c >= 0 for c in counts), f"n_blocks={n}, fractions={fractions} -> {counts}"
        assert counts[0] == round(fractions[0] * n)
        assert all(abs(c - f * n) <= 1 for c, f in zip(counts, fractions)), (n, counts)


def test_demotion_counts() -> None:
    assert demotion_counts((10, 0, 0), (3, 5, 2)) == (7, 2)
    assert demotion_counts(torch.tensor([3, 5, 2]), (3, 5, 2)) == (0, 0)
    assert demotion_counts(tier_counts(torch.tensor([[0, 1], [1, 2]], dtype=torch.int8)), (0, 2, 2)) == (1, 1)
    with pytest.raises(ValueError):
        demotion_counts((3, 5, 2), (5, 3, 2))  # 2:4 -> Dense
    with pytest.raises(ValueError):
        demotion_counts((3, 5, 2), (3, 6, 1))  # TopK -> 2:4
    with pytest.raises(ValueError):
        demotion_counts((2, 4, 4), (4, 4, 2))  # TopK -> Dense


@pytest.mark.parametrize("seed", SEEDS)
def test_demotion_counts_reach_the_target(seed: int) -> None:
    g = _gen(seed)
    shape = (40, 56)
    scores = _wanda_like(shape, g)
    tier_map = _random_tier_map(shape, g, probs=(0.6, 0.3, 0.1))
    cur = tier_counts(tier_map).tolist()
    target = (cur[0] - 2, cur[1] + 1, cur[2] + 1)
    new = demote_tiers(scores, tier_map, *demotion_counts(tier_map.flatten().bincount(minlength=3), target), BS)
    assert tuple(tier_counts(new).tolist()) == target


# --------------------------------------------------------------------------- demote_tiers, hand-worked


def test_demote_tiers_phase1_lowest_mean_dense_blocks() -> None:
    means = torch.tensor([[5.0, 1.0, 6.0], [2.0, 4.0, 3.0]])
    scores = means.repeat_interleave(16, 0).repeat_interleave(16, 1)  # 32×48
    start = dense_tier_map((32, 48), 16)
    new = demote_tiers(scores, start, 2, 0, 16)
    assert new.dtype == torch.int8
    assert new.tolist() == [[0, 1, 0], [1, 0, 0]]
    new = demote_tiers(scores, start, 3, 0, 16)
    assert new.tolist() == [[0, 1, 0], [1, 0, 1]]
    # Phase 2 on constant blocks: the kept-weights mean equals the block value; the 1-block goes.
    new = demote_tiers(scores, start, 3, 1, 16)
    assert new.tolist() == [[0, 2, 0], [1, 0, 1]]
    assert (start == DENSE).all(), "the input map must not be modified"


def test_demote_tiers_phase1_edge_blocks_by_mean() -> None:
    # 20×20: the 4×4 corner has the lowest sum (16·2 = 32) but block (0,0) the lowest mean (1).
    scores = torch.empty(20, 20)
    scores[:16, :16], scores[:16, 16:], scores[16:, :16], scores[16:, 16:] = 1.0, 3.0, 4.0, 2.0
    assert demote_tiers(scores, dense_tier_map((20, 20), 16), 1, 0, 16).tolist() == [[1, 0], [0, 0]]
    assert demote_tiers(scores, dense_tier_map((20, 20), 16), 2, 0, 16).tolist() == [[1, 0], [0, 1]]


def test_demote_tiers_phase2_rescores_on_2_4_kept_weights_only() -> None:
    scores = _abc_scores()
    plain = block_mean(scores, 16)
    assert plain[0, 0] < plain[0, 1], "plain means rank A below B"
    # Already 2:4: A and B. A plain-mean ranking would demote A; the kept-weights one demotes B.
    new = demote_tiers(scores, torch.tensor([[NM_2_4, NM_2_4, DENSE]], dtype=torch.int8), 0, 1, 16)
    assert new.tolist() == [[NM_2_4, TOPK, DENSE]]
    # From all-Dense: phase 1 moves A and B (plain means 5 and 7) to 2:4, phase 2 then picks B.
    new = demote_tiers(scores, dense_tier_map((16, 48), 16), 2, 1, 16)
    assert new.tolist() == [[NM_2_4, TOPK, DENSE]]


def test_demote_tiers_select_changes_the_2_4_survivors() -> None:
    scores = _abc_scores()
    select = scores.clone()
    select[:, :16] = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(16, 4)  # A keeps its zero-score weights
    start = torch.tensor([[NM_2_4, NM_2_4, DENSE]], dtype=torch.int8)
    assert demote_tiers(scores, start, 0, 1, 16).tolist() == [[NM_2_4, TOPK, DENSE]]
    # Re-scored on what `select` keeps, A's kept mean is 0 < 7: A goes to TopK instead of B.
    assert demote_tiers(scores, start, 0, 1, 16, select=select).tolist() == [[TOPK, NM_2_4, DENSE]]
    # Phase 1 still ranks on `scores`, not on `select`.
    assert demote_tiers(scores, dense_tier_map((16, 48), 16), 1, 0, 16, select=select).tolist() \
        == [[NM_2_4, DENSE, DENSE]]


def test_demote_tiers_never_moves_up() -> None:
    # Existing TopK and 2:4 blocks carry the LOWEST scores, so a ranking over all blocks (instead of
    # over the tier's own blocks) would pick them: TopK would move up to 2:4 in phase 1, or be
    # counted again as a phase-2 demotion.
    means = torch.tensor([[0.1, 10.0, 0.3], [20.0, 0.2, 30.0]])
    scores = means.repeat_interleave(16, 0).repeat_interleave(16, 1)
    start = torch.tensor([[TOPK, DENSE, NM_2_4], [DENSE, TOPK, DENSE]], dtype=torch.int8)
    new = demote_tiers(scores, start, 1, 1, 16)
    # Phase 1: of the Dense {10, 20, 30}, the 10-block -> 2:4. Phase 2: of the 2:4 {0.3, 10}, 0.3 -> TopK.
    assert new.tolist() == [[TOPK, NM_2_4, TOPK], [DENSE, TOPK, DENSE]]
    assert demote_tiers(scores, start, 2, 0, 16).tolist() == [[TOPK, NM_2_4, NM_2_4], [NM_2_4, TOPK, DENSE]]
    assert start.tolist() == [[TOPK, DENSE, NM_2_4], [DENSE, TOPK, DENSE]], "the input map must not be modified"


# --------------------------------------------------------------------------- demote_tiers, randomized


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mixed_start", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_demote_tiers_matches_reference(shape: tuple[int, int], mixed_start: bool, seed: int, device: str) -> None:
    g = _gen(seed)
    scores = _wanda_like(shape, g)
    select = _wanda_like(shape, g)
    start = _random_tier_map(shape, g) if mixed_start else dense_tier_map(shape, BS)
    to_2_4, to_topk = _valid_counts(start, g)
    for sel in (None, select):
        new = demote_tiers(scores.to(device), start.to(device), to_2_4, to_topk, BS,
                           select=None if sel is None else sel.to(device)).cpu()
        assert new.dtype == torch.int8 and new.shape == start.shape
        c = tier_counts(start).tolist()
        assert tier_counts(new).tolist() == [c[0] - to_2_4, c[1] + to_2_4 - to_topk, c[2] + to_topk]
        assert (new >= start).all(), "tiers only move down"
        assert (new[start == TOPK] == TOPK).all()
        [expected] = _ref_demote_global([scores], [start], to_2_4, to_topk, None if sel is None else [sel])
        assert torch.equal(new, expected)


@pytest.mark.parametrize("seed", SEEDS)
def test_demote_tiers_is_deterministic(seed: int) -> None:
    g = _gen(seed)
    # Coarse scores so that block means tie: the tie-break must still be the same every time.
    scores = torch.round(torch.rand(40, 56, generator=g) * 2)
    scores[:, :16] = 1.0
    scores[:16, :] = 1.0
    start = _random_tier_map((40, 56), g)
    to_2_4, to_topk = _valid_counts(start, g)
    a = demote_tiers(scores, start, to_2_4, to_topk, BS)
    b = demote_tiers(scores.clone(), start.clone(), to_2_4, to_topk, BS)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- demote_tiers_global


def _multi(seed: int, scales=(1.0, 1.0, 1.0, 1.0)):
    g = _gen(seed)
    return [_wanda_like(s, g) * f for s, f in zip(MULTI_SHAPES, scales)], g


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("seed", SEEDS)
def test_demote_tiers_global_exact_global_counts(relative: bool, seed: int) -> None:
    # Matrices of very different score scales and spreads, so per-matrix fractions must differ.
    scores, g = _multi(seed, scales=(0.01, 1.0, 100.0, 1.0))
    scores[3] = scores[3] ** 3  # heavy-tailed: a few big blocks, many small ones relative to the mean
    maps = [dense_tier_map(s.shape, BS) for s in scores]
    total = sum(m.numel() for m in maps)
    assert total == 26
    n_dense, n_nm, n_topk = target_counts(total, (0.35, 0.45, 0.20))
    new = demote_tiers_global(scores, maps, total - n_dense, n_topk, BS, relative=relative)
    assert [m.shape for m in new] == [m.shape for m in maps]
    assert all(m.dtype == torch.int8 for m in new)
    assert sum(tier_counts(m) for m in new).tolist() == [n_dense, n_nm, n_topk]
    assert all((m == DENSE).all() for m in maps), "the input maps must not be modified"
    dense_fractions = {round(float((m == DENSE).float().mean()), 6) for m in new}
    assert len(dense_fractions) > 1, "per-matrix fractions should differ under a global budget"


@pytest.mark.parametrize("mixed_start", [False, True])
@pytest.mark.parametrize("with_selects", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_demote_tiers_global_raw_equals_concatenated_ranking(mixed_start: bool, with_selects: bool,
                                                            seed: int) -> None:
    scores, g = _multi(seed, scales=(0.5, 1.0, 2.0, 1.0))
    selects = [_wanda_like(tuple(s.shape), g) for s in scores] if with_selects else None
    maps = [_random_tier_map(tuple(s.shape), g) if mixed_start else dense_tier_map(s.shape, BS) for s in scores]
    cat = torch.cat([m.flatten() for m in maps])
    to_2_4, to_topk = _valid_counts(cat, g)
    new = demote_tiers_global(scores, maps, to_2_4, to_topk, BS, selects=selects, relative=False)
    expected = _ref_demote_global(scores, maps, to_2_4, to_topk, selects, relative=False)
    for n, e, m in zip(new, expected, maps):
        assert torch.equal(n, e)
        assert (n >= m).all() and (n[m == TOPK] == TOPK).all()
    c = tier_counts(cat).tolist()
    assert sum(tier_counts(n) for n in new).tolist() == [c[0] - to_2_4, c[1] + to_2_4 - to_topk, c[2] + to_topk]


@pytest.mark.parametrize("seed", SEEDS)
def test_demote_tiers_global_relative_phase1_ranks_on_matrix_normalised_means(seed: int) -> None:
    scores, g = _multi(seed, scales=(0.01, 1.0, 100.0, 1.0))
    maps = [dense_tier_map(s.shape, BS) for s in scores]
    new = demote_tiers_global(scores, maps, 13, 0, BS, relative=True)
    expected = _ref_demote_global(scores, maps, 13, 0, relative=True)
    for n, e in zip(new, expected):
        assert torch.equal(n, e)


def test_demote_tiers_global_single_matrix_equals_demote_tiers() -> None:
    g = _gen(7)
    scores, select = _wanda_like((40, 56), g), _wanda_like((40, 56), g)
    start = _random_tier_map((40, 56), g)
    to_2_4, to_topk = _valid_counts(start, g)
    [new] = demote_tiers_global([scores], [start], to_2_4, to_topk, BS, selects=[select], relative=False)
    assert torch.equal(new, demote_tiers(scores, start, to_2_4, to_topk, BS, select=select))


@pytest.mark.parametrize("mixed_start", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_demote_tiers_global_relative_is_scale_invariant(mixed_start: bool, seed: int, device: str) -> None:
    wanda, g = _multi(seed)
    # Narrow uniform scores, matrix 1 ten times smaller: unnormalised, its blocks rank lowest of all.
    uniform = [torch.rand(s, generator=g) * (0.1 if i == 1 else 1.0) for i, s in enumerate(MULTI_SHAPES)]
    maps = [_random_tier_map(s, g, probs=(0.8, 0.15, 0.05)) if mixed_start else dense_tier_map(s, BS)
            for s in MULTI_SHAPES]
    maps[1][0, 0] = DENSE
    cat = torch.cat([m.flatten() for m in maps])
    to_2_4 = int((cat == DENSE).sum()) // 2
    to_topk = (int((cat == NM_2_4).sum()) + to_2_4) // 2

    def run(ss, relative, scale=1.0):
        ss = [s * scale if i == 1 else s for i, s in enumerate(ss)]  # scale matrix 1 only
        return [m.cpu() for m in demote_tiers_global([s.to(device) for s in ss], [m.to(device) for m in maps],
                                                     to_2_4, to_topk, BS, relative=relative)]

    for scores in (wanda, uniform):
        for a, b in zip(run(scores, True), run(scores, True, scale=1000.0)):
            assert torch.equal(a, b)
    raw, raw_scaled = run(uniform, False), run(uniform, False, scale=1000.0)
    assert not (raw[1] == DENSE).any(), "unscaled, matrix 1's Dense blocks are demoted first"
    assert torch.equal(raw_scaled[1] == DENSE, maps[1] == DENSE), "scaled by 1000, they outrank all others"
    assert any(not torch.equal(a, b) for a, b in zip(raw, raw_scaled))


@pytest.mark.parametrize("relative", [True, False])
def test_demote_tiers_global_is_deterministic(relative: bool) -> None:
    scores, g = _multi(3)
    maps = [_random_tier_map(tuple(s.shape), g) for s in scores]
    cat = torch.cat([m.flatten() for m in maps])
    to_2_4, to_topk = _valid_counts(cat, g)
    a = demote_tiers_global(scores, maps, to_2_4, to_topk, BS, relative=relative)
    b = demote_tiers_global([s.clone() for s in scores], [m.clone() for m in maps], to_2_4, to_topk, BS,
                            relative=relative)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("relative", [True, False])
def test_demote_tiers_global_selects_change_the_2_4_survivors(relative: bool) -> None:
    abc = _abc_scores()
    other = torch.full((16, 32), 50.0)  # a second matrix whose blocks never get demoted
    select = abc.clone()
    select[:, :16] = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(16, 4)
    maps = [torch.tensor([[NM_2_4, NM_2_4, DENSE]], dtype=torch.int8), dense_tier_map((16, 32), 16)]
    new = demote_tiers_global([abc, other], maps, 0, 1, 16, relative=relative)
    assert [m.tolist() for m in new] == [[[NM_2_4, TOPK, DENSE]], [[DENSE, DENSE]]]
    new = demote_tiers_global([abc, other], maps, 0, 1, 16, selects=[select, other], relative=relative)
    assert [m.tolist() for m in new] == [[[TOPK, NM_2_4, DENSE]], [[DENSE, DENSE]]]
