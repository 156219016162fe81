"""FedSRD on Flower's Message API: the strategy in-process, and a loopback deployment.

The loopback test starts a real SuperLink and two SuperNodes on 127.0.0.1
(insecure, free ports), submits the app with ``flwr run``, and checks the
final global adapter against runner.loop.federate on the same seed and data.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="flwr is not installed (pip install 'flwr>=1.42')")
pytest.importorskip("peft")

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from fedsrd_kernels.client import sparsify  # noqa: E402
from fedsrd_kernels.flower.records import aggregator_for, bytes_record, records_state, state_records  # noqa: E402
from fedsrd_kernels.flower.strategy import METRICS, UPDATE, FedSRDStrategy  # noqa: E402
from fedsrd_kernels.lora import state_digest  # noqa: E402
from fedsrd_kernels.runner.config import RunConfig  # noqa: E402
from fedsrd_kernels.runner.loop import federate  # noqa: E402
from fedsrd_kernels.runner.model import tiny_llama  # noqa: E402
from fedsrd_kernels.runner.run import build_clients  # noqa: E402
from fedsrd_kernels.runner.train import adapter_state, lora_model  # noqa: E402
from fedsrd_kernels.wire import decode, encode  # noqa: E402

TEXTS = {
    "alpha": [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(40)],
    "beta": [f"The balance of account {i} is {i * 13 % 97} dollars after interest." for i in range(40)],
}
TINY = {"method": "fedsrd", "rounds": 2, "model": "tiny", "rank": 4, "local_steps": 2, "batch_size": 2,
        "seq_len": 32, "seed": 0}


def write_jsonl(folder: Path) -> dict[str, str]:
    paths = {}
    for name, texts in TEXTS.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        paths[name] = str(path)
    return paths


def reply(node_id: int, content: RecordDict) -> Message:
    sent = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node_id,
                   message_type="train")
    return Message(content, reply_to=sent)


def test_strategy_aggregates_encoded_payloads_like_the_aggregator(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity  # a Message needs the identity a ServerApp process has

    for field, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)
    torch.manual_seed(0)
    cfg = RunConfig(**{**TINY, "rounds": 1})
    global_state = adapter_state(lora_model(tiny_llama(seed=0)[0], cfg))
    agg = aggregator_for(cfg)
    gen = torch.Generator().manual_seed(1)
    payloads = {}
    for name, scale in (("beta", 0.02), ("alpha", 0.01)):  # sent out of name order on purpose
        local = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in global_state.items()}
        update = sparsify(local, global_state, agg.client_config, num_samples=10 if name == "alpha" else 30,
                          round=1, client_id=name, base=state_digest(global_state))
        payloads[name] = encode(update)
    replies = [reply(node, RecordDict({UPDATE: bytes_record(payloads[name]),
                                       METRICS: MetricRecord({"train-loss": 1.0})}))
               for node, name in ((7, "beta"), (3, "alpha"))]
    broken = reply(9, RecordDict({UPDATE: bytes_record(b"not a payload")}))
    strategy = FedSRDStrategy(aggregator_for(cfg))
    strategy.global_state = global_state
    arrays, metrics = strategy.aggregate_train(1, [replies[0], broken, replies[1]])

    want = aggregator_for(cfg).aggregate(global_state, [decode(payloads["alpha"]), decode(payloads["beta"])],
                                         weights=[10, 30], round=1)
    assert strategy.last_download == encode(want)
    got = records_state(arrays)
    assert got.keys() == global_state.keys()
    from fedsrd_kernels.server import apply

    expected = apply(global_state, want)
    for key in expected:
        assert torch.equal(got[key], expected[key].to(torch.float32)), key
    assert metrics["clients"] == 2 and metrics["num-examples"] == 40 and metrics["rejected"] == 1
    assert list(strategy.last_rejected) == ["9"] and "not a" in strategy.last_rejected["9"]


def test_state_records_round_trip_bfloat16():
    state = {"a.lora_A.weight": torch.randn(2, 3).to(torch.bfloat16), "a.lora_B.weight": torch.randn(3, 2)}
    back = records_state(*state_records(state))
    for key in state:
        assert back[key].dtype == state[key].dtype and torch.equal(back[key], state[key])


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


def test_loopback_deployment_equals_in_process_run(tmp_path):
    if shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("flower-superlink is not installed next to this Python")
    bin_dir = Path(sys.executable).parent
    data = write_jsonl(tmp_path)
    out_dir = tmp_path / "flower-out"
    config = {**TINY, "out-dir": str(out_dir), "min-nodes": 2}
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(APP_PYPROJECT.format(
        config="\n".join(f"{k} = {json.dumps(v)}" for k, v in config.items())))
    (app_dir / "loopback.py").write_text('"""Components live in fedsrd_kernels.flower."""\n')
    link_port, node_a, node_b = free_ports(3)  # one HTTP port serves the Fleet, Control and Runtime APIs
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\n'
        "insecure = true\n")
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "w")
        proc = subprocess.Popen([str(bin_dir / args[0]), *args[1:]], env=env, cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        link = start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                     "--host", "127.0.0.1", "--port", str(link_port))
        try:
            wait_for_port(link_port, link)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{exc}\n{(logs / 'superlink.log').read_text()[-3000:]}")
        for (name, path), port in zip(data.items(), (node_a, node_b)):
            start(name, "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                  "--host", "127.0.0.1", "--port", str(port), "--node-config", f"name='{name}' jsonl='{path}'")
        run = subprocess.run([str(bin_dir / "flwr"), "run", str(app_dir), "loopback", "--stream"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=240)
        result = out_dir / "global_adapter.safetensors"
        if not result.exists():
            tails = {p.name: p.read_text()[-3000:] for p in logs.iterdir()}
            pytest.fail(f"no result; flwr run rc={run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n"
                        + "\n".join(f"--- {k}\n{v}" for k, v in tails.items()))
    finally:
        for proc in reversed(procs):
            stop(proc)

    from safetensors.torch import load_file

    flower_state = load_file(str(result))
    rounds = [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients"]) for r in rounds] == [(1, 2), (2, 2)]
    # round 1 ships the whole adapter; round 2 only the encoded round-1 Broadcast
    assert [r["full-adapter-sent"] for r in rounds] == [2, 0]
    cfg = RunConfig(**TINY, out_dir=str(tmp_path / "in-process"))
    model, tokenizer = tiny_llama(seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    peft_model = lora_model(model, cfg)
    clients = build_clients(cfg.replace(domains=(), jsonl=data), tokenizer, log=lambda _: None)
    federate(peft_model, tokenizer, clients, cfg, log=lambda _: None, show_progress=False)
    want = adapter_state(peft_model)
    assert flower_state.keys() == want.keys()
    for key in want:
        assert torch.equal(flower_state[key], want[key]), key
