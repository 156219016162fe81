"""A dense float64 restatement of the spec, for tests, the demo and benchmarks.

Written plainly from ../spec (dense W, full SVD, pinv, numpy quantiles) and
sharing no code with the package's factored path, so agreement between the
two means something. It is slow and memory-hungry on purpose: never use it
as the aggregation path.
"""

from __future__ import annotations

import math

import numpy as np

from .kernels.download.reference import seeded_keep_indices
from .lora import lora_layout


def f64(tensor) -> np.ndarray:
    return tensor.detach().cpu().double().numpy()


def importance(d_a: np.ndarray, d_b: np.ndarray, a_prev: np.ndarray, b_new: np.ndarray):
    """Eq. 6, element by element: (I(dA), I(dB))."""
    score_a = np.empty_like(d_a)
    for u in range(d_a.shape[0]):
        score_a[u, :] = np.abs(d_a[u, :]) * np.sqrt(np.sum(b_new[:, u] ** 2))
    score_b = np.empty_like(d_b)
    for v in range(d_b.shape[1]):
        score_b[:, v] = np.abs(d_b[:, v]) * np.sqrt(np.sum(a_prev[v, :] ** 2))
    return score_a, score_b


def kurtosis(x: np.ndarray) -> float:
    x = x.ravel()
    m2 = np.mean((x - x.mean()) ** 2)
    if m2 == 0:
        return 1.0
    return float(np.mean((x - x.mean()) ** 4) / m2**2)


def ratio(scores: np.ndarray, base: float, coeff: float, upper: float) -> float:
    return base + min(upper, coeff * math.log(max(kurtosis(scores), 1.0)))


def sparsify_matrix(delta: np.ndarray, scores: np.ndarray, base, coeff, upper, rescale: bool) -> np.ndarray:
    """Keep the scores >= their rho-quantile (eq. 8), then the L1 rescale."""
    if not np.any(delta):
        return np.zeros_like(delta)
    rho = ratio(scores, base, coeff, upper)
    keep = scores >= np.quantile(scores.ravel(), rho)
    sparse = np.where(keep, delta, 0.0)
    if rescale and np.abs(sparse).sum() > 0:
        sparse = sparse * (np.abs(delta).sum() / np.abs(sparse).sum())
    return sparse


def sparsify_pair(b_local, a_local, b_global, a_global, base=0.85, coeff=0.1, upper=0.11, rescale=True):
    """Eq. 4-8 for one pair: the dense sparsified (dB, dA) a client sends."""
    d_b, d_a = b_local - b_global, a_local - a_global
    score_a, score_b = importance(d_a, d_b, a_global, b_local)
    return (
        sparsify_matrix(d_b, score_b, base, coeff, upper, rescale),
        sparsify_matrix(d_a, score_a, base, coeff, upper, rescale),
    )


def server_pair(b_prev, a_prev, client_d_b, client_d_a, weights, round, truncate_rank, rtol_b, rtol_a):
    """Eq. 9-13 for one pair, dense: returns (moved factor, its delta)."""
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    w = sum(p_i * (b_prev + d_b) @ (a_prev + d_a) for p_i, d_b, d_a in zip(p, client_d_b, client_d_a))
    if truncate_rank is not None:
        u, s, vh = np.linalg.svd(w, full_matrices=False)
        k = truncate_rank
        w = (u[:, :k] * s[:k]) @ vh[:k]
    d_w = w - b_prev @ a_prev
    r = a_prev.shape[0]
    move = "B" if round % 2 == 1 else "A"
    rank_of = {"B": np.linalg.matrix_rank(a_prev, rtol=rtol_a), "A": np.linalg.matrix_rank(b_prev, rtol=rtol_b)}
    other = "A" if move == "B" else "B"
    if rank_of[move] < r and rank_of[other] > rank_of[move]:
        move = other
    if move == "B":
        return "B", d_w @ np.linalg.pinv(a_prev, rtol=rtol_a)
    return "A", np.linalg.pinv(b_prev, rtol=rtol_b) @ d_w


def federated_round(global_state, local_states, weights, round, *, method="fedsrd", rank=None,
                    download_drop=0.8, seed=0, base=0.85, coeff=0.1, upper=0.11, rescale=True,
                    projection_rtol=1e-2):
    """One whole FedSRD / FedSRD-e round: float64 states out.

    LoRA pairs follow eq. 4-13 plus the seeded DARE download; any other
    floating key moves by the weighted mean of the clients' deltas.

    global_state and local_states map keys to torch tensors; the result maps
    keys to float64 numpy arrays.
    """
    eps32 = np.finfo(np.float32).eps
    out = {key: f64(value) for key, value in global_state.items()}
    p = np.asarray(weights if weights is not None else [1.0] * len(local_states), dtype=np.float64)
    p = p / p.sum()
    layout = lora_layout(global_state)
    for key in layout.other_keys:
        if global_state[key].is_floating_point():
            out[key] = out[key] + sum(p_i * (f64(local[key]) - out[key]) for p_i, local in zip(p, local_states))
    for pair in layout.pairs:
        b_prev, a_prev = out[pair.b_key], out[pair.a_key]
        sent = [
            sparsify_pair(f64(local[pair.b_key]), f64(local[pair.a_key]), b_prev, a_prev, base, coeff, upper, rescale)
            for local in local_states
        ]
        truncate = (rank or pair.rank) if method == "fedsrd" else None
        rtol_b = max(projection_rtol, max(b_prev.shape) * eps32)
        rtol_a = max(projection_rtol, max(a_prev.shape) * eps32)
        move, delta = server_pair(
            b_prev, a_prev, [s[0] for s in sent], [s[1] for s in sent],
            p, round, truncate, rtol_b, rtol_a,
        )
        key = pair.b_key if move == "B" else pair.a_key
        if download_drop > 0:
            kept = np.zeros(delta.size, dtype=bool)
            kept[seeded_keep_indices(delta.size, seed=seed, round=round, name=key, drop=download_drop).numpy()] = True
            delta = np.where(kept.reshape(delta.shape), delta / (1.0 - download_drop), 0.0)
        out[key] = out[key] + delta
    return out
