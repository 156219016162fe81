"""The baselines' server rules on one LoRA pair: FedAvg on the factors, FlexLoRA's SVD_r (see
fedsrd_kernels.baselines for which method uses which)."""

from __future__ import annotations

import torch

from ..lora import LoraPair
from .linalg import stack_factors, truncated_factors, weighted_mean


def fedavg_pair(
    client_d_b: list[torch.Tensor | None],
    client_d_a: list[torch.Tensor | None],
    weights: torch.Tensor,
    pair: LoraPair,
) -> dict[str, torch.Tensor]:
    """FedAvg on the factors: dB = sum p_i dB_i, dA = sum p_i dA_i (float64).

    A factor no client changed is left out, so FFA-LoRA moves B alone.
    """
    out = {}
    if any(d is not None for d in client_d_b):
        out["B"] = weighted_mean(client_d_b, weights, (pair.d_out, pair.rank))
    if any(d is not None for d in client_d_a):
        out["A"] = weighted_mean(client_d_a, weights, (pair.rank, pair.d_in))
    return out


def flexlora_pair(
    b_prev: torch.Tensor,
    a_prev: torch.Tensor,
    client_d_b: list[torch.Tensor | None],
    client_d_a: list[torch.Tensor | None],
    weights: torch.Tensor,
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexLoRA: SVD_r of sum p_i B_i A_i; new B = U_r S_r, new A = Vh_r (float64).

    When the product has rank below the LoRA rank (tiny layers), the missing
    rows and columns are zero so the factors keep their shapes.
    """
    b_stack, a_stack = stack_factors(b_prev, a_prev, client_d_b, client_d_a, weights)
    left, right = truncated_factors(b_stack, a_stack, rank)
    lora_rank = b_prev.shape[1]
    new_b = torch.zeros((b_prev.shape[0], lora_rank), dtype=left.dtype)
    new_a = torch.zeros((lora_rank, a_prev.shape[1]), dtype=right.dtype)
    new_b[:, : left.shape[1]] = left
    new_a[: right.shape[0]] = right
    return new_b, new_a
