"""Upload diagnostics against a float64 oracle that forms the dense d_out x d_in updates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fedsrd_kernels as fk
from fedsrd_kernels.diagnostics import pair_fidelity, summarise, upload_diagnostics

from .helpers import lora_state, perturbed

SHAPES = [(29, 37), (1, 13), (64, 5), (17, 17)]


def _oracle(b_prev, a_prev, b_local, a_local, b_rebuilt, a_rebuilt):
    """Written from the definitions: dense T and R, then <R,T>/|T|^2 and |R - cT| / |T|."""
    f = lambda t: t.detach().double().numpy()  # noqa: E731
    base = f(b_prev) @ f(a_prev)
    true = f(b_local) @ f(a_local) - base
    rebuilt = f(b_rebuilt) @ f(a_rebuilt) - base
    along = float((rebuilt * true).sum() / (true * true).sum())
    orthogonal = float(np.linalg.norm(rebuilt - along * true) / np.linalg.norm(true))
    return along, orthogonal


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_fidelity_matches_the_dense_oracle(seed):
    gen = torch.Generator().manual_seed(seed)
    for d_out, d_in in SHAPES:
        r = 3
        b_prev, a_prev = torch.randn(d_out, r, generator=gen), torch.randn(r, d_in, generator=gen)
        b_local = b_prev + 0.1 * torch.randn(d_out, r, generator=gen)
        a_local = a_prev + 0.1 * torch.randn(r, d_in, generator=gen)
        b_rebuilt = b_prev + 0.3 * torch.randn(d_out, r, generator=gen)
        a_rebuilt = a_prev + 0.3 * torch.randn(r, d_in, generator=gen)
        got = pair_fidelity(b_prev, a_prev, b_local, a_local, b_rebuilt, a_rebuilt)
        want = _oracle(b_prev, a_prev, b_local, a_local, b_rebuilt, a_rebuilt)
        # float64 Grams against float64 dense products: both exact to ~1e-13 on these sizes
        assert got.along == pytest.approx(want[0], rel=1e-9, abs=1e-12)
        assert got.orthogonal == pytest.approx(want[1], rel=1e-7, abs=1e-9)


def test_dense_upload_is_faithful_and_sparse_is_not():
    gen = torch.Generator().manual_seed(4)
    global_state = lora_state(SHAPES, 4, gen=gen)
    local = perturbed(global_state, 0.05, gen=gen)
    dense = upload_diagnostics(global_state, local, fk.sparsify(local, global_state, fk.SparsifyConfig(
        selection="dense")))
    assert dense["adapter"]["along"] == pytest.approx(1.0, abs=1e-6)
    assert dense["adapter"]["orthogonal"] == pytest.approx(0.0, abs=1e-3)
    assert all(m["kept_fraction"] == 1.0 for m in dense["matrices"].values())
    sparse_update = fk.sparsify(local, global_state, fk.SparsifyConfig())
    sparse = upload_diagnostics(global_state, local, sparse_update)
    assert sparse["adapter"]["orthogonal"] > 0.1
    for key, entry in sparse["matrices"].items():
        if key in sparse_update.deltas:
            assert 0 < entry["kept_fraction"] < 0.5 and entry["scale"] == sparse_update.deltas[key].scale > 1
    # the whole-adapter figures pool the pairs: equal to the oracle over all pairs stacked
    dots = trues = rebuilt_sq = 0.0
    sent = fk.densify(sparse_update)
    for i in range(len(SHAPES)):
        a_key, b_key = (f"base_model.model.layers.{i}.mlp.proj.lora_{f}.weight" for f in "AB")
        b_prev, a_prev = global_state[b_key].double(), global_state[a_key].double()
        t = local[b_key].double() @ local[a_key].double() - b_prev @ a_prev
        r = (b_prev + sent.get(b_key, 0)) @ (a_prev + sent.get(a_key, 0)) - b_prev @ a_prev
        dots += float((r * t).sum())
        trues += float((t * t).sum())
        rebuilt_sq += float((r * r).sum())
    along = dots / trues
    assert sparse["adapter"]["along"] == pytest.approx(along, rel=1e-9)
    assert sparse["adapter"]["orthogonal"] == pytest.approx(math.sqrt(rebuilt_sq / trues - along**2), rel=1e-6)


def test_summary_groups_by_module_kind_and_factor():
    gen = torch.Generator().manual_seed(5)
    global_state = lora_state(SHAPES, 4, gen=gen)
    local = perturbed(global_state, 0.05, gen=gen)
    summary = summarise(upload_diagnostics(global_state, local, fk.sparsify(local, global_state)))
    assert set(summary["matrices"]) == {"proj.A", "proj.B"} and set(summary["pairs"]) == {"proj"}
    assert 0 < summary["matrices"]["proj.A"]["kept_fraction"] < 1


@pytest.mark.parametrize("selection", ["importance", "magnitude"])
def test_dw_rescale_is_the_least_squares_scalar_of_each_pair(selection):
    gen = torch.Generator().manual_seed(6)
    global_state = lora_state(SHAPES, 4, gen=gen)
    local = perturbed(global_state, 0.05, gen=gen)
    plain = fk.sparsify(local, global_state, fk.SparsifyConfig(selection=selection, rescale=False))
    dw = fk.sparsify(local, global_state, fk.SparsifyConfig(selection=selection, rescale_space="dw"))
    for i, (d_out, d_in) in enumerate(SHAPES):
        a_key, b_key = (f"base_model.model.layers.{i}.mlp.proj.lora_{f}.weight" for f in "AB")
        b_prev, a_prev = global_state[b_key], global_state[a_key]
        sent = fk.densify(plain)
        b_kept = b_prev.double() + sent.get(b_key, torch.zeros(d_out, 4)).double()
        a_kept = a_prev.double() + sent.get(a_key, torch.zeros(4, d_in)).double()
        f = lambda t: t.detach().double().numpy()  # noqa: E731
        true = f(local[b_key]) @ f(local[a_key]) - f(b_prev) @ f(a_prev)
        rebuilt = f(b_kept) @ f(a_kept) - f(b_prev) @ f(a_prev)
        want = float((rebuilt * true).sum() / (rebuilt * rebuilt).sum())
        for key in (a_key, b_key):
            if key in plain.deltas:
                assert torch.equal(dw.deltas[key].values, plain.deltas[key].values)
                # the scale is stored in float32: one rounding
                assert dw.deltas[key].scale == pytest.approx(want, rel=2**-23)
    # |R - T| / |T| from the diagnostics: the least-squares scalar beats no rescale and the L1 one
    def error(update):
        adapter = upload_diagnostics(global_state, local, update)["adapter"]
        return math.hypot(adapter["along"] - 1.0, adapter["orthogonal"])

    l1 = fk.sparsify(local, global_state, fk.SparsifyConfig(selection=selection))
    assert error(dw) < error(plain) < error(l1)
    with pytest.raises(fk.FedSRDError, match="rescale_space"):
        fk.SparsifyConfig(rescale_space="l2")


@pytest.mark.parametrize("seed", [0, 1])
def test_round_fidelity_matches_the_dense_oracle(seed):
    """R = W' - W against T = sum_i q_i (W_i - W), whole adapter, from dense float64 products."""
    from fedsrd_kernels.diagnostics import round_fidelity

    gen = torch.Generator().manual_seed(seed)
    state = lora_state(SHAPES, 3, gen=gen, extra=False)
    dense = fk.SparsifyConfig(selection="dense")
    locals_ = [perturbed(state, 0.05, gen=gen) for _ in range(3)]
    updates = [fk.sparsify(local, state, dense) for local in locals_]
    q = [0.2 * 0.5, 0.5, 0.3]  # the first update clipped to half its weight
    new_state = perturbed(state, 0.04, gen=gen)
    got = round_fidelity(state, updates, q, new_state)

    f = lambda t: t.detach().double().numpy()  # noqa: E731
    dot = true_sq = applied_sq = 0.0
    for i in range(len(SHAPES)):
        a_key, b_key = f"base_model.model.layers.{i}.mlp.proj.lora_A.weight", \
            f"base_model.model.layers.{i}.mlp.proj.lora_B.weight"
        base = f(state[b_key]) @ f(state[a_key])
        received = [fk.densify(u) for u in updates]  # what the server got: float32 deltas, not the locals
        true = sum(w * ((f(state[b_key]) + f(d[b_key])) @ (f(state[a_key]) + f(d[a_key])) - base)
                   for w, d in zip(q, received))
        applied = f(new_state[b_key]) @ f(new_state[a_key]) - base
        dot += float((applied * true).sum())
        true_sq += float((true * true).sum())
        applied_sq += float((applied * applied).sum())
    along = dot / true_sq
    orthogonal = math.sqrt(applied_sq - dot * dot / true_sq) / math.sqrt(true_sq)
    assert got["adapter"]["along"] == pytest.approx(along, rel=1e-9)
    assert got["adapter"]["orthogonal"] == pytest.approx(orthogonal, rel=1e-7)
    assert set(got["pairs"]) == {"proj"}


def test_round_fidelity_of_real_rounds():
    """One client through FedAvg lands exactly on its update; FedSRD without the download drop moves one factor
    and keeps part of the aggregate; its drop adds noise across it."""
    from fedsrd_kernels.diagnostics import round_fidelity

    gen = torch.Generator().manual_seed(5)
    state = lora_state(SHAPES, 3, gen=gen, extra=False)
    locals_ = [perturbed(state, 0.05, gen=gen) for _ in range(2)]
    one = [fk.sparsify(locals_[0], state, fk.SparsifyConfig(selection="dense"))]
    applied = fk.apply(state, fk.Aggregator("fedavg").aggregate(state, one, round=1))
    exact = round_fidelity(state, one, [1.0], applied)["adapter"]
    # float32 states: W' rounds each element to ~1e-7 of 1, the update is ~0.05 of it
    assert exact["along"] == pytest.approx(1.0, abs=1e-5) and exact["orthogonal"] < 1e-4, exact

    updates = [fk.sparsify(local, state, fk.SparsifyConfig(selection="dense")) for local in locals_]
    fidelity = {}
    for drop in (0.0, 0.8):
        agg = fk.Aggregator("fedsrd", download_drop=drop)
        applied = fk.apply(state, agg.aggregate(state, updates, round=1))
        fidelity[drop] = round_fidelity(state, updates, [0.5, 0.5], applied)["adapter"]
    assert 0.2 < fidelity[0.0]["along"] < 1.0, fidelity  # B moves alone: dW A^+ A keeps part of dW
    assert fidelity[0.8]["orthogonal"] > fidelity[0.0]["orthogonal"] + 0.5, fidelity
