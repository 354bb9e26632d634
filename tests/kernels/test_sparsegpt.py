"""SparseGPT kernel: exact mask counts, OBS update math, reconstruction quality, edge cases."""
from __future__ import annotations

import math

import pytest
import torch

from tierprune.kernels.sparsegpt import accumulate_hessian, sparsegpt_prune

pytestmark = pytest.mark.unit


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated_inputs(n_tok: int, d: int, seed: int = 0) -> torch.Tensor:
    """(n_tok, d) inputs from a low-rank latent plus noise, with uneven feature scales.

    Correlated features are what make the OBS update pay off; uneven scales make Wanda differ
    from magnitude so both baselines are meaningful.
    """
    g = _gen(seed)
    latent = torch.randn(n_tok, d // 4, generator=g) @ torch.randn(d // 4, d, generator=g)
    noise = 0.3 * torch.randn(n_tok, d, generator=g)
    scales = torch.exp(0.7 * torch.randn(d, generator=g))
    return (latent + noise) * scales


def _hessian(X: torch.Tensor) -> torch.Tensor:
    H = torch.zeros(X.shape[-1], X.shape[-1])
    accumulate_hessian(H, 0, X)
    return H


def _recon_err(W: torch.Tensor, W_new: torch.Tensor, X: torch.Tensor) -> float:
    """‖(W − W_new)Xᵀ‖² with X (tokens, in)."""
    return ((W - W_new) @ X.T).square().sum().item()


def _row_keep(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-row baseline keep-mask: drop the int(in·sparsity) lowest scores of each row."""
    k = int(score.shape[1] * sparsity)
    idx = score.argsort(dim=1, stable=True)[:, :k]
    return torch.ones_like(score, dtype=torch.bool).scatter_(1, idx, False)


def _nm_keep(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M baseline keep-mask: keep the n highest scores of every m consecutive inputs."""
    out, d = score.shape
    s = score.view(out, d // m, m)
    idx = s.argsort(dim=-1, stable=True)[..., : m - n]
    return torch.ones_like(s, dtype=torch.bool).scatter_(-1, idx, False).view(out, d)


def _expected_pruned_per_row(d: int, blocksize: int, sparsity: float) -> int:
    """Σ over column blocks of floor(count·sparsity): the documented per-row count."""
    return sum(math.floor((min(i + blocksize, d) - i) * sparsity + 1e-9) for i in range(0, d, blocksize))


# --------------------------------------------------------------------------- exact mask counts


@pytest.mark.parametrize(
    ("d", "blocksize", "sparsity", "expected"),
    [
        (128, 128, 0.5, 64),
        (256, 128, 0.5, 128),
        (128, 32, 0.25, 32),
        (128, 128, 0.3, 38),  # floor(38.4): 0.3 is not exact when blocksize·0.3 is fractional ...
        (128, 32, 0.3, 36),  # ... and the floor is taken per block: 4 · floor(9.6) = 36, not 38
        (120, 40, 0.3, 36),  # blocksize·0.3 = 12 exactly -> exact 0.3
        (100, 64, 0.5, 50),  # ragged last block: floor(32) + floor(18)
        (100, 100, 0.29, 29),  # 100·0.29 = 28.999999999999996 in floats; still 29
        (64, 64, 0.0, 0),
    ],
)
def test_unstructured_exact_per_row_count(d: int, blocksize: int, sparsity: float, expected: int) -> None:
    assert _expected_pruned_per_row(d, blocksize, sparsity) == expected
    X = _correlated_inputs(4 * d, d)
    W = torch.randn(24, d, generator=_gen(1))
    W_new, keep = sparsegpt_prune(W, _hessian(X), sparsity, blocksize=blocksize, mask_scope="row")
    assert keep.dtype == torch.bool and keep.shape == W.shape
    assert torch.equal((~keep).sum(dim=1), torch.full((24,), expected))
    # and per block, not just per row
    for i1 in range(0, d, blocksize):
        i2 = min(i1 + blocksize, d)
        per_block = (~keep[:, i1:i2]).sum(dim=1)
        assert torch.equal(per_block, torch.full((24,), math.floor((i2 - i1) * sparsity + 1e-9)))
    assert torch.all(W_new[~keep] == 0)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_nm_exact_group_counts(n: int, m: int) -> None:
    d = 128
    X = _correlated_inputs(512, d)
    W = torch.randn(32, d, generator=_gen(2))
    W_new, keep = sparsegpt_prune(W, _hessian(X), 0.5, n=n, m=m, blocksize=32, mask_scope="row")
    groups = keep.view(32, d // m, m).sum(dim=-1)
    assert torch.equal(groups, torch.full_like(groups, n))
    assert torch.all(W_new[~keep] == 0)
    # kept weights are (generically) non-zero: the pruned ones are exactly the zeros
    assert torch.equal(W_new != 0, keep)


# --------------------------------------------------------------------------- hand-checkable cases


def test_two_column_obs_update_by_hand() -> None:
    """H = [[1, r], [r, 1]], no dampening, one block, sparsity 0.5 (one of two columns per row).

    Hinv = H⁻¹ = [[1, −r], [−r, 1]]/(1−r²), whose upper Cholesky factor is
    U = [[1/√(1−r²), −r/√(1−r²)], [0, 1]]. Saliency w²/U_jj²: col 0 → w0²(1−r²), col 1 → w1².
    Pruning col 0 moves err = w0·√(1−r²) onto col 1 times U_01: w1 += r·w0 (x0 ≈ r·x1).
    Pruning col 1 has no column to its right to compensate.
    """
    r = 0.8
    H = torch.tensor([[1.0, r], [r, 1.0]])
    W = torch.tensor([
        [2.0, 1.8],  # saliencies 1.44 vs 3.24: col 0 goes although |2.0| > |1.8|
        [1.0, -3.0],  # 0.36 vs 9: col 0 goes; -3 + 0.8·1 = -2.2
        [0.5, 0.1],  # 0.09 vs 0.01: col 1 goes, nothing to update
    ])
    W_new, keep = sparsegpt_prune(W, H, 0.5, blocksize=2, percdamp=0.0, mask_scope="row")
    expected = torch.tensor([[0.0, 3.4], [0.0, -2.2], [0.5, 0.0]])
    torch.testing.assert_close(W_new, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(keep, torch.tensor([[False, True], [False, True], [True, False]]))


@pytest.mark.parametrize("blocksize", [16, 64])
def test_identity_hessian_is_blockwise_magnitude_pruning(blocksize: int) -> None:
    """H = I: U is diagonal, so no error reaches any other column; the mask is the per-row
    magnitude quantile of each column block and W_new == W·mask exactly."""
    d = 64
    W = torch.randn(16, d, generator=_gen(3))
    W_new, keep = sparsegpt_prune(W, torch.eye(d), 0.5, blocksize=blocksize, mask_scope="row")
    ref_keep = torch.cat(
        [_row_keep(W[:, i:i + blocksize].abs(), 0.5) for i in range(0, d, blocksize)], dim=1
    )
    assert torch.equal(keep, ref_keep)
    assert torch.equal(W_new, W * ref_keep)


def _oracle(W: torch.Tensor, H: torch.Tensor, sparsity: float, n: int, m: int, blocksize: int,
            percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unblocked fp64 SparseGPT straight from the paper's definition, no Cholesky trick.

    Column i is pruned by the OBS step on the trailing problem (columns ≥ i free):
    δW[:, i:] = −(w_i / [H_{≥i}⁻¹]_00) · [H_{≥i}⁻¹]_0,: and its saliency is w_i² / [H_{≥i}⁻¹]_00.
    """
    W = W.double().clone()
    H = H.double().clone()
    d = W.shape[1]
    H.diagonal().add_(percdamp * H.diagonal().mean())
    inv_tail = [torch.linalg.inv(H[i:, i:]) for i in range(d)]
    diag = torch.tensor([t[0, 0].item() for t in inv_tail], dtype=torch.float64)
    pruned = torch.zeros(W.shape, dtype=torch.bool)
    for i in range(d):
        if n == 0 and i % blocksize == 0:
            j = min(i + blocksize, d)
            k = math.floor((j - i) * sparsity + 1e-9)
            idx = (W[:, i:j].square() / diag[i:j]).argsort(dim=1, stable=True)[:, :k]
            pruned[:, i:j].scatter_(1, idx, True)
        if n > 0 and i % m == 0:
            idx = (W[:, i:i + m].square() / diag[i:i + m]).argsort(dim=1, stable=True)[:, : m - n]
            pruned[:, i:i + m].scatter_(1, idx, True)
        rows = pruned[:, i]
        coef = W[rows, i] / inv_tail[i][0, 0]
        W[rows, i:] -= coef[:, None] * inv_tail[i][0][None, :]
        W[rows, i] = 0.0
    return W, ~pruned


@pytest.mark.parametrize(("sparsity", "n", "m"), [(0.5, 0, 0), (0.6, 0, 0), (0.0, 2, 4), (0.0, 4, 8)])
def test_matches_unblocked_fp64_oracle(sparsity: float, n: int, m: int) -> None:
    """The Cholesky rows + lazy block updates reproduce the textbook sequential OBS."""
    d = 64
    X = _correlated_inputs(256, d, seed=4)
    W = torch.randn(12, d, generator=_gen(5))
    H = _hessian(X)
    W_new, keep = sparsegpt_prune(W, H, sparsity, n=n, m=m, blocksize=16, percdamp=0.01, mask_scope="row")
    W_ref, keep_ref = _oracle(W, H, sparsity, n, m, blocksize=16, percdamp=0.01)
    assert torch.equal(keep, keep_ref)
    torch.testing.assert_close(W_new.double(), W_ref, rtol=1e-3, atol=1e-4)


def test_nm_result_independent_of_blocksize() -> None:
    """N:M picks each group after all earlier errors arrived, so the lazy batching is invisible."""
    d = 128
    X = _correlated_inputs(512, d, seed=6)
    W = torch.randn(16, d, generator=_gen(7))
    H = _hessian(X)
    W_a, keep_a = sparsegpt_prune(W, H, 0.0, n=2, m=4, blocksize=8, mask_scope="row")
    W_b, keep_b = sparsegpt_prune(W, H, 0.0, n=2, m=4, blocksize=128, mask_scope="row")
    assert torch.equal(keep_a, keep_b)
    torch.testing.assert_close(W_a, W_b, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- quality vs baselines


@pytest.mark.parametrize("blocksize", [32, 128])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_reconstruction_beats_magnitude_and_wanda(pattern: str, blocksize: int) -> None:
    d, out = 128, 64
    X = _correlated_inputs(1024, d, seed=8)
    W = torch.randn(out, d, generator=_gen(9))
    H = _hessian(X)
    x_norm = X.norm(dim=0)
    if pattern == "unstructured":
        W_new, keep = sparsegpt_prune(W, H, 0.5, blocksize=blocksize, mask_scope="row")
        mag, wanda = _row_keep(W.abs(), 0.5), _row_keep(W.abs() * x_norm, 0.5)
    else:
        W_new, keep = sparsegpt_prune(W, H, 0.5, n=2, m=4, blocksize=blocksize, mask_scope="row")
        mag, wanda = _nm_keep(W.abs(), 2, 4), _nm_keep(W.abs() * x_norm, 2, 4)
    assert keep.sum() == mag.sum() == wanda.sum()  # same number of survivors
    err = _recon_err(W, W_new, X)
    err_mag = _recon_err(W, W * mag, X)
    err_wanda = _recon_err(W, W * wanda, X)
    # Observed margins are ≥ 2.5× against Wanda; ask for a clear but not brittle win.
    assert err < 0.6 * err_wanda, (err, err_wanda)
    assert err < 0.6 * err_mag, (err, err_mag)
    # The update itself matters, not just the mask: SparseGPT's mask without the update is worse.
    assert err < _recon_err(W, W * keep, X)


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize(("n", "m"), [(0, 0), (2, 4)])
def test_dead_inputs(n: int, m: int) -> None:
    d = 64
    X = _correlated_inputs(256, d, seed=10)
    dead = torch.tensor([3, 10, 41])
    X[:, dead] = 0.0
    H = _hessian(X)
    assert torch.all(H.diagonal()[dead] == 0)
    W = torch.randn(8, d, generator=_gen(11))
    W_new, keep = sparsegpt_prune(W, H, 0.5, n=n, m=m, blocksize=32, mask_scope="row")
    assert torch.isfinite(W_new).all()
    assert torch.all(W_new[:, dead] == 0)
    # their saliency is 0, the minimum, so dead inputs are spent first from the pruning budget
    assert not keep[:, dead].any()
    if n:
        groups = keep.view(8, d // m, m).sum(dim=-1)
        assert torch.equal(groups, torch.full_like(groups, n))
    else:
        assert torch.equal((~keep).sum(dim=1), torch.full((8,), 32))


def test_all_inputs_dead() -> None:
    W = torch.randn(4, 16, generator=_gen(12))
    W_new, keep = sparsegpt_prune(W, torch.zeros(16, 16), 0.5, mask_scope="row")
    assert torch.equal(W_new, torch.zeros_like(W))
    assert torch.equal((~keep).sum(dim=1), torch.full((4,), 8))


def test_inputs_not_modified() -> None:
    d = 32
    X = _correlated_inputs(128, d, seed=13)
    X[:, 5] = 0.0
    H = _hessian(X)
    W = torch.randn(6, d, generator=_gen(14))
    W0, H0 = W.clone(), H.clone()
    sparsegpt_prune(W, H, 0.5, blocksize=16, mask_scope="row")
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_bf16_weights_compute_in_fp32_and_return_bf16() -> None:
    d = 64
    X = _correlated_inputs(256, d, seed=15)
    H = _hessian(X)
    W = torch.randn(8, d, generator=_gen(16)).to(torch.bfloat16)
    W_new, keep = sparsegpt_prune(W, H, 0.5, blocksize=32, mask_scope="row")
    assert W_new.dtype == torch.bfloat16 and keep.dtype == torch.bool
    assert torch.all(W_new[~keep] == 0)
    # identical to running on the fp32 upcast and rounding once at the end
    W_ref, keep_ref = sparsegpt_prune(W.float(), H, 0.5, blocksize=32, mask_scope="row")
    assert torch.equal(keep, keep_ref)
    assert torch.equal(W_new, W_ref.to(torch.bfloat16))


@pytest.mark.parametrize(
    ("W_shape", "H_shape", "kwargs", "match"),
    [
        ((4, 8), (8, 8), {"sparsity": -0.1}, "sparsity"),
        ((4, 8), (8, 8), {"sparsity": 1.0}, "sparsity"),
        ((4, 10), (10, 10), {"sparsity": 0.5, "n": 2, "m": 4}, "m=4 must divide the input dim 10"),
        ((4, 8), (8, 8), {"sparsity": 0.5, "n": 4, "m": 4}, "n=4, m=4"),
        ((4, 8), (8, 8), {"sparsity": 0.5, "n": 5, "m": 4}, "n=5, m=4"),
        ((4, 8), (8, 8), {"sparsity": 0.5, "n": 2, "m": 0}, "n=2, m=0"),
        ((4, 8), (8, 8), {"sparsity": 0.5, "n": 0, "m": 4}, "m=4"),
        ((4, 8), (8, 8), {"sparsity": 0.5, "n": 2, "m": 8, "blocksize": 4}, "blocksize=4"),
        ((4, 8), (8, 8), {"sparsity": 0.5, "blocksize": 0}, "blocksize"),
        ((4, 8), (8, 8), {"sparsity": 0.5, "percdamp": -0.01}, "percdamp"),
        ((4, 8), (6, 6), {"sparsity": 0.5}, r"\(6, 6\)"),
        ((4, 8), (8, 6), {"sparsity": 0.5}, r"\(8, 6\)"),
        ((8,), (8, 8), {"sparsity": 0.5}, "2-D"),
    ],
)
def test_bad_arguments_raise(W_shape: tuple[int, ...], H_shape: tuple[int, ...], kwargs: dict,
                             match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sparsegpt_prune(torch.randn(W_shape), torch.eye(*H_shape), **kwargs, mask_scope="row")


def test_non_positive_definite_hessian_raises() -> None:
    with pytest.raises(ValueError, match="positive definite"):
        sparsegpt_prune(torch.randn(4, 8), -torch.eye(8), 0.5, mask_scope="row")


# --------------------------------------------------------------------------- Hessian accumulation


def test_accumulate_hessian_halves_equal_full_batch() -> None:
    g = _gen(17)
    x = torch.randn(6, 10, 16, generator=g, dtype=torch.float64).to(torch.bfloat16)
    H_full = torch.zeros(16, 16)
    assert accumulate_hessian(H_full, 0, x) == 6
    H_split = torch.zeros(16, 16)
    n_seen = accumulate_hessian(H_split, 0, x[:3])
    assert accumulate_hessian(H_split, n_seen, x[3:]) == 6
    torch.testing.assert_close(H_split, H_full)
    # and both equal the definition 2/N·Σ x xᵀ over all tokens, N = sequences
    X = x.float().reshape(-1, 16)
    torch.testing.assert_close(H_full, 2.0 / 6 * X.T @ X)


def test_accumulate_hessian_uneven_batches_and_2d_input() -> None:
    g = _gen(18)
    X = torch.randn(50, 8, generator=g)
    H_full = torch.zeros(8, 8)
    accumulate_hessian(H_full, 0, X)
    H_parts = torch.zeros(8, 8)
    n_seen = 0
    for chunk in (X[:7], X[7:30], X[30:]):
        n_seen = accumulate_hessian(H_parts, n_seen, chunk)
    assert n_seen == 50
    torch.testing.assert_close(H_parts, H_full)
    torch.testing.assert_close(H_full, 2.0 / 50 * X.T @ X)
    assert accumulate_hessian(H_parts, n_seen, X[:0]) == 50  # an empty batch is a no-op


def test_accumulate_hessian_bad_arguments() -> None:
    with pytest.raises(ValueError, match="float32"):
        accumulate_hessian(torch.zeros(4, 4, dtype=torch.bfloat16), 0, torch.randn(2, 4))
    with pytest.raises(ValueError, match="in=4"):
        accumulate_hessian(torch.zeros(4, 4), 0, torch.randn(2, 5))
    with pytest.raises(ValueError, match="square"):
        accumulate_hessian(torch.zeros(4, 5), 0, torch.randn(2, 5))


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    d = 128
    X = _correlated_inputs(512, d, seed=19)
    W = torch.randn(32, d, generator=_gen(20))
    H = _hessian(X)
    for kwargs in ({"sparsity": 0.5}, {"sparsity": 0.0, "n": 2, "m": 4}):
        W_cpu, keep_cpu = sparsegpt_prune(W, H, blocksize=32, **kwargs, mask_scope="row")
        # H stays on the CPU on purpose: the kernel moves it to W's device
        W_gpu, keep_gpu = sparsegpt_prune(W.cuda(), H, blocksize=32, **kwargs, mask_scope="row")
        assert W_gpu.device.type == "cuda" and keep_gpu.device.type == "cuda"
        assert torch.equal(keep_gpu.cpu(), keep_cpu)
        torch.testing.assert_close(W_gpu.cpu(), W_cpu, rtol=1e-3, atol=1e-3)


def test_block_scope_prunes_exact_count_per_column_block():
    """The reference's mask scope: one ranking over each whole column block, all rows together."""
    torch.manual_seed(3)
    W = torch.randn(32, 64)
    X = torch.randn(256, 64) @ torch.randn(64, 64)
    W_new, keep = sparsegpt_prune(W, _hessian(X), 0.5, blocksize=16)
    for i1 in range(0, 64, 16):
        assert int((~keep[:, i1:i1 + 16]).sum()) == 32 * 16 // 2
    per_row = (~keep).sum(dim=1)
    assert per_row.min() < per_row.max(), "block scope should let rows differ in sparsity"
    assert not W_new[~keep].any()


def test_block_scope_beats_row_scope_on_reconstruction():
    torch.manual_seed(4)
    W = torch.randn(64, 128) * torch.linspace(0.2, 3.0, 64).unsqueeze(1)  # rows of different scale
    X = torch.randn(512, 128) @ torch.randn(128, 128)
    H = _hessian(X)
    err = {}
    for scope in ("block", "row"):
        W_new, _ = sparsegpt_prune(W, H, 0.5, blocksize=32, mask_scope=scope)
        err[scope] = ((W - W_new) @ X.T).square().sum().item()
    assert err["block"] < err["row"]


# --------------------------------------------------------------------------- a mask fixed in advance


def test_fixed_mask_is_obeyed_and_compensated_by_the_oracles_update() -> None:
    """keep=: the mask given is the mask out, and the kept weights take the textbook OBS update for it."""
    d = 64
    X = _correlated_inputs(256, d, seed=10)
    W = torch.randn(12, d, generator=_gen(11))
    H = _hessian(X)
    # The mask one-shot SparseGPT chooses, given back as a fixed one: the same weights must come out.
    W_chosen, keep = sparsegpt_prune(W, H, 0.5, blocksize=16, mask_scope="row")
    W_fixed, keep_out = sparsegpt_prune(W, H, 0.0, blocksize=16, keep=keep)
    assert torch.equal(keep_out, keep)
    torch.testing.assert_close(W_fixed, W_chosen, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("blocksize", [16, 128])
def test_fixed_mask_update_beats_masking_alone(blocksize: int) -> None:
    """A demotion's mask (Wanda's choice, any pattern): the OBS update only ever lowers the layer's output error."""
    d, out = 128, 48
    X = _correlated_inputs(1024, d, seed=12)
    W = torch.randn(out, d, generator=_gen(13))
    keep = _row_keep(W.abs() * X.norm(dim=0), 0.6)
    keep[:, :32] = True  # some columns untouched, as Dense blocks are
    W_new, keep_out = sparsegpt_prune(W, _hessian(X), 0.0, blocksize=blocksize, keep=keep)
    assert torch.equal(keep_out, keep) and not W_new[~keep].any()
    assert _recon_err(W, W_new, X) < 0.8 * _recon_err(W, W * keep, X)  # observed 0.61 and lower


def test_fixed_mask_with_uncorrelated_inputs_is_plain_masking() -> None:
    """A diagonal Gram matrix couples no inputs: nothing to compensate with, so the update is the mask alone."""
    W = torch.randn(8, 32, generator=_gen(14))
    keep = torch.rand(8, 32, generator=_gen(15)) > 0.5
    H = torch.diag(torch.rand(32, generator=_gen(16)) + 0.5)
    W_new, _ = sparsegpt_prune(W, H, 0.0, keep=keep)
    torch.testing.assert_close(W_new, W * keep)


def test_fixed_mask_of_the_wrong_shape_or_type_is_refused() -> None:
    W, H = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="keep must be a bool mask"):
        sparsegpt_prune(W, H, 0.0, keep=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep must be a bool mask"):
        sparsegpt_prune(W, H, 0.0, keep=torch.ones(4, 8))


def test_fixed_mask_solve_in_row_chunks_equals_one_solve() -> None:
    """The triangular solves run over bounded row chunks; the chunking changes nothing."""
    from tierprune.kernels.sparsegpt import _sweep_fixed_mask, _upper_cholesky_of_inverse

    H = _hessian(_correlated_inputs(256, 32, seed=17))
    H.diagonal().add_(0.01 * H.diagonal().mean())
    U = _upper_cholesky_of_inverse(H)
    W1 = torch.randn(10, 32, generator=_gen(18))
    prune1 = torch.rand(10, 32, generator=_gen(19)) > 0.5
    whole = _sweep_fixed_mask(W1, prune1, U)
    chunked = _sweep_fixed_mask(W1, prune1, U, rows_per_solve=3)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert not whole[0][prune1].any()


def test_fixed_mask_as_triangular_solves_equals_the_column_sweep(monkeypatch) -> None:
    """The GPU's form of the fixed-mask sweep (one triangular solve per row) gives the CPU's column-by-column result."""
    from tierprune.kernels import sparsegpt

    d = 96
    X = _correlated_inputs(512, d, seed=20)
    W = torch.randn(40, d, generator=_gen(21))
    keep = torch.rand(40, d, generator=_gen(22)) > 0.45
    H = _hessian(X)
    by_columns, _ = sparsegpt_prune(W, H, 0.0, blocksize=32, keep=keep)
    monkeypatch.setattr(sparsegpt, "_solve_fixed_masks_on", lambda device: True)
    by_solves, keep_out = sparsegpt_prune(W, H, 0.0, blocksize=32, keep=keep)
    assert torch.equal(keep_out, keep) and not by_solves[~keep].any()
    torch.testing.assert_close(by_solves, by_columns, rtol=1e-5, atol=1e-5)
