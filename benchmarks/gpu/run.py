"""The GPU validation and benchmark run, in one command (see run.sh): wheels, build, tests, sanitizer,
benchmarks, with every result in one flat output folder.

    benchmarks/gpu/run.sh OUT            # on the GPU machine: the whole run, within --budget seconds
    benchmarks/gpu/run.sh OUT --dry-run  # anywhere: tiny shapes on the CPU (Triton interpreted),
                                         # the GPU-only steps marked "skipped: no GPU"

Steps run in order of value, each in its own process with its own timeout, cut to what is left of
the total budget (a lease is short: what does not fit is recorded as skipped, not lost in a kill).
A failing or timed-out step is logged and recorded; the run goes on. Without a CUDA device the run
falls back to the dry-run shapes by itself (full shapes on the interpreter would take hours).

OUT (the first argument, else $OUT) gets at most 8 files, flat:
  results.json  every step: status, seconds, command, output tail, its --json figures where it
                writes some, pytest counts and failures; the machine (device, torch, Triton, CUDA)
  summary.md    a markdown report to paste into BENCHMARKS.md
  run.log       this driver's progress;  setup.log  wheels + build;  tests.log  pytest;
  sanitizer.log compute-sanitizer;       bench.log  every benchmark's output
Scratch (the wheels' site folder, the benchmarks' JSON, pytest's XML) goes to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
TAIL_LINES = 60  # output lines kept per step in results.json and summary.md

# Tests that need CUDA (they skip cleanly without it), most valuable first.
GPU_TESTS = ["tests/test_cuda_ops.py", "tests/test_gpu.py", "tests/test_cuda_compile.py"]
# The interpreter suites, which run their kernels on the device when there is one.
DEVICE_TESTS = ["tests/test_download_triton.py", "tests/test_reconstruct_triton.py",
                "tests/test_sparsify_triton.py", "tests/test_philox.py"]

ENV_PROBE = r"""
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(0), capability="%d.%d" % torch.cuda.get_device_capability(0),
                device_memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
try:
    import triton
    info["triton"] = triton.__version__
except Exception as exc:
    info["triton"] = f"not importable: {exc}"
for name in ("numpy", "safetensors", "zstandard", "hypothesis", "scipy", "pytest"):
    try:
        info[name] = __import__(name).__version__
    except Exception as exc:
        info[name] = f"missing: {exc}"
import fedsrd_kernels
info["fedsrd_kernels"] = fedsrd_kernels.__version__
info["backend"] = {k: str(v) for k, v in fedsrd_kernels.backend_info().items()}
print("ENV " + json.dumps(info))
"""


@dataclass
class Step:
    name: str
    log: str  # file in OUT the output goes to
    timeout: float  # seconds, before the budget cut
    argv: list[str] | None = None  # None: decided when the step runs
    env: dict[str, str] = field(default_factory=dict)
    json_out: str | None = None  # a --json file the step writes (scratch), merged into results.json
    junit: str | None = None  # pytest's XML (scratch)
    benchmark: bool = False


class Run:
    def __init__(self, out: Path, dry: bool, budget: float, scratch: Path):
        self.out, self.dry, self.budget, self.scratch = out, dry, budget, scratch
        self.start = time.monotonic()
        self.results: list[dict] = []
        self.env_info: dict = {}
        self.gpu = False  # known after the env step
        self.pythonpath = os.environ.get("PYTHONPATH", "")
        self.run_log = open(out / "run.log", "a", buffering=1)

    def say(self, line: str) -> None:
        stamp = f"[{time.monotonic() - self.start:6.1f}s] {line}"
        print(stamp, flush=True)
        self.run_log.write(stamp + "\n")

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def child_env(self, extra: dict[str, str]) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=self.pythonpath)
        cuda_bin = cuda_home_bin()
        if cuda_bin and not shutil.which("nvcc"):  # tests/test_cuda_compile.py looks for nvcc on PATH
            env["PATH"] = os.pathsep.join((cuda_bin, env.get("PATH", "")))
        if self.dry:
            # The dry run behaves as a CPU machine even where a GPU is visible: same shapes, same path.
            env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
        env.update(extra)
        return env

    def record(self, step: Step, status: str, reason: str = "", seconds: float = 0.0, **more) -> dict:
        row = {"name": step.name, "status": status, "reason": reason, "seconds": round(seconds, 2), "log": step.log,
               **more}
        self.results.append(row)
        self.say(f"{step.name}: {status}{' (' + reason + ')' if reason else ''} in {seconds:.1f} s")
        return row

    def skip(self, step: Step, reason: str) -> dict:
        with open(self.out / step.log, "a") as log:
            log.write(f"\n===== {step.name}: skipped: {reason}\n")
        return self.record(step, "skipped", reason)

    def execute(self, step: Step) -> dict:
        """Run one step's process with its timeout cut to the budget; its output goes to its log and the console."""
        left = self.left() - 5  # a few seconds for the report
        if left < 10:
            return self.skip(step, f"out of time: {self.left():.0f} s of the {self.budget:.0f} s budget left")
        timeout = min(step.timeout, left)
        # The interpreter's path says nothing to a reader; the env probe's source would flood the log.
        cmd = " ".join(step.argv).replace(PY, "python").replace(ENV_PROBE, "<env probe>").replace(
            str(self.scratch), "<scratch>")  # the scratch folder is gone when the report is read
        self.say(f"{step.name}: {cmd}  (timeout {timeout:.0f} s)")
        lines: list[str] = []
        began = time.monotonic()
        with open(self.out / step.log, "a", buffering=1) as log:
            log.write(f"\n===== {step.name}: {cmd}\n")
            try:
                # Own session: a timeout kills the step's whole process group (pytest's or nvcc's children too).
                proc = subprocess.Popen(step.argv, cwd=ROOT, env=self.child_env(step.env), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                                        start_new_session=True)
            except OSError as exc:
                log.write(f"could not start: {exc}\n")
                return self.record(step, "failed", f"could not start: {exc}", command=cmd)

            def pump():
                for line in proc.stdout:
                    log.write(line)
                    lines.append(line.rstrip("\n"))
                    print(f"  {step.name} | {line}", end="", flush=True)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                rc = proc.wait(timeout=timeout)
                status, reason = ("ok", "") if rc == 0 else ("failed", f"exit code {rc}")
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
                status, reason = "timeout", f"killed after {timeout:.0f} s"
            reader.join(timeout=10)
            seconds = time.monotonic() - began
            log.write(f"===== {step.name}: {status} {reason} ({seconds:.1f} s)\n")
        more = {"command": cmd, "returncode": rc, "tail": lines[-TAIL_LINES:]}
        if step.json_out and Path(step.json_out).exists():
            try:
                more["json"] = json.loads(Path(step.json_out).read_text())
            except ValueError as exc:
                more["json_error"] = str(exc)
        if step.junit:
            more["pytest"] = junit_counts(Path(step.junit))
            if rc == 5:  # pytest: no tests collected (every file skipped at import) is not a failure
                status, reason = "ok", "no tests collected"
        if step.name == "env":
            for line in lines:
                if line.startswith("ENV "):
                    self.env_info = json.loads(line[4:])
        return self.record(step, status, reason, seconds, **more)


def junit_counts(path: Path) -> dict:
    """Counts and failing test ids from pytest's --junitxml (absent after a timeout)."""
    if not path.exists():
        return {"error": "no report (pytest killed or did not start)"}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["failed_tests"] = failed[:50]
    return counts


def cuda_home_bin() -> str | None:
    """The CUDA toolkit's bin folder, where torch's build looks for nvcc too (CUDA_HOME, else the usual place)."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin")
    return None


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    cuda_bin = cuda_home_bin()
    if cuda_bin and (Path(cuda_bin) / "compute-sanitizer").exists():
        return str(Path(cuda_bin) / "compute-sanitizer")
    return None


def unzip_wheels(wheels: list[Path], site: Path) -> str:
    """pip's fallback: a wheel is a zip of what lands in site-packages (none of ours has scripts or data to place)."""
    import zipfile

    site.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    return f"unzipped {len(wheels)} wheels into {site}"


def benchmark_steps(gpu: bool, scratch: Path) -> list[Step]:
    """Each benchmark's command: full shapes on the GPU, the tiny CPU shapes otherwise."""
    b = "benchmarks"
    # Every benchmark writes its figures to a scratch --json file, merged into results.json and summary.md.
    js = {name: str(scratch / f"{name}.json") for name in ("server", "client", "cuda", "sparsify", "download",
                                                            "reconstruct", "wire")}
    server_json, client_json = js["server"], js["client"]
    if gpu:
        # Most valuable first, as a lease may end early: the client and server targets, then the rest.
        specs = [
            # The plain way is timed on 1 of the 28 layers and scaled (its host round trip per matrix is slow).
            ("bench_sparsify", [f"{b}/bench_sparsify.py", "--repeat", "5", "--plain-layers", "1", "--json",
                                js["sparsify"]], 75, js["sparsify"]),
            # The package's paths run all 28 layers with 4, 16 and 64 clients; the plain way's dense SVDs and
            # pinvs run one layer's 7 pairs and are scaled by 28 (the rule: each layer costs it the
            # same); the float64 oracle (CPU numpy) checks the first pair, once per client count and method.
            ("server", [f"{b}/server.py", "--clients", "4,16,64", "--plain-layers", "1", "--sample", "1",
                        "--repeats", "3", "--stream-clients", "100", "--json", server_json], 180, server_json),
            ("bench_cuda", [f"{b}/bench_cuda.py", "--repeats", "10", "--json", js["cuda"]], 60, js["cuda"]),
            ("bench_download", [f"{b}/bench_download.py", "--warmup", "1", "--repeats", "3", "--json",
                                js["download"]], 90, js["download"]),
            ("bench_reconstruct", [f"{b}/bench_reconstruct.py", "--warmup", "2", "--repeats", "5", "--json",
                                   js["reconstruct"]], 60, js["reconstruct"]),
        ]
        cpu_side = [  # CPU figures, measured here too since the machine is idle (the dev box is not)
            ("comm", [f"{b}/comm.py", "--small"], 45, None),
            ("bench_client", [f"{b}/bench_client.py", "--layers", "2", "--repeat", "5", "--json", client_json], 45,
             client_json),
            # encode / decode of a whole Llama-3.2-3B r=64 client update and of each round's broadcast (+ apply).
            ("bench_wire", [f"{b}/bench_download.py", "--wire", "--repeats", "2", "--json", js["wire"]], 90,
             js["wire"]),
        ]
    else:
        specs = [
            ("bench_sparsify", [f"{b}/bench_sparsify.py", "--small", "--repeat", "1", "--json", js["sparsify"]], 60,
             js["sparsify"]),
            ("server", [f"{b}/server.py", "--square", "64", "--pairs", "2", "--rank", "4", "--clients", "2",
                        "--plain-layers", "1", "--repeats", "1", "--stream-clients", "4", "--json", server_json], 60,
             server_json),
            # bench_cuda says "no CUDA device", writes a JSON saying so, and exits 0.
            ("bench_cuda", [f"{b}/bench_cuda.py", "--json", js["cuda"]], 30, js["cuda"]),
            ("bench_download", [f"{b}/bench_download.py", "--small", "--warmup", "0", "--repeats", "1", "--json",
                                js["download"]], 60, js["download"]),
            ("bench_reconstruct", [f"{b}/bench_reconstruct.py", "--small", "--warmup", "0", "--repeats", "1",
                                   "--json", js["reconstruct"]], 60, js["reconstruct"]),
        ]
        cpu_side = [
            ("comm", [f"{b}/comm.py", "--layers", "1"], 60, None),
            ("bench_client", [f"{b}/bench_client.py", "--layers", "1", "--rank", "8", "--repeat", "1", "--json",
                              client_json], 60, client_json),
            ("bench_wire", [f"{b}/bench_download.py", "--wire", "--small", "--repeats", "1", "--json", js["wire"]],
             60, js["wire"]),
        ]
    return [Step(name, "bench.log", t, [PY, *argv], json_out=j, benchmark=True) for name, argv, t, j in specs], \
        [Step(name, "bench.log", t, [PY, *argv], json_out=j, benchmark=True) for name, argv, t, j in cpu_side]


def pytest_step(name: str, files: list[str], timeout: float, scratch: Path) -> Step:
    junit = str(scratch / f"{name}.xml")
    return Step(name, "tests.log", timeout, [PY, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
                                             f"--junitxml={junit}", *files], junit=junit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU shapes, GPU-only steps skipped")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 470; dry 240)")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of carried wheels (scripts/gpu-wheels.sh)")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("give the output folder as the first argument or in $OUT")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (240.0 if args.dry_run else 470.0)
    scratch = Path(tempfile.mkdtemp(prefix="fedsrd-gpu-run-"))
    run = Run(out, args.dry_run, budget, scratch)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    run.say(f"fedsrd GPU run into {out} ({'dry run' if args.dry_run else 'full'}; budget {budget:.0f} s; "
            f"scratch {scratch})")

    # 1. Wheels the machine lacks, into a site folder first on PYTHONPATH (no network, no dependencies).
    site = Path(os.environ.get("FEDSRD_SITE", Path(tempfile.gettempdir()) / "fedsrd-site"))
    wheels = sorted(Path(args.wheels).glob("*.whl"))
    step = Step("wheels", "setup.log", 60)
    if args.dry_run:
        run.skip(step, "dry run: the environment running it has its packages")
    elif not wheels:
        run.skip(step, f"no wheels in {args.wheels} (scripts/gpu-wheels.sh fetches them)")
    else:
        step.argv = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                     "--upgrade", "--target", str(site), *map(str, wheels)]
        installed = run.execute(step)["status"] == "ok"
        if not installed:  # no pip, or pip refused: unpack them as they are
            try:
                note = unzip_wheels(wheels, site)
                run.record(Step("wheels-unzip", "setup.log", 0), "ok", note)
                installed = True
            except (OSError, ValueError) as exc:
                run.record(Step("wheels-unzip", "setup.log", 0), "failed", str(exc))
        if installed:
            run.pythonpath = os.pathsep.join(p for p in (str(site), str(ROOT), run.pythonpath) if p)
    if str(ROOT) not in run.pythonpath.split(os.pathsep):
        run.pythonpath = os.pathsep.join(p for p in (str(ROOT), run.pythonpath) if p)

    # 2. The machine: device, versions, whether the package imports (zstandard is a hard import).
    run.execute(Step("env", "setup.log", 60, [PY, "-c", ENV_PROBE]))
    run.gpu = bool(run.env_info.get("cuda_available")) and not args.dry_run
    no_gpu = "no GPU" if not args.dry_run else "dry run: no GPU"
    if not run.gpu and not args.dry_run:
        run.say("no CUDA device: falling back to the dry-run shapes")

    # 3. The CUDA extension, in place, for sm_90 only (H100/H200), with every core.
    step = Step("build", "setup.log", 240, [PY, "setup.py", "build_ext", "--inplace"],
                env={"FEDSRD_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": str(os.cpu_count() or 4)})
    build_ok = False
    if not run.gpu:
        run.skip(step, no_gpu)
    else:
        build_ok = run.execute(step)["status"] == "ok"

    # 4. The GPU-only tests (opcheck included, in tests/test_cuda_ops.py).
    # The dry run leaves out test_cuda_compile.py: without nvcc it runs CPU checks CI runs anyway (~30 s).
    run.execute(pytest_step("gpu-tests", GPU_TESTS if run.gpu else GPU_TESTS[:2], 150, scratch))

    # 5. compute-sanitizer memcheck of each CUDA op at a tiny shape.
    sanitizer = find_sanitizer()
    sanitize = [sanitizer or "compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", "--leak-check",
                "no", PY, "benchmarks/gpu/sanitize_case.py"]
    no_cache = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    step = Step("sanitizer-cuda-ops", "sanitizer.log", 90, sanitize, env=no_cache)
    if not run.gpu:
        run.skip(step, no_gpu)
    elif sanitizer is None:
        run.skip(step, "compute-sanitizer is not on PATH (nor in CUDA_HOME/bin)")
    elif not build_ok:
        run.skip(step, "the extension did not build")
    else:
        run.execute(step)

    # 6. Benchmarks on the device, then what else is left: the interpreter suites on the device,
    #    the Triton kernels under the sanitizer, the CPU-side benchmarks.
    device_benches, cpu_benches = benchmark_steps(run.gpu, scratch)
    for step in device_benches:
        run.execute(step)
    step = pytest_step("device-tests", DEVICE_TESTS, 150, scratch)
    if not run.gpu:
        run.skip(step, f"{no_gpu} (these run in CI on the interpreter)")
    else:
        run.execute(step)
    step = Step("sanitizer-triton", "sanitizer.log", 120, [*sanitize, "--triton", "--no-cuda-ops"], env=no_cache)
    if not run.gpu:
        run.skip(step, no_gpu)
    elif sanitizer is None:
        run.skip(step, "compute-sanitizer is not on PATH (nor in CUDA_HOME/bin)")
    else:
        run.execute(step)
    for step in cpu_benches:
        run.execute(step)

    report = {
        "schema": 1,
        "mode": "gpu" if run.gpu else ("dry-run" if args.dry_run else "cpu-fallback"),
        "started": started,
        "duration_s": round(time.monotonic() - run.start, 1),
        "budget_s": budget,
        "git": git_commit(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "compute_sanitizer": sanitizer, "nvidia_smi": nvidia_smi(), **run.env_info},
        "counts": {s: sum(r["status"] == s for r in run.results) for s in ("ok", "failed", "timeout", "skipped")},
        "steps": run.results,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "summary.md").write_text(summary(report))
    run.say(f"done: {report['counts']}; results.json and summary.md in {out}")
    run.run_log.close()
    shutil.rmtree(scratch, ignore_errors=True)
    # The run itself succeeded if it reported; failures are in the report (the caller reads it).
    return 0


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None  # the GPU machine gets a copy of the tree, maybe without .git


def nvidia_smi() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def summary(report: dict) -> str:
    host = report["host"]
    device = host.get("device") or "no GPU (CPU, Triton interpreted)"
    lines = [
        f"## GPU run: {device}, {report['started'][:10]}",
        "",
        f"Mode {report['mode']}; commit {report['git'] or 'unknown'}; torch {host.get('torch')} "
        f"(CUDA {host.get('torch_cuda')}), Triton {host.get('triton')}, Python {host.get('python')}; "
        f"{host.get('cpus')} CPUs; driver: {host.get('nvidia_smi') or 'n/a'}. "
        f"Whole run {report['duration_s']:.0f} s of a {report['budget_s']:.0f} s budget; "
        f"steps: {', '.join(f'{v} {k}' for k, v in report['counts'].items() if v)}. "
        "Produced by `benchmarks/gpu/run.sh`.",
        "",
        "| step | status | seconds | note |",
        "|---|---|---:|---|",
    ]
    for r in report["steps"]:
        note = r["reason"]
        if "pytest" in r and "tests" in r["pytest"]:
            p = r["pytest"]
            note = f"{p['passed']} passed, {p['failures'] + p['errors']} failed, {p['skipped']} skipped" + (
                f"; {note}" if note else "")
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {note.replace('|', '/')} |")
    failed = [(r["name"], t) for r in report["steps"] for t in r.get("pytest", {}).get("failed_tests", [])]
    if failed:
        lines += ["", "Failing tests:", ""] + [f"- {name}: `{t}`" for name, t in failed]
    for r in report["steps"]:
        if r["status"] != "skipped" and (r.get("log") == "bench.log" or r["status"] != "ok"):
            lines += ["", f"### {r['name']} ({r['status']})", "", f"`{r.get('command', '')}`"]
            figures = json_markdown(r.get("json"))
            if figures and r["status"] in ("ok", "timeout"):  # the output stays in results.json and bench.log
                partial = ["", "Partial: the step ran out of time; what it measured before is below."] \
                    if r["status"] == "timeout" else []
                lines += [*partial, "", *figures]
            else:
                lines += ["", "```text", *r.get("tail", [])[-40:], "```"]
    return "\n".join(lines) + "\n"


def _num(value, digits: int = 2, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}{suffix}"


def _sci(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def json_markdown(data) -> list[str]:
    """One markdown table of a benchmark's --json figures (what BENCHMARKS.md takes), or [] where there are none.

    The benchmarks that share timing.write_json's shape (tables of rows) give way, ms, GB/s, % of the copy
    bandwidth measured in the same run, speed-up and peak GPU MiB; server.py and bench_client.py their own."""
    if not isinstance(data, dict):
        return []
    try:
        if data.get("tables"):
            copy = data.get("copy_gbs")
            lines = [f"{data.get('device')}; copy bandwidth {_num(copy, 1)} GB/s (read + write, same run); "
                     "speed-up over each part's first way unless it names another", "",
                     "| part | way | ms | GB/s | % of copy | speed-up | peak MiB |",
                     "|---|---|---:|---:|---:|---:|---:|"]
            for table in data["tables"]:
                for i, row in enumerate(table["rows"]):
                    part = table["title"] if i == 0 else ""
                    if i == 0 and table.get("baseline") and table["baseline"] != row["way"]:
                        part += f" (vs {table['baseline']})"
                    lines.append(f"| {part} | {row['way']} | {_num(row['ms'], 3)} | {_num(row['gbs'], 1)} | "
                                 f"{_num(row['of_copy'], 1, 100, '%')} | {_num(row['speed_up'], 2, suffix='x')} | "
                                 f"{_num(row['peak_mib'], 0)} |")
            return lines
        if data.get("rounds") and isinstance(data["rounds"], list):  # server.py
            plain = data.get("plain_pairs")
            scaled = f"; the plain way ran {plain} of them, its times scaled" if plain not in (None, data["pairs"]) \
                else ""
            lines = [f"{data.get('device')}; {data.get('pairs')} pairs, r={data.get('rank')}{scaled}; copy bandwidth "
                     f"{_num(data.get('copy_gbs'), 1)} GB/s (same run); GB/s counts the uploads and B, A read, the "
                     "moved factor written", "",
                     "| method | clients | path | ms/round | speed-up | GB/s | % of copy | peak MiB | err vs f64 |",
                     "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
            for row in data["rounds"]:
                lines.append(f"| {row['method']} | {row['clients']} | {row['path']} | {_num(row['seconds'], 1, 1e3)} "
                             f"| {_num(row['speedup'], 1, suffix='x')} | {_num(row.get('gbs'), 1)} | "
                             f"{_num(row.get('of_copy'), 1, 100, '%')} | {_num(row.get('peak_mib'), 0)} | "
                             f"{_sci(row['error'])} |")
            lines += ["", "| stream | clients | ms/round | accumulators MiB | peak MiB |", "|---|---:|---:|---:|---:|"]
            for row in data.get("stream", []):
                lines.append(f"| {row['method']} | {row['clients']} | {_num(row['seconds'], 1, 1e3)} | "
                             f"{_num(row['stream_bytes'], 1, 2**-20)} | {_num(row['peak'], 0, 2**-20)} |")
            return lines
        if "ms_per_layer" in data:  # bench_client.py (CPU)
            lines = [f"{data.get('machine')}, {data.get('threads')} thread(s); {data.get('layers')} layer(s), "
                     f"r={data.get('rank')}", "", "| way | ms/layer | CPU ms/layer |", "|---|---:|---:|"]
            for way, ms in data["ms_per_layer"].items():
                lines.append(f"| {way} | {_num(ms, 1)} | {_num(data['cpu_ms_per_layer'].get(way), 1)} |")
            lines.append(f"| speed-up | {_num(data['speed_up'], 1, suffix='x')} | "
                         f"{_num(data['speed_up_cpu'], 1, suffix='x')} |")
            return lines
    except (KeyError, TypeError, ValueError) as exc:  # a figure missing must not lose the rest of the report
        return [f"(figures not rendered: {exc!r}; they are in results.json)"]
    return []


if __name__ == "__main__":
    sys.exit(main())
