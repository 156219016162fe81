"""The server: the Aggregator and its decompose paths, robust aggregation, streaming, and ``apply``.

- ``aggregator``: ``Aggregator`` (reconstruct, aggregate, decompose, the seeded download);
- ``decompose``: the FedSRD decompose paths (delta, exact, randomized, reference) and their planning,
  on the linear algebra of ``factored`` (factored forms) and ``linalg`` (the dense reference);
- ``robust``: the one weight rule, normalised weights, norm bounding;
- ``streaming``: ``RoundStream``, a round folded in one update at a time;
- ``rounds``: ``AggregationReport`` and the checks every way of finishing a round shares;
- ``apply``: what the server and every client run on a Broadcast.
"""

from .aggregator import WEIGHTINGS, Aggregator
from .apply import apply
from .robust import bound_norms, check_weight, normalised_weights, reconstructed_norms
from .rounds import AggregationReport, check_finite_changes
from .streaming import RoundStream

__all__ = ["WEIGHTINGS", "AggregationReport", "Aggregator", "RoundStream", "apply", "bound_norms",
           "check_finite_changes", "check_weight", "normalised_weights", "reconstructed_norms"]
