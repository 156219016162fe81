"""Every Triton kernel compiled and run on a CUDA device at the benchmarked shapes (Llama-3.2-3B, r = 64,
all 7 modules of all 28 layers in one grouped call) and at odd shapes, bit for bit against the torch
path on the CPU: sparsify's keep counts, positions, values and scales; the download's seeded
positions, values and applied factors; the server's stacked client factors.

GPU only (skipped without a CUDA device): the interpreter suites (tests/test_*_triton.py) check the
same contracts at tiny shapes on the CPU and on the device; these shapes are what the interpreter
cannot reach (grids of thousands of programs, a 97 M-element flat buffer, block loops of every
kernel). benchmarks/gpu/run.sh runs this file on the GPU machine.

Inputs are continuous Gaussians: a tie at a top-k threshold (the one documented case where Triton
may keep other positions than torch, same count) is then rare but not impossible at 97 M scores,
so a matrix whose reference has tied scores at its threshold is checked by the top-k rule instead.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU-only checks)")

pytest.importorskip("triton")

from benchmarks.llama_shapes import LLAMA_3B, MODULES, lora_shapes  # noqa: E402
from fedsrd_kernels.kernels._backend import cuda_extension_available  # noqa: E402
from fedsrd_kernels.kernels.download.reference import mask_key, seeded_keep_indices  # noqa: E402
from fedsrd_kernels.kernels.download.triton import (  # noqa: E402
    dare_compact_grouped_triton,
    seeded_expand_add_grouped_triton,
)
from fedsrd_kernels.kernels.reconstruct.reference import stack_client_factors  # noqa: E402
from fedsrd_kernels.kernels.reconstruct.triton import stack_client_factors_triton  # noqa: E402
from fedsrd_kernels.kernels.sparsify.triton import sparsify_grouped_triton  # noqa: E402
from fedsrd_kernels.server import Aggregator, apply  # noqa: E402
from tests.helpers import assert_bitwise_equal, seeded_gen  # noqa: E402
from tests.test_download_triton import _broadcast  # noqa: E402
from tests.test_reconstruct_triton import _on_device, client_updates, root_weights  # noqa: E402
from tests.test_sparsify_triton import assert_valid_top_k, make_pair, matrices, reference  # noqa: E402

DEVICE = "cuda"
SEED, ROUND = 2024, 3
RANK, LAYERS = LLAMA_3B["rank"], LLAMA_3B["layers"]
DIMS = {"hidden": LLAMA_3B["hidden"], "intermediate": LLAMA_3B["intermediate"], "kv": LLAMA_3B["kv"]}
# (r, d_in, d_out) of one layer, module by module, as sparsify's pairs are built.
LAYER = [(RANK, DIMS[d_in], DIMS[d_out]) for d_in, d_out in MODULES.values()]
# Around the 4096-element blocks and tiles, 1-wide factors, a prime rank, sizes past 2**20.
ODD = [(1, 1, 1), (3, 4097, 5), (7, 1023, 4095), (64, 4096 + 1, 1), (17, 1, 65_537), (64, 3071, 1025), (2, 5, 3)]


def _layers(layers: int) -> list[tuple[int, int, int]]:
    return LAYER * layers


def _check_sparsify(got, pairs) -> int:
    """Bit-identical to the reference per matrix, except where the reference has tied scores at its
    threshold: there, the same count and a valid top-k of the same deltas. Returns the tied count."""
    want = reference(pairs)
    assert len(got) == len(want) == 2 * len(pairs)
    tied = 0
    for j, ((delta, scores), kept, ref) in enumerate(zip(matrices(pairs), got.split(), want)):
        if ref is None:
            assert kept is None, j
            continue
        assert kept is not None and got.keep_counts[j] == ref.nnz, j
        indices, values, scale = kept
        indices, values = indices.cpu(), values.cpu()
        flat = scores.flatten()
        dropped = torch.ones(flat.numel(), dtype=torch.bool)
        dropped[ref.indices] = False
        if bool(dropped.any()) and float(flat[ref.indices].min()) == float(flat[dropped].max()):
            tied += 1
            assert_valid_top_k(indices, values, delta, scores, ref.nnz)
            continue
        assert torch.equal(indices, ref.indices), j
        assert_bitwise_equal(values, ref.values)
        assert abs(scale - ref.scale) <= np.spacing(np.float32(ref.scale)), (j, scale, ref.scale)  # 1 ulp
    return tied


@pytest.mark.parametrize("shapes", ["llama", "odd"])
def test_sparsify_grouped_matches_torch(shapes):
    gen = seeded_gen("gpu sparsify", shapes)
    layout = _layers(LAYERS) if shapes == "llama" else ODD
    pairs = [make_pair(gen, *s) for s in layout]
    got = sparsify_grouped_triton([tuple(t.to(DEVICE) for t in p) for p in pairs])
    tied = _check_sparsify(got, pairs)
    assert tied <= len(got) // 10, f"{tied} of {len(got)} matrices tied at the threshold: inputs not continuous?"


def _flat(shapes, gen, dtype):
    tensors = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    offsets = [0]
    for t in tensors:
        offsets.append(offsets[-1] + t.numel())
    return tensors, offsets


@pytest.mark.parametrize("shapes", ["llama", "odd"])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
def test_download_round_trip_matches_torch(shapes, value_dtype):
    """Grouped compaction (positions, values) and expand-add (the applied factor) against the
    Aggregator's download and ``apply`` on the CPU, over the moved factor of every pair."""
    drop = 0.8
    if shapes == "llama":  # plain "adapter" keys: apply() then needs no lora_A partner per key
        table = {k.replace("lora_B.weight", "adapter"): s
                 for k, s in lora_shapes(**DIMS, layers=LAYERS, rank=RANK).items() if "lora_B" in k}
    else:
        table = {f"model.layers.{i}.mlp.proj.adapter": (d_out, r) for i, (r, _, d_out) in enumerate(ODD)}
    names = list(table)
    gen = seeded_gen("gpu download", shapes, value_dtype)
    deltas, offsets = _flat(table.values(), gen, torch.float64)
    factors, _ = _flat(table.values(), gen, torch.float32)
    keys = [mask_key(SEED, ROUND, n) for n in names]
    flat_delta = torch.cat([d.flatten() for d in deltas]).to(DEVICE)
    indices, values, value_offsets = dare_compact_grouped_triton(flat_delta, offsets, keys, drop, value_dtype)
    indices, values_cpu = indices.cpu(), values.cpu()

    server = Aggregator("fedsrd", download_drop=drop, seed=SEED, value_dtype=str(value_dtype).split(".")[1])
    sparse = {}
    for name, delta, lo, hi in zip(names, deltas, value_offsets, value_offsets[1:]):
        sparse[name] = server._download(name, delta, ROUND)
        kept = seeded_keep_indices(delta.numel(), seed=SEED, round=ROUND, name=name, drop=drop)
        assert torch.equal(indices[lo:hi], kept), name
        assert_bitwise_equal(values_cpu[lo:hi], sparse[name].values)

    flat_factor = torch.cat([f.flatten() for f in factors]).to(DEVICE)
    scales = [sparse[n].scale for n in names]
    out = seeded_expand_add_grouped_triton(flat_factor, offsets, values, keys, drop, scales).cpu()
    expected = apply(dict(zip(names, factors)), _broadcast(sparse, drop))
    for name, factor, lo, hi in zip(names, factors, offsets, offsets[1:]):
        assert_bitwise_equal(out[lo:hi].view(factor.shape), expected[name])

    if cuda_extension_available():  # the compiled ops at the same shapes, against the Triton kernels
        from fedsrd_kernels.kernels.download import cuda as cuda_ops

        mine = cuda_ops.dare_compact_cuda(flat_delta, offsets, keys, drop, value_dtype)
        assert torch.equal(mine[0].cpu(), indices) and mine[2] == value_offsets
        assert_bitwise_equal(mine[1], values_cpu)
        assert_bitwise_equal(cuda_ops.seeded_expand_add_cuda(flat_factor, offsets, values, keys, drop, scales), out)


@pytest.mark.parametrize("shapes", ["llama", "odd"])
def test_reconstruct_matches_torch(shapes):
    """The server's stacked factors (4 clients at 5.2 % density, wire dtypes cycling, one dense and
    one absent upload) for both factors of one Llama layer, or of the odd shapes."""
    gen = seeded_gen("gpu reconstruct", shapes)
    layout = LAYER if shapes == "llama" else ODD
    m = 4
    roots = root_weights(m, gen)
    for r, d_in, d_out in layout:
        for factor, shape in (("A", (r, d_in)), ("B", (d_out, r))):
            base = torch.randn(shape, generator=gen)
            updates = client_updates(shape, m, 0.052, gen, dense_client=1, none_client=2)
            expected = stack_client_factors(base, updates, roots, factor=factor)
            got = stack_client_factors_triton(base.to(DEVICE), _on_device(updates), roots, factor=factor)
            assert_bitwise_equal(got, expected)
