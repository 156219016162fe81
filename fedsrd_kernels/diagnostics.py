"""How faithful a client's upload is: per matrix and per pair, from small Grams only.

For one LoRA pair, the update a client actually trained is
``T = B_i A_i - B A`` and the one the server rebuilds from its upload is
``R = (B + dB_sent)(A + dA_sent) - B A``. Both are products of a d_out x 2r
and a 2r x d_in factor (``T = [B_i, B] [A_i; -A]``), so every inner product
``<X Y, Z W>_F = sum((X^T Z) * (Y W^T))`` costs two 2r x 2r Grams, never a
dense d_out x d_in matrix (at Llama-3.2-3B r = 64 a dense ``T`` of one
down_proj holds 24M elements, its Grams 16K).

From ``<R, T>``, ``|T|^2`` and ``|R|^2``:

- ``along``: the component of R along T, ``<R, T> / |T|^2`` (1 = the right
  length in the right direction; the L1 rescale under Adam pushes it above 1);
- ``orthogonal``: what R holds across T, relative to T:
  ``sqrt(|R|^2 - <R, T>^2 / |T|^2) / |T|``.

``upload_diagnostics`` gives these per pair and over the whole adapter (all
pairs as one vector), with each sent matrix's kept fraction and scale.

``round_fidelity`` judges the server the same way: the change a round applied to
the global adapter, ``R = B' A' - B A`` (download drop included), against the
exact aggregate of the updates it received, ``T = sum_i q_i (B_i A_i - B A)``
with ``B_i = B + dB_i`` (the server's weights q_i). T's factors are
``[B_1 .. B_m, B]`` and ``[q_1 A_1; ..; q_m A_m; -(sum q) A]``, so the Grams are
(m + 1) r square. FedAvg's mean of factors misses T by its cross terms; FedSRD's
one factor per round misses what that factor cannot express; the drop adds noise
across T that later rounds average out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .client import densify
from .config import WORK_DTYPE
from .lora import StateDict, lora_layout
from .updates import SparseUpdate


def lowrank_inner(left_1: torch.Tensor, right_1: torch.Tensor, left_2: torch.Tensor,
                  right_2: torch.Tensor) -> float:
    """``<left_1 @ right_1, left_2 @ right_2>_F`` from the Grams ``left_1^T left_2`` and ``right_1 right_2^T``."""
    return float(((left_1.mT @ left_2) * (right_1 @ right_2.mT)).sum())


@dataclass(frozen=True)
class Fidelity:
    """Inner products of the rebuilt update R with the trained update T (see the module docstring)."""

    dot: float  # <R, T>
    true_sq: float  # |T|^2
    rebuilt_sq: float  # |R|^2

    @property
    def along(self) -> float:
        return self.dot / self.true_sq if self.true_sq > 0 else math.nan

    @property
    def orthogonal(self) -> float:
        if self.true_sq <= 0:
            return math.nan
        across = max(self.rebuilt_sq - self.dot * self.dot / self.true_sq, 0.0)
        return math.sqrt(across / self.true_sq)

    def __add__(self, other: Fidelity) -> Fidelity:
        return Fidelity(self.dot + other.dot, self.true_sq + other.true_sq, self.rebuilt_sq + other.rebuilt_sq)


def pair_fidelity(b_prev: torch.Tensor, a_prev: torch.Tensor, b_local: torch.Tensor, a_local: torch.Tensor,
                  b_rebuilt: torch.Tensor, a_rebuilt: torch.Tensor) -> Fidelity:
    """Fidelity of ``b_rebuilt a_rebuilt - b_prev a_prev`` to ``b_local a_local - b_prev a_prev`` (float64)."""
    b_prev, a_prev, b_local, a_local, b_rebuilt, a_rebuilt = (
        t.to(WORK_DTYPE) for t in (b_prev, a_prev, b_local, a_local, b_rebuilt, a_rebuilt))
    true_left, true_right = torch.cat([b_local, b_prev], 1), torch.cat([a_local, -a_prev], 0)
    rebuilt_left, rebuilt_right = torch.cat([b_rebuilt, b_prev], 1), torch.cat([a_rebuilt, -a_prev], 0)
    return Fidelity(
        dot=lowrank_inner(rebuilt_left, rebuilt_right, true_left, true_right),
        true_sq=lowrank_inner(true_left, true_right, true_left, true_right),
        rebuilt_sq=lowrank_inner(rebuilt_left, rebuilt_right, rebuilt_left, rebuilt_right),
    )


def upload_diagnostics(global_state: StateDict, local_state: StateDict,
                       update: SparseUpdate) -> dict[str, object]:
    """One client's upload, judged against what it trained.

    Returns ``pairs`` (prefix -> {"along", "orthogonal"}), ``matrices`` (key ->
    {"kept_fraction", "scale"} for every LoRA factor; a factor that sent nothing
    has kept fraction 0 and scale None) and ``adapter`` (along and orthogonal
    over the whole adapter, all pairs as one vector).
    """
    layout = lora_layout(global_state, "global_state")
    sent = densify(update)
    pairs, matrices, total = {}, {}, Fidelity(0.0, 0.0, 0.0)
    for pair in layout.pairs:
        b_prev, a_prev = global_state[pair.b_key], global_state[pair.a_key]
        b_rebuilt = b_prev.to(WORK_DTYPE) + sent[pair.b_key].to(WORK_DTYPE) if pair.b_key in sent else b_prev
        a_rebuilt = a_prev.to(WORK_DTYPE) + sent[pair.a_key].to(WORK_DTYPE) if pair.a_key in sent else a_prev
        fidelity = pair_fidelity(b_prev, a_prev, local_state[pair.b_key], local_state[pair.a_key], b_rebuilt,
                                 a_rebuilt)
        total = total + fidelity
        pairs[pair.prefix] = {"along": fidelity.along, "orthogonal": fidelity.orthogonal}
        for key in (pair.a_key, pair.b_key):
            sparse = update.deltas.get(key)
            numel = global_state[key].numel()
            matrices[key] = {"kept_fraction": (sparse.nnz / numel if sparse is not None else 0.0),
                             "scale": sparse.scale if sparse is not None else None}
    return {"pairs": pairs, "matrices": matrices,
            "adapter": {"along": total.along, "orthogonal": total.orthogonal}}


def round_fidelity(global_state: StateDict, updates: Sequence[SparseUpdate], weights: Sequence[float],
                   new_state: StateDict) -> dict[str, object]:
    """The round's applied change against the exact aggregate of its updates (module docstring).

    ``weights`` are the q_i the server gave the updates (normalised weights times any clip
    factors). Returns ``adapter`` (along and orthogonal over the whole adapter) and
    ``pairs`` (module kind -> mean along and orthogonal over its pairs).
    """
    layout = lora_layout(global_state, "global_state")
    sent = [densify(u) for u in updates]
    q = [float(w) for w in weights]
    by_kind: dict[str, dict[str, list[float]]] = {}
    total = Fidelity(0.0, 0.0, 0.0)
    for pair in layout.pairs:
        b, a = global_state[pair.b_key].to(WORK_DTYPE), global_state[pair.a_key].to(WORK_DTYPE)
        client_b = [b + d[pair.b_key].to(WORK_DTYPE) if pair.b_key in d else b for d in sent]
        client_a = [a + d[pair.a_key].to(WORK_DTYPE) if pair.a_key in d else a for d in sent]
        true_left = torch.cat([*client_b, b], 1)
        true_right = torch.cat([*(w * a_i for w, a_i in zip(q, client_a)), -sum(q) * a], 0)
        applied_left = torch.cat([new_state[pair.b_key].to(WORK_DTYPE), b], 1)
        applied_right = torch.cat([new_state[pair.a_key].to(WORK_DTYPE), -a], 0)
        fidelity = Fidelity(
            dot=lowrank_inner(applied_left, applied_right, true_left, true_right),
            true_sq=lowrank_inner(true_left, true_right, true_left, true_right),
            rebuilt_sq=lowrank_inner(applied_left, applied_right, applied_left, applied_right),
        )
        total = total + fidelity
        slot = by_kind.setdefault(_module_kind(pair.prefix), {"along": [], "orthogonal": []})
        for name in ("along", "orthogonal"):
            value = getattr(fidelity, name)
            if math.isfinite(value):
                slot[name].append(value)
    return {"adapter": {"along": total.along, "orthogonal": total.orthogonal},
            "pairs": {kind: {"along": _mean(v["along"]), "orthogonal": _mean(v["orthogonal"])}
                      for kind, v in sorted(by_kind.items())}}


def _module_kind(name: str) -> str:
    """``...layers.3.self_attn.q_proj.lora_A.weight`` -> ``q_proj``."""
    parts = [p for p in name.split(".") if p not in ("weight", "lora_A", "lora_B")]
    return parts[-1] if parts else name


def summarise(diagnostics: Mapping[str, object]) -> dict[str, object]:
    """Per module kind and factor: mean kept fraction and median scale; per kind: mean along / orthogonal."""
    kinds: dict[str, dict[str, list[float]]] = {}
    for key, entry in diagnostics["matrices"].items():
        factor = "A" if ".lora_A." in key else "B"
        slot = kinds.setdefault(f"{_module_kind(key)}.{factor}", {"kept": [], "scale": []})
        slot["kept"].append(entry["kept_fraction"])
        if entry["scale"] is not None:
            slot["scale"].append(entry["scale"])
    by_pair: dict[str, dict[str, list[float]]] = {}
    for prefix, entry in diagnostics["pairs"].items():
        slot = by_pair.setdefault(_module_kind(prefix), {"along": [], "orthogonal": []})
        for name in ("along", "orthogonal"):
            if math.isfinite(entry[name]):
                slot[name].append(entry[name])
    return {
        "adapter": dict(diagnostics["adapter"]),
        "matrices": {kind: {"kept_fraction": _mean(v["kept"]), "scale_median": _median(v["scale"])}
                     for kind, v in sorted(kinds.items())},
        "pairs": {kind: {"along": _mean(v["along"]), "orthogonal": _mean(v["orthogonal"])}
                  for kind, v in sorted(by_pair.items())},
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])
