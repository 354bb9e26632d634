"""Importance scores: Wanda |W|·sqrt(S), Fisher |W|·sqrt(F) and magnitude |W|, and their per-block means.

S is the per-input-feature activation statistic of the reference (locuslab/wanda):
S_j = (1/N)·Σ over all N·L calibration tokens of x_j², N = number of sequences.
F is a per-weight mean squared gradient of the training loss (the diagonal empirical Fisher).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "accumulate_sq_norm_",
    "sum_sq",
    "add_sq_norm_",
    "wanda_scores",
    "fisher_scores",
    "magnitude_scores",
    "block_sums",
    "block_counts",
    "block_mean",
    "masked_block_mean",
]


def accumulate_sq_norm_(S: torch.Tensor, n_seen: int, x: torch.Tensor) -> int:
    """Running S_j = (1/N)·Σ x_j² update in place; S (in,) fp32, x (B, ..., in). Returns the new N.

    N counts sequences (x.shape[0]), not tokens, exactly as the reference's `WrappedGPT.add_batch`;
    the rescale-then-add form keeps S an average at every step, so batches may differ in size.
    """
    return add_sq_norm_(S, n_seen, sum_sq(x), x.shape[0])


def sum_sq(x: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of x_j², fp32; x (..., in) -> (in,). One read of x, no fp32 copy of it."""
    # The reference's form, ‖x_j‖₂² over tokens in fp32; vector_norm upcasts inside its reduction.
    X = x.reshape(-1, x.shape[-1])
    if X.dtype == torch.float64:
        X = X.float()  # vector_norm refuses to narrow; the reference computes in fp32 anyway
    return torch.linalg.vector_norm(X, ord=2, dim=0, dtype=torch.float32).square()


def add_sq_norm_(S: torch.Tensor, n_seen: int, batch_sum_sq: torch.Tensor, batch_size: int) -> int:
    """Fold a batch's Σx² (from sum_sq) over `batch_size` sequences into the running S; returns N."""
    S.mul_(n_seen / (n_seen + batch_size))
    S.add_(batch_sum_sq, alpha=1.0 / (n_seen + batch_size))
    return n_seen + batch_size


def wanda_scores(W: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """|W_ij|·sqrt(S_j); W (out, in), S (in,) -> (out, in) fp32."""
    assert W.shape[-1] == S.shape[0], (W.shape, S.shape)
    return W.abs().float() * S.float().sqrt().unsqueeze(0)


def fisher_scores(W: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """|W_ij|·sqrt(F_ij); W, F (out, in) -> (out, in) fp32.

    The square root of Optimal Brain Damage's saliency ½·F·W² (the loss a removed weight costs under a
    diagonal Fisher), in the same form as Wanda's |W|·sqrt(S): Wanda's S measures what reaches the layer's
    output, F what reaches the loss.
    """
    assert W.shape == F.shape, (W.shape, F.shape)
    return W.abs().float() * F.float().clamp_min(0).sqrt()


def magnitude_scores(W: torch.Tensor) -> torch.Tensor:
    """|W| as fp32; W (out, in) -> (out, in)."""
    return W.abs().float()


def _pad_to_blocks(X: torch.Tensor, block_size: int) -> torch.Tensor:
    rows, cols = X.shape
    if rows % block_size == 0 and cols % block_size == 0:
        return X  # the common case: no copy
    if X.dtype == torch.bool:
        return _pad_to_blocks(X.to(torch.uint8), block_size).bool()
    return F.pad(X, (0, -cols % block_size, 0, -rows % block_size))


def block_sums(X: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sum of each block_size×block_size block; X (out, in) -> (ceil(out/bs), ceil(in/bs)).

    Edge blocks are zero-padded, so their sum covers only their real elements.
    """
    P = _pad_to_blocks(X, block_size)
    nbr, nbc = P.shape[0] // block_size, P.shape[1] // block_size
    return P.reshape(nbr, block_size, nbc, block_size).sum(dim=(1, 3))


def block_counts(shape: tuple[int, int], block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Number of real elements per block (edge blocks are smaller); -> (nbr, nbc) fp32."""
    rows, cols = shape
    r = torch.full(((rows + block_size - 1) // block_size,), float(block_size), device=device)
    c = torch.full(((cols + block_size - 1) // block_size,), float(block_size), device=device)
    if rows % block_size:
        r[-1] = rows % block_size
    if cols % block_size:
        c[-1] = cols % block_size
    return r[:, None] * c[None, :]


def block_mean(scores: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean score per block, edge blocks averaged over their real elements; (out, in) -> (nbr, nbc)."""
    counts = block_counts(tuple(scores.shape), block_size, scores.device)
    return block_sums(scores.float(), block_size) / counts


def masked_block_mean(scores: torch.Tensor, keep: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean score per block over the kept (non-zero) weights only; (out, in) -> (nbr, nbc).

    This is the second demotion phase's re-score: a 2:4 block is judged by what survives in it.
    A block with nothing kept scores 0.
    """
    s = block_sums(torch.where(keep, scores.float(), 0.0), block_size)
    P = _pad_to_blocks(keep, block_size)
    nbr, nbc = P.shape[0] // block_size, P.shape[1] // block_size
    n = P.reshape(nbr, block_size, nbc, block_size).sum(dim=(1, 3), dtype=torch.float32)
    return s / n.clamp_min(1.0)
