"""Every decompose path against the dense float64 oracle, on random and adversarial inputs."""

import numpy as np
import pytest
import torch

import fedsrd_kernels as fk
from fedsrd_kernels import oracle
from fedsrd_kernels.server.factored import Basis, gram_pinv, svqb
from tests.helpers import lora_state, perturbed, rel_err

FEDSRD_PATHS = ["exact", "randomized", "reference"]
FEDSRD_E_PATHS = ["delta", "reference"]
CASES = [(m, p) for m in ("fedsrd",) for p in FEDSRD_PATHS] + [("fedsrd-e", p) for p in FEDSRD_E_PATHS]


def run_round(g, locals_, method, path, round_, weights=None, **kwargs):
    agg = fk.Aggregator(method=method, path=path, seed=5, **kwargs)
    ups = [fk.sparsify(c, g) for c in locals_]
    new = fk.apply(g, agg.aggregate(g, ups, weights=weights, round=round_))
    want = oracle.federated_round(g, locals_, weights, round_, method=method, seed=5)
    return new, want, agg.last_report


def assert_matches(new, want, tol=1e-6):
    for key in want:
        assert rel_err(new[key].numpy(), want[key]) < tol, key


@pytest.mark.parametrize("method,path", CASES)
@pytest.mark.parametrize("round_", [1, 2])
def test_paths_match_oracle_on_random_input(method, path, round_):
    gen = torch.Generator().manual_seed(round_ + 10 * len(path))
    g = lora_state([(48, 40), (48, 40), (33, 70), (3, 2)], 4, gen=gen)
    locals_ = [perturbed(g, 0.05, gen=gen) for _ in range(3)]
    new, want, report = run_round(g, locals_, method, path, round_, weights=[1, 2, 4])
    assert_matches(new, want)
    assert set(report.paths.values()) == {path}


@pytest.mark.parametrize("method,path", CASES)
def test_zero_b_in_round_one(method, path):
    gen = torch.Generator().manual_seed(1)
    g = lora_state([(40, 24), (17, 31)], 4, gen=gen, zero_b=True)
    locals_ = [perturbed(g, 0.05, gen=gen) for _ in range(3)]
    new, want, report = run_round(g, locals_, method, path, 1)
    assert_matches(new, want)
    assert set(report.moved.values()) == {"B"}


@pytest.mark.parametrize("method,path", CASES)
def test_rank_deficient_b_in_an_even_round(method, path):
    gen = torch.Generator().manual_seed(2)
    g = lora_state([(40, 24)], 4, gen=gen)
    key = "base_model.model.layers.0.mlp.proj.lora_B.weight"
    g[key] = g[key] @ torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))  # rank 2 < r = 4
    locals_ = [perturbed(g, 0.05, gen=gen) for _ in range(3)]
    new, want, report = run_round(g, locals_, method, path, 2)
    assert_matches(new, want)
    (note,) = report.notes.values()
    assert "rank 2 < 4" in note and report.moved == {"base_model.model.layers.0.mlp.proj": "B"}


@pytest.mark.parametrize("method,path", CASES)
def test_duplicate_clients_and_one_client(method, path):
    gen = torch.Generator().manual_seed(3)
    g = lora_state([(30, 20)], 3, gen=gen)
    (local,) = [perturbed(g, 0.05, gen=gen)]
    one, want, _ = run_round(g, [local], method, path, 1)
    assert_matches(one, want)
    two, _, _ = run_round(g, [local, local, local], method, path, 1)
    assert_matches(two, want)


@pytest.mark.parametrize("method,path", CASES)
def test_stack_wider_than_the_layer(method, path):
    """m r > min(d_out, d_in): the bases saturate the space (both sides, or only the
    6-row side of the 6 x 40 pair, where the other side's basis comes from its Gram)."""
    gen = torch.Generator().manual_seed(4)
    g = lora_state([(9, 7), (6, 12), (6, 40)], 3, gen=gen)
    locals_ = [perturbed(g, 0.05, gen=gen) for _ in range(5)]
    new, want, _ = run_round(g, locals_, method, path, 3)
    assert_matches(new, want)


def test_memory_budget_chunks_give_the_same_answer():
    gen = torch.Generator().manual_seed(6)
    g = lora_state([(24, 20)] * 5, 3, gen=gen)
    locals_ = [perturbed(g, 0.05, gen=gen) for _ in range(2)]
    whole, _, _ = run_round(g, locals_, "fedsrd", "exact", 1)
    chunked, want, _ = run_round(g, locals_, "fedsrd", "exact", 1, memory_budget=1)
    assert_matches(chunked, want)
    for key in whole:
        torch.testing.assert_close(chunked[key], whole[key], rtol=1e-6, atol=1e-9)


def test_auto_picks_exact_for_thin_stacks_and_randomized_for_wide_ones():
    gen = torch.Generator().manual_seed(7)
    g = lora_state([(200, 160), (24, 15)], 2, gen=gen, extra=False)  # (m+1) r = 8: 2 x 8 > 15
    locals_ = [perturbed(g, 0.05, gen=gen) for _ in range(3)]
    new, want, report = run_round(g, locals_, "fedsrd", "auto", 1)
    assert_matches(new, want)
    assert sorted(report.paths.values()) == ["exact", "randomized"]
    assert all(r < 1e-6 for r in report.residuals.values())
    _, _, report_e = run_round(g, locals_, "fedsrd-e", "auto", 1)
    assert set(report_e.paths.values()) == {"delta"}


def test_randomized_path_reports_its_residual_on_a_truncated_range():
    """With no oversampling and no power iterations on a wide stack the range is incomplete:
    the residual says so, and the error grows with it."""
    gen = torch.Generator().manual_seed(8)
    g = lora_state([(120, 100)], 4, gen=gen, extra=False)
    locals_ = [perturbed(g, 0.2, gen=gen) for _ in range(6)]
    rough, want, report = run_round(g, locals_, "fedsrd", "randomized", 1, oversample=0, power_iters=0)
    (residual,) = report.residuals.values()
    assert residual > 1e-3
    good, _, report_good = run_round(g, locals_, "fedsrd", "randomized", 1, oversample=24, power_iters=3)
    assert max(report_good.residuals.values()) < residual
    key = "base_model.model.layers.0.mlp.proj.lora_B.weight"
    assert rel_err(good[key].numpy(), want[key]) < rel_err(rough[key].numpy(), want[key])


def test_bad_path_options():
    for kwargs in ({"path": "fast"}, {"method": "fedsrd-e", "path": "exact"}, {"method": "fedsrd", "path": "delta"},
                   {"oversample": -1}, {"memory_budget": 0}, {"download_drop": True}, {"projection_rtol": False}):
        with pytest.raises(fk.ConfigError):
            fk.Aggregator(**{"method": "fedsrd", **kwargs})


@pytest.mark.parametrize("shape", [(50, 7), (50, 1), (3, 3)])
def test_svqb_is_orthonormal_or_zero_even_when_rank_deficient(shape):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    x = torch.cat([x, x[:, :1] * 3, torch.zeros(shape[0], 1, dtype=torch.float64)], dim=1)  # dependent + zero columns
    q = svqb(x.unsqueeze(0))[0]
    gram = (q.T @ q).numpy()
    kept = np.diag(gram) > 0.5
    assert kept.sum() == np.linalg.matrix_rank(x.numpy())
    np.testing.assert_allclose(gram, np.diag(kept.astype(float)), atol=1e-12)
    np.testing.assert_allclose(q @ (q.T @ x), x, atol=1e-12)  # spans x


@pytest.mark.parametrize("condition, dependent, form", [(1.0, False, "cholesky"), (1.0, True, "eigh"),
                                                       (1e5, False, "svqb"), (1e5, True, "svqb")])
def test_exact_path_basis_is_orthonormal_or_zero_and_spans(condition, dependent, form):
    """The exact path's basis is orthonormal to 1e-12 and spans x, also with a zero column: taken
    from the Gram's Cholesky factor when x has full rank, from its eigh when columns are dependent,
    formed by svqb when the Gram route would leave ~eps * cond^2 = 1e-6."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(200, 9, generator=gen, dtype=torch.float64)
    x[:, 1] = x[:, 0] + x[:, 1] / condition  # nearly collinear columns
    extra = [x[:, 2:3] * 3] if dependent else []
    x = torch.cat([x, *extra, torch.zeros(200, 1, dtype=torch.float64)], dim=1)
    basis = Basis(x.unsqueeze(0))
    assert basis.form == form
    q = basis.times(torch.eye(x.shape[1], dtype=torch.float64).unsqueeze(0))[0]
    np.testing.assert_allclose(basis.left_times(q.T.unsqueeze(0))[0], q.T @ q, atol=1e-12)
    np.testing.assert_allclose(basis.coords[0], q.T @ x, atol=1e-12 * float(x.abs().max()))
    gram = (q.T @ q).numpy()
    kept = np.diag(gram) > 0.5
    assert kept.sum() == np.linalg.matrix_rank(x.numpy())
    np.testing.assert_allclose(gram, np.diag(kept.astype(float)), atol=1e-12)
    np.testing.assert_allclose(q @ (q.T @ x), x, atol=1e-12 * float(x.abs().max()))


def test_gram_pinv_matches_numpy_with_the_same_cutoff():
    gen = torch.Generator().manual_seed(10)
    b = torch.randn(40, 5, generator=gen, dtype=torch.float64) @ torch.diag(torch.tensor([1, 1, 1, 1e-3, 0.0],
                                                                                         dtype=torch.float64))
    pinv, proj, rank = gram_pinv(b.unsqueeze(0), "B", 1e-2)
    assert int(rank) == 3
    np.testing.assert_allclose(pinv[0].numpy(), np.linalg.pinv(b.numpy(), rtol=1e-2), atol=1e-10)
    np.testing.assert_allclose(proj[0].numpy(), np.linalg.pinv(b.numpy(), rtol=1e-2) @ b.numpy(), atol=1e-10)


@pytest.mark.parametrize("method,path", [("fedsrd", "exact"), ("fedsrd-e", "delta")])
def test_triton_reconstruction_backend_matches_torch(method, path):
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(11)
    g = lora_state([(23, 17), (23, 17), (6, 40)], 3, gen=gen)
    ups = [fk.sparsify(perturbed(g, 0.05, gen=gen), g) for _ in range(3)]
    want = fk.Aggregator(method, path=path, backend="torch").aggregate(g, ups, round=1)
    got = fk.Aggregator(method, path=path, backend="triton").aggregate(g, ups, round=1)
    for key, sparse in want.deltas.items():
        torch.testing.assert_close(got.deltas[key].to_dense(), sparse.to_dense(), rtol=1e-6, atol=1e-9)


def _greedy_oracle(g, updates, weights, truncate_rank):
    """Per pair, both splits of eq. 12-13 from the dense float64 oracle, and the one whose change dB A or B dA
    has the larger norm (written plainly: the dense products, then np.linalg.norm)."""
    eps32 = np.finfo(np.float32).eps
    want = {}
    for key in g:
        if not key.endswith("lora_A.weight"):
            continue
        prefix = key[: -len(".lora_A.weight")]
        b_key = prefix + ".lora_B.weight"
        b, a = oracle.f64(g[b_key]), oracle.f64(g[key])
        d_b = [oracle.f64(u.deltas[b_key].to_dense()) for u in updates]
        d_a = [oracle.f64(u.deltas[key].to_dense()) for u in updates]
        rtols = (max(1e-2, max(b.shape) * eps32), max(1e-2, max(a.shape) * eps32))
        _, delta_b = oracle.server_pair(b, a, d_b, d_a, weights, 1, truncate_rank, *rtols)
        _, delta_a = oracle.server_pair(b, a, d_b, d_a, weights, 2, truncate_rank, *rtols)
        kept_b, kept_a = np.linalg.norm(delta_b @ a), np.linalg.norm(b @ delta_a)
        want[prefix] = ("B", b_key, delta_b) if kept_b >= kept_a else ("A", key, delta_a)
    return want


@pytest.mark.parametrize("method,path", CASES + [("fedsrd", "stream"), ("fedsrd-e", "stream")])
@pytest.mark.parametrize("round_", [1, 2])
def test_greedy_schedule_moves_the_factor_that_keeps_more(method, path, round_):
    gen = torch.Generator().manual_seed(7 + round_)
    # B and A both of full rank r, so either may move; widths where each factor wins somewhere
    g = lora_state([(48, 40), (60, 9), (9, 60), (33, 70)], 4, gen=gen, extra=False)
    for i, key in enumerate(k for k in g if k.endswith("lora_A.weight")):
        if i % 2:  # A of unit-size entries: dB A outweighs B dA there, so B should move
            g[key] = g[key] * g[key].shape[1] ** 0.5
    locals_ = [perturbed(g, 0.05, gen=gen) for _ in range(3)]
    updates = [fk.sparsify(c, g, fk.SparsifyConfig(selection="dense")) for c in locals_]
    weights = [1.0, 2.0, 4.0]
    agg = fk.Aggregator(method, path="auto" if path == "stream" else path, download_drop=0.0, schedule="greedy")
    if path == "stream":
        stream = agg.stream(g, round=round_)
        for update, weight in zip(updates, weights):
            stream.add(update, weight)
        bcast = stream.finish()
    else:
        bcast = agg.aggregate(g, updates, weights=weights, round=round_)
    want = _greedy_oracle(g, updates, weights, 4 if method == "fedsrd" else None)
    assert {prefix: w[0] for prefix, w in want.items()} == bcast.moved
    assert set(bcast.moved.values()) == {"A", "B"}, "the case should make each factor win somewhere"
    # the stream's sketch of the truncated W is approximate (its own tests bound it); the rest is exact
    tol = 1e-4 if (path == "stream" and method == "fedsrd") else 1e-6
    for prefix, (_, key, delta) in want.items():
        assert rel_err(bcast.deltas[key].to_dense().double().numpy(), delta) < tol, prefix
    alternate = fk.Aggregator(method, download_drop=0.0).aggregate(g, updates, weights=weights, round=round_)
    assert set(alternate.moved.values()) == {"B" if round_ == 1 else "A"}


def test_bad_schedule_is_refused_for_every_method():
    for method in ("fedsrd", "fedavg"):
        with pytest.raises(fk.ConfigError, match="schedule"):
            fk.Aggregator(method, schedule="random")
