"""``apply``: what the server and every client run on a Broadcast to move the global state."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import (
    BaseMismatchError,
    KeyMismatchError,
    NonFiniteError,
    ShapeMismatchError,
    StateError,
)
from ..kernels._backend import check_backend_name
from ..kernels.download.dispatch import add_dense, seeded_expand_add_grouped
from ..lora import LORA_A_SUFFIX, StateDict, check_state, state_digest
from ..updates import Broadcast, SeededMask, SparseTensor


def apply(global_state: StateDict, broadcast: Broadcast, *, base: str | None = None,
          backend: str | None = None) -> dict[str, torch.Tensor]:
    """The next global state: deltas added, replacements set, other keys untouched.

    A Broadcast that names its base (``Broadcast.base``) applies only to the state
    with that digest: ``base`` is the caller's ``state_digest(global_state)`` when
    it holds one (else it is taken here, about 1 GB/s). On another state, or on
    the state it already moved, it raises BaseMismatchError. A result that would
    hold NaN or Inf raises NonFiniteError naming the key. Either way nothing changes.

    Server and clients run this same function on the same Broadcast, so they
    hold bit-identical states (every backend gives the same bits). Seeded deltas
    (a SeededMask, as ``decode`` and ``Aggregator`` make them) are drawn here, once,
    on the device of the state: on the triton and cuda backends one grouped launch
    per device and dtype redraws the masks in registers and fuses expand + add
    (the new factors of a group are views of one buffer); the torch backend draws
    each mask with numpy on the CPU. A seeded delta whose value count is not what
    its mask keeps raises SeededCountError (a PayloadError and a ShapeMismatchError)
    naming the key. Returns a new dict; ``global_state`` is not modified (untouched
    keys share their tensors with it).
    """
    if not isinstance(broadcast, Broadcast):
        raise StateError(f"apply expects a Broadcast, got {type(broadcast).__name__}")
    check_backend_name(backend)
    check_state(global_state, "global_state")
    changes: Mapping[str, object] = {**broadcast.deltas, **broadcast.replace}
    for key, change in changes.items():
        if key not in global_state:
            raise KeyMismatchError(f"broadcast carries {key!r}, which the global state lacks")
        shape = change.shape if isinstance(change, SparseTensor) else tuple(change.shape)
        if tuple(shape) != tuple(global_state[key].shape):
            raise ShapeMismatchError(
                f"broadcast[{key!r}] has shape {tuple(shape)}, global state has {tuple(global_state[key].shape)}"
            )
    for prefix in broadcast.moved:
        if prefix + LORA_A_SUFFIX not in global_state:
            raise KeyMismatchError(f"broadcast moves {prefix!r}, which the global state lacks")
    for key, sparse in broadcast.deltas.items():
        if not isinstance(sparse, SparseTensor):
            raise StateError(f"broadcast[{key!r}] is a {type(sparse).__name__}, not a SparseTensor")
        if sparse.is_seeded and (key not in broadcast.seeded or sparse.mask != SeededMask(
                broadcast.seed, broadcast.round, key, broadcast.download_drop)):
            raise StateError(f"broadcast[{key!r}]: its mask {sparse.mask} is not one of this broadcast's seeded "
                             "download masks")
    if broadcast.base is not None:
        held = state_digest(global_state) if base is None else base
        if held != broadcast.base:
            raise BaseMismatchError(
                f"the round-{broadcast.round} broadcast was made for the global {broadcast.base[:12]}..., this "
                f"state is {held[:12]}... (another model or round, or the broadcast was already applied)")
    new_state = dict(global_state)
    seeded = {key: sparse for key, sparse in broadcast.deltas.items() if sparse.is_seeded}
    for key, sparse in broadcast.deltas.items():
        if not sparse.is_seeded:  # dense deltas and explicit positions
            new_state[key] = add_dense(global_state[key], sparse)
    new_state.update(seeded_expand_add_grouped(global_state, seeded, broadcast.download_drop, backend=backend))
    for key, value in broadcast.replace.items():
        old = global_state[key]
        new_state[key] = value.to(device=old.device, dtype=old.dtype).clone()
    for key in changes:
        if not bool(torch.isfinite(new_state[key]).all()):
            raise NonFiniteError(f"applying the round-{broadcast.round} broadcast makes {key!r} non-finite; "
                                 "the state is left as it was")
    return new_state
