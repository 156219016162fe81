"""Server round time: the plain dense path vs the package's factored paths, side by side.

    python benchmarks/server.py            # reduced Llama-3.2-3B shapes on CPU, full shapes on a GPU
    python benchmarks/server.py --full     # full shapes wherever it runs
    python benchmarks/server.py --json benchmarks/results/server_cpu.json
    python benchmarks/server.py --square 1024 --pairs 4 --rank 16 --clients 8   # the server check's shapes

Per client count it prints the time per round of each path (median of --repeats),
the speed-up over the plain path, and the relative Frobenius error of the moved
factor's delta against a float64 dense oracle on a sample of layers. Then it
streams 4 and 1,000 clients and prints the stream's memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_shapes import LLAMA_3B, pair_shapes  # noqa: E402
from machine import cpu_model  # noqa: E402
from plain import plain_server_pair  # noqa: E402

import fedsrd_kernels as fk  # noqa: E402
from fedsrd_kernels import oracle  # noqa: E402
from fedsrd_kernels.server.decompose import scheduled_factor  # noqa: E402


def square_shapes(d: int, pairs: int) -> list[tuple[str, int, int]]:
    """``pairs`` square d x d layers: the shapes of the server check (d = 1024, 4 pairs)."""
    return [(f"layers.{i}.q_proj", d, d) for i in range(pairs)]


def model_shapes(full: bool, layers: int | None = None) -> tuple[list[tuple[str, int, int]], int]:
    dims = dict(LLAMA_3B)
    if not full:  # CPU: every width / 4, 2 of 28 layers, r = 16 instead of 64
        dims = {k: (v // 4 if k in ("hidden", "intermediate", "kv") else v) for k, v in dims.items()}
        dims["layers"], dims["rank"] = 2, 16
    if layers:  # fewer (or more) layers of the same widths: a short GPU lease cannot run 28 of the dense path
        dims["layers"] = layers
    return pair_shapes(**dims), dims["rank"]


def make_round(shapes, rank, clients, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, d_out, d_in in shapes:
        state[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) / d_in**0.5
        state[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 1e-2
    updates = []
    for _ in range(clients):
        local = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        updates.append(fk.sparsify(local, state))
    move_to = {k: v.to(device) for k, v in state.items()}
    return move_to, [fk.SparseUpdate({k: fk.SparseTensor(s.shape, s.values.to(device),
                                                         None if s.indices is None else s.indices.to(device), s.scale)
                                      for k, s in u.deltas.items()}) for u in updates]




def timed(fn, repeats, device):
    """Median wall time of ``repeats`` calls after one untimed warm-up call."""
    fn()
    times, out = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def plain_round(state, updates, shapes, rank, truncate, round_):
    out = {}
    p = [1.0 / len(updates)] * len(updates)
    move = scheduled_factor(round_)
    for prefix, _, _ in shapes:
        a_key, b_key = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
        b, a = state[b_key], state[a_key]
        client_b = [b + u.deltas[b_key].to_dense().to(b.device) if b_key in u.deltas else b for u in updates]
        client_a = [a + u.deltas[a_key].to_dense().to(a.device) if a_key in u.deltas else a for u in updates]
        out[b_key if move == "B" else a_key] = plain_server_pair(b, a, client_b, client_a, p, truncate=truncate,
                                                                 move=move, rank=rank)
    return out


def oracle_errors(got: dict, state, updates, sample, rank, truncate, round_) -> float:
    """Worst relative error over the sampled pairs against the dense float64 oracle."""
    worst = 0.0
    for prefix, _, _ in sample:
        a_key, b_key = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
        d_b = [oracle.f64(u.deltas[b_key].to_dense()) if b_key in u.deltas else 0.0 for u in updates]
        d_a = [oracle.f64(u.deltas[a_key].to_dense()) if a_key in u.deltas else 0.0 for u in updates]
        b, a = oracle.f64(state[b_key]), oracle.f64(state[a_key])
        eps32 = np.finfo(np.float32).eps
        move, want = oracle.server_pair(b, a, d_b, d_a, [1.0] * len(updates), round_, rank if truncate else None,
                                        max(1e-2, max(b.shape) * eps32), max(1e-2, max(a.shape) * eps32))
        key = b_key if move == "B" else a_key
        have = oracle.f64(got[key])
        worst = max(worst, float(np.linalg.norm(have - want) / np.linalg.norm(want)))
    return worst


def package_round(agg, state, updates, round_):
    bcast = agg.aggregate(state, updates, round=round_)
    return {k: s.to_dense() for k, s in bcast.deltas.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full Llama-3.2-3B shapes even on CPU")
    parser.add_argument("--clients", default="4,16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain-max-clients", type=int, default=64, help="skip the dense path above this")
    parser.add_argument("--stream-clients", type=int, default=1000)
    parser.add_argument("--square", type=int, help="square d x d layers instead of Llama-3.2-3B's")
    parser.add_argument("--pairs", type=int, default=4, help="with --square: how many layers")
    parser.add_argument("--rank", type=int, default=16, help="with --square: the LoRA rank")
    parser.add_argument("--layers", type=int, help="Llama-3.2-3B shapes: this many layers (default 28 full, 2 reduced)")
    parser.add_argument("--sample", type=int, default=7,
                        help="pairs the float64 oracle checks (default 7: one of each module; its dense SVDs dominate)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full = args.full or device.type == "cuda"
    if args.square:
        shapes, rank = square_shapes(args.square, args.pairs), args.rank
    else:
        shapes, rank = model_shapes(full, args.layers)
    params = sum((o + i) * rank for _, o, i in shapes)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({cpu_model()}, " \
        f"{torch.get_num_threads()} threads)"
    kind = f"{args.square} x {args.square}" if args.square else f"{'full' if full else 'reduced'} Llama-3.2-3B"
    print(f"device: {name}; torch {torch.__version__}; {kind} shapes: {len(shapes)} pairs, r={rank}, "
          f"{params:,} LoRA parameters")
    sample = shapes[:max(1, args.sample)]  # the first 7: one of each module
    rows = []
    for clients in [int(c) for c in args.clients.split(",")]:
        state, updates = make_round(shapes, rank, clients, device)
        for method, paths in (("fedsrd", ("auto", "exact", "randomized", "reference")),
                              ("fedsrd-e", ("delta", "reference"))):
            truncate = method == "fedsrd"
            plain_s = None
            if clients <= args.plain_max_clients:
                plain_s, plain_out = timed(lambda s=state, u=updates, t=truncate: plain_round(s, u, shapes, rank, t, 2),
                                           args.repeats, device)
                err = oracle_errors(plain_out, state, updates, sample, rank, truncate, 2)
                rows.append(dict(method=method, clients=clients, path="plain dense fp32", seconds=plain_s,
                                 speedup=1.0, error=err))
            for path in paths:
                agg = fk.Aggregator(method, path=path, download_drop=0.0)
                seconds, out = timed(lambda agg=agg, s=state, u=updates: package_round(agg, s, u, 2),
                                     args.repeats, device)
                err = oracle_errors(out, state, updates, sample, rank, truncate, 2)
                residuals = agg.last_report.residuals.values()
                rows.append(dict(method=method, clients=clients, path=path, seconds=seconds,
                                 speedup=None if plain_s is None else plain_s / seconds, error=err,
                                 residual=max(residuals) if residuals else None))
    print(f"\n{'method':9} {'clients':>7} {'path':17} {'s/round':>9} {'speed-up':>9} {'err vs f64':>11} "
          f"{'range resid':>11}")
    for row in rows:
        speed = "-" if row["speedup"] is None else f"{row['speedup']:.1f}x"
        resid = "-" if row.get("residual") is None else f"{row['residual']:.1e}"
        print(f"{row['method']:9} {row['clients']:>7} {row['path']:17} {row['seconds']:>9.3f} {speed:>9} "
              f"{row['error']:>11.1e} {resid:>11}")

    stream_rows = []
    for clients in (4, args.stream_clients):
        state, updates = make_round(shapes, rank, 4, device, seed=1)
        for method in ("fedsrd-e", "fedsrd"):
            agg = fk.Aggregator(method, download_drop=0.0)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            stream = agg.stream(state, round=2)
            for i in range(clients):
                stream.add(updates[i % 4])
            stream.finish()
            seconds = time.perf_counter() - start
            held = sum(t.numel() * t.element_size() for g in stream._groups
                       for t in (g.b, g.a, g.sum_d_b, g.sum_d_a, *g.extra.values()))
            peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
            stream_rows.append(dict(method=method, clients=clients, seconds=seconds, stream_bytes=held, peak=peak))
    print(f"\n{'stream':9} {'clients':>7} {'s/round':>9} {'accumulators MiB':>17} {'peak GPU MiB':>13}")
    for row in stream_rows:
        peak = "-" if row["peak"] is None else f"{row['peak'] / 2**20:.0f}"
        print(f"{row['method']:9} {row['clients']:>7} {row['seconds']:>9.2f} {row['stream_bytes'] / 2**20:>17.1f} "
              f"{peak:>13}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                         "command": "python " + " ".join(sys.argv), "full_shapes": full,
                                         "pairs": len(shapes), "rank": rank, "oracle_pairs": len(sample),
                                         "rounds": rows, "stream": stream_rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
