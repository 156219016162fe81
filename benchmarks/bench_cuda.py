"""The compiled CUDA ops (csrc/) next to torch and Triton on Llama-3.2-3B r=64 shapes (392 matrices).

One op family, over the whole model in one grouped call, results checked equal before timing
(the bitmap codec and the segmented top-k threshold this also timed were deleted: nothing in
production called them; benchmarks/bench_sparsify.py times the Triton select against torch):
  seeded     the download: compaction under the Philox mask, and the expand-add
             torch: numpy Philox on the CPU + gather (as Aggregator does);  Triton: kernels/download/triton.py

GB/s counts the bytes an op must move at least, over the device's measured copy bandwidth.

    python benchmarks/bench_cuda.py [--drop 0.8] [--repeats 20]

Needs a CUDA device (prints why and exits otherwise); the CUDA column needs the extension
(FEDSRD_BUILD_CUDA=1 pip install -e . --no-build-isolation) and reads "n/a" without it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))

SEED, ROUND = 0, 1


def _bench(rows, name, fn, nbytes, kw):
    from timing import measure

    ms, peak = measure(fn, **kw)
    rows.append((name, ms, nbytes, peak))


def _print(title: str, rows, peak_gbs: float, tables: list[dict]) -> None:
    """Prints the table and keeps it for --json (speed-ups over its first row, as printed)."""
    from bench_download import report
    from timing import json_table

    print(f"\n{title}")
    report(rows, rows[0][1], peak_gbs)
    tables.append(json_table(title, rows, rows[0][1], peak_gbs, baseline=rows[0][0]))


def bench_seeded(shapes, args, device, peak_gbs, have_cuda) -> list[dict]:
    from fedsrd_kernels.kernels.download import cuda as cuda_ops
    from fedsrd_kernels.kernels.download.reference import mask_key, seeded_keep_indices
    from fedsrd_kernels.kernels.download.triton import dare_compact_grouped_triton, seeded_expand_add_grouped_triton

    names = list(shapes)
    keys = [mask_key(SEED, ROUND, name) for name in names]
    offsets = [0]
    for r, c in shapes.values():
        offsets.append(offsets[-1] + r * c)
    n, drop = offsets[-1], args.drop
    gen = torch.Generator(device=device).manual_seed(1)
    flat = torch.randn(n, device=device, generator=gen) * 1e-3
    factor = torch.randn(n, device=device, generator=gen)
    scales = [1.0 / (1.0 - drop)] * len(names)
    kw = {"device": device, "warmup": 2, "repeats": args.repeats}

    def torch_compact():
        return [flat[a:b][seeded_keep_indices(b - a, seed=SEED, round=ROUND, name=name, drop=drop).to(device)]
                for name, a, b in zip(names, offsets, offsets[1:])]

    indices, values, _ = dare_compact_grouped_triton(flat, offsets, keys, drop)
    kept_n = values.numel()
    compact_bytes, expand_bytes = 4 * n * (1 - drop) + 12 * kept_n, 8 * n + 4 * kept_n
    rows = []
    _bench(rows, "torch (numpy Philox)", torch_compact, compact_bytes, {**kw, "warmup": 1, "repeats": 2})
    _bench(rows, "triton (grouped)", lambda: dare_compact_grouped_triton(flat, offsets, keys, drop), compact_bytes, kw)
    if have_cuda:
        mine = cuda_ops.dare_compact_cuda(flat, offsets, keys, drop)
        assert torch.equal(mine[0], indices) and torch.equal(mine[1], values), "CUDA compaction differs from Triton"
        _bench(rows, "cuda (grouped)", lambda: cuda_ops.dare_compact_cuda(flat, offsets, keys, drop), compact_bytes,
               kw)
    tables: list[dict] = []
    _print(f"seeded compaction (server download), drop {drop}", rows, peak_gbs, tables)

    rows = []
    _bench(rows, "triton (grouped)",
           lambda: seeded_expand_add_grouped_triton(factor, offsets, values, keys, drop, scales), expand_bytes, kw)
    if have_cuda:
        want = seeded_expand_add_grouped_triton(factor, offsets, values, keys, drop, scales)
        got = cuda_ops.seeded_expand_add_cuda(factor, offsets, values, keys, drop, scales)
        assert torch.equal(got, want), "CUDA expand-add differs from Triton"
        _bench(rows, "cuda (grouped)",
               lambda: cuda_ops.seeded_expand_add_cuda(factor, offsets, values, keys, drop, scales), expand_bytes, kw)
    _print("seeded expand-add (client apply)", rows, peak_gbs, tables)
    return tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drop", type=float, default=0.8, help="download drop rate")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the figures here (per way: ms, GB/s, speed-up, peak GPU MiB)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device here; this benchmark times GPU kernels only.")
        if args.json:  # a file saying so, that a reader of the merged report needs no log for
            Path(args.json).write_text(json.dumps({"benchmark": "bench_cuda", "device": None, "skipped": "no CUDA",
                                                   "tables": []}) + "\n")
        return

    from llama_shapes import LLAMA_3B, lora_shapes
    from timing import copy_bandwidth

    from fedsrd_kernels.kernels._backend import backend_info, cuda_extension_available

    device = torch.device("cuda")
    have_cuda = cuda_extension_available()
    info = backend_info()
    print(f"device: {info['cuda_device']}; torch {info['torch']}; CUDA extension: {info['cuda_extension_status']}")
    peak = copy_bandwidth(device, 1024, 10)
    print(f"copy bandwidth (read + write): {peak:.0f} GB/s")
    shapes = lora_shapes(**LLAMA_3B)
    tables = bench_seeded(shapes, args, device, peak, have_cuda)
    if args.json:
        from timing import write_json

        write_json(args.json, "bench_cuda", device, peak, tables, shapes="Llama-3.2-3B r=64 (llama_shapes.LLAMA_3B)",
                   parameters=sum(r * c for r, c in shapes.values()), matrices=len(shapes), drop=args.drop,
                   repeats=args.repeats, cuda_extension=info["cuda_extension_status"])


if __name__ == "__main__":
    main()
