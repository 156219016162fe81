"""The compiled CUDA ops (csrc/) against the torch references, bit for bit where the result is exact.

GPU only: skipped without a CUDA device and the extension, which a CUDA torch and nvcc build with

    FEDSRD_BUILD_CUDA=1 pip install -e . --no-build-isolation

Memory check (out-of-bounds and misaligned accesses in every kernel these tests launch; the
caching allocator off so the sanitizer sees each tensor's real bounds):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python -m pytest -q tests/test_cuda_ops.py

(``--tool racecheck`` and ``--tool synccheck`` check the shared-memory scans and histograms the same way.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsrd_kernels.errors import ConfigError
from fedsrd_kernels.kernels._backend import cuda_extension_available, cuda_extension_status, resolve_backend
from fedsrd_kernels.kernels.philox import mask_key, philox4x32_10, seeded_keep_indices, seeded_keep_mask
from fedsrd_kernels.kernels.scoring import keep_count
from fedsrd_kernels.updates import SparseTensor
from tests.helpers import assert_bitwise_equal, seeded_gen

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_extension_available()),
    reason=f"needs a CUDA device and the compiled extension fedsrd_kernels._C "
    f"(CUDA available: {torch.cuda.is_available()}; extension: {cuda_extension_status()})",
)

if torch.cuda.is_available() and cuda_extension_available():
    from fedsrd_kernels.kernels import cuda_ops

DEVICE = "cuda"
# Sizes around the 16-element runs, the 4096-element tiles and the 4-element Philox counters.
SIZES = [0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 100, 1023, 4095, 4096, 4097, 8192 + 5, 65_537]
GROUP = [1023, 0, 5, 4097, 1, 0, 64 * 3, 33, 8192 + 5]  # tensor boundaries at every alignment
DENSITIES = [0.0, 0.05, 0.5, 1.0]
COPY_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SEED, ROUND = 2024, 3


def _offsets(sizes) -> list[int]:
    return np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()


def _masks(sizes, density, gen) -> torch.Tensor:
    return torch.rand(sum(sizes), generator=gen) < density


def _ref_bitmap(mask: torch.Tensor, offsets) -> np.ndarray:
    m = mask.numpy()
    parts = [np.packbits(m[a:b]) for a, b in zip(offsets, offsets[1:])]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def _f32(x: float) -> float:
    return float(np.float32(x))


# --------------------------------------------------------------------------- upload: bitmap + compaction


@pytest.mark.parametrize("sizes", [[n] for n in SIZES] + [GROUP, []], ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", COPY_DTYPES)
def test_bitmap_compact_matches_packbits_and_gather(sizes, density, dtype):
    gen = seeded_gen(tuple(sizes), density, dtype)
    offsets = _offsets(sizes)
    values = torch.randn(offsets[-1], generator=gen, dtype=torch.float64).to(dtype)
    mask = _masks(sizes, density, gen)
    bitmap, kept, counts = cuda_ops.bitmap_compact(values.to(DEVICE), mask.to(DEVICE), offsets)
    assert bitmap.dtype == torch.uint8 and bitmap.device.type == "cuda"
    assert np.array_equal(bitmap.cpu().numpy(), _ref_bitmap(mask, offsets))
    assert bitmap.numel() == cuda_ops.bitmap_offsets(offsets)[-1]
    assert_bitwise_equal(kept, values[mask])  # element order, bit copy
    want_counts = [int(mask[a:b].sum()) for a, b in zip(offsets, offsets[1:])]
    assert counts.cpu().tolist() == want_counts


def test_bitmap_bytes_are_what_wire_sends():
    """wire.py's bitmap positions are np.packbits of the mask: the device bytes decode there."""
    from fedsrd_kernels.wire import _decode_positions

    mask = torch.rand(12_345, generator=seeded_gen("wire")) < 0.2
    bitmap, _, _ = cuda_ops.bitmap_compact(torch.zeros(mask.numel(), device=DEVICE), mask.to(DEVICE))
    entry = {"positions": "bitmap", "nnz": int(mask.sum())}
    indices = _decode_positions(entry, mask.numel(), bitmap.cpu().numpy().tobytes(), "test")
    assert np.array_equal(indices, np.flatnonzero(mask.numpy()))


# --------------------------------------------------------------------------- download of a bitmap: expand-add


def _reference_apply(factor, values, mask, offsets, scales):
    """server.apply per tensor: (factor.float() + SparseTensor(...).to_dense()).to(factor.dtype)."""
    out, start = [], 0
    for t, (a, b) in enumerate(zip(offsets, offsets[1:])):
        idx = torch.nonzero(mask[a:b]).flatten()
        sparse = SparseTensor((b - a,), values[start : start + idx.numel()], idx, scale=scales[t])
        start += idx.numel()
        out.append((factor[a:b].float() + sparse.to_dense()).to(factor.dtype))
    return torch.cat(out) if out else factor.clone()


@pytest.mark.parametrize("sizes", [[n] for n in (1, 17, 4097, 65_537)] + [GROUP], ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bitmap_expand_add_matches_apply(sizes, density, factor_dtype, value_dtype):
    gen = seeded_gen(tuple(sizes), density, factor_dtype, value_dtype)
    offsets = _offsets(sizes)
    factor = torch.randn(offsets[-1], generator=gen).to(factor_dtype)
    factor[::7] = -0.0  # -0.0 + 0.0 at dropped positions is +0.0 in torch; the kernel must agree
    mask = _masks(sizes, density, gen)
    values = (torch.randn(int(mask.sum()), generator=gen) * 1e-2).to(value_dtype)
    scales = [_f32(1.0 + 0.37 * t) if t % 3 else 1.0 for t in range(len(sizes))]
    bitmap = torch.from_numpy(_ref_bitmap(mask, offsets))
    out = cuda_ops.bitmap_expand_add(factor.to(DEVICE), bitmap.to(DEVICE), values.to(DEVICE), scales, offsets)
    assert_bitwise_equal(out, _reference_apply(factor, values, mask, offsets, scales))


def test_bitmap_round_trip_through_the_device():
    gen = seeded_gen("round trip")
    offsets = _offsets(GROUP)
    delta = torch.randn(offsets[-1], generator=gen, dtype=torch.float32)
    mask = _masks(GROUP, 0.1, gen)
    bitmap, kept, _ = cuda_ops.bitmap_compact(delta.to(DEVICE), mask.to(DEVICE), offsets)
    factor = torch.randn(offsets[-1], generator=gen)
    out = cuda_ops.bitmap_expand_add(factor.to(DEVICE), bitmap, kept, [1.0] * len(GROUP), offsets)
    assert_bitwise_equal(out, factor + torch.where(mask, delta, 0.0))


def test_bitmap_expand_add_rejects_malformed_bitmaps():
    factor = torch.zeros(9, device=DEVICE)
    with pytest.raises(RuntimeError, match="past its last element"):  # element 9 of 9 set (padding bit)
        cuda_ops.bitmap_expand_add(factor, torch.tensor([255, 0b11000000], dtype=torch.uint8, device=DEVICE),
                                   torch.zeros(10, device=DEVICE), [1.0])
    with pytest.raises(RuntimeError, match="keep 9 elements, got 8"):
        cuda_ops.bitmap_expand_add(factor, torch.tensor([255, 128], dtype=torch.uint8, device=DEVICE),
                                   torch.zeros(8, device=DEVICE), [1.0])
    with pytest.raises(RuntimeError, match="take 2 bytes"):
        torch.ops.fedsrd.bitmap_expand_add(factor, torch.zeros(3, dtype=torch.uint8, device=DEVICE),
                                           torch.zeros(0, device=DEVICE), torch.ones(1, device=DEVICE), [0, 9])


def test_ops_check_inputs_before_launching():
    values = torch.zeros(64, device=DEVICE)
    mask = torch.zeros(64, dtype=torch.bool, device=DEVICE)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.fedsrd.bitmap_compact(torch.zeros(128, device=DEVICE)[::2], mask, [0, 64])
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.fedsrd.bitmap_compact(values, mask.to(torch.uint8), [0, 64])
    with pytest.raises(RuntimeError, match="offsets"):
        torch.ops.fedsrd.bitmap_compact(values, mask, [0, 32, 16, 64])
    with pytest.raises(RuntimeError, match="offsets must start at 0"):
        torch.ops.fedsrd.bitmap_compact(values, mask, [0, 63])
    with pytest.raises(RuntimeError, match="threshold"):
        torch.ops.fedsrd.seeded_keep_mask(torch.zeros(1, dtype=torch.int64, device=DEVICE), [0, 4], 2**32)
    with pytest.raises(ConfigError):
        cuda_ops.bitmap_compact(values.cpu(), mask.cpu())


# --------------------------------------------------------------------------- seeded download (Philox)


def test_philox_words_match_numpy():
    rng = np.random.default_rng(0)
    counters = np.concatenate([[0, 1, 2**31, 2**32 - 1], rng.integers(0, 2**32, 1000)]).astype(np.int64)
    for key in (0, 1, 2**32 + 5, 2**63 - 1, int(rng.integers(0, 2**63))):
        got = torch.ops.fedsrd.philox_words(torch.from_numpy(counters).to(DEVICE), key).cpu().numpy()
        want = np.stack(philox4x32_10(counters, 0, 0, 0, key & 0xFFFFFFFF, key >> 32), axis=1)
        assert np.array_equal(got, want.astype(np.int64)), key


def test_philox_words_match_curand():
    import fedsrd_kernels._C as ext

    if not ext.has_curand:
        pytest.skip("this build found no curand_kernel.h")
    counters = torch.arange(0, 2**32, 2**32 // 4099, dtype=torch.int64, device=DEVICE)
    for key in (0, 12345, 2**63 - 1):
        mine = torch.ops.fedsrd.philox_words(counters, key)
        assert torch.equal(mine, torch.ops.fedsrd.philox_words(counters, key, True)), key


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("drop", [0.0, 0.5, 0.8, 0.999])
def test_seeded_keep_mask_matches_cpu(size, drop):
    names = [f"layers.{i}.lora_B.weight" for i in range(3)]
    keys = [mask_key(SEED, ROUND, n) for n in names]
    sizes = [size, 0, size // 3 + 1]
    got = cuda_ops.seeded_keep_mask_cuda(_offsets(sizes), keys, drop, DEVICE).cpu()
    want = torch.cat([seeded_keep_mask(n, k, drop) for n, k in zip(sizes, keys)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("drop", [0.0, 0.8])
@pytest.mark.parametrize("source_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dare_compact_matches_seeded_indices_and_gather(drop, source_dtype, value_dtype):
    gen = seeded_gen(drop, source_dtype, value_dtype)
    names = [f"t{i}" for i in range(len(GROUP))]
    keys = [mask_key(SEED, ROUND, n) for n in names]
    offsets = _offsets(GROUP)
    flat = torch.randn(offsets[-1], generator=gen, dtype=source_dtype)
    indices, values, value_offsets = cuda_ops.dare_compact_cuda(flat.to(DEVICE), offsets, keys, drop, value_dtype)
    for t, (a, b) in enumerate(zip(offsets, offsets[1:])):
        kept = seeded_keep_indices(b - a, seed=SEED, round=ROUND, name=names[t], drop=drop)
        lo, hi = value_offsets[t], value_offsets[t + 1]
        assert torch.equal(indices[lo:hi].cpu(), kept)
        assert_bitwise_equal(values[lo:hi], flat[a:b][kept].to(value_dtype))


@pytest.mark.parametrize("drop", [0.0, 0.8])
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
def test_seeded_expand_add_matches_apply(drop, factor_dtype, value_dtype):
    gen = seeded_gen("seeded", drop, factor_dtype, value_dtype)
    names = [f"t{i}" for i in range(len(GROUP))]
    keys = [mask_key(SEED, ROUND, n) for n in names]
    offsets = _offsets(GROUP)
    factor = torch.randn(offsets[-1], generator=gen).to(factor_dtype)
    mask = torch.cat([seeded_keep_mask(b - a, k, drop) for (a, b), k in zip(zip(offsets, offsets[1:]), keys)])
    values = torch.randn(int(mask.sum()), generator=gen).to(value_dtype)
    scale = _f32(1.0 / (1.0 - drop))
    scales = [scale] * len(GROUP)
    out = cuda_ops.seeded_expand_add_cuda(factor.to(DEVICE), offsets, values.to(DEVICE), keys, drop, scales)
    assert_bitwise_equal(out, _reference_apply(factor, values, mask, offsets, scales))


def test_seeded_ops_match_triton():
    triton = pytest.importorskip("triton")  # noqa: F841
    from fedsrd_kernels.kernels.download_triton import dare_compact_grouped_triton, seeded_expand_add_grouped_triton

    gen = seeded_gen("vs triton")
    offsets = _offsets(GROUP)
    keys = [mask_key(SEED, ROUND, f"k{i}") for i in range(len(GROUP))]
    flat = torch.randn(offsets[-1], generator=gen, dtype=torch.float64).to(DEVICE)
    mine = cuda_ops.dare_compact_cuda(flat, offsets, keys, 0.8, torch.bfloat16)
    theirs = dare_compact_grouped_triton(flat, offsets, keys, 0.8, torch.bfloat16)
    assert torch.equal(mine[0], theirs[0]) and mine[2] == theirs[2]
    assert_bitwise_equal(mine[1], theirs[1])
    factor = torch.randn(offsets[-1], generator=gen).to(DEVICE)
    scales = [5.0] * len(GROUP)
    assert_bitwise_equal(cuda_ops.seeded_expand_add_cuda(factor, offsets, mine[1], keys, 0.8, scales),
                         seeded_expand_add_grouped_triton(factor, offsets, mine[1], keys, 0.8, scales))


# --------------------------------------------------------------------------- segmented top-k threshold


def _reference_threshold(scores: torch.Tensor, k: int) -> tuple[int, int]:
    """(bits of the k-th largest key, ties to keep) on the ordering keys, k clamped to the candidates."""
    keys = scores.view(torch.int32).to(torch.int64)
    keys = torch.where(keys == -(2**31), 0, keys)
    candidates = keys[keys >= 0].sort(descending=True).values
    k = max(0, min(k, candidates.numel()))
    if k == 0:
        return 0x7FFFFFFF, 0
    t = int(candidates[k - 1])
    return t, k - int((candidates > t).sum())


def _scores(n: int, kind: str, gen) -> torch.Tensor:
    if kind == "continuous":
        return torch.randn(n, generator=gen).abs() * torch.rand(n, generator=gen)
    if kind == "ties":
        return torch.randint(0, 9, (n,), generator=gen).float() * 0.25  # many equal scores, zeros included
    if kind == "constant":
        return torch.full((n,), 0.5)
    signed = torch.randn(n, generator=gen)  # "signed": zeros of both signs and negatives, never kept
    signed[::5] = -0.0
    signed[1::5] = 0.0
    return signed


@pytest.mark.parametrize("kind", ["continuous", "ties", "constant", "signed"])
@pytest.mark.parametrize("shift", range(5))
def test_topk_thresholds_are_exact(kind, shift):
    gen = seeded_gen("topk", kind)
    sizes = [0, 1, 2, 5, 33, 1000, 4097, 65_537, 300_001]
    offsets = _offsets(sizes)
    scores = torch.cat([_scores(n, kind, gen) for n in sizes])
    # Per segment (rotated by shift, so each segment meets each): nothing, one, the spec's keep count, all,
    # and more than all (clamped).
    ks = [[0, 1, keep_count(n, 0.9), n, n + 3][(i + shift) % 5] for i, n in enumerate(sizes)]
    threshold, ties = cuda_ops.topk_thresholds(scores.to(DEVICE), offsets, torch.tensor(ks, device=DEVICE))
    bits = threshold.cpu().view(torch.int32).tolist()
    mask = cuda_ops.keep_mask_from_thresholds(scores.to(DEVICE), offsets, threshold, ties).cpu()
    for s, (a, b) in enumerate(zip(offsets, offsets[1:])):
        want_bits, want_ties = _reference_threshold(scores[a:b], ks[s])
        assert (bits[s] & 0xFFFFFFFF, int(ties[s])) == (want_bits, want_ties), (kind, s, ks[s])
        kept, segment = mask[a:b], scores[a:b]
        candidates = int((segment >= 0).sum())  # -0.0 counts as 0.0; negatives are never kept
        assert int(kept.sum()) == max(0, min(ks[s], candidates))
        if kept.any() and (~kept).any():
            assert segment[kept].min() >= segment[~kept].max()


def test_topk_threshold_k_stays_on_device():
    """k computed on the GPU (as the kurtosis ratio is) goes straight in: no host round trip needed."""
    scores = torch.rand(10_000, generator=seeded_gen("device k")).to(DEVICE)
    k = torch.tensor([1234], device=DEVICE)
    threshold, ties = cuda_ops.topk_thresholds(scores, [0, 10_000], k)
    assert threshold.device.type == "cuda" and ties.device.type == "cuda"
    t = scores.sort(descending=True).values[1233]
    assert float(threshold) == float(t)
    assert int(ties) == 1234 - int((scores > t).sum())


# --------------------------------------------------------------------------- registration


def test_backend_reports_the_extension():
    import fedsrd_kernels

    info = fedsrd_kernels.backend_info()
    assert info["cuda_extension"] is True and info["cuda_extension_status"] == "loaded"
    assert resolve_backend(DEVICE) == "cuda"


def _opcheck_cases():
    gen = seeded_gen("opcheck")
    offsets = _offsets([33, 0, 4097])
    n = offsets[-1]
    values = torch.randn(n, generator=gen).to(DEVICE)
    mask = (torch.rand(n, generator=gen) < 0.3).to(DEVICE)
    bitmap, kept, _ = torch.ops.fedsrd.bitmap_compact(values, mask, offsets)
    keys = torch.tensor([mask_key(SEED, ROUND, f"o{i}") for i in range(3)], device=DEVICE)
    threshold = 2**31
    seeded_kept = torch.ops.fedsrd.seeded_compact(values, keys, offsets, threshold)[1]
    scales = torch.tensor([1.0, 2.0, 0.5], device=DEVICE)
    return [
        (torch.ops.fedsrd.bitmap_compact.default, (values, mask, offsets)),
        (torch.ops.fedsrd.bitmap_expand_add.default, (values, bitmap, kept, scales, offsets)),
        (torch.ops.fedsrd.seeded_keep_mask.default, (keys, offsets, threshold)),
        (torch.ops.fedsrd.seeded_compact.default, (values, keys, offsets, threshold)),
        (torch.ops.fedsrd.seeded_expand_add.default, (values, seeded_kept, keys, scales, offsets, threshold)),
        (torch.ops.fedsrd.segmented_topk_threshold.default,
         (values.abs(), torch.tensor([3, 0, 100], device=DEVICE), offsets)),
        (torch.ops.fedsrd.philox_words.default, (torch.arange(50, device=DEVICE), 7)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)
