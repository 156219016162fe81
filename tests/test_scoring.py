"""Eq. 6-8 against the float64 oracle: importance, Pearson kurtosis, ratio, keep count."""

import math

import numpy as np
import pytest
import torch

import fedsrd_kernels as fk
from fedsrd_kernels import oracle
from fedsrd_kernels.kernels.sparsify.reference import top_k_indices

SHAPES = [(1, 1, 1), (1, 7, 1), (3, 1, 5), (17, 33, 4), (64, 96, 8), (127, 5, 13)]


@pytest.mark.parametrize("d_out,d_in,r", SHAPES)
def test_importance_matches_oracle(d_out, d_in, r):
    gen = torch.Generator().manual_seed(d_out * 1000 + d_in + r)
    d_a, a_prev = torch.randn(r, d_in, generator=gen), torch.randn(r, d_in, generator=gen)
    d_b, b_new = torch.randn(d_out, r, generator=gen), torch.randn(d_out, r, generator=gen)
    score_a, score_b = fk.importance(d_a, d_b, a_prev, b_new)
    want_a, want_b = oracle.importance(*(oracle.f64(t) for t in (d_a, d_b, a_prev, b_new)))
    assert score_a.dtype == torch.float32
    # float32 scores: a norm and a product, each within a few ulps of float64.
    np.testing.assert_allclose(score_a.numpy(), want_a, rtol=2e-6, atol=0)
    np.testing.assert_allclose(score_b.numpy(), want_b, rtol=2e-6, atol=0)


def test_importance_rejects_mismatched_shapes():
    with pytest.raises(fk.ShapeMismatchError, match="importance"):
        fk.importance(torch.ones(2, 3), torch.ones(4, 2), torch.ones(3, 3), torch.ones(4, 2))


@pytest.mark.parametrize("dist", ["normal", "exponential", "uniform", "heavy"])
def test_pearson_kurtosis_matches_oracle(dist):
    rng = np.random.default_rng(7)
    x = {
        "normal": rng.normal(size=5001),
        "exponential": rng.exponential(size=4097),
        "uniform": rng.uniform(size=999),
        "heavy": rng.standard_cauchy(size=3001),
    }[dist]
    got = fk.pearson_kurtosis(torch.from_numpy(x).float())
    want = oracle.kurtosis(x.astype(np.float32).astype(np.float64))
    assert got == pytest.approx(want, rel=1e-10)
    # known values: normal ~3, uniform 1.8, exponential ~9 (not excess kurtosis)
    if dist == "uniform":
        assert got == pytest.approx(1.8, abs=0.05)
    if dist == "normal":
        assert got == pytest.approx(3.0, abs=0.25)


def test_kurtosis_of_constant_and_empty_is_one():
    assert fk.pearson_kurtosis(torch.full((10,), 3.5)) == 1.0
    assert fk.pearson_kurtosis(torch.zeros(10)) == 1.0
    assert fk.pearson_kurtosis(torch.zeros(0)) == 1.0


def test_kurtosis_is_scale_free_even_for_tiny_scores():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1)).abs().double()
    assert fk.pearson_kurtosis(x * 1e-150) == pytest.approx(fk.pearson_kurtosis(x), rel=1e-12)


@pytest.mark.parametrize("base,coeff,upper", [(0.85, 0.1, 0.11), (0.9, 0.1, 0.05), (0.5, 0.3, 0.4)])
def test_kurtosis_ratio_matches_eq7(base, coeff, upper):
    rng = np.random.default_rng(3)
    for x in (rng.normal(size=2000), rng.exponential(size=2000) ** 3, rng.uniform(size=2000)):
        got = fk.kurtosis_ratio(torch.from_numpy(x), base, coeff, upper)
        kappa = oracle.kurtosis(x)
        assert got == pytest.approx(base + min(upper, coeff * math.log(max(kappa, 1.0))), rel=1e-12)
        assert base <= got <= base + upper


@pytest.mark.parametrize("n", [1, 2, 3, 10, 999, 4096, 12345])
@pytest.mark.parametrize("rho", [0.0, 0.5, 0.85, 0.948, 0.96, 1.0])
def test_keep_count_equals_quantile_count(n, rho):
    scores = np.random.default_rng(n).permutation(n).astype(np.float64)  # distinct
    want = int(np.sum(scores >= np.quantile(scores, rho)))
    assert fk.keep_count(n, rho) == want
    assert 1 <= fk.keep_count(n, rho) <= n


def test_keep_count_rejects_bad_input():
    assert fk.keep_count(0, 0.9) == 0
    for n, rho in ((-1, 0.5), (10, 1.5), (10, -0.1), (10, float("nan"))):
        with pytest.raises(fk.ConfigError):
            fk.keep_count(n, rho)


def test_top_k_indices_are_the_k_largest_sorted():
    scores = torch.randn(37, 11, generator=torch.Generator().manual_seed(5)).abs()
    for k in (0, 1, 5, 406, 407, 500):
        idx = top_k_indices(scores, k)
        assert idx.numel() == min(k, scores.numel())
        assert torch.all(idx[1:] > idx[:-1])
        if 0 < k < scores.numel():
            kept = scores.flatten()[idx]
            mask = torch.ones(scores.numel(), dtype=torch.bool)
            mask[idx] = False
            assert kept.min() >= scores.flatten()[mask].max()


# --------------------------------------------------------------------------- the CPU fast paths, bit for bit


def _topk_rule(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The selection rule as the reference states it: topk's k largest, their indices sorted."""
    flat = scores.flatten()
    if k >= flat.numel():
        return torch.arange(flat.numel())
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    return torch.topk(flat, k, sorted=False).indices.sort().values


def _score_cases(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    nan = torch.randn(n, generator=gen).abs()
    nan[n // 2] = float("nan")
    inf = torch.randn(n, generator=gen).abs()
    inf[0] = inf[-1] = float("inf")
    return {
        "distinct": torch.randn(n, generator=gen).abs(),
        "float64": torch.randn(n, generator=gen, dtype=torch.float64).abs(),
        "few_values": torch.randint(0, 5, (n,), generator=gen).float(),  # ties at every threshold
        "zeros_tail": torch.cat([torch.rand(n // 3 + 1, generator=gen), torch.zeros(n - n // 3 - 1)]),
        "signed_zeros": torch.where(torch.rand(n, generator=gen) < 0.5, -0.0, 0.0),
        "negative": torch.randn(n, generator=gen),
        # every 61st score large: the strided sample overestimates the floor, all scores are searched
        "periodic": torch.where(torch.arange(n) % 61 == 0, 10.0, torch.rand(n, generator=gen)),
        "nan": nan,
        "inf": inf,
        "bfloat16": torch.randn(n, generator=gen).abs().bfloat16(),
    }


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 32767, 32768, 100_000])
def test_top_k_indices_is_topk_bit_for_bit(n):
    """The threshold path gives exactly topk's sorted indices; ties, NaN and Inf go to topk itself."""
    gen = torch.Generator().manual_seed(n)
    for name, scores in _score_cases(n, gen).items():
        for k in sorted({0, 1, 2, n // 20, n // 7, n // 2, n - 1, n, n + 3}):
            got = top_k_indices(scores, k)
            assert got.dtype == torch.int64 and torch.equal(got, _topk_rule(scores, k)), (name, k)


def test_threshold_path_runs_when_the_boundary_is_untied():
    """Distinct scores take the threshold (sampled above 2**15 scores); a tied k-th largest or a NaN does not."""
    from fedsrd_kernels.kernels.sparsify import reference as scoring

    gen = torch.Generator().manual_seed(3)
    for n in (5000, 200_000):
        scores = torch.randn(n, generator=gen).abs()
        k = fk.keep_count(n, 0.9)
        kept = scoring._untied_top_k(scores, k)
        assert kept is not None and torch.equal(kept, _topk_rule(scores, k))
        tied = scores.clone()
        top = tied.topk(k + 1)
        tied[top.indices[k]] = top.values[k - 1]  # the (k+1)-th largest made equal to the k-th: two choices
        assert scoring._untied_top_k(tied, k) is None
        with_nan = scores.clone()
        with_nan[7] = float("nan")
        assert scoring._untied_top_k(with_nan, k) is None
    periodic = _score_cases(70_000, gen)["periodic"]  # the floor comes out above T: all scores searched
    floor = scoring._candidate_floor(periodic.numpy(), 4000)
    assert int((periodic >= floor).sum()) < 4000
    assert torch.equal(scoring._untied_top_k(periodic, 4000), _topk_rule(periodic, 4000))


def _kurtosis_out_of_place(scores: torch.Tensor) -> float:
    """The kurtosis as first written: one new float64 tensor per step (the in-place one must match its bits)."""
    x = scores.detach().to(torch.float64).flatten()
    if x.numel() == 0:
        return 1.0
    peak = x.abs().max()
    if peak == 0:
        return 1.0
    x = x / peak
    centred = x - x.mean()
    m2 = centred.square().mean()
    if m2 == 0:
        return 1.0
    m4 = centred.square().square().mean()
    return float(m4 / (m2 * m2))


def test_pearson_kurtosis_in_place_matches_out_of_place_bits():
    gen = torch.Generator().manual_seed(9)
    cases = [torch.randn(70_001, generator=gen).abs(), torch.randn(999, generator=gen), torch.randn(5, 7).double(),
             torch.randn(300, generator=gen).bfloat16(), torch.arange(-5, 20), torch.tensor([True, False, True]),
             torch.full((4,), -2.5), torch.tensor([-3.0, 1.0, 2.0]), torch.randn(2000, generator=gen) * 1e-30,
             torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([1.0, float("inf")])]
    workspace = torch.full((80_000,), float("nan"), dtype=torch.float64)  # stale contents must not matter
    for x in cases:
        want = _kurtosis_out_of_place(x)
        for got in (fk.pearson_kurtosis(x), fk.pearson_kurtosis(x, workspace=workspace)):
            assert got == want or (math.isnan(got) and math.isnan(want)), (x.dtype, x.numel(), got, want)
    with pytest.raises(fk.ShapeMismatchError, match="workspace"):
        fk.pearson_kurtosis(torch.ones(10), workspace=torch.empty(9, dtype=torch.float64))
    with pytest.raises(fk.ShapeMismatchError, match="workspace"):
        fk.pearson_kurtosis(torch.ones(10), workspace=torch.empty(10))
