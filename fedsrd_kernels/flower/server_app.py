"""The FedSRD ServerApp: the initial global adapter, ``cfg.rounds`` rounds of FedSRDStrategy, the result saved.

Run config: RunConfig fields (see records.run_config) plus ``min-nodes``
(nodes to wait for before each round, default 2). The initial adapter is
built as runner.run.run builds it (``torch.manual_seed(seed)`` before LoRA);
the final global adapter is written to ``<run folder>/global_adapter.safetensors`` and each
round's aggregated train metrics, rejections and digests to ``<run folder>/rounds.jsonl``.

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

from ..runner.loop import STATE_FILE, ServerState, atomic_write_bytes, resume_state
from ..runner.run import load_base
from ..runner.train import adapter_state, lora_model
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
    torch.manual_seed(cfg.seed)
    model, _ = load_base(cfg)
    initial = adapter_state(lora_model(model, cfg))
    del model
    out = cfg.run_folder("flower")
    out.mkdir(parents=True, exist_ok=True)
    server = resume_state(out, cfg, initial, log=logger.info)  # a run stopped or killed goes on from here
    strategy = FedSRDStrategy(cfg.aggregator(), min_nodes=int(context.run_config.get("min-nodes", 2)),
                              min_updates=cfg.min_updates)
    strategy.global_state = server.global_state  # keeps the adapter's dtypes (the ArrayRecord carries float32)
    strategy.round_offset = server.round

    def commit(round_: int, record: dict) -> None:
        nonlocal server
        server = ServerState(round_, strategy.global_state, [*server.records, record], server.fingerprint)
        atomic_write_bytes(out / STATE_FILE, server.to_bytes())
        atomic_write_bytes(out / ROUNDS_FILE, "".join(json.dumps(r) + "\n" for r in server.records).encode())

    strategy.on_round_end = commit
    if cfg.rounds > server.round:
        strategy.start(grid, state_records(server.global_state)[0], num_rounds=cfg.rounds - server.round)
    save_file({k: v.contiguous() for k, v in server.global_state.items()}, str(out / RESULT_FILE))
