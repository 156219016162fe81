"""The FedSRD ServerApp: the initial global adapter, ``cfg.rounds`` rounds of FedSRDStrategy, the result saved.

Run config: RunConfig fields (see records.run_config; ``fraction-train`` is the
runner's ``participation``) plus the app's own keys:
- ``min-nodes``: nodes to wait for before each round (default 2);
- ``max-weight``: the most a node's claimed sample count can weigh (default: no cap; the
  default weighting, "equal", ignores claims altogether);
- ``initial-adapter``: a safetensors file of the adapter to start from, written where the
  base model is by ``python -m fedsrd_kernels init-adapter --out FILE`` with the same
  options. With it the server never loads the base model; without it the ServerApp
  builds the adapter as runner.run.initial_adapter does.

The final global adapter is written to ``<run folder>/global_adapter.safetensors`` and
each round's aggregated train metrics, federated held-out loss, rejections and digests
to ``<run folder>/rounds.jsonl``.

After every round the ServerApp commits its state to ``<run folder>/state.safetensors`` as the
in-process runner does (runner.loop.ServerState: one file, replaced atomically). A run that
was stopped or whose ServerApp died is continued by submitting it again with the same
config: it starts after the last committed round, every node gets the full adapter, and the
result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import logging

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..errors import ConfigError
from ..runner.config import RunConfig
from ..runner.loop import STATE_FILE, ServerState, atomic_write_bytes, resume_state
from ..runner.run import initial_adapter
from .records import run_config, state_records
from .strategy import FedSRDStrategy

logger = logging.getLogger(__name__)
app = ServerApp()
RESULT_FILE = "global_adapter.safetensors"
ROUNDS_FILE = "rounds.jsonl"  # one line of aggregated train metrics per round


@app.main()
def main(grid: Grid, context: Context) -> None:
    from safetensors.torch import save_file

    cfg = run_config(context.run_config)
    initial = _initial_adapter(cfg, str(context.run_config.get("initial-adapter", "")))
    out = cfg.run_folder("flower")
    out.mkdir(parents=True, exist_ok=True)
    server = resume_state(out, cfg, initial, log=logger.info)  # a run stopped or killed goes on from here

    def commit(round_: int, record: dict) -> None:
        nonlocal server
        earlier = [r for r in server.records if r["round"] != round_]  # an evaluation completes its round's record
        server = ServerState(round_, strategy.global_state, [*earlier, record], server.fingerprint)
        atomic_write_bytes(out / STATE_FILE, server.to_bytes())
        atomic_write_bytes(out / ROUNDS_FILE, "".join(json.dumps(r) + "\n" for r in server.records).encode())

    max_weight = context.run_config.get("max-weight")
    strategy = FedSRDStrategy(cfg.aggregator(), server.global_state, min_nodes=int(context.run_config.get(
                              "min-nodes", 2)), min_updates=cfg.min_updates, participation=cfg.participation,
                              max_weight=float(max_weight) if max_weight not in (None, "", 0) else None,
                              seed=cfg.seed, round_offset=server.round, eval_every=cfg.eval_every,
                              last_round=cfg.rounds, on_round_end=commit)
    if cfg.rounds > server.round:
        strategy.start(grid, state_records(server.global_state)[0], num_rounds=cfg.rounds - server.round)
    save_file({k: v.contiguous() for k, v in server.global_state.items()}, str(out / RESULT_FILE))


def _initial_adapter(cfg: RunConfig, path: str) -> dict[str, torch.Tensor]:
    """The federation's starting adapter: the ``initial-adapter`` file, else built on the base model."""
    if not path:
        return initial_adapter(cfg)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"initial-adapter {path!r} cannot be read: {exc}") from exc
    if not state or not all(".lora_A." in k or ".lora_B." in k for k in state):
        raise ConfigError(f"initial-adapter {path!r} holds no LoRA adapter (keys must name lora_A or lora_B)")
    return state
