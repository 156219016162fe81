"""The FedSRD ClientApp: sync the global adapter, train on this node's data, sparsify, encode.

Node config (``flower-supernode --node-config``): ``name`` is the client's
name and, without ``jsonl``, the domain it trains on (see runner.data);
``jsonl`` a JSONL file of its examples. The data, model and seeds are those
of runner.loop.federate (``stable_seed(seed, round, name)``; LoRA built after
``torch.manual_seed(seed)``), so a Flower run can equal the in-process one.

The node keeps the global adapter it was last sent in ``context.state`` and
applies the next Broadcast to it; the server sends the full adapter when the
node missed a round, and nothing when the node already holds the adapter (after
an evaluation). ``evaluate`` replies with the node's held-out loss
(runner.train.heldout_loss on its held-out texts) under the new global adapter.

With ``error-feedback`` in the run config, the node keeps its residual on its
own disk, in ``<out-dir>/clients/<name>`` or the node config's ``state-dir``
(see runner.residuals): written atomically before the reply leaves, the one
before it kept until a newer round has used it, so a round the server asks
again (a resubmitted run) is retrained from the same residual.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..client import sparsify
from ..errors import ConfigError, StateError
from ..lora import state_digest
from ..runner.config import RunConfig
from ..runner.loop import CLIENTS_DIR, ClientData, config_fingerprint, stable_seed
from ..runner.residuals import load_residual, prune_residuals, run_id, save_residual
from ..runner.run import build_clients, load_base
from ..runner.train import heldout_loss, lora_model, train_locally
from ..server import apply
from ..updates import Broadcast
from ..wire import broadcast_numel, decode, encode
from .records import bytes_record, record_bytes, records_state, run_config, state_records
from .strategy import ADAPTER_ROUND, BROADCAST, CONFIG, GLOBAL, METRICS, NODE, SERVER_ROUND, UPDATE

app = ClientApp()
_HELD = "fedsrd.global"  # context.state keys of the held global adapter and its round
_HELD_ROUND = "fedsrd.round"


def client_name(cfg: RunConfig, node_config) -> str:
    """The node's client: its ``name`` node config, else (Flower's Simulation Engine numbers its
    nodes) the ``partition-id``-th client of the run, counting ``domains`` then ``jsonl`` names."""
    name = str(node_config.get("name", ""))
    if name:
        return name
    if "partition-id" not in node_config:
        raise ConfigError("the SuperNode needs --node-config \"name='<client>'\"")
    names = [*cfg.domains, *sorted(cfg.jsonl)]
    partition = int(node_config["partition-id"])
    if not 0 <= partition < len(names):
        raise ConfigError(f"partition-id {partition} has no client: the run has {len(names)} ({', '.join(names)}); "
                          "set num-supernodes to that number")
    return names[partition]


def client_data(cfg: RunConfig, node_config) -> ClientData:
    """This node's ClientData, built as runner.run.build_clients builds it."""
    name = client_name(cfg, node_config)
    jsonl = str(node_config.get("jsonl", "")) or cfg.jsonl.get(name, "")
    sub = cfg.replace(domains=(), jsonl={name: jsonl}) if jsonl else cfg.replace(domains=(name,), jsonl={})
    (client,) = build_clients(sub, _base(cfg)[1], log=lambda _: None)
    return client


_BASES: dict[str, tuple] = {}


def _base(cfg: RunConfig):
    """(peft_model, tokenizer), built once per process and config; training loads the global adapter into it."""
    key = repr(cfg)
    if key not in _BASES:
        _BASES.clear()
        torch.manual_seed(cfg.seed)
        model, tokenizer = load_base(cfg)
        _BASES[key] = lora_model(model, cfg), tokenizer
    return _BASES[key]


def _sync_global(msg: Message, context: Context) -> tuple[dict[str, torch.Tensor], str]:
    """The adapter before the message's ``adapter-round`` and its digest: the held one as it is, the held
    one plus the sent Broadcast, or the full adapter sent (see strategy: "Syncing")."""
    config = msg.content[CONFIG]
    target = int(config.get(ADAPTER_ROUND, config[SERVER_ROUND]))
    if GLOBAL in msg.content:
        state = records_state(msg.content[GLOBAL], msg.content.get("dtypes"))
    else:
        if _HELD not in context.state:
            raise StateError("the server sent no adapter but this node holds none")
        held_round = int(context.state[_HELD_ROUND]["round"])
        held = records_state(context.state[_HELD], context.state.get("fedsrd.dtypes"))
        held_digest = str(context.state[_HELD_ROUND].get("digest", "")) or None
        if BROADCAST not in msg.content:
            if held_round != target:
                raise StateError(f"the server sent no adapter for round {target}; this node holds the one "
                                 f"before round {held_round}")
            return held, held_digest or state_digest(held)
        broadcast = decode(record_bytes(msg.content.get(BROADCAST), "server broadcast"),
                           max_numel=broadcast_numel(held))
        if not isinstance(broadcast, Broadcast) or broadcast.round != target - 1 or held_round != broadcast.round:
            raise StateError(f"round {target}: got a broadcast for round {getattr(broadcast, 'round', None)}, "
                             f"this node holds the adapter before round {held_round}")
        state = apply(held, broadcast, base=held_digest)
    digest = state_digest(state)
    context.state[_HELD], context.state["fedsrd.dtypes"] = state_records(state)
    context.state[_HELD_ROUND] = ConfigRecord({"round": target, "digest": digest})
    return state, digest


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = run_config(context.run_config)
    server_round = int(msg.content[CONFIG][SERVER_ROUND])
    client = client_data(cfg, context.node_config)
    peft_model, tokenizer = _base(cfg)
    agg = cfg.aggregator()
    sent_full = GLOBAL in msg.content
    global_state, digest = _sync_global(msg, context)
    result = train_locally(peft_model, tokenizer, global_state, client.train, cfg,
                           seed=stable_seed(cfg.seed, server_round, client.name), freeze_lora_a=agg.freeze_lora_A,
                           mu=agg.proximal_mu)
    residual = None
    if cfg.error_feedback:
        state_dir = str(context.node_config.get("state-dir", ""))
        folder = Path(state_dir) if state_dir else cfg.run_folder("flower") / CLIENTS_DIR / client.name
        run = run_id(config_fingerprint(cfg))
        residual = load_residual(folder, run=run, client=client.name, before_round=server_round)
    update = sparsify(result.state, global_state, agg.client_config, num_samples=len(client.train),
                      round=server_round, client_id=client.name, base=digest, residual=residual)
    if update.residual is not None:
        save_residual(folder, update.residual, run=run, client=client.name)
        prune_residuals(folder, before_round=residual.round if residual is not None else server_round)
    content = RecordDict({
        UPDATE: bytes_record(encode(update)),
        METRICS: MetricRecord({"num-examples": len(client.train), "train-loss": result.loss,
                               "full-adapter-sent": int(sent_full)}),
    })
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """This node's held-out loss with the global adapter after the message's round (see strategy)."""
    cfg = run_config(context.run_config)
    client = client_data(cfg, context.node_config)
    peft_model, tokenizer = _base(cfg)
    global_state, _ = _sync_global(msg, context)
    loss = heldout_loss(peft_model, tokenizer, global_state, client.heldout, cfg)
    return Message(RecordDict({METRICS: MetricRecord({"heldout-loss": loss, "num-examples": len(client.heldout)}),
                               NODE: ConfigRecord({"name": client.name})}), reply_to=msg)
