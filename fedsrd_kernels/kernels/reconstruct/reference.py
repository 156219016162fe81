"""Stacked client factors from sparse uploads (spec eq. 9): the torch reference.

The server multiplies W = sum_i p_i B_i A_i = Bc Ac without forming it, with
    Bc = [sqrt(p_1) B_1, ..., sqrt(p_m) B_m]        (d_out x m r, client blocks side by side)
    Ac = [sqrt(p_1) A_1; ...; sqrt(p_m) A_m]        (m r x d_in, client blocks stacked)
and B_i = B + dB_i, A_i = A + dA_i rebuilt from each client's SparseTensor.
With ``include_base=False`` the blocks hold sqrt(p_i) dB_i (resp. dA_i) alone:
the delta form, whose products carry no cancellation against B A.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...updates import SparseTensor


def scatter_delta(out: torch.Tensor, sparse: SparseTensor, weight: float) -> None:
    """out += weight * dense(sparse), in out's dtype (out is one contiguous block)."""
    flat = out.view(-1)
    values = sparse.values.to(out.dtype) * (sparse.scale * weight)
    if sparse.indices is None:
        flat += values
    else:
        flat.index_add_(0, sparse.indices.to(out.device), values)


def stack_client_factors(
    base: torch.Tensor,
    updates: Sequence[SparseTensor | None],
    root_weights: Sequence[float],
    *,
    factor: str,
    include_base: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Bc (factor "B": blocks side by side) or Ac (factor "A": blocks stacked).

    root_weights are sqrt(p_i); an update of None is a zero delta.
    """
    rows, cols = base.shape
    m = len(updates)
    if factor not in ("A", "B"):
        raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")
    out = torch.empty((m, rows, cols), dtype=dtype, device=base.device)
    base_cast = base.to(dtype)
    for i, (sparse, root) in enumerate(zip(updates, root_weights)):
        block = out[i]
        if include_base:
            torch.mul(base_cast, root, out=block)
        else:
            block.zero_()
        if sparse is not None:
            scatter_delta(block, sparse, root)
    if factor == "B":
        return out.permute(1, 0, 2).reshape(rows, m * cols)  # [sqrt(p_1) B_1, ..., sqrt(p_m) B_m]
    return out.reshape(m * rows, cols)
