"""``apply``: what the server and every client run on a Broadcast to move the global state."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..config import FACTOR_DTYPES
from ..errors import (
    BaseMismatchError,
    KeyMismatchError,
    NonFiniteError,
    ShapeMismatchError,
    StateError,
)
from ..kernels._backend import check_backend_name, resolve_backend
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
    groups: dict[tuple[str, torch.device, torch.dtype], list[str]] = {}
    for key, sparse in broadcast.deltas.items():
        old = global_state[key]
        choice = resolve_backend(old.device, backend, cuda_op=True) if sparse.is_seeded else "torch"
        if choice != "torch" and old.dtype in FACTOR_DTYPES:
            groups.setdefault((choice, old.device, old.dtype), []).append(key)
        else:  # the reference: dense deltas, explicit positions, seeded masks drawn with numpy
            new_state[key] = (old.to(torch.float32) + sparse.to_dense().to(old.device)).to(old.dtype)
    for (choice, device, _), keys in groups.items():
        new_state.update(_seeded_expand_add(global_state, broadcast, keys, choice, device))
    for key, value in broadcast.replace.items():
        old = global_state[key]
        new_state[key] = value.to(device=old.device, dtype=old.dtype).clone()
    for key in changes:
        if not bool(torch.isfinite(new_state[key]).all()):
            raise NonFiniteError(f"applying the round-{broadcast.round} broadcast makes {key!r} non-finite; "
                                 "the state is left as it was")
    return new_state


def _seeded_expand_add(global_state: StateDict, broadcast: Broadcast, keys: list[str], choice: str,
                       device: torch.device) -> dict[str, torch.Tensor]:
    """``old + expand(values) * scale`` for the seeded ``keys`` (one device and dtype) in one grouped launch.

    The factors are laid end to end in one buffer, the kernel draws every mask in registers,
    checks each key's value count against its mask (one host sync) and adds; each new factor
    is a view of the output buffer.
    """
    olds = [global_state[key] for key in keys]
    sparses = [broadcast.deltas[key] for key in keys]
    offsets = [0]
    for old in olds:
        offsets.append(offsets[-1] + old.numel())
    flat = olds[0].reshape(-1) if len(olds) == 1 else torch.cat([old.reshape(-1) for old in olds])
    dtypes = {s.values.dtype for s in sparses}
    # One value buffer: as sent when the dtypes agree, else widened to float32 (exact for the wire dtypes,
    # and the rounding torch's reference applies to anything wider).
    value_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    if value_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        value_dtype = torch.float32
    values = torch.cat([s.values.to(value_dtype) for s in sparses]).to(device)
    args = (flat, offsets, values, [s.mask.philox_key for s in sparses], broadcast.download_drop,
            [s.scale for s in sparses])
    counts = [s.nnz for s in sparses]
    if choice == "cuda":
        from ..kernels.download.cuda import seeded_expand_add_cuda

        out = seeded_expand_add_cuda(*args, counts=counts, names=keys)
    else:
        from ..kernels.download.triton import seeded_expand_add_grouped_triton

        out = seeded_expand_add_grouped_triton(*args, counts=counts, names=keys)
    return {key: out[a:b].view(old.shape) for key, old, a, b in zip(keys, olds, offsets, offsets[1:])}


