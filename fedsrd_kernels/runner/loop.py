"""The federated loop: clients train, sparsify and encode; the server screens,
aggregates and encodes; everyone applies. Bytes really cross as payloads.

Crash safety. The server's state lives in one file, ``<out_dir>/state.safetensors``:
the global adapter, the last finished round, the digest of the adapter, the config
fingerprint and every round's log record. It is replaced atomically (written to a
temporary name, fsynced, renamed, the folder fsynced) once per round, so a run
killed at any instant resumes from the last finished round: no round is skipped
or applied twice. Each accepted client payload is kept in ``<out_dir>/pending/``
(written the same way) until its round is committed, so a resumed round does not
retrain the clients that had already reported. Randomness is counter-based (every
draw is seeded by (seed, round, client)), so the state needs no RNG snapshot and
a resumed run is bit-identical to an uninterrupted one.

``rounds.jsonl``, ``progress.json`` and the PEFT ``adapter/`` folder are exports
of that state, rewritten after each commit (and on resume).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..client import sparsify
from ..diagnostics import round_fidelity, summarise, upload_diagnostics
from ..errors import ConfigError, StateError
from ..intake import Submission, run_round
from ..lora import state_digest
from ..server.robust import normalised_weights
from ..wire import comm_cost, encode
from .config import RunConfig
from .residuals import load_residual, prune_residuals, run_id, save_residual
from .train import Text, adapter_state, heldout_loss, load_adapter_state, train_locally

STATE_FILE = "state.safetensors"
PENDING_DIR = "pending"
CLIENTS_DIR = "clients"  # per client: its error-feedback residuals (see runner.residuals)
# Fields that do not change what a round computes: a run may resume with other values.
_RESUMABLE_FIELDS = ("rounds", "out_dir", "device", "eval_every")

# (round, client name, payload) -> the bytes the server receives, or None for a reply that was lost.
Intercept = Callable[[int, str, bytes], "bytes | None"]


@dataclass(frozen=True)
class ClientData:
    name: str
    train: list[Text]
    heldout: list[Text]


def _fsync_dir(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name, fsync it, rename it over ``path``, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_adapter(peft_model, state, folder: Path) -> None:
    """Write the adapter folder next to the old one, then swap it in."""
    load_adapter_state(peft_model, state)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # The adapter trains no embeddings; "auto" would look the base model up on the hub (its name is the
    # hub id, see runner.model.DEFAULT_MODEL_ID) to check the vocabulary, a network call on every export.
    peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_saved_adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def config_fingerprint(cfg: RunConfig) -> str:
    """The config fields that decide what a round computes, as canonical JSON."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUMABLE_FIELDS}
    return json.dumps(fields, sort_keys=True, default=list)


@dataclass(frozen=True)
class ServerState:
    """What the server needs to go on after a crash (see the module docstring)."""

    round: int
    global_state: dict[str, torch.Tensor]
    records: list[dict]
    fingerprint: str
    base_heldout: dict[str, float] | None = None  # held-out loss of the initial adapter (round 0)

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        meta = {"round": str(self.round), "digest": state_digest(self.global_state),
                "fingerprint": self.fingerprint, "records": json.dumps(self.records),
                "base_heldout": json.dumps(self.base_heldout)}
        return save({k: v.contiguous() for k, v in self.global_state.items()}, metadata=meta)

    @classmethod
    def load(cls, path: Path) -> ServerState:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
        try:
            result = cls(int(meta["round"]), state, json.loads(meta["records"]), meta["fingerprint"],
                         json.loads(meta.get("base_heldout", "null")))
            digest = meta["digest"]
        except (KeyError, ValueError) as exc:
            raise StateError(f"{path.name} is not a server state: {exc}") from None
        if state_digest(state) != digest:
            raise StateError(f"{path.name}: the adapter does not match its digest")
        return result


def fingerprint_differences(saved: str, current: str) -> list[str]:
    """The config fields in which a saved run and this one differ.

    A field the saved run does not name was added to RunConfig after it was
    saved; it ran with that field's default behaviour, so the field may be
    missing there as long as this run keeps the default.
    """
    old, new = json.loads(saved), json.loads(current)
    defaults = json.loads(config_fingerprint(RunConfig()))
    return sorted(k for k in old.keys() | new.keys()
                  if (old[k] != new.get(k) if k in old else new[k] != defaults.get(k)))


def stable_seed(*parts) -> int:
    """A seed from its parts that is the same in every process (str hashes are salted per process)."""
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=4).digest(), "little")


def sample_clients(names: list[str], participation: float, seed: int, round_: int) -> list[str]:
    """The clients that train in ``round_``: a seeded ``participation`` share of ``names`` (at least one),
    in sorted order; the runner samples client names, the Flower strategy node ids."""
    count = max(1, round(participation * len(names)))
    if count >= len(names):
        return list(names)
    return sorted(random.Random(f"{seed}/{round_}").sample(names, count))


def resume_state(out: Path, cfg: RunConfig, initial: dict[str, torch.Tensor], log) -> ServerState:
    """The committed state in ``out``, or round 0 at ``initial``; refuses another config's state."""
    fingerprint = config_fingerprint(cfg)
    path = out / STATE_FILE
    if not path.exists():
        return ServerState(0, initial, [], fingerprint)
    saved = ServerState.load(path)
    differing = fingerprint_differences(saved.fingerprint, fingerprint)
    if differing:
        raise ConfigError(f"{out} holds a run with another config ({saved.fingerprint}); this run has "
                          f"{fingerprint}; they differ in {differing}: use another out_dir")
    if saved.global_state.keys() != initial.keys():
        raise StateError(f"{out}: the saved adapter's keys differ from the model's")
    log(f"resuming {cfg.method} after round {saved.round} from {out}")
    return saved


def _pending(out: Path, round_: int) -> Path:
    return out / PENDING_DIR / f"round-{round_}"


def _export(peft_model, server: ServerState, out: Path, method: str) -> None:
    """rounds.jsonl, progress.json and the PEFT adapter folder, from the committed state."""
    save_adapter(peft_model, server.global_state, out / "adapter")
    _atomic_write_text(out / "rounds.jsonl", "".join(json.dumps(r) + "\n" for r in server.records))
    _atomic_write_text(out / "progress.json", json.dumps({"round": server.round, "method": method,
                                                         "base_heldout": server.base_heldout}))


def federate(peft_model, tokenizer, clients: list[ClientData], cfg: RunConfig, *, log=print,
             show_progress: bool = True, intercept: Intercept | None = None) -> list[dict]:
    """Run (or resume) ``cfg.rounds`` rounds; returns every round's log record.

    ``intercept`` sits between clients and server (fault injection for tests and
    drills): it gets (round, client, payload) and returns the bytes the server
    receives, or None for a lost reply.
    """
    out = cfg.run_folder()
    out.mkdir(parents=True, exist_ok=True)
    agg = cfg.aggregator()
    server = resume_state(out, cfg, adapter_state(peft_model), log)
    if server.round:
        _export(peft_model, server, out, cfg.method)
    if server.base_heldout is None:  # round 0: the base model's loss (LoRA's B starts at zero)
        base_heldout = {c.name: heldout_loss(peft_model, tokenizer, server.global_state, c.heldout, cfg)
                        for c in clients}
        server = dataclasses.replace(server, base_heldout=base_heldout)
        log(json.dumps({"method": cfg.method, "round": 0, "heldout_loss": base_heldout}))
    run = run_id(server.fingerprint)
    by_name = {c.name: c for c in clients}
    bar = _progress(cfg.rounds, min(server.round, cfg.rounds), cfg.method, show_progress)
    for round_ in range(server.round + 1, cfg.rounds + 1):
        global_state, pending = server.global_state, _pending(out, round_)
        for stale in (out / PENDING_DIR).glob("round-*") if (out / PENDING_DIR).exists() else ():
            if stale != pending:
                shutil.rmtree(stale, ignore_errors=True)
        pending.mkdir(parents=True, exist_ok=True)
        # the last committed round's digest (ServerState.load checked it against the adapter)
        base = server.records[-1]["digest"] if server.records else state_digest(global_state)
        chosen = sample_clients(sorted(by_name), cfg.participation, cfg.seed, round_)
        submissions, train_loss, client_seconds, diagnostics = [], {}, {}, {}
        for name in chosen:
            client, saved = by_name[name], pending / f"{name}.fsrd"
            if saved.exists():  # reported before a crash: its training is not repeated
                payload = saved.read_bytes()
                done = json.loads(saved.with_suffix(".json").read_text())
                train_loss[name], client_seconds[name] = done["train_loss"], done["seconds"]
                diagnostics[name] = done["diagnostics"]
            else:
                steps = _progress(cfg.local_steps, 0, f"round {round_} {name}", show_progress, leave=False)
                result = train_locally(peft_model, tokenizer, global_state, client.train, cfg,
                                       seed=stable_seed(cfg.seed, round_, name), freeze_lora_a=agg.freeze_lora_A,
                                       mu=agg.proximal_mu, progress=steps)
                steps.close()
                start = time.perf_counter()
                folder = out / CLIENTS_DIR / name
                residual = (load_residual(folder, run=run, client=name, before_round=round_)
                            if cfg.error_feedback else None)
                update = sparsify(result.state, global_state, agg.client_config, num_samples=len(client.train),
                                  round=round_, client_id=name, base=base, residual=residual)
                payload = encode(update)
                client_seconds[name] = result.seconds + time.perf_counter() - start
                train_loss[name] = result.loss
                diagnostics[name] = summarise(upload_diagnostics(global_state, result.state, update))
                if update.residual is not None:  # kept before the payload: a retrained round needs the older one
                    save_residual(folder, update.residual, run=run, client=name)
                if intercept is not None:
                    payload = intercept(round_, name, payload)
                if payload is None:
                    continue
                atomic_write_bytes(saved.with_suffix(".json"), json.dumps(
                    {"train_loss": train_loss[name], "seconds": client_seconds[name],
                     "diagnostics": diagnostics[name]}).encode())
                atomic_write_bytes(saved, payload)  # last: its presence marks the client as done
                if update.residual is not None:
                    prune_residuals(folder, before_round=round_)
            submissions.append(Submission(name, payload, weight=len(client.train)))
        start = time.perf_counter()
        outcome = run_round(agg, global_state, submissions, round_, base=base, min_updates=cfg.min_updates)
        download, broadcast, global_state = outcome.download, outcome.broadcast, outcome.global_state
        server_seconds = time.perf_counter() - start
        for name, reason in outcome.rejected.items():
            log(f"round {round_}: rejected {name}: {reason}")
        if outcome.skipped:
            log(f"round {round_} skipped: {outcome.skipped}")
        accepted = outcome.updates  # decoded once, by the screen
        evaluate = round_ % cfg.eval_every == 0 or round_ == cfg.rounds
        heldout = ({c.name: heldout_loss(peft_model, tokenizer, global_state, c.heldout, cfg) for c in clients}
                   if evaluate else {})
        report = outcome.report
        fidelity = None
        if accepted:  # the server judged like the clients: the applied change against the exact aggregate
            weights = normalised_weights([len(by_name[n].train) for n in outcome.accepted]
                                         if agg.weighting == "samples" else None, len(accepted))
            if report is not None and report.clip_factors:
                weights = weights * torch.tensor(report.clip_factors, dtype=weights.dtype)
            fidelity = round_fidelity(server.global_state, accepted, weights.tolist(), global_state)
        record = {
            "method": cfg.method, "round": round_, "clients": chosen, "train_loss": train_loss,
            "heldout_loss": heldout, "heldout_ppl": {k: math.exp(min(v, 50.0)) for k, v in heldout.items()},
            "upload_bytes": sum(len(s.payload) for s in submissions) / max(1, len(submissions)),
            "upload_paper_bytes": sum(comm_cost(u).paper_bytes for u in accepted) / max(1, len(accepted)),
            "download_bytes": len(download),
            "download_paper_bytes": comm_cost(broadcast).paper_bytes if broadcast is not None else 0,
            "server_seconds": server_seconds, "client_seconds": client_seconds,
            "moved": "".join(sorted(set("".join(broadcast.moved.values())))) if broadcast is not None else "",
            "accepted": list(outcome.accepted), "rejected": outcome.rejected, "skipped": outcome.skipped,
            "clip_factors": dict(zip(outcome.accepted, report.clip_factors)) if report and report.clip_factors
            else {},
            "diagnostics": diagnostics, "server_fidelity": fidelity,
            "base": base, "digest": state_digest(global_state),
        }
        server = ServerState(round_, global_state, [*server.records, record], server.fingerprint,
                             server.base_heldout)
        atomic_write_bytes(out / STATE_FILE, server.to_bytes())  # the commit point of the round
        shutil.rmtree(pending, ignore_errors=True)
        _export(peft_model, server, out, cfg.method)
        # the diagnostics stay in rounds.jsonl: the printed line is the round's figures
        log(json.dumps({k: v for k, v in record.items() if k not in ("diagnostics", "server_fidelity")}))
        bar.update(1)
    bar.close()
    if (out / PENDING_DIR).exists() and not any((out / PENDING_DIR).iterdir()):
        (out / PENDING_DIR).rmdir()
    load_adapter_state(peft_model, server.global_state)
    return [r for r in server.records if r["round"] <= cfg.rounds]


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, done: int, label: str, show: bool, leave: bool = True):
    """A tqdm bar (rounds, or one client's local steps), or a silent stand-in."""
    if not show:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    unit = "step" if not leave else "round"
    return tqdm(total=total, initial=done, desc=label if not leave else f"{label} rounds", unit=unit, leave=leave)
