"""Stacked client factors (spec eq. 9) in Triton: the dense fill and the sparse scatter.

Builds the same tensor as :func:`fedsrd_kernels.kernels.reconstruct.reference.stack_client_factors`:

    factor "B":  Bc = [sqrt(p_1) B_1, ..., sqrt(p_m) B_m]   (d_out x m r, client blocks side by side)
    factor "A":  Ac = [sqrt(p_1) A_1; ...; sqrt(p_m) A_m]   (m r x d_in, client blocks stacked)

with B_i = B + dB_i rebuilt from client i's SparseTensor (or dB_i alone with
``include_base=False``). Both layouts are one address rule: element ``e`` of
client ``i``'s block, at row ``e // cols`` and column ``e % cols`` of the base,
lives at ``(e // cols) * row_stride + i * block_stride + e % cols`` with
(row_stride, block_stride) = (m cols, cols) for "B" and (cols, rows cols) for "A".

Two launches per call:

* ``_fill_kernel``: one program per 4096 base elements loads them once and
  writes ``sqrt(p_i) * base`` (or zeros) into every client block.
* ``_scatter_kernel``: one program per 1024 (position, value) pairs of one
  client, over all clients' pairs laid end to end (a host block table says
  which client a program serves; a dense update's positions are implicit),
  adds ``value * (scale_i * sqrt(p_i))`` to its block. Each position appears at
  most once per client (SparseTensor indices are unique) and each client owns
  its block, so the read-modify-write needs no atomics.

Arithmetic is the torch reference's, in its order and with its roundings:
``fl(fl(base_cast * root) + fl(value_cast * coef))`` with the scalars rounded
to the compute type (float32, or float64 when ``dtype`` is float64) as torch
rounds a Python scalar, so the result is bitwise equal to the reference. The
scatter is launched with ``enable_fp_fusion=False`` so the GPU compiler cannot
turn ``out + value * coef`` into one FMA. Block sizes are the usual
memory-bound choice and untuned: no GPU timing was taken yet
(``benchmarks/bench_reconstruct.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from ...errors import ConfigError, ShapeMismatchError
from ...updates import SparseTensor
from ..triton_utils import FLOAT_DTYPES, NUM_WARPS, block_table, cast

__all__ = ["stack_client_factors_triton"]

FILL_BLOCK = 4096
SCATTER_BLOCK = 1024


@triton.jit
def _block_offset(e, i, num_clients, block_stride, STACK_B: tl.constexpr, COLS: tl.constexpr):
    """Where element ``e`` of client ``i``'s block lives in the stacked output.

    "A": blocks stacked, ``i * rows * cols + e``. "B": blocks side by side,
    ``row * m * cols + i * cols + col``; COLS (the LoRA rank) is a constexpr so
    ``e // COLS`` compiles to a shift for the usual power-of-two ranks instead
    of a 64-bit division.
    """
    if STACK_B:
        row = e // COLS
        where = row * (num_clients * COLS) + i * COLS + (e - row * COLS)
    else:
        where = tl.cast(i, tl.int64) * block_stride + e
    return where


@triton.jit
def _fill_kernel(
    base_ptr, out_ptr, roots_ptr, numel, num_clients, block_stride, INCLUDE_BASE: tl.constexpr,
    STACK_B: tl.constexpr, COLS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = e < numel
    out_ty = out_ptr.dtype.element_ty
    compute_ty = roots_ptr.dtype.element_ty
    if INCLUDE_BASE:
        # The reference casts base to the output dtype first, then multiplies in the compute type.
        base = cast(cast(tl.load(base_ptr + e, mask=in_range), out_ty), compute_ty)
    for i in range(num_clients):
        if INCLUDE_BASE:
            value = cast(base * tl.load(roots_ptr + i), out_ty)
        else:
            value = tl.zeros([BLOCK], dtype=out_ty)
        where = _block_offset(e, i, num_clients, block_stride, STACK_B, COLS)
        tl.store(out_ptr + where, value, mask=in_range)


@triton.jit
def _scatter_kernel(
    out_ptr,
    values_ptr,
    indices_ptr,
    coefs_ptr,
    value_starts_ptr,
    index_starts_ptr,
    nnzs_ptr,
    block_client_ptr,
    block_start_ptr,
    num_clients,
    block_stride,
    STACK_B: tl.constexpr,
    COLS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.load(block_client_ptr + pid)
    k = tl.load(block_start_ptr + pid) + tl.arange(0, BLOCK)
    in_range = k < tl.load(nnzs_ptr + i)
    index_start = tl.load(index_starts_ptr + i)  # -1: dense update, value k sits at position k
    is_sparse = (index_start + 0 * k) >= 0  # a block, not a scalar: the interpreter rejects scalar & block masks
    e = tl.load(indices_ptr + index_start + k, mask=in_range & is_sparse, other=0)
    e = tl.where(is_sparse, e, k)
    value = tl.load(values_ptr + tl.load(value_starts_ptr + i) + k, mask=in_range)
    out_ty = out_ptr.dtype.element_ty
    compute_ty = coefs_ptr.dtype.element_ty
    delta = cast(cast(cast(value, out_ty), compute_ty) * tl.load(coefs_ptr + i), out_ty)
    where = _block_offset(e, i, num_clients, block_stride, STACK_B, COLS)
    old = tl.load(out_ptr + where, mask=in_range)
    new = cast(old, compute_ty) + cast(delta, compute_ty)
    tl.store(out_ptr + where, cast(new, out_ty), mask=in_range)


def _scalar(x: object, what: str) -> float:
    value = float(x)
    if not math.isfinite(value):
        raise ConfigError(f"stack_client_factors_triton: {what} must be finite, got {x!r}")
    return value


def stack_client_factors_triton(
    base: torch.Tensor,
    updates: Sequence[SparseTensor | None],
    root_weights: Sequence[float],
    *,
    factor: str,
    include_base: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Bc (factor "B": blocks side by side) or Ac (factor "A": blocks stacked), in two launches.

    Same contract and result as ``reference.stack_client_factors``:
    ``root_weights`` are sqrt(p_i), an update of None is a zero delta, each
    update's indices are sorted and unique (the SparseTensor contract).
    """
    what = "stack_client_factors_triton"
    if factor not in ("A", "B"):
        raise ValueError(f"factor must be 'A' or 'B', got {factor!r}")
    if base.dim() != 2 or not base.dtype.is_floating_point:
        raise ShapeMismatchError(f"{what}: base must be a 2-D float tensor, got {base.dtype} {tuple(base.shape)}")
    if dtype not in FLOAT_DTYPES:
        raise ConfigError(f"{what}: dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    if len(updates) != len(root_weights):
        raise ShapeMismatchError(f"{what}: {len(updates)} updates for {len(root_weights)} root weights")
    rows, cols = base.shape
    numel, m, device = rows * cols, len(updates), base.device
    for i, sparse in enumerate(updates):
        if sparse is not None and sparse.shape != (rows, cols):
            raise ShapeMismatchError(f"{what}: updates[{i}] has shape {sparse.shape}, base has {(rows, cols)}")
    out_shape = (rows, m * cols) if factor == "B" else (m * rows, cols)
    out = torch.empty(out_shape, dtype=dtype, device=device)
    if numel == 0 or m == 0:
        return out
    # "B" specialises on the rank (COLS) for a shift instead of a division; "A" needs no division.
    layout = {"STACK_B": factor == "B", "COLS": cols if factor == "B" else 1}
    # torch rounds a Python scalar to the op's compute type: float32 for 32- and 16-bit outputs.
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    roots = [_scalar(r, "root_weights") for r in root_weights]
    roots_dev = torch.tensor(roots, dtype=compute, device=device)
    _fill_kernel[(triton.cdiv(numel, FILL_BLOCK),)](
        base.contiguous(), out, roots_dev, numel, m, numel,
        INCLUDE_BASE=include_base, **layout, BLOCK=FILL_BLOCK, num_warps=NUM_WARPS,
    )  # fmt: skip

    present = [(i, s) for i, s in enumerate(updates) if s is not None and s.nnz > 0]
    if not present:
        return out
    # Per-client tables (indexed by client): where its values and indices start, how many, its coefficient.
    coefs, value_starts, index_starts, nnzs = [0.0] * m, [0] * m, [-1] * m, [0] * m  # index_start -1: dense
    num_values = num_indices = 0
    for i, sparse in present:
        coefs[i] = sparse.scale * roots[i]  # the reference's Python-float product, rounded once below
        value_starts[i], nnzs[i] = num_values, sparse.nnz
        num_values += sparse.nnz
        if sparse.indices is not None:
            index_starts[i] = num_indices
            num_indices += sparse.nnz
    index_parts = [s.indices.to(device=device, dtype=torch.int64) for _, s in present if s.indices is not None]
    indices = torch.cat(index_parts) if index_parts else torch.zeros(1, dtype=torch.int64, device=device)
    if index_parts:
        low, high = (int(x) for x in torch.aminmax(indices))  # one host sync: a bad index writes out of bounds
        if low < 0 or high >= numel:
            raise ShapeMismatchError(f"{what}: update indices span [{low}, {high}], base has {numel} elements")
    # Wire values are float32/bfloat16/float16: float32 holds them all exactly (float64 if one is float64).
    value_dtype = torch.float64 if any(s.values.dtype == torch.float64 for _, s in present) else torch.float32
    values = torch.cat([s.values.to(device=device, dtype=value_dtype) for _, s in present])
    # Programs never straddle two clients: a block table says which client and which first pair each serves.
    blocks = [triton.cdiv(s.nnz, SCATTER_BLOCK) for _, s in present]
    owner, start = block_table(np.asarray(blocks, dtype=np.int64), SCATTER_BLOCK)
    block_client = torch.from_numpy(np.asarray([i for i, _ in present], dtype=np.int32)[owner]).to(device)
    block_start = torch.from_numpy(start).to(device)

    def table(xs: list, dtype_: torch.dtype) -> torch.Tensor:
        return torch.tensor(xs, dtype=dtype_, device=device)

    _scatter_kernel[(sum(blocks),)](
        out, values, indices, table(coefs, compute), table(value_starts, torch.int64),
        table(index_starts, torch.int64), table(nnzs, torch.int64), block_client, block_start,
        m, numel, **layout, BLOCK=SCATTER_BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )  # fmt: skip
    return out
