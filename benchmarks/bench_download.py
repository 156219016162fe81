"""Seeded DARE download: the torch path vs the Triton kernels, time, speed-up and GB/s.

Server: compact one moved factor per LoRA pair (float64 deltas -> kept indices
and values in the wire dtype); torch = ``seeded_keep_indices`` (numpy Philox on
the CPU) + gather + cast, as ``Aggregator._download`` does. Client: rebuild
the factor from the seed and the values; torch = ``seeded_keep_indices`` +
``SparseTensor.to_dense`` + add, as a client decoding the wire runs ``apply``
(and "torch, indices given": the add alone, the in-memory Broadcast case).
Triton runs per tensor (one call each) and grouped (one flat buffer, one
launch for the whole model).

GB/s counts the bytes a kernel must move at least (compaction: read the delta,
write index + value per kept element; expand-add: read factor and values, write
the factor) over the device's measured copy bandwidth (``dst.copy_(src)``).

    python benchmarks/bench_download.py            # Llama-3.2-3B r=64, CUDA
    python benchmarks/bench_download.py --small    # reduced shapes; on CPU through Triton's interpreter

On CPU the Triton numbers come from its interpreter (numpy, ~100x slower than
torch): they show the script runs and the results match, not kernel speed.

``--wire`` times what a client runs on the CPU instead: ``fk.decode`` and
``fk.apply`` (torch backend) of the round's full Broadcast, B in an odd round
and A in an even one (Llama-3.2-3B r=64: 49.5 M and 47.7 M elements). Seeded
positions are lazy: decode draws no mask and apply draws each once. Before
that change decode drew every mask (and encode drew them again as a check);
"eager" rows time that path as the old code ran it: this decode, then each
key's mask drawn and counted as the old decode did, then apply with the
positions given. ``--baseline-checkout DIR`` also times decode and apply of
the same bytes (the wire format did not change) with the fedsrd_kernels of
another checkout (e.g. ``git worktree add <folder> <commit>``), in a
subprocess: the old code itself.

    python benchmarks/bench_download.py --wire --json benchmarks/results/download_wire_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_shapes import LLAMA_3B, lora_shapes  # noqa: E402
from timing import (  # noqa: E402,F401  (time_ms, synchronize: re-exported to the other scripts)
    copy_bandwidth,
    json_row,
    json_table,
    measure,
    synchronize,
    time_ms,
    write_json,
)

from fedsrd_kernels.kernels.download.reference import mask_key, seeded_keep_indices  # noqa: E402
from fedsrd_kernels.kernels.download.triton import (  # noqa: E402
    dare_compact_grouped_triton,
    dare_compact_triton,
    seeded_expand_add_grouped_triton,
    seeded_expand_add_triton,
)
from fedsrd_kernels.updates import Broadcast, SparseTensor  # noqa: E402

# Llama-3.2-3B: hidden, intermediate, kv projection width, layers; LoRA rank 64 on all 7 linear modules.
FULL = LLAMA_3B
SMALL = {"hidden": 96, "intermediate": 256, "kv": 32, "layers": 2, "rank": 8}
SEED, ROUND = 0, 1


def report(rows: list[tuple], baseline_ms: float, peak_gbs: float) -> None:
    """Rows (name, ms, bytes[, peak GPU MiB]); the peak goes to --json only (the printed table stays as it was)."""
    print(f"  {'path':<28}{'ms':>10}{'speed-up':>10}{'GB/s':>10}{'of copy':>9}")
    for name, ms, nbytes, *_ in rows:
        gbs = nbytes / ms / 1e6
        print(f"  {name:<28}{ms:>10.3f}{baseline_ms / ms:>9.2f}x{gbs:>10.1f}{100 * gbs / peak_gbs:>8.1f}%")


def flat_offsets(tensors: list[torch.Tensor]) -> list[int]:
    offsets = [0]
    for t in tensors:
        offsets.append(offsets[-1] + t.numel())
    return offsets


def bench_factor(
    shapes: dict[str, tuple[int, int]], args: argparse.Namespace, device: torch.device, peak_gbs: float
) -> list[dict]:
    """Prints the server's compaction and the client's expand-add; returns both tables for --json."""
    gen = torch.Generator().manual_seed(0)
    names = list(shapes)
    keys = [mask_key(SEED, ROUND, n) for n in names]
    source = torch.float64 if args.source_dtype == "float64" else torch.float32
    value_dtype = getattr(torch, args.value_dtype)
    factor_dtype = getattr(torch, args.factor_dtype)
    deltas = [(torch.randn(shapes[n], generator=gen, dtype=source) * 1e-3).to(device) for n in names]
    factors = [torch.randn(shapes[n], generator=gen).to(factor_dtype).to(device) for n in names]
    numel = sum(d.numel() for d in deltas)
    scale = 1.0 / (1.0 - args.drop)
    kw = {"device": device, "warmup": args.warmup, "repeats": args.repeats}

    def timed(fn, nbytes):  # (ms, bytes, peak GPU MiB): a row's figures after its name
        ms, peak = measure(fn, **kw)
        return ms, nbytes, peak

    # Server: compaction.
    def torch_compact():
        out = []
        for name, delta in zip(names, deltas):
            kept = seeded_keep_indices(delta.numel(), seed=SEED, round=ROUND, name=name, drop=args.drop)
            kept = kept.to(device)
            out.append((kept, delta.flatten()[kept].to(value_dtype)))
        return out

    flat_delta = torch.cat([d.flatten() for d in deltas])
    offsets = flat_offsets(deltas)
    reference = torch_compact()
    indices, values, value_offsets = dare_compact_grouped_triton(flat_delta, offsets, keys, args.drop, value_dtype)
    for (kept, vals), lo, hi in zip(reference, value_offsets, value_offsets[1:]):
        assert torch.equal(indices[lo:hi], kept) and torch.equal(values[lo:hi], vals), "grouped compaction differs"
    nnz = values.numel()
    compact_bytes = numel * deltas[0].element_size() + nnz * (8 + values.element_size())
    ways = [
        ("torch (CPU mask + gather)", torch_compact),
        ("triton, per tensor",
         lambda: [dare_compact_triton(d, k, args.drop, value_dtype) for d, k in zip(deltas, keys)]),
        ("triton, grouped", lambda: dare_compact_grouped_triton(flat_delta, offsets, keys, args.drop, value_dtype)),
    ]
    rows = [(name, *timed(fn, compact_bytes)) for name, fn in ways]
    t_torch = rows[0][1]
    print(f"server compaction: {len(names)} tensors, {numel:,} elements, {nnz:,} kept")
    report(rows, t_torch, peak_gbs)
    tables = [json_table("server compaction", rows, t_torch, peak_gbs, baseline=rows[0][0], tensors=len(names),
                         elements=numel, kept=nnz)]

    # Client: expand-add.
    per_tensor_values = [values[lo:hi] for lo, hi in zip(value_offsets, value_offsets[1:])]
    sparse = [
        SparseTensor(f.shape, v, kept, scale=scale) for f, v, (kept, _) in zip(factors, per_tensor_values, reference)
    ]

    def torch_apply(indices_given: bool):
        out = []
        for name, f, s in zip(names, factors, sparse):
            if not indices_given:  # a client decoding the wire rebuilds the positions from the seed
                kept = seeded_keep_indices(f.numel(), seed=SEED, round=ROUND, name=name, drop=args.drop)
                s = SparseTensor(s.shape, s.values, kept.to(device), scale=s.scale)
            out.append((f.to(torch.float32) + s.to_dense()).to(f.dtype))
        return out

    flat_factor = torch.cat([f.flatten() for f in factors])
    scales = [s.scale for s in sparse]
    expected = torch_apply(indices_given=True)
    got = seeded_expand_add_grouped_triton(flat_factor, offsets, values, keys, args.drop, scales)
    for e, lo, hi in zip(expected, offsets, offsets[1:]):
        assert torch.equal(got[lo:hi].view(e.shape), e), "grouped expand-add differs"
    apply_bytes = 2 * numel * factors[0].element_size() + nnz * values.element_size()
    ways = [
        ("torch (CPU mask + dense add)", lambda: torch_apply(indices_given=False)),
        ("torch, indices given", lambda: torch_apply(indices_given=True)),
        ("triton, per tensor", lambda: [seeded_expand_add_triton(f, v, k, args.drop, s)
                                        for f, v, k, s in zip(factors, per_tensor_values, keys, scales)]),
        ("triton, grouped",
         lambda: seeded_expand_add_grouped_triton(flat_factor, offsets, values, keys, args.drop, scales)),
    ]
    rows = [(name, *timed(fn, apply_bytes)) for name, fn in ways]
    t_torch = rows[0][1]
    print(f"client expand-add: factor {args.factor_dtype}, values {args.value_dtype}")
    report(rows, t_torch, peak_gbs)
    tables.append(json_table("client expand-add (fused apply)", rows, t_torch, peak_gbs, baseline=rows[0][0],
                             factor_dtype=args.factor_dtype, value_dtype=args.value_dtype))
    return tables


# A subprocess with another checkout's package on sys.path: decode and apply of the same bytes, as that code ran.
_BASELINE = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import fedsrd_kernels as fk
payload = open(sys.argv[2], "rb").read()
state = torch.load(sys.argv[3])
repeats = int(sys.argv[4])
def median_s(fn):
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}
decoded = fk.decode(payload)
print(json.dumps({"package": fk.__file__, "encode_s": median_s(lambda: fk.encode(decoded)),
                  "decode_s": median_s(lambda: fk.decode(payload)),
                  "apply_s": median_s(lambda: fk.apply(state, decoded, backend="torch")),
                  "decode_apply_s": median_s(lambda: fk.apply(state, fk.decode(payload), backend="torch"))}))
"""


def _median_s(fn, repeats: int) -> dict[str, float]:
    """Median wall and process CPU seconds of ``fn`` after one untimed call. CPU time is the figure to read on a
    shared machine: other processes on the cores stretch the wall time, not this process's CPU time."""
    import statistics
    import time

    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}


def _wire_round(state: dict, shapes: dict, round_: int, args: argparse.Namespace, gen: torch.Generator) -> dict:
    """One round's Broadcast (the moved factor of every pair) through encode, decode and apply."""
    import json
    import subprocess
    import tempfile
    import time

    import fedsrd_kernels as fk

    factor = "B" if round_ % 2 else "A"
    keys = [k for k in shapes if k.endswith(f"lora_{factor}.weight")]
    deltas = {k: torch.randn(shapes[k], generator=gen, dtype=torch.float64) * 1e-3 for k in keys}
    agg = fk.Aggregator("fedsrd", seed=SEED, download_drop=args.drop, value_dtype=args.value_dtype, backend="torch")
    start = time.perf_counter()
    sparse = agg._downloads(deltas, round_)
    download_s = time.perf_counter() - start
    moved = {k.removesuffix(f".lora_{factor}.weight"): factor for k in keys}
    broadcast = Broadcast(round_, "fedsrd", SEED, args.drop, sparse, moved=moved, seeded=frozenset(sparse))
    payload = fk.encode(broadcast)
    numel, nnz = sum(s.numel for s in sparse.values()), sum(s.nnz for s in sparse.values())
    del deltas, sparse

    def eager_decode():  # the old decode: every seeded mask drawn and counted on the CPU
        decoded = fk.decode(payload)
        for key, s in decoded.deltas.items():
            kept = seeded_keep_indices(s.numel, seed=SEED, round=round_, name=key, drop=args.drop)
            assert kept.numel() == s.nnz
            object.__setattr__(s, "_drawn", kept)  # held, as the old SparseTensor held its positions
        return decoded

    lazy = fk.decode(payload)
    eager = eager_decode()
    want = fk.apply(state, eager, backend="torch")
    got = fk.apply(state, lazy, backend="torch")
    assert all(torch.equal(got[k], want[k]) for k in keys), "lazy and eager apply differ"
    timed = {
        "encode_s": lambda: fk.encode(broadcast),
        "decode_lazy_s": lambda: fk.decode(payload),
        "decode_eager_s": eager_decode,
        "apply_lazy_s": lambda: fk.apply(state, lazy, backend="torch"),
        "apply_positions_given_s": lambda: fk.apply(state, eager, backend="torch"),
        "decode_apply_lazy_s": lambda: fk.apply(state, fk.decode(payload), backend="torch"),
        "decode_apply_eager_s": lambda: fk.apply(state, eager_decode(), backend="torch"),
    }
    row = {"factor": factor, "keys": len(keys), "elements": numel, "kept": nnz, "payload_mib": len(payload) / 2**20,
           "server_download_torch_s": download_s, **{name: _median_s(fn, args.repeats) for name, fn in timed.items()}}
    if args.baseline_checkout:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "payload").write_bytes(payload)
            torch.save(state, Path(tmp, "state.pt"))
            result = subprocess.run(
                [sys.executable, "-c", _BASELINE, str(Path(args.baseline_checkout).resolve()),
                 str(Path(tmp, "payload")), str(Path(tmp, "state.pt")), str(args.repeats)],
                capture_output=True, text=True, check=True)
        row["baseline"] = json.loads(result.stdout.strip().splitlines()[-1])
    return row


def _wire_update(shapes: dict[str, tuple[int, int]], args: argparse.Namespace, gen: torch.Generator) -> dict:
    """A client's whole upload through encode and decode: ``fk.sparsify`` of a local adapter that moved from the
    global one (its kept positions are the importance rule's, so the position gaps, and the bytes, are the real
    ones), then the wire both ways."""
    import time

    import fedsrd_kernels as fk

    glob = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    local = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in glob.items()}
    start = time.perf_counter()
    update = fk.sparsify(local, glob, backend="torch")
    sparsify_s = time.perf_counter() - start
    del local, glob
    payload = fk.encode(update)
    back = fk.decode(payload)
    assert all(torch.equal(back.deltas[k].indices, s.indices) and torch.equal(back.deltas[k].values, s.values)
               for k, s in update.deltas.items()), "the update does not survive encode + decode"
    numel, nnz = sum(s.numel for s in update.deltas.values()), sum(s.nnz for s in update.deltas.values())
    return {"keys": len(update.deltas), "elements": numel, "kept": nnz, "payload_mib": len(payload) / 2**20,
            "sparsify_torch_s": sparsify_s,
            "encode_s": _median_s(lambda: fk.encode(update), args.repeats),
            "decode_s": _median_s(lambda: fk.decode(payload), args.repeats)}


def wire_tables(rounds: dict, update: dict, copy_gbs: float) -> list[dict]:
    """The --wire figures as the shared --json tables: bytes = the payload; each lazy row's speed-up is over its
    eager (old-code) counterpart, encode and the update have none; no GPU memory on this CPU path."""
    tables = []
    for title, row in rounds.items():
        nbytes = row["payload_mib"] * 2**20
        ways = [("encode", "encode_s", None), ("decode (lazy)", "decode_lazy_s", "decode_eager_s"),
                ("decode + every mask (old)", "decode_eager_s", "decode_eager_s"),
                ("decode + apply, lazy", "decode_apply_lazy_s", "decode_apply_eager_s"),
                ("decode + apply, eager (old)", "decode_apply_eager_s", "decode_apply_eager_s")]
        rows = [json_row(label, 1e3 * row[key]["wall"], nbytes, copy_gbs,
                         1e3 * row[base]["wall"] if base else None, None) for label, key, base in ways]
        tables.append({"title": f"broadcast {title}, CPU", "baseline": "the eager (old) decode", "rows": rows,
                       "elements": row["elements"], "kept": row["kept"]})
    nbytes = update["payload_mib"] * 2**20
    tables.append(json_table("client update, CPU", [("encode", 1e3 * update["encode_s"]["wall"], nbytes),
                                                    ("decode", 1e3 * update["decode_s"]["wall"], nbytes)], None,
                             copy_gbs, baseline=None, elements=update["elements"], kept=update["kept"]))
    return tables


def bench_wire(shapes: dict[str, tuple[int, int]], args: argparse.Namespace) -> dict:
    """decode and apply of the round's Broadcast on the CPU: lazy seeded positions vs the eager draws."""
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    out = {}
    for round_ in (1, 2):
        row = _wire_round(state, shapes, round_, args, gen)
        out[f"round {round_} (lora_{row['factor']})"] = row
        print(f"\n== round {round_}: lora_{row['factor']}, {row['keys']} keys, {row['elements']:,} elements, "
              f"{row['kept']:,} kept, payload {row['payload_mib']:.1f} MiB ==")
        print(f"  {'':<50}{'wall s':>8}{'CPU s':>8}")
        print(f"  {'server download (torch: numpy mask + gather, once)':<50}{row['server_download_torch_s']:8.3f}")
        for name, label in (("encode_s", "encode (draws no mask)"),
                            ("decode_lazy_s", "decode, lazy (this tree)"),
                            ("decode_eager_s", "decode + every mask drawn (the old decode)"),
                            ("apply_lazy_s", "apply after lazy decode (one draw per key)"),
                            ("apply_positions_given_s", "apply, positions drawn (the old apply)"),
                            ("decode_apply_lazy_s", "decode + apply, lazy"),
                            ("decode_apply_eager_s", "decode + apply, eager")):
            print(f"  {label:<50}{row[name]['wall']:8.3f}{row[name]['cpu']:8.3f}")
        if "baseline" in row:
            base = row["baseline"]
            print(f"  baseline checkout ({base['package']}):")
            for name in ("encode_s", "decode_s", "apply_s", "decode_apply_s"):
                print(f"    {name:<48}{base[name]['wall']:8.3f}{base[name]['cpu']:8.3f}")
    del state
    update = _wire_update(shapes, args, gen)
    print(f"\n== a client's update: {update['keys']} keys, {update['elements']:,} elements, {update['kept']:,} kept "
          f"(fk.sparsify, {update['sparsify_torch_s']:.2f} s), payload {update['payload_mib']:.1f} MiB ==")
    print(f"  {'':<50}{'wall s':>8}{'CPU s':>8}")
    for name, label in (("encode_s", "encode"), ("decode_s", "decode")):
        print(f"  {label:<50}{update[name]['wall']:8.3f}{update[name]['cpu']:8.3f}")
    return out, update


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="reduced shapes (2 layers, hidden 96, r 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--drop", type=float, default=0.8)
    parser.add_argument("--source-dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--value-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--factor-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--warmup", type=int, default=None, help="default 3 on CUDA, 1 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default 10 on CUDA, 3 on CPU")
    parser.add_argument("--wire", action="store_true", help="decode + apply of the full Broadcast on the CPU")
    parser.add_argument("--baseline-checkout", help="--wire: also time another checkout's decode and apply")
    parser.add_argument("--json", help="write the figures to this file (the kernel tables, or --wire's)")
    args = parser.parse_args(argv)
    if args.wire:
        import platform

        args.repeats = args.repeats if args.repeats is not None else 3
        dims = SMALL if args.small else FULL
        print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
              f"torch {torch.__version__}; dims {dims}; drop {args.drop}; values {args.value_dtype}; "
              f"median of {args.repeats}")
        rows, update = bench_wire(lora_shapes(**dims), args)
        if args.json:
            cpu = torch.device("cpu")
            copy_gbs = copy_bandwidth(cpu, 64 if args.small else 256, 3)  # the CPU's, as this path runs there
            shapes = lora_shapes(**dims)
            write_json(args.json, "bench_download --wire", cpu, copy_gbs, wire_tables(rows, update, copy_gbs),
                       dims=dims, parameters=sum(r * c for r, c in shapes.values()),
                       drop=args.drop, value_dtype=args.value_dtype, threads=torch.get_num_threads(),
                       repeats=args.repeats, rounds=rows, update=update)
        return
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (3 if on_cuda else 1)
    args.repeats = args.repeats if args.repeats is not None else (10 if on_cuda else 3)
    dims = SMALL if args.small else FULL
    shapes = lora_shapes(**dims)
    peak = copy_bandwidth(device, 1024 if on_cuda else 64, args.repeats)
    where = torch.cuda.get_device_name(device) if on_cuda else "CPU (Triton interpreted: not kernel speed)"
    print(f"device: {where}; copy bandwidth {peak:.1f} GB/s; dims {dims}; drop {args.drop}")
    tables = []
    for factor, round_kind in (("B", "odd rounds"), ("A", "even rounds")):
        print(f"\n== lora_{factor} ({round_kind}) ==")
        for table in bench_factor({k: s for k, s in shapes.items() if k.endswith(f"lora_{factor}.weight")}, args,
                                  device, peak):
            tables.append({**table, "title": f"lora_{factor}: {table['title']}"})
    if args.json:
        write_json(args.json, "bench_download", device, peak, tables, dims=dims,
                   parameters=sum(r * c for r, c in shapes.values()), drop=args.drop,
                   source_dtype=args.source_dtype, value_dtype=args.value_dtype, factor_dtype=args.factor_dtype,
                   warmup=args.warmup, repeats=args.repeats)


if __name__ == "__main__":
    main()
