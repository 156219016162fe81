"""Philox4x32-10 and the seeded DARE keep-mask: known answers, Triton agreement, statistics, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsrd_kernels.errors import ConfigError
from fedsrd_kernels.kernels.download.reference import (
    MAX_NUMEL,
    drop_threshold,
    mask_key,
    philox4x32_10,
    seeded_keep_indices,
    seeded_keep_mask,
)

U32 = 0xFFFFFFFF

# Random123 kat_vectors, "philox4x32 10" lines: counter, key, expected output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((U32, U32, U32, U32), (U32, U32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    out = philox4x32_10(*counter, *key)
    assert all(word.dtype == np.uint32 for word in out)
    assert tuple(int(word) for word in out) == expected


def test_philox_broadcasts_and_matches_scalar_calls():
    rng = np.random.default_rng(0)
    c0 = rng.integers(0, 2**32, size=37, dtype=np.uint64)
    c2 = rng.integers(0, 2**32, size=37, dtype=np.uint64)
    batched = philox4x32_10(c0, 7, c2, 0, 0x12345678, 0x9ABCDEF0)
    assert all(word.shape == (37,) for word in batched)
    for j in (0, 17, 36):
        single = philox4x32_10(int(c0[j]), 7, int(c2[j]), 0, 0x12345678, 0x9ABCDEF0)
        assert tuple(int(w) for w in single) == tuple(int(w[j]) for w in batched)


def _manual_keep_mask(numel: int, key: int, drop: float) -> np.ndarray:
    """The element rule written out element by element (slow; small numel only)."""
    threshold = math.floor(drop * 2**32)
    counters = np.arange(numel, dtype=np.uint64) // 4
    zeros = np.zeros_like(counters)
    lanes = np.stack(philox4x32_10(counters, zeros, zeros, zeros, key & U32, key >> 32))
    u = lanes[np.arange(numel) % 4, np.arange(numel)]
    return u >= threshold


@pytest.mark.parametrize("numel", [1, 3, 4, 5, 1023, 4097])
def test_keep_mask_follows_element_rule(numel):
    key = mask_key(3, 1, "layer.0.lora_A.weight")
    expected = _manual_keep_mask(numel, key, 0.6)
    assert np.array_equal(seeded_keep_mask(numel, key, 0.6).numpy(), expected)


def test_keep_mask_spans_many_chunks_consistently():
    # 2**16 counters per chunk: 600_001 elements cross several chunk borders
    # and a ragged last counter; the prefix must equal a short mask's.
    key = mask_key(11, 4, "w")
    long_mask = seeded_keep_mask(600_001, key, 0.5)
    assert long_mask.shape == (600_001,)
    assert torch.equal(long_mask[:4097], seeded_keep_mask(4097, key, 0.5))
    tail = np.arange(600_001 - 9, 600_001)
    counters = (tail // 4).astype(np.uint64)
    zeros = np.zeros_like(counters)
    lanes = np.stack(philox4x32_10(counters, zeros, zeros, zeros, key & U32, key >> 32))
    expected = lanes[tail % 4, np.arange(tail.size)] >= drop_threshold(0.5)
    assert np.array_equal(long_mask[-9:].numpy(), expected)


# ---------------------------------------------------------------- Triton


@pytest.fixture(scope="module")
def triton_kernels():
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")

    @triton.jit
    def randint4x_kernel(key, offsets_ptr, out_ptr, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = idx < n
        offsets = tl.load(offsets_ptr + idx, mask=valid, other=0)
        r0, r1, r2, r3 = tl.randint4x(key, offsets)
        tl.store(out_ptr + 4 * idx + 0, r0.to(tl.int32, bitcast=True), mask=valid)
        tl.store(out_ptr + 4 * idx + 1, r1.to(tl.int32, bitcast=True), mask=valid)
        tl.store(out_ptr + 4 * idx + 2, r2.to(tl.int32, bitcast=True), mask=valid)
        tl.store(out_ptr + 4 * idx + 3, r3.to(tl.int32, bitcast=True), mask=valid)

    @triton.jit
    def keep_mask_kernel(key, threshold, out_ptr, numel, BLOCK: tl.constexpr):
        # One Philox counter per 4 consecutive elements: counter j decides 4j..4j+3.
        counters = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        r0, r1, r2, r3 = tl.randint4x(key, counters)
        base = 4 * counters
        tl.store(out_ptr + base + 0, (r0.to(tl.int64) >= threshold).to(tl.int8), mask=base + 0 < numel)
        tl.store(out_ptr + base + 1, (r1.to(tl.int64) >= threshold).to(tl.int8), mask=base + 1 < numel)
        tl.store(out_ptr + base + 2, (r2.to(tl.int64) >= threshold).to(tl.int8), mask=base + 2 < numel)
        tl.store(out_ptr + base + 3, (r3.to(tl.int64) >= threshold).to(tl.int8), mask=base + 3 < numel)

    return triton, randint4x_kernel, keep_mask_kernel


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("key", [0, 1, 0x89ABCDEF, 2**32, 0x1234_5678_9ABC_DEF0, 2**63 - 1])
def test_philox_matches_triton_randint4x(triton_kernels, key):
    triton, randint4x_kernel, _ = triton_kernels
    n, block = 3000, 1024
    gen = torch.Generator().manual_seed(key % 1000)
    offsets = torch.randint(0, 2**31, (n,), generator=gen, dtype=torch.int32)
    offsets[:3] = torch.tensor([0, 1, 2**31 - 1], dtype=torch.int32)
    out = torch.empty(4 * n, dtype=torch.int32, device=_device())
    randint4x_kernel[(triton.cdiv(n, block),)](key, offsets.to(_device()), out, n, BLOCK=block)
    got = (out.cpu().to(torch.int64) & U32).view(n, 4).numpy()

    c0 = offsets.numpy().astype(np.uint64)
    expected = np.stack(philox4x32_10(c0, 0, 0, 0, key & U32, key >> 32), axis=1)
    assert np.array_equal(got, expected.astype(np.int64))


@pytest.mark.parametrize("numel", [1, 3, 1023, 4097])
@pytest.mark.parametrize("drop", [0.1, 0.8])
def test_triton_element_rule_matches_keep_mask(triton_kernels, numel, drop):
    triton, _, keep_mask_kernel = triton_kernels
    block = 256
    key = mask_key(2024, 7, f"model.layers.{numel}.q_proj.lora_B.weight")
    out = torch.full((numel,), -1, dtype=torch.int8, device=_device())
    grid = (triton.cdiv(triton.cdiv(numel, 4), block),)
    keep_mask_kernel[grid](key, drop_threshold(drop), out, numel, BLOCK=block)
    assert torch.equal(out.cpu().bool(), seeded_keep_mask(numel, key, drop))
    assert int(out.min()) >= 0  # every element written


# ---------------------------------------------------------------- statistics


@pytest.mark.parametrize("drop", [0.8, 0.5, 0.1])
def test_kept_fraction_within_five_sigma(drop):
    numel = 1_000_000
    kept = int(seeded_keep_mask(numel, mask_key(1, 0, f"stat-{drop}"), drop).sum())
    mean = numel * (1 - drop)
    sigma = math.sqrt(numel * drop * (1 - drop))
    assert abs(kept - mean) < 5 * sigma, (kept, mean, sigma)


def test_masks_depend_on_seed_round_and_name():
    numel, drop = 10_000, 0.5
    base = {"seed": 5, "round": 3, "name": "a.lora_A.weight"}
    reference = seeded_keep_indices(numel, drop=drop, **base)
    for change in ({"seed": 6}, {"round": 4}, {"name": "a.lora_B.weight"}):
        other = seeded_keep_indices(numel, drop=drop, **{**base, **change})
        assert not torch.equal(reference, other), change
    assert torch.equal(reference, seeded_keep_indices(numel, drop=drop, **base))


def test_keep_indices_are_the_sorted_kept_positions():
    key = mask_key(9, 2, "x")
    mask = seeded_keep_mask(5000, key, 0.7)
    indices = seeded_keep_indices(5000, seed=9, round=2, name="x", drop=0.7)
    assert indices.dtype == torch.int64
    assert torch.equal(indices, torch.nonzero(mask).flatten())
    assert bool((indices[1:] > indices[:-1]).all())


def test_mask_key_is_63_bit_and_unambiguous():
    keys = {mask_key(s, r, n) for s in (0, 1, 2**64 - 1) for r in (0, 1, 2**40) for n in ("", "w", "wé")}
    assert len(keys) == 27
    assert all(0 <= k < 2**63 for k in keys)
    # The name is the only variable-length field, so moving bytes between
    # fields cannot collide: (seed, round, "ab") vs a different round and "b".
    assert mask_key(0, 0, "ab") != mask_key(0, ord("a"), "b")


def test_drop_zero_keeps_everything():
    assert bool(seeded_keep_mask(1001, 123, 0.0).all())
    assert torch.equal(seeded_keep_indices(1001, seed=1, round=1, name="w", drop=0), torch.arange(1001))


def test_empty_tensor():
    assert seeded_keep_mask(0, 123, 0.5).shape == (0,)
    assert seeded_keep_indices(0, seed=1, round=1, name="w", drop=0.5).shape == (0,)


def test_drop_threshold():
    assert drop_threshold(0.0) == 0
    assert drop_threshold(0.5) == 2**31
    assert drop_threshold(math.nextafter(1.0, 0.0)) == 2**32 - 1
    # A drop just under 1 drops nearly everything but stays a valid uint32 threshold.
    assert int(seeded_keep_mask(4096, 77, math.nextafter(1.0, 0.0)).sum()) <= 1


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"seed": -1, "round": 0, "name": "w"}, "seed"),
        ({"seed": 2**64, "round": 0, "name": "w"}, "seed"),
        ({"seed": 1.5, "round": 0, "name": "w"}, "seed"),
        ({"seed": 0, "round": -1, "name": "w"}, "round"),
        ({"seed": 0, "round": True, "name": "w"}, "round"),
        ({"seed": 0, "round": 0, "name": b"w"}, "name"),
    ],
)
def test_mask_key_rejects_bad_input(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        mask_key(**kwargs)


@pytest.mark.parametrize("drop", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_drop_raises(drop):
    with pytest.raises(ConfigError, match="drop"):
        seeded_keep_mask(10, 1, drop)
    with pytest.raises(ConfigError, match="drop"):
        seeded_keep_indices(10, seed=1, round=1, name="w", drop=drop)


@pytest.mark.parametrize("numel", [-1, MAX_NUMEL + 1, 2.0])
def test_bad_numel_raises(numel):
    with pytest.raises(ConfigError, match="numel"):
        seeded_keep_mask(numel, 1, 0.5)


@pytest.mark.parametrize("key", [-1, 2**63, 1.0])
def test_bad_key_raises(key):
    with pytest.raises(ConfigError, match="key"):
        seeded_keep_mask(10, key, 0.5)


def test_philox_rejects_out_of_range_words():
    with pytest.raises(ConfigError, match="c1"):
        philox4x32_10(0, 2**32, 0, 0, 0, 0)
    with pytest.raises(ConfigError, match="k1"):
        philox4x32_10(0, 0, 0, 0, 0, -1)


def test_word_equal_to_threshold_is_dropped():
    # Pick drop so that T equals element 6's Philox word exactly: u_i < T drops, u_i == T keeps.
    key = mask_key(1, 1, "edge")
    words = philox4x32_10(1, 0, 0, 0, key & U32, key >> 32)  # counter 1 covers elements 4..7
    u6 = int(words[2])
    assert not bool(seeded_keep_mask(8, key, (u6 + 1) / 2**32)[6])
    assert bool(seeded_keep_mask(8, key, u6 / 2**32)[6])
