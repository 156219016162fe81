"""Summaries of finished runs: a comparison table and the loss-vs-traffic plot."""

from __future__ import annotations

from pathlib import Path

MiB = 2**20


def summary_rows(records_by_method: dict[str, list[dict]],
                 base_by_method: dict[str, dict[str, float] | None] | None = None) -> list[dict]:
    """One row per method: held-out loss per client after its last evaluated round (and of the
    base model, round 0, when known), traffic and time per round."""
    rows = []
    for method, records in records_by_method.items():
        if not records:
            continue
        last = next((r for r in reversed(records) if r["heldout_loss"]), records[-1])
        rounds = len(records)
        base = (base_by_method or {}).get(method)
        rows.append({
            "method": method,
            "rounds": rounds,
            "heldout_loss": last["heldout_loss"],
            "mean_heldout_loss": _mean(last["heldout_loss"]),
            "base_heldout_loss": base,
            "base_mean_heldout_loss": _mean(base) if base else None,
            "up_mib": sum(r["upload_bytes"] for r in records) / rounds / MiB,
            "down_mib": sum(r["download_bytes"] for r in records) / rounds / MiB,
            "paper_mib": sum(r["upload_paper_bytes"] + r["download_paper_bytes"] for r in records) / rounds / MiB,
            "server_s": sum(r["server_seconds"] for r in records) / rounds,
            "client_s": sum(sum(r["client_seconds"].values()) / len(r["client_seconds"]) for r in records) / rounds,
        })
    return rows


def _mean(losses: dict[str, float]) -> float:
    return sum(losses.values()) / len(losses) if losses else float("nan")


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rounds)"
    clients = sorted(rows[0]["heldout_loss"])
    head = (f"{'method':18} {'rounds':>6} " + " ".join(f"{c[:10]:>10}" for c in clients)
            + f" {'mean':>8} {'up MiB':>8} {'down MiB':>9} {'paper MiB':>10} {'server s':>9} {'client s':>9}")
    lines = [head, "-" * len(head)]
    base = next((row["base_heldout_loss"] for row in rows if row.get("base_heldout_loss")), None)
    if base:  # every method starts from the same base model on the same held-out texts
        losses = " ".join(f"{base.get(c, float('nan')):>10.4f}" for c in clients)
        lines.append(f"{'base model':18} {0:>6} {losses} {_mean(base):>8.4f}")
    for row in rows:
        losses = " ".join(f"{row['heldout_loss'].get(c, float('nan')):>10.4f}" for c in clients)
        lines.append(f"{row['method']:18} {row['rounds']:>6} {losses} {row['mean_heldout_loss']:>8.4f} "
                     f"{row['up_mib']:>8.3f} {row['down_mib']:>9.3f} {row['paper_mib']:>10.3f} "
                     f"{row['server_s']:>9.3f} {row['client_s']:>9.2f}")
    return "\n".join(lines) + ("\n(held-out loss: the base model's, round 0, and after the last evaluated round; "
                              "traffic and time are per round and client)")


def plot_loss_vs_traffic(records_by_method: dict[str, list[dict]], path: Path,
                         base_by_method: dict[str, dict[str, float] | None] | None = None) -> Path:
    """Mean held-out loss vs cumulative MiB per client (upload + download), one line per method.

    The base model (round 0) has sent nothing; its point sits at the left edge of the log axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = {}
    for method, records in records_by_method.items():
        total, xs, ys = 0.0, [], []
        for r in records:
            total += (r["upload_bytes"] + r["download_bytes"]) / MiB
            if r["heldout_loss"]:
                xs.append(total)
                ys.append(_mean(r["heldout_loss"]))
        curves[method] = xs, ys
    left = min((x for xs, _ in curves.values() for x in xs if x > 0), default=1.0) / 3
    for method, (xs, ys) in curves.items():
        base = (base_by_method or {}).get(method)
        if base:
            xs, ys = [left, *xs], [_mean(base), *ys]
        ax.plot(xs, ys, marker="o", label=method)
    ax.set_title("held-out loss against traffic (leftmost point: base model, round 0)")
    ax.set_xlabel("cumulative MiB per client (encoded, up + down)")
    ax.set_ylabel("mean held-out loss")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
