"""Helpers for the tests that start real Flower processes on 127.0.0.1 (no flwr import here).

Every process goes through ``Processes``, which logs it to a file and, in
``stop_all``, stops it with its whole process tree, each by PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN_DIR = Path(sys.executable).parent
TEXTS = {
    "alpha": [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(40)],
    "beta": [f"The balance of account {i} is {i * 13 % 97} dollars after interest." for i in range(40)],
}

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedsrd-loopback"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedsrd"

[tool.flwr.app.components]
serverapp = "fedsrd_kernels.flower.server_app:app"
clientapp = "fedsrd_kernels.flower.client_app:app"

[tool.flwr.app.config]
{config}
"""


def write_jsonl(folder: Path) -> dict[str, str]:
    paths = {}
    for name, texts in TEXTS.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        paths[name] = str(path)
    return paths


def write_app(app_dir: Path, config: dict) -> Path:
    """A Flower app folder whose components are ours and whose run config is ``config``."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(APP_PYPROJECT.format(
        config="\n".join(f"{k} = {json.dumps(v)}" for k, v in config.items())))
    (app_dir / "loopback.py").write_text('"""Components live in fedsrd_kernels.flower."""\n')
    return app_dir


def flower_env(home: Path) -> dict[str, str]:
    """The environment of every Flower process: its own FLWR_HOME, no telemetry, no network installs."""
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1",
            "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def descendants(pid: int) -> list[int]:
    """PIDs below ``pid`` (Flower starts its SuperExec in a new session, out of our process group)."""
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except Exception:  # psutil missing or the process gone: the process group still goes
        return []


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started, its process group and every descendant, each by PID."""
    pids = descendants(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, sig)  # our child leads its own session: pgid == pid
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue


class Processes:
    """Flower processes started in their own sessions, logged to ``logs/<name>.log``."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.cwd, self.env = cwd, env
        self.logs = cwd / "logs"
        self.logs.mkdir(exist_ok=True)
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen([str(BIN_DIR / args[0]), *args[1:]], env=self.env, cwd=self.cwd, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def all_logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.stem}\n{self.log(p.stem, tail)}" for p in sorted(self.logs.iterdir()))

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


def in_process_run(out_dir: Path, config: dict, jsonl: dict[str, str]) -> tuple[dict, list[dict]]:
    """The same federation run by runner.loop.federate in this process: (final adapter, round records)."""
    import torch

    from fedsrd_kernels.runner.config import RunConfig
    from fedsrd_kernels.runner.loop import federate
    from fedsrd_kernels.runner.model import tiny_llama
    from fedsrd_kernels.runner.run import build_clients
    from fedsrd_kernels.runner.train import adapter_state, lora_model

    cfg = RunConfig(**config, out_dir=str(out_dir))
    model, tokenizer = tiny_llama(seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    peft_model = lora_model(model, cfg)
    clients = build_clients(cfg.replace(domains=(), jsonl=jsonl), tokenizer, log=lambda _: None)
    records = federate(peft_model, tokenizer, clients, cfg, log=lambda _: None, show_progress=False)
    return adapter_state(peft_model), records


def assert_same_adapter(got: dict, want: dict) -> None:
    import torch

    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
