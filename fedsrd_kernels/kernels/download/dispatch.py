"""Seeded DARE download: the backend choice for the server's compaction and the client's expand-add.

Both take every tensor of a round at once and group them by device and dtype: on the
triton and cuda backends each group is one launch that redraws the Philox masks in
registers; the torch backend (the reference, and the CPU path) draws each key's mask
with numpy. Every backend gives the same bits.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...config import FACTOR_DTYPES
from ...updates import SeededMask, SparseTensor
from .._backend import resolve_backend

__all__ = ["add_dense", "dare_compact_grouped", "seeded_expand_add_grouped"]


def add_dense(old: torch.Tensor, sparse: SparseTensor) -> torch.Tensor:
    """The reference apply of one delta: densified (a seeded mask drawn with numpy), added in float32."""
    return (old.to(torch.float32) + sparse.to_dense().to(old.device)).to(old.dtype)


def _offsets(flats: list[torch.Tensor]) -> list[int]:
    offsets = [0]
    for flat in flats:
        offsets.append(offsets[-1] + flat.numel())
    return offsets


def _end_to_end(flats: list[torch.Tensor]) -> torch.Tensor:
    return flats[0] if len(flats) == 1 else torch.cat(flats)


def dare_compact_grouped(flats: Mapping[str, torch.Tensor], masks: Mapping[str, SeededMask], drop: float,
                         value_dtype: torch.dtype, *, backend: str | None = None) -> dict[str, torch.Tensor]:
    """The values of each 1-D ``flats[key]`` that ``masks[key]`` keeps, in ``value_dtype`` (not rescaled)."""
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for key, flat in flats.items():
        groups.setdefault((flat.device, flat.dtype), []).append(key)
    values: dict[str, torch.Tensor] = {}
    for (device, dtype), members in groups.items():
        choice = resolve_backend(device, backend, cuda_op=True)
        if choice == "cuda" and dtype not in (torch.float32, torch.float64):
            choice = "torch"  # the op compacts float32 / float64 sources; torch is exact for the rest
        if choice == "torch":
            for key in members:
                kept = masks[key].keep_indices(flats[key].numel(), device=device)
                values[key] = flats[key][kept].to(value_dtype)
            continue
        members_flat = [flats[k] for k in members]
        args = (_end_to_end(members_flat), _offsets(members_flat), [masks[k].philox_key for k in members], drop,
                value_dtype)
        if choice == "cuda":
            from .cuda import dare_compact_cuda

            _, kept_values, value_offsets = dare_compact_cuda(*args)
        else:
            from .triton import dare_compact_grouped_triton

            _, kept_values, value_offsets = dare_compact_grouped_triton(*args)
        for key, lo, hi in zip(members, value_offsets, value_offsets[1:]):
            values[key] = kept_values[lo:hi]
    return values


def seeded_expand_add_grouped(olds: Mapping[str, torch.Tensor], deltas: Mapping[str, SparseTensor], drop: float, *,
                              backend: str | None = None) -> dict[str, torch.Tensor]:
    """``old + expand(values) * scale`` for each seeded delta, in the old tensor's dtype and device.

    On triton and cuda the factors of one device and dtype are laid end to end in one
    buffer and each new factor is a view of the output; the kernel checks every key's
    value count against its mask (one host sync) and raises SeededCountError naming it.
    """
    new: dict[str, torch.Tensor] = {}
    groups: dict[tuple[str, torch.device, torch.dtype], list[str]] = {}
    for key, sparse in deltas.items():
        old = olds[key]
        choice = resolve_backend(old.device, backend, cuda_op=True)
        if choice != "torch" and old.dtype in FACTOR_DTYPES:
            groups.setdefault((choice, old.device, old.dtype), []).append(key)
        else:
            new[key] = add_dense(old, sparse)
    for (choice, device, _), keys in groups.items():
        members = [olds[key] for key in keys]
        sparses = [deltas[key] for key in keys]
        offsets = _offsets(members)
        dtypes = {s.values.dtype for s in sparses}
        # One value buffer: as sent when the dtypes agree, else widened to float32 (exact for the wire
        # dtypes, and the rounding torch's reference applies to anything wider).
        value_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        if value_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            value_dtype = torch.float32
        values = torch.cat([s.values.to(value_dtype) for s in sparses]).to(device)
        args = (_end_to_end([m.reshape(-1) for m in members]), offsets, values,
                [s.mask.philox_key for s in sparses], drop, [s.scale for s in sparses])
        counts = [s.nnz for s in sparses]
        if choice == "cuda":
            from .cuda import seeded_expand_add_cuda

            out = seeded_expand_add_cuda(*args, counts=counts, names=keys)
        else:
            from .triton import seeded_expand_add_grouped_triton

            out = seeded_expand_add_grouped_triton(*args, counts=counts, names=keys)
        new.update({key: out[lo:hi].view(old.shape) for key, old, lo, hi in zip(keys, members, offsets, offsets[1:])})
    return new
