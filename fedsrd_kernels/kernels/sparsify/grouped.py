"""Client sparsify (spec section 1, eq. 4-8) for every LoRA matrix of a model
at once: the grouped input and output types both paths share (the torch path is
``reference.sparsify_grouped_torch``, the Triton one ``triton.sparsify_grouped_triton``,
the choice between them ``dispatch.sparsify_grouped``).

Each LoRA pair contributes two matrices, in this order: its dA (r x d_in,
scored by the norms of the new B's columns), then its dB (d_out x r, scored
by the norms of the old A's rows); matrix ``2 * i`` is pair i's dA and
``2 * i + 1`` its dB, the order ``client.sparsify`` visits them in.

The result keeps every matrix's kept positions and values back to back in two
flat buffers (``GroupedSparse``), so the Triton path never has to allocate
per matrix; ``split`` and ``to_sparse_tensors`` cut them per matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ...errors import ShapeMismatchError
from ...updates import SparseTensor

__all__ = [
    "FactorPair",
    "GroupedSparse",
    "check_pairs",
    "pair_label",
]


class FactorPair(NamedTuple):
    """One LoRA pair at the end of a client's round: the round's global factors and the local ones."""

    a_prev: torch.Tensor  # r x d_in, global A^{t-1}
    b_prev: torch.Tensor  # d_out x r, global B^{t-1}
    a_new: torch.Tensor  # r x d_in, local A_i^t
    b_new: torch.Tensor  # d_out x r, local B_i^t


@dataclass(frozen=True, eq=False)
class GroupedSparse:
    """Kept entries of every matrix of a grouped sparsify, in two flat buffers.

    shapes:   per matrix (pair i's dA at 2i, its dB at 2i + 1).
    indices:  int64 flat (row-major) positions, matrix after matrix, ascending within each.
    values:   float32 delta values at those positions.
    offsets:  matrix j's entries are ``[offsets[j], offsets[j + 1])`` of both buffers.
    scales:   per matrix, the L1 rescale factor rounded to float32 (1.0 without
              rescale), or None when the matrix sends nothing (all-zero delta, or
              its kept values are all zero); a None matrix may still own entries.
    kurtosis: per matrix, the Pearson kurtosis of its scores (1.0 when constant).
    """

    shapes: tuple[tuple[int, int], ...]
    indices: torch.Tensor
    values: torch.Tensor
    offsets: tuple[int, ...]
    scales: tuple[float | None, ...]
    kurtosis: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def keep_counts(self) -> tuple[int, ...]:
        return tuple(hi - lo for lo, hi in zip(self.offsets[:-1], self.offsets[1:]))

    def matrix(self, j: int) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(indices, values, scale) of matrix j (views of the flat buffers), or None."""
        scale = self.scales[j]
        if scale is None:
            return None
        lo, hi = self.offsets[j], self.offsets[j + 1]
        return self.indices[lo:hi], self.values[lo:hi], scale

    def split(self) -> list[tuple[torch.Tensor, torch.Tensor, float] | None]:
        return [self.matrix(j) for j in range(len(self))]

    def to_sparse_tensors(self) -> list[SparseTensor | None]:
        out: list[SparseTensor | None] = []
        for shape, kept in zip(self.shapes, self.split()):
            out.append(None if kept is None else SparseTensor(shape, kept[1], kept[0], scale=kept[2]))
        return out


def pair_label(names: Sequence[str] | None, i: int) -> str:
    """How errors name pair i: its name when given, else its position."""
    return repr(names[i]) if names is not None else f"#{i}"


def check_pairs(pairs: Sequence[Sequence[torch.Tensor]], names: Sequence[str] | None = None) -> list[FactorPair]:
    """Validate (A_prev, B_prev, A_new, B_new) per pair: 2-D floating tensors, one r, one device."""
    if names is not None and len(names) != len(pairs):
        raise ShapeMismatchError(f"got {len(names)} names for {len(pairs)} pairs")
    checked: list[FactorPair] = []
    device = None
    for i, pair in enumerate(pairs):
        if len(pair) != 4:
            raise ShapeMismatchError(
                f"pair {pair_label(names, i)}: need (A_prev, B_prev, A_new, B_new), got {len(pair)} tensors"
            )
        fp = FactorPair(*pair)
        for field, t in zip(FactorPair._fields, fp):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                what = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ShapeMismatchError(f"pair {pair_label(names, i)}: {field} must be a 2-D float tensor, got {what}")
            if device is None:
                device = t.device
            elif t.device != device:
                raise ShapeMismatchError(f"pair {pair_label(names, i)}: {field} is on {t.device}, others on {device}")
        r = fp.a_prev.shape[0]
        if fp.a_new.shape != fp.a_prev.shape or fp.b_new.shape != fp.b_prev.shape or fp.b_prev.shape[1] != r:
            raise ShapeMismatchError(
                f"pair {pair_label(names, i)}: need A_prev, A_new (r x d_in) and B_prev, B_new (d_out x r) "
                f"with one r; got A_prev {tuple(fp.a_prev.shape)}, A_new {tuple(fp.a_new.shape)}, "
                f"B_prev {tuple(fp.b_prev.shape)}, B_new {tuple(fp.b_new.shape)}"
            )
        checked.append(fp)
    return checked
