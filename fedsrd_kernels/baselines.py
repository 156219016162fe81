"""The methods an Aggregator can run: FedSRD, FedSRD-e and the paper's baselines.

Each method is a client upload rule plus a server rule, so every baseline
runs through the same sparsify -> encode -> aggregate -> apply loop:

    method              client upload                 server
    fedsrd              importance top-k (eq. 6-8)    reconstruct, SVD_r, split (eq. 9-13), DARE download
    fedsrd-e            importance top-k              reconstruct, split without SVD, DARE download
    fedavg              dense                         average B and A separately
    fedprox             dense (+ proximal term mu)    average B and A separately
    ffa-lora            dense, A frozen               average B
    flexlora            dense                         SVD_r of sum p_i B_i A_i, send dense B, A
    fed-dare            random drop 0.9, rescaled     average B and A separately
    fedavg-magnitude    magnitude top-k (Table 7)     average B and A separately
    fedavg-importance   importance top-k (Table 7)    average B and A separately

FedICU is not here: see the README's notes on what its paper leaves open.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .config import Selection

ServerRule = Literal["fedsrd", "fedavg", "flexlora"]


@dataclass(frozen=True)
class MethodSpec:
    """What a method asks of clients and what its server does."""

    name: str
    selection: Selection
    server: ServerRule
    truncate: bool = False  # FedSRD's SVD_r (eq. 10); FedSRD-e skips it
    download_drop: float = 0.0  # default DARE rate of the download
    freeze_lora_A: bool = False  # FFA-LoRA trains B only
    proximal_mu: float = 0.0  # FedProx's default mu (local training adds mu/2 ||theta - theta_global||^2)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("fedsrd", "importance", "fedsrd", truncate=True, download_drop=0.8),
        MethodSpec("fedsrd-e", "importance", "fedsrd", truncate=False, download_drop=0.8),
        MethodSpec("fedavg", "dense", "fedavg"),
        MethodSpec("fedprox", "dense", "fedavg", proximal_mu=0.01),
        MethodSpec("ffa-lora", "dense", "fedavg", freeze_lora_A=True),
        MethodSpec("flexlora", "dense", "flexlora", truncate=True),
        MethodSpec("fed-dare", "random", "fedavg"),
        MethodSpec("fedavg-magnitude", "magnitude", "fedavg"),
        MethodSpec("fedavg-importance", "importance", "fedavg"),
    )
}
