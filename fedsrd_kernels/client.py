"""Client side: sparsify a locally trained state against the round's global
state (spec section 1, eq. 4-8), and densify an update back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .config import SparsifyConfig, check_value_dtype
from .errors import ConfigError, KeyMismatchError, NonFiniteError, ShapeMismatchError, StateError
from .kernels.sparsify.dispatch import sparsify_grouped
from .kernels.sparsify.reference import select_top
from .lora import StateDict, check_same_layout, check_state, lora_layout
from .updates import Broadcast, Residual, SparseTensor, SparseUpdate


def _random_keep(numel: int, drop: float, generator: torch.Generator | None) -> torch.Tensor:
    keep = torch.rand(numel, generator=generator, dtype=torch.float64) >= drop
    return keep.nonzero().flatten()


def sparsify_matrix(
    delta: torch.Tensor,
    scores: torch.Tensor | None,
    config: SparsifyConfig,
    generator: torch.Generator | None = None,
) -> SparseTensor | None:
    """Sparsify one matrix's delta; None when nothing is worth sending.

    ``scores`` drives the top-k for "importance" and "magnitude" selection and
    is ignored otherwise (``sparsify`` runs importance grouped over all pairs).
    An all-zero delta sends nothing (and never reaches the kurtosis of a constant).
    """
    value_dtype = check_value_dtype(config.value_dtype)
    flat = delta.flatten()
    if not bool(flat.any()):
        return None
    if config.selection == "dense":
        return SparseTensor(delta.shape, flat.to(value_dtype))
    if config.selection == "random":
        kept = _random_keep(flat.numel(), config.random_drop, generator)
        if kept.numel() == 0:
            return None
        return SparseTensor(delta.shape, flat[kept].to(value_dtype), kept, scale=1.0 / (1.0 - config.random_drop))
    chosen = select_top(delta, scores, config.base, config.coeff, config.upper, _l1_rescale(config))
    if chosen is None or chosen[2] is None:
        return None
    kept, values, scale = chosen
    return SparseTensor(delta.shape, values.to(value_dtype), kept, scale=scale)


def sparsify(
    local_state: StateDict,
    global_state: StateDict,
    config: SparsifyConfig | None = None,
    *,
    num_samples: int | None = None,
    round: int | None = None,
    client_id: str | None = None,
    base: str | None = None,
    backend: str | None = None,
    residual: Mapping[str, torch.Tensor] | None = None,
) -> SparseUpdate:
    """Build a client's upload from its trained state and the round's global state.

    For every LoRA pair: dB = B_local - B_global, dA = A_local - A_global (eq. 4),
    scored by eq. 6 (or by magnitude, at random, or not at all per
    ``config.selection``), and each matrix keeps its k highest scores (eq. 7-8)
    with one L1 rescale factor. Keys that are not LoRA factors send their dense
    delta when it is non-zero. Neither input is modified.

    Importance selection runs over all pairs at once (``sparsify_grouped``):
    the grouped Triton kernels on CUDA tensors, the torch reference on CPU;
    ``backend`` overrides the choice (see kernels._backend). ``base`` is passed
    through to the update: the ``lora.state_digest`` of ``global_state``, which
    the caller takes once per round (it reads every byte of the adapter).

    Error feedback (``config.error_feedback``): ``residual`` is the previous
    round's ``update.residual`` (None in a client's first round). It is added to
    this round's deltas before selection, and the returned update's ``residual``
    holds what was not sent, so that, to float32 rounding,
    ``densify(update)[k] + update.residual[k] == local[k] - global[k] + residual[k]``.
    """
    config = config if config is not None else SparsifyConfig()
    layout = check_state(global_state, "global_state")
    # Every value of local_state is read once: check_same_layout checks its tensors finite, and
    # lora_layout adds only what check_state would check beyond that (its factors are floating).
    check_same_layout(local_state, global_state, "local_state", "global_state")
    lora_layout(local_state, "local_state")
    if num_samples is not None and not (isinstance(num_samples, int) and num_samples >= 0):
        raise StateError(f"num_samples must be an int >= 0, got {num_samples!r}")
    carried: dict[str, torch.Tensor] | None = None
    if config.error_feedback:
        carried = corrected_deltas(local_state, global_state, residual, client_id=client_id, round=round)
        # The selection below sees the corrected deltas as if they had been trained.
        local_state = {k: global_state[k].to(torch.float32) + carried[k] if k in carried else v
                       for k, v in local_state.items()}
    elif residual is not None:
        raise ConfigError("a residual was passed, but config.error_feedback is off")
    generator = None
    if config.selection == "random" and config.seed is not None:
        generator = torch.Generator().manual_seed(config.seed)

    deltas: dict[str, SparseTensor] = {}
    if config.selection == "importance" and layout.pairs:
        grouped = sparsify_grouped(
            [(global_state[p.a_key], global_state[p.b_key], local_state[p.a_key], local_state[p.b_key])
             for p in layout.pairs],
            base=config.base, coeff=config.coeff, upper=config.upper, rescale=_l1_rescale(config),
            names=[p.prefix for p in layout.pairs], backend=backend,
        )
        value_dtype = check_value_dtype(config.value_dtype)
        keys = [key for p in layout.pairs for key in (p.a_key, p.b_key)]  # matrix 2i is dA, 2i+1 dB
        for key, shape, kept in zip(keys, grouped.shapes, grouped.split()):
            if kept is not None:
                indices, values, scale = kept
                deltas[key] = SparseTensor(shape, values.to(value_dtype), indices, scale)
    for pair in layout.pairs if config.selection != "importance" else ():
        a_prev = global_state[pair.a_key].to(torch.float32)
        b_prev = global_state[pair.b_key].to(torch.float32)
        d_a = local_state[pair.a_key].to(torch.float32) - a_prev
        d_b = local_state[pair.b_key].to(torch.float32) - b_prev
        magnitude = config.selection == "magnitude"
        for key, delta in ((pair.a_key, d_a), (pair.b_key, d_b)):
            sparse = sparsify_matrix(delta, delta.abs() if magnitude else None, config, generator)
            if sparse is not None:
                deltas[key] = sparse
    for key in layout.other_keys:
        local, ref = local_state[key], global_state[key]
        if not ref.is_floating_point():
            if not torch.equal(local, ref):
                raise StateError(f"local_state[{key!r}] is a non-floating tensor ({ref.dtype}) that changed")
            continue
        delta = local.to(torch.float32) - ref.to(torch.float32)
        if bool(delta.any()):
            deltas[key] = SparseTensor(delta.shape, delta.flatten())
    if config.rescale and config.rescale_space == "dw" and config.selection in ("importance", "magnitude"):
        deltas = _rescale_in_dw(deltas, layout.pairs, local_state, global_state)
    held_back = None
    if carried is not None:
        held_back = Residual({k: c - deltas[k].to_dense() if k in deltas else c.clone() for k, c in carried.items()},
                             client_id=client_id, round=round)
    return SparseUpdate(deltas=deltas, num_samples=num_samples, round=round, client_id=client_id, base=base,
                        residual=held_back)


def _l1_rescale(config: SparsifyConfig) -> bool:
    return bool(config.rescale) and config.rescale_space == "params"


def _rescale_in_dw(deltas: dict[str, SparseTensor], pairs, local_state: StateDict,
                   global_state: StateDict) -> dict[str, SparseTensor]:
    """Give both kept deltas of each pair the scalar s = <R, T> / |R|^2 (SparsifyConfig.rescale_space "dw")."""
    from .diagnostics import pair_fidelity  # diagnostics imports densify from here

    out = dict(deltas)
    for pair in pairs:
        kept = [deltas.get(pair.b_key), deltas.get(pair.a_key)]
        if all(k is None for k in kept):
            continue
        b_prev, a_prev = global_state[pair.b_key], global_state[pair.a_key]
        rebuilt = [prev.to(torch.float64) + (k.to_dense(torch.float64) if k is not None else 0.0)
                   for prev, k in zip((b_prev, a_prev), kept)]
        fidelity = pair_fidelity(b_prev, a_prev, local_state[pair.b_key], local_state[pair.a_key], *rebuilt)
        if fidelity.rebuilt_sq <= 0 or not math.isfinite(fidelity.dot / fidelity.rebuilt_sq):
            continue
        scale = fidelity.dot / fidelity.rebuilt_sq
        for key, sparse in zip((pair.b_key, pair.a_key), kept):
            if sparse is not None:
                out[key] = SparseTensor(sparse.shape, sparse.values, sparse.indices, scale=sparse.scale * scale)
    return out


def corrected_deltas(
    local_state: StateDict,
    global_state: StateDict,
    residual: Mapping[str, torch.Tensor] | None,
    *,
    client_id: str | None = None,
    round: int | None = None,
) -> dict[str, torch.Tensor]:
    """Float32 ``local - global + residual`` for every floating key (error feedback).

    The residual must hold exactly the global state's floating keys, with their
    shapes, finite; a ``Residual`` that names another client, or a round that is
    not before ``round``, is refused: it belongs to another client or run.
    """
    floating = [k for k, v in global_state.items() if v.is_floating_point()]
    out = {k: local_state[k].to(torch.float32) - global_state[k].to(torch.float32) for k in floating}
    if residual is None:
        return out
    if not isinstance(residual, Mapping):
        raise StateError(f"residual must be a mapping of key -> tensor, got {type(residual).__name__}")
    if isinstance(residual, Residual):
        if client_id is not None and residual.client_id is not None and residual.client_id != client_id:
            raise StateError(f"the residual belongs to client {residual.client_id!r}, this update is {client_id!r}")
        if round is not None and residual.round is not None and residual.round >= round:
            raise StateError(f"the residual was made in round {residual.round}; it must come from a round before "
                             f"{round} (a residual from another run?)")
    missing, unknown = sorted(set(floating) - set(residual)), sorted(set(residual) - set(floating))
    if missing or unknown:
        raise KeyMismatchError(f"residual does not match the adapter: missing {missing[:5]}, unknown {unknown[:5]} "
                               "(a residual from another model or run?)")
    for key in floating:
        held = residual[key]
        if not isinstance(held, torch.Tensor) or not held.is_floating_point():
            what = held.dtype if isinstance(held, torch.Tensor) else type(held).__name__
            raise ShapeMismatchError(f"residual[{key!r}] must be a floating tensor, got {what}")
        if held.shape != out[key].shape:
            raise ShapeMismatchError(f"residual[{key!r}] has shape {tuple(held.shape)}, the adapter has "
                                     f"{tuple(out[key].shape)}")
        held = held.to(device=out[key].device, dtype=torch.float32)
        if not bool(torch.isfinite(held).all()):
            raise NonFiniteError(f"residual[{key!r}] holds NaN/Inf values")
        out[key] = out[key] + held
    return out


def densify(update: SparseUpdate | Broadcast) -> dict[str, torch.Tensor]:
    """Dense float32 deltas, scale applied, for every key the update carries."""
    if not isinstance(update, (SparseUpdate, Broadcast)):
        raise StateError(f"densify expects a SparseUpdate or Broadcast, got {type(update).__name__}")
    deltas: Mapping[str, SparseTensor] = update.deltas
    return {key: sparse.to_dense() for key, sparse in deltas.items()}
