"""Timing helpers shared by the benchmark scripts, and the rows their --json files hold."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median time of ``fn`` in ms after ``warmup`` untimed calls, the device synchronised around each.

    On CUDA the time is read from CUDA events recorded on the stream around the call (the GPU's own clock,
    free of the host's timer and of the synchronise's return latency); elsewhere from the wall clock.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        if device.type == "cuda":
            start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start_event.record()
            fn()
            end_event.record()
            end_event.synchronize()
            synchronize(device)  # work fn put on other streams, if any, is over before the next call
            times.append(start_event.elapsed_time(end_event))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> tuple[float, float | None]:
    """(median ms, peak GPU MiB) of ``fn``: the peak is what the allocator held at most over the warm-up and the
    timed calls, the inputs already resident included (None off CUDA, where torch keeps no such count)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    ms = time_ms(fn, device, warmup, repeats)
    return ms, peak_mib(device)


def peak_mib(device: torch.device) -> float | None:
    """The allocator's peak since the last reset, in MiB; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def copy_bandwidth(device: torch.device, mib: int, repeats: int) -> float:
    """GB/s of ``dst.copy_(src)`` on ``device`` (bytes read + written): the floor every kernel is held to."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=2, repeats=repeats)
    return 2 * src.numel() * 4 / ms / 1e6


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def json_row(way: str, ms: float, nbytes: float | None, copy_gbs: float, baseline_ms: float | None,
             peak: float | None) -> dict:
    """One measured way as the --json files hold it: GB/s is the bytes the way must move at least over its median
    time; ``of_copy`` that over the copy bandwidth measured in the same run; ``speed_up`` the baseline's time over
    this one's."""
    gbs = nbytes / ms / 1e6 if nbytes else None
    return {"way": way, "ms": ms, "bytes": nbytes, "gbs": gbs, "copy_gbs": copy_gbs,
            "of_copy": gbs / copy_gbs if gbs is not None and copy_gbs else None,
            "speed_up": baseline_ms / ms if baseline_ms and ms else None,
            "peak_mib": None if peak is None else round(peak, 1)}


def write_json(path: str | Path, benchmark: str, device: torch.device, copy_gbs: float, tables: list[dict],
               **fields) -> None:
    """A benchmark's --json file: what ran where, then ``tables`` (each a title, the baseline way and json_row
    rows), the shape every benchmark shares so that benchmarks/gpu/run.py renders them alike."""
    payload = {"benchmark": benchmark, "device": device_name(device), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "copy_gbs": copy_gbs, **fields, "tables": tables}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1) + "\n")


def json_table(title: str, rows: list[tuple], baseline_ms: float | None, copy_gbs: float, **fields) -> dict:
    """A printed table's rows (name, ms, bytes[, peak MiB]) as json_row dicts; the baseline is the way
    the printed speed-ups divide by."""
    return {"title": title, **fields,
            "rows": [json_row(r[0], r[1], r[2], copy_gbs, baseline_ms, r[3] if len(r) > 3 else None) for r in rows]}
