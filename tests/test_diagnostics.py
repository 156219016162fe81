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
