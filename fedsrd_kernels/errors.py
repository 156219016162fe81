"""The package's error hierarchy.

Every error a caller can trigger with bad input is a ``FedSRDError``; the
subclasses say which kind of input was wrong. They also derive from
``ValueError`` so code that already catches ``ValueError`` keeps working.
Messages name the tensor (state-dict key) and the problem.
"""

from __future__ import annotations


class FedSRDError(Exception):
    """Base class of every error raised by fedsrd_kernels for bad input."""


class ConfigError(FedSRDError, ValueError):
    """A configuration value is out of range or inconsistent."""


class StateError(FedSRDError, ValueError):
    """A state dict or update does not fit the global state (keys, shapes, ranks)."""


class KeyMismatchError(StateError):
    """A key is unknown to the global state, missing, or a LoRA pair is incomplete."""


class ShapeMismatchError(StateError):
    """A tensor's shape, rank or dtype does not match what it must pair with."""


class NonFiniteError(StateError):
    """A tensor holds NaN or Inf."""


class BaseMismatchError(StateError):
    """A Broadcast was made for another global state (or was already applied to this one)."""


class AggregationError(FedSRDError, ValueError):
    """The server cannot aggregate this set of updates (none given, bad weights, wrong round)."""


class PayloadError(FedSRDError, ValueError):
    """Bytes on the wire are truncated, corrupted or do not follow the format."""


class FormatVersionError(PayloadError):
    """The payload was written by an unknown version of the wire format."""


class SeededCountError(PayloadError, ShapeMismatchError):
    """A seeded download delta carries another number of values than its mask keeps.

    ``decode`` does not draw seeded masks (it would cost 0.3-0.6 s per 50 M elements on the
    CPU), so this is found where the mask is drawn: ``apply`` (on the device that applies
    it) or ``SparseTensor.indices`` / ``to_dense``. It is a PayloadError, what decode raised
    for it before, and a ShapeMismatchError (a StateError), what ``apply`` raises for a
    broadcast that does not fit the state.
    """


class MissingExtraError(FedSRDError, ImportError):
    """An optional part of the package is used without its extra installed (names the extra)."""
