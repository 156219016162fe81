"""The compiled CUDA ops (csrc/) against the torch references, bit for bit where the result is exact.

GPU only: skipped without a CUDA device and the extension, which a CUDA torch and nvcc build with

    FEDSRD_BUILD_CUDA=1 pip install -e . --no-build-isolation

Memory check (out-of-bounds and misaligned accesses in every kernel these tests launch; the
caching allocator off so the sanitizer sees each tensor's real bounds):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python -m pytest -q tests/test_cuda_ops.py

(``--tool racecheck`` and ``--tool synccheck`` check the shared-memory scans and histograms the same way.)
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedsrd_kernels.errors import ConfigError, SeededCountError
from fedsrd_kernels.kernels._backend import cuda_extension_available, cuda_extension_status, resolve_backend
from fedsrd_kernels.kernels.download.reference import mask_key, seeded_keep_indices, seeded_keep_mask
from fedsrd_kernels.updates import SparseTensor
from tests.helpers import assert_bitwise_equal, seeded_gen

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and cuda_extension_available()),
    reason=f"needs a CUDA device and the compiled extension fedsrd_kernels._C "
    f"(CUDA available: {torch.cuda.is_available()}; extension: {cuda_extension_status()})",
)

if torch.cuda.is_available() and cuda_extension_available():
    from fedsrd_kernels.kernels.download import cuda as cuda_ops

DEVICE = "cuda"
# Sizes around the 16-element runs, the 4096-element tiles and the 4-element Philox counters.
SIZES = [0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 100, 1023, 4095, 4096, 4097, 8192 + 5, 65_537]
GROUP = [1023, 0, 5, 4097, 1, 0, 64 * 3, 33, 8192 + 5]  # tensor boundaries at every alignment
SEED, ROUND = 2024, 3


def _offsets(sizes) -> list[int]:
    return np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()


def _f32(x: float) -> float:
    return float(np.float32(x))


# --------------------------------------------------------------------------- seeded download (Philox)


def _reference_apply(factor, values, mask, offsets, scales):
    """server.apply per tensor: (factor.float() + SparseTensor(...).to_dense()).to(factor.dtype)."""
    out, start = [], 0
    for t, (a, b) in enumerate(zip(offsets, offsets[1:])):
        idx = torch.nonzero(mask[a:b]).flatten()
        sparse = SparseTensor((b - a,), values[start : start + idx.numel()], idx, scale=scales[t])
        start += idx.numel()
        out.append((factor[a:b].float() + sparse.to_dense()).to(factor.dtype))
    return torch.cat(out) if out else factor.clone()


def test_ops_check_inputs_before_launching():
    keys = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.fedsrd.seeded_compact(torch.zeros(128, device=DEVICE)[::2], keys[:1], [0, 64], 2**31)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.fedsrd.seeded_count(keys.int(), [0, 32, 64], 2**31)
    with pytest.raises(RuntimeError, match="offsets"):
        torch.ops.fedsrd.seeded_compact(torch.zeros(64, device=DEVICE), torch.zeros(3, dtype=torch.int64,
                                        device=DEVICE), [0, 32, 16, 64], 2**31)
    with pytest.raises(RuntimeError, match="offsets must start at 0"):
        torch.ops.fedsrd.seeded_compact(torch.zeros(64, device=DEVICE), keys[:1], [0, 63], 2**31)
    with pytest.raises(RuntimeError, match="threshold"):
        torch.ops.fedsrd.seeded_count(keys[:1], [0, 4], 2**32)
    with pytest.raises(ConfigError):
        cuda_ops.dare_compact_cuda(torch.zeros(64), [0, 64], [1], 0.5)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("drop", [0.0, 0.5, 0.8, 0.999])
def test_seeded_count_matches_cpu(size, drop):
    names = [f"layers.{i}.lora_B.weight" for i in range(3)]
    keys = [mask_key(SEED, ROUND, n) for n in names]
    sizes = [size, 0, size // 3 + 1]
    got = cuda_ops.seeded_count_cuda(_offsets(sizes), keys, drop, DEVICE)
    assert got == [int(seeded_keep_mask(n, k, drop).sum()) for n, k in zip(sizes, keys)]


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


def test_seeded_expand_add_names_a_tensor_whose_count_is_wrong():
    """Counts that are off in opposite directions keep the total: only the per-tensor check sees them."""
    offsets = _offsets([4097, 33, 100])
    names = ["a.lora_B.weight", "b.lora_B.weight", "c.lora_B.weight"]
    keys = [mask_key(SEED, ROUND, n) for n in names]
    counts = cuda_ops.seeded_count_cuda(offsets, keys, 0.5, DEVICE)
    factor = torch.zeros(offsets[-1], device=DEVICE)
    values = torch.zeros(sum(counts), device=DEVICE)
    wrong = [counts[0] + 1, counts[1] - 1, counts[2]]
    with pytest.raises(SeededCountError, match="'a.lora_B.weight'"):
        cuda_ops.seeded_expand_add_cuda(factor, offsets, values, keys, 0.5, [2.0] * 3, counts=wrong, names=names)
    with pytest.raises(RuntimeError, match="keep"):  # the op itself checks the total
        cuda_ops.seeded_expand_add_cuda(factor, offsets, values[1:], keys, 0.5, [2.0] * 3)


def test_apply_on_cuda_matches_torch_and_refuses_a_forged_count():
    """server.apply on the cuda backend (one grouped launch) against the torch reference, bit for bit."""
    import fedsrd_kernels as fk
    from tests.helpers import lora_state, perturbed

    gen = seeded_gen("apply on cuda")
    g = lora_state([(33, 17), (8, 40), (4097, 3)], 3, gen=gen)
    ups = [fk.sparsify(perturbed(g, 0.05, gen=gen), g) for _ in range(2)]
    broadcast = fk.decode(fk.encode(fk.Aggregator("fedsrd").aggregate(g, ups, round=1)))
    on_device = {k: v.to(DEVICE) for k, v in g.items()}
    want = fk.apply(g, broadcast, backend="torch")
    got = fk.apply(on_device, broadcast, backend="cuda")
    for key in g:
        assert_bitwise_equal(got[key], want[key])
    key = next(k for k, s in broadcast.deltas.items() if s.is_seeded)
    forged = {**broadcast.deltas, key: broadcast.deltas[key].with_values(broadcast.deltas[key].values[1:])}
    with pytest.raises(SeededCountError, match=repr(key)):
        fk.apply(on_device, dataclasses.replace(broadcast, deltas=forged), backend="cuda")


def test_seeded_ops_match_triton():
    triton = pytest.importorskip("triton")  # noqa: F841
    from fedsrd_kernels.kernels.download.triton import dare_compact_grouped_triton, seeded_expand_add_grouped_triton

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
    keys = torch.tensor([mask_key(SEED, ROUND, f"o{i}") for i in range(3)], device=DEVICE)
    threshold = 2**31
    seeded_kept = torch.ops.fedsrd.seeded_compact(values, keys, offsets, threshold)[1]
    scales = torch.tensor([1.0, 2.0, 0.5], device=DEVICE)
    return [
        (torch.ops.fedsrd.seeded_count.default, (keys, offsets, threshold)),
        (torch.ops.fedsrd.seeded_compact.default, (values, keys, offsets, threshold)),
        (torch.ops.fedsrd.seeded_expand_add.default, (values, seeded_kept, keys, scales, offsets, threshold)),
    ]


@pytest.mark.parametrize("case", range(3))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)
