"""Error feedback on the upload: the invariant, its refusal of foreign residuals, and its persistence."""

from __future__ import annotations

import pytest
import torch

import fedsrd_kernels as fk
from fedsrd_kernels.errors import ConfigError, KeyMismatchError, NonFiniteError, ShapeMismatchError, StateError
from fedsrd_kernels.runner.residuals import load_residual, prune_residuals, run_id, save_residual
from fedsrd_kernels.updates import Residual

from .helpers import assert_unchanged, lora_state, perturbed, snapshot

SHAPES = [(29, 37), (1, 13), (64, 5)]  # odd, a single row, wider than tall
SELECTIONS = ["importance", "magnitude", "random", "dense"]


def _states(seed: int, rank: int = 4):
    gen = torch.Generator().manual_seed(seed)
    global_state = lora_state(SHAPES, rank, gen=gen)
    return gen, global_state


def _residual_check(update, local, global_state, prev):
    """densify(upd)[k] + upd.residual[k] == local[k] - global[k] + prev[k], to float32 rounding."""
    sent = fk.densify(update)
    for key in global_state:
        want = (local[key].double() - global_state[key].double()) + (prev[key].double() if prev else 0.0)
        got = sent.get(key, torch.zeros_like(global_state[key])).double() + update.residual[key].double()
        scale = want.abs().max().item() + 1e-30
        # a few float32 ulps of the largest entry: the subtraction, the cast and the add each round once
        assert (got - want).abs().max().item() <= 8 * 2**-24 * scale, key


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("value_dtype", ["float32", "bfloat16"])
def test_invariant_over_rounds(selection, value_dtype):
    gen, global_state = _states(seed=11)
    cfg = fk.SparsifyConfig(selection=selection, error_feedback=True, value_dtype=value_dtype, seed=3)
    assert cfg.rescale is False  # off unless asked for
    prev, total_trained, total_sent, magnitude = None, None, None, {k: 0.0 for k in global_state}
    for round_ in (1, 2, 3):
        local = perturbed(global_state, 0.05, gen=gen)
        before_local, before_global = snapshot(local), snapshot(global_state)
        update = fk.sparsify(local, global_state, cfg, residual=prev, round=round_, client_id="c")
        assert_unchanged(local, before_local)
        assert_unchanged(global_state, before_global)
        assert update.residual.round == round_ and update.residual.client_id == "c"
        assert all(t.dtype == torch.float32 for t in update.residual.values())
        _residual_check(update, local, global_state, prev)
        trained = {k: local[k].double() - global_state[k].double() for k in global_state}
        sent = fk.densify(update)
        total_trained = trained if total_trained is None else {k: total_trained[k] + trained[k] for k in trained}
        sent = {k: sent.get(k, torch.zeros_like(global_state[k])).double() for k in global_state}
        total_sent = sent if total_sent is None else {k: total_sent[k] + sent[k] for k in sent}
        for key in global_state:  # rounding scales with the largest value touched (Fed-DARE sends x10)
            magnitude[key] += sent[key].abs().max().item() + trained[key].abs().max().item()
        prev = update.residual
    # nothing is lost in the long run: what was sent plus what is held back is all that was trained
    for key in global_state:
        gap = total_trained[key] - total_sent[key] - prev[key].double()
        assert gap.abs().max().item() <= 8 * 2**-24 * magnitude[key], key
    if selection in ("importance", "magnitude", "random"):
        assert any(prev[k].abs().max() > 0 for k in prev), "a sparse upload held nothing back"


def test_rescale_on_request_still_keeps_the_invariant():
    gen, global_state = _states(seed=5)
    cfg = fk.SparsifyConfig(error_feedback=True, rescale=True)
    local = perturbed(global_state, 0.05, gen=gen)
    update = fk.sparsify(local, global_state, cfg, round=1)
    assert any(s.scale != 1.0 for s in update.deltas.values())
    _residual_check(update, local, global_state, None)


def test_without_error_feedback_nothing_is_held_and_a_residual_is_refused():
    gen, global_state = _states(seed=6)
    local = perturbed(global_state, 0.05, gen=gen)
    update = fk.sparsify(local, global_state, fk.SparsifyConfig())
    assert update.residual is None and fk.SparsifyConfig().rescale is True
    prev = fk.sparsify(local, global_state, fk.SparsifyConfig(error_feedback=True), round=1).residual
    with pytest.raises(ConfigError, match="error_feedback is off"):
        fk.sparsify(local, global_state, fk.SparsifyConfig(), residual=prev)


def test_residual_is_never_encoded():
    gen, global_state = _states(seed=7)
    local = perturbed(global_state, 0.05, gen=gen)
    update = fk.sparsify(local, global_state, fk.SparsifyConfig(error_feedback=True), round=1)
    decoded = fk.decode(fk.encode(update))
    assert decoded.residual is None
    assert fk.encode(decoded) == fk.encode(update)


def _bad(prev: Residual, key: str, value) -> Residual:
    tensors = dict(prev)
    if value is None:
        del tensors[key]
    else:
        tensors[key] = value
    return Residual(tensors, client_id=prev.client_id, round=prev.round)


def test_foreign_or_broken_residuals_are_refused_naming_the_problem():
    gen, global_state = _states(seed=8)
    cfg = fk.SparsifyConfig(error_feedback=True)
    local = perturbed(global_state, 0.05, gen=gen)
    prev = fk.sparsify(local, global_state, cfg, round=1, client_id="alpha").residual
    key = next(k for k in prev if k.endswith("lora_A.weight"))
    before_local, before_global = snapshot(local), snapshot(global_state)
    cases = [
        (dict(residual=prev, round=2, client_id="beta"), StateError, "belongs to client 'alpha'"),
        (dict(residual=prev, round=1, client_id="alpha"), StateError, "made in round 1"),
        (dict(residual=_bad(prev, key, None), round=2), KeyMismatchError, "missing"),
        (dict(residual=_bad(prev, "other.weight", torch.zeros(3)), round=2), KeyMismatchError, "unknown"),
        (dict(residual=_bad(prev, key, torch.zeros(3, 3)), round=2), ShapeMismatchError, key),
        (dict(residual=_bad(prev, key, torch.full_like(prev[key], float("nan"))), round=2), NonFiniteError, key),
        (dict(residual=_bad(prev, key, torch.zeros_like(prev[key], dtype=torch.int32)), round=2),
         ShapeMismatchError, "floating"),
        (dict(residual=[1, 2], round=2), StateError, "mapping"),
    ]
    for kwargs, error, text in cases:
        with pytest.raises(error, match=text):
            fk.sparsify(local, global_state, cfg, **kwargs)
    assert_unchanged(local, before_local)
    assert_unchanged(global_state, before_global)
    # a plain dict (no provenance) with the right keys and shapes is taken
    fk.sparsify(local, global_state, cfg, residual=dict(prev), round=2, client_id="beta")


def test_persistence_round_trip_prune_and_refusal(tmp_path):
    gen, global_state = _states(seed=9)
    cfg = fk.SparsifyConfig(error_feedback=True)
    run = run_id("fingerprint-of-run-1")
    folder = tmp_path / "clients" / "alpha"
    assert load_residual(folder, run=run, client="alpha", before_round=1) is None
    residuals = {}
    prev = None
    for round_ in (1, 2):
        local = perturbed(global_state, 0.05, gen=gen)
        prev = fk.sparsify(local, global_state, cfg, residual=prev, round=round_, client_id="alpha").residual
        save_residual(folder, prev, run=run, client="alpha")
        residuals[round_] = prev
    # a retrained round 2 (crash before its payload) must find round 1's residual, not its own
    loaded = load_residual(folder, run=run, client="alpha", before_round=2)
    assert loaded.round == 1 and all(torch.equal(loaded[k], residuals[1][k]) for k in residuals[1])
    loaded = load_residual(folder, run=run, client="alpha", before_round=3)
    assert loaded.round == 2 and all(torch.equal(loaded[k], residuals[2][k]) for k in residuals[2])
    prune_residuals(folder, before_round=2)
    assert sorted(p.name for p in folder.iterdir()) == ["residual-2.safetensors"]
    with pytest.raises(StateError, match="another folder"):
        load_residual(folder, run=run_id("another run"), client="alpha", before_round=3)
    with pytest.raises(StateError, match="client 'beta'"):
        load_residual(folder, run=run, client="beta", before_round=3)
    (folder / "residual-2.safetensors").write_bytes(b"torn")
    with pytest.raises(StateError, match="not a readable residual"):
        load_residual(folder, run=run, client="alpha", before_round=3)
