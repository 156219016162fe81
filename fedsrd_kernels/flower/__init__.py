"""FedSRD on Flower's Message API (the only package that imports ``flwr``).

``strategy.FedSRDStrategy`` runs our ``Aggregator`` inside a Flower
ServerApp; ``client_app.app`` and ``server_app.app`` are the app components
(``fedsrd_kernels.flower.client_app:app``, ``fedsrd_kernels.flower.server_app:app``).
Payloads are our wire bytes, carried as one uint8 array in an ArrayRecord.
``security`` writes TLS certificates and SuperNode keys for a secure
deployment (it imports ``cryptography`` only; see README, "Secure deployment").
"""

from ..extras import require_extra

require_extra("flower", "fedsrd_kernels.flower")
