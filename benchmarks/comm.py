"""Bytes per client per round on the wire, next to the paper's accounting.

Llama-3.2-3B with LoRA r = 64 on all 7 linear modules of 28 layers (97,255,424
LoRA parameters). Upload: a client's SparseUpdate keeping 5.2% of every A and
B (``sparsify`` with base 0.948 and no kurtosis term). Download: the round's
Broadcast, one factor per pair (B in odd rounds, A in even ones) with 80%
dropped at the seeded positions. Values are synthetic Gaussians of std 1e-3.

The paper counts 4 bytes per value plus a 1-bit-per-element bitmap, in MiB
("MB"): upload 31, download 43 (half the parameters), round trip 74, FedAvg
742 = 2 x 97,255,424 x 4 bytes / 2**20.

    python benchmarks/comm.py           # full model (~1 min, ~3 GB of memory)
    python benchmarks/comm.py --small   # 2 layers
    python benchmarks/comm.py --layers 1  # 1 layer (the GPU run's dry run, benchmarks/gpu/run.py)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not
from fedsrd_kernels.client import sparsify  # noqa: E402
from fedsrd_kernels.config import SparsifyConfig  # noqa: E402
from fedsrd_kernels.kernels.download.reference import seeded_keep_indices  # noqa: E402
from fedsrd_kernels.updates import Broadcast, SeededMask, SparseTensor, SparseUpdate  # noqa: E402
from fedsrd_kernels.wire import MiB, comm_cost, decode, encode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_shapes import LLAMA_3B, LLAMA_3B_LORA_PARAMS  # noqa: E402
from llama_shapes import lora_shapes as llama_lora_shapes  # noqa: E402

LAYERS, RANK = LLAMA_3B["layers"], LLAMA_3B["rank"]
UPLOAD_CONFIG = SparsifyConfig(base=0.948, coeff=0.0, upper=0.0)  # keeps ~5.2% of every matrix
DOWNLOAD_DROP = 0.8
PAPER_MIB = {"upload": 31.0, "download": 43.0, "round trip": 74.0, "FedAvg": 742.0}


def lora_shapes(layers: int) -> dict[str, tuple[int, int]]:
    """PEFT keys -> shapes of the first ``layers`` layers."""
    return llama_lora_shapes(**{**LLAMA_3B, "layers": layers})


def synthetic_upload(shapes: dict[str, tuple[int, int]], generator: torch.Generator) -> SparseUpdate:
    """A client's update: global factors of realistic scale, local = global + N(0, 1e-3) deltas."""
    global_state, local_state = {}, {}
    for key, shape in shapes.items():
        fan_in = shape[1] if key.endswith("lora_A.weight") else RANK
        global_state[key] = torch.randn(shape, generator=generator) / fan_in**0.5
        local_state[key] = global_state[key] + 1e-3 * torch.randn(shape, generator=generator)
    return sparsify(local_state, global_state, UPLOAD_CONFIG, num_samples=1000, round=1, client_id="client-0")


def synthetic_download(shapes: dict[str, tuple[int, int]], round: int, generator: torch.Generator
                       ) -> Broadcast:
    """The round's broadcast: the moved factor of every pair (B when ``round`` is odd), DARE-dropped."""
    factor = "lora_B.weight" if round % 2 else "lora_A.weight"
    deltas, moved = {}, {}
    for key, shape in shapes.items():
        if not key.endswith(factor):
            continue
        numel = shape[0] * shape[1]
        kept = seeded_keep_indices(numel, seed=0, round=round, name=key, drop=DOWNLOAD_DROP)
        values = 1e-3 * torch.randn(kept.numel(), generator=generator)
        deltas[key] = SparseTensor(shape, values, scale=1.0 / (1.0 - DOWNLOAD_DROP),
                                   mask=SeededMask(0, round, key, DOWNLOAD_DROP))  # as Aggregator makes it
        moved[key.removesuffix("." + factor)] = factor[5]
    return Broadcast(round, "fedsrd", 0, DOWNLOAD_DROP, deltas, moved=moved, seeded=frozenset(deltas))


def with_dtype(obj, dtype: torch.dtype):
    """The same update or broadcast with its values cast to ``dtype``."""
    deltas = {k: s.with_values(s.values.to(dtype)) for k, s in obj.deltas.items()}
    if isinstance(obj, SparseUpdate):
        return SparseUpdate(deltas, obj.num_samples, obj.round, obj.client_id)
    return Broadcast(obj.round, obj.method, obj.seed, obj.download_drop, deltas, moved=obj.moved,
                     seeded=obj.seeded)


def measure(obj) -> dict[str, float]:
    """Encoded and paper-counted MiB, and encode / decode wall time."""
    start = time.perf_counter()
    payload = encode(obj)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    decode(payload)
    decode_s = time.perf_counter() - start
    cost = comm_cost(obj)
    assert cost.encoded_bytes == len(payload)
    return {"encoded": cost.encoded_mib, "values": cost.values_bytes / MiB,
            "positions": cost.positions_bytes / MiB, "paper": cost.paper_mib,
            "encode_s": encode_s, "decode_s": decode_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="2 layers instead of 28")
    parser.add_argument("--layers", type=int, default=None, help="this many layers (overrides --small)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    layers = args.layers or (2 if args.small else LAYERS)
    shapes = lora_shapes(layers)
    params = sum(a * b for a, b in shapes.values())
    assert params == LLAMA_3B_LORA_PARAMS * layers // LAYERS, params
    generator = torch.Generator().manual_seed(args.seed)
    print(f"Llama-3.2-3B LoRA r={RANK}, {layers} layers: {params:,} LoRA parameters "
          f"(fp32 {4 * params / MiB:.1f} MiB each way dense)")

    start = time.perf_counter()
    upload = synthetic_upload(shapes, generator)
    kept = sum(s.nnz for s in upload.deltas.values())
    print(f"upload: sparsify kept {kept:,} values ({100 * kept / params:.2f}%), "
          f"{time.perf_counter() - start:.1f} s")
    dtypes = (torch.float32, torch.bfloat16)
    rows = {"upload": [measure(with_dtype(upload, dt)) for dt in dtypes]}
    del upload
    for round_ in (1, 2):
        download = synthetic_download(shapes, round_, generator)
        rows[f"download r{round_} ({'B' if round_ % 2 else 'A'})"] = [
            measure(with_dtype(download, dt)) for dt in dtypes
        ]
        del download
    b_rows, a_rows = rows["download r1 (B)"], rows["download r2 (A)"]
    rows["download mean"] = [{k: (x[k] + y[k]) / 2 for k in x} for x, y in zip(b_rows, a_rows)]
    rows["round trip"] = [{k: x[k] + y[k] for k in x} for x, y in zip(rows["upload"], rows["download mean"])]
    paper_says = {"upload": 31, "download mean": 43, "round trip": 74}

    scale = LAYERS / layers
    note = "" if scale == 1 else f" ({layers} layers; x{scale:g} to 28 layers in brackets)"
    print(f"\nMiB per client per round{note}")
    print(f"{'':18} {'fp32 wire':>10} {'values':>8} {'pos':>6} {'bf16 wire':>10} {'paper-count':>11} "
          f"{'paper':>5} {'enc s':>6} {'dec s':>6}")
    for name, (f32, b16) in rows.items():
        says = paper_says.get(name, "")
        line = (f"{name:18} {f32['encoded']:10.2f} {f32['values']:8.2f} {f32['positions']:6.2f} "
                f"{b16['encoded']:10.2f} {f32['paper']:11.2f} {says:>5} {f32['encode_s']:6.2f} "
                f"{f32['decode_s']:6.2f}")
        if scale != 1:
            line += f"  [{f32['encoded'] * scale:.1f} / {b16['encoded'] * scale:.1f}]"
        print(line)
    (trip32, trip16), fedavg = rows["round trip"], 2 * 4 * LLAMA_3B_LORA_PARAMS / MiB
    print(f"\nround trip encoded: fp32 {trip32['encoded'] * scale:.1f} MiB (target <= 62), "
          f"bf16 {trip16['encoded'] * scale:.1f} MiB (target <= 33); paper-counted "
          f"{trip32['paper'] * scale:.1f} MiB (paper: 74); FedAvg dense fp32 {fedavg:.1f} MiB (paper: 742)")
    b_params = sum(a * b for k, (a, b) in shapes.items() if "lora_B" in k)
    print(f"enc s / dec s: fp32 encode / decode wall time. The paper's 43 MiB download counts half of all "
          f"parameters; B holds {b_params / params:.1%} of them, A the rest.")

if __name__ == "__main__":
    main()
