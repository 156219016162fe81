"""Triton seeded download: compaction (server) and expand-add (client) against the torch path, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from fedsrd_kernels.errors import ConfigError, SeededCountError, ShapeMismatchError  # noqa: E402
from fedsrd_kernels.kernels.download.reference import mask_key, seeded_keep_indices, seeded_keep_mask  # noqa: E402
from fedsrd_kernels.kernels.download.triton import (  # noqa: E402
    dare_compact_grouped_triton,
    dare_compact_triton,
    seeded_expand_add_grouped_triton,
    seeded_expand_add_triton,
)
from fedsrd_kernels.server import Aggregator, apply  # noqa: E402
from fedsrd_kernels.updates import Broadcast  # noqa: E402
from tests.helpers import assert_bitwise_equal, kernel_device, seeded_gen

SHAPES = [(1,), (3,), (1023,), (4097,), (1023, 3), (1, 64)]
DROPS = [0.0, 0.5, 0.8]
VALUE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
GROUP_SHAPES = [(1023, 3), (1,), (0,), (4097,), (1, 64), (5, 7), (3,)]
SEED, ROUND = 2024, 3


def _broadcast(deltas: dict, drop: float) -> Broadcast:
    return Broadcast(
        round=ROUND, method="fedsrd", seed=SEED, download_drop=drop, deltas=deltas, seeded=frozenset(deltas)
    )


# --------------------------------------------------------------------------- server: compaction


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("drop", DROPS)
@pytest.mark.parametrize("value_dtype", list(VALUE_DTYPES))
@pytest.mark.parametrize("source_dtype", [torch.float32, torch.float64])
def test_compact_matches_seeded_keep_indices_and_gather(shape, drop, value_dtype, source_dtype):
    name = f"layers.{len(shape)}.lora_B.weight"
    delta = torch.randn(shape, generator=seeded_gen(shape, drop, source_dtype), dtype=source_dtype)
    indices, values = dare_compact_triton(delta.to(kernel_device()), mask_key(SEED, ROUND, name), drop, value_dtype)
    kept = seeded_keep_indices(delta.numel(), seed=SEED, round=ROUND, name=name, drop=drop)
    assert indices.dtype == torch.int64
    assert torch.equal(indices.cpu(), kept)
    assert_bitwise_equal(values, delta.flatten()[kept].to(value_dtype))


@pytest.mark.parametrize("drop", [0.0, 0.8])
@pytest.mark.parametrize("value_dtype", list(VALUE_DTYPES))
def test_compact_matches_aggregator_download(drop, value_dtype):
    key, shape = "model.layers.0.mlp.up_proj.lora_A.weight", (64, 33)
    delta = torch.randn(shape, generator=seeded_gen(drop, value_dtype), dtype=torch.float64)
    server = Aggregator("fedsrd", download_drop=drop, seed=SEED, value_dtype=VALUE_DTYPES[value_dtype])
    sparse = server._download(key, delta, ROUND)
    indices, values = dare_compact_triton(delta.to(kernel_device()), mask_key(SEED, ROUND, key), drop, value_dtype)
    assert_bitwise_equal(values, sparse.values)
    expected = torch.arange(delta.numel()) if sparse.indices is None else sparse.indices
    assert torch.equal(indices.cpu(), expected)


@pytest.mark.parametrize("key", [0, 1, 2**32, 0x1234_5678_9ABC_DEF0, 2**63 - 1])
def test_compact_keys_at_the_edges(key):
    delta = torch.randn(4097, generator=seeded_gen(key), dtype=torch.float32)
    indices, values = dare_compact_triton(delta.to(kernel_device()), key, 0.5, torch.float32)
    mask = seeded_keep_mask(4097, key, 0.5)
    assert torch.equal(indices.cpu(), torch.nonzero(mask).flatten())
    assert_bitwise_equal(values, delta[mask])


def test_compact_bfloat16_rounds_to_nearest_even_and_keeps_specials():
    # Ties (exactly halfway between two bf16 values) must go to the even one; fp64 narrows through fp32.
    tie_even, tie_odd = 1.0 + 2**-8, 1.0 + 3 * 2**-8
    special = [tie_even, -tie_even, tie_odd, 1.0 + 2**-8 + 2**-30, 3.4e38, -0.0, float("inf"), 1e-40, 2**-133]
    delta = torch.tensor(special, dtype=torch.float64)
    indices, values = dare_compact_triton(delta.to(kernel_device()), 5, 0.0, torch.bfloat16)
    assert torch.equal(indices.cpu(), torch.arange(len(special)))
    assert_bitwise_equal(values, delta.to(torch.bfloat16))


@pytest.mark.parametrize("drop", [0.0, 0.8])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
def test_grouped_compact_matches_each_tensor(drop, value_dtype):
    tensors = [torch.randn(s, generator=seeded_gen(s, drop), dtype=torch.float64) for s in GROUP_SHAPES]
    names = [f"layers.{i}.lora_A.weight" for i in range(len(tensors))]
    flat = torch.cat([t.flatten() for t in tensors]).to(kernel_device())
    offsets = [0]
    for t in tensors:
        offsets.append(offsets[-1] + t.numel())
    keys = [mask_key(SEED, ROUND, n) for n in names]
    indices, values, value_offsets = dare_compact_grouped_triton(flat, offsets, keys, drop, value_dtype)
    assert len(value_offsets) == len(tensors) + 1 and value_offsets[-1] == values.numel() == indices.numel()
    for t, name, lo, hi in zip(tensors, names, value_offsets, value_offsets[1:]):
        kept = seeded_keep_indices(t.numel(), seed=SEED, round=ROUND, name=name, drop=drop)
        assert torch.equal(indices[lo:hi].cpu(), kept), name
        assert_bitwise_equal(values[lo:hi], t.flatten()[kept].to(value_dtype))


# --------------------------------------------------------------------------- client: expand-add


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("drop", DROPS)
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value_dtype", list(VALUE_DTYPES))
def test_expand_add_matches_apply(shape, drop, factor_dtype, value_dtype):
    key = "model.layers.1.self_attn.q_proj.adapter"  # apply() needs LoRA keys in pairs: a plain key
    gen = seeded_gen(shape, drop, factor_dtype, value_dtype)
    factor = torch.randn(shape, generator=gen).to(factor_dtype)
    factor.view(-1)[::5] = -0.0  # dropped positions turn -0.0 into +0.0 in the torch path: so must we
    delta = torch.randn(shape, generator=gen, dtype=torch.float64) * 1e-2
    sparse = Aggregator("fedsrd", download_drop=drop, seed=SEED, value_dtype=VALUE_DTYPES[value_dtype])._download(
        key, delta, ROUND
    )
    expected = apply({key: factor}, _broadcast({key: sparse}, drop))[key]
    got = seeded_expand_add_triton(
        factor.to(kernel_device()), sparse.values.to(kernel_device()), mask_key(SEED, ROUND, key), drop, sparse.scale
    )
    assert_bitwise_equal(got, expected)


def test_expand_add_is_out_of_place_and_scale_rounds_to_float32():
    factor = torch.randn(1023, 3, generator=seeded_gen("oop"))
    before = factor.clone()
    key, drop = mask_key(SEED, ROUND, "w"), 0.5
    kept = seeded_keep_indices(factor.numel(), seed=SEED, round=ROUND, name="w", drop=drop)
    values = torch.randn(kept.numel(), generator=seeded_gen("v"))
    scale = 1.0 / 3.0  # not a float32: the torch path multiplies by float32(1/3)
    got = seeded_expand_add_triton(factor.to(kernel_device()), values.to(kernel_device()), key, drop, scale)
    dense = torch.zeros(factor.numel())
    dense[kept] = values * torch.tensor(scale, dtype=torch.float32)
    assert_bitwise_equal(got, factor + dense.view(factor.shape))
    assert_bitwise_equal(factor, before)


@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16])
def test_grouped_round_trip_matches_apply(factor_dtype):
    drop = 0.8
    names = [f"model.layers.{i}.mlp.proj.adapter" for i in range(len(GROUP_SHAPES))]
    gen = seeded_gen("group", factor_dtype)
    factors = {n: torch.randn(s, generator=gen).to(factor_dtype) for n, s in zip(names, GROUP_SHAPES)}
    deltas = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in zip(names, GROUP_SHAPES)}
    server = Aggregator("fedsrd", download_drop=drop, seed=SEED, value_dtype="bfloat16")
    sparse = {n: server._download(n, d, ROUND) for n, d in deltas.items()}
    expected = apply(factors, _broadcast(sparse, drop))

    offsets = [0]
    for n in names:
        offsets.append(offsets[-1] + factors[n].numel())
    keys = [mask_key(SEED, ROUND, n) for n in names]
    flat_delta = torch.cat([deltas[n].flatten() for n in names]).to(kernel_device())
    _, values, _ = dare_compact_grouped_triton(flat_delta, offsets, keys, drop, torch.bfloat16)
    flat_factor = torch.cat([factors[n].flatten() for n in names]).to(kernel_device())
    out = seeded_expand_add_grouped_triton(flat_factor, offsets, values, keys, drop, [sparse[n].scale for n in names])
    for n, lo, hi in zip(names, offsets, offsets[1:]):
        assert_bitwise_equal(out[lo:hi].view(factors[n].shape), expected[n])


# --------------------------------------------------------------------------- errors


def test_wrong_number_of_values_raises():
    factor = torch.zeros(100, device=kernel_device())
    kept = seeded_keep_indices(100, seed=1, round=1, name="w", drop=0.5).numel()
    with pytest.raises(ShapeMismatchError, match=f"keep {kept} elements"):
        seeded_expand_add_triton(factor, torch.zeros(kept + 1, device=kernel_device()), mask_key(1, 1, "w"), 0.5, 2.0)


def test_grouped_expand_add_names_the_tensor_whose_count_is_wrong():
    """Counts off in opposite directions keep the total right: only the per-tensor check catches them."""
    names = [f"layers.{i}.lora_B.weight" for i in range(len(GROUP_SHAPES))]
    offsets = [0]
    for shape in GROUP_SHAPES:
        offsets.append(offsets[-1] + math.prod(shape))
    keys = [mask_key(SEED, ROUND, n) for n in names]
    counts = [seeded_keep_indices(b - a, seed=SEED, round=ROUND, name=n, drop=0.5).numel()
              for n, a, b in zip(names, offsets, offsets[1:])]
    factor = torch.zeros(offsets[-1], device=kernel_device())
    values = torch.zeros(sum(counts), device=kernel_device())
    scales = [2.0] * len(names)
    out = seeded_expand_add_grouped_triton(factor, offsets, values, keys, 0.5, scales, counts=counts, names=names)
    assert_bitwise_equal(out, factor)
    wrong = list(counts)
    wrong[0], wrong[3] = wrong[0] + 1, wrong[3] - 1
    with pytest.raises(SeededCountError, match=f"{names[0]!r}: its seeded mask keeps {counts[0]} of"):
        seeded_expand_add_grouped_triton(factor, offsets, values, keys, 0.5, scales, counts=wrong, names=names)
    with pytest.raises(SeededCountError, match="#0"):
        seeded_expand_add_grouped_triton(factor, offsets, values, keys, 0.5, scales, counts=wrong)
    with pytest.raises(ShapeMismatchError, match="counts"):
        seeded_expand_add_grouped_triton(factor, offsets, values, keys, 0.5, scales, counts=counts[1:])


@pytest.mark.parametrize(
    "kwargs, error, fragment",
    [
        ({"drop": 1.0}, ConfigError, "drop"),
        ({"drop": -0.1}, ConfigError, "drop"),
        ({"key": -1}, ConfigError, "key"),
        ({"key": 2**63}, ConfigError, "key"),
        ({"value_dtype": torch.float64}, ConfigError, "value_dtype"),
        ({"value_dtype": "int8"}, ConfigError, "value_dtype"),
    ],
)
def test_compact_rejects_bad_arguments(kwargs, error, fragment):
    args = {"delta": torch.zeros(10, device=kernel_device()), "key": 1, "drop": 0.5, "value_dtype": torch.float32}
    with pytest.raises(error, match=fragment):
        dare_compact_triton(**{**args, **kwargs})


def test_grouped_rejects_bad_tables():
    flat = torch.zeros(10, device=kernel_device())
    with pytest.raises(ShapeMismatchError, match="offsets"):
        dare_compact_grouped_triton(flat, [0, 4, 9], [1, 2], 0.5)
    with pytest.raises(ShapeMismatchError, match="offsets"):
        dare_compact_grouped_triton(flat, [0, 6, 4, 10], [1, 2, 3], 0.5)
    with pytest.raises(ShapeMismatchError, match="keys"):
        dare_compact_grouped_triton(flat, [0, 4, 10], [1], 0.5)
    with pytest.raises(ShapeMismatchError, match="scales"):
        seeded_expand_add_grouped_triton(flat, [0, 4, 10], torch.zeros(10, device=kernel_device()), [1, 2], 0.0, [1.0])
    with pytest.raises(ShapeMismatchError, match="factor"):
        seeded_expand_add_triton(torch.zeros(4, dtype=torch.float64), torch.zeros(4), 1, 0.0, 1.0)
