"""Pair the LoRA factors of a PEFT state dict; everything else passes through.

``get_peft_model_state_dict`` strips the adapter name, so a LoRA-adapted
linear layer appears as ``<prefix>.lora_A.weight`` (r x d_in) and
``<prefix>.lora_B.weight`` (d_out x r). Other keys (biases, modules_to_save,
DoRA magnitudes, embedding LoRA) are not LoRA pairs: the package carries them
as plain tensors and never drops them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .errors import KeyMismatchError, NonFiniteError, ShapeMismatchError, StateError

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class LoraPair:
    """One adapted layer: W = W0 + s * B A, B (d_out x r), A (r x d_in)."""

    prefix: str
    rank: int
    d_in: int
    d_out: int

    @property
    def a_key(self) -> str:
        return self.prefix + LORA_A_SUFFIX

    @property
    def b_key(self) -> str:
        return self.prefix + LORA_B_SUFFIX


@dataclass(frozen=True)
class LoraLayout:
    """The LoRA pairs of a state dict (sorted by prefix) and its other keys."""

    pairs: tuple[LoraPair, ...]
    other_keys: tuple[str, ...]

    def factor_keys(self) -> set[str]:
        """The lora_A and lora_B keys of every pair (``factor_keys(self.pairs)``)."""
        return factor_keys(self.pairs)


def factor_keys(pairs: Iterable[LoraPair]) -> set[str]:
    """The lora_A and lora_B keys of ``pairs``: the one place that set is built.

    A module function as well as ``LoraLayout.factor_keys`` because the server and
    the stream hold their round's pairs as a list (``Aggregator.check_round_inputs``).
    """
    return {key for pair in pairs for key in (pair.a_key, pair.b_key)}


def factor_of(key: str) -> str | None:
    """"A" or "B" for a LoRA factor key, None for any other key."""
    if key.endswith(LORA_A_SUFFIX):
        return "A"
    if key.endswith(LORA_B_SUFFIX):
        return "B"
    return None


def pair_prefix(key: str) -> str:
    """The layer prefix of a LoRA factor key (the key minus its factor suffix)."""
    for suffix in (LORA_A_SUFFIX, LORA_B_SUFFIX):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise KeyMismatchError(f"{key!r} is not a LoRA factor key")


def all_finite(value: torch.Tensor) -> bool:
    """True when no element of a floating tensor is NaN or +-Inf.

    aminmax propagates NaN, so its two ends are finite exactly when every element
    is: one vectorised read, where ``isfinite(value).all()`` builds temporaries
    (~40x slower on one CPU thread: 2.1 ms against 0.05 ms for 524,288 floats).
    """
    low, high = torch.aminmax(value)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def check_tensor(name: str, key: str, value: object, *, finite: bool = True) -> torch.Tensor:
    """Return ``value`` if it is a tensor (finite, when floating); else raise naming it."""
    if not isinstance(value, torch.Tensor):
        raise StateError(f"{name}[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
    if value.device.type not in ("cpu", "cuda"):
        raise StateError(f"{name}[{key!r}] is on {value.device}: only CPU and CUDA tensors hold data")
    if finite and value.is_floating_point() and value.numel() and not all_finite(value):
        bad = int((~torch.isfinite(value)).sum())
        raise NonFiniteError(f"{name}[{key!r}] holds {bad} NaN/Inf value(s)")
    return value


def lora_layout(state: StateDict, name: str = "state") -> LoraLayout:
    """Pair the factors of ``state`` and check their shapes agree.

    Raises KeyMismatchError for a factor whose partner is missing and
    ShapeMismatchError for factors that are not 2-D or disagree on r.
    """
    if not isinstance(state, Mapping):
        raise StateError(f"{name} must be a mapping of key -> tensor, got {type(state).__name__}")
    halves: dict[str, dict[str, str]] = {}
    other: list[str] = []
    for key in state:
        if not isinstance(key, str):
            raise KeyMismatchError(f"{name} has a non-string key {key!r}")
        factor = factor_of(key)
        if factor is None:
            other.append(key)
        else:
            halves.setdefault(pair_prefix(key), {})[factor] = key
    pairs = []
    for prefix in sorted(halves):
        keys = halves[prefix]
        for factor, suffix in (("A", LORA_A_SUFFIX), ("B", LORA_B_SUFFIX)):
            if factor not in keys:
                have = next(iter(keys.values()))
                raise KeyMismatchError(f"{name}[{have!r}] has no partner {prefix + suffix!r}")
        a = check_tensor(name, keys["A"], state[keys["A"]], finite=False)
        b = check_tensor(name, keys["B"], state[keys["B"]], finite=False)
        if a.dim() != 2 or b.dim() != 2:
            raise ShapeMismatchError(
                f"{name}: LoRA factors must be 2-D, got {keys['A']!r} {tuple(a.shape)} and "
                f"{keys['B']!r} {tuple(b.shape)}"
            )
        if a.shape[0] != b.shape[1]:
            raise ShapeMismatchError(
                f"{name}: rank mismatch, {keys['A']!r} is {tuple(a.shape)} (r x d_in) but "
                f"{keys['B']!r} is {tuple(b.shape)} (d_out x r)"
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise ShapeMismatchError(
                f"{name}: LoRA factors of {prefix!r} must be floating point, got {a.dtype} and {b.dtype}"
            )
        pairs.append(LoraPair(prefix=prefix, rank=a.shape[0], d_in=a.shape[1], d_out=b.shape[0]))
    return LoraLayout(pairs=tuple(pairs), other_keys=tuple(sorted(other)))


def check_state(state: StateDict, name: str = "state") -> LoraLayout:
    """Validate a whole state dict: tensors only, finite values, paired factors."""
    layout = lora_layout(state, name)
    if not state:
        raise StateError(f"{name} is empty: no LoRA pairs and no other keys")
    for key, value in state.items():
        check_tensor(name, key, value)
    return layout


def check_same_layout(state: StateDict, reference: StateDict, name: str, reference_name: str) -> None:
    """Raise unless ``state`` has exactly the keys, shapes and dtypes of ``reference``."""
    missing = sorted(set(reference) - set(state))
    unknown = sorted(set(state) - set(reference))
    if missing or unknown:
        raise KeyMismatchError(
            f"{name} does not match {reference_name}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unknown {unknown[:5]}{'...' if len(unknown) > 5 else ''}"
        )
    for key, ref in reference.items():
        value = check_tensor(name, key, state[key])
        if value.shape != ref.shape:
            raise ShapeMismatchError(
                f"{name}[{key!r}] has shape {tuple(value.shape)}, {reference_name} has {tuple(ref.shape)}"
            )


DIGEST_HEX_CHARS = 32


def state_digest(state: StateDict) -> str:
    """A 128-bit BLAKE2b digest (32 hex chars) of a state dict: keys, dtypes, shapes and bytes.

    A client puts the digest of the global state it trained from into its update,
    so the server can reject an update made against another global (a client that
    missed a broadcast, or applied one twice). BLAKE2b hashes about 1 GB/s on one core;
    the digest is taken once per round on each side, not per tensor operation.
    """
    if not isinstance(state, Mapping):
        raise StateError(f"state_digest expects a mapping of str to tensors, got {type(state).__name__}")
    hasher = hashlib.blake2b(digest_size=DIGEST_HEX_CHARS // 2, person=b"fedsrd-state")
    for key in sorted(state):
        tensor = state[key]
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise StateError(f"state_digest: {key!r} must map a str to a tensor, got {type(tensor).__name__}")
        header = f"{key}\0{str(tensor.dtype)}\0{list(tensor.shape)}\0".encode()
        hasher.update(len(header).to_bytes(8, "little") + header)
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        hasher.update(memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b"")
    return hasher.hexdigest()
