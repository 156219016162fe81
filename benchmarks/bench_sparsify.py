"""Client sparsify of a whole model: per-matrix torch loop (client.sparsify) vs the grouped Triton pipeline.

For each phase (norms, scores + kurtosis moments, ratio, select, compact) and
the whole step: median time of both, the speed-up, and for Triton the
bandwidth its design needs (bytes it must move / time) next to a measured
device copy bandwidth (torch copy of a large buffer, read + write).

    python benchmarks/bench_sparsify.py            # Llama-3.2-3B, r = 64, all 7 modules x 28 layers (CUDA)
    python benchmarks/bench_sparsify.py --small    # 1 reduced layer; on CPU through Triton's interpreter

Without CUDA, Triton runs in its interpreter (TRITON_INTERPRET=1 is set here,
before triton is imported); its times only show that the script runs.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, installed or not
from fedsrd_kernels.client import sparsify_matrix  # noqa: E402
from fedsrd_kernels.config import SparsifyConfig  # noqa: E402
from fedsrd_kernels.kernels.sparsify.reference import importance, keep_count, pearson_kurtosis, top_k_indices  # noqa: E402
from fedsrd_kernels.kernels.sparsify.triton import SparsifyPipeline, sparsify_grouped_triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import copy_bandwidth, json_row, measure, synchronize, write_json  # noqa: E402

LLAMA_3B = {"hidden": 3072, "intermediate": 8192, "kv": 1024, "layers": 28, "rank": 64}
SMALL = {"hidden": 96, "intermediate": 160, "kv": 32, "layers": 1, "rank": 8}
PHASES = ("norms", "scores", "ratio", "select", "compact")


def lora_pairs(dims: dict[str, int], device: torch.device, generator: torch.Generator):
    """(A_prev, B_prev, A_new, B_new) for q, k, v, o, gate, up, down of every layer; local = global + N(0, 1e-3)."""
    h, i, kv, r = dims["hidden"], dims["intermediate"], dims["kv"], dims["rank"]
    modules = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (d_in, d_out)
    pairs = []
    for _ in range(dims["layers"]):
        for d_in, d_out in modules:
            a_prev = torch.randn(r, d_in, generator=generator) / d_in**0.5
            b_prev = torch.randn(d_out, r, generator=generator) / r**0.5
            a_new = a_prev + 1e-3 * torch.randn(r, d_in, generator=generator)
            b_new = b_prev + 1e-3 * torch.randn(d_out, r, generator=generator)
            pairs.append(tuple(t.to(device) for t in (a_prev, b_prev, a_new, b_new)))
    return pairs


# ----------------------------------------------------------------------------- the plain (authors') way
def plain_step(pairs, config: SparsifyConfig):
    """The authors' per-matrix recipe (benchmarks/bench_client.py's, on the pairs' device): eq. 6 scores, the
    kurtosis of a CPU copy (scipy, as their code; numpy's same formula where scipy is missing), torch.quantile
    for the threshold, ``scores >= threshold`` as the mask, the L1 rescale."""
    out = []
    for a_prev, b_prev, a_new, b_new in pairs:
        d_a, d_b = a_new - a_prev, b_new - b_prev
        score_a = d_a.abs() * torch.linalg.vector_norm(b_new, dim=0)[:, None]
        score_b = d_b.abs() * torch.linalg.vector_norm(a_prev, dim=1)[None, :]
        for delta, scores in ((d_a, score_a), (d_b, score_b)):
            kappa = _kurtosis(scores.flatten().cpu().numpy())
            rho = config.base + min(config.upper, config.coeff * math.log(max(kappa, 1.0)))
            threshold = torch.quantile(scores.flatten(), rho)
            mask = scores >= threshold
            scale = float(delta.abs().sum() / (delta * mask).abs().sum())
            flat_mask = mask.flatten()
            out.append((flat_mask.nonzero().flatten(), delta.flatten()[flat_mask], scale))
    return out


def _kurtosis(values) -> float:
    try:
        from scipy.stats import kurtosis
    except ImportError:  # the GPU machine may lack scipy: Pearson's kurtosis, m4 / m2^2, in float64
        centred = values.astype("float64") - values.mean(dtype="float64")
        m2 = (centred**2).mean()
        return float((centred**4).mean() / (m2 * m2))
    return float(kurtosis(values, fisher=False))


# ----------------------------------------------------------------------------- torch reference, by phase
def torch_step(pairs, config: SparsifyConfig):
    """client.sparsify's loop for selection "importance": importance per pair, sparsify_matrix per matrix."""
    out = []
    for a_prev, b_prev, a_new, b_new in pairs:
        d_a, d_b = a_new - a_prev, b_new - b_prev
        score_a, score_b = importance(d_a, d_b, a_prev, b_new)
        out += [sparsify_matrix(d_a, score_a, config), sparsify_matrix(d_b, score_b, config)]
    return out


def torch_phases(pairs, config: SparsifyConfig, device: torch.device) -> dict[str, float]:
    """The same loop cut into the Triton pipeline's phases, each timed over all matrices."""
    times, state = {}, {}

    def norms():
        state["norms"] = [(torch.linalg.vector_norm(b_new, dim=0), torch.linalg.vector_norm(a_prev, dim=1))
                          for a_prev, _, _, b_new in pairs]

    def scores():
        state["mats"], state["kappa"] = [], []
        for (a_prev, b_prev, a_new, b_new), (b_cols, a_rows) in zip(pairs, state["norms"]):
            d_a, d_b = a_new - a_prev, b_new - b_prev
            for delta, scores in ((d_a, d_a.abs() * b_cols[:, None]), (d_b, d_b.abs() * a_rows[None, :])):
                state["mats"].append((delta, scores))
                state["kappa"].append(pearson_kurtosis(scores))  # a host sync per matrix

    def ratio():
        state["k"] = [keep_count(d.numel(), config.base + min(config.upper, config.coeff * math.log(max(kp, 1.0))))
                      for (d, _), kp in zip(state["mats"], state["kappa"])]

    def select():
        state["kept"] = [top_k_indices(s, k) for (_, s), k in zip(state["mats"], state["k"])]

    def compact():
        state["out"] = []
        for (delta, _), kept in zip(state["mats"], state["kept"]):
            flat = delta.flatten()
            values = flat[kept]
            kept_l1 = float(values.abs().sum(dtype=torch.float64))
            scale = float(flat.abs().sum(dtype=torch.float64)) / kept_l1 if kept_l1 else None
            state["out"].append((kept, values, scale))

    for name, fn in zip(PHASES, (norms, scores, ratio, select, compact)):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times[name] = time.perf_counter() - start
    return times


def triton_phases(pairs, config: SparsifyConfig, device: torch.device) -> dict[str, float]:
    times = {}
    synchronize(device)
    start = time.perf_counter()
    pipe = SparsifyPipeline(pairs)
    synchronize(device)
    times["plan"] = time.perf_counter() - start
    steps = (pipe.norms, pipe.scores, lambda: pipe.ratio(config.base, config.coeff, config.upper), pipe.select,
             lambda: pipe.compact(config.rescale))
    for name, fn in zip(PHASES, steps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times[name] = time.perf_counter() - start
    start = time.perf_counter()
    pipe.result()
    times["result"] = time.perf_counter() - start
    return times


def phase_bytes(pairs, kept_total: int) -> dict[str, float]:
    """Bytes the Triton design must move per phase (fp32 inputs)."""
    n = sum(a.numel() + b.numel() for a, b, _, _ in pairs)  # elements of all dA and dB
    norms = n * 4  # A_prev rows and B_new columns: one of each factor per pair
    return {
        "norms": norms,
        "scores": n * (4 + 4 + 4),  # read prev, new; write scores
        "ratio": 0.0,
        "select": 3 * n * 4,  # radix passes 1-3 re-read the scores (pass 0 is fused into "scores")
        "compact": n * 4 + kept_total * (4 + 4 + 8 + 4),  # scores; gather prev, new; write index, value
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="one reduced layer (for CPU / the interpreter)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per measurement (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--plain-layers", type=int, default=1,
                        help="layers the plain (authors') way is timed on, scaled to the model (0: not timed)")
    parser.add_argument("--json", help="also write the figures here (per way: ms, GB/s, speed-up, peak GPU MiB)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dims = SMALL if args.small else LLAMA_3B
    repeat = args.repeat or (3 if device.type == "cpu" else 10)
    config = SparsifyConfig()
    pairs = lora_pairs(dims, device, torch.Generator().manual_seed(0))
    n = sum(t.numel() for p in pairs for t in p[:2])
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{len(pairs)} LoRA pairs = {2 * len(pairs)} matrices, {n:,} elements, r = {dims['rank']}")
    if device.type == "cpu":
        print("Triton runs in its interpreter here: its times are not a measure of the kernels.")

    # Agreement first: the two paths must keep the same counts (positions may differ only at ties).
    ours = sparsify_grouped_triton(pairs, base=config.base, coeff=config.coeff, upper=config.upper)
    want = torch_step(pairs, config)
    same_count = sum(c == (w.nnz if w is not None else 0) for c, w in zip(ours.keep_counts, want))
    same_pos = sum(w is not None and o is not None and torch.equal(o[0], w.indices) for o, w in zip(ours.split(), want))
    print(f"agreement: keep counts {same_count}/{len(want)} matrices, positions {same_pos}/{len(want)}")

    copy_bw = copy_bandwidth(device, 1024 if device.type == "cuda" else 128, repeat) * 1e9  # bytes/s
    t_whole_torch, peak_torch = measure(lambda: torch_step(pairs, config), device, warmup=1, repeats=repeat)
    t_whole_triton, peak_triton = measure(lambda: sparsify_grouped_triton(pairs), device, warmup=1, repeats=repeat)
    t_whole_torch, t_whole_triton = t_whole_torch / 1e3, t_whole_triton / 1e3
    plain_layers = min(args.plain_layers, dims["layers"])
    if plain_layers:  # its per-matrix host round trips make the whole model too slow for a lease: a few layers
        few = pairs[: plain_layers * len(pairs) // dims["layers"]]
        t_plain, peak_plain = measure(lambda: plain_step(few, config), device, warmup=1, repeats=repeat)
        t_plain = t_plain / 1e3 * dims["layers"] / plain_layers
    runs_torch = [torch_phases(pairs, config, device) for _ in range(repeat)]
    runs_triton = [triton_phases(pairs, config, device) for _ in range(repeat)]
    med_torch = {k: statistics.median(r[k] for r in runs_torch) for k in PHASES}
    med_triton = {k: statistics.median(r[k] for r in runs_triton) for k in (*PHASES, "plan", "result")}
    nbytes = phase_bytes(pairs, ours.offsets[-1])

    print(f"device copy bandwidth: {copy_bw / 1e9:.1f} GB/s (read + write)")
    print(f"{'phase':<10}{'torch ms':>12}{'triton ms':>12}{'speed-up':>10}{'triton GB/s':>13}{'% of copy':>11}")
    rows = [(k, med_torch[k], med_triton[k], nbytes[k]) for k in PHASES]
    rows.append(("whole", t_whole_torch, t_whole_triton, sum(nbytes.values())))
    for name, t_ref, t_tri, b in rows:
        gbs = f"{b / t_tri / 1e9:.1f}" if b else "-"
        pct = f"{100 * b / t_tri / copy_bw:.1f}%" if b else "-"
        print(f"{name:<10}{1e3 * t_ref:>12.3f}{1e3 * t_tri:>12.3f}{t_ref / t_tri:>9.2f}x{gbs:>13}{pct:>11}")
    print(f"triton host planning (tables, one upload) {1e3 * med_triton['plan']:.3f} ms; "
          f"final sync and split {1e3 * med_triton['result']:.3f} ms; both are inside 'whole'")
    if plain_layers:
        print(f"plain (authors': CPU kurtosis + torch.quantile, per matrix): {1e3 * t_plain:.3f} ms for the whole "
              f"model ({plain_layers} of {dims['layers']} layers timed, scaled); triton {t_plain / t_whole_triton:.1f}x"
              f", torch loop {t_plain / t_whole_torch:.1f}x faster")
    if args.json:
        copy_gbs, whole_bytes = copy_bw / 1e9, sum(nbytes.values())
        base = 1e3 * (t_plain if plain_layers else t_whole_torch)
        whole = [json_row("torch loop (client.sparsify_matrix)", 1e3 * t_whole_torch, whole_bytes, copy_gbs, base,
                          peak_torch),
                 json_row("triton (grouped)", 1e3 * t_whole_triton, whole_bytes, copy_gbs, base, peak_triton)]
        if plain_layers:
            whole.insert(0, json_row(f"plain (authors'; {plain_layers} of {dims['layers']} layers, scaled)",
                                     1e3 * t_plain, whole_bytes, copy_gbs, base, peak_plain))
        phases = []  # each phase's Triton speed-up over the torch loop's same phase; no per-phase memory
        for k in PHASES:
            phases.append(json_row(f"{k}: torch", 1e3 * med_torch[k], nbytes[k], copy_gbs, 1e3 * med_torch[k], None))
            phases.append(json_row(f"{k}: triton", 1e3 * med_triton[k], nbytes[k], copy_gbs, 1e3 * med_torch[k],
                                   None))
        tables = [{"title": "client sparsify, whole model", "rows": whole,
                   "baseline": whole[0]["way"]},
                  {"title": "client sparsify, by phase", "rows": phases, "baseline": "the torch loop's same phase"}]
        write_json(args.json, "bench_sparsify", device, copy_gbs, tables, dims=dims, parameters=n,
                   matrices=2 * len(pairs), repeats=repeat, kept=int(ours.offsets[-1]),
                   agreement={"keep_counts": [same_count, len(want)], "positions": [same_pos, len(want)]})


if __name__ == "__main__":
    main()
