"""Batched server math on the factors: all pairs of one shape in one call.

Shapes: B (G, d_out, r), A (G, r, d_in) for G pairs; client deltas
dB (G, m, d_out, r), dA (G, m, r, d_in); weights p (m,) summing to 1. All
float64: on the factors the float64 working set is O(m (d_out + d_in) r), and
float64 keeps the update W_r - B A, a small difference of large terms, at
~1e-12 relative instead of the 3.7e-3 a dense float32 path reaches.

Three ways to the moved factor's delta (spec eq. 9-13):
  delta_form_update   FedSRD-e: dW = B dA_bar + dB_bar A + sum_i p_i dB_i dA_i,
                      projected term by term (no cancellation, no SVD; linear in
                      each client, so it also streams exactly)
  exact_update        FedSRD: orthonormal bases of [B, dB_1..m] and [A; dA_1..m],
                      the (m+1) r square core holds W and B A; SVD_r and the
                      subtraction happen on the core
  randomized_update   FedSRD for large m r: subspace iteration on x -> W x,
                      warm-started from the previous factors, then the same
                      core step on the l = r + oversample dimensional range
Every decomposition is on a k x k core (eigh of Gram matrices), never on a tall
block: on a GPU, batched QR of tall blocks is the slow part (see the server issue).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_cpu_thread(x: torch.Tensor | None = None) -> Iterator[None]:
    """Run the small CPU decompositions (k x k eigh/SVD, k <= a few hundred) on one thread.

    With torch's default 2 threads on a 2-core machine that other jobs share, the
    OpenMP threads inside LAPACK spin and stall on these tiny problems: a batched
    eigh of 4 x 144 x 144 went from 7 ms to a median of 55 ms (max 4.6 s), and whole
    rounds swung from 0.2 s to 19 s. One thread costs under 0.01 ms to set and
    brought the round to 0.16 s. ``torch.set_num_threads`` is process-wide, so the
    scope is kept to the small calls (and to small server batches, see
    ``decompose.ONE_THREAD_ELEMENTS``); on a GPU this does nothing.
    """
    threads = torch.get_num_threads()
    if (x is not None and x.device.type != "cpu") or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def eigh(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with one_cpu_thread(x):
        return torch.linalg.eigh(x)


def mT(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def whitening_step(gram: torch.Tensor, rtol: float = 1e-12) -> tuple[torch.Tensor, float]:
    """(S, spread) for a Gram matrix X^T X (..., c, c): the columns of X S are orthonormal-or-zero.

    S = D^-1 V L^-1/2, where D equilibrates the columns (D = sqrt(diag(gram))) and
    V L V^T is the eigendecomposition of the equilibrated Gram. Directions with
    eigenvalue below rtol * max get a zero column, so rank-deficient input (zero B in
    round 1, duplicate clients) gives orthonormal-or-zero columns instead of NaN.
    ``spread`` is the largest max/min ratio of the kept eigenvalues (cond(X D^-1)^2)
    over the batch: one step leaves X S orthonormal only to ~eps * spread.
    """
    diag = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()  # column norms
    inv_norm = torch.where(diag > 0, 1.0 / torch.where(diag > 0, diag, torch.ones_like(diag)), torch.zeros_like(diag))
    evals, evecs = eigh(gram * inv_norm.unsqueeze(-1) * inv_norm.unsqueeze(-2))
    top = evals.amax(dim=-1, keepdim=True)
    keep = evals > rtol * top
    inv_sqrt = torch.where(keep, evals.clamp_min(torch.finfo(gram.dtype).tiny).rsqrt(), torch.zeros_like(evals))
    low = torch.where(keep, evals, top).amin(dim=-1, keepdim=True)
    spread = float((top / low.clamp_min(torch.finfo(gram.dtype).tiny)).amax()) if gram.numel() else 1.0
    return inv_norm.unsqueeze(-1) * (evecs * inv_sqrt.unsqueeze(-2)), spread


def cholesky_step(gram: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """(S, spread bound) with X S orthonormal-or-zero, from the Cholesky factor of the equilibrated Gram.

    The fast form of ``whitening_step`` for full-rank X (a Cholesky factor and a
    triangular inverse cost 1.1 ms where eigh costs 9.4, for 4 x 144 x 144 float64 on
    one thread). Zero columns (B = 0 in round 1) are set aside and get zero columns in
    S. The bound (||L||_F ||L^-1||_F)^2 >= cond(X D^-1)^2 is returned as the spread;
    it is infinite where the factorisation fails (dependent columns), and the caller
    then takes ``whitening_step``.
    """
    diag = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    nonzero = diag > 0
    inv_norm = torch.where(nonzero, 1.0 / torch.where(nonzero, diag, torch.ones_like(diag)), torch.zeros_like(diag))
    equilibrated = gram * inv_norm.unsqueeze(-1) * inv_norm.unsqueeze(-2)
    equilibrated = equilibrated + torch.diag_embed((~nonzero).to(gram.dtype))  # zero columns: an identity block
    factor, info = torch.linalg.cholesky_ex(equilibrated)
    if bool((info != 0).any()) or gram.numel() == 0:
        return None, float("inf")
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device).expand_as(gram)
    inverse = torch.linalg.solve_triangular(factor, eye, upper=False)
    bound = (torch.linalg.matrix_norm(factor) * torch.linalg.matrix_norm(inverse)) ** 2
    return inv_norm.unsqueeze(-1) * mT(inverse), float(bound.amax())


def svqb(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal(-or-zero) basis of the columns of x (..., n, c), explicitly.

    SVQB (Stathopoulos & Wu 2002): two passes of ``whitening_step`` on the Gram of
    the current block; the second restores orthogonality to ~eps.
    """
    q = x
    for _ in range(2):
        q = q @ whitening_step(mT(q) @ q)[0]
    return q


# Largest eigenvalue spread of the equilibrated Gram for which a basis is taken from the
# Gram alone: X S is then orthonormal to ~eps * 1e6 = 2e-10, far below the float32 the
# factors are stored in. Above it (near-collinear client deltas) the basis is formed
# explicitly by svqb, orthonormal to ~eps whatever the conditioning.
GRAM_SPREAD_LIMIT = 1e6


def gram_pinv(factor: torch.Tensor, side: str, rtol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pseudo-inverse of a LoRA factor through its r x r Gram, batched.

    side "B": factor (..., d_out, r), returns B^+ (..., r, d_out), P = B^+ B (r x r).
    side "A": factor (..., r, d_in), returns A^+ (..., d_in, r), P = A A^+ (r x r).
    Singular values below rtol * sigma_max count as zero (eigenvalues below
    rtol^2 * lambda_max). Also returns the numerical rank per pair.
    """
    gram = mT(factor) @ factor if side == "B" else factor @ mT(factor)
    evals, evecs = eigh(gram)
    top = evals.amax(dim=-1, keepdim=True)
    keep = (evals > (rtol * rtol) * top) & (top > 0)
    inv = torch.where(keep, 1.0 / evals.clamp_min(torch.finfo(gram.dtype).tiny), torch.zeros_like(evals))
    gram_inv = (evecs * inv.unsqueeze(-2)) @ mT(evecs)
    projector = (evecs * keep.to(evecs.dtype).unsqueeze(-2)) @ mT(evecs)
    pinv = gram_inv @ mT(factor) if side == "B" else mT(factor) @ gram_inv
    return pinv, projector, keep.sum(dim=-1)


def numerical_rank(factor: torch.Tensor, side: str, rtol: float) -> torch.Tensor:
    """Rank per pair from the r x r Gram (singular values above rtol * sigma_max)."""
    gram = mT(factor) @ factor if side == "B" else factor @ mT(factor)
    with one_cpu_thread(gram):
        evals = torch.linalg.eigvalsh(gram)
    top = evals.amax(dim=-1, keepdim=True)
    return ((evals > (rtol * rtol) * top) & (top > 0)).sum(dim=-1)


def weighted_sum(deltas: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """sum_i p_i delta_i over the client axis (dim 1)."""
    return torch.einsum("gm...,m->g...", deltas, p)


def delta_form_update(b, a, d_b, d_a, p, move: str, rtol: float) -> torch.Tensor:
    """FedSRD-e's moved-factor delta without forming W (no SVD)."""
    b_bar, a_bar = weighted_sum(d_b, p), weighted_sum(d_a, p)
    if move == "B":
        a_pinv, proj, _ = gram_pinv(a, "A", rtol)  # (G, d_in, r), A A^+
        cross = weighted_sum(d_b @ (d_a @ a_pinv.unsqueeze(1)), p)  # sum p_i dB_i (dA_i A^+)
        return b @ (a_bar @ a_pinv) + b_bar @ proj + cross
    b_pinv, proj, _ = gram_pinv(b, "B", rtol)  # (G, r, d_out), B^+ B
    cross = weighted_sum((b_pinv.unsqueeze(1) @ d_b) @ d_a, p)  # sum p_i (B^+ dB_i) dA_i
    return proj @ a_bar + (b_pinv @ b_bar) @ a + cross


def truncate_core(core: torch.Tensor, rank: int) -> torch.Tensor:
    """SVD_r of a small core (..., k, n): the projection onto its top-r left singular vectors.

    The singular vectors come from eigh of the smaller of K K^T and K^T K: half the
    time of torch.linalg.svd (4 x 144 x 144 float64, 1 thread: 9.4 against 19.8 ms).
    Squaring costs accuracy only in the singular vectors past the top r, whose
    directions are cut anyway; the kept subspace is off by ~eps * (sigma_1 / gap)^2,
    1e-11 relative on the oracle tests.
    """
    rows, cols = core.shape[-2:]
    wide = rows <= cols
    gram = core @ mT(core) if wide else mT(core) @ core
    _, vecs = eigh(gram)  # ascending
    top = vecs[..., -rank:] if rank <= vecs.shape[-1] else vecs
    return top @ (mT(top) @ core) if wide else (core @ top) @ mT(top)


class Basis:
    """An orthonormal(-or-zero) basis Q of the columns of x (G, d, k), applied only to thin matrices.

    Three forms, cheapest first:
    - k >= d: the identity (a basis of the whole space is free; SVQB of a 1040-column
      stack over d = 768 took 178 s per round on 2 CPU cores, against 2 s for the
      randomized path);
    - well-conditioned x: Q = x T with T from the k x k Gram alone (its Cholesky
      factor, or eigh when columns are dependent), no d x k x k product: on the
      server check, d = 1024, k = 144, 4 pairs, this took the exact path from 0.29 to
      0.07 s at 1 thread;
    - otherwise Q formed by svqb.
    """

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.t, self.q = x, None, None
        if x.shape[-1] >= x.shape[-2]:
            self.form = "identity"
            self.coords = x  # Q^T x
            return
        gram = mT(x) @ x
        step, spread = cholesky_step(gram)
        self.form = "cholesky"
        if spread > GRAM_SPREAD_LIMIT:  # dependent columns (duplicate clients) or near-collinear ones
            step, spread = whitening_step(gram)
            self.form = "eigh"
        if spread <= GRAM_SPREAD_LIMIT:
            self.t = step
            self.coords = mT(step) @ gram  # Q^T x = T^T x^T x, (G, k, k)
        else:
            self.form = "svqb"
            self.q = svqb(x)
            self.coords = mT(self.q) @ x

    def times(self, y: torch.Tensor) -> torch.Tensor:
        """Q y."""
        if self.t is not None:
            return self.x @ (self.t @ y)
        return y if self.q is None else self.q @ y

    def left_times(self, z: torch.Tensor) -> torch.Tensor:
        """z Q."""
        if self.t is not None:
            return (z @ self.x) @ self.t
        return z if self.q is None else z @ self.q


def explicit_basis(q: torch.Tensor) -> Basis:
    """A Basis around an orthonormal(-or-zero) q formed elsewhere (svqb in the randomized and streaming paths)."""
    basis = Basis.__new__(Basis)
    basis.x, basis.t, basis.q, basis.form, basis.coords = None, None, q, "explicit", None
    return basis


def project_core(basis_b: Basis, core_delta: torch.Tensor, basis_a: Basis, b, a, move: str,
                 rtol: float) -> torch.Tensor:
    """Moved-factor delta of dW = Q_b core_delta Q_a^T (eq. 12/13), the bases applied to thin matrices only.

    move "B": dB = Q_b core_delta (Q_a^T A^+);  move "A": dA = (B^+ Q_b) core_delta Q_a^T.
    """
    if move == "B":
        a_pinv, _, _ = gram_pinv(a, "A", rtol)
        return basis_b.times(core_delta @ mT(basis_a.left_times(mT(a_pinv))))
    b_pinv, _, _ = gram_pinv(b, "B", rtol)
    return mT(basis_a.times(mT(basis_b.left_times(b_pinv) @ core_delta)))


def exact_update(b, a, d_b, d_a, p, move: str, rank: int, rtol: float) -> torch.Tensor:
    """FedSRD's moved-factor delta, exact: SVD_r on the core of at most (m+1) r per side.

    The bases of [B, dB_1 .. dB_m] and [A; dA_1; ..] are kept implicit (``Basis``):
    the coordinates of the factors come from the two (m+1) r Grams, and the tall
    bases only meet thin matrices in the final projection.
    """
    g, m = d_b.shape[:2]
    r = b.shape[2]
    # [B, dB_1 .. dB_m] side by side (G, d_out, (m+1) r) and [A; dA_1; ..] stacked (G, (m+1) r, d_in)
    left = b.new_empty(g, b.shape[1], m + 1, r)  # filled in place: one copy of the client deltas, not cat + permute
    left[:, :, 0] = b
    left[:, :, 1:] = d_b.transpose(1, 2)
    left = left.view(g, b.shape[1], -1)
    right = torch.cat([a.unsqueeze(1), d_a], dim=1).view(g, -1, a.shape[2])
    basis_b, basis_a = Basis(left), Basis(mT(right))
    # Coordinates of the factors in the bases: B_i -> Q_b^T B_i (G, m+1, c, r), A_i -> A_i Q_a (G, m+1, r, c)
    b_coord = basis_b.coords.view(g, -1, m + 1, r).transpose(1, 2)
    a_coord = mT(basis_a.coords).view(g, m + 1, r, -1)
    base_core = b_coord[:, 0] @ a_coord[:, 0]  # Q_b^T B A Q_a
    root = p.sqrt().view(1, m, 1, 1)
    clients_b = (b_coord[:, :1] + b_coord[:, 1:]) * root  # sqrt(p_i) (B + dB_i), in coordinates
    clients_a = (a_coord[:, :1] + a_coord[:, 1:]) * root
    # Q_b^T W Q_a as one (c x m r) @ (m r x c) product, never m separate c x c products
    core = clients_b.permute(0, 2, 1, 3).reshape(g, clients_b.shape[2], -1) @ clients_a.reshape(
        g, -1, clients_a.shape[3])
    return project_core(basis_b, truncate_core(core, rank) - base_core, basis_a, b, a, move, rtol)


def stacked(b, a, d_b, d_a, p) -> tuple[torch.Tensor, torch.Tensor]:
    """Bc = [sqrt(p_i) (B + dB_i)] (G, d_out, m r) and Ac = [sqrt(p_i) (A + dA_i)] (G, m r, d_in): W = Bc Ac."""
    g, m = d_b.shape[:2]
    root = p.sqrt().view(1, m, 1, 1)
    b_stack = ((b.unsqueeze(1) + d_b) * root).permute(0, 2, 1, 3).reshape(g, b.shape[1], -1)
    a_stack = ((a.unsqueeze(1) + d_a) * root).reshape(g, -1, a.shape[2])
    return b_stack, a_stack


def randomized_update(
    b, a, d_b, d_a, p, move: str, rank: int, rtol: float, *,
    oversample: int = 16, power_iters: int = 2, probes: int = 8, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FedSRD's moved-factor delta through a randomized range finder.

    The test block is [A^T, Gaussian] (d_in x (r + oversample)): the new top-r
    row space is close to the old A's, so one product already lands near the
    answer, and ``power_iters`` rounds of W W^T sharpen it. The left basis also
    takes B's columns and the right basis A's rows, so B A is represented
    exactly and W_r - B A is taken on the core.

    Returns (delta, residual): residual estimates ||W - Q Q^T W||_F / ||W||_F
    of the range found, from ``probes`` fresh Gaussian probes (0 when W lies
    in the range).
    """
    g, d_in = a.shape[0], a.shape[2]
    b_stack, a_stack = stacked(b, a, d_b, d_a, p)

    def w_times(x: torch.Tensor) -> torch.Tensor:  # W x = Bc (Ac x): two thin GEMMs
        return b_stack @ (a_stack @ x)

    def wt_times(y: torch.Tensor) -> torch.Tensor:  # W^T y
        return mT(a_stack) @ (mT(b_stack) @ y)

    def gaussian(cols: int) -> torch.Tensor:
        # drawn on the CPU so a seeded generator gives the same test block on every device
        return torch.randn((g, d_in, cols), generator=generator, dtype=a.dtype).to(a.device)

    y = w_times(torch.cat([mT(a), gaussian(oversample)], dim=-1))
    for _ in range(power_iters):
        y = w_times(svqb(wt_times(svqb(y))))
    q_b = svqb(torch.cat([b, y], dim=-1))  # (G, d_out, c)
    wt_q = wt_times(q_b)  # W^T q_b: its columns span the row space of q_b^T W
    q_a = svqb(torch.cat([mT(a), wt_q], dim=-1))
    core = mT(wt_q) @ q_a  # q_b^T W q_a
    base_core = (mT(q_b) @ b) @ (a @ q_a)
    delta = project_core(explicit_basis(q_b), truncate_core(core, rank) - base_core, explicit_basis(q_a), b, a,
                         move, rtol)

    probe = w_times(gaussian(probes))
    missed = probe - q_b @ (mT(q_b) @ probe)
    norm = torch.linalg.vector_norm(probe, dim=(-2, -1))
    residual = torch.linalg.vector_norm(missed, dim=(-2, -1)) / norm.clamp_min(torch.finfo(norm.dtype).tiny)
    return delta, residual
