"""Client sparsify of every LoRA matrix at once: the backend choice (torch reference or Triton)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._backend import resolve_backend
from .grouped import GroupedSparse
from .reference import sparsify_grouped_torch

__all__ = ["sparsify_grouped"]


def sparsify_grouped(
    pairs: Sequence[Sequence[torch.Tensor]],
    *,
    base: float = 0.85,
    coeff: float = 0.1,
    upper: float = 0.11,
    rescale: bool = True,
    names: Sequence[str] | None = None,
    backend: str | None = None,
) -> GroupedSparse:
    """Sparsify every matrix of ``pairs``; the backend follows ``_backend.resolve_backend``."""
    device = pairs[0][0].device if len(pairs) else torch.device("cpu")
    choice = resolve_backend(device, backend)
    if choice == "triton":
        from .triton import sparsify_grouped_triton  # imports triton: only when asked for

        return sparsify_grouped_triton(pairs, base=base, coeff=coeff, upper=upper, rescale=rescale, names=names)
    # No CUDA C++ sparsify pipeline exists: resolve_backend sends a "cuda" request to Triton.
    return sparsify_grouped_torch(pairs, base=base, coeff=coeff, upper=upper, rescale=rescale, names=names)
