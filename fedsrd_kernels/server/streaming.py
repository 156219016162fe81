"""Streaming aggregation: fold client updates in as they arrive.

Memory is independent of the number of clients: per LoRA pair the stream
keeps a few d x (r + l) accumulators, never a client's factors.

    stream = agg.stream(global_state, round=t)
    for payload, n in arriving:
        stream.add(fk.decode(payload), weight=n)
    bcast = stream.finish()

FedSRD-e and the FedAvg family are exact: every term of their update is
linear in each client's factors (FedSRD-e's dW = B dA_bar + dB_bar A +
sum_i p_i dB_i dA_i, projected term by term with the pinv fixed at the start).
FedSRD's SVD_r is not linear, so the stream keeps a two-sided sketch of W
(Tropp, Yurtsever, Udell and Cevher, "Practical sketching algorithms for
low-rank matrix approximation", 2017): Y = W Omega with Omega = [A^T, Gaussian]
(warm-started like the randomized path), Z = Psi^T W with Psi = [B, Gaussian],
rebuilt as W ~ Q (Psi^T Q)^+ Z. It is exact while rank(W) <= the sketch width
and otherwise reports its residual on a held-out Gaussian probe W Phi.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import WORK_DTYPE
from ..errors import AggregationError, ConfigError
from ..kernels.reconstruct.reference import scatter_delta
from ..lora import LoraPair, StateDict, factor_keys, state_digest
from ..updates import Broadcast, SparseTensor, SparseUpdate
from .decompose import greedy_moves, plan_moves, projection_rtols, range_generator, scheduled_factor, truncation_rank
from .factored import explicit_basis, gram_pinv, mT, project_core, svqb, truncate_core
from .robust import check_weight
from .rounds import AggregationReport


@dataclass
class _Group:
    """Accumulators of the pairs of one shape, batched along dim 0."""

    pairs: list[LoraPair]
    b: torch.Tensor  # (G, d_out, r) float64
    a: torch.Tensor  # (G, r, d_in)
    sum_d_b: torch.Tensor
    sum_d_a: torch.Tensor
    touched_b: torch.Tensor  # (G,) bool: some client sent a lora_B delta for the pair
    touched_a: torch.Tensor
    moves: list[str] = field(default_factory=list)
    notes: list[str | None] = field(default_factory=list)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class RoundStream:
    """One round of streaming aggregation; build it with ``Aggregator.stream``."""

    def __init__(self, aggregator, global_state: StateDict, round: int, *, sketch_oversample: int = 16,
                 probes: int = 8, base: str | None = None) -> None:
        if aggregator.spec.server == "flexlora":
            raise ConfigError("flexlora has no streaming form; aggregate a list of updates instead")
        if aggregator.norm_bound is not None:
            raise ConfigError("norm_bound clips to the round's median norm, which a stream does not know before "
                              "its end; aggregate a list of updates instead")
        self._agg = aggregator
        self._base = base  # the state_digest of global_state, when the caller has it
        self._pairs = aggregator.check_round_inputs(global_state, round)
        self._global = global_state
        self._round = round
        self._kind = "avg" if aggregator.spec.server == "fedavg" else ("sketch" if aggregator.spec.truncate
                                                                        else "delta")
        self._rtol = aggregator.decompose_options.projection_rtol if aggregator.decompose_options else 0.0
        self._oversample = sketch_oversample
        self._probes = probes
        self._total_weight = 0.0
        self._count = 0
        pair_keys = factor_keys(self._pairs)
        self._other = {k: torch.zeros(v.shape, dtype=WORK_DTYPE, device=v.device)
                       for k, v in global_state.items() if k not in pair_keys and v.is_floating_point()}
        self._other_touched: set[str] = set()
        shapes: dict[tuple, list[LoraPair]] = {}
        for pair in self._pairs:
            shapes.setdefault((pair.d_out, pair.d_in, pair.rank, str(global_state[pair.a_key].device)), []).append(pair)
        self._groups = [self._new_group(pairs) for pairs in shapes.values()]

    # -- set-up ---------------------------------------------------------------

    def _new_group(self, pairs: list[LoraPair]) -> _Group:
        g = self._global
        b = torch.stack([g[p.b_key] for p in pairs]).to(WORK_DTYPE)
        a = torch.stack([g[p.a_key] for p in pairs]).to(WORK_DTYPE)
        untouched = torch.zeros(len(pairs), dtype=torch.bool)
        group = _Group(pairs, b, a, torch.zeros_like(b), torch.zeros_like(a), untouched, untouched.clone())
        if self._kind == "avg":
            return group
        rtol = projection_rtols(pairs[0], g[pairs[0].a_key].dtype, self._rtol)
        for move, note in plan_moves(b, a, self._round, rtol):
            group.moves.append(move)
            group.notes.append(note)
        group.extra["a_pinv"], group.extra["a_proj"], _ = gram_pinv(a, "A", rtol["B"])
        group.extra["b_pinv"], group.extra["b_proj"], _ = gram_pinv(b, "B", rtol["A"])
        if self._kind == "delta":
            group.extra["cross_b"] = torch.zeros_like(b)  # sum w dB_i (dA_i A^+)
            group.extra["cross_a"] = torch.zeros_like(a)  # sum w (B^+ dB_i) dA_i
            return group
        count, d_out, r = b.shape
        d_in = a.shape[2]
        width = r + self._oversample
        co_width = 2 * (r + width)  # Psi^T Q must have full column rank for Q of r + width columns
        gen = range_generator(self._agg.seed, self._round, (d_out, d_in, r))

        def gauss(*shape):
            return torch.randn(shape, generator=gen, dtype=WORK_DTYPE).to(b.device)
        group.extra["omega"] = torch.cat([mT(a), gauss(count, d_in, width - r)], dim=-1)
        group.extra["psi"] = torch.cat([b, gauss(count, d_out, co_width - r)], dim=-1)
        group.extra["phi"] = gauss(count, d_in, self._probes)
        group.extra["y"] = torch.zeros(count, d_out, width, dtype=WORK_DTYPE, device=b.device)
        group.extra["z"] = torch.zeros(count, co_width, d_in, dtype=WORK_DTYPE, device=b.device)
        group.extra["t"] = torch.zeros(count, d_out, self._probes, dtype=WORK_DTYPE, device=b.device)
        return group

    # -- folding --------------------------------------------------------------

    @property
    def count(self) -> int:
        """Updates folded in so far."""
        return self._count

    def add(self, update: SparseUpdate, weight: float = 1.0) -> None:
        """Fold one client's update in; ``weight`` is its sample count. A rejected
        update raises and leaves the stream as it was."""
        weight = check_weight(weight, "weight")
        self._agg.check_update(f"update #{self._count}", update, self._global, self._round)
        w = float(weight) if self._agg.weighting == "samples" else 1.0
        for group in self._groups:
            d_b = self._dense(group, update, "b_key", group.b.shape, group.touched_b)
            d_a = self._dense(group, update, "a_key", group.a.shape, group.touched_a)
            self._fold(group, d_b, d_a, w)
        for key, sparse in update.deltas.items():
            if key in self._other:
                scatter_delta(self._other[key], sparse, w)
                self._other_touched.add(key)
        self._total_weight += w
        self._count += 1

    @staticmethod
    def _dense(group: _Group, update: SparseUpdate, attr: str, shape, touched: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(shape, dtype=WORK_DTYPE, device=group.b.device)
        for i, pair in enumerate(group.pairs):
            sparse = update.deltas.get(getattr(pair, attr))
            if sparse is not None:
                scatter_delta(out[i], sparse, 1.0)
                touched[i] = True
        return out

    def _fold(self, group: _Group, d_b: torch.Tensor, d_a: torch.Tensor, w: float) -> None:
        group.sum_d_b += w * d_b
        group.sum_d_a += w * d_a
        x = group.extra
        if self._kind == "delta":
            x["cross_b"] += w * (d_b @ (d_a @ x["a_pinv"]))
            x["cross_a"] += w * ((x["b_pinv"] @ d_b) @ d_a)
        elif self._kind == "sketch":
            b_i, a_i = group.b + d_b, group.a + d_a
            x["y"] += w * (b_i @ (a_i @ x["omega"]))
            x["z"] += w * ((mT(x["psi"]) @ b_i) @ a_i)
            x["t"] += w * (b_i @ (a_i @ x["phi"]))

    # -- finishing ------------------------------------------------------------

    def finish(self) -> Broadcast:
        """The round's Broadcast from everything folded in (the stream can be finished once)."""
        if self._count == 0 or self._total_weight <= 0:
            raise AggregationError("no updates with positive weight were added to this round")
        agg = self._agg
        report = AggregationReport(round=self._round, method=agg.method, num_updates=self._count)
        factor_deltas: dict[str, torch.Tensor] = {}
        for group in self._groups:
            self._finish_group(group, factor_deltas, report)
        others = {}
        for key in sorted(self._other_touched):
            mean = (self._other[key] / self._total_weight).to(torch.float32)
            others[key] = SparseTensor(tuple(mean.shape), mean.flatten())
        return agg.finish_round(self._round, factor_deltas, others, {}, report,
                                state_digest(self._global) if self._base is None else self._base,
                                "the streamed aggregate")

    def _finish_group(self, group: _Group, out: dict[str, torch.Tensor], report) -> None:
        s = self._total_weight
        live = (group.touched_a | group.touched_b).nonzero().flatten().tolist()
        if not live:
            return
        mean_b, mean_a = group.sum_d_b / s, group.sum_d_a / s
        if self._kind == "avg":
            for i in live:
                pair = group.pairs[i]
                if group.touched_a[i]:
                    out[pair.a_key] = mean_a[i]
                if group.touched_b[i]:
                    out[pair.b_key] = mean_b[i]
                report.moved[pair.prefix] = "A" * bool(group.touched_a[i]) + "B" * bool(group.touched_b[i])
            return
        x = group.extra
        scheduled = scheduled_factor(self._round)
        if self._kind == "delta":
            delta_b = group.b @ (mean_a @ x["a_pinv"]) + mean_b @ x["a_proj"] + x["cross_b"] / s
            delta_a = x["b_proj"] @ mean_a + (x["b_pinv"] @ mean_b) @ group.a + x["cross_a"] / s
            residual = None
        else:
            delta_b, delta_a, residual = self._sketch_deltas(group)
        if self._agg.decompose_options.schedule == "greedy":  # both candidates are here: keep the better per pair
            rtol = projection_rtols(group.pairs[0], self._global[group.pairs[0].a_key].dtype, self._rtol)
            plans = greedy_moves(group.b, group.a, delta_b, delta_a, self._round, rtol)
            group.moves, group.notes = [m for m, _ in plans], [n for _, n in plans]
        for i in live:
            pair, move = group.pairs[i], group.moves[i]
            out[pair.b_key if move == "B" else pair.a_key] = (delta_b if move == "B" else delta_a)[i]
            report.moved[pair.prefix] = move
            report.scheduled[pair.prefix] = scheduled
            report.paths[pair.prefix] = "stream-" + self._kind
            if group.notes[i]:
                report.notes[pair.prefix] = group.notes[i]
            if residual is not None:
                report.residuals[pair.prefix] = float(residual[i])

    def _sketch_deltas(self, group: _Group):
        """Both candidate deltas from the sketch (the cheap part; each pair keeps its move)."""
        s, x, b, a = self._total_weight, group.extra, group.b, group.a
        rank = truncation_rank(self._agg.rank, group.pairs[0])
        y, z, t = x["y"] / s, x["z"] / s, x["t"] / s
        q_b = svqb(torch.cat([b, y], dim=-1))
        coeff = torch.linalg.pinv(mT(x["psi"]) @ q_b) @ z  # W ~ q_b coeff
        q_a = svqb(torch.cat([mT(a), mT(coeff)], dim=-1))
        core_delta = truncate_core(coeff @ q_a, rank) - (mT(q_b) @ b) @ (a @ q_a)
        rtol = projection_rtols(group.pairs[0], self._global[group.pairs[0].a_key].dtype, self._rtol)
        basis_b, basis_a = explicit_basis(q_b), explicit_basis(q_a)
        delta_b = project_core(basis_b, core_delta, basis_a, b, a, "B", rtol["B"])
        delta_a = project_core(basis_b, core_delta, basis_a, b, a, "A", rtol["A"])
        missed = t - q_b @ (coeff @ x["phi"])
        norm = torch.linalg.vector_norm(t, dim=(-2, -1)).clamp_min(torch.finfo(WORK_DTYPE).tiny)
        return delta_b, delta_a, torch.linalg.vector_norm(missed, dim=(-2, -1)) / norm


__all__ = ["RoundStream"]
