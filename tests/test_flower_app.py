"""The Flower ServerApp and ClientApp in one process, through a grid that delivers messages directly.

The apps are the deployed ones (``server_app.main``, ``client_app.train`` and
``client_app.evaluate``); only the transport is replaced. This checks, in seconds,
what the loopback deployment in test_flower.py checks in minutes (the same adapter
as the in-process runner, bit for bit), plus federated evaluation, partial
participation, operator-capped weights and a server that never loads the base model.
"""

import json

import pytest
import torch

pytest.importorskip("flwr", reason="flwr is not installed (pip install 'flwr>=1.42')")
pytest.importorskip("peft")

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402

from fedsrd_kernels.client import sparsify  # noqa: E402
from fedsrd_kernels.flower import client_app, server_app  # noqa: E402
from fedsrd_kernels.flower.records import bytes_record  # noqa: E402
from fedsrd_kernels.flower.strategy import CONFIG, METRICS, SERVER_ROUND, UPDATE, FedSRDStrategy  # noqa: E402
from fedsrd_kernels.lora import state_digest  # noqa: E402
from fedsrd_kernels.runner.config import RunConfig  # noqa: E402
from fedsrd_kernels.runner.model import tiny_llama  # noqa: E402
from fedsrd_kernels.runner.run import initial_adapter  # noqa: E402
from fedsrd_kernels.runner.train import adapter_state, lora_model  # noqa: E402
from fedsrd_kernels.server import apply  # noqa: E402
from fedsrd_kernels.wire import decode  # noqa: E402
from tests.flower_helpers import assert_same_adapter, in_process_run, write_jsonl  # noqa: E402

pytestmark = pytest.mark.flower

TINY = {"method": "fedsrd", "rounds": 3, "model": "tiny", "rank": 4, "local_steps": 2, "batch_size": 2,
        "seq_len": 32, "seed": 0, "error_feedback": True, "heldout_examples": 4}


@pytest.fixture
def identity(monkeypatch):
    """A Message needs the task identity a ServerApp or ClientApp process has."""
    from flwr.supercore.task_identity import TaskIdentity

    for field, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)


class LocalGrid:
    """Delivers each message to the ClientApp function of its type, with one Context per node."""

    def __init__(self, run_config: dict, node_configs: dict[int, dict]) -> None:
        self.contexts = {node: Context(run_id=1, node_id=node, node_config=config, state=RecordDict(),
                                       run_config=run_config) for node, config in node_configs.items()}
        self.sent: list[tuple[str, int, list[str]]] = []  # (message type, node, record keys)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            self.sent.append((kind, node, sorted(msg.content.keys())))
            handler = client_app.train if kind == "train" else client_app.evaluate
            replies.append(handler(msg, self.contexts[node]))
        return replies


def _run_flower(tmp_path, run_config: dict, jsonl: dict[str, str]) -> tuple[dict, list[dict], LocalGrid]:
    nodes = {11 + i: {"name": name, "jsonl": path} for i, (name, path) in enumerate(sorted(jsonl.items()))}
    grid = LocalGrid({**run_config, "out-dir": str(tmp_path / "flower-out")}, nodes)
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=grid.contexts[11].run_config))
    from safetensors.torch import load_file

    out = tmp_path / "flower-out"
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return load_file(str(out / "global_adapter.safetensors")), rounds, grid


def test_apps_equal_the_in_process_run_and_evaluate_every_node(tmp_path, identity):
    jsonl = write_jsonl(tmp_path)
    client_app._BASES.clear()
    flower_state, rounds, grid = _run_flower(tmp_path, {**TINY, "eval-every": 2}, jsonl)
    want, records = in_process_run(tmp_path / "in-process", {**TINY, "eval_every": 2}, jsonl)
    assert_same_adapter(flower_state, want)
    # federated evaluation after rounds 2 and 3 (the last), with the runner's numbers
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert "heldout_loss" not in rounds[0]
    for flower, runner in zip(rounds[1:], records[1:]):
        assert flower["heldout_loss"].keys() == runner["heldout_loss"].keys() == {"alpha", "beta"}
        for name, loss in runner["heldout_loss"].items():
            assert flower["heldout_loss"][name] == pytest.approx(loss, rel=1e-6), (flower["round"], name)
    # syncing: the full adapter once; then a Broadcast per train round, nothing to an evaluation
    # that follows the node's own training, and nothing to a train round after an evaluation
    kinds = [(kind, "global" in keys, "broadcast" in keys) for kind, node, keys in grid.sent if node == 11]
    assert kinds == [("train", True, False), ("train", False, True), ("evaluate", False, True),
                     ("train", False, False), ("evaluate", False, True)]


def test_fraction_train_samples_as_the_runner_does(tmp_path, identity):
    jsonl = write_jsonl(tmp_path)
    client_app._BASES.clear()
    config = {**TINY, "rounds": 2, "fraction-train": 0.5, "error_feedback": False, "eval-every": 5}
    _, rounds, grid = _run_flower(tmp_path, config, jsonl)
    trained = [node for kind, node, _ in grid.sent if kind == "train"]
    assert len(trained) == 2 and [r["clients"] for r in rounds] == [1, 1]  # one node of two in each round


def test_server_starts_from_an_initial_adapter_file_without_the_base_model(tmp_path, identity, monkeypatch):
    from safetensors.torch import save_file

    jsonl = write_jsonl(tmp_path)
    cfg = RunConfig(**{**TINY, "rounds": 1})
    path = tmp_path / "initial.safetensors"
    save_file(initial_adapter(cfg), str(path))
    client_app._BASES.clear()
    client_app._base(cfg)  # the nodes' models, built before the server's loader is taken away

    def no_base_model(_cfg):
        raise AssertionError("the ServerApp loaded the base model")

    with monkeypatch.context() as patched:
        patched.setattr(server_app, "initial_adapter", no_base_model)
        from_file, _, _ = _run_flower(tmp_path, {**TINY, "rounds": 1, "initial-adapter": str(path)}, jsonl)
    identity_again = tmp_path / "again"
    identity_again.mkdir()
    built, _, _ = _run_flower(identity_again, {**TINY, "rounds": 1}, jsonl)
    assert_same_adapter(from_file, built)


def _reply(node_id: int, content: RecordDict) -> Message:
    sent = Message(RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: 1})}), dst_node_id=node_id,
                   message_type="train")
    return Message(content, reply_to=sent)


@pytest.mark.parametrize("weighting,max_weight", [("equal", None), ("samples", 50.0)])
def test_a_node_claiming_a_billion_samples_does_not_steer_the_round(identity, weighting, max_weight):
    torch.manual_seed(0)
    cfg = RunConfig(**{**TINY, "rounds": 1, "weighting": weighting, "error_feedback": False})
    global_state = adapter_state(lora_model(tiny_llama(seed=0)[0], cfg))
    agg = cfg.aggregator()
    gen = torch.Generator().manual_seed(3)
    updates = {}
    for name, claimed in (("honest-a", 40), ("honest-b", 50), ("greedy", 10**9)):
        local = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in global_state.items()}
        updates[name] = sparsify(local, global_state, agg.client_config, num_samples=claimed, round=1,
                                 client_id=name, base=state_digest(global_state))
    from fedsrd_kernels.wire import encode

    replies = [_reply(node, RecordDict({UPDATE: bytes_record(encode(updates[name])),
                                        METRICS: MetricRecord({"train-loss": 1.0})}))
               for node, name in ((1, "honest-a"), (2, "honest-b"), (3, "greedy"))]
    strategy = FedSRDStrategy(cfg.aggregator(), global_state, max_weight=max_weight)
    strategy.aggregate_train(1, replies)
    got = apply(global_state, decode(strategy.last_download))
    weights = [40, 50, 50] if weighting == "samples" else [1, 1, 1]  # the claim counts as at most max_weight
    order = ["greedy", "honest-a", "honest-b"]  # by client id
    want = cfg.aggregator().aggregate(global_state, [updates[n] for n in order],
                                      weights=[weights[["honest-a", "honest-b", "greedy"].index(n)] for n in order],
                                      round=1)
    expected = apply(global_state, want)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    uncapped = cfg.aggregator().aggregate(global_state, [updates[n] for n in order],
                                          weights=[10**9 if n == "greedy" else 40 for n in order], round=1)
    if weighting == "samples":  # without the cap, the claim would have decided the round
        assert any(not torch.equal(a.values, b.values) for a, b in zip(uncapped.deltas.values(), want.deltas.values()))
