"""The Aggregator: reconstruct, aggregate and decompose client updates into a Broadcast
(sections 2-3 of docs/method.md)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from ..baselines import METHODS, MethodSpec
from ..config import SparsifyConfig, check_probability, check_value_dtype
from ..errors import (
    AggregationError,
    ConfigError,
    KeyMismatchError,
    NonFiniteError,
    ShapeMismatchError,
    StateError,
)
from ..kernels.download.dispatch import dare_compact_grouped
from ..lora import LoraPair, StateDict, check_state, factor_keys, factor_of, state_digest
from ..updates import FLOAT32_MAX, Broadcast, SeededMask, SparseTensor, SparseUpdate
from .averaging import fedavg_pair, flexlora_pair
from .decompose import DecomposeOptions, check_options, decompose, truncation_rank
from .linalg import weighted_mean
from .robust import bound_norms, normalised_weights
from .rounds import AggregationReport, check_finite_changes
from .streaming import RoundStream

logger = logging.getLogger(__name__)

WEIGHTINGS = ("samples", "equal")


class Aggregator:
    """Aggregate client updates into a Broadcast, for any method in ``METHODS``.

    method:        "fedsrd", "fedsrd-e" or a baseline (see fedsrd_kernels.baselines).
    rank:          rank of the SVD truncation (FedSRD, FlexLoRA); None = each pair's r.
    download_drop: DARE drop rate of the download; None = the method's default
                   (0.8 for FedSRD/FedSRD-e, 0 for the baselines).
    seed:          seed of the download mask, keyed further by round and tensor name.
    value_dtype:   dtype of broadcast values ("float32", "bfloat16", "float16").
    mu:            FedProx proximal coefficient for local training; None = the method's default.
    upload:        how clients sparsify (``client_config``); None = the method's selection.
                   Another selection is a study variant the server aggregates the same way
                   (every upload is densified first): e.g. fedsrd with a dense upload.
    projection_rtol: singular values of the factor a FedSRD split projects onto
                   (A when B moves, B when A moves) below projection_rtol x sigma_max
                   count as zero, for the rank check and the pinv cut-off (never below
                   the storage floor max(d, r) x eps). pinv amplifies dW by
                   1 / sigma along weak directions of that factor: in the synthetic demo
                   (plain GD, lr 0.05 and 0.2, 10 local steps) 1e-3 let A grow to 1.7e3
                   within 10 rounds, or overflow by round 5, while 1e-2 trained as
                   stably as FedAvg. The weak directions are picked up when the other
                   factor moves next round.
    path:          FedSRD decompose path: "auto", "exact", "randomized", "delta" (FedSRD-e)
                   or "reference" (see fedsrd_kernels.server.decompose); the chosen one is reported.
    schedule:      which factor a FedSRD pair moves: "alternate" (the paper: B in odd rounds,
                   A in even ones) or "greedy" (beyond the paper, a study switch: per pair, the
                   factor whose change keeps more of dW, at twice the decompose work; see
                   decompose.greedy_moves). The report's ``moved`` says what moved.
    oversample, power_iters: the randomized path's extra columns and W W^T rounds.
    memory_budget: bytes of float64 working set per batched decompose call.
                   The baselines ignore path, oversample, power_iters, memory_budget,
                   projection_rtol and schedule, but every method checks them
                   (decompose.check_options).
    norm_bound:    robust aggregation, off (None) by default: clip each client's
                   reconstructed update ||B_i A_i - B A||_F (whole adapter) to
                   norm_bound x the round's median. Clipping by c_i is applied as a
                   weight: p_i becomes c_i p_i and the weight taken away goes to a zero
                   update (W = B A), so the round aggregates exactly
                   B A + sum_i p_i c_i (B_i A_i - B A) for FedSRD; the FedAvg family
                   scales the client's factor deltas by c_i. Needs every update of the
                   round at once, so ``stream`` refuses it.
    weighting:     "samples" (default): p_i = n_i / sum n, the public code's rule, from the
                   weights the caller passes (sample counts); "equal": p_i = 1 / m, the
                   paper's and its scripts' rule (--simple_aggr), whatever weights are passed.
    backend:       "torch", "triton" or "cuda" for the kernels (client-delta reconstruction,
                   download compaction); None = FEDSRD_BACKEND
                   or automatic (see fedsrd_kernels.kernels._backend).

    ``client_config``, ``freeze_lora_A`` and ``proximal_mu`` tell clients how to
    train and upload for this method.
    """

    def __init__(
        self,
        method: str = "fedsrd",
        rank: int | None = None,
        download_drop: float | None = None,
        seed: int = 0,
        value_dtype: str = "float32",
        mu: float | None = None,
        upload: SparsifyConfig | None = None,
        projection_rtol: float = 1e-2,
        path: str = "auto",
        oversample: int = 16,
        power_iters: int = 2,
        memory_budget: int = 2 * 2**30,
        backend: str | None = None,
        norm_bound: float | None = None,
        weighting: str = "samples",
        schedule: str = "alternate",
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"method must be one of {sorted(METHODS)}, got {method!r}")
        self.spec: MethodSpec = METHODS[method]
        fedsrd = self.spec.server == "fedsrd"
        options = dict(path=path, rank=rank, projection_rtol=projection_rtol, oversample=oversample,
                       power_iters=power_iters, memory_budget=memory_budget, backend=backend, schedule=schedule)
        check_options(truncate=self.spec.truncate if fedsrd else None, **options)  # for every method
        options["projection_rtol"] = float(projection_rtol)
        drop = self.spec.download_drop if download_drop is None else download_drop
        check_probability("download_drop", drop)
        if self.spec.server == "flexlora" and drop > 0:
            raise ConfigError("flexlora broadcasts dense factors; download_drop must be 0")
        if not (isinstance(seed, int) and 0 <= seed < 2**64):
            raise ConfigError(f"seed must be an int in [0, 2**64), got {seed!r}")
        self.value_dtype = check_value_dtype(value_dtype)
        proximal_mu = self.spec.proximal_mu if mu is None else mu
        if not (isinstance(proximal_mu, (int, float)) and math.isfinite(proximal_mu) and proximal_mu >= 0):
            raise ConfigError(f"mu must be a finite number >= 0, got {mu!r}")
        if norm_bound is not None and not (
            isinstance(norm_bound, (int, float)) and not isinstance(norm_bound, bool)
            and math.isfinite(norm_bound) and norm_bound > 0
        ):
            raise ConfigError(f"norm_bound must be a finite number > 0 or None, got {norm_bound!r}")
        self.norm_bound = None if norm_bound is None else float(norm_bound)
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.weighting = weighting
        self.method = method
        self.backend = backend
        self.rank = rank
        self.download_drop = float(drop)
        self.seed = seed
        self.decompose_options = DecomposeOptions(truncate=self.spec.truncate, seed=seed, **options) if fedsrd else None
        self.proximal_mu = float(proximal_mu)
        self.freeze_lora_A = self.spec.freeze_lora_A
        self.client_config = upload if upload is not None else SparsifyConfig(selection=self.spec.selection)
        self.last_report: AggregationReport | None = None

    def __repr__(self) -> str:
        return (
            f"Aggregator(method={self.method!r}, rank={self.rank}, download_drop={self.download_drop}, "
            f"seed={self.seed})"
        )

    # -- validation ---------------------------------------------------------

    def check_round_inputs(self, global_state: StateDict, round: int) -> list[LoraPair]:
        """Validate the round number and the global state; return its LoRA pairs."""
        if isinstance(round, bool) or not isinstance(round, int) or round < 1:
            raise AggregationError(f"round counts from 1, got {round!r}")
        pairs = list(check_state(global_state, "global_state").pairs)
        for pair in pairs:
            truncation_rank(self.rank, pair)  # every method: a rank above a pair's r is refused up front
        return pairs

    def check_update(self, name: str, update: object, global_state: StateDict, round: int) -> SparseUpdate:
        """Validate one client update against the global state of this round.

        NaN / Inf values are refused here, naming the update and the key. The check reads the
        verdict each SparseTensor took when it was built (its one pass over the values), so
        screening, aggregate and stream can all call this without scanning the values again;
        ``decode`` refuses non-finite wire values from the same verdict (PayloadError).
        """
        if not isinstance(update, SparseUpdate):
            raise AggregationError(f"{name} is a {type(update).__name__}, not a SparseUpdate")
        if update.round is not None and update.round != round:
            raise AggregationError(f"{name} was made for round {update.round}, this is round {round}")
        for key, sparse in update.deltas.items():
            if not isinstance(sparse, SparseTensor):
                raise AggregationError(f"{name}[{key!r}] is a {type(sparse).__name__}, not a SparseTensor")
            if key not in global_state:
                raise KeyMismatchError(f"{name} carries {key!r}, which the global state lacks")
            if sparse.shape != tuple(global_state[key].shape):
                raise ShapeMismatchError(
                    f"{name}[{key!r}] has shape {sparse.shape}, global state has {tuple(global_state[key].shape)}"
                )
            if not sparse.is_finite:
                raise NonFiniteError(f"{name}[{key!r}] holds NaN/Inf values")
            if self.freeze_lora_A and factor_of(key) == "A":
                raise StateError(f"{name} changes {key!r}, but {self.method} freezes lora_A")
        return update

    def _check_inputs(
        self,
        global_state: StateDict,
        updates: Sequence[SparseUpdate],
        weights: Sequence[float] | None,
        round: int,
    ) -> tuple[list[LoraPair], torch.Tensor]:
        pairs = self.check_round_inputs(global_state, round)
        if isinstance(updates, SparseUpdate) or not isinstance(updates, Sequence) or not updates:
            raise AggregationError("updates must be a non-empty sequence of SparseUpdate")
        for i, update in enumerate(updates):
            self.check_update(f"updates[{i}]", update, global_state, round)
        return pairs, normalised_weights(weights if self.weighting == "samples" else None, len(updates))

    # -- aggregation --------------------------------------------------------

    def aggregate(
        self,
        global_state: StateDict,
        updates: Sequence[SparseUpdate],
        weights: Sequence[float] | None = None,
        round: int = 1,
        base: str | None = None,
    ) -> Broadcast:
        """One round of server work: client updates in, the round's Broadcast out.

        ``weights`` are sample counts (normalised here); None weighs clients
        equally. ``round`` counts from 1. ``base`` is the ``state_digest`` of
        ``global_state`` when the caller has it (else it is taken here); the
        Broadcast carries it, and ``apply`` refuses it on any other state. A
        result that is not finite (updates of 3e38 that overflow float32 when
        averaged) raises NonFiniteError naming the key. Nothing passed in is modified.
        """
        pairs, p = self._check_inputs(global_state, updates, weights, round)
        replace: dict[str, torch.Tensor] = {}
        num_updates, norms, clip = len(updates), (), ()
        if self.norm_bound is not None:
            updates, p, norms, clip = bound_norms(global_state, list(updates), pairs, p, self.norm_bound)
        report = AggregationReport(round=round, method=self.method, num_updates=num_updates, update_norms=norms,
                                   clip_factors=clip)

        def client_deltas(key: str) -> list[torch.Tensor | None]:
            return [u.deltas[key].to_dense() if key in u.deltas else None for u in updates]

        factor_deltas: dict[str, torch.Tensor] = {}  # downloaded together below: one grouped launch
        if self.decompose_options is not None:
            by_prefix = {pair.prefix: pair for pair in pairs}
            for prefix, result in decompose(global_state, updates, pairs, p, round, self.decompose_options).items():
                pair = by_prefix[prefix]
                key = pair.a_key if result.moved == "A" else pair.b_key
                factor_deltas[key] = result.delta
                report.moved[prefix] = result.moved
                report.scheduled[prefix] = result.scheduled
                report.paths[prefix] = result.path
                if result.note:
                    report.notes[prefix] = result.note
                    logger.info("%s: %s", prefix, result.note)
                if result.residual is not None:
                    report.residuals[prefix] = result.residual
        for pair in pairs if self.decompose_options is None else ():
            d_b, d_a = client_deltas(pair.b_key), client_deltas(pair.a_key)
            if all(d is None for d in d_b + d_a):
                continue
            b_prev, a_prev = global_state[pair.b_key], global_state[pair.a_key]
            if self.spec.server == "flexlora":
                new_b, new_a = flexlora_pair(b_prev, a_prev, d_b, d_a, p, truncation_rank(self.rank, pair))
                replace[pair.b_key] = new_b.to(b_prev.dtype)
                replace[pair.a_key] = new_a.to(a_prev.dtype)
                report.moved[pair.prefix] = "AB"
                continue
            moved = fedavg_pair(d_b, d_a, p, pair)
            report.moved[pair.prefix] = "".join(sorted(moved))
            for factor, delta in moved.items():
                key = pair.a_key if factor == "A" else pair.b_key
                factor_deltas[key] = delta
        others: dict[str, SparseTensor] = {}
        pair_keys = factor_keys(pairs)
        for key in sorted(global_state):
            if key in pair_keys:
                continue
            other = [u.deltas[key].to_dense() if key in u.deltas else None for u in updates]
            if any(d is not None for d in other):
                mean = weighted_mean(other, p, tuple(global_state[key].shape))
                others[key] = SparseTensor(mean.shape, mean.flatten().to(torch.float32))
        return self.finish_round(round, factor_deltas, others, replace, report,
                                 state_digest(global_state) if base is None else base, "the aggregate")

    def finish_round(self, round: int, factor_deltas: Mapping[str, torch.Tensor],
                     other_deltas: Mapping[str, SparseTensor], replace: Mapping[str, torch.Tensor],
                     report: AggregationReport, base: str, what: str) -> Broadcast:
        """The one way a round ends, batch (``aggregate``) or streamed (``RoundStream.finish``): the seeded
        download of the factor deltas, the other keys' means as they are, the float32 finiteness check
        (NonFiniteError naming ``what`` and the key), ``report`` kept as ``last_report``, the Broadcast."""
        deltas = self._downloads(factor_deltas, round)
        seeded = frozenset(deltas) if self.download_drop > 0 else frozenset()  # every factor delta went through DARE
        deltas.update(other_deltas)
        check_finite_changes(deltas, replace, what)
        self.last_report = report
        return Broadcast(round=round, method=self.method, seed=self.seed, download_drop=self.download_drop,
                         deltas=deltas, replace=dict(replace), moved=dict(report.moved), seeded=seeded, base=base)

    def stream(self, global_state: StateDict, round: int = 1, **options):
        """A RoundStream that folds updates in one at a time (see fedsrd_kernels.server.streaming)."""
        return RoundStream(self, global_state, round, **options)

    def _download(self, key: str, delta: torch.Tensor, round: int) -> SparseTensor:
        """DARE on one factor delta: ``_downloads`` of a group of one."""
        return self._downloads({key: delta}, round)[key]

    def _downloads(self, deltas: Mapping[str, torch.Tensor], round: int) -> dict[str, SparseTensor]:
        """DARE on the round's factor deltas: keep each key's seeded positions, scale by 1 / (1 - p).

        Each delta becomes a SparseTensor with its SeededMask (seed, round, key, p) and the kept
        values in ``value_dtype``; the positions are not kept. On the triton and cuda backends the
        deltas of one device and dtype are compacted in one grouped launch; the torch backend
        (the reference, and the CPU path) draws each key's mask with numpy. NonFiniteError names
        the first key whose values, scaled by 1 / (1 - p), do not fit float32.
        """
        drop = self.download_drop
        flats = {key: delta.reshape(-1) for key, delta in deltas.items()}
        groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
        for key, flat in flats.items():
            groups.setdefault((flat.device, flat.dtype), []).append(key)
        for members in groups.values():  # one host sync per group, not per key
            largest = torch.stack([flats[k].abs().amax() if flats[k].numel() else flats[k].new_zeros(())
                                   for k in members]).tolist()
            for key, top in zip(members, largest):
                if not top / (1.0 - drop) <= FLOAT32_MAX:  # also catches NaN
                    raise NonFiniteError(f"the aggregate of {key!r} is not finite in float32 (up to {top:.3g})")
        if drop == 0.0:
            return {key: SparseTensor(deltas[key].shape, flat.to(self.value_dtype)) for key, flat in flats.items()}
        masks = {key: SeededMask(self.seed, round, key, drop) for key in deltas}
        values = dare_compact_grouped(flats, masks, drop, self.value_dtype, backend=self.backend)
        scale = 1.0 / (1.0 - drop)
        return {key: SparseTensor(deltas[key].shape, values[key], scale=scale, mask=masks[key]) for key in deltas}


