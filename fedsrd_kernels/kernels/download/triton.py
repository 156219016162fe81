"""Seeded DARE download in Triton: the server's compaction and the client's expand-add.

The keep-mask is the element rule of :mod:`fedsrd_kernels.kernels.download.reference`
(Philox4x32-10, key ``mask_key(seed, round, name)``, counter ``i // 4``, lane
``i % 4``, element ``i`` dropped iff ``u_i < floor(drop * 2**32)``), drawn in
registers with ``tl.randint4x``: no mask or index list is ever read from memory.

Every op is grouped: one launch covers many tensors laid end to end in a flat
buffer, with an offsets table (tensor ``t`` is ``flat[offsets[t]:offsets[t+1]]``)
and one Philox key per tensor. A block of ``4 * COUNTERS`` elements never
straddles two tensors (the Philox counter restarts at 0 in each), so a host
built block table (block -> tensor, first element in that tensor) replaces any
search in the kernel. The single-tensor functions are the groups of one;
``Aggregator`` (its download) and ``server.apply`` call the grouped ones once per
broadcast (per device and dtype), not once per key.

Two passes, because an element's place in the compacted output depends on how
many elements before it are kept:

1. ``_count_kept_kernel`` draws the mask and writes the kept count of each
   block. It reads no memory at all (the mask is a function of key and index).
2. An exclusive cumsum over the block counts (torch, a few thousand int32)
   gives every block its first output slot (server) or first value (client).
3. ``_compact_kernel`` (server) draws the mask again, loads the kept elements,
   ranks them inside the block with ``tl.cumsum`` and writes index and value
   (cast to the wire dtype) to their slots. ``_expand_add_kernel`` (client)
   loads a block of the factor, gathers the block's values from its slice of
   the value buffer and writes ``factor + value * scale``.

Redrawing the mask costs 10 Philox rounds per 4 elements (~25 integer
instructions per element), which is cheaper than writing a bitmap and reading
it back. Nothing here was timed on a GPU yet: block sizes follow the usual
memory-bound choice (4096 elements, 8 warps on an H100) and are untuned;
``benchmarks/bench_download.py`` measures them.

Exactness: the values equal ``delta.flatten()[kept].to(value_dtype)`` bit for
bit (float64 goes through float32 first, as torch's conversion does), and the
client's result equals ``fedsrd_kernels.server.apply`` bit for bit:
``(factor.float() + values.float() * float32(scale)).to(factor.dtype)`` with
``+ 0.0`` at dropped positions. The kernels are launched with
``enable_fp_fusion=False`` so the GPU compiler cannot contract the multiply and
the add into one FMA (one rounding instead of torch's two).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from ...config import FACTOR_DTYPES, MAX_NUMEL, VALUE_DTYPES, check_value_dtype
from ...errors import ConfigError, SeededCountError, ShapeMismatchError
from ..triton_utils import FLOAT_DTYPES, NUM_WARPS, block_table, from_float32, to_float32
from .reference import drop_threshold

__all__ = [
    "dare_compact_grouped_triton",
    "dare_compact_triton",
    "seeded_expand_add_grouped_triton",
    "seeded_expand_add_triton",
]

# Philox counters per program; each covers 4 elements, so a block is 4096 elements.
COUNTERS = 1024
BLOCK = 4 * COUNTERS


# --------------------------------------------------------------------------- kernels


@triton.jit
def _block_keep(key, start, numel, threshold, COUNTERS: tl.constexpr):
    """Keep flags of elements ``start .. start + 4 * COUNTERS - 1`` of one tensor, in element order.

    ``start`` is a multiple of 4. Counter ``j`` decides elements ``4j .. 4j+3``
    (lane ``l`` -> element ``4j + l``); the two interleaves put the four lanes'
    words back in element order (interleave(a, b) = a0 b0 a1 b1 ...).
    Elements at or past ``numel`` are not kept.
    """
    counters = start // 4 + tl.arange(0, COUNTERS).to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(key, counters)
    words = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    local = start + tl.arange(0, 4 * COUNTERS).to(tl.int64)
    in_range = local < numel
    keep = (words.to(tl.int64) >= threshold) & in_range
    return keep, local, in_range


@triton.jit
def _block_slots(keys_ptr, numels_ptr, block_tensor_ptr, block_start_ptr, block_slot_ptr, threshold,
                 COUNTERS: tl.constexpr):
    """This program's block: (tensor, keep flags, element indices, in-range flags, output slot per element).

    The compaction (server) and the expand-add (client) walk the same blocks and give
    each kept element the same slot: the block's first slot (from the count pass) plus
    the number of kept elements before it in the block.
    """
    pid = tl.program_id(0)
    t = tl.load(block_tensor_ptr + pid)
    start = tl.load(block_start_ptr + pid)
    keep, local, in_range = _block_keep(tl.load(keys_ptr + t), start, tl.load(numels_ptr + t), threshold, COUNTERS)
    flags = keep.to(tl.int32)
    slot = tl.load(block_slot_ptr + pid) + (tl.cumsum(flags, axis=0) - flags).to(tl.int64)
    return t, keep, local, in_range, slot


@triton.jit
def _count_kept_kernel(
    keys_ptr, numels_ptr, block_tensor_ptr, block_start_ptr, counts_ptr, threshold, COUNTERS: tl.constexpr
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor_ptr + pid)
    start = tl.load(block_start_ptr + pid)
    key = tl.load(keys_ptr + t)
    numel = tl.load(numels_ptr + t)
    keep, _, _ = _block_keep(key, start, numel, threshold, COUNTERS)
    tl.store(counts_ptr + pid, tl.sum(keep.to(tl.int32), axis=0))


@triton.jit
def _compact_kernel(
    src_ptr,
    offsets_ptr,
    keys_ptr,
    numels_ptr,
    block_tensor_ptr,
    block_start_ptr,
    block_slot_ptr,
    indices_ptr,
    values_ptr,
    threshold,
    COUNTERS: tl.constexpr,
):
    t, keep, local, _, slot = _block_slots(keys_ptr, numels_ptr, block_tensor_ptr, block_start_ptr, block_slot_ptr,
                                           threshold, COUNTERS)
    # Masked on keep: at drop 0.8 a 32-byte sector of float32 is skipped with p = 0.8**8.
    x = tl.load(src_ptr + tl.load(offsets_ptr + t) + local, mask=keep)
    # torch converts float64 to a 16-bit float through float32 (two roundings): same here.
    value = from_float32(to_float32(x), values_ptr.dtype.element_ty)
    tl.store(indices_ptr + slot, local, mask=keep)
    tl.store(values_ptr + slot, value, mask=keep)


@triton.jit
def _expand_add_kernel(
    factor_ptr,
    values_ptr,
    out_ptr,
    offsets_ptr,
    keys_ptr,
    numels_ptr,
    scales_ptr,
    block_tensor_ptr,
    block_start_ptr,
    block_slot_ptr,
    threshold,
    COUNTERS: tl.constexpr,
):
    t, keep, local, in_range, slot = _block_slots(keys_ptr, numels_ptr, block_tensor_ptr, block_start_ptr,
                                                  block_slot_ptr, threshold, COUNTERS)
    scale = tl.load(scales_ptr + t)
    where = tl.load(offsets_ptr + t) + local
    factor = tl.load(factor_ptr + where, mask=in_range)
    # The block's values are one contiguous slice: the gather stays within a few cache lines.
    value = to_float32(tl.load(values_ptr + slot, mask=keep, other=0.0))
    # torch.apply adds a dense float32 delta: exact 0.0 where dropped (so -0.0 becomes +0.0 there too).
    delta = tl.where(keep, value * scale, 0.0)
    out = to_float32(factor) + delta
    tl.store(out_ptr + where, from_float32(out, out_ptr.dtype.element_ty), mask=in_range)


# --------------------------------------------------------------------------- launch helpers


def _check_key(key: object, what: str) -> int:
    if not isinstance(key, numbers.Integral) or isinstance(key, bool) or not 0 <= key < 2**63:
        raise ConfigError(f"{what}: key must be an int in [0, 2**63), got {key!r}")
    return int(key)


def _value_dtype(value_dtype: torch.dtype | str) -> torch.dtype:
    dtype = check_value_dtype(value_dtype) if isinstance(value_dtype, str) else value_dtype
    if dtype not in VALUE_DTYPES.values():
        raise ConfigError(f"value_dtype must be one of {tuple(VALUE_DTYPES.values())}, got {value_dtype!r}")
    return dtype


def _check_offsets(offsets: Sequence[int], total: int, what: str) -> list[int]:
    offsets = [int(o) for o in offsets]
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != total:
        raise ShapeMismatchError(f"{what}: offsets must start at 0 and end at the buffer size {total}, got {offsets}")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ShapeMismatchError(f"{what}: offsets must be non-decreasing, got {offsets}")
    if any(b - a > MAX_NUMEL for a, b in zip(offsets, offsets[1:])):
        raise ConfigError(f"{what}: a tensor exceeds the mask's {MAX_NUMEL} elements")
    return offsets


class _Plan:
    """Device tables of one grouped launch: per tensor (offset, numel, key), per block (tensor, start)."""

    def __init__(self, offsets: list[int], keys: Sequence[int], device: torch.device, what: str) -> None:
        if len(keys) != len(offsets) - 1:
            raise ShapeMismatchError(f"{what}: {len(keys)} keys for {len(offsets) - 1} tensors")
        numels = [b - a for a, b in zip(offsets, offsets[1:])]
        blocks = [triton.cdiv(n, BLOCK) for n in numels]
        self.num_tensors = len(numels)
        self.num_blocks = sum(blocks)
        self.offsets = torch.tensor(offsets[:-1], dtype=torch.int64, device=device)
        self.numels = torch.tensor(numels, dtype=torch.int64, device=device)
        self.keys = torch.tensor([_check_key(k, what) for k in keys], dtype=torch.int64, device=device)
        block_tensor, block_start = block_table(np.asarray(blocks, dtype=np.int64), BLOCK)
        self.block_tensor = torch.from_numpy(block_tensor.astype(np.int32)).to(device)
        self.block_start = torch.from_numpy(block_start).to(device)

    def slots(self, threshold: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(first output slot of each block, kept count of each tensor), from the counting pass."""
        counts = torch.empty(self.num_blocks, dtype=torch.int32, device=self.keys.device)
        if self.num_blocks:
            _count_kept_kernel[(self.num_blocks,)](
                self.keys, self.numels, self.block_tensor, self.block_start, counts, threshold,
                COUNTERS=COUNTERS, num_warps=NUM_WARPS,
            )  # fmt: skip
        counts = counts.long()
        block_slot = torch.cumsum(counts, 0) - counts
        kept = torch.zeros(self.num_tensors, dtype=torch.int64, device=counts.device)
        kept.index_add_(0, self.block_tensor.long(), counts)
        return block_slot, kept


# --------------------------------------------------------------------------- server


def dare_compact_grouped_triton(
    flat: torch.Tensor,
    offsets: Sequence[int],
    keys: Sequence[int],
    drop: float,
    value_dtype: torch.dtype | str = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Seeded DARE compaction of many tensors in one launch.

    ``flat`` is a 1-D buffer (float32 or float64) holding the tensors end to
    end, tensor ``t`` at ``flat[offsets[t]:offsets[t + 1]]`` (row-major),
    masked with Philox key ``keys[t]``. Returns ``(indices, values,
    value_offsets)``: tensor ``t``'s kept flat positions (int64, sorted,
    local to the tensor) and values (``value_dtype``) are
    ``indices[value_offsets[t]:value_offsets[t + 1]]`` and the same slice of
    ``values``. The DARE scale ``1 / (1 - drop)`` is not applied.
    """
    what = "dare_compact_grouped_triton"
    if flat.dim() != 1 or flat.dtype not in FLOAT_DTYPES:
        raise ShapeMismatchError(f"{what}: flat must be a 1-D float tensor, got {flat.dtype} {tuple(flat.shape)}")
    dtype = _value_dtype(value_dtype)
    threshold = drop_threshold(drop)
    offsets = _check_offsets(offsets, flat.numel(), what)
    flat = flat.contiguous()
    plan = _Plan(offsets, keys, flat.device, what)
    block_slot, kept = plan.slots(threshold)
    value_offsets = [0, *torch.cumsum(kept, 0).tolist()]  # the one host sync: output sizes
    total = value_offsets[-1]
    indices = torch.empty(total, dtype=torch.int64, device=flat.device)
    values = torch.empty(total, dtype=dtype, device=flat.device)
    if plan.num_blocks and total:
        _compact_kernel[(plan.num_blocks,)](
            flat, plan.offsets, plan.keys, plan.numels, plan.block_tensor, plan.block_start, block_slot,
            indices, values, threshold, COUNTERS=COUNTERS, num_warps=NUM_WARPS,
        )  # fmt: skip
    return indices, values, value_offsets


def dare_compact_triton(
    delta: torch.Tensor, key: int, drop: float, value_dtype: torch.dtype | str = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, delta.flatten()[kept].to(value_dtype))`` with ``kept`` the seeded keep positions.

    Equals ``reference.seeded_keep_indices`` (key ``key``) and the torch gather
    bit for bit. ``delta`` is float32 or float64 of any shape.
    """
    flat = delta.reshape(-1)
    indices, values, _ = dare_compact_grouped_triton(flat, [0, flat.numel()], [key], drop, value_dtype)
    return indices, values


# --------------------------------------------------------------------------- client


def seeded_expand_add_grouped_triton(
    flat_factor: torch.Tensor,
    offsets: Sequence[int],
    values: torch.Tensor,
    keys: Sequence[int],
    drop: float,
    scales: Sequence[float],
    *,
    counts: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """``flat_factor + expand(values) * scales`` for many tensors in one launch; a new flat buffer.

    ``flat_factor`` (float32 or bfloat16) holds the tensors end to end as in
    :func:`dare_compact_grouped_triton`; ``values`` holds every tensor's kept
    values in that order (what the compaction returns, cast to any float
    dtype), tensor ``t``'s i-th value going to its i-th kept position under key
    ``keys[t]``, multiplied by ``scales[t]`` rounded to float32.

    ``counts`` (values per tensor, optional) are checked against what each mask
    keeps, from the counting pass the launch needs anyway; SeededCountError names
    the tensor (``names[t]``, else its index). Without them only the total is checked.
    """
    what = "seeded_expand_add_grouped_triton"
    if flat_factor.dim() != 1 or flat_factor.dtype not in FACTOR_DTYPES:
        raise ShapeMismatchError(
            f"{what}: factor must be a 1-D float32/bfloat16 buffer, got {flat_factor.dtype} {tuple(flat_factor.shape)}"
        )
    if values.dim() != 1 or not values.dtype.is_floating_point:
        raise ShapeMismatchError(f"{what}: values must be a 1-D float tensor, got {values.dtype} {tuple(values.shape)}")
    if values.device != flat_factor.device:
        raise ShapeMismatchError(f"{what}: values are on {values.device}, the factor on {flat_factor.device}")
    threshold = drop_threshold(drop)
    offsets = _check_offsets(offsets, flat_factor.numel(), what)
    if len(scales) != len(offsets) - 1:
        raise ShapeMismatchError(f"{what}: {len(scales)} scales for {len(offsets) - 1} tensors")
    for given, name in ((counts, "counts"), (names, "names")):
        if given is not None and len(given) != len(offsets) - 1:
            raise ShapeMismatchError(f"{what}: {len(given)} {name} for {len(offsets) - 1} tensors")
    if not all(isinstance(s, numbers.Real) and math.isfinite(s) for s in scales):
        raise ConfigError(f"{what}: scales must be finite numbers, got {list(scales)}")
    flat_factor, values = flat_factor.contiguous(), values.contiguous()
    plan = _Plan(offsets, keys, flat_factor.device, what)
    scales_dev = torch.tensor([float(s) for s in scales], dtype=torch.float32, device=flat_factor.device)
    block_slot, kept = plan.slots(threshold)
    kept_counts = kept.tolist()  # the one host sync: a wrong count would read past the values
    for t, (mask_count, given) in enumerate(zip(kept_counts, counts if counts is not None else ())):
        if mask_count != given:
            name = repr(names[t]) if names is not None else f"#{t}"
            raise SeededCountError(f"tensor {name}: its seeded mask keeps {mask_count} of "
                                   f"{offsets[t + 1] - offsets[t]} elements, but it carries {given} values")
    total = sum(kept_counts)
    if total != values.numel():
        raise SeededCountError(f"{what}: the masks keep {total} elements, got {values.numel()} values")
    out = torch.empty_like(flat_factor)
    if plan.num_blocks:
        _expand_add_kernel[(plan.num_blocks,)](
            flat_factor, values, out, plan.offsets, plan.keys, plan.numels, scales_dev, plan.block_tensor,
            plan.block_start, block_slot, threshold, COUNTERS=COUNTERS, num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )  # fmt: skip
    return out


def seeded_expand_add_triton(
    factor: torch.Tensor, values: torch.Tensor, key: int, drop: float, scale: float
) -> torch.Tensor:
    """A new tensor ``factor + expand(values) * scale``: the client's apply of one seeded delta.

    The i-th value lands at the i-th kept position of the mask under ``key``;
    the result equals ``fedsrd_kernels.server.apply`` bit for bit.
    """
    flat = factor.reshape(-1)
    out = seeded_expand_add_grouped_triton(flat, [0, flat.numel()], values.reshape(-1), [key], drop, [scale])
    return out.view(factor.shape)
