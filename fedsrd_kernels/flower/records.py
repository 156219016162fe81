"""Wire bytes and adapter states in Flower records, and the RunConfig from a Flower run config.

Bytes travel as one 1-D uint8 ``Array`` under the key ``"payload"`` of an
ArrayRecord: Flower serializes it with ``np.save`` and chunks it, so the
bytes arrive unchanged. A full adapter state travels as float32 arrays (an
ArrayRecord cannot carry bfloat16) with the original dtype names in a
ConfigRecord, and is cast back on arrival.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from ..errors import ConfigError, PayloadError
from ..runner.config import RunConfig

PAYLOAD_KEY = "payload"
_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def bytes_record(data: bytes) -> ArrayRecord:
    return ArrayRecord({PAYLOAD_KEY: Array(np.frombuffer(data, dtype=np.uint8).copy())})


def record_bytes(record: object, where: str) -> bytes:
    """The payload bytes of an ArrayRecord made by :func:`bytes_record`; PayloadError otherwise."""
    if not isinstance(record, ArrayRecord) or PAYLOAD_KEY not in record:
        raise PayloadError(f"{where}: no ArrayRecord with a {PAYLOAD_KEY!r} array")
    array = record[PAYLOAD_KEY].numpy()
    if array.dtype != np.uint8 or array.ndim != 1:
        raise PayloadError(f"{where}: payload is {array.dtype} with shape {array.shape}, expected 1-D uint8")
    return array.tobytes()


def state_records(state: Mapping[str, torch.Tensor]) -> tuple[ArrayRecord, ConfigRecord]:
    arrays = ArrayRecord({k: Array(v.detach().cpu().to(torch.float32).numpy()) for k, v in state.items()})
    return arrays, ConfigRecord({"dtypes": json.dumps({k: str(v.dtype) for k, v in state.items()})})


def records_state(arrays: ArrayRecord, dtypes: ConfigRecord | None = None) -> dict[str, torch.Tensor]:
    names = json.loads(str(dtypes["dtypes"])) if dtypes is not None and "dtypes" in dtypes else {}
    return {k: torch.from_numpy(a.numpy().copy()).to(_DTYPES.get(names.get(k), torch.float32))
            for k, a in arrays.items()}


def run_config(flower_config: Mapping[str, Any]) -> RunConfig:
    """RunConfig from a Flower run config: keys are RunConfig fields (``-`` or ``_``),
    ``domains`` a comma-separated string, ``jsonl`` "name=path,..." (the clients of a
    simulation; a deployed SuperNode names its own file), ``fraction-train`` the runner's ``participation``, and
    ``config-file`` an optional TOML loaded first. Keys that are not RunConfig fields
    (``min-nodes``, ``max-weight``, ``initial-adapter``) are left to the apps."""
    values = {k.replace("-", "_"): v for k, v in flower_config.items()}
    if "fraction_train" in values:  # Flower's name for the share of nodes that train each round
        values["participation"] = values.pop("fraction_train")
    path = values.pop("config_file", None) or None
    fields = set(RunConfig.__dataclass_fields__)
    overrides = {k: v for k, v in values.items() if k in fields}
    if isinstance(overrides.get("domains"), str):
        overrides["domains"] = tuple(d.strip() for d in overrides["domains"].split(",") if d.strip())
    if overrides.get("model") == "":
        overrides["model"] = None
    if isinstance(overrides.get("jsonl"), str):  # "name=path,name=path": clients of a simulation (see client_app)
        try:
            overrides["jsonl"] = dict(item.strip().split("=", 1) for item in overrides["jsonl"].split(",") if item)
        except ValueError:
            raise ConfigError(f"jsonl must be 'name=path,name=path', got {overrides['jsonl']!r}") from None
    return RunConfig.load(path, **overrides)
