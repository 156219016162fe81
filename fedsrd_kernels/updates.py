"""What crosses the wire: a client's SparseUpdate and the server's Broadcast.

Both are plain in-memory objects; ``wire.encode`` / ``wire.decode`` turn them
into bytes and back. Every delta is a SparseTensor: kept flat positions,
their values, and one scale per matrix (the L1 rescale of the upload, or the
1 / (1 - p) DARE factor of the download), so no pass is spent multiplying.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import NonFiniteError, ShapeMismatchError, StateError

SUPPORTED_DEVICES = ("cpu", "cuda")  # meta tensors hold no values; other devices are untested
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def scaled_overflow(values: torch.Tensor, scale: float) -> bool:
    """Whether some finite value times ``scale`` is past float32's range: densify multiplies in float32, and
    such values would write Inf into every state that applies them (1e30 x 1e10 did)."""
    largest = float(values.abs().max()) if values.numel() else 0.0
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


@dataclass(frozen=True, eq=False)
class SparseTensor:
    """A sparse delta of one tensor: ``dense.flatten()[indices] = values * scale``.

    shape:   shape of the dense tensor.
    values:  1-D kept values in their wire dtype (float32, bfloat16 or float16).
    indices: sorted, unique int64 flat positions (row-major), one per value,
             checked at construction; None means dense: ``values`` holds every
             element in order.
    scale:   multiplier applied in float32 when densifying; a float32 value.
    """

    shape: tuple[int, ...]
    values: torch.Tensor
    indices: torch.Tensor | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if any(s < 0 for s in self.shape):
            raise ShapeMismatchError(f"SparseTensor shape must be non-negative, got {self.shape}")
        if not isinstance(self.values, torch.Tensor) or not self.values.is_floating_point():
            what = self.values.dtype if isinstance(self.values, torch.Tensor) else type(self.values).__name__
            raise ShapeMismatchError(f"SparseTensor values must be a floating tensor, got {what}")
        if self.values.device.type not in SUPPORTED_DEVICES:
            raise StateError(f"SparseTensor values are on {self.values.device}: only CPU and CUDA tensors hold data")
        if self.values.dim() != 1:
            raise ShapeMismatchError(f"SparseTensor values must be 1-D, got {tuple(self.values.shape)}")
        if self.indices is not None:
            check_positions(self.indices, self.numel, self.values.device)
        expected = self.numel if self.indices is None else self.indices.numel()
        if self.values.numel() != expected:
            raise ShapeMismatchError(
                f"SparseTensor has {self.values.numel()} values for {expected} positions"
            )
        # One scalar per matrix, rounded once to float32 so every device applies the same factor.
        real = isinstance(self.scale, numbers.Real) and not isinstance(self.scale, (bool, np.bool_))
        scale = float(torch.tensor(float(self.scale), dtype=torch.float32)) if real else math.nan
        if not math.isfinite(scale):
            raise StateError(f"SparseTensor scale must be a finite float32 number, got {self.scale!r}")
        object.__setattr__(self, "scale", scale)
        # to_dense multiplies in float32: finite values whose product with the scale is not would turn
        # into Inf inside aggregate (before norm bounding could weigh them down) or apply. (NaN and Inf
        # values themselves are refused, naming the key, by encode and by the server's update check.)
        if scaled_overflow(self.values, scale):
            raise NonFiniteError(f"SparseTensor values up to {float(self.values.abs().max()):.3g} times scale "
                                 f"{scale:.3g} overflow float32")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        """Number of transmitted values."""
        return self.values.numel()

    @property
    def is_dense(self) -> bool:
        return self.indices is None

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense delta, scale applied (a float32 multiply), cast to ``dtype``."""
        scaled = self.values.to(torch.float32)
        if self.scale != 1.0:
            scaled = scaled * self.scale
        if self.indices is None:
            return scaled.reshape(self.shape).to(dtype)
        flat = torch.zeros(self.numel, dtype=torch.float32, device=self.values.device)
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
             for them.
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
