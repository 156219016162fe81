"""Helpers the Triton kernels of every op share: float casts, dtype tables, block tables, launch settings.

Importing this module imports triton: only the ops' Triton modules (``*/triton.py``) import it.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

__all__ = [
    "FLOAT_DTYPES",
    "NUM_WARPS",
    "TL_DTYPES",
    "bf16_to_f32",
    "block_table",
    "cast",
    "f32_to_bf16",
    "from_float32",
    "launch_config",
    "to_float32",
]

# --------------------------------------------------------------------------- dtype tables

# The float dtypes the download and reconstruct kernels read or write (any of them, through the casts below).
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# The element types a pointer table may be cast to (the grouped sparsify reads its inputs in place in these).
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# --------------------------------------------------------------------------- casts


# bfloat16 conversions written out in integer ops. On a GPU ``x.to(tl.bfloat16)``
# is already round-to-nearest-even, but Triton 3.9's interpreter truncates
# (0.9521 -> 0.9492 instead of 0.9531), so the tests could not check exactness
# with it; these match torch's c10::BFloat16 bit for bit on both, for ~5 integer
# ops per element in a memory-bound kernel.
@triton.jit
def bf16_to_f32(x):
    """Exact widening of bfloat16: its 16 bits are the top half of the float32."""
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def f32_to_bf16(x):
    """Round float32 to nearest-even bfloat16, as torch does on the CPU (any NaN -> 0x7FC0)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_float32(x):
    """torch's ``x.float()``: exact for 16-bit floats, one rounding for float64."""
    if x.dtype == tl.bfloat16:
        y = bf16_to_f32(x)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def from_float32(x, dtype: tl.constexpr):
    """torch's ``x.to(dtype)`` for a float32 ``x`` (round to nearest even)."""
    if dtype == tl.bfloat16:
        y = f32_to_bf16(x)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def cast(x, dtype: tl.constexpr):
    """torch's ``x.to(dtype)`` for any float ``x``: float64 narrows to 16 bits through float32, as torch does."""
    if dtype == tl.float64:
        if x.dtype == tl.float64:
            y = x
        else:
            y = to_float32(x).to(tl.float64)  # exact
    else:
        y = from_float32(to_float32(x), dtype)
    return y


# --------------------------------------------------------------------------- block tables


def block_table(counts: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(owner, start) of every program of a grid giving item j ``counts[j]`` programs, item-major.

    Program p serves item ``owner[p]`` from its element ``start[p]`` (a multiple of ``step``), so a
    program never straddles two items and the kernel needs no search. int64 arrays, built on the host.
    """
    counts = np.asarray(counts, dtype=np.int64)
    owner = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    first = np.cumsum(counts) - counts
    return owner, (np.arange(owner.size, dtype=np.int64) - first[owner]) * step


# --------------------------------------------------------------------------- launch settings

# Warps of the memory-bound elementwise kernels (download, reconstruct): the usual choice for blocks of
# 1024-4096 elements; not tuned on hardware yet.
NUM_WARPS = 8


def launch_config(block: int) -> dict[str, int]:
    """Warps for the grouped sparsify's (matrix, block) kernels: 8 warps = 16 elements a thread at 4096 (not yet timed).

    ptxas for sm_90 at 4096 / 8 warps, no spills: scores_kernel 116 registers (2 blocks per SM),
    write_kernel 136, hist_kernel 31-36; only the hist/write loads of the block-padded scores
    vectorise (ld.global.v4), the pointer-table reads of the factors stay 32-bit (coalesced).
    """
    return {"num_warps": 8 if block >= 2048 else 4}
