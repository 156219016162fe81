"""Client weights and robust aggregation: the one weight rule, normalised weights, norm bounding."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ..errors import (
    AggregationError,
)
from ..lora import LoraPair, StateDict, factor_keys
from ..updates import SparseUpdate


def reconstructed_norms(global_state: StateDict, updates: Sequence[SparseUpdate],
                        pairs: Sequence[LoraPair]) -> torch.Tensor:
    """||B_i A_i - B A||_F of each update over the whole adapter (float64), never forming d_out x d_in.

    B_i A_i - B A = dB A + (B + dB) dA = U V with U = [dB, B + dB] (d_out x 2r) and
    V = [A; dA] (2r x d_in), so ||U V||_F^2 = sum((U^T U) * (V V^T)): two 2r x 2r Grams
    per pair and client, with no B A - B A cancellation. Other keys add ||delta||^2.
    """
    pair_keys = factor_keys(pairs)
    squares = torch.zeros(len(updates), dtype=torch.float64)
    for i, update in enumerate(updates):
        for pair in pairs:
            if pair.a_key not in update.deltas and pair.b_key not in update.deltas:
                continue
            b = global_state[pair.b_key].to(torch.float64)
            a = global_state[pair.a_key].to(torch.float64)
            d_b = update.deltas[pair.b_key].to_dense(torch.float64).to(b.device) if pair.b_key in update.deltas \
                else torch.zeros_like(b)
            d_a = update.deltas[pair.a_key].to_dense(torch.float64).to(a.device) if pair.a_key in update.deltas \
                else torch.zeros_like(a)
            u = torch.cat([d_b, b + d_b], dim=1)
            v = torch.cat([a, d_a], dim=0)
            squares[i] += float(((u.T @ u) * (v @ v.T)).sum())
        for key, sparse in update.deltas.items():
            if key not in pair_keys:
                squares[i] += float(sparse.to_dense(torch.float64).square().sum())
    return squares.clamp_min(0.0).sqrt()


def bound_norms(global_state: StateDict, updates: list[SparseUpdate], pairs: Sequence[LoraPair], p: torch.Tensor,
                norm_bound: float) -> tuple[list[SparseUpdate], torch.Tensor, tuple[float, ...], tuple[float, ...]]:
    """Clip every update to norm_bound x the median norm, as weights (see Aggregator's norm_bound).

    Returns the updates (plus a zero update carrying the weight clipping took away,
    when any), their weights, the norms and the clip factors.
    """
    norms = reconstructed_norms(global_state, updates, pairs)
    threshold = norm_bound * float(norms.quantile(0.5))
    clip = torch.where(norms > threshold, threshold / norms.clamp_min(torch.finfo(torch.float64).tiny), 1.0)
    clipped = p * clip
    removed = 1.0 - float(clipped.sum())
    if removed > 0.0:
        updates = [*updates, SparseUpdate({})]
        clipped = torch.cat([clipped, torch.tensor([removed], dtype=torch.float64)])
    return updates, clipped, tuple(norms.tolist()), tuple(clip.tolist())


def check_weight(value: object, where: str) -> float:
    """The one rule for an aggregation weight (sample count): a real number, not a boolean, finite and > 0.

    ``intake.screen``, ``RoundStream.add`` and ``normalised_weights`` all use it: a
    weight of 0 would be a client that is sent the round but counts for nothing, so
    it is refused where it enters rather than silently dropped.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise AggregationError(f"{where} must be a real number, got {value!r} ({type(value).__name__})")
    try:
        weight = float(value)
    except OverflowError:  # an int past float64's range
        raise AggregationError(f"{where} must be a finite float64 number > 0, got an int of "
                               f"{len(str(abs(int(value))))} digits") from None
    if not (math.isfinite(weight) and weight > 0):
        raise AggregationError(f"{where} must be a finite number > 0, got {value!r}")
    return weight


def normalised_weights(weights: Sequence[float] | None, count: int) -> torch.Tensor:
    """p_i = w_i / sum w (float64); None gives 1/m each.

    Each weight follows ``check_weight``. They are divided by the largest first, so the
    sum cannot overflow: [1e308, 1e308] gives [0.5, 0.5] (their plain sum is inf).
    """
    if weights is None:
        return torch.full((count,), 1.0 / count, dtype=torch.float64)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
        raise AggregationError(f"weights must be a sequence of numbers, got {type(weights).__name__}")
    values = [check_weight(x, f"weights[{i}]") for i, x in enumerate(weights)]
    if len(values) != count:
        raise AggregationError(f"got {len(values)} weights for {count} updates")
    w = torch.tensor(values, dtype=torch.float64)
    w = w / w.max()
    return w / w.sum()
