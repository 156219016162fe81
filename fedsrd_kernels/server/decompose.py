"""The decompose step of the FedSRD server (spec eq. 10-13), for all pairs.

Pairs are grouped by shape so each group runs as one batched call, in chunks
that keep the float64 working set under a memory budget. Per pair it decides
which factor moves (odd rounds B, even rounds A, unless the factor it would
project onto is rank-deficient) and runs one path:

    "delta"       FedSRD-e, exact, no SVD (factored.delta_form_update)
    "exact"       FedSRD, SVD_r on the (m+1) r core (factored.exact_update)
    "randomized"  FedSRD, range finder warm-started from A (factored.randomized_update)
    "reference"   either method, one pair at a time through thin QR (linalg);
                  the simplest correct code, kept as a cross-check

"auto" picks "delta" for FedSRD-e, and for FedSRD "exact" while the bases,
(m+1) r columns, are at most half of min(d_out, d_in), else "randomized".

The schedule says which factor a pair moves (beyond the paper, a study switch):
"alternate" is the paper's (odd rounds B, even rounds A); "greedy" computes both
candidate splits and moves, per pair, the factor whose change keeps more of dW
(see ``greedy_moves``), at twice the decompose work.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import WORK_DTYPE, check_probability
from ..errors import ConfigError
from ..kernels._backend import check_backend_name
from ..kernels.reconstruct.dispatch import stack_client_factors_dispatch
from ..lora import LoraPair, StateDict
from ..updates import SparseUpdate
from . import factored
from . import linalg as reference

PATHS = ("auto", "delta", "exact", "randomized", "reference")
SCHEDULES = ("alternate", "greedy")


@dataclass(frozen=True)
class DecomposeOptions:
    """How the server decomposes; validated at construction."""

    truncate: bool  # FedSRD (SVD_r) or FedSRD-e
    path: str = "auto"
    rank: int | None = None
    projection_rtol: float = 1e-2
    oversample: int = 16
    power_iters: int = 2
    memory_budget: int = 2 * 2**30  # bytes of float64 working set per batched call
    seed: int = 0
    backend: str | None = None  # of the client-delta reconstruction kernel (see kernels._backend)
    schedule: str = "alternate"  # which factor moves (SCHEDULES; module docstring)

    def __post_init__(self) -> None:
        check_options(truncate=self.truncate, path=self.path, rank=self.rank, projection_rtol=self.projection_rtol,
                      oversample=self.oversample, power_iters=self.power_iters, memory_budget=self.memory_budget,
                      backend=self.backend, schedule=self.schedule)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_options(
    *,
    truncate: bool | None,
    path: str,
    rank: int | None,
    projection_rtol: float,
    oversample: int,
    power_iters: int,
    memory_budget: int,
    backend: str | None,
    schedule: str = "alternate",
) -> None:
    """The one check of the decompose options: ConfigError naming the argument and its bad value.

    ``Aggregator`` runs it for every method (a baseline ignores these options, but a
    typo in them is still refused) and ``DecomposeOptions`` on construction.
    ``truncate`` is the method's SVD_r for a FedSRD server rule (True: FedSRD,
    False: FedSRD-e), which rules out the other method's paths; None for a method
    that does not decompose, whose path is checked by name only.
    """
    if path not in PATHS:
        raise ConfigError(f"path must be one of {PATHS}, got {path!r}")
    if truncate is False and path in ("exact", "randomized"):
        raise ConfigError(f"path {path!r} computes an SVD; FedSRD-e has none (use 'delta' or 'reference')")
    if truncate is True and path == "delta":
        raise ConfigError("path 'delta' skips the SVD; it serves FedSRD-e only")
    if rank is not None and not (_is_int(rank) and rank >= 1):
        raise ConfigError(f"rank must be an int >= 1 or None, got {rank!r}")
    check_probability("projection_rtol", projection_rtol)
    for name, value in (("oversample", oversample), ("power_iters", power_iters)):
        if not (_is_int(value) and value >= 0):
            raise ConfigError(f"{name} must be an int >= 0, got {value!r}")
    if not (_is_int(memory_budget) and memory_budget > 0):
        raise ConfigError(f"memory_budget must be a positive int (bytes), got {memory_budget!r}")
    check_backend_name(backend)
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def truncation_rank(rank: int | None, pair: LoraPair) -> int:
    """The rank of the SVD_r truncation for ``pair`` (FedSRD, FlexLoRA, the FedSRD stream): the one rank rule.

    ``rank`` is the Aggregator's: None means the pair's own LoRA rank r; a rank above
    r is refused (the new factors hold r columns), naming the pair.
    """
    if rank is None:
        return pair.rank
    if rank > pair.rank:
        raise ConfigError(f"rank {rank} exceeds the LoRA rank {pair.rank} of {pair.prefix!r}")
    return rank


@dataclass(frozen=True)
class PairDecomposition:
    """One pair's result: the moved factor, its float64 delta, and how it was reached."""

    moved: str
    delta: torch.Tensor
    scheduled: str
    path: str
    note: str | None = None
    residual: float | None = None  # randomized path: estimated ||W - Q Q^T W|| / ||W||


def choose_path(options: DecomposeOptions, clients: int, pair: LoraPair) -> str:
    if options.path != "auto":
        return options.path
    if not options.truncate:
        return "delta"
    # Half, not a quarter as before the exact path kept its bases implicit: on the reduced
    # Llama-3.2-3B shapes with 4 clients the k/v pairs (256 x 768, (m+1) r = 80) took 0.38 s
    # per round on the randomized path against 0.12 s for all pairs exact (2 busy CPU cores).
    return "exact" if 2 * (clients + 1) * pair.rank <= min(pair.d_out, pair.d_in) else "randomized"


def scheduled_factor(round: int) -> str:
    """Odd rounds move B (eq. 13), even rounds move A (eq. 12); rounds count from 1."""
    return "B" if round % 2 == 1 else "A"


def projection_ranks(b: torch.Tensor, a: torch.Tensor, rtol: dict[str, float]) -> dict[str, list[int]]:
    """Per pair of a batch, the numerical rank of the factor each move projects onto (B: A's, A: B's)."""
    return {"B": factored.numerical_rank(a, "A", rtol["B"]).tolist(),
            "A": factored.numerical_rank(b, "B", rtol["A"]).tolist()}


def plan_moves(b: torch.Tensor, a: torch.Tensor, round: int, rtol: dict[str, float]) -> list[tuple[str, str | None]]:
    """(moved factor, note) per pair of a batch.

    Moving B projects onto A and moving A onto B. A projection factor of rank
    below r would silently lose the part of dW outside its span (all of it,
    for B = 0), so the other factor moves when its projection factor has
    higher rank; the note says so.
    """
    r = a.shape[1]
    rank_of = projection_ranks(b, a, rtol)
    move = scheduled_factor(round)
    other = "A" if move == "B" else "B"
    plans = []
    for i in range(a.shape[0]):
        have = rank_of[move][i]
        if have >= r:
            plans.append((move, None))
            continue
        note = f"round {round} schedules lora_{move}, but lora_{other} (projected onto) has rank {have} < {r}"
        if rank_of[other][i] > have:
            plans.append((other, note + f"; moved lora_{other} instead (lora_{move} has rank {rank_of[other][i]})"))
        else:
            plans.append((move, note + f"; lora_{move} is no better (rank {rank_of[other][i]}), projected anyway"))
    return plans


def kept_norms_sq(b: torch.Tensor, a: torch.Tensor, delta_b: torch.Tensor, delta_a: torch.Tensor) -> dict[str, list]:
    """Per pair, |dB A|_F^2 and |B dA|_F^2: how much of dW each candidate applies, from r x r Grams.

    A split is an orthogonal projection of dW (dB A = dW P_A, B dA = P_B dW), so the
    larger norm is also the larger component along dW.
    """
    gram = lambda x, y: (x * y).sum(dim=(-2, -1))  # noqa: E731  <X, Y>_F per pair
    return {"B": gram(delta_b.mT @ delta_b, a @ a.mT).tolist(), "A": gram(b.mT @ b, delta_a @ delta_a.mT).tolist()}


def greedy_moves(b: torch.Tensor, a: torch.Tensor, delta_b: torch.Tensor, delta_a: torch.Tensor, round: int,
                 rtol: dict[str, float]) -> list[tuple[str, str | None]]:
    """(moved factor, note) per pair under the "greedy" schedule: of the two candidate splits, the one that keeps
    more of dW, among the moves whose projection factor has full rank (``plan_moves`` decides when neither has).

    Measured on SmolLM2 (4 clients, lr 3e-3, error feedback): under the paper's alternation, the rounds that
    move A applied 4% of dW's length along it (rounds 2: 0.038 and 0.041, two seeds) against 93-99% for the
    rounds that move B. While B is young the clients' dW is mostly dB_i A, which lies outside B's columns.
    """
    r = a.shape[1]
    rank_of = projection_ranks(b, a, rtol)
    kept = kept_norms_sq(b, a, delta_b, delta_a)
    fallback = None
    plans = []
    for i in range(a.shape[0]):
        allowed = [move for move in ("B", "A") if rank_of[move][i] >= r]
        if len(allowed) == 2:
            plans.append(("B" if kept["B"][i] >= kept["A"][i] else "A", None))
        elif allowed:
            other = "A" if allowed[0] == "B" else "B"
            plans.append((allowed[0], f"round {round} (greedy): lora_{allowed[0]} moved, the only full-rank "
                                      f"projection (lora_{other}'s has rank {rank_of[other][i]} < {r})"))
        else:
            fallback = fallback or plan_moves(b, a, round, rtol)
            plans.append(fallback[i])
    return plans


def projection_rtols(pair: LoraPair, dtype: torch.dtype, floor: float) -> dict[str, float]:
    """Singular-value cut-offs of the projection factor for moving B (onto A) and A (onto B)."""
    return {
        "B": max(floor, reference.projection_rtol((pair.rank, pair.d_in), dtype)),
        "A": max(floor, reference.projection_rtol((pair.d_out, pair.rank), dtype)),
    }


def _bytes_per_pair(pair: LoraPair, clients: int, path: str, options: DecomposeOptions) -> int:
    """Rough float64 working set of one pair on a path (client stacks, bases, copies)."""
    factor_elems = (pair.d_out + pair.d_in) * pair.rank
    stacks = 3 * (clients + 1) * factor_elems  # deltas, B + dB_i copies, coordinates
    if path == "exact":
        stacks += 3 * (clients + 1) * pair.rank * (pair.d_out + pair.d_in)  # bases and their passes
    elif path == "randomized":
        stacks += 6 * (pair.rank + options.oversample) * (pair.d_out + pair.d_in)
    return 8 * stacks


def range_generator(seed: int, round: int, shape: tuple[int, ...]) -> torch.Generator:
    """A CPU generator for the random test blocks of one shape group, fixed by (seed, round, shape)."""
    digest = hashlib.blake2b(f"fedsrd-range-finder/{seed}/{round}/{shape}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def decompose(
    global_state: StateDict,
    updates: Sequence[SparseUpdate],
    pairs: Sequence[LoraPair],
    p: torch.Tensor,
    round: int,
    options: DecomposeOptions,
) -> dict[str, PairDecomposition]:
    """Moved-factor deltas for every pair some client changed, keyed by prefix."""
    active = [pair for pair in pairs
              if any(pair.a_key in u.deltas or pair.b_key in u.deltas for u in updates)]
    groups: dict[tuple, list[LoraPair]] = {}
    for pair in active:
        dtype = global_state[pair.a_key].dtype
        device = global_state[pair.a_key].device
        groups.setdefault((pair.d_out, pair.d_in, pair.rank, str(dtype), str(device)), []).append(pair)
    results: dict[str, PairDecomposition] = {}
    for (_, _, _, _, device), group in groups.items():
        first = group[0]
        path = choose_path(options, len(updates), first)
        rank = truncation_rank(options.rank, first)
        rtol = projection_rtols(first, global_state[first.a_key].dtype, options.projection_rtol)
        chunk = max(1, options.memory_budget // _bytes_per_pair(first, len(updates), path, options))
        generator = range_generator(options.seed, round, (first.d_out, first.d_in, first.rank))
        for start in range(0, len(group), chunk):
            part = group[start:start + chunk]
            with _threads_for(torch.device(device), len(part) * max(first.d_out, first.d_in) * (len(updates) + 1)
                              * first.rank):
                results.update(_decompose_batch(global_state, updates, part, p.to(device), round, options, path,
                                                rank, rtol, generator, torch.device(device)))
    return results


def _client_stack(updates: Sequence[SparseUpdate], keys: list[str], base: torch.Tensor, factor: str,
                  backend: str | None) -> torch.Tensor:
    """(G, m, *factor shape) float64 dense client deltas (zeros where a client sent nothing).

    One stacked reconstruction per pair (``stack_client_factors`` without the base,
    unit weights: the p_i enter later), reshaped from the [dB_1 .. dB_m] / [dA_1; ..]
    layout to one block per client.
    """
    m = len(updates)
    blocks = []
    for g, key in enumerate(keys):
        stack = stack_client_factors_dispatch(base[g], [u.deltas.get(key) for u in updates], [1.0] * m,
                                              factor=factor, include_base=False, dtype=WORK_DTYPE, backend=backend)
        rows, cols = base.shape[1:]
        blocks.append(stack.view(rows, m, cols).transpose(0, 1) if factor == "B" else stack.view(m, rows, cols))
    return torch.stack(blocks)


def _decompose_batch(global_state, updates, pairs, p, round, options, path, rank, rtol, generator, device):
    b = torch.stack([global_state[pair.b_key] for pair in pairs]).to(WORK_DTYPE)
    a = torch.stack([global_state[pair.a_key] for pair in pairs]).to(WORK_DTYPE)
    d_b = _client_stack(updates, [pair.b_key for pair in pairs], b, "B", options.backend)
    d_a = _client_stack(updates, [pair.a_key for pair in pairs], a, "A", options.backend)
    scheduled = scheduled_factor(round)
    out: dict[str, PairDecomposition] = {}
    if options.schedule == "greedy":  # both candidates for every pair, then the better one per pair
        candidates = {move: _decompose_moves(b, a, d_b, d_a, p, move, rank, rtol[move], options, path, generator)
                      for move in ("B", "A")}
        plans = greedy_moves(b, a, candidates["B"][0], candidates["A"][0], round, rtol)
        for i, (move, note) in enumerate(plans):
            delta, residual = candidates[move]
            res = None if residual is None else float(residual[i])
            out[pairs[i].prefix] = PairDecomposition(move, delta[i], scheduled, path, note, res)
        return out
    plans = plan_moves(b, a, round, rtol)
    for move in ("A", "B"):
        idx = [i for i, (m, _) in enumerate(plans) if m == move]
        if not idx:
            continue
        if len(idx) == len(plans):  # the usual case: every pair moves the scheduled factor, no gather copies
            b_sel, a_sel, d_b_sel, d_a_sel = b, a, d_b, d_a
        else:
            sel = torch.tensor(idx, device=device)
            b_sel, a_sel, d_b_sel, d_a_sel = b[sel], a[sel], d_b[sel], d_a[sel]
        delta, residual = _decompose_moves(b_sel, a_sel, d_b_sel, d_a_sel, p, move, rank, rtol[move], options, path,
                                           generator)
        for j, i in enumerate(idx):
            res = None if residual is None else float(residual[j])
            out[pairs[i].prefix] = PairDecomposition(move, delta[j], scheduled, path, plans[i][1], res)
    return out


# Batches whose client stacks hold fewer elements than this run on one CPU thread. Their
# copies and GEMMs are too small to gain from a second thread, and a busy core stalls every
# OpenMP region: on the server check (4 pairs of 1024 x 1024, r = 16, 8 clients: 0.6M
# elements) the exact round took 0.14-0.17 s at 2 threads and 0.04-0.09 s at 1 with two other
# jobs on the 2 cores; idle, 0.03-0.04 s either way.
ONE_THREAD_ELEMENTS = 2**22


def _threads_for(device: torch.device, stack_elements: int) -> contextlib.AbstractContextManager:
    if device.type == "cpu" and stack_elements < ONE_THREAD_ELEMENTS:
        return factored.one_cpu_thread()
    return contextlib.nullcontext()


def _decompose_moves(b_sel, a_sel, d_b_sel, d_a_sel, p, move, rank, rtol, options, path, generator):
    """(deltas, range residuals or None) of the pairs that move ``move``, on one path."""
    if path == "reference":
        return torch.stack([_reference_pair(b_sel[j], a_sel[j], d_b_sel[j], d_a_sel[j], p, move, rank, rtol,
                                            options.truncate) for j in range(b_sel.shape[0])]), None
    if path == "delta":
        return factored.delta_form_update(b_sel, a_sel, d_b_sel, d_a_sel, p, move, rtol), None
    if path == "exact":
        return factored.exact_update(b_sel, a_sel, d_b_sel, d_a_sel, p, move, rank, rtol), None
    return factored.randomized_update(b_sel, a_sel, d_b_sel, d_a_sel, p, move, rank, rtol,
                                      oversample=options.oversample, power_iters=options.power_iters,
                                      generator=generator)


def _reference_pair(b, a, d_b, d_a, p, move, rank, rtol, truncate) -> torch.Tensor:
    b_stack, a_stack = reference.stack_factors(b, a, list(d_b), list(d_a), p)
    left, right = reference.truncated_factors(b_stack, a_stack, rank) if truncate else (b_stack, a_stack)
    return reference.project_delta(left, right, b, a, move, rtol)


def describe(results: dict[str, PairDecomposition]) -> str:
    """One line: paths used and the worst randomized residual."""
    paths = sorted({r.path for r in results.values()})
    residuals = [r.residual for r in results.values() if r.residual is not None]
    worst = f", worst range residual {max(residuals):.1e}" if residuals else ""
    return f"{len(results)} pairs via {'/'.join(paths) or 'none'}{worst}"


__all__ = ["PATHS", "DecomposeOptions", "PairDecomposition", "check_options", "choose_path", "decompose", "describe",
           "plan_moves", "range_generator", "scheduled_factor", "truncation_rank", "greedy_moves", "SCHEDULES"]
