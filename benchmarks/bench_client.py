"""The client's upload on CPU: the authors' per-matrix way against ``fk.sparsify``, side by side in one process.

The authors' way (the FedSRD reference code's recipe, one matrix at a time): eq. 6
scores, ``scipy.stats.kurtosis(fisher=False)`` for the ratio, ``torch.quantile`` for
the threshold, ``scores >= threshold`` as the keep mask, the L1 rescale. The
package's way is ``fk.sparsify(local, global)`` on the same PEFT state dicts,
validation included, on the torch backend (the CPU path). Both are timed alternately
(a, b, a, b, ...) so that a machine shared with other work slows both alike; the
table gives the median of each, the speed-up, and the GB/s of the local state read
(its bytes / the time).

    python benchmarks/bench_client.py                       # 2 layers of Llama-3.2-3B, r = 64, 1 thread
    python benchmarks/bench_client.py --threads 2 --layers 4
    python benchmarks/bench_client.py --profile             # also cProfile one fk.sparsify call
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not
import fedsrd_kernels as fk  # noqa: E402
from benchmarks.llama_shapes import LLAMA_3B, lora_shapes  # noqa: E402
from benchmarks.machine import cpu_model  # noqa: E402
from fedsrd_kernels.config import SparsifyConfig  # noqa: E402


def client_states(layers: int, rank: int, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(local, global) float32 PEFT state dicts of ``layers`` layers of Llama-3.2-3B at rank ``rank``.

    The global adapter is mid-training (A and B both non-zero); the local one moved from it by
    Student-t steps (3 degrees of freedom), heavier tailed than Gaussian, as trained deltas are.
    """
    gen = torch.Generator().manual_seed(seed)
    dims = {**LLAMA_3B, "layers": layers, "rank": rank}
    global_state, local_state = {}, {}
    for key, (rows, cols) in lora_shapes(**dims).items():
        fan_in = cols if key.endswith("lora_A.weight") else rank
        g = torch.randn(rows, cols, generator=gen) / fan_in**0.5
        normal = torch.randn(rows, cols, generator=gen)
        chi2 = sum(torch.randn(rows, cols, generator=gen) ** 2 for _ in range(3))
        global_state[key] = g
        local_state[key] = g + 1e-3 * normal / (chi2 / 3).sqrt()
    return local_state, global_state


def authors_sparsify(local: dict[str, torch.Tensor], glob: dict[str, torch.Tensor], config: SparsifyConfig):
    """The authors' per-matrix recipe: (kept flat positions, kept values, scale) per factor key."""
    from scipy.stats import kurtosis

    out = {}
    for a_key in sorted(k for k in local if k.endswith("lora_A.weight")):
        b_key = a_key.replace("lora_A", "lora_B")
        a_prev, b_prev, a_new, b_new = glob[a_key], glob[b_key], local[a_key], local[b_key]
        d_a, d_b = a_new - a_prev, b_new - b_prev
        score_a = d_a.abs() * torch.linalg.vector_norm(b_new, dim=0)[:, None]
        score_b = d_b.abs() * torch.linalg.vector_norm(a_prev, dim=1)[None, :]
        for key, delta, scores in ((a_key, d_a, score_a), (b_key, d_b, score_b)):
            kappa = float(kurtosis(scores.flatten().numpy(), fisher=False))
            rho = config.base + min(config.upper, config.coeff * math.log(max(kappa, 1.0)))
            threshold = torch.quantile(scores.flatten(), rho)
            mask = scores >= threshold
            kept = delta * mask
            scale = float(delta.abs().sum() / kept.abs().sum())
            flat_mask = mask.flatten()
            out[key] = (flat_mask.nonzero().flatten(), delta.flatten()[flat_mask], scale)
    return out


def package_sparsify(local, glob, config: SparsifyConfig):
    return fk.sparsify(local, glob, config, backend="torch")


def agreement(authors, update) -> tuple[int, int]:
    """(matrices whose kept positions are the same, matrices) between the two ways."""
    same = 0
    for key, (positions, _, _) in authors.items():
        sparse = update.deltas.get(key)
        same += sparse is not None and torch.equal(sparse.indices, positions)
    return same, len(authors)


def time_alternately(fns: dict[str, object], repeat: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall ms, CPU ms) of each function, run in turn ``repeat`` times after one untimed round.

    CPU ms is this process's time on a CPU (``time.process_time``: user + system, page faults
    included). On a machine shared with other work it is the steadier of the two: the wall time
    also counts the time the process waited for a core.
    """
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append((time.process_time() - start_cpu) * 1e3)
            wall[name].append((time.perf_counter() - start) * 1e3)
    return wall, cpu


def profile_top(fn, lines: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(lines)
    return stream.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=LLAMA_3B["rank"])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs of each way (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="print cProfile's top entries for one fk.sparsify")
    parser.add_argument("--note", default="", help="a line printed with the machine (e.g. what else ran on it)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = SparsifyConfig()
    local, glob = client_states(args.layers, args.rank, args.seed)
    params = sum(t.numel() for t in local.values())
    local_bytes = sum(t.numel() * t.element_size() for t in local.values())
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} torch thread(s) of {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, Python {platform.python_version()}")
    if args.note:
        print(f"note: {args.note}")
    print(f"state: {args.layers} layer(s) of Llama-3.2-3B, r = {args.rank}: {len(local) // 2} LoRA pairs, "
          f"{params:,} parameters ({local_bytes / 1e6:.1f} MB float32 local state)")

    update = package_sparsify(local, glob, config)
    same, count = agreement(authors_sparsify(local, glob, config), update)
    print(f"agreement: kept positions equal in {same}/{count} matrices")

    wall, cpu = time_alternately({"authors": lambda: authors_sparsify(local, glob, config),
                                  "package": lambda: package_sparsify(local, glob, config)}, args.repeat)
    med = {name: statistics.median(t) for name, t in wall.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    print(f"{'way':<42}{'ms/layer':>10}{'GB/s':>7}{'min..max':>14}{'CPU ms/layer':>14}{'GB/s':>7}")
    labels = {"authors": "authors (scipy kurtosis + torch.quantile)", "package": "fk.sparsify (torch backend)"}
    for name, label in labels.items():
        lo, hi = min(wall[name]) / args.layers, max(wall[name]) / args.layers
        gbs, gbs_cpu = (local_bytes / (m[name] / 1e3) / 1e9 for m in (med, med_cpu))
        print(f"{label:<42}{med[name] / args.layers:>10.1f}{gbs:>7.2f}{f'{lo:.0f}..{hi:.0f}':>14}"
              f"{med_cpu[name] / args.layers:>14.1f}{gbs_cpu:>7.2f}")
    ratio, ratio_cpu = med["authors"] / med["package"], med_cpu["authors"] / med_cpu["package"]
    print(f"speed-up: {ratio:.1f}x wall, {ratio_cpu:.1f}x CPU time (medians of {args.repeat} alternating runs each; "
          "GB/s: the local state's bytes / the time)")

    if args.profile:
        print(profile_top(lambda: package_sparsify(local, glob, config), 25))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "machine": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "note": args.note, "layers": args.layers, "rank": args.rank, "parameters": params,
            "local_state_bytes": local_bytes, "repeat": args.repeat,
            "ms_per_layer": {name: med[name] / args.layers for name in med}, "speed_up": ratio,
            "cpu_ms_per_layer": {name: med_cpu[name] / args.layers for name in med_cpu}, "speed_up_cpu": ratio_cpu,
            "runs_wall_ms": wall, "runs_cpu_ms": cpu, "agreement": [same, count],
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
