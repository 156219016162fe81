"""Importance scores, kurtosis-adaptive keep ratio and exact top-k selection
(spec section 1, eq. 6-8), and the grouped sparsify built from them
(``sparsify_grouped_torch``): the torch reference and CPU path.

The CPU path is written for one thread's speed (the drop-in API's usual client)
without changing a bit of the result: the float64 kurtosis runs in place on one
copy (each fresh multi-MB tensor costs page faults), and the top-k set comes from
a threshold when the boundary is not tied (``top_k_indices``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ...errors import ConfigError, ShapeMismatchError
from .grouped import GroupedSparse, check_pairs


def importance(
    dA: torch.Tensor, dB: torch.Tensor, A_prev: torch.Tensor, B_new: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Element importance of a client's factor deltas (eq. 6); returns (I(dA), I(dB)).

    I(dB)[u, v] = |dB[u, v]| * ||A_prev[v, :]||  (dB multiplies the old A in dW)
    I(dA)[u, v] = |dA[u, v]| * ||B_new[:, u]||   (dA is multiplied by the new B)
    Scores are float32 (float64 if any input is float64).
    """
    r = A_prev.shape[0]
    if not (dA.shape == A_prev.shape and dB.shape == B_new.shape and B_new.shape[1] == r):
        raise ShapeMismatchError(
            f"importance: need dA, A_prev (r x d_in) and dB, B_new (d_out x r) with one r; got "
            f"dA {tuple(dA.shape)}, A_prev {tuple(A_prev.shape)}, dB {tuple(dB.shape)}, "
            f"B_new {tuple(B_new.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(dA.dtype, dB.dtype), torch.float32)
    a_row_norms = torch.linalg.vector_norm(A_prev.to(dtype), dim=1)  # (r,)
    b_col_norms = torch.linalg.vector_norm(B_new.to(dtype), dim=0)  # (r,)
    score_a = dA.to(dtype).abs().mul_(b_col_norms[:, None])  # abs() is a new tensor: scale it in place
    score_b = dB.to(dtype).abs().mul_(a_row_norms[None, :])
    return score_a, score_b


def pearson_kurtosis(scores: torch.Tensor, *, workspace: torch.Tensor | None = None) -> float:
    """Pearson kurtosis m4 / m2^2 (population moments, not excess), in float64.

    A constant input (m2 == 0) has no defined kurtosis; it returns 1.0, the
    smallest kurtosis any distribution has, which maps to the base ratio.
    ``workspace``: a float64 tensor of at least ``scores.numel()`` elements on
    the device of ``scores`` to work in (its contents are overwritten), so that a
    caller going through many matrices does not allocate a float64 copy for each.
    """
    flat = scores.detach().flatten()
    if flat.numel() == 0:
        return 1.0
    if not flat.is_floating_point():
        flat = flat.to(torch.float64)
    low, high = torch.aminmax(flat)  # the largest |score| without an abs() copy (NaN propagates)
    peak = torch.maximum(high, -low).to(torch.float64)
    if peak == 0:
        return 1.0
    # One float64 copy, then in place: x / peak (kurtosis is scale-free; this keeps m2^2 far from
    # underflow), minus its mean, squared. The same float64 operations as out of place, so the same bits.
    x = _float64_copy(flat, workspace)
    x.div_(peak)
    x.sub_(x.mean())
    m2 = x.square_().mean()
    if m2 == 0:
        return 1.0
    m4 = x.square_().mean()
    return float(m4 / (m2 * m2))


def _float64_copy(flat: torch.Tensor, workspace: torch.Tensor | None) -> torch.Tensor:
    """``flat`` converted to float64 in a tensor of its own: the front of ``workspace``, or a new one."""
    if workspace is None:
        return flat.to(torch.float64, copy=True)
    if workspace.dtype != torch.float64 or workspace.device != flat.device or workspace.numel() < flat.numel():
        raise ShapeMismatchError(
            f"workspace must be float64 on {flat.device} with >= {flat.numel()} elements, got "
            f"{workspace.dtype} on {workspace.device} with {workspace.numel()}"
        )
    return workspace.view(-1)[: flat.numel()].copy_(flat)


def ratio_from_kurtosis(kappa: float, base: float = 0.85, coeff: float = 0.1, upper: float = 0.11) -> float:
    """Eq. 7 from a kurtosis already taken: rho = base + min(upper, coeff * ln(max(kappa, 1)))."""
    return base + min(upper, coeff * math.log(max(kappa, 1.0)))


def kurtosis_ratio(scores: torch.Tensor, base: float = 0.85, coeff: float = 0.1, upper: float = 0.11) -> float:
    """Adaptive sparsity ratio (eq. 7): rho = base + min(upper, coeff * ln(max(kappa, 1)))."""
    return ratio_from_kurtosis(pearson_kurtosis(scores), base, coeff, upper)


def keep_count(n: int, rho: float) -> int:
    """Number of elements kept out of n at ratio rho: k = n - ceil(rho * (n - 1)).

    This is the count of scores >= the rho-quantile (linear interpolation, as
    torch.quantile) when scores are distinct; for rho in [0, 1] and n >= 1 it
    lies in [1, n].
    """
    if not (isinstance(n, int) and n >= 0):
        raise ConfigError(f"keep_count: n must be an int >= 0, got {n!r}")
    if not (math.isfinite(rho) and 0.0 <= rho <= 1.0):
        raise ConfigError(f"keep_count: rho must be in [0, 1], got {rho!r}")
    if n == 0:
        return 0
    return n - math.ceil(rho * (n - 1))


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the k largest scores (ties at the boundary: any of them).

    The rule is ``torch.topk(flat, k).indices.sort()``, and that is what runs when
    the k-th largest score is tied (which of the tied scores topk keeps is its own
    choice, so only topk can repeat it). When it is not tied, the k largest are one
    set, the scores >= the k-th largest, and on CPU ``_untied_top_k`` finds that set
    ~10x faster than topk and the sort (numpy's partition and a comparison instead
    of a selection of (value, index) pairs): the same indices, bit for bit.
    """
    flat = scores.flatten()
    if k >= flat.numel():
        return torch.arange(flat.numel(), device=flat.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=flat.device)
    kept = _untied_top_k(flat, k)
    if kept is None:
        kept = torch.topk(flat, k, sorted=False).indices.sort().values
    return kept


_SAMPLE_STEP = 61  # a prime: the strided sample does not alias with rows of 2^j or 3 * 2^j scores
_SAMPLE_FROM = 1 << 15  # fewer scores than this: partition them all, the sample would not pay


def _untied_top_k(flat: torch.Tensor, k: int) -> torch.Tensor | None:
    """Ascending indices of the k largest of ``flat`` (0 < k < n) when that set is unique, else None.

    With T the k-th largest value, the set is unique exactly when k scores are >= T
    (no score outside the k largest equals T), and then it is those scores, whatever
    topk would do. NaN orders above every number in topk but fails every comparison,
    so a NaN sends the call back to topk. T is searched among the candidates, the
    scores >= a floor that a strided sample puts a little below it: whatever the
    floor, the k-th largest candidate is T when at least k scores reach the floor
    (else all scores are searched), so the sample only decides the speed. CPU
    float32/float64 tensors only (numpy; torch has no CPU selection without
    indices); others return None.
    """
    if flat.device.type != "cpu" or flat.dtype not in (torch.float32, torch.float64):
        return None
    values = flat.detach().numpy()
    if np.isnan(values).any():
        return None
    index = None  # positions of the candidates; None: every score is one
    candidates = values
    if values.size >= _SAMPLE_FROM:
        index = np.flatnonzero(values >= _candidate_floor(values, k))
        if index.size >= k:
            candidates = values[index]
        else:  # the floor came out above T: search all scores
            index = None
    m = candidates.size
    threshold = np.partition(candidates, m - k)[m - k]
    keep = candidates >= threshold
    if np.count_nonzero(keep) != k:  # the k-th largest is tied: topk decides
        return None
    kept = np.flatnonzero(keep) if index is None else index[keep]
    return torch.from_numpy(kept.astype(np.int64, copy=False))


def _candidate_floor(values: np.ndarray, k: int) -> float:
    """A score that ~k plus 4 standard deviations of the scores reach, by a strided sample of them."""
    sample = values[::_SAMPLE_STEP]
    expected = k * sample.size / values.size  # sampled scores among the k largest
    want = min(sample.size, math.ceil(expected + 4 * math.sqrt(expected) + 8))
    return np.partition(sample, sample.size - want)[sample.size - want]


def select_top(
    delta: torch.Tensor,
    scores: torch.Tensor,
    base: float,
    coeff: float,
    upper: float,
    rescale: bool,
    *,
    kappa: float | None = None,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float | None] | None:
    """Eq. 7-8 plus the L1 rescale for one matrix: (sorted kept indices, kept values, scale).

    None for an all-zero delta (it never reaches the kurtosis of a constant).
    The scale is None when the top scores all sit on zero entries: the sparse
    delta is zero and nothing is worth sending. ``kappa`` is the kurtosis of
    ``scores`` when the caller has it already (it reads every score in float64);
    ``workspace`` is as for ``pearson_kurtosis``.
    """
    flat = delta.flatten()
    # The float64 sum of |delta| (a float64 copy, then its sum: what sum(dtype=float64) does), 0 exactly
    # when the delta is all zero, NaN when it holds a NaN.
    dense_l1 = float(_float64_copy(flat, workspace).abs_().sum())
    if dense_l1 == 0.0:
        return None
    if kappa is None:
        kappa = pearson_kurtosis(scores, workspace=workspace)
    kept = top_k_indices(scores, keep_count(flat.numel(), ratio_from_kurtosis(kappa, base, coeff, upper)))
    values = flat.index_select(0, kept)  # flat[kept], without advanced indexing's overhead
    kept_l1 = float(values.abs().sum(dtype=torch.float64))
    if kept_l1 == 0.0:
        return kept, values, None
    scale = dense_l1 / kept_l1 if rescale else 1.0
    return kept, values, scale


def sparsify_grouped_torch(
    pairs: Sequence[Sequence[torch.Tensor]],
    *,
    base: float = 0.85,
    coeff: float = 0.1,
    upper: float = 0.11,
    rescale: bool = True,
    names: Sequence[str] | None = None,
) -> GroupedSparse:
    """The torch path: one matrix at a time (the ops above), packed as a GroupedSparse.

    Same rule as ``client.sparsify_matrix`` with selection "importance" and
    float32 values; it syncs with the device once per matrix.
    """
    checked = check_pairs(pairs, names)
    shapes, indices, values, counts, scales, kurt = [], [], [], [], [], []
    device = checked[0].a_prev.device if checked else torch.device("cpu")
    # One float64 buffer for every matrix's kurtosis and L1 sum (a fresh one per matrix costs page faults).
    largest = max((t.numel() for fp in checked for t in (fp.a_prev, fp.b_prev)), default=0)
    workspace = torch.empty(largest, dtype=torch.float64, device=device)
    for fp in checked:
        a_prev, b_prev, a_new, b_new = (t.to(torch.float32) for t in fp)
        d_a, d_b = a_new - a_prev, b_new - b_prev
        score_a, score_b = importance(d_a, d_b, a_prev, b_new)
        for delta, scores in ((d_a, score_a), (d_b, score_b)):
            shapes.append(tuple(delta.shape))
            kurt.append(pearson_kurtosis(scores, workspace=workspace))
            chosen = select_top(delta, scores, base, coeff, upper, rescale, kappa=kurt[-1], workspace=workspace)
            if chosen is None:
                counts.append(0)
                scales.append(None)
                continue
            kept, kept_values, scale = chosen
            indices.append(kept)
            values.append(kept_values)
            counts.append(kept.numel())
            scales.append(None if scale is None else float(torch.tensor(scale, dtype=torch.float32)))
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return GroupedSparse(
        shapes=tuple(shapes),
        indices=torch.cat(indices) if indices else torch.empty(0, dtype=torch.long, device=device),
        values=torch.cat(values) if values else torch.empty(0, dtype=torch.float32, device=device),
        offsets=tuple(offsets),
        scales=tuple(scales),
        kurtosis=tuple(kurt),
    )
