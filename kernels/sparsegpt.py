"""SparseGPT one-shot pruning of one linear layer (Frantar & Alistarh 2023).

Given W (out, in) and the Gram matrix H = 2/N·Σ x xᵀ of the layer's inputs, SparseGPT walks the
input columns left to right; each pruned weight's error is spread onto the not-yet-processed
columns of its row through the upper Cholesky factor of H⁻¹ (the OBS update), so the layer's
output on the calibration inputs changes as little as possible.

Mask selection, per block of `blocksize` input columns, on the weights as updated so far:
  * unstructured, `mask_scope="block"` (default, the reference): the floor(numel·sparsity) lowest
    w²/[H⁻¹]_jj² of the whole column block, all rows together, so rows may end up with different
    sparsity. The reference thresholds with `<=` and so prunes one more entry plus ties; here the
    count is exact.
  * unstructured, `mask_scope="row"`: in every row, the floor(count·sparsity) lowest of the block
    (Wanda's comparison group), for exactly even per-row sparsity.
  * N:M: keep n of every m consecutive input columns; each group is chosen when the sweep reaches
    its first column, i.e. on weights that already absorbed the updates of earlier groups.
  * a mask fixed in advance (`keep=`): nothing is selected; the sweep only zeroes what the mask removes
    and compensates the kept weights (progressive demotion's `--obs-update`: the tier map and the
    Wanda choice inside each block decide what goes, the OBS update how the rest makes up for it).
"""
from __future__ import annotations

import torch

__all__ = ["sparsegpt_prune", "accumulate_hessian"]


def accumulate_hessian(H: torch.Tensor, n_seen: int, x: torch.Tensor) -> int:
    """Running H = 2/N·Σ x xᵀ update in place; H (in, in) fp32, x (B, ..., in). Returns the new N.

    N counts x.shape[0] (sequences for (B, L, in), tokens for a flat (T, in) batch), and the
    rescale-then-add form keeps H an average at every step, so batches may differ in size and
    splitting a batch along dim 0 gives the same H. (The reference counts a 2-D input as one
    sample; counting its rows keeps the split-invariance for 2-D inputs too.)
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square (in, in), got shape {tuple(H.shape)}")
    if H.dtype != torch.float32:
        # In place, so an fp16/bf16 H would silently lose the accumulation's precision.
        raise ValueError(f"H must be float32, got {H.dtype}")
    if x.dim() == 0 or x.shape[-1] != H.shape[0]:
        raise ValueError(f"x's last dim must be in={H.shape[0]}, got x shape {tuple(x.shape)}")
    if n_seen < 0:
        raise ValueError(f"n_seen must be >= 0, got {n_seen}")
    b = x.shape[0] if x.dim() > 1 else 1
    if b == 0:
        return n_seen
    total = n_seen + b
    X = x.reshape(-1, x.shape[-1]).to(device=H.device, dtype=torch.float32)  # (tokens, in)
    H.mul_(n_seen / total)
    H.addmm_(X.T, X, alpha=2.0 / total)
    return total


def _check_args(W: torch.Tensor, H: torch.Tensor, sparsity: float, n: int, m: int,
                blocksize: int, percdamp: float) -> None:
    """Raise ValueError naming the offending values for any bad argument."""
    if W.dim() != 2:
        raise ValueError(f"W must be 2-D (out, in), got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"W must be a float tensor, got {W.dtype}")
    cols = W.shape[1]
    if tuple(H.shape) != (cols, cols):
        raise ValueError(f"H must be (in, in) = ({cols}, {cols}) for W {tuple(W.shape)}, "
                         f"got {tuple(H.shape)}")
    if not H.is_floating_point():
        raise ValueError(f"H must be a float tensor, got {H.dtype}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if n < 0 or m < 0:
        raise ValueError(f"n and m must be >= 0, got n={n}, m={m}")
    if n == 0 and m != 0:
        raise ValueError(f"n=0 selects unstructured pruning and needs m=0, got m={m}")
    if n > 0:
        if n >= m:
            raise ValueError(f"N:M needs 0 < n < m, got n={n}, m={m}")
        if cols % m:
            raise ValueError(f"m={m} must divide the input dim {cols}")
        if blocksize % m:
            # Groups are located by the column index inside a block; a block boundary that cut
            # a group would misalign every later group.
            raise ValueError(f"m={m} must divide blocksize={blocksize}")
    if blocksize <= 0:
        raise ValueError(f"blocksize must be > 0, got {blocksize}")
    if not percdamp >= 0.0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")


def _upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """U upper-triangular with UᵀU = H⁻¹; H (in, in) fp32 symmetric positive definite -> (in, in)."""
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise ValueError(f"dampened H is not positive definite (Cholesky failed at column "
                         f"{info.item()}); use more calibration data or a larger percdamp")
    Hinv = torch.cholesky_inverse(L)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if info.item() != 0:
        raise ValueError(f"H⁻¹ is numerically not positive definite (Cholesky failed at column "
                         f"{info.item()}); use a larger percdamp")
    return U


def _solve_fixed_masks_on(device: torch.device) -> bool:
    """Whether a fixed mask's sweep runs as triangular solves (below) rather than column by column.

    On an H200 the solves took a SmolLM2 linear from 92–250 ms to 7–14 ms, and 7B shapes 4–12× faster
    (column steps are bound by kernel launches there). They do about three times the loop's arithmetic, which
    CPU cores feel: SmolLM2's whole walk took 80 s instead of 58 s on 2 cores.
    """
    return device.type == "cuda"


def _sweep_fixed_mask(W1: torch.Tensor, prune1: torch.Tensor, U: torch.Tensor,
                      rows_per_solve: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The column-by-column OBS sweep of one block, for a mask known in advance, as triangular solves.

    W1 (rows, c) the block's weights, prune1 (rows, c) bool, U (c, c) the block of H⁻¹'s upper Cholesky
    factor; returns (Q1 the block's new weights, Err1 the scaled errors the later columns absorb).
    The sweep's errors obey e_j = s_j·(w_j − Σ_{i<j} e_i U_ij) with s = prune/diag(U), i.e. per row
    e·(I + N·diag(s)) = w∘s for N = U's strictly upper part: one triangular solve per row instead of
    c dependent column steps (the sweep's launch count, not its arithmetic, is its cost).
    """
    rows, count = W1.shape
    s = prune1.to(W1.dtype) / torch.diagonal(U).unsqueeze(0)  # (rows, c)
    N = torch.triu(U, diagonal=1)
    eye = torch.eye(count, dtype=W1.dtype, device=W1.device)
    Err1 = torch.empty_like(W1)
    for r1 in range(0, rows, rows_per_solve):  # bounded memory: rows_per_solve · c² floats at a time
        r2 = min(r1 + rows_per_solve, rows)
        M = eye + N.unsqueeze(0) * s[r1:r2].unsqueeze(1)  # (r, c, c), upper, unit diagonal
        b = (W1[r1:r2] * s[r1:r2]).unsqueeze(1)  # (r, 1, c)
        Err1[r1:r2] = torch.linalg.solve_triangular(M, b, upper=True, left=False, unitriangular=True).squeeze(1)
    updated = W1 - Err1 @ N  # each column after the errors of the columns before it in the block
    return torch.where(prune1, torch.zeros_like(updated), updated), Err1


def _n_prune(count: int, sparsity: float) -> int:
    """floor(count·sparsity), robust to float noise such as 100·0.29 = 28.999999999999996."""
    return int(count * sparsity + 1e-9)  # int() floors: the argument is >= 0


def sparsegpt_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, n: int = 0, m: int = 0,
                    blocksize: int = 128, percdamp: float = 0.01,
                    mask_scope: str = "block", keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune W (out, in) with OBS updates from H (in, in); returns (W_new in W's dtype, keep (out, in) bool).

    n:m > 0 keeps n of every m consecutive input columns (sparsity is then unused); n = m = 0 prunes
    floor(count·sparsity) weights of each row in every column block (count = blocksize, or the
    remainder for the last block). `keep` (out, in) bool fixes the mask instead (sparsity, n, m and
    mask_scope unused). Pruned weights are exactly 0 in W_new; kept weights of dead inputs (H_jj = 0)
    are 0 as well. W and H are not modified.
    """
    _check_args(W, H, sparsity, n, m, blocksize, percdamp)
    if mask_scope not in ("block", "row"):
        raise ValueError(f"mask_scope must be 'block' or 'row', got {mask_scope!r}")
    if keep is not None and (keep.dtype != torch.bool or keep.shape != W.shape):
        raise ValueError(f"keep must be a bool mask of W's shape {tuple(W.shape)}, got {keep.dtype} "
                         f"{tuple(keep.shape)}")
    rows, cols = W.shape
    structured = n > 0 and keep is None

    # fp32 working copies on W's device: the OBS updates accumulate thousands of rank-1 corrections.
    Wf = W.detach().to(dtype=torch.float32, copy=True)
    Hf = H.detach().to(device=W.device, dtype=torch.float32, copy=True)

    # An input that never fired carries no information: its weights can be dropped for free, and a
    # unit diagonal keeps H invertible without coupling that column to any other.
    dead = torch.diagonal(Hf) == 0
    Hf[dead, dead] = 1.0
    Wf[:, dead] = 0.0

    # Dampening relative to the average diagonal makes the Cholesky robust when the calibration set
    # has fewer tokens than inputs (rank-deficient H) and is invariant to the scale of H.
    Hf.diagonal().add_(percdamp * torch.mean(torch.diagonal(Hf)))
    Hinv = _upper_cholesky_of_inverse(Hf)  # row j holds the OBS update direction of column j
    del Hf

    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = Wf[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(Hinv1)  # (count,), > 0 since Hinv is a Cholesky factor
        prune1 = torch.zeros_like(W1, dtype=torch.bool)

        if keep is not None:
            prune1 = ~keep[:, i1:i2].to(W.device)
        elif not structured:
            # OBS saliency w²/[H⁻¹]_jj², with the reference's [H⁻¹]_jj taken from the Cholesky
            # factor. Stable sort: ties (e.g. zeroed dead inputs) go to the lowest index, and the
            # count stays exact whatever the ties.
            score = W1.square() / d1.square().unsqueeze(0)
            if mask_scope == "row":
                k = _n_prune(count, sparsity)
                if k:
                    idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
                    prune1.scatter_(1, idx, True)
            else:
                k = _n_prune(rows * count, sparsity)
                if k:
                    idx = torch.sort(score.flatten(), stable=True).indices[:k]
                    prune1.view(-1)[idx] = True

        if keep is not None and _solve_fixed_masks_on(Wf.device):
            Q1, Err1 = _sweep_fixed_mask(W1, prune1, Hinv1)
            Wf[:, i1:i2] = Q1
            pruned[:, i1:i2] = prune1
            if i2 < cols:
                Wf[:, i2:].sub_(Err1 @ Hinv[i1:i2, i2:])
            continue

        for i in range(count):
            w = W1[:, i]
            if structured and i % m == 0:
                score = W1[:, i:i + m].square() / d1[i:i + m].square().unsqueeze(0)
                idx = torch.sort(score, dim=1, stable=True).indices[:, :m - n]
                prune1[:, i:i + m].scatter_(1, idx, True)  # view: writes through to prune1
            q = torch.where(prune1[:, i], torch.zeros_like(w), w)
            Q1[:, i] = q
            err = (w - q) / d1[i]  # (rows,)
            # Spread this column's error onto the rest of the block; the columns after the block
            # receive all of the block's errors at once below (lazy batch update).
            W1[:, i + 1:].sub_(torch.outer(err, Hinv1[i, i + 1:]))
            Err1[:, i] = err

        Wf[:, i1:i2] = Q1
        pruned[:, i1:i2] = prune1
        if i2 < cols:
            Wf[:, i2:].sub_(Err1 @ Hinv[i1:i2, i2:])

    assert not Wf[pruned].any(), "pruned weights must be exactly zero"
    return Wf.to(W.dtype), ~pruned
