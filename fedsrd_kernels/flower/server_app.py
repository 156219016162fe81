"""The FedSRD ServerApp: the initial global adapter, ``cfg.rounds`` rounds of FedSRDStrategy, the result saved.

Run config: RunConfig fields (see records.run_config) plus ``min-nodes``
(nodes to wait for before each round, default 2). The initial adapter is
built as runner.run.run builds it (``torch.manual_seed(seed)`` before LoRA);
the final global adapter is written to ``<out_dir>/global_adapter.safetensors`` and each
round's aggregated train metrics to ``<out_dir>/rounds.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..runner.run import load_base
from ..runner.train import adapter_state, lora_model
from .records import aggregator_for, run_config, state_records
from .strategy import FedSRDStrategy

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
    strategy = FedSRDStrategy(aggregator_for(cfg), min_nodes=int(context.run_config.get("min-nodes", 2)),
                              min_updates=cfg.min_updates)
    strategy.global_state = initial  # keeps the adapter's dtypes (the ArrayRecord carries float32)
    result = strategy.start(grid, state_records(initial)[0], num_rounds=cfg.rounds)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in strategy.global_state.items()}, str(out / RESULT_FILE))
    rounds = {r: dict(m) for r, m in sorted(result.train_metrics_clientapp.items())}
    (out / ROUNDS_FILE).write_text("".join(json.dumps({"round": r, **m}) + "\n" for r, m in rounds.items()))
