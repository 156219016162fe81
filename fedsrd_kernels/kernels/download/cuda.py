"""The compiled CUDA ops of ``csrc/`` (extension ``fedsrd_kernels._C``): schemas, fake kernels, wrappers.

Importing this module declares the ops with ``torch.library`` (schema and fake kernel, so they
trace under torch.compile and pass ``torch.library.opcheck``); their CUDA kernels attach when the
extension loads (``_backend.cuda_extension_available()``, which imports this module first). All ops
are grouped: tensor ``t`` of a group is ``flat[offsets[t]:offsets[t + 1]]`` of a 1-D buffer, and
``offsets`` is a host list, checked and uploaded once per call.

    fedsrd::seeded_count(keys, offsets, threshold) -> counts
    fedsrd::seeded_compact(values, keys, offsets, threshold) -> (indices, kept, counts)
    fedsrd::seeded_expand_add(factor, values, keys, scales, offsets, threshold) -> out
        The download: the Philox mask of reference.py (key per tensor, threshold = floor(drop * 2**32))
        drawn in registers, never stored. seeded_count: the kept count of each tensor (``apply``
        checks each key's value count with it). seeded_compact (``Aggregator``'s download): each
        tensor's kept positions and values (a bit copy), in element order. seeded_expand_add
        (``apply``): ``out = factor + expand(values) * scales[t]`` (float32 arithmetic, one rounding
        per operation, as the torch reference); rejects a total value count that differs from the
        masks'.

Ops with a data-dependent output size (the compactions) and the count checks wait for the
device once per call, for a few bytes.

The bitmap codec (bitmap_compact, bitmap_expand_add), seeded_keep_mask and philox_words were
deleted: nothing but their tests called them. An upload's bitmap is chosen against gap coding
after zstd, on the CPU, from positions the wire needs on the CPU anyway; nothing applies a
bitmap-coded delta; the download kernels redraw the mask in registers instead of storing it;
and the Philox words are checked on the host build of philox.cuh (tests/test_cuda_compile.py)
and through the compaction's positions on a GPU (tests/test_cuda_ops.py).

The segmented top-k threshold (segmented_topk_threshold, with topk_thresholds and
keep_mask_from_thresholds) was deleted too: sparsify's GPU path is the grouped Triton pipeline
(kernels/sparsify/triton.py), whose radix select is fused with the passes around it (its first
digit is histogrammed by the scores kernel, its last pass stores the per-block histograms the
compaction places the kept entries from). The op returned only (threshold, ties) per matrix, so
wiring it in would have added a pass over every score to recount per block, for one launch
instead of seven.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from ...config import FACTOR_DTYPES, MAX_NUMEL, VALUE_DTYPES
from ...errors import ConfigError, SeededCountError, ShapeMismatchError
from .reference import drop_threshold

__all__ = [
    "dare_compact_cuda",
    "seeded_count_cuda",
    "seeded_expand_add_cuda",
]

SCHEMAS = {
    "seeded_count": "(Tensor keys, int[] offsets, int threshold) -> Tensor",
    "seeded_compact": (
        "(Tensor values, Tensor keys, int[] offsets, int threshold) -> (Tensor indices, Tensor kept, Tensor counts)"
    ),
    "seeded_expand_add": (
        "(Tensor factor, Tensor values, Tensor keys, Tensor scales, int[] offsets, int threshold) -> Tensor"
    ),
}

for _name, _schema in SCHEMAS.items():
    torch.library.define(f"fedsrd::{_name}", _schema)


# --------------------------------------------------------------------------- fake kernels


def _num_kept() -> torch.SymInt:
    return torch.library.get_ctx().new_dynamic_size()


@torch.library.register_fake("fedsrd::seeded_count")
def _seeded_count_fake(keys, offsets, threshold):
    return keys.new_empty(len(offsets) - 1, dtype=torch.int64)


@torch.library.register_fake("fedsrd::seeded_compact")
def _seeded_compact_fake(values, keys, offsets, threshold):
    nnz = _num_kept()
    return (values.new_empty(nnz, dtype=torch.int64), values.new_empty(nnz),
            values.new_empty(len(offsets) - 1, dtype=torch.int64))


@torch.library.register_fake("fedsrd::seeded_expand_add")
def _seeded_expand_add_fake(factor, values, keys, scales, offsets, threshold):
    return torch.empty_like(factor)



# --------------------------------------------------------------------------- checks

def _require_extension(what: str) -> None:
    from .._backend import cuda_extension_available, cuda_extension_status

    if not cuda_extension_available():
        raise ConfigError(f"{what}: the CUDA extension fedsrd_kernels._C is not loaded ({cuda_extension_status()})")


def _check_flat(what: str, name: str, tensor: torch.Tensor, dtypes: Sequence[torch.dtype]) -> torch.Tensor:
    if tensor.device.type != "cuda":
        raise ConfigError(f"{what}: {name} must be a CUDA tensor, got one on {tensor.device}")
    if tensor.dtype not in dtypes:
        raise ShapeMismatchError(f"{what}: {name} must have a dtype in {list(dtypes)}, got {tensor.dtype}")
    return tensor.reshape(-1).contiguous()


def _offsets(offsets: Sequence[int] | None, total: int, what: str, max_numel: int | None = None) -> list[int]:
    offsets = [0, total] if offsets is None else [int(o) for o in offsets]
    if not offsets or offsets[0] != 0 or offsets[-1] != total:
        raise ShapeMismatchError(f"{what}: offsets must start at 0 and end at the buffer size {total}, got {offsets}")
    sizes = [b - a for a, b in zip(offsets, offsets[1:])]
    if any(n < 0 for n in sizes):
        raise ShapeMismatchError(f"{what}: offsets must be non-decreasing, got {offsets}")
    if max_numel is not None and any(n > max_numel for n in sizes):
        raise ConfigError(f"{what}: a tensor exceeds the limit of {max_numel} elements")
    return offsets


def _keys(keys: Sequence[int], count: int, device: torch.device, what: str) -> torch.Tensor:
    if len(keys) != count:
        raise ShapeMismatchError(f"{what}: {len(keys)} keys for {count} tensors")
    for key in keys:
        if not isinstance(key, numbers.Integral) or isinstance(key, bool) or not 0 <= key < 2**63:
            raise ConfigError(f"{what}: keys must be ints in [0, 2**63), got {key!r}")
    return torch.tensor([int(k) for k in keys], dtype=torch.int64, device=device)


def _scales(scales: Sequence[float] | torch.Tensor, count: int, device: torch.device, what: str) -> torch.Tensor:
    if isinstance(scales, torch.Tensor):
        scales = scales.detach().to(device=device, dtype=torch.float32).reshape(-1).contiguous()
        if scales.numel() != count:
            raise ShapeMismatchError(f"{what}: {scales.numel()} scales for {count} tensors")
        return scales
    if len(scales) != count:
        raise ShapeMismatchError(f"{what}: {len(scales)} scales for {count} tensors")
    if not all(isinstance(s, numbers.Real) and math.isfinite(s) for s in scales):
        raise ConfigError(f"{what}: scales must be finite numbers, got {list(scales)}")
    # float32 rounding of each scale, as torch rounds a Python scalar multiplying a float32 tensor.
    return torch.tensor([float(s) for s in scales], dtype=torch.float32, device=device)



# --------------------------------------------------------------------------- seeded download


def seeded_count_cuda(offsets: Sequence[int], keys: Sequence[int], drop: float, device) -> list[int]:
    """How many elements each tensor's seeded mask keeps (one launch, registers only; one host sync)."""
    what = "seeded_count_cuda"
    _require_extension(what)
    device = torch.device(device)
    offsets = _offsets(offsets, int(offsets[-1]) if len(offsets) else 0, what, MAX_NUMEL)
    threshold = drop_threshold(drop)
    return torch.ops.fedsrd.seeded_count(_keys(keys, len(offsets) - 1, device, what), offsets, threshold).tolist()


def dare_compact_cuda(
    flat: torch.Tensor,
    offsets: Sequence[int],
    keys: Sequence[int],
    drop: float,
    value_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Seeded DARE compaction of a group: the contract of ``triton.dare_compact_grouped_triton``.

    Returns ``(indices, values, value_offsets)``: tensor t's kept positions (int64, local,
    sorted) and values (``value_dtype``; the cast is torch's, after the bit-exact compaction)
    are ``[value_offsets[t]:value_offsets[t + 1]]``.
    """
    what = "dare_compact_cuda"
    _require_extension(what)
    if value_dtype not in VALUE_DTYPES.values():
        raise ConfigError(f"{what}: value_dtype must be one of {tuple(VALUE_DTYPES.values())}, got {value_dtype!r}")
    flat = _check_flat(what, "flat", flat, (torch.float32, torch.float64))
    offsets = _offsets(offsets, flat.numel(), what, MAX_NUMEL)
    keys_dev = _keys(keys, len(offsets) - 1, flat.device, what)
    indices, kept, counts = torch.ops.fedsrd.seeded_compact(flat, keys_dev, offsets, drop_threshold(drop))
    value_offsets = [0, *torch.cumsum(counts, 0).tolist()]
    return indices, kept.to(value_dtype), value_offsets


def seeded_expand_add_cuda(
    flat_factor: torch.Tensor,
    offsets: Sequence[int],
    values: torch.Tensor,
    keys: Sequence[int],
    drop: float,
    scales: Sequence[float] | torch.Tensor,
    *,
    counts: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """The seeded apply of a group: the contract of ``seeded_expand_add_grouped_triton``.

    With ``counts`` (values per tensor), ``seeded_count`` counts every mask first and a tensor whose
    count differs raises SeededCountError naming it (``names[t]``, else its index); the op itself
    checks the total only.
    """
    what = "seeded_expand_add_cuda"
    _require_extension(what)
    flat = _check_flat(what, "factor", flat_factor, FACTOR_DTYPES)
    offsets = _offsets(offsets, flat.numel(), what, MAX_NUMEL)
    values = _check_flat(what, "values", values.to(flat.device), VALUE_DTYPES.values())
    count = len(offsets) - 1
    for given, name in ((counts, "counts"), (names, "names")):
        if given is not None and len(given) != count:
            raise ShapeMismatchError(f"{what}: {len(given)} {name} for {count} tensors")
    if counts is not None:
        for t, (kept, given) in enumerate(zip(seeded_count_cuda(offsets, keys, drop, flat.device), counts)):
            if kept != given:
                name = repr(names[t]) if names is not None else f"#{t}"
                raise SeededCountError(f"tensor {name}: its seeded mask keeps {kept} of {offsets[t + 1] - offsets[t]} "
                                       f"elements, but it carries {given} values")
    return torch.ops.fedsrd.seeded_expand_add(
        flat, values, _keys(keys, count, flat.device, what), _scales(scales, count, flat.device, what), offsets,
        drop_threshold(drop),
    ).view(flat_factor.shape)
