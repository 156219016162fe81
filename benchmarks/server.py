"""Server round time: the plain dense path vs the package's factored paths, side by side.

    python benchmarks/server.py            # reduced Llama-3.2-3B shapes on CPU, full shapes on a GPU
    python benchmarks/server.py --full     # full shapes wherever it runs
    python benchmarks/server.py --json benchmarks/results/server_cpu.json
    python benchmarks/server.py --square 1024 --pairs 4 --rank 16 --clients 8   # the server check's shapes

Per client count it prints the time per round of each path (median of --repeats;
CUDA events on a GPU), the speed-up over the plain path, GB/s (the bytes a round
must move at least: every upload read, B and A read, the moved factor's delta
written) against the copy bandwidth measured in the same run, the peak GPU memory,
and the relative Frobenius error of the moved factor's delta against a float64
dense oracle on a sample of layers. Then it streams 4 and --stream-clients clients
and prints the stream's memory.

The plain way (dense W, full SVD, pinv per pair) can be timed on the first
--plain-layers layers and scaled to the whole model (each layer costs it the same);
the rows say so. The package's paths always run the whole model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_shapes import LLAMA_3B, pair_shapes  # noqa: E402
from machine import cpu_model  # noqa: E402
from plain import plain_server_pair  # noqa: E402
from timing import copy_bandwidth, peak_mib, synchronize, time_ms  # noqa: E402

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
    """The round's global state and ``clients`` sparsified uploads, made on ``device`` (the sparsify of 64
    full-size clients takes minutes on a CPU, well under a second on a GPU)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device)

    state = {}
    for prefix, d_out, d_in in shapes:
        state[f"{prefix}.lora_A.weight"] = randn(rank, d_in) / d_in**0.5
        state[f"{prefix}.lora_B.weight"] = randn(d_out, rank) * 1e-2
    updates = [fk.sparsify({k: v + 1e-3 * randn(*v.shape) for k, v in state.items()}, state)
               for _ in range(clients)]
    return state, updates


def round_bytes(state, updates, shapes, move) -> int:
    """What any server round must move at least: every upload read (values and indices as they are stored),
    B and A read, the moved factor's delta written."""
    uploads = sum(t.numel() * t.element_size() for u in updates for s in u.deltas.values()
                  for t in (s.values, s.indices) if t is not None)
    factors = sum(t.numel() * t.element_size() for t in state.values())
    moved = sum(state[f"{prefix}.lora_{'B' if move == 'B' else 'A'}.weight"].numel() * 4 for prefix, _, _ in shapes)
    return uploads + factors + moved


def timed(fn, repeats, device):
    """(median ms, peak GPU MiB or None, the output of the first call): the first call is the warm-up and
    gives the output the oracle checks; timing.time_ms times the rest (CUDA events on a GPU)."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    ms = time_ms(fn, device, warmup=0, repeats=repeats)
    return ms, peak_mib(device), out


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


def oracle_wants(state, updates, sample, rank, truncate, round_) -> dict:
    """The moved factor's delta of each sampled pair from the dense float64 oracle, once per round: the paths
    are all held to the same answer (its dense SVDs are the slowest part of the benchmark at full size)."""
    wants = {}
    for prefix, _, _ in sample:
        a_key, b_key = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
        d_b = [oracle.f64(u.deltas[b_key].to_dense()) if b_key in u.deltas else 0.0 for u in updates]
        d_a = [oracle.f64(u.deltas[a_key].to_dense()) if a_key in u.deltas else 0.0 for u in updates]
        b, a = oracle.f64(state[b_key]), oracle.f64(state[a_key])
        eps32 = np.finfo(np.float32).eps
        move, want = oracle.server_pair(b, a, d_b, d_a, [1.0] * len(updates), round_, rank if truncate else None,
                                        max(1e-2, max(b.shape) * eps32), max(1e-2, max(a.shape) * eps32))
        wants[b_key if move == "B" else a_key] = want
    return wants


def worst_error(got: dict, wants: dict) -> float:
    """Worst relative Frobenius error over the sampled pairs."""
    return max(float(np.linalg.norm(oracle.f64(got[key]) - want) / np.linalg.norm(want))
               for key, want in wants.items())


def result_row(method, clients, path, ms, peak, error, baseline_ms, nbytes, copy_gbs, **more) -> dict:
    gbs = nbytes / ms / 1e6
    return dict(method=method, clients=clients, path=path, seconds=ms / 1e3,
                speedup=None if baseline_ms is None else baseline_ms / ms, error=error, bytes=nbytes, gbs=gbs,
                of_copy=gbs / copy_gbs, peak_mib=peak, **more)


def package_round(agg, state, updates, round_):
    bcast = agg.aggregate(state, updates, round=round_)
    return {k: s.to_dense() for k, s in bcast.deltas.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full Llama-3.2-3B shapes even on CPU")
    parser.add_argument("--clients", default="4,16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain-max-clients", type=int, default=64, help="skip the dense path above this")
    parser.add_argument("--plain-layers", type=int, default=None,
                        help="time the plain path on this many layers' pairs and scale to the model (default: all)")
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
    pairs_per_layer = 1 if args.square else 7
    plain_shapes = shapes[:pairs_per_layer * args.plain_layers] if args.plain_layers else shapes
    plain_scale = len(shapes) / len(plain_shapes)  # every layer costs the plain path the same
    params = sum((o + i) * rank for _, o, i in shapes)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({cpu_model()}, " \
        f"{torch.get_num_threads()} threads)"
    kind = f"{args.square} x {args.square}" if args.square else f"{'full' if full else 'reduced'} Llama-3.2-3B"
    copy_gbs = copy_bandwidth(device, mib=1024 if device.type == "cuda" else 64, repeats=5)
    print(f"device: {name}; torch {torch.__version__}; {kind} shapes: {len(shapes)} pairs, r={rank}, "
          f"{params:,} LoRA parameters; copy bandwidth {copy_gbs:.1f} GB/s")
    if plain_scale != 1:
        print(f"the plain path runs {len(plain_shapes)} of the {len(shapes)} pairs; its times are scaled by "
              f"{plain_scale:g}")
    def save(rows, stream_rows):
        """The --json file, rewritten after every client count: a step killed by its timeout keeps what it measured."""
        if not args.json:
            return
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                                         "command": "python " + " ".join(sys.argv), "full_shapes": full,
                                         "pairs": len(shapes), "rank": rank, "oracle_pairs": len(sample),
                                         "plain_pairs": len(plain_shapes), "copy_gbs": copy_gbs,
                                         "rounds": rows, "stream": stream_rows}, indent=1))

    sample = plain_shapes[:max(1, args.sample)]  # the first 7: one of each module (the plain path's too)
    round_ = 2
    move = scheduled_factor(round_)
    rows = []
    for clients in [int(c) for c in args.clients.split(",")]:
        state, updates = make_round(shapes, rank, clients, device)
        nbytes = round_bytes(state, updates, shapes, move)
        for method, paths in (("fedsrd", ("auto", "exact", "randomized", "reference")),
                              ("fedsrd-e", ("delta", "reference"))):
            truncate = method == "fedsrd"
            wants = oracle_wants(state, updates, sample, rank, truncate, round_)

            plain_ms = None
            if clients <= args.plain_max_clients:
                ms, peak, out = timed(lambda s=state, u=updates, t=truncate: plain_round(s, u, plain_shapes, rank, t,
                                                                                         round_),
                                      args.repeats, device)
                plain_ms = ms * plain_scale
                rows.append(result_row(method, clients, "plain dense fp32", plain_ms, peak, worst_error(out, wants),
                                       plain_ms, nbytes, copy_gbs, plain_pairs=len(plain_shapes),
                                       plain_scale=plain_scale))
            for path in paths:
                agg = fk.Aggregator(method, path=path, download_drop=0.0)
                ms, peak, out = timed(lambda agg=agg, s=state, u=updates: package_round(agg, s, u, round_),
                                      args.repeats, device)
                residuals = agg.last_report.residuals.values()
                rows.append(result_row(method, clients, path, ms, peak, worst_error(out, wants), plain_ms, nbytes,
                                       copy_gbs, residual=max(residuals) if residuals else None))
        del state, updates
        save(rows, [])
    print(f"\n{'method':9} {'clients':>7} {'path':17} {'ms/round':>10} {'speed-up':>9} {'GB/s':>7} {'% copy':>7} "
          f"{'peak MiB':>9} {'err vs f64':>11} {'range resid':>11}")
    for r in rows:
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        resid = "-" if r.get("residual") is None else f"{r['residual']:.1e}"
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        scaled = f"  (scaled x{r['plain_scale']:g})" if r.get("plain_scale", 1) != 1 else ""
        print(f"{r['method']:9} {r['clients']:>7} {r['path']:17} {r['seconds'] * 1e3:>10.1f} {speed:>9} "
              f"{r['gbs']:>7.1f} {100 * r['of_copy']:>6.1f}% {peak:>9} {r['error']:>11.1e} {resid:>11}{scaled}")

    stream_rows = []
    for clients in (4, args.stream_clients):
        state, updates = make_round(shapes, rank, 4, device, seed=1)
        for method in ("fedsrd-e", "fedsrd"):
            agg = fk.Aggregator(method, download_drop=0.0)
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            stream = agg.stream(state, round=round_)
            for i in range(clients):
                stream.add(updates[i % 4])
            stream.finish()
            synchronize(device)
            seconds = time.perf_counter() - start
            held = sum(t.numel() * t.element_size() for g in stream._groups
                       for t in (g.b, g.a, g.sum_d_b, g.sum_d_a, *g.extra.values()))
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            stream_rows.append(dict(method=method, clients=clients, seconds=seconds, stream_bytes=held, peak=peak))
    print(f"\n{'stream':9} {'clients':>7} {'s/round':>9} {'accumulators MiB':>17} {'peak GPU MiB':>13}")
    for r in stream_rows:
        peak = "-" if r["peak"] is None else f"{r['peak'] / 2**20:.0f}"
        print(f"{r['method']:9} {r['clients']:>7} {r['seconds']:>9.2f} {r['stream_bytes'] / 2**20:>17.1f} "
              f"{peak:>13}")
    save(rows, stream_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
