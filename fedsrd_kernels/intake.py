"""A round's intake: screen what the clients sent, aggregate the valid updates or skip the round.

A server takes bytes from machines it does not control. ``run_round`` never
lets one bad client spoil a round: every submission is decoded (bounded, see
``wire.decode``) and checked, a bad one is rejected with a reason, and the
others are aggregated. When fewer than ``min_updates`` remain, the round is
skipped: no Broadcast, the global state stays as it was.

``run_round`` is the one server round of the runner and the Flower strategy: it
screens, orders the accepted updates by client id (so the result does not depend
on arrival order), aggregates, encodes the Broadcast, and applies the decoded
bytes to the global state, so the server holds exactly what every client will.

Rejected, each with its reason:
- bytes that do not decode (``PayloadError``), or an object that is not a SparseUpdate;
- NaN/Inf values, keys the global state lacks, wrong shapes, a frozen factor changed;
- a stale round number;
- a client id already accepted this round (the first one wins; ids fall back to the sender);
- a wrong base: the update's ``base`` digest is not the digest of this round's global
  state (the client missed a broadcast, applied one twice, or trained from something else);
- a weight that is not a finite number > 0 (the given weight, else ``num_samples``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import AggregationError, FedSRDError
from .lora import StateDict, state_digest
from .server import AggregationReport, Aggregator, apply, check_weight
from .updates import Broadcast, SparseUpdate
from .wire import broadcast_numel, decode, encode


@dataclass(frozen=True)
class Submission:
    """What one sender handed in: payload bytes (or an already decoded update) and its weight.

    sender: who sent it, as the transport knows them (a client name, a node id).
    weight: the aggregation weight (sample count); None = the update's num_samples, else 1.
    """

    sender: str
    payload: bytes | SparseUpdate
    weight: float | None = None


@dataclass(frozen=True)
class RoundOutcome:
    """The result of ``run_round``.

    broadcast: the round's Broadcast, None when the round was skipped.
    accepted:  senders whose updates were aggregated, in aggregation order.
    updates:   their decoded updates, in the same order.
    rejected:  sender -> why their submission was left out.
    skipped:   why the round was skipped, None when it was aggregated.
    download:  the encoded Broadcast, what goes to the clients (b"" when skipped).
    global_state: the next global state: ``download`` decoded and applied (the
               given state when skipped).
    """

    round: int
    broadcast: Broadcast | None
    accepted: tuple[str, ...]
    updates: tuple[SparseUpdate, ...] = ()
    rejected: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None
    report: AggregationReport | None = None
    download: bytes = b""
    global_state: StateDict | None = None


def screen(
    aggregator: Aggregator,
    global_state: StateDict,
    submissions: Sequence[Submission],
    round: int,
    *,
    base: str | None = None,
    max_numel: int | None = None,
    max_weight: float | None = None,
) -> tuple[list[tuple[str, SparseUpdate, float]], dict[str, str]]:
    """Split submissions into accepted (sender, update, weight) and rejected {sender: reason}.

    ``base`` is the ``lora.state_digest`` of ``global_state``; when given, an update
    must carry the same digest. ``max_numel`` caps the elements one payload may
    declare, which bounds decode's memory and time; None = the global state's
    element count, the most a valid update can carry (a 1.8 KB bitmap bomb declaring
    2**27 elements made decode peak at 144 MiB: the cap keeps that to the model's size).
    ``max_weight`` caps each accepted weight (the operator's bound on what a sender
    may claim: a node reporting 10**9 samples counts as ``max_weight``); None = no cap.
    """
    aggregator.check_round_inputs(global_state, round)
    if max_weight is not None and (isinstance(max_weight, bool) or not isinstance(max_weight, (int, float))
                                   or not (math.isfinite(max_weight) and max_weight > 0)):
        raise AggregationError(f"max_weight must be a finite number > 0 or None, got {max_weight!r}")
    if max_numel is None:
        max_numel = max(1, sum(t.numel() for t in global_state.values()))
    accepted: list[tuple[str, SparseUpdate, float]] = []
    rejected: dict[str, str] = {}
    owners: dict[str, str] = {}  # client id -> the sender whose update holds it
    senders: set[str] = set()
    for i, submission in enumerate(submissions):
        if not isinstance(submission, Submission):
            raise AggregationError(f"submissions[{i}] is a {type(submission).__name__}, not a Submission")
        sender = str(submission.sender)
        if sender in senders:
            rejected[f"{sender}#{i}"] = f"sender {sender!r} already submitted this round"
            continue
        senders.add(sender)
        try:
            update = submission.payload
            if isinstance(update, (bytes, bytearray, memoryview)):
                update = decode(update, max_numel=max_numel)
            if not isinstance(update, SparseUpdate):
                raise AggregationError(f"sent a {type(update).__name__}, not a SparseUpdate")
            aggregator.check_update(f"update of {sender!r}", update, global_state, round)
            if base is not None and update.base != base:
                made = "no base digest" if update.base is None else f"base {update.base[:12]}..."
                raise AggregationError(f"was made against {made}; this round's global is {base[:12]}...")
            client = update.client_id if update.client_id is not None else sender
            if client in owners:
                raise AggregationError(f"client id {client!r} was already accepted from {owners[client]!r}")
            weight = submission.weight
            if weight is None:
                weight = update.num_samples if update.num_samples is not None else 1.0
            weight = check_weight(weight, "weight")
        except FedSRDError as exc:
            rejected[sender] = str(exc)
            continue
        owners[client] = sender
        accepted.append((sender, update, weight if max_weight is None else min(weight, float(max_weight))))
    return accepted, rejected


def run_round(
    aggregator: Aggregator,
    global_state: StateDict,
    submissions: Sequence[Submission],
    round: int,
    *,
    base: str | None = None,
    min_updates: int = 1,
    max_numel: int | None = None,
    max_weight: float | None = None,
) -> RoundOutcome:
    """Screen, order, aggregate, encode and apply; or skip the round when fewer than ``min_updates`` remain.

    Nothing passed in is modified, and a skipped round produces no Broadcast, so a
    round is either applied whole or not at all. Accepted updates are aggregated in
    the order of their client ids (the sender where an update names none).
    """
    if isinstance(min_updates, bool) or not isinstance(min_updates, int) or min_updates < 1:
        raise AggregationError(f"min_updates must be an int >= 1, got {min_updates!r}")
    digest = state_digest(global_state) if base is None else base  # updates are held to ``base`` only if given
    accepted, rejected = screen(aggregator, global_state, submissions, round, base=base, max_numel=max_numel,
                                max_weight=max_weight)
    accepted.sort(key=lambda item: item[1].client_id if item[1].client_id is not None else item[0])
    senders = tuple(sender for sender, _, _ in accepted)
    updates = tuple(update for _, update, _ in accepted)
    if len(accepted) < min_updates:
        why = f"{len(accepted)} valid update(s) of {len(submissions)}, fewer than min_updates={min_updates}"
        return RoundOutcome(round, None, senders, updates, rejected, skipped=why, global_state=global_state)
    broadcast = aggregator.aggregate(global_state, list(updates), weights=[w for _, _, w in accepted], round=round,
                                     base=digest)
    download = encode(broadcast)
    next_state = apply(global_state, decode(download, max_numel=broadcast_numel(global_state)), base=digest)
    return RoundOutcome(round, broadcast, senders, updates, rejected, report=aggregator.last_report,
                        download=download, global_state=next_state)


__all__ = ["RoundOutcome", "Submission", "run_round", "screen"]
