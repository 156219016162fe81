"""benchmarks/gpu/run.sh --dry-run: the GPU run's whole flow on the CPU (tiny shapes, Triton interpreted),
so that the one command a short GPU lease gets is known to work before the lease starts.

~55 s on the 2-core dev box under load (one process per benchmark, each importing torch).
The other tests here check the driver's bookkeeping (a failing, hanging or missing step; the budget)
in a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["wheels", "env", "build", "gpu-tests", "sanitizer-cuda-ops", "bench_sparsify", "server", "bench_cuda",
         "bench_download", "bench_reconstruct", "device-tests", "sanitizer-triton", "comm", "bench_client",
         "bench_wire"]
# The benchmarks writing timing.write_json's tables: each way's median ms, bytes, GB/s, the copy bandwidth of the
# same run and the fraction of it, speed-up, peak GPU MiB (None on the CPU).
TABLE_STEPS = ["bench_sparsify", "bench_download", "bench_reconstruct", "bench_wire"]
ROW_KEYS = {"way", "ms", "bytes", "gbs", "copy_gbs", "of_copy", "speed_up", "peak_mib"}
NEED_GPU = {"build", "sanitizer-cuda-ops", "device-tests", "sanitizer-triton"}


def _driver():
    return load_script(ROOT / "benchmarks" / "gpu" / "run.py", "gpu_run")


@pytest.mark.slow  # ~50 s: still in CI (.ci/run runs the whole suite), out of the fast tier (pyproject.toml)
def test_dry_run_writes_the_report(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), str(out), "--dry-run"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() for f in files), files
    assert {"results.json", "summary.md", "run.log", "bench.log", "tests.log"} <= {f.name for f in files}

    report = json.loads((out / "results.json").read_text())
    assert report["mode"] == "dry-run"
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == STEPS
    for name, step in steps.items():
        if name in NEED_GPU:
            assert step["status"] == "skipped" and "no GPU" in step["reason"], step
        elif name != "wheels":
            assert step["status"] == "ok", (name, step.get("tail"))
    assert steps["gpu-tests"]["pytest"]["failures"] == 0 and steps["gpu-tests"]["pytest"]["tests"] > 0
    server = steps["server"]["json"]  # server.py's --json figures, merged into the report
    assert {(r["method"], r["path"]) for r in server["rounds"]} == {
        ("fedsrd", p) for p in ("plain dense fp32", "auto", "exact", "randomized", "reference")} | {
        ("fedsrd-e", p) for p in ("plain dense fp32", "delta", "reference")}
    assert server["plain_pairs"] == 1 and server["pairs"] == 2 and server["copy_gbs"] > 0
    for row in server["rounds"]:
        assert row["of_copy"] == pytest.approx(row["gbs"] / server["copy_gbs"]), row
        # The bound for the package's paths; the plain fp32 pinv route is looser (1e-5 measured).
        assert row["error"] < (1e-3 if row["path"].startswith("plain") else 1e-5), row
        if row["path"].startswith("plain"):
            assert row["plain_scale"] == 2 and row["speedup"] == 1.0, row
    assert steps["bench_client"]["json"]["speed_up"] > 0
    assert steps["bench_cuda"]["json"]["skipped"] == "no CUDA", "bench_cuda's JSON says why it has no figures"
    for name in TABLE_STEPS:
        figures = steps[name].get("json")
        assert figures and figures["device"] == "CPU" and figures["copy_gbs"] > 0, (name, steps[name])
        rows = [row for table in figures["tables"] for row in table["rows"]]
        assert rows, name
        for row in rows:
            assert set(row) == ROW_KEYS and row["ms"] > 0 and row["peak_mib"] is None, (name, row)
            assert row["copy_gbs"] == figures["copy_gbs"], (name, row)
            if row["bytes"]:
                assert row["of_copy"] == pytest.approx(row["gbs"] / row["copy_gbs"]), (name, row)
        assert any(row["speed_up"] == 1.0 for row in rows), f"{name}: no baseline row"
    ways = {name: {row["way"] for t in steps[name]["json"]["tables"] for row in t["rows"]} for name in TABLE_STEPS}
    assert any(way.startswith("plain (authors'") for way in ways["bench_sparsify"])
    assert {"torch (CPU mask + dense add)", "triton, grouped"} <= ways["bench_download"]
    assert {"torch reference", "triton"} <= ways["bench_reconstruct"]
    titles = [t["title"] for t in steps["bench_wire"]["json"]["tables"]]
    assert "client update, CPU" in titles and sum(t.startswith("broadcast") for t in titles) == 2, titles
    summary = (out / "summary.md").read_text()
    assert "| step | status | seconds | note |" in summary
    assert all(f"| {name} |" in summary for name in STEPS)
    # One figures table per benchmark (server and bench_client have their own columns).
    assert summary.count("| part | way | ms | GB/s | % of copy | speed-up | peak MiB |") == len(TABLE_STEPS)
    assert "| client update, CPU | encode |" in summary and "| method | clients | path | ms/round |" in summary


def test_a_failing_or_hanging_step_is_recorded_and_the_run_goes_on(tmp_path):
    gpu_run = _driver()
    run = gpu_run.Run(tmp_path, dry=True, budget=60, scratch=tmp_path)
    failing = gpu_run.Step("fails", "bench.log", 30, [sys.executable, "-c", "print('half'); raise SystemExit(3)"])
    hanging = gpu_run.Step("hangs", "bench.log", 1, [sys.executable, "-c", "import time; time.sleep(60)"])
    missing = gpu_run.Step("missing", "bench.log", 5, [str(tmp_path / "no-such-program")])
    assert run.execute(failing)["status"] == "failed" and run.results[-1]["tail"] == ["half"]
    assert run.execute(hanging)["status"] == "timeout"
    assert run.execute(missing)["status"] == "failed"
    run.budget = 0  # nothing left: the next step is skipped, not started
    assert run.execute(failing)["status"] == "skipped"
    assert [r["status"] for r in run.results] == ["failed", "timeout", "failed", "skipped"]
    log = (tmp_path / "bench.log").read_text()
    assert "half" in log and "killed after" in log


def test_summary_renders_the_figures_tables():
    gpu_run = _driver()
    row = {"way": "triton", "ms": 2.0, "bytes": 8e9, "gbs": 4000.0, "copy_gbs": 4000.0, "of_copy": 1.0,
           "speed_up": 3.0, "peak_mib": 512.4}
    data = {"device": "H200", "copy_gbs": 4000.0, "tables": [{"title": "apply", "baseline": "torch", "rows": [row]}]}
    lines = gpu_run.json_markdown(data)
    assert lines[-1] == "| apply (vs torch) | triton | 2.000 | 4000.0 | 100.0% | 3.00x | 512 |", lines
    broken = {"device": "H200", "tables": [{"title": "apply", "rows": [{"way": "x"}]}]}
    assert "not rendered" in gpu_run.json_markdown(broken)[0]  # a missing figure does not lose the report
    assert gpu_run.json_markdown(None) == [] and gpu_run.json_markdown({"skipped": "no CUDA", "tables": []}) == []


def test_pytest_report_counts(tmp_path):
    gpu_run = _driver()
    assert "error" in gpu_run.junit_counts(tmp_path / "absent.xml")
    (tmp_path / "r.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.t" name="a"/><testcase classname="tests.t" name="b"><failure/></testcase>'
        '<testcase classname="tests.t" name="c"><skipped/></testcase></testsuite></testsuites>')
    counts = gpu_run.junit_counts(tmp_path / "r.xml")
    assert counts["passed"] == 1 and counts["failed_tests"] == ["tests.t::b"]


def test_wheels_unzip_fallback(tmp_path):
    import zipfile

    wheel = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo_pkg/__init__.py", "VALUE = 42\n")
    site = tmp_path / "site"
    assert "1 wheels" in _driver().unzip_wheels([wheel], site)
    code = "import demo_pkg; print(demo_pkg.VALUE)"
    got = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True,
                         text=True, timeout=60)
    assert got.stdout.strip() == "42", got.stderr


PARSE_ONLY = r"""
import argparse, json, runpy, sys

class Parsed(Exception):
    pass

def parse_then_stop(self, args=None, namespace=None):
    namespace = original(self, args, namespace)  # exits 2 on an unknown flag or a bad value
    raise Parsed()

original = argparse.ArgumentParser.parse_args
argparse.ArgumentParser.parse_args = parse_then_stop
failures = {}
for argv in json.loads(sys.argv[1]):
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
        failures[" ".join(argv)] = "did not parse its arguments"
    except Parsed:
        pass
    except SystemExit as exc:
        failures[" ".join(argv)] = f"exit {exc.code}"
print(json.dumps(failures))
"""


def test_every_gpu_benchmark_command_parses(tmp_path):
    """The full-size commands only ever run on a GPU lease: each one's flags are checked here, by its own parser."""
    gpu_run = _driver()
    device, cpu_side = gpu_run.benchmark_steps(True, tmp_path)
    argvs = [step.argv[1:] for step in device + cpu_side]
    assert {Path(a[0]).name for a in argvs} >= {"server.py", "bench_sparsify.py", "bench_download.py",
                                                "bench_reconstruct.py", "bench_cuda.py", "bench_client.py"}
    proc = subprocess.run([sys.executable, "-c", PARSE_ONLY, json.dumps(argvs)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}, proc.stderr[-3000:]
