"""FedSRD as a Flower Message-API strategy: a thin adapter around ``intake.run_round``.

Training. Each round a seeded ``participation`` share of the connected nodes
(at least ``min_nodes`` must be connected; the runner's ``sample_clients`` rule)
is asked to train. The round's server work is ``intake.run_round``, the very
function the in-process runner calls: it screens the replies (undecodable bytes,
NaN/Inf, wrong keys or shapes, a stale round, a repeated client id, an update
made against another global adapter, a bad weight: rejected and logged with the
reason), orders them by client id, weighs them by the aggregator's rule, skips
the round below ``min_updates``, aggregates, encodes and applies.

Evaluation. Every ``eval_every`` rounds and after the last one, every connected
node computes its held-out loss with the new global adapter; the strategy logs
each node's loss and their mean weighted by held-out examples, as the runner
logs its own.

Syncing. A message brings a node to "the adapter before round R": nothing when
the node already holds it, the last encoded Broadcast when the node holds the
adapter before R - 1, else the full adapter (first round, newcomers, a node that
missed a round).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from ..errors import ConfigError, FedSRDError
from ..intake import Submission, run_round
from ..lora import state_digest
from ..runner.loop import sample_clients
from ..server import Aggregator
from .records import bytes_record, record_bytes, state_records

logger = logging.getLogger(__name__)

# Record keys of the messages both ways.
GLOBAL, BROADCAST, UPDATE, CONFIG, METRICS, NODE = "global", "broadcast", "update", "config", "metrics", "node"
# Config keys: the federation's round, and the round whose starting adapter the node must hold.
SERVER_ROUND, ADAPTER_ROUND = "server-round", "adapter-round"


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    return value


class FedSRDStrategy(Strategy):
    """Train on a seeded share of the connected nodes; aggregate with ``aggregator`` through ``run_round``.

    global_state:  the adapter the federation starts from (a resumed ServerApp's committed one).
    min_nodes:     nodes that must be connected before a round starts.
    min_updates:   fewer valid updates than this skip the round (the global adapter stays).
    participation: share of the connected nodes sampled to train each round (``fraction-train``).
    max_weight:    cap on each node's weight (what a node may claim as its sample count); None = no cap.
                   The default weighting ("equal") ignores claimed counts altogether.
    seed:          seed of the node sampling.
    round_offset:  rounds finished before this run: Flower counts from 1, the federation's round
                   (mask seeds, the FedSRD schedule, staleness) is Flower's + offset.
    eval_every, last_round: federated evaluation after every ``eval_every``-th round and after
                   ``last_round``; eval_every None = no federated evaluation.
    on_round_end:  called with (round, record) after every round, aggregated or skipped, and
                   again with the record completed by the evaluation: where the ServerApp commits.
    """

    def __init__(self, aggregator: Aggregator, global_state: Mapping[str, torch.Tensor], *, min_nodes: int = 1,
                 min_updates: int = 1, participation: float = 1.0, max_weight: float | None = None, seed: int = 0,
                 round_offset: int = 0, eval_every: int | None = 1, last_round: int | None = None,
                 on_round_end: Callable[[int, dict], None] | None = None) -> None:
        self.min_nodes = _positive_int("min_nodes", min_nodes)
        self.min_updates = _positive_int("min_updates", min_updates)
        if eval_every is not None:
            _positive_int("eval_every", eval_every)
        if isinstance(participation, bool) or not isinstance(participation, (int, float)) or not (
                0 < participation <= 1):
            raise ConfigError(f"participation must be in (0, 1], got {participation!r}")
        if isinstance(round_offset, bool) or not isinstance(round_offset, int) or round_offset < 0:
            raise ConfigError(f"round_offset must be an int >= 0, got {round_offset!r}")
        if not isinstance(aggregator, Aggregator):
            raise ConfigError(f"aggregator must be an Aggregator, got {type(aggregator).__name__}")
        if not isinstance(global_state, Mapping) or not global_state:
            raise ConfigError("global_state must be a non-empty mapping of adapter tensors")
        self.aggregator = aggregator
        self.global_state = dict(global_state)  # keeps the adapter's dtypes (an ArrayRecord carries float32)
        self.participation, self.max_weight, self.seed = float(participation), max_weight, seed
        self.round_offset, self.eval_every, self.last_round = round_offset, eval_every, last_round
        self.on_round_end = on_round_end
        self.last_rejected: dict[str, str] = {}  # node id -> reason, of the last aggregated round
        self.last_download: bytes | None = None  # the encoded Broadcast of round ``_download_round``
        self._download_round = 0
        self._held: dict[int, int] = {}  # node id -> R: the node holds the adapter before round R
        self._record: dict | None = None  # the last round's record, completed by its evaluation

    def summary(self) -> None:
        logger.info("FedSRDStrategy: %r, min_nodes=%d, participation=%g", self.aggregator, self.min_nodes,
                    self.participation)

    # -- messages -----------------------------------------------------------

    def _message(self, node_id: int, server_round: int, adapter_round: int, kind: str,
                 config: ConfigRecord) -> Message:
        """A message that brings ``node_id`` to the adapter before ``adapter_round``."""
        content = RecordDict({CONFIG: ConfigRecord({**config, SERVER_ROUND: server_round,
                                                    ADAPTER_ROUND: adapter_round})})
        held = self._held.get(node_id)
        if held == adapter_round:
            pass  # it holds this adapter already
        elif held == adapter_round - 1 and self.last_download is not None and self._download_round == held:
            content[BROADCAST] = bytes_record(self.last_download)
        else:
            content[GLOBAL], content["dtypes"] = state_records(self.global_state)
        return Message(content, dst_node_id=node_id, message_type=kind)

    def _connected(self, grid: Grid) -> list[int]:
        node_ids, _ = sample_nodes(grid, self.min_nodes, self.min_nodes)  # waits for min_nodes
        return sorted(set(node_ids) | set(grid.get_node_ids()))

    # -- training -----------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        chosen = sample_clients([str(n) for n in self._connected(grid)], self.participation, self.seed, server_round)
        return [self._message(int(n), server_round, server_round, "train", config) for n in chosen]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        submissions, metrics = self.collect_replies(server_round, replies)
        base = state_digest(self.global_state)
        outcome = run_round(self.aggregator, self.global_state, submissions, server_round, base=base,
                            min_updates=self.min_updates, max_weight=self.max_weight)
        for sender, reason in outcome.rejected.items():
            logger.warning("round %d: rejected the update of node %s: %s", server_round, sender, reason)
        self.last_rejected = outcome.rejected
        for sender in metrics:  # every node that replied applied what it was sent: it holds this round's adapter
            self._held[int(sender)] = server_round
        record = {"round": server_round, "rejected": outcome.rejected, "base": base}
        arrays = summary = None
        if outcome.skipped:
            logger.warning("round %d skipped: %s; the global adapter stays as it was", server_round, outcome.skipped)
            self.last_download = None
            record.update(clients=0, skipped=outcome.skipped)
        else:
            self.global_state, self.last_download = outcome.global_state, outcome.download
            self._download_round = server_round
            weights = [float(u.num_samples or 1) for u in outcome.updates]
            summary = MetricRecord({
                "num-examples": int(sum(weights)), "clients": len(outcome.accepted),
                "rejected": len(outcome.rejected), "download-bytes": len(outcome.download),
                "train-loss": sum(float(metrics[s].get("train-loss", math.nan)) * w
                                  for s, w in zip(outcome.accepted, weights)) / sum(weights),
                "full-adapter-sent": sum(int(metrics[s].get("full-adapter-sent", 0)) for s in outcome.accepted),
            })
            arrays, _ = state_records(self.global_state)
            record.update(dict(summary), skipped=None)
        record["digest"] = state_digest(self.global_state)
        self._record = record
        if self.on_round_end is not None:
            self.on_round_end(server_round, record)
        return arrays, summary

    def collect_replies(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[list[Submission], dict[str, MetricRecord]]:
        """Each replying node's payload as a Submission (weighted by the sample count its update reports,
        capped by ``max_weight``; see ``intake.screen``), and its metrics. Error replies and replies
        without bytes are logged and dropped."""
        submissions, metrics = [], {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                logger.warning("round %d: node %s replied with an error: %s", server_round, node, msg.error.reason)
                continue
            try:
                payload = record_bytes(msg.content.get(UPDATE), f"node {node}")
            except (FedSRDError, KeyError, TypeError, ValueError) as exc:
                logger.warning("round %d: dropped the reply of node %s: %s", server_round, node, exc)
                continue
            reported = msg.content.get(METRICS)
            metrics[str(node)] = reported if isinstance(reported, MetricRecord) else MetricRecord()
            submissions.append(Submission(str(node), payload))
        return submissions, metrics

    # -- federated evaluation -------------------------------------------------

    def _evaluates(self, server_round: int) -> bool:
        return self.eval_every is not None and (server_round % self.eval_every == 0 or server_round == self.last_round)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        if not self._evaluates(server_round):
            return []
        return [self._message(n, server_round, server_round + 1, "evaluate", config) for n in self._connected(grid)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Each node's held-out loss (logged by its client name) and their mean weighted by held-out examples."""
        server_round += self.round_offset
        losses: dict[str, float] = {}
        counts: dict[str, float] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                logger.warning("round %d: node %s failed to evaluate: %s", server_round, node, msg.error.reason)
                continue
            reported = msg.content.get(METRICS)
            names = msg.content.get(NODE)
            try:
                loss, count = float(reported["heldout-loss"]), float(reported["num-examples"])
                name = str(names["name"]) if isinstance(names, ConfigRecord) else str(node)
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("round %d: dropped the evaluation of node %s: %s", server_round, node, exc)
                continue
            if not (math.isfinite(loss) and math.isfinite(count) and count > 0):
                logger.warning("round %d: dropped the evaluation of node %s: loss %r on %r examples",
                               server_round, node, loss, count)
                continue
            self._held[node] = server_round + 1
            losses[name], counts[name] = loss, count
        if not losses:
            return None
        total = sum(counts.values())
        mean = sum(losses[n] * counts[n] for n in losses) / total
        logger.info("round %d: held-out loss %.4f (%s)", server_round, mean,
                    ", ".join(f"{n} {losses[n]:.4f}" for n in sorted(losses)))
        if self._record is not None and self._record["round"] == server_round:
            self._record = {**self._record, "heldout_loss": dict(sorted(losses.items())), "heldout_mean": mean}
            if self.on_round_end is not None:
                self.on_round_end(server_round, self._record)
        return MetricRecord({"heldout-loss": mean, "num-examples": int(total), "nodes": len(losses)})
