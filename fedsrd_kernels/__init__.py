"""fedsrd_kernels: FedSRD (Sparsify-Reconstruct-Decompose) federated LoRA aggregation.

Public API (documented in README.md):

    cfg = SparsifyConfig(...)                       # client upload rule
    upd = sparsify(local_state, global_state, cfg)  # client, eq. 4-8
    deltas = densify(upd)
    payload = encode(upd); upd = decode(payload)
    agg = Aggregator(method="fedsrd", rank=r, download_drop=0.8, seed=0)
    bcast = agg.aggregate(global_state, updates, weights=None, round=t)
    new_global = apply(global_state, bcast)
"""

from .baselines import METHODS, MethodSpec
from .client import densify, sparsify
from .config import SparsifyConfig
from .errors import (
    AggregationError,
    ConfigError,
    FedSRDError,
    FormatVersionError,
    KeyMismatchError,
    MissingExtraError,
    NonFiniteError,
    PayloadError,
    SeededCountError,
    ShapeMismatchError,
    StateError,
)
from .intake import RoundOutcome, Submission, run_round, screen
from .kernels._backend import backend_info
from .kernels.sparsify.reference import importance, keep_count, kurtosis_ratio, pearson_kurtosis
from .lora import LoraLayout, LoraPair, lora_layout, state_digest
from .server import AggregationReport, Aggregator, apply
from .updates import Broadcast, SeededMask, SparseTensor, SparseUpdate
from .wire import CommCost, comm_cost, decode, encode

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "AggregationError",
    "AggregationReport",
    "Aggregator",
    "Broadcast",
    "CommCost",
    "ConfigError",
    "FedSRDError",
    "FormatVersionError",
    "MissingExtraError",
    "KeyMismatchError",
    "LoraLayout",
    "LoraPair",
    "MethodSpec",
    "NonFiniteError",
    "PayloadError",
    "SeededCountError",
    "SeededMask",
    "RoundOutcome",
    "ShapeMismatchError",
    "SparseTensor",
    "SparseUpdate",
    "SparsifyConfig",
    "StateError",
    "Submission",
    "__version__",
    "apply",
    "backend_info",
    "comm_cost",
    "decode",
    "densify",
    "encode",
    "importance",
    "keep_count",
    "kurtosis_ratio",
    "lora_layout",
    "pearson_kurtosis",
    "run_round",
    "screen",
    "sparsify",
    "state_digest",
]
