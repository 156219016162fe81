"""Quality study: held-out loss of each method at its own learning rate, against traffic.

    python benchmarks/quality.py benchmarks/quality/sweep.toml            # run (or resume) every run, then report
    python benchmarks/quality.py benchmarks/quality/sweep.toml --shard 1/2 --threads 1   # half the runs
    python benchmarks/quality.py benchmarks/quality/sweep.toml --report   # only rewrite the report

A study file holds a ``[study]`` table (``name``, ``runs_dir``), a ``[run]``
table of RunConfig fields shared by every run, and ``[[grid]]`` entries: a
method, optional RunConfig overrides (``error_feedback = true``, ...), a list
of learning rates ``lr`` and a list of ``seeds``. Each (entry, lr, seed) is one
federated run of ``fedsrd_kernels.runner.run``, in its own folder under
``runs_dir``; a killed study resumes every run from its committed round (the
runner's ``state.safetensors``) and skips the runs that are done.

The report (after every run, or with ``--report``) goes to
``benchmarks/results/``:

- ``quality-<name>.json``: every run's per-round records (held-out loss per
  domain, bytes, diagnostics summary), its base loss (round 0), the wall time,
  the machine, and the summary rows;
- ``quality-<name>.md``: the tables (every variant; each method at its best lr);
- ``quality-<name>-rounds.png`` and ``quality-<name>-mib.png``: mean held-out
  loss against round and against cumulative MiB per client, round 0 included.

Runs already in the JSON whose folders are gone (a fresh checkout) are kept as
they are, so a study can span sessions: only unfinished runs are redone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import tomllib
from pathlib import Path

MiB = 2**20
REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"  # --results overrides it (the tests write elsewhere)


# ---------------------------------------------------------------- the study file


def load_study(path: Path) -> dict:
    data = tomllib.loads(path.read_text())
    study = data.get("study", {})
    if "name" not in study:
        raise SystemExit(f"{path}: [study] needs a name")
    if not data.get("grid"):
        raise SystemExit(f"{path}: no [[grid]] entries")
    return data


def variant_label(entry: dict) -> str:
    """``fedsrd``, ``fedsrd+error_feedback``, ``fedsrd+rescale=false``: the method and its overrides."""
    extras = [f"{k}" if v is True else f"{k}={v}" for k, v in sorted(entry.items())
              if k not in ("method", "lr", "seeds")]
    return "+".join([entry["method"], *extras])


def expand(data: dict) -> list[dict]:
    """One dict per run: key, variant, method, lr, seed and the RunConfig overrides."""
    runs = []
    for entry in data["grid"]:
        for lr in entry["lr"]:
            for seed in entry.get("seeds", [0]):
                variant = variant_label(entry)
                overrides = {k: v for k, v in entry.items() if k not in ("lr", "seeds")}
                runs.append({"key": f"{variant}/lr={lr:g}/seed={seed}", "variant": variant, "method": entry["method"],
                             "lr": lr, "seed": seed, "overrides": overrides})
    return runs


def run_dir(data: dict, run: dict) -> Path:
    base = Path(data["study"].get("runs_dir", f"runs/quality/{data['study']['name']}"))
    base = base if base.is_absolute() else REPO / base
    return base / run["variant"] / f"lr={run['lr']:g}" / f"seed={run['seed']}"


# ---------------------------------------------------------------- running


def run_one(data: dict, run: dict, log) -> None:
    from fedsrd_kernels.runner.config import RunConfig
    from fedsrd_kernels.runner.run import run as run_method

    out = run_dir(data, run)
    cfg = RunConfig.load(None, **{**data.get("run", {}), **run["overrides"], "lr": run["lr"], "seed": run["seed"],
                                  "out_dir": str(out)})
    if _done_round(out) >= cfg.rounds:
        return
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run_method(cfg, log=log, show_progress=True)
    import torch

    wall = out / "wall.json"  # wall time summed over the sessions that worked on this run
    spent = json.loads(wall.read_text())["seconds"] if wall.exists() else 0.0
    wall.write_text(json.dumps({"seconds": spent + time.perf_counter() - start, "threads": torch.get_num_threads()}))


def _done_round(out: Path) -> int:
    progress = out / "progress.json"
    return json.loads(progress.read_text())["round"] if progress.exists() else 0


# ---------------------------------------------------------------- collecting and reporting


def collect(data: dict) -> dict[str, dict]:
    """Every run with at least one round: from its folder, else from the last report."""
    name = data["study"]["name"]
    previous = RESULTS / f"quality-{name}.json"
    runs = json.loads(previous.read_text())["runs"] if previous.exists() else {}
    for run in expand(data):
        out = run_dir(data, run)
        if not (out / "rounds.jsonl").exists():
            continue
        records = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line]
        progress = json.loads((out / "progress.json").read_text())
        timing = json.loads((out / "wall.json").read_text()) if (out / "wall.json").exists() else {}
        for record in records:  # the per-pair detail stays in the run folder; the summary is enough here
            record.pop("clip_factors", None)
        runs[run["key"]] = {**{k: run[k] for k in ("variant", "method", "lr", "seed")},
                            "base_heldout": progress.get("base_heldout"), "records": records,
                            "wall_seconds": timing.get("seconds"), "threads": timing.get("threads")}
    return {key: runs[key] for key in sorted(runs)}


def _mean_loss(losses: dict) -> float:
    values = [v for v in losses.values() if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def _final(entry: dict) -> dict | None:
    evaluated = [r for r in entry["records"] if r["heldout_loss"]]
    return evaluated[-1] if evaluated else None


def _mean_std(values: list[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def summary_rows(runs: dict[str, dict], rounds: int) -> list[dict]:
    """One row per (variant, lr): finished seeds only, mean ± std over them."""
    groups: dict[tuple, list[dict]] = {}
    for entry in runs.values():
        last = _final(entry)
        if last is None or last["round"] < rounds:
            continue
        groups.setdefault((entry["variant"], entry["lr"]), []).append(entry)
    rows = []
    for (variant, lr), entries in sorted(groups.items()):
        finals = [_final(e) for e in entries]
        domains = sorted(finals[0]["heldout_loss"])
        n_rounds = [len(e["records"]) for e in entries]
        up = [sum(r["upload_bytes"] for r in e["records"]) / n / MiB for e, n in zip(entries, n_rounds)]
        down = [sum(r["download_bytes"] for r in e["records"]) / n / MiB for e, n in zip(entries, n_rounds)]
        paper = [sum(r["upload_paper_bytes"] + r["download_paper_bytes"] for r in e["records"]) / n / MiB
                 for e, n in zip(entries, n_rounds)]
        diag = [_adapter_diagnostics(e) for e in entries]
        rows.append({
            "variant": variant, "method": entries[0]["method"], "lr": lr, "seeds": sorted(e["seed"] for e in entries),
            "rounds": rounds,
            "mean": _mean_std([_mean_loss(f["heldout_loss"]) for f in finals]),
            "domains": {d: _mean_std([f["heldout_loss"][d] for f in finals]) for d in domains},
            "base": _mean_std([_mean_loss(e["base_heldout"]) for e in entries if e["base_heldout"]]),
            "up_mib": statistics.fmean(up), "down_mib": statistics.fmean(down), "paper_mib": statistics.fmean(paper),
            "wall_minutes": statistics.fmean([e["wall_seconds"] / 60 for e in entries if e["wall_seconds"]] or
                                             [math.nan]),
            "along": statistics.fmean([d[0] for d in diag]), "orthogonal": statistics.fmean([d[1] for d in diag]),
            "kept_fraction": statistics.fmean([d[2] for d in diag]), "scale": statistics.fmean([d[3] for d in diag]),
            "server_along": _nanmean([_server_fidelity(e)[0] for e in entries]),
            "server_orthogonal": _nanmean([_server_fidelity(e)[1] for e in entries]),
        })
    return rows


def _adapter_diagnostics(entry: dict) -> tuple[float, float, float, float]:
    """Mean over rounds and clients: along, orthogonal, kept fraction, median scale (nan where not sparse)."""
    along, orth, kept, scale = [], [], [], []
    for record in entry["records"]:
        for client in record.get("diagnostics", {}).values():
            adapter = client["adapter"]
            if adapter["along"] is not None and math.isfinite(adapter["along"]):
                along.append(adapter["along"])
                orth.append(adapter["orthogonal"])
            kept.extend(m["kept_fraction"] for m in client["matrices"].values())
            scale.extend(m["scale_median"] for m in client["matrices"].values() if m["scale_median"] is not None)

    def mean(values):
        return statistics.fmean(values) if values else math.nan

    return mean(along), mean(orth), mean(kept), mean(scale)


def _server_fidelity(entry: dict) -> tuple[float, float]:
    """Mean over rounds of the server's along and orthogonal (the applied change against the exact aggregate of
    the round's updates); nan for runs recorded before the runner measured it."""
    values = [r["server_fidelity"]["adapter"] for r in entry["records"] if r.get("server_fidelity")]
    return (_nanmean([v["along"] for v in values]), _nanmean([v["orthogonal"] for v in values]))


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def _fixed(value: float, digits: int) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


def best_rows(rows: list[dict]) -> list[dict]:
    """Per variant, the lr with the lowest final mean held-out loss."""
    best: dict[str, dict] = {}
    for row in rows:
        if row["variant"] not in best or row["mean"][0] < best[row["variant"]]["mean"][0]:
            best[row["variant"]] = row
    return sorted(best.values(), key=lambda r: r["mean"][0])


def _pm(value: tuple[float, float], digits: int = 4) -> str:
    return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}" if value[1] else f"{value[0]:.{digits}f}"


def markdown(name: str, rows: list[dict], best: list[dict], rounds: int, runs: dict, meta: dict) -> str:
    domains = sorted(rows[0]["domains"]) if rows else []
    fedavg = min((r["mean"][0] for r in rows if r["method"] == "fedavg"), default=math.nan)
    fedavg_mib = next((r["up_mib"] + r["down_mib"] for r in best if r["method"] == "fedavg"), math.nan)
    lines = [f"### Quality study `{name}`: each method at its best lr ({rounds} rounds)", ""]
    head = ("| variant | lr | seeds | mean held-out | vs best FedAvg | " + " | ".join(domains)
            + " | base (round 0) | up MiB | down MiB | round trip vs FedAvg | paper MiB |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in best:
        ratio = (r["up_mib"] + r["down_mib"]) / fedavg_mib if fedavg_mib == fedavg_mib else math.nan
        lines.append(f"| {r['variant']} | {r['lr']:g} | {len(r['seeds'])} | {_pm(r['mean'])} | "
                     f"{100 * (r['mean'][0] / fedavg - 1):+.2f}% | " + " | ".join(_pm(r["domains"][d]) for d in domains)
                     + f" | {_pm(r['base'])} | {r['up_mib']:.3f} | {r['down_mib']:.3f} | {100 * ratio:.1f}% | "
                     f"{r['paper_mib']:.3f} |")
    lines += ["", "#### Learning-rate sweep (final mean held-out loss; diagnostics averaged over rounds and clients)",
              "",
              "along / orthogonal: each client's rebuilt upload against its trained update; server along / "
              "orthogonal: the change each round applied against the exact aggregate of the updates it got "
              "(- where the run predates it).", "",
              "| variant | lr | seeds | mean held-out | along | orthogonal | kept fraction | L1 scale | "
              "server along | server orthogonal | wall min/run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['lr']:g} | {len(r['seeds'])} | {_pm(r['mean'])} | {r['along']:.3f} | "
                     f"{r['orthogonal']:.3f} | {r['kept_fraction']:.4f} | {r['scale']:.2f} | "
                     f"{_fixed(r.get('server_along', math.nan), 3)} | "
                     f"{_fixed(r.get('server_orthogonal', math.nan), 3)} | {r['wall_minutes']:.1f} |")
    unfinished = sorted(k for k, e in runs.items() if (_final(e) or {"round": 0})["round"] < rounds)
    if unfinished:
        lines += ["", "Unfinished runs (not in the tables): " + ", ".join(f"`{k}`" for k in unfinished)]
    lines += ["", f"Machine: {meta['machine']}. Command: `{meta['command']}`."]
    return "\n".join(lines) + "\n"


def loss_axis(curves: list[list[float]]) -> tuple[float, float]:
    """The plots' loss range: from just under the lowest point to just over the highest base loss
    (each curve's first point), so that a run that diverges (18.4 after 12 rounds, against a base
    of 2.85) leaves the chart instead of squashing every other curve into its bottom tenth."""
    points = [y for ys in curves for y in ys if math.isfinite(y)]
    if not points:
        return 0.0, 1.0
    starts = [ys[0] for ys in curves if ys and math.isfinite(ys[0])]
    low, high = min(points), max(starts or points)
    pad = 0.05 * max(high - low, 1e-3)
    return low - pad, high + pad


def plot(runs: dict[str, dict], best: list[dict], path_rounds: Path, path_mib: Path, name: str) -> None:
    """Mean held-out loss against round and against cumulative MiB per client, one line per best variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    for path, by_traffic in ((path_rounds, False), (path_mib, True)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        curves = []
        for row in best:
            entries = [e for e in runs.values() if e["variant"] == row["variant"] and e["lr"] == row["lr"]]
            points: dict[float, list[float]] = {}
            for entry in entries:
                total = 0.0
                if entry["base_heldout"]:
                    points.setdefault(0.0, []).append(_mean_loss(entry["base_heldout"]))
                for record in entry["records"]:
                    total += (record["upload_bytes"] + record["download_bytes"]) / MiB
                    if record["heldout_loss"]:
                        x = total if by_traffic else float(record["round"])
                        points.setdefault(x, []).append(_mean_loss(record["heldout_loss"]))
            xs = sorted(points)
            curves.append((row, xs, [statistics.fmean(points[x]) for x in xs]))
        # round 0 has sent nothing: on the log axis every base point sits at one left edge
        left = min((x for _, xs, _ in curves for x in xs if x > 0), default=1.0) / 3
        bottom, top = loss_axis([ys for _, _, ys in curves])
        for row, xs, ys in curves:
            xs = [left if by_traffic and x == 0 else x for x in xs]
            off = " - diverged, off the chart" if max(ys, default=0.0) > top else ""
            ax.plot(xs, ys, marker="o", label=f"{row['variant']} lr={row['lr']:g} ({len(row['seeds'])} seeds){off}")
        ax.set_ylim(bottom, top)
        ax.set_ylabel("mean held-out loss (4 domains)")
        if by_traffic:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlabel("cumulative MiB per client (encoded, up + down); leftmost point: base model")
            ax.set_title(f"{name}: held-out loss against traffic")
        else:
            ax.set_xlabel("round (0 = base model)")
            ax.set_title(f"{name}: held-out loss against round")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def report(data: dict, command: str) -> Path:
    import torch

    name = data["study"]["name"]
    rounds = data.get("run", {}).get("rounds", 3)
    runs = collect(data)
    rows = summary_rows(runs, rounds)
    best = best_rows(rows)
    threads = sorted({e.get("threads") for e in runs.values() if e.get("threads")})
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                       f"{'/'.join(map(str, threads)) or '?'} torch thread(s) per run process",
            "command": command}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"quality-{name}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"study": data["study"], "run": data.get("run", {}), "grid": data["grid"], "meta": meta,
                               "rows": rows, "best": best, "runs": runs}, indent=1, allow_nan=True))
    os.replace(tmp, out)
    (RESULTS / f"quality-{name}.md").write_text(markdown(name, rows, best, rounds, runs, meta))
    if best:
        plot(runs, best, RESULTS / f"quality-{name}-rounds.png", RESULTS / f"quality-{name}-mib.png", name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="a study TOML under benchmarks/quality/")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from the runs on disk")
    parser.add_argument("--shard", default="1/1", help="i/n: run every n-th run from the i-th (parallel processes)")
    parser.add_argument("--only", default="", help="comma-separated texts: run only the runs whose key contains one, "
                                                   "in the order of the texts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    parser.add_argument("--results", type=Path, default=None, help="report folder (default: benchmarks/results)")
    args = parser.parse_args(argv)
    if args.results is not None:
        global RESULTS
        RESULTS = args.results
    data = load_study(args.study)
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.report:
        index, count = (int(x) for x in args.shard.split("/"))
        patterns = [p for p in args.only.split(",") if p] or [""]
        todo = [r for i, r in enumerate(expand(data)) if i % count == index - 1
                and any(p in r["key"] for p in patterns)]
        todo.sort(key=lambda r: next(i for i, p in enumerate(patterns) if p in r["key"]))
        for number, run in enumerate(todo, 1):
            print(f"[quality] run {number}/{len(todo)}: {run['key']}", flush=True)
            run_one(data, run, log=lambda line: print(line[:400], flush=True))
            report(data, command)
    print(f"[quality] report: {report(data, command)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
