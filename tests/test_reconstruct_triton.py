"""Triton stacked client factors against the torch reference ``reconstruct.stack_client_factors``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fedsrd_kernels.errors import ShapeMismatchError, StateError  # noqa: E402
from fedsrd_kernels.kernels.reconstruct.reference import stack_client_factors  # noqa: E402
from fedsrd_kernels.kernels.reconstruct.triton import stack_client_factors_triton  # noqa: E402
from fedsrd_kernels.updates import SparseTensor  # noqa: E402
from tests.helpers import assert_bitwise_equal, kernel_device, seeded_gen

# (rows, cols): B is d_out x r, A is r x d_in; odd sizes, a 1-wide factor, a non-power-of-two rank.
SHAPES = [(1023, 3), (1, 64), (3, 1023), (64, 33), (1, 1)]
WIRE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]




def client_updates(shape, m, density, gen, *, dense_client=None, none_client=None):
    """m random uploads: sparse at ``density`` (wire dtypes cycling), one dense and one None if asked."""
    numel = shape[0] * shape[1]
    updates = []
    for i in range(m):
        if i == none_client:
            updates.append(None)
            continue
        dtype = WIRE_DTYPES[i % len(WIRE_DTYPES)]
        scale = float(torch.rand((), generator=gen)) + 0.5
        if i == dense_client:
            updates.append(SparseTensor(shape, torch.randn(numel, generator=gen).to(dtype), None, scale=scale))
            continue
        indices = torch.nonzero(torch.rand(numel, generator=gen) < density).flatten()
        values = torch.randn(indices.numel(), generator=gen).to(dtype)
        updates.append(SparseTensor(shape, values, indices, scale=scale))
    return updates


def root_weights(m, gen):
    p = torch.rand(m, generator=gen, dtype=torch.float64) + 0.1
    return (p / p.sum()).sqrt().tolist()


def _on_device(updates):
    return [
        None
        if u is None
        else SparseTensor(
            u.shape, u.values.to(kernel_device()), None if u.indices is None else u.indices.to(kernel_device()), u.scale
        )
        for u in updates
    ]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("factor", ["A", "B"])
@pytest.mark.parametrize("include_base", [True, False])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_matches_reference_bitwise_float32(shape, m, factor, include_base, density):
    gen = seeded_gen(shape, m, factor, include_base, density)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    updates = client_updates(shape, m, density, gen, dense_client=2, none_client=3)
    roots = root_weights(m, gen)
    expected = stack_client_factors(base, updates, roots, factor=factor, include_base=include_base)
    got = stack_client_factors_triton(
        base.to(kernel_device()), _on_device(updates), roots, factor=factor, include_base=include_base
    )
    assert_bitwise_equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("factor", ["A", "B"])
def test_matches_reference_bitwise_other_dtypes(dtype, base_dtype, factor):
    gen = torch.Generator().manual_seed(7)
    shape, m = (1023, 3), 5
    base = torch.randn(shape, generator=gen).to(base_dtype)
    updates = client_updates(shape, m, 0.3, gen, dense_client=1)
    roots = root_weights(m, gen)
    expected = stack_client_factors(base, updates, roots, factor=factor, dtype=dtype)
    got = stack_client_factors_triton(base.to(kernel_device()), _on_device(updates), roots, factor=factor, dtype=dtype)
    assert_bitwise_equal(got, expected)


def test_layout_blocks_hold_each_client():
    # B: client blocks side by side; A: stacked. Densities 0 and 1 side by side, one None update.
    gen = torch.Generator().manual_seed(11)
    shape = (5, 4)
    base = torch.randn(shape, generator=gen)
    updates = [
        SparseTensor(shape, torch.ones(20), torch.arange(20), scale=2.0),
        SparseTensor(shape, torch.zeros(0), torch.zeros(0, dtype=torch.int64), scale=3.0),
        None,
    ]
    roots = [0.5, 0.25, 1.0]
    stacked_b = stack_client_factors_triton(base, updates, roots, factor="B")
    stacked_a = stack_client_factors_triton(base, updates, roots, factor="A")
    for i, (root, update) in enumerate(zip(roots, updates)):
        block = base * root + (0 if update is None else update.to_dense() * root)
        torch.testing.assert_close(stacked_b[:, 4 * i : 4 * (i + 1)], block, rtol=0, atol=1e-6)
        torch.testing.assert_close(stacked_a[5 * i : 5 * (i + 1)], block, rtol=0, atol=1e-6)


def test_no_clients_and_empty_base():
    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(12))
    assert stack_client_factors_triton(base, [], [], factor="B").shape == (3, 0)
    assert stack_client_factors_triton(base, [], [], factor="A").shape == (0, 4)
    empty = torch.zeros(0, 4)
    assert stack_client_factors_triton(empty, [None, None], [0.5, 0.5], factor="A").shape == (0, 4)


def test_rejects_bad_inputs():
    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(13))
    good = SparseTensor((3, 4), torch.ones(2), torch.tensor([0, 5]))
    with pytest.raises(ShapeMismatchError, match="shape"):
        stack_client_factors_triton(base, [SparseTensor((4, 3), torch.ones(12))], [1.0], factor="A")
    with pytest.raises(StateError, match="within"):  # positions past the matrix: refused when the tensor is built
        SparseTensor((3, 4), torch.ones(2), torch.tensor([0, 12]))
    with pytest.raises(ShapeMismatchError, match="root weights"):
        stack_client_factors_triton(base, [good], [1.0, 1.0], factor="B")
    with pytest.raises(ValueError, match="factor"):
        stack_client_factors_triton(base, [good], [1.0], factor="C")
