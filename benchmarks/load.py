"""Load: many clients' payloads through one server round, streamed, against the batch path.

    python benchmarks/load.py                               # 4, 250 and 1,000 clients, fedsrd-e and fedsrd
    python benchmarks/load.py --clients 4,100 --methods fedsrd-e --json out.json

Each configuration runs in a fresh process, so its peak RSS is its own. Clients
are generated one at a time (seeded local state, ``sparsify``, ``encode``: client
time, reported apart); the server decodes each payload and folds it into
``Aggregator.stream`` (server time). The batch run decodes every payload, keeps
them all and calls ``aggregate`` once. Both apply their Broadcast; the relative
Frobenius error of the streamed state against the batch one is reported.
FedSRD-e and the FedAvg family stream exactly; FedSRD streams a sketch whose
residual the report gives.

Model: Llama-3.2-3B's layer shapes with every width / 8, 2 layers, r = 8
(14 pairs, 211,968 LoRA parameters), so 1,000 clients fit a CPU run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and str(REPO) not in sys.path:  # run as a script: the benchmarks package from the checkout
    sys.path.insert(0, str(REPO))

import fedsrd_kernels as fk  # noqa: E402
from benchmarks.llama_shapes import LLAMA_3B, pair_shapes  # noqa: E402

MiB = 2**20


def global_state(seed: int = 0) -> dict[str, torch.Tensor]:
    dims = {k: (v // 8 if k in ("hidden", "intermediate", "kv") else v) for k, v in LLAMA_3B.items()}
    dims["layers"], dims["rank"] = 2, 8
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, d_out, d_in in pair_shapes(**dims):
        state[f"{prefix}.lora_A.weight"] = torch.randn(dims["rank"], d_in, generator=gen) / d_in**0.5
        state[f"{prefix}.lora_B.weight"] = torch.randn(d_out, dims["rank"], generator=gen) * 1e-2
    return state


def client_payload(state, agg: fk.Aggregator, base: str, index: int) -> bytes:
    """Client ``index``'s encoded update: its own seeded local training stand-in."""
    gen = torch.Generator().manual_seed(1_000 + index)
    local = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    update = fk.sparsify(local, state, agg.client_config, num_samples=10 + index % 7, round=1,
                         client_id=f"client-{index}", base=base)
    return fk.encode(update)


def run_one(method: str, clients: int, mode: str, out: str, threads: int = 1) -> dict:
    """One configuration in this process; writes the applied state to ``out``.

    One torch thread by default: these ops are small, and with 2 threads on a
    2-core machine that had another busy process, 50 FedSRD-e stream adds took
    79 ms each against 5.2 ms with one thread.
    """
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    state = global_state()
    base = fk.state_digest(state)
    agg = fk.Aggregator(method, seed=0)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    client_seconds = server_seconds = server_cpu = 0.0
    stream = agg.stream(state, round=1) if mode == "stream" else None
    held, weights = [], []
    for i in range(clients):
        start = time.perf_counter()
        payload = client_payload(state, agg, base, i)
        client_seconds += time.perf_counter() - start
        start, cpu = time.perf_counter(), time.process_time()
        update = fk.decode(payload, max_numel=sum(v.numel() for v in state.values()))
        if stream is not None:
            stream.add(update, weight=update.num_samples)
        else:
            held.append(update)
            weights.append(update.num_samples)
        server_seconds += time.perf_counter() - start
        server_cpu += time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    broadcast = stream.finish() if stream is not None else agg.aggregate(state, held, weights=weights, round=1)
    server_seconds += time.perf_counter() - start
    server_cpu += time.process_time() - cpu
    new = fk.apply(state, broadcast)
    save_file({k: v.contiguous() for k, v in new.items()}, out)
    residuals = agg.last_report.residuals
    return {
        "method": method, "mode": mode, "clients": clients, "server_seconds": server_seconds,
        "server_cpu_seconds": server_cpu,
        "client_seconds": client_seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mib": rss_start / MiB, "max_residual": max(residuals.values()) if residuals else None,
    }


def measure(method: str, clients: int, mode: str, folder: Path, threads: int = 1) -> dict:
    """run_one in a fresh process (its own peak RSS)."""
    out = folder / f"{method}-{mode}-{clients}.safetensors"
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from benchmarks import load; "
            "print(json.dumps(load.run_one(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], "
            "int(sys.argv[6]))))")
    done = subprocess.run([sys.executable, "-c", code, str(REPO), method, str(clients), mode, str(out),
                           str(threads)], check=True, capture_output=True, text=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["state_file"] = str(out)
    return row


def relative_error(path_a: str, path_b: str) -> float:
    from safetensors.torch import load_file

    a, b = load_file(path_a), load_file(path_b)
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a)
    den = sum(float(b[k].double().square().sum()) for k in b)
    return (num / den) ** 0.5


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="4,250,1000")
    parser.add_argument("--methods", default="fedsrd-e,fedsrd")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            batch = measure(method, max(counts), "batch", Path(tmp), args.threads)
            for count in counts:
                row = measure(method, count, "stream", Path(tmp), args.threads)
                if count == max(counts):
                    row["error_vs_batch"] = relative_error(row["state_file"], batch["state_file"])
                rows.append(row)
            rows.append(batch)
    print(f"{'method':9} {'mode':6} {'clients':>7} {'server s':>9} {'ms/client':>9} {'client s':>9} "
          f"{'peak RSS MiB':>12} {'vs batch':>9} {'residual':>9}")
    for row in rows:
        err = f"{row['error_vs_batch']:.1e}" if "error_vs_batch" in row else ""
        res = f"{row['max_residual']:.1e}" if row["max_residual"] is not None else ""
        print(f"{row['method']:9} {row['mode']:6} {row['clients']:>7} {row['server_seconds']:>9.2f} "
              f"{1e3 * row['server_seconds'] / row['clients']:>9.2f} {row['client_seconds']:>9.2f} "
              f"{row['peak_rss_mib']:>12.1f} {err:>9} {res:>9}")
    if args.json:
        for row in rows:
            row.pop("state_file", None)
        meta = {"torch": torch.__version__, "machine": platform.machine(), "threads": args.threads,
                "date": time.strftime("%Y-%m-%d")}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
