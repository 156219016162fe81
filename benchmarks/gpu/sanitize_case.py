"""One tiny call of every CUDA op (kernels/download/cuda.py) and, with --triton, of every Triton kernel
family, for ``compute-sanitizer`` to watch:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python benchmarks/gpu/sanitize_case.py [--triton]

Tensor boundaries sit off every alignment (sizes 1, 33, 4097, an empty tensor) so that a kernel reading
past its tensor's end, or past the buffer, touches memory the caching allocator would otherwise hide
(hence PYTORCH_NO_CUDA_MEMORY_CACHING=1: each tensor gets its own allocation). Results are compared
with the torch path too, so a run that the sanitizer passes still fails on a wrong answer.

Without a CUDA device, the Triton part runs on the CPU in Triton's interpreter (a check of this
script, not of memory) and the CUDA ops are reported as skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # runs from a checkout, installed or not

from fedsrd_kernels.kernels._backend import cuda_extension_available, cuda_extension_status  # noqa: E402
from fedsrd_kernels.kernels.download.reference import mask_key, seeded_keep_indices  # noqa: E402

SIZES = [33, 0, 4097, 1]
SEED, ROUND, DROP = 7, 2, 0.8


def group(device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    offsets = [0]
    for n in SIZES:
        offsets.append(offsets[-1] + n)
    keys = [mask_key(SEED, ROUND, f"t{i}") for i in range(len(SIZES))]
    flat = torch.randn(offsets[-1], generator=gen, dtype=dtype).to(device)
    return flat, offsets, keys


def expected_positions(offsets) -> list[torch.Tensor]:
    return [seeded_keep_indices(b - a, seed=SEED, round=ROUND, name=f"t{i}", drop=DROP)
            for i, (a, b) in enumerate(zip(offsets, offsets[1:]))]


def cuda_ops() -> None:
    from fedsrd_kernels.kernels.download import cuda as ops

    flat, offsets, keys = group("cuda")
    want = expected_positions(offsets)
    counts = ops.seeded_count_cuda(offsets, keys, DROP, "cuda")
    assert counts == [w.numel() for w in want], (counts, [w.numel() for w in want])
    indices, values, value_offsets = ops.dare_compact_cuda(flat, offsets, keys, DROP)
    got = torch.cat([indices[lo:hi].cpu() for lo, hi in zip(value_offsets, value_offsets[1:])])
    assert torch.equal(got, torch.cat(want)), "seeded_compact positions differ from the reference"
    out = ops.seeded_expand_add_cuda(flat, offsets, values, keys, DROP, [2.0] * len(SIZES), counts=counts)
    torch.cuda.synchronize()
    assert out.shape == flat.shape
    print(f"cuda ops: seeded_count, seeded_compact, seeded_expand_add ran on {SIZES} ({sum(SIZES)} elements)")


def triton_kernels(device: str) -> None:
    from fedsrd_kernels.kernels.download.triton import dare_compact_grouped_triton, seeded_expand_add_grouped_triton
    from fedsrd_kernels.kernels.reconstruct.reference import stack_client_factors
    from fedsrd_kernels.kernels.reconstruct.triton import stack_client_factors_triton
    from fedsrd_kernels.kernels.sparsify.reference import sparsify_grouped_torch
    from fedsrd_kernels.kernels.sparsify.triton import sparsify_grouped_triton
    from fedsrd_kernels.updates import SparseTensor

    flat, offsets, keys = group(device)
    indices, values, value_offsets = dare_compact_grouped_triton(flat, offsets, keys, DROP)
    got = torch.cat([indices[lo:hi].cpu() for lo, hi in zip(value_offsets, value_offsets[1:])])
    assert torch.equal(got, torch.cat(expected_positions(offsets))), "Triton compaction differs from the reference"
    seeded_expand_add_grouped_triton(flat, offsets, values, keys, DROP, [2.0] * len(SIZES))

    gen = torch.Generator().manual_seed(1)
    shapes = [(3, 33), (5, 1), (1, 7)]  # (r, d_in); d_out = d_in + 2
    pairs = []
    for r, d_in in shapes:
        a, b = torch.randn(r, d_in, generator=gen), torch.randn(d_in + 2, r, generator=gen)
        step_a, step_b = torch.randn(a.shape, generator=gen), torch.randn(b.shape, generator=gen)
        pairs.append((a, b, a + 0.1 * step_a, b + 0.1 * step_b))
    mine = sparsify_grouped_triton([tuple(t.to(device) for t in p) for p in pairs])
    want = sparsify_grouped_torch(pairs)
    assert mine.keep_counts == want.keep_counts, (mine.keep_counts, want.keep_counts)

    base = torch.randn(33, 3, generator=gen)
    idx = torch.tensor([0, 5, 98])
    updates = [SparseTensor((33, 3), torch.randn(3, generator=gen), idx, scale=1.5), None]
    on_dev = [SparseTensor((33, 3), updates[0].values.to(device), idx.to(device), scale=1.5), None]
    got = stack_client_factors_triton(base.to(device), on_dev, [0.5, 0.5], factor="B")
    assert torch.equal(got.cpu(), stack_client_factors(base, updates, [0.5, 0.5], factor="B"))
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"triton kernels on {device}: download compact + expand-add, sparsify pipeline, reconstruct fill + scatter")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton", action="store_true", help="also run every Triton kernel family once")
    parser.add_argument("--no-cuda-ops", action="store_true", help="skip the compiled ops (Triton only)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.no_cuda_ops:
        if device == "cuda" and cuda_extension_available():
            cuda_ops()
        else:
            print(f"cuda ops: skipped (CUDA device: {device == 'cuda'}; extension: {cuda_extension_status()})")
    if args.triton:
        triton_kernels(device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
