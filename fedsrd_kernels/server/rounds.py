"""What a server round reports, and the checks every round-finishing path shares."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..errors import (
    NonFiniteError,
)
from ..updates import SparseTensor


@dataclass(frozen=True)
class AggregationReport:
    """What the last aggregate() did, per LoRA prefix.

    moved: the factor(s) changed. scheduled: the factor the round's parity asked
    for (FedSRD). notes: why a pair deviated (a rank-deficient projection).
    paths: the decompose path each FedSRD pair took; residuals: the randomized
    path's estimated relative range-finder residual. update_norms: each update's
    ||B_i A_i - B A||_F over the whole adapter, and clip_factors the multiplier
    norm bounding gave it (both empty when norm bounding is off).
    """

    round: int
    method: str
    num_updates: int
    moved: dict[str, str] = field(default_factory=dict)
    scheduled: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    residuals: dict[str, float] = field(default_factory=dict)
    update_norms: tuple[float, ...] = ()
    clip_factors: tuple[float, ...] = ()




def check_finite_changes(deltas: Mapping[str, SparseTensor], replace: Mapping[str, torch.Tensor], what: str) -> None:
    """NonFiniteError naming the first key whose values, scaled in float32 as densify scales them, are not finite.

    A SparseTensor refuses finite values whose product with its scale overflows float32 when it is
    built, and records whether its values are finite then, so the deltas cost no pass here.
    """
    for key, sparse in deltas.items():
        if not sparse.is_finite:
            raise NonFiniteError(f"{what} of {key!r} is not finite (it overflows float32)")
    for key, value in replace.items():
        if value.numel() and not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"{what} replaces {key!r} with values that are not finite")
