"""FedSRD as a Flower Message-API strategy: our Aggregator behind configure/aggregate.

Each round every connected node is sent either the previous round's encoded
Broadcast (when it took part in that round, so it holds the global adapter
the Broadcast applies to) or the full global adapter (first round, newcomers).
Replies carry an encoded SparseUpdate; the strategy screens them
(``intake.screen``: undecodable bytes, NaN/Inf, wrong keys or shapes, a stale
round, a repeated client id or an update made against another global adapter
are rejected and logged with the reason), orders the accepted ones by client
name (as runner.loop.federate does), weighs them by sample count, aggregates,
encodes the Broadcast and applies the decoded bytes, so server and clients
apply the very same Broadcast. A round with fewer than ``min_updates`` valid
replies is skipped: the global adapter stays as it was.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from ..errors import ConfigError, FedSRDError
from ..intake import Submission, screen
from ..lora import state_digest
from ..server import Aggregator, apply
from ..updates import SparseUpdate
from ..wire import decode, encode
from .records import bytes_record, record_bytes, records_state, state_records

logger = logging.getLogger(__name__)

# Record keys of the messages both ways.
GLOBAL, BROADCAST, UPDATE, CONFIG, METRICS = "global", "broadcast", "update", "config", "metrics"


class FedSRDStrategy(Strategy):
    """Train on every connected node (at least ``min_nodes``); aggregate with ``aggregator``."""

    def __init__(self, aggregator: Aggregator, min_nodes: int = 1, min_updates: int = 1) -> None:
        for name, value in (("min_nodes", min_nodes), ("min_updates", min_updates)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        self.aggregator = aggregator
        self.min_nodes = min_nodes
        self.min_updates = min_updates
        self.last_rejected: dict[str, str] = {}  # node id -> reason, of the last aggregated round
        self.global_state: dict[str, torch.Tensor] | None = None
        self.last_download: bytes | None = None
        self._holders: set[int] = set()  # nodes that hold the global adapter last_download applies to
        # Rounds finished before this run (a resumed ServerApp): Flower counts its rounds from 1,
        # the federation's round (mask seeds, the FedSRD schedule, staleness) is Flower's + offset.
        self.round_offset = 0
        # Called with (round, record) after every round, aggregated or skipped: where the
        # ServerApp commits its state.
        self.on_round_end: Callable[[int, dict], None] | None = None

    def summary(self) -> None:
        logger.info("FedSRDStrategy: %r, min_nodes=%d", self.aggregator, self.min_nodes)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        if self.global_state is None:
            self.global_state = records_state(arrays)
        node_ids, _ = sample_nodes(grid, self.min_nodes, self.min_nodes)
        node_ids = sorted(set(node_ids) | set(grid.get_node_ids()))
        full = None
        messages = []
        for node_id in node_ids:
            content = RecordDict({CONFIG: ConfigRecord({**config, "server-round": server_round})})
            if self.last_download is not None and node_id in self._holders:
                content[BROADCAST] = bytes_record(self.last_download)
            else:
                full = full or state_records(self.global_state)
                content[GLOBAL], content["dtypes"] = full
            messages.append(Message(content, dst_node_id=node_id, message_type="train"))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        arrays, summary, record = self._aggregate(server_round, replies)
        if self.on_round_end is not None:
            self.on_round_end(server_round, record)
        return arrays, summary

    def _aggregate(self, server_round: int, replies: Iterable[Message]):
        submissions, metrics = self.collect_replies(server_round, replies)
        base = state_digest(self.global_state)
        accepted, rejected = screen(self.aggregator, self.global_state, submissions, server_round, base=base)
        for sender, reason in rejected.items():
            logger.warning("round %d: rejected the update of node %s: %s", server_round, sender, reason)
        self.last_rejected = rejected
        record = {"round": server_round, "rejected": rejected, "base": base}
        if len(accepted) < self.min_updates:
            skipped = f"{len(accepted)} valid update(s), fewer than min_updates={self.min_updates}"
            logger.warning("round %d skipped: %s; the global adapter stays as it was", server_round, skipped)
            self._holders = set()
            self.last_download = None
            return None, None, {**record, "clients": 0, "skipped": skipped, "digest": base}
        accepted.sort(key=lambda item: item[1].client_id or item[0])  # as runner.loop.federate orders clients
        download = self.aggregate_updates(server_round, [u for _, u, _ in accepted], [w for _, _, w in accepted])
        self._holders = {int(sender) for sender, _, _ in accepted}
        arrays, _ = state_records(self.global_state)
        total = sum(w for _, _, w in accepted)
        summary = MetricRecord({
            "num-examples": int(total), "clients": len(accepted), "rejected": len(rejected),
            "download-bytes": len(download),
            "train-loss": sum(float(metrics[s].get("train-loss", math.nan)) * w for s, _, w in accepted) / total,
            "full-adapter-sent": sum(int(metrics[s].get("full-adapter-sent", 0)) for s, _, _ in accepted),
        })
        return arrays, summary, {**record, **dict(summary), "skipped": None,
                                 "digest": state_digest(self.global_state)}

    def aggregate_updates(self, server_round: int, updates: list[SparseUpdate], weights: list[float]) -> bytes:
        """Aggregate decoded updates (in this order), move the global adapter, return the Broadcast bytes."""
        base = state_digest(self.global_state)
        broadcast = self.aggregator.aggregate(self.global_state, updates, weights=weights, round=server_round,
                                              base=base)
        self.last_download = encode(broadcast)
        self.global_state = apply(self.global_state, decode(self.last_download), base=base)
        return self.last_download

    def collect_replies(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[list[Submission], dict[str, MetricRecord]]:
        """Each replying node's payload as a Submission (weighted by the sample count it reports, see
        ``intake.screen``), and its metrics; error replies and replies without bytes are logged and dropped."""
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

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # held-out loss is the in-process runner's job

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
