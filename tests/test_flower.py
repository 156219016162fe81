"""FedSRD on Flower's Message API: the strategy in-process, and a loopback deployment.

The loopback test starts a real SuperLink and two SuperNodes on 127.0.0.1
(insecure, free ports), submits the app with ``flwr run`` for rounds 1-2, then
again for round 3 (the ServerApp resumes from its committed state), and checks
the final global adapter against runner.loop.federate on the same seed and data.
"""

import json
import shutil
import subprocess

import pytest
import torch

pytest.importorskip("flwr", reason="flwr is not installed (pip install 'flwr>=1.42')")
pytest.importorskip("peft")

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from fedsrd_kernels.client import sparsify  # noqa: E402
from fedsrd_kernels.flower.records import bytes_record, records_state, state_records  # noqa: E402
from fedsrd_kernels.flower.strategy import METRICS, UPDATE, FedSRDStrategy  # noqa: E402
from fedsrd_kernels.lora import state_digest  # noqa: E402
from fedsrd_kernels.runner.config import RunConfig  # noqa: E402
from fedsrd_kernels.runner.model import tiny_llama  # noqa: E402
from fedsrd_kernels.runner.train import adapter_state, lora_model  # noqa: E402
from fedsrd_kernels.wire import decode, encode  # noqa: E402
from tests.flower_helpers import (  # noqa: E402
    BIN_DIR,
    Processes,
    assert_same_adapter,
    flower_env,
    free_ports,
    in_process_run,
    wait_for_port,
    write_app,
    write_jsonl,
)

pytestmark = pytest.mark.flower

# error feedback on: the nodes keep residuals on their disks, and must still match the in-process run
TINY = {"method": "fedsrd", "rounds": 3, "model": "tiny", "rank": 4, "local_steps": 2, "batch_size": 2,
        "seq_len": 32, "seed": 0, "error_feedback": True}


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
    agg = cfg.aggregator()
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
    strategy = FedSRDStrategy(cfg.aggregator(), global_state)
    arrays, metrics = strategy.aggregate_train(1, [replies[0], broken, replies[1]])

    want = cfg.aggregator().aggregate(global_state, [decode(payloads["alpha"]), decode(payloads["beta"])],
                                         weights=[10, 30], round=1)
    assert strategy.last_download == encode(want)
    got = records_state(arrays)
    assert got.keys() == global_state.keys()
    from fedsrd_kernels.server import apply

    expected = apply(global_state, want)
    for key in expected:
        assert torch.equal(got[key], expected[key].to(torch.float32)), key
    assert metrics["clients"] == 2 and metrics["num-examples"] == 40 and metrics["rejected"] == 1
    assert list(strategy.last_rejected) == ["9"] and "checksum mismatch" in strategy.last_rejected["9"]


def test_state_records_round_trip_bfloat16():
    gen = torch.Generator().manual_seed(2)
    state = {"a.lora_A.weight": torch.randn(2, 3, generator=gen).to(torch.bfloat16),
             "a.lora_B.weight": torch.randn(3, 2, generator=gen)}
    back = records_state(*state_records(state))
    for key in state:
        assert back[key].dtype == state[key].dtype and torch.equal(back[key], state[key])


@pytest.mark.slow  # a SuperLink, two SuperNodes and two `flwr run` submissions, then the same 3 rounds in-process
def test_loopback_deployment_equals_in_process_run(tmp_path):
    if shutil.which("flower-superlink", path=str(BIN_DIR)) is None:
        pytest.skip("flower-superlink is not installed next to this Python")
    data = write_jsonl(tmp_path)
    out_dir = tmp_path / "flower-out"
    app_dir = write_app(tmp_path / "app", {**TINY, "out-dir": str(out_dir), "min-nodes": 2})
    link_port, node_a, node_b = free_ports(3)  # one HTTP port serves the Fleet, Control and Runtime APIs
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\n'
        "insecure = true\n")
    env = flower_env(home)
    procs = Processes(tmp_path, env)
    try:
        link = procs.start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                           "--host", "127.0.0.1", "--port", str(link_port))
        try:
            wait_for_port(link_port, link)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{exc}\n{procs.log('superlink')}")
        for (name, path), port in zip(data.items(), (node_a, node_b)):
            procs.start(name, "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                        "--host", "127.0.0.1", "--port", str(port), "--node-config", f"name='{name}' jsonl='{path}'")
        # the federation in two submissions: rounds 1-2, then the same run config resumed for round 3
        for extra in (["--run-config", "rounds=2"], []):
            result = out_dir / "global_adapter.safetensors"
            result.unlink(missing_ok=True)
            run = subprocess.run([str(BIN_DIR / "flwr"), "run", str(app_dir), "loopback", "--stream", *extra],
                                 env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
            if not result.exists():
                pytest.fail(f"no result; flwr run rc={run.returncode}\n{run.stdout[-3000:]}\n"
                            f"{run.stderr[-3000:]}\n" + procs.all_logs())
    finally:
        procs.stop_all()

    from safetensors.torch import load_file

    flower_state = load_file(str(result))
    rounds = [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients"]) for r in rounds] == [(1, 2), (2, 2), (3, 2)]
    # round 1 ships the whole adapter, round 2 only the encoded round-1 Broadcast; the resumed
    # ServerApp starts from its committed state, so round 3 ships the whole adapter again
    assert [r["full-adapter-sent"] for r in rounds] == [2, 0, 2]
    assert [r["base"] for r in rounds[1:]] == [r["digest"] for r in rounds[:-1]]
    for name in data:  # each node's newest residual, and the one its newest round was made from
        kept = sorted(p.name for p in (out_dir / "clients" / name).iterdir())
        assert kept == ["residual-2.safetensors", "residual-3.safetensors"], (name, kept)
    assert_same_adapter(flower_state, in_process_run(tmp_path / "in-process", TINY, data)[0])


@pytest.mark.slow  # a SuperLink in simulation mode, Ray and two simulated nodes, then the same rounds in-process
def test_simulation_engine_equals_in_process_run(tmp_path):
    """FlowerTune's way: `flwr run <app> <connection>` on the Simulation Engine; the nodes are numbered,
    and partition i trains the run's i-th client (here the JSONL clients in name order)."""
    pytest.importorskip("ray", reason="the Simulation Engine needs flwr[simulation]")
    data = write_jsonl(tmp_path)
    out_dir = tmp_path / "sim-out"
    config = {**TINY, "rounds": 2, "out-dir": str(out_dir), "min-nodes": 2, "domains": "",
              "jsonl": ",".join(f"{name}={path}" for name, path in sorted(data.items()))}
    app_dir = write_app(tmp_path / "app", config)
    link_port, = free_ports(1)
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "sim"\n\n[superlink.sim]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n')
    env = flower_env(home)
    procs = Processes(tmp_path, env)
    result = out_dir / "global_adapter.safetensors"
    try:
        link = procs.start("superlink", "flower-superlink", "--insecure", "--simulation",
                           "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(link_port))
        try:
            wait_for_port(link_port, link)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{exc}\n{procs.log('superlink')}")
        run = subprocess.run([str(BIN_DIR / "flwr"), "run", str(app_dir), "sim", "--stream",
                              "--federation-config", "num-supernodes=2"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
        if not result.exists():
            pytest.fail(f"no result; flwr run rc={run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n"
                        + procs.all_logs())
    finally:
        procs.stop_all()

    from safetensors.torch import load_file

    flower_state = load_file(str(result))
    rounds = [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients"]) for r in rounds] == [(1, 2), (2, 2)]
    assert all(set(r["heldout_loss"]) == set(data) for r in rounds)  # federated evaluation, eval_every 1
    assert_same_adapter(flower_state, in_process_run(tmp_path / "in-process", {**TINY, "rounds": 2}, data)[0])
