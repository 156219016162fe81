"""Stacked client factors (spec eq. 9): the backend choice (torch reference or Triton)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...updates import SparseTensor
from .._backend import resolve_backend
from .reference import stack_client_factors

__all__ = ["stack_client_factors_dispatch"]


def stack_client_factors_dispatch(
    base: torch.Tensor,
    updates: Sequence[SparseTensor | None],
    root_weights: Sequence[float],
    *,
    factor: str,
    include_base: bool = True,
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
) -> torch.Tensor:
    """``stack_client_factors`` on the backend ``_backend.resolve_backend`` picks (one launch pair on Triton)."""
    if resolve_backend(base.device, backend) == "triton":
        from .triton import stack_client_factors_triton

        return stack_client_factors_triton(base, updates, root_weights, factor=factor, include_base=include_base,
                                           dtype=dtype)
    return stack_client_factors(base, updates, root_weights, factor=factor, include_base=include_base, dtype=dtype)
