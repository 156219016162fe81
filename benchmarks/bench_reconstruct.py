"""Stacked client factors (spec eq. 9): the torch reference vs the Triton kernels.

For every LoRA factor of the model, build Bc (d_out x m r) or Ac (m r x d_in)
from the global factor and m clients' sparse uploads (positions sorted,
``--density`` of the elements kept, ``--value-dtype`` values), as the server
does before its SVD. torch = ``reconstruct.stack_client_factors`` (a mul and
an ``index_add_`` per client); Triton = ``stack_client_factors_triton`` (one
fill launch and one scatter launch per factor).

GB/s counts the bytes that must move at least: read the base, write m blocks,
read each client's (index, value) pairs, and read-modify-write the positions
they touch; the reference is the device's measured copy bandwidth.

    python benchmarks/bench_reconstruct.py           # Llama-3.2-3B r=64, 4 clients, CUDA
    python benchmarks/bench_reconstruct.py --small   # reduced shapes; on CPU through Triton's interpreter
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_download import FULL, SMALL, lora_shapes, report  # noqa: E402  (sets TRITON_INTERPRET)
from timing import copy_bandwidth, json_table, measure, write_json  # noqa: E402

from fedsrd_kernels.kernels.reconstruct.reference import stack_client_factors  # noqa: E402
from fedsrd_kernels.kernels.reconstruct.triton import stack_client_factors_triton  # noqa: E402
from fedsrd_kernels.updates import SparseTensor  # noqa: E402


def random_upload(shape: tuple[int, int], density: float, dtype: torch.dtype, gen: torch.Generator, device):
    numel = shape[0] * shape[1]
    kept = torch.randperm(numel, generator=gen)[: max(1, round(density * numel))].sort().values
    values = (torch.randn(kept.numel(), generator=gen) * 1e-3).to(dtype)
    return SparseTensor(shape, values.to(device), kept.to(device), scale=1.1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="reduced shapes (2 layers, hidden 96, r 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--density", type=float, default=0.052, help="kept fraction of each upload")
    parser.add_argument("--value-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="stacked output dtype")
    parser.add_argument("--no-base", action="store_true", help="include_base=False (the delta form)")
    parser.add_argument("--warmup", type=int, default=None, help="default 3 on CUDA, 1 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default 10 on CUDA, 3 on CPU")
    parser.add_argument("--json", help="also write the figures here (per way: ms, GB/s, speed-up, peak GPU MiB)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (3 if on_cuda else 1)
    repeats = args.repeats if args.repeats is not None else (10 if on_cuda else 3)
    dims = SMALL if args.small else FULL
    shapes = lora_shapes(**dims)
    value_dtype, dtype = getattr(torch, args.value_dtype), getattr(torch, args.dtype)
    peak = copy_bandwidth(device, 1024 if on_cuda else 64, repeats)
    where = torch.cuda.get_device_name(device) if on_cuda else "CPU (Triton interpreted: not kernel speed)"
    print(f"device: {where}; copy bandwidth {peak:.1f} GB/s; dims {dims}; {args.clients} clients")

    gen = torch.Generator().manual_seed(0)
    m = args.clients
    roots = [(1.0 / m) ** 0.5] * m
    bases = {k: torch.randn(s, generator=gen).to(device) for k, s in shapes.items()}
    uploads = {
        k: [random_upload(s, args.density, value_dtype, gen, device) for _ in range(m)] for k, s in shapes.items()
    }
    factor = {k: "A" if k.endswith("lora_A.weight") else "B" for k in shapes}
    kwargs = {"include_base": not args.no_base, "dtype": dtype}

    def run(fn):
        return [fn(bases[k], uploads[k], roots, factor=factor[k], **kwargs) for k in shapes]

    for want, got in zip(run(stack_client_factors), run(stack_client_factors_triton)):
        assert torch.equal(want, got), "Triton stacking differs from the torch reference"
    numel = sum(b.numel() for b in bases.values())
    nnz = sum(u.nnz for ups in uploads.values() for u in ups)
    out_size = torch.empty((), dtype=dtype).element_size()
    nbytes = (
        numel * 4  # read the base (float32)
        + m * numel * out_size  # write m blocks
        + nnz * (8 + torch.empty((), dtype=value_dtype).element_size())  # read the (index, value) pairs
        + 2 * nnz * out_size  # read-modify-write of the touched positions
    )
    t_torch, m_torch = measure(lambda: run(stack_client_factors), device, warmup, repeats)
    t_triton, m_triton = measure(lambda: run(stack_client_factors_triton), device, warmup, repeats)
    print(f"{len(shapes)} factors, {numel:,} elements, {m} x {nnz // m:,} uploaded values per client")
    rows = [("torch reference", t_torch, nbytes, m_torch), ("triton", t_triton, nbytes, m_triton)]
    report(rows, t_torch, peak)
    if args.json:
        title = f"stack client factors, {m} clients, density {args.density}"
        write_json(args.json, "bench_reconstruct", device, peak,
                   [json_table(title, rows, t_torch, peak, baseline=rows[0][0])], dims=dims, parameters=numel,
                   factors=len(shapes), clients=m, uploaded_values=nnz, density=args.density,
                   value_dtype=args.value_dtype, dtype=args.dtype, include_base=not args.no_base, warmup=warmup,
                   repeats=repeats)


if __name__ == "__main__":
    main()
