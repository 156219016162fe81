"""What crosses the wire: a client's SparseUpdate and the server's Broadcast.

Both are plain in-memory objects; ``wire.encode`` / ``wire.decode`` turn them
into bytes and back. Every delta is a SparseTensor: its values, where they go,
and one scale per matrix (the L1 rescale of the upload, or the 1 / (1 - p)
DARE factor of the download), so no pass is spent multiplying. Where they go
is every element (dense), explicit flat positions (an upload), or a
SeededMask (the download): positions that follow from (seed, round, key, p)
and are drawn only where they are used, never by ``decode``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import FrozenInstanceError, dataclass, field

import numpy as np
import torch

from .errors import ConfigError, NonFiniteError, SeededCountError, ShapeMismatchError, StateError
from .kernels.download.reference import drop_threshold, mask_key, seeded_keep_indices, seeded_keep_mask

SUPPORTED_DEVICES = ("cpu", "cuda")  # meta tensors hold no values; other devices are untested
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def scaled_overflow(values: torch.Tensor, scale: float) -> bool:
    """Whether some finite value times ``scale`` is past float32's range: densify multiplies in float32, and
    such values would write Inf into every state that applies them (1e30 x 1e10 did)."""
    largest = float(values.abs().max()) if values.numel() else 0.0
    return _overflows(largest, scale)


def _overflows(largest: float, scale: float) -> bool:
    return math.isfinite(largest) and largest * abs(scale) > FLOAT32_MAX


def check_positions(indices: object, numel: int, device: torch.device) -> None:
    """Flat positions must be a 1-D integer tensor, strictly increasing (so unique) within [0, numel)."""
    if not isinstance(indices, torch.Tensor):
        raise StateError(f"SparseTensor indices must be a tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64 or indices.dim() != 1:
        raise StateError(f"SparseTensor indices must be 1-D int64, got {indices.dim()}-D {indices.dtype}")
    if indices.device != device:
        raise StateError(f"SparseTensor indices are on {indices.device}, values on {device}")
    if indices.numel() and (int(indices[0]) < 0 or int(indices[-1]) >= numel
                            or not bool((indices[1:] > indices[:-1]).all())):  # compared: a difference can wrap
        raise StateError(f"SparseTensor indices must be strictly increasing within [0, {numel})")


@dataclass(frozen=True)
class SeededMask:
    """The positions of one seeded download delta: the elements the Philox mask of
    ``mask_key(seed, round, key)`` keeps at drop rate ``drop`` (the element rule of
    ``kernels/download/reference.py``). These four fields are all a broadcast sends for them.

    ``philox_key`` is the 63-bit kernel key, hashed once here. ``keep_mask`` and
    ``keep_indices`` draw the mask on the CPU (numpy Philox, 0.2-0.6 s per 50 M
    elements on the 2-core dev box); ``server.apply`` on Triton or CUDA never
    materialises it (its kernels redraw it in registers).
    """

    seed: int
    round: int
    key: str
    drop: float
    philox_key: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            threshold = drop_threshold(self.drop)
            philox_key = mask_key(self.seed, self.round, self.key)
        except ConfigError as exc:
            raise StateError(f"SeededMask: {exc}") from None
        except UnicodeEncodeError:
            raise StateError(f"SeededMask: key {self.key!r} is not valid UTF-8") from None
        object.__setattr__(self, "drop", float(self.drop))
        object.__setattr__(self, "philox_key", philox_key)
        object.__setattr__(self, "_threshold", threshold)

    @property
    def keeps_all(self) -> bool:
        """True at drop rate 0 (threshold 0): every element is kept, so the count is known without a draw."""
        return self._threshold == 0

    def keep_mask(self, numel: int) -> torch.Tensor:
        """The keep mask (bool, CPU) of a tensor of ``numel`` elements."""
        return seeded_keep_mask(numel, self.philox_key, self.drop)

    def keep_indices(self, numel: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Sorted kept flat positions (int64), drawn on the CPU and moved to ``device``."""
        return seeded_keep_indices(numel, seed=self.seed, round=self.round, name=self.key, drop=self.drop,
                                   device=device)


class SparseTensor:
    """A sparse delta of one tensor: ``dense.flatten()[positions] = values * scale``.

    shape:   shape of the dense tensor.
    values:  1-D kept values in their wire dtype (float32, bfloat16 or float16).
    indices: sorted, unique int64 flat positions (row-major), one per value,
             checked at construction; None (and no ``mask``) means dense:
             ``values`` holds every element in order.
    scale:   multiplier applied in float32 when densifying; a float32 value.
    mask:    (keyword only, instead of ``indices``) a SeededMask: the positions are
             the ones it keeps, in order. They are not stored: ``indices`` draws them
             on first use (on the CPU, then on the values' device) and keeps them, and
             ``to_dense`` draws the mask without keeping it. That the mask keeps exactly
             ``nnz`` elements is checked there, and by ``server.apply`` on the device it
             applies on (SeededCountError), not at construction (it needs the draw),
             except at drop rate 0, where it keeps every element.

    Immutable: attributes cannot be reassigned, and ``values`` is read once, at
    construction: its largest magnitude gives both the float32 overflow check and
    ``is_finite``, which every later check (``wire.encode``, the server's update
    check) reads instead of scanning the values again. Do not modify ``values``
    in place afterwards.
    """

    shape: tuple[int, ...]
    values: torch.Tensor
    scale: float
    mask: SeededMask | None

    def __init__(self, shape, values: torch.Tensor, indices: torch.Tensor | None = None, scale: float = 1.0, *,
                 mask: SeededMask | None = None) -> None:
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ShapeMismatchError(f"SparseTensor shape must be non-negative, got {shape}")
        if not isinstance(values, torch.Tensor) or not values.is_floating_point():
            what = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
            raise ShapeMismatchError(f"SparseTensor values must be a floating tensor, got {what}")
        if values.device.type not in SUPPORTED_DEVICES:
            raise StateError(f"SparseTensor values are on {values.device}: only CPU and CUDA tensors hold data")
        if values.dim() != 1:
            raise ShapeMismatchError(f"SparseTensor values must be 1-D, got {tuple(values.shape)}")
        numel = math.prod(shape)
        if mask is not None:
            if not isinstance(mask, SeededMask):
                raise StateError(f"SparseTensor mask must be a SeededMask, got {type(mask).__name__}")
            if indices is not None:
                raise StateError("a seeded SparseTensor takes its positions from its mask: give indices or mask, "
                                 "not both")
            if values.numel() > numel or (mask.keeps_all and values.numel() != numel):
                raise SeededCountError(f"tensor {mask.key!r}: {values.numel()} values for a seeded mask over "
                                       f"{numel} elements at drop rate {mask.drop}")
        else:
            if indices is not None:
                check_positions(indices, numel, values.device)
            expected = numel if indices is None else indices.numel()
            if values.numel() != expected:
                raise ShapeMismatchError(f"SparseTensor has {values.numel()} values for {expected} positions")
        # One scalar per matrix, rounded once to float32 so every device applies the same factor.
        real = isinstance(scale, numbers.Real) and not isinstance(scale, (bool, np.bool_))
        rounded = float(torch.tensor(float(scale), dtype=torch.float32)) if real else math.nan
        if not math.isfinite(rounded):
            raise StateError(f"SparseTensor scale must be a finite float32 number, got {scale!r}")
        # The one pass over the values: NaN and Inf show in the largest magnitude (torch's max propagates
        # NaN), and to_dense multiplies in float32, so finite values whose product with the scale is not
        # would turn into Inf inside aggregate (before norm bounding could weigh them down) or apply.
        largest = float(values.abs().max()) if values.numel() else 0.0
        if _overflows(largest, rounded):
            raise NonFiniteError(f"SparseTensor values up to {largest:.3g} times scale {rounded:.3g} overflow float32")
        for name, value in (("shape", shape), ("values", values), ("scale", rounded), ("mask", mask),
                            ("_indices", indices), ("_largest", largest), ("_drawn", None)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __repr__(self) -> str:
        kind = "seeded" if self.mask is not None else "dense" if self._indices is None else "explicit"
        return (f"SparseTensor(shape={self.shape}, nnz={self.nnz}, dtype={self.values.dtype}, positions={kind}, "
                f"scale={self.scale!r}{f', mask={self.mask!r}' if self.mask is not None else ''})")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        """Number of transmitted values."""
        return self.values.numel()

    @property
    def is_dense(self) -> bool:
        return self._indices is None and self.mask is None

    @property
    def is_seeded(self) -> bool:
        """True when the positions are a SeededMask's (not stored, not sent)."""
        return self.mask is not None

    @property
    def is_finite(self) -> bool:
        """Whether every value is finite (read at construction, no pass over the values)."""
        return math.isfinite(self._largest)

    @property
    def indices(self) -> torch.Tensor | None:
        """The flat positions (int64, sorted, on the values' device); None when dense.

        A seeded tensor draws them here on first use, checks the count and keeps them.
        """
        if self.mask is None:
            return self._indices
        if self._drawn is None:
            drawn = self.mask.keep_indices(self.numel, device=self.values.device)
            self._check_count(drawn.numel())
            object.__setattr__(self, "_drawn", drawn)
        return self._drawn

    def _check_count(self, kept: int) -> None:
        if kept != self.nnz:
            m = self.mask
            raise SeededCountError(
                f"tensor {m.key!r}: its seeded mask (seed {m.seed}, round {m.round}, drop {m.drop}) keeps {kept} of "
                f"{self.numel} elements, but it carries {self.nnz} values")

    def with_values(self, values: torch.Tensor) -> SparseTensor:
        """The same positions and scale with other values (as many, e.g. cast to another dtype)."""
        if self.mask is not None:
            return SparseTensor(self.shape, values, scale=self.scale, mask=self.mask)
        return SparseTensor(self.shape, values, self._indices, self.scale)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense delta, scale applied (a float32 multiply), cast to ``dtype``."""
        scaled = self.values.to(torch.float32)
        if self.scale != 1.0:
            scaled = scaled * self.scale
        if self.is_dense:
            return scaled.reshape(self.shape).to(dtype)
        flat = torch.zeros(self.numel, dtype=torch.float32, device=self.values.device)
        if self.mask is not None and self._drawn is None:  # the mask itself: no index list to build
            keep = self.mask.keep_mask(self.numel)
            self._check_count(int(np.count_nonzero(keep.numpy())))  # 3 ms for 50 M flags; torch's sum took 250
            flat.masked_scatter_(keep.to(flat.device), scaled)  # the i-th value to the i-th kept position
        else:
            flat[self.indices] = scaled
        return flat.reshape(self.shape).to(dtype)


class Residual(Mapping[str, torch.Tensor]):
    """What a client held back in one round under error feedback: key -> dense float32 tensor.

    It stays on the client (``wire.encode`` never sees it) and is passed to the
    next round's ``sparsify(..., residual=...)``. ``client_id`` and ``round`` say
    whose it is and which round made it, so ``sparsify`` can refuse one that
    belongs to another client or does not come from an earlier round.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, client_id: str | None = None,
                 round: int | None = None) -> None:
        self._tensors = dict(tensors)
        self.client_id = client_id
        self.round = round

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"Residual({len(self)} tensors, client_id={self.client_id!r}, round={self.round!r})"


@dataclass(frozen=True, eq=False)
class SparseUpdate:
    """One client's upload: sparse deltas against the global state of the round.

    A key absent from ``deltas`` has a zero delta (an all-zero delta sends nothing).
    ``base`` is the ``lora.state_digest`` of the global state the client trained
    from; a server that knows its global's digest rejects updates made against another.
    ``residual`` (error feedback only) is what this round held back, for the
    client's next round; it is client-local and never encoded.
    """

    deltas: Mapping[str, SparseTensor]
    num_samples: int | None = None
    round: int | None = None
    client_id: str | None = None
    base: str | None = None
    residual: Residual | None = field(default=None, repr=False)  # error feedback only; never encoded


@dataclass(frozen=True, eq=False)
class Broadcast:
    """The server's download for one round; clients and server both ``apply`` it.

    deltas:  added to the global state (FedSRD: the moved factor, DARE-sparsified).
    replace: new values that overwrite a key (FlexLoRA's dense B and A).
    moved:   LoRA prefix -> which factor this round changed: "A", "B" or "AB".
    base:    the ``lora.state_digest`` of the global state it applies to; ``apply``
             refuses it on any other state, which also stops it being applied twice.
    seeded:  keys of ``deltas`` whose positions follow from the seeded download
             mask (seed, round, key, download_drop); the wire carries no positions
             for them. ``Aggregator`` and ``decode`` give these keys SparseTensors
             with a SeededMask; one built with explicit positions is also accepted
             (``encode`` then checks them against the mask, which draws it).
    """

    round: int
    method: str
    seed: int
    download_drop: float
    deltas: Mapping[str, SparseTensor] = field(default_factory=dict)
    replace: Mapping[str, torch.Tensor] = field(default_factory=dict)
    moved: Mapping[str, str] = field(default_factory=dict)
    seeded: frozenset[str] = frozenset()
    base: str | None = None
