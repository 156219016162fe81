"""Client sparsify (eq. 4-8) against the dense float64 oracle, and its edge cases."""

import numpy as np
import pytest
import torch

import fedsrd_kernels as fk
from fedsrd_kernels import oracle
from tests.helpers import assert_unchanged, lora_state, perturbed, snapshot

SHAPES = [(1, 1), (5, 1), (1, 9), (33, 17), (96, 64), (127, 61)]


@pytest.mark.parametrize("rank", [1, 4, 7])
def test_sparsify_matches_oracle(rank):
    gen = torch.Generator().manual_seed(rank)
    global_state = lora_state(SHAPES, rank, gen=gen)
    local = perturbed(global_state, 0.05, gen=gen)
    update = fk.sparsify(local, global_state)
    dense = fk.densify(update)
    for pair in fk.lora_layout(global_state).pairs:
        want_b, want_a = oracle.sparsify_pair(
            *(oracle.f64(t) for t in (local[pair.b_key], local[pair.a_key],
                                     global_state[pair.b_key], global_state[pair.a_key]))
        )
        for key, want in ((pair.b_key, want_b), (pair.a_key, want_a)):
            got = dense[key].double().numpy()
            assert np.array_equal(got != 0, want != 0), f"{key}: kept positions differ"
            np.testing.assert_allclose(got, want, rtol=3e-6, atol=0)
    # non-LoRA keys travel as dense deltas
    bias = "base_model.model.score.bias"
    torch.testing.assert_close(dense[bias], local[bias] - global_state[bias], rtol=0, atol=0)


def test_keep_count_is_exact_and_l1_is_preserved():
    gen = torch.Generator().manual_seed(11)
    global_state = lora_state([(200, 150)], 8, gen=gen, extra=False)
    local = perturbed(global_state, 0.01, gen=gen)
    cfg = fk.SparsifyConfig(base=0.9, coeff=0.05, upper=0.06)
    update = fk.sparsify(local, global_state, cfg)
    for key, sparse in update.deltas.items():
        delta = (local[key] - global_state[key]).flatten()
        if key.endswith("lora_A.weight"):
            scores, _ = fk.importance(local[key] - global_state[key], torch.zeros(200, 8), global_state[key],
                                      local[key.replace("lora_A", "lora_B")])
        else:
            _, scores = fk.importance(torch.zeros(8, 150), local[key] - global_state[key],
                                      global_state[key.replace("lora_B", "lora_A")], local[key])
        rho = fk.kurtosis_ratio(scores, cfg.base, cfg.coeff, cfg.upper)
        assert sparse.nnz == fk.keep_count(delta.numel(), rho)
        dense = sparse.to_dense().flatten()
        assert float(dense.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-6)


def test_rescale_off_sends_raw_values():
    gen = torch.Generator().manual_seed(2)
    g = lora_state([(40, 30)], 4, gen=gen, extra=False)
    local = perturbed(g, 0.1, gen=gen)
    update = fk.sparsify(local, g, fk.SparsifyConfig(rescale=False))
    for key, sparse in update.deltas.items():
        assert sparse.scale == 1.0
        torch.testing.assert_close(sparse.values, (local[key] - g[key]).flatten()[sparse.indices], rtol=0, atol=0)


def test_all_zero_delta_sends_nothing():
    gen = torch.Generator().manual_seed(3)
    g = lora_state([(20, 10), (8, 8)], 2, gen=gen)
    assert fk.sparsify(snapshot(g), g).deltas == {}
    local = snapshot(g)
    local["base_model.model.layers.1.mlp.proj.lora_B.weight"] += 0.5
    update = fk.sparsify(local, g)
    assert set(update.deltas) == {"base_model.model.layers.1.mlp.proj.lora_B.weight"}


def test_first_round_with_zero_b_scores_both_factors():
    gen = torch.Generator().manual_seed(4)
    g = lora_state([(30, 20)], 4, gen=gen, zero_b=True, extra=False)
    local = perturbed(g, 0.01, gen=gen)
    update = fk.sparsify(local, g)
    assert len(update.deltas) == 2


@pytest.mark.parametrize("selection", ["magnitude", "random", "dense"])
def test_other_selections(selection):
    gen = torch.Generator().manual_seed(5)
    g = lora_state([(64, 48)], 4, gen=gen, extra=False)
    local = perturbed(g, 0.1, gen=gen)
    cfg = fk.SparsifyConfig(selection=selection, seed=1, random_drop=0.9)
    update = fk.sparsify(local, g, cfg)
    for key, sparse in update.deltas.items():
        delta = (local[key] - g[key]).flatten()
        if selection == "dense":
            assert sparse.is_dense and torch.equal(sparse.to_dense().flatten(), delta)
        elif selection == "random":
            n = delta.numel()
            assert abs(sparse.nnz - 0.1 * n) < 5 * (0.09 * n) ** 0.5
            assert sparse.scale == pytest.approx(10.0, rel=1e-6)
            torch.testing.assert_close(sparse.to_dense().flatten()[sparse.indices], 10 * delta[sparse.indices])
        else:
            rho = fk.kurtosis_ratio(delta.abs())
            assert sparse.nnz == fk.keep_count(delta.numel(), rho)
            assert sparse.values.abs().min() >= np.delete(delta.abs().numpy(), sparse.indices.numpy()).max()
    again = fk.sparsify(local, g, cfg)
    for key in update.deltas:
        assert torch.equal(update.deltas[key].values, again.deltas[key].values)


@pytest.mark.parametrize("value_dtype", ["bfloat16", "float16"])
def test_low_precision_values_err_at_most_2x_the_cast(value_dtype):
    gen = torch.Generator().manual_seed(6)
    g = lora_state([(50, 40)], 4, gen=gen, extra=False)
    local = perturbed(g, 0.05, gen=gen)
    full = fk.densify(fk.sparsify(local, g))
    low = fk.densify(fk.sparsify(local, g, fk.SparsifyConfig(value_dtype=value_dtype)))
    dtype = getattr(torch, value_dtype)
    for key in full:
        reference_err = (full[key].to(dtype).float() - full[key]).norm()
        assert (low[key] - full[key]).norm() <= 2 * reference_err + 1e-12


def test_bad_inputs_raise_named_errors_and_leave_state_alone():
    gen = torch.Generator().manual_seed(7)
    g = lora_state([(12, 10)], 3, gen=gen)
    local = perturbed(g, 0.1, gen=gen)
    before_g, before_l = snapshot(g), snapshot(local)
    key = "base_model.model.layers.0.mlp.proj.lora_B.weight"

    bad = snapshot(local)
    bad[key][0, 0] = float("nan")
    with pytest.raises(fk.NonFiniteError, match="lora_B"):
        fk.sparsify(bad, g)
    bad = snapshot(local)
    bad[key] = torch.zeros(12, 4)
    with pytest.raises(fk.ShapeMismatchError, match="lora_B"):
        fk.sparsify(bad, g)
    bad = snapshot(local)
    del bad[key]
    with pytest.raises(fk.KeyMismatchError):
        fk.sparsify(bad, g)
    bad = snapshot(local)
    bad["unknown.weight"] = torch.zeros(1)
    with pytest.raises(fk.KeyMismatchError, match="unknown"):
        fk.sparsify(bad, g)
    lone = {k: v for k, v in g.items() if k != key}
    with pytest.raises(fk.KeyMismatchError, match="partner"):
        fk.sparsify(lone, lone)
    assert_unchanged(g, before_g)
    assert_unchanged(local, before_l)


def test_config_validation():
    for kwargs in ({"base": 1.2}, {"base": 0.95, "upper": 0.1}, {"coeff": -1}, {"selection": "best"},
                   {"random_drop": 1.0}, {"value_dtype": "int8"}, {"seed": -3}):
        with pytest.raises(fk.ConfigError):
            fk.SparsifyConfig(**kwargs)


def test_triton_backend_gives_the_same_update():
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(8)
    g = lora_state([(33, 17), (5, 40), (1, 1)], 3, gen=gen)
    local = perturbed(g, 0.05, gen=gen)
    via_torch = fk.sparsify(local, g, backend="torch")
    via_triton = fk.sparsify(local, g, backend="triton")
    assert via_torch.deltas.keys() == via_triton.deltas.keys()
    for key, want in via_torch.deltas.items():
        got = via_triton.deltas[key]
        if want.indices is None:
            assert got.indices is None and torch.equal(got.values, want.values)
            continue
        assert torch.equal(got.indices, want.indices), key
        assert torch.equal(got.values, want.values), key
        assert got.scale == pytest.approx(want.scale, rel=2.5e-7)


# --------------------------------------------------------------------------- the CPU path: tuned, not changed


def _reference_upload(local, global_state, cfg):
    """Each matrix's (kept indices, values, float32 scale) by the steps as first written, one new tensor per
    step: eq. 6 scores, the out-of-place float64 kurtosis, topk + sort, advanced indexing, float64 sums."""
    import math

    from tests.test_scoring import _kurtosis_out_of_place

    out = {}
    for pair in fk.lora_layout(global_state).pairs:
        a_prev, b_prev = (global_state[k].to(torch.float32) for k in (pair.a_key, pair.b_key))
        a_new, b_new = (local[k].to(torch.float32) for k in (pair.a_key, pair.b_key))
        d_a, d_b = a_new - a_prev, b_new - b_prev
        score_a = d_a.abs() * torch.linalg.vector_norm(b_new, dim=0)[:, None]
        score_b = d_b.abs() * torch.linalg.vector_norm(a_prev, dim=1)[None, :]
        for key, delta, scores in ((pair.a_key, d_a, score_a), (pair.b_key, d_b, score_b)):
            flat = delta.flatten()
            if not bool(flat.any()):
                continue
            kappa = _kurtosis_out_of_place(scores)
            k = fk.keep_count(flat.numel(), cfg.base + min(cfg.upper, cfg.coeff * math.log(max(kappa, 1.0))))
            if k >= flat.numel():
                kept = torch.arange(flat.numel())
            else:
                kept = torch.topk(scores.flatten(), k, sorted=False).indices.sort().values
            values = flat[kept]
            kept_l1 = float(values.abs().sum(dtype=torch.float64))
            if kept_l1 == 0.0:
                continue
            scale = float(flat.abs().sum(dtype=torch.float64)) / kept_l1 if cfg.rescale else 1.0
            out[key] = (kept, values, float(torch.tensor(scale, dtype=torch.float32)))
    return out


# Matrices of 28,800 to 57,600 scores: the threshold path samples from 2**15 scores on.
BIG_SHAPES = [(600, 70), (40, 900), (1200, 48), (33, 17)]


@pytest.mark.parametrize("kind", ["gaussian", "bfloat16", "quantized", "zero_b"])
@pytest.mark.parametrize("rescale", [True, False])
def test_sparsify_is_bit_identical_to_the_untuned_steps(kind, rescale):
    """Kept positions, values and scales equal the first-written steps bit for bit, ties included
    (bfloat16 and quantized deltas tie at the threshold: topk breaks those ties in both)."""
    gen = torch.Generator().manual_seed(len(kind) + rescale)
    dtype = torch.bfloat16 if kind == "bfloat16" else torch.float32
    g = lora_state(BIG_SHAPES, 48, gen=gen, dtype=dtype, zero_b=kind == "zero_b", extra=False)
    local = perturbed(g, 0.01, gen=gen)
    if kind == "quantized":
        local = {k: g[k] + torch.round((v - g[k]) * 300) / 300 for k, v in local.items()}
    if kind == "zero_b":  # round 1: B moved on half of the pairs only, so the others score dA as all zero
        for i, key in enumerate(k for k in g if k.endswith("lora_B.weight")):
            if i % 2:
                local[key] = g[key].clone()
    cfg = fk.SparsifyConfig(rescale=rescale)
    update = fk.sparsify(local, g, cfg, backend="torch")
    want = _reference_upload(local, g, cfg)
    assert update.deltas.keys() == want.keys()
    for key, (indices, values, scale) in want.items():
        got = update.deltas[key]
        assert torch.equal(got.indices, indices), key
        assert torch.equal(got.values.view(torch.int32), values.view(torch.int32)), key
        assert got.scale == scale, key


def test_local_state_is_read_once_and_each_kurtosis_taken_once(monkeypatch):
    """The finite check runs once per tensor of each state, the kurtosis once per matrix."""
    from fedsrd_kernels import lora
    from fedsrd_kernels.kernels.sparsify import reference as sparsify_reference

    gen = torch.Generator().manual_seed(12)
    g = lora_state(SHAPES, 4, gen=gen)
    local = perturbed(g, 0.05, gen=gen)
    checked, kurtoses = [], []
    real_all_finite, real_kurtosis = lora.all_finite, sparsify_reference.pearson_kurtosis
    monkeypatch.setattr(lora, "all_finite", lambda t: checked.append(t) or real_all_finite(t))
    monkeypatch.setattr(sparsify_reference, "pearson_kurtosis",
                        lambda s, **kw: kurtoses.append(s) or real_kurtosis(s, **kw))
    fk.sparsify(local, g, backend="torch")
    assert len(checked) == len(g) + len(local)
    assert len(kurtoses) == 2 * len(SHAPES)


def test_finite_check_is_exact():
    """Inf of either sign in either state is named; the largest finite values (whose sum overflows) are not."""
    gen = torch.Generator().manual_seed(13)
    g = lora_state([(12, 10)], 3, gen=gen)
    local = perturbed(g, 0.1, gen=gen)
    key = "base_model.model.layers.0.mlp.proj.lora_A.weight"
    for name, value in (("global_state", float("inf")), ("local_state", -float("inf"))):
        bad = snapshot(g if name == "global_state" else local)
        bad[key][1, 2] = value
        args = (local, bad) if name == "global_state" else (bad, g)
        with pytest.raises(fk.NonFiniteError, match=rf"{name}\[.*lora_A.*1 NaN/Inf"):
            fk.sparsify(*args)
    huge = snapshot(local)
    huge["base_model.model.score.bias"] = torch.full((7,), torch.finfo(torch.float32).max)
    half = {k: v.half() for k, v in g.items()}
    half_local = {k: v.half() for k, v in huge.items()}
    half_local["base_model.model.score.bias"] = torch.full((7,), 65504.0, dtype=torch.float16)
    fk.sparsify(huge, g)
    fk.sparsify(half_local, half)


def test_client_benchmark_runs(tmp_path, capsys):
    """benchmarks/bench_client.py at a toy rank: both ways agree on every kept position."""
    import json

    from benchmarks.bench_client import main

    out = tmp_path / "client.json"
    threads = str(torch.get_num_threads())  # the script sets the thread count: keep this process's
    main(["--layers", "1", "--rank", "2", "--repeat", "1", "--threads", threads, "--json", str(out)])
    assert "agreement: kept positions equal in 14/14 matrices" in capsys.readouterr().out
    assert json.loads(out.read_text())["agreement"] == [14, 14]
