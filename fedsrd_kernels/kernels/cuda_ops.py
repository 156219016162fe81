"""The compiled CUDA ops of ``csrc/`` (extension ``fedsrd_kernels._C``): schemas, fake kernels, wrappers.

Importing this module declares the ops with ``torch.library`` (schema and fake kernel, so they
trace under torch.compile and pass ``torch.library.opcheck``); their CUDA kernels attach when the
extension loads (``_backend.cuda_extension_available()``, which imports this module first). All ops
are grouped: tensor ``t`` of a group is ``flat[offsets[t]:offsets[t + 1]]`` of a 1-D buffer, and
``offsets`` is a host list, checked and uploaded once per call.

    fedsrd::bitmap_compact(values, mask, offsets) -> (bitmap, kept, counts)
        Upload encode: each tensor's keep mask as np.packbits bytes (big-endian bit order within
        a byte, tensor t's bytes at ``bitmap_offsets(offsets)[t]``) and its kept values in
        element order (a bit copy: any 2/4/8-byte float dtype), kept count per tensor.
    fedsrd::bitmap_expand_add(factor, bitmap, values, scales, offsets) -> out
        Decode + apply: ``out = factor + expand(values) * scales[t]`` (float32 arithmetic, one
        rounding per operation, as ``server.apply``); rejects a bitmap with bits past a tensor's
        end or a value count that differs from the bits set.
    fedsrd::seeded_keep_mask(keys, offsets, threshold) -> mask
    fedsrd::seeded_compact(values, keys, offsets, threshold) -> (indices, kept, counts)
    fedsrd::seeded_expand_add(factor, values, keys, scales, offsets, threshold) -> out
        The download: the Philox mask of philox.py (key per tensor, threshold = floor(drop * 2**32))
        drawn in registers; the compaction and the expand-add as above.
    fedsrd::segmented_topk_threshold(scores, k, offsets) -> (threshold, ties)
        Per segment, the k-th largest score (radix select on the float bits, one block per
        segment, one launch) and how many scores equal to it to keep so exactly k are kept.
    fedsrd::philox_words(counters, key, use_curand=False) -> words
        Raw Philox4x32-10 words (int64 holding uint32), for tests.

Ops with a data-dependent output size (the compactions) and the decoders' checks wait for the
device once per call, for a few bytes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from ..config import FACTOR_DTYPES, MAX_NUMEL, VALUE_DTYPES
from ..errors import ConfigError, ShapeMismatchError
from .philox import drop_threshold

__all__ = [
    "bitmap_compact",
    "bitmap_expand_add",
    "bitmap_offsets",
    "dare_compact_cuda",
    "keep_mask_from_thresholds",
    "seeded_expand_add_cuda",
    "seeded_keep_mask_cuda",
    "topk_thresholds",
]

SCHEMAS = {
    "bitmap_compact": "(Tensor values, Tensor mask, int[] offsets) -> (Tensor bitmap, Tensor kept, Tensor counts)",
    "bitmap_expand_add": "(Tensor factor, Tensor bitmap, Tensor values, Tensor scales, int[] offsets) -> Tensor",
    "seeded_keep_mask": "(Tensor keys, int[] offsets, int threshold) -> Tensor",
    "seeded_compact": (
        "(Tensor values, Tensor keys, int[] offsets, int threshold) -> (Tensor indices, Tensor kept, Tensor counts)"
    ),
    "seeded_expand_add": (
        "(Tensor factor, Tensor values, Tensor keys, Tensor scales, int[] offsets, int threshold) -> Tensor"
    ),
    "segmented_topk_threshold": "(Tensor scores, Tensor k, int[] offsets) -> (Tensor threshold, Tensor ties)",
    "philox_words": "(Tensor counters, int key, bool use_curand=False) -> Tensor",
}

for _name, _schema in SCHEMAS.items():
    torch.library.define(f"fedsrd::{_name}", _schema)


# --------------------------------------------------------------------------- fake kernels


def _num_kept() -> torch.SymInt:
    return torch.library.get_ctx().new_dynamic_size()


@torch.library.register_fake("fedsrd::bitmap_compact")
def _bitmap_compact_fake(values, mask, offsets):
    num_bytes = bitmap_offsets(offsets)[-1]
    return (values.new_empty(num_bytes, dtype=torch.uint8), values.new_empty(_num_kept()),
            values.new_empty(len(offsets) - 1, dtype=torch.int64))


@torch.library.register_fake("fedsrd::bitmap_expand_add")
def _bitmap_expand_add_fake(factor, bitmap, values, scales, offsets):
    return torch.empty_like(factor)


@torch.library.register_fake("fedsrd::seeded_keep_mask")
def _seeded_keep_mask_fake(keys, offsets, threshold):
    return keys.new_empty(offsets[-1], dtype=torch.bool)


@torch.library.register_fake("fedsrd::seeded_compact")
def _seeded_compact_fake(values, keys, offsets, threshold):
    nnz = _num_kept()
    return (values.new_empty(nnz, dtype=torch.int64), values.new_empty(nnz),
            values.new_empty(len(offsets) - 1, dtype=torch.int64))


@torch.library.register_fake("fedsrd::seeded_expand_add")
def _seeded_expand_add_fake(factor, values, keys, scales, offsets, threshold):
    return torch.empty_like(factor)


@torch.library.register_fake("fedsrd::segmented_topk_threshold")
def _segmented_topk_threshold_fake(scores, k, offsets):
    return scores.new_empty(len(offsets) - 1), k.new_empty(len(offsets) - 1)


@torch.library.register_fake("fedsrd::philox_words")
def _philox_words_fake(counters, key, use_curand=False):
    return counters.new_empty((counters.shape[0], 4))


# --------------------------------------------------------------------------- checks

_COPY_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # compaction: a bit copy


def _require_extension(what: str) -> None:
    from ._backend import cuda_extension_available, cuda_extension_status

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



def bitmap_offsets(offsets: Sequence[int]) -> list[int]:
    """First byte of each tensor's bitmap in a group's bitmap buffer (last entry: its size)."""
    out = [0]
    for a, b in zip(offsets, offsets[1:]):
        out.append(out[-1] + (int(b) - int(a) + 7) // 8)
    return out


# --------------------------------------------------------------------------- codec


def bitmap_compact(
    values: torch.Tensor, mask: torch.Tensor, offsets: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode positions and values on the GPU: ``(bitmap, kept, counts)``.

    ``values`` (any float dtype; flattened) and the bool ``mask`` of the same size hold a group
    of tensors laid end to end (``offsets``; default one tensor). ``bitmap`` is uint8: tensor t's
    ``np.packbits(mask_t)`` at ``bitmap_offsets(offsets)[t]``; ``kept`` = ``values[mask]`` in
    element order, same dtype; ``counts`` (int64, device) kept per tensor.
    """
    what = "bitmap_compact"
    _require_extension(what)
    values = _check_flat(what, "values", values, _COPY_DTYPES)
    mask = _check_flat(what, "mask", mask, (torch.bool,))
    if mask.numel() != values.numel():
        raise ShapeMismatchError(f"{what}: mask has {mask.numel()} elements, values {values.numel()}")
    return torch.ops.fedsrd.bitmap_compact(values, mask.to(values.device), _offsets(offsets, values.numel(), what))


def bitmap_expand_add(
    factor: torch.Tensor,
    bitmap: torch.Tensor,
    values: torch.Tensor,
    scales: Sequence[float] | torch.Tensor,
    offsets: Sequence[int] | None = None,
) -> torch.Tensor:
    """Decode and apply on the GPU: a new ``factor + expand(bitmap, values) * scales[t]``.

    ``factor`` (float32 or bfloat16, any shape; the group laid end to end as ``offsets``),
    ``bitmap`` as :func:`bitmap_compact` makes it, ``values`` (float32/bfloat16/float16) the kept
    values of all tensors in order. The result equals ``server.apply`` bit for bit. Raises
    RuntimeError when the bitmap has bits past a tensor's end or keeps another number of
    elements than ``values`` holds.
    """
    what = "bitmap_expand_add"
    _require_extension(what)
    flat = _check_flat(what, "factor", factor, FACTOR_DTYPES)
    offsets = _offsets(offsets, flat.numel(), what)
    bitmap = _check_flat(what, "bitmap", bitmap.to(flat.device), (torch.uint8,))
    values = _check_flat(what, "values", values.to(flat.device), VALUE_DTYPES.values())
    scales_dev = _scales(scales, len(offsets) - 1, flat.device, what)
    return torch.ops.fedsrd.bitmap_expand_add(flat, bitmap, values, scales_dev, offsets).view(factor.shape)


# --------------------------------------------------------------------------- seeded download


def seeded_keep_mask_cuda(offsets: Sequence[int], keys: Sequence[int], drop: float, device) -> torch.Tensor:
    """The keep masks of a group (bool, flat), drawn on ``device``; equals ``philox.seeded_keep_mask`` per tensor."""
    what = "seeded_keep_mask_cuda"
    _require_extension(what)
    device = torch.device(device)
    offsets = _offsets(offsets, int(offsets[-1]) if len(offsets) else 0, what, MAX_NUMEL)
    threshold = drop_threshold(drop)
    return torch.ops.fedsrd.seeded_keep_mask(_keys(keys, len(offsets) - 1, device, what), offsets, threshold)


def dare_compact_cuda(
    flat: torch.Tensor,
    offsets: Sequence[int],
    keys: Sequence[int],
    drop: float,
    value_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Seeded DARE compaction of a group: the contract of ``download_triton.dare_compact_grouped_triton``.

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
) -> torch.Tensor:
    """The client's seeded apply of a group: the contract of ``seeded_expand_add_grouped_triton``."""
    what = "seeded_expand_add_cuda"
    _require_extension(what)
    flat = _check_flat(what, "factor", flat_factor, FACTOR_DTYPES)
    offsets = _offsets(offsets, flat.numel(), what, MAX_NUMEL)
    values = _check_flat(what, "values", values.to(flat.device), VALUE_DTYPES.values())
    count = len(offsets) - 1
    return torch.ops.fedsrd.seeded_expand_add(
        flat, values, _keys(keys, count, flat.device, what), _scales(scales, count, flat.device, what), offsets,
        drop_threshold(drop),
    ).view(flat_factor.shape)


# --------------------------------------------------------------------------- top-k threshold


def topk_thresholds(
    scores: torch.Tensor, offsets: Sequence[int], k: Sequence[int] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per segment of ``scores`` (float32, >= 0): the k-th largest score and the ties to keep.

    ``(threshold, ties)`` on the device: keeping every score above ``threshold[s]`` and the first
    ``ties[s]`` scores equal to it (:func:`keep_mask_from_thresholds`) keeps exactly
    ``min(k[s], n_s)`` scores, the largest. ``k`` may live on the device (no sync). Scores are
    compared by their bits with -0.0 read as 0.0; a negative score is never kept; a
    segment keeping nothing gets the threshold NaN 0x7FFFFFFF (above every score) and 0 ties.
    """
    what = "topk_thresholds"
    _require_extension(what)
    scores = _check_flat(what, "scores", scores, (torch.float32,))
    offsets = _offsets(offsets, scores.numel(), what, 2**31 - 1)
    k_dev = torch.as_tensor(k, dtype=torch.int64).to(scores.device).reshape(-1).contiguous()
    if k_dev.numel() != len(offsets) - 1:
        raise ShapeMismatchError(f"{what}: {k_dev.numel()} values of k for {len(offsets) - 1} segments")
    return torch.ops.fedsrd.segmented_topk_threshold(scores, k_dev, offsets)


def keep_mask_from_thresholds(
    scores: torch.Tensor, offsets: Sequence[int], threshold: torch.Tensor, ties: torch.Tensor
) -> torch.Tensor:
    """The flat keep mask of :func:`topk_thresholds`' result (torch, any device).

    Keeps the scores whose ordering key (float bits, -0.0 as 0.0) is above the threshold's, and
    the first ``ties[s]`` equal to it in index order; this is the input of :func:`bitmap_compact`.
    """
    flat = scores.reshape(-1)
    device = flat.device
    starts = torch.tensor([int(o) for o in offsets], dtype=torch.int64, device=device)
    segment = torch.repeat_interleave(torch.arange(starts.numel() - 1, device=device), starts.diff())
    key = flat.view(torch.int32)
    key = torch.where(key == -(2**31), 0, key)  # -0.0 -> +0.0
    limit = threshold.to(device).view(torch.int32)[segment]
    tie = key == limit
    ties_before = torch.cat([tie.new_zeros(1, dtype=torch.int64), torch.cumsum(tie, 0)])  # [i]: ties in [0, i)
    rank = ties_before[:-1] - ties_before[starts[:-1]][segment]  # ties before i in its own segment
    return (key > limit) | (tie & (rank < ties.to(device)[segment]))
