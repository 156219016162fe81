"""Server math on the factors (spec sections 2-3): the torch reference.

W^t = sum_i p_i B_i A_i = Bc Ac with Bc = [sqrt(p_i) B_i] (d_out x m r) and
Ac the matching stack of sqrt(p_i) A_i, so the dense d_out x d_in product is
never formed: SVD_r comes from QR of the two thin stacks and an SVD of the
(m r x m r) core, and the pinv projections of eq. 12/13 are products of thin
matrices. Everything here runs in float64: W_r - B A subtracts two nearly
equal matrices, and a float32 dense path loses ~1e-3 relative accuracy there.
"""

from __future__ import annotations

import torch

from ..config import WORK_DTYPE


def projection_rtol(factor_shape: tuple[int, int], stored_dtype: torch.dtype) -> float:
    """Relative singular-value cut-off for rank and pinv of a stored factor.

    The factor is only known to its storage precision, so singular values
    below max(shape) * eps(stored dtype) * sigma_max are noise (the same rule
    as torch.linalg.matrix_rank's default for that dtype).
    """
    return max(factor_shape) * torch.finfo(stored_dtype).eps


def stack_factors(
    b_prev: torch.Tensor,
    a_prev: torch.Tensor,
    client_d_b: list[torch.Tensor | None],
    client_d_a: list[torch.Tensor | None],
    weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bc = [sqrt(p_i) (B + dB_i)], Ac = [sqrt(p_i) (A + dA_i)] (eq. 9), float64.

    A client delta of None is zero. weights are the normalised p_i.
    """
    b64, a64 = b_prev.to(WORK_DTYPE), a_prev.to(WORK_DTYPE)
    roots = weights.to(WORK_DTYPE).sqrt()
    b_blocks, a_blocks = [], []
    for root, d_b, d_a in zip(roots, client_d_b, client_d_a):
        b_i = b64 if d_b is None else b64 + d_b.to(WORK_DTYPE)
        a_i = a64 if d_a is None else a64 + d_a.to(WORK_DTYPE)
        b_blocks.append(root * b_i)
        a_blocks.append(root * a_i)
    return torch.cat(b_blocks, dim=1), torch.cat(a_blocks, dim=0)


def truncated_factors(b_stack: torch.Tensor, a_stack: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L R = SVD_r(b_stack @ a_stack) (eq. 10), L = U_r S_r, R = Vh_r."""
    q_b, r_b = torch.linalg.qr(b_stack)  # d_out x k, k x m r
    q_a, r_a = torch.linalg.qr(a_stack.T)  # d_in x k', k' x m r
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    rank = min(rank, s.numel())
    return q_b @ (u[:, :rank] * s[:rank]), vh[:rank] @ q_a.T


def project_delta(
    left: torch.Tensor,
    right: torch.Tensor,
    b_prev: torch.Tensor,
    a_prev: torch.Tensor,
    move: str,
    rtol: float,
) -> torch.Tensor:
    """The moved factor's delta for dW = left @ right - B A (eq. 11-13), float64.

    move "B": dB = dW pinv(A) = left (right A^+) - B (A A^+)
    move "A": dA = pinv(B) dW = (B^+ left) right - (B^+ B) A
    A A^+ (or B^+ B) is kept rather than replaced by I so a rank-deficient
    factor projects consistently.
    """
    b64, a64 = b_prev.to(WORK_DTYPE), a_prev.to(WORK_DTYPE)
    if move == "B":
        a_pinv = torch.linalg.pinv(a64, rtol=rtol)  # d_in x r
        return left @ (right @ a_pinv) - b64 @ (a64 @ a_pinv)
    if move == "A":
        b_pinv = torch.linalg.pinv(b64, rtol=rtol)  # r x d_out
        return (b_pinv @ left) @ right - (b_pinv @ b64) @ a64
    raise ValueError(f"move must be 'A' or 'B', got {move!r}")


def weighted_mean(deltas: list[torch.Tensor | None], weights: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """sum_i p_i delta_i in float64 (None = zero delta)."""
    total = torch.zeros(shape, dtype=WORK_DTYPE)
    for weight, delta in zip(weights.to(WORK_DTYPE), deltas):
        if delta is not None:
            total += weight * delta.to(WORK_DTYPE)
    return total
