"""A client's error-feedback residual on its own disk, crash-safe.

Under error feedback a client carries what it did not send into its next
round (``SparsifyConfig.error_feedback``). The residual of round t is written
to ``<folder>/residual-<t>.safetensors`` (atomically) before the round's
payload is handed over, and the residuals of earlier rounds are removed only
after that, so a client killed at any instant finds the residual its retrained
round needs: the newest one made before that round.

Each file names the run (a digest of the run's config fingerprint) and the
client in its metadata; a residual from another run or client is refused.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ..errors import StateError
from ..updates import Residual

_NAME = re.compile(r"residual-(\d+)\.safetensors")


def run_id(fingerprint: str) -> str:
    """A short, stable name of a run: BLAKE2b-64 of its config fingerprint."""
    return hashlib.blake2b(fingerprint.encode(), digest_size=8).hexdigest()


def _rounds(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m[1]), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))]
    return sorted(found)


def save_residual(folder: Path, residual: Residual, *, run: str, client: str) -> Path:
    """Write the residual of round ``residual.round`` atomically; returns its path."""
    from safetensors.torch import save

    from .loop import atomic_write_bytes

    if residual.round is None:
        raise StateError("a residual to keep on disk needs its round")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"residual-{residual.round}.safetensors"
    meta = {"run": run, "client": client, "round": str(residual.round)}
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in residual.items()}, metadata=meta))
    return path


def load_residual(folder: Path, *, run: str, client: str, before_round: int) -> Residual | None:
    """The newest residual made before ``before_round``, or None when there is none (a first round).

    Raises StateError when that file belongs to another run or client, or does not read.
    """
    from safetensors import safe_open

    earlier = [(r, p) for r, p in _rounds(folder) if r < before_round]
    if not earlier:
        return None
    round_, path = earlier[-1]
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for a torn or foreign file
        raise StateError(f"{path.name}: not a readable residual ({exc})") from None
    if meta.get("run") != run or meta.get("client") != client or meta.get("round") != str(round_):
        raise StateError(f"{path}: a residual of run {meta.get('run')!r}, client {meta.get('client')!r}, round "
                         f"{meta.get('round')!r}; this is run {run!r}, client {client!r}: remove it or use another "
                         "folder")
    return Residual(tensors, client_id=client, round=round_)


def prune_residuals(folder: Path, *, before_round: int) -> None:
    """Remove the residuals made before ``before_round`` (call once the newer one's payload is handed over)."""
    for round_, path in _rounds(folder):
        if round_ < before_round:
            path.unlink(missing_ok=True)
