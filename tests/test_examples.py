"""The examples under examples/ run, and do what they print."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

import fedsrd_kernels as fk  # noqa: E402
from tests.helpers import load_script  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "federated_peft.py"


def load_example():
    return load_script(EXAMPLE, "federated_peft")


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine two OpenMP threads made each tiny step ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def example():
    return load_example()


def test_federated_peft_example(example, one_thread, capsys):
    result = example.main(["--rounds", "2"])
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines()] == ["round 1", "round 2"]
    clients = tuple(example.TEXTS)
    for record in result["rounds"]:
        assert record["accepted"] == clients
        assert len(record["upload_bytes"]) == len(clients)
        assert max(record["upload_bytes"]) < 0.25 * record["dense_bytes"]
        assert torch.isfinite(torch.tensor(record["loss"]))
    initial, final = result["initial"], result["final"]
    assert final.keys() == initial.keys()
    assert any(not torch.equal(final[k], initial[k]) for k in initial), "two rounds changed nothing"
    # the final adapter is the initial one with the printed broadcasts applied, in order
    state = initial
    for record in result["rounds"]:
        state = fk.apply(state, fk.decode(record["broadcast"]))
    assert all(torch.equal(state[k], final[k]) for k in final)
    # the same seed gives the same bits and the same printout
    again = example.main(["--rounds", "2"])
    assert all(torch.equal(again["final"][k], final[k]) for k in final)
    assert capsys.readouterr().out == out


def test_the_readme_use_block_runs_as_pasted(one_thread, capsys):
    """The README's "Use" code block, executed as it stands: both rounds accept both clients."""
    readme = (EXAMPLE.parent.parent / "README.md").read_text()
    block = readme.split("\n## Use\n", 1)[1].split("```python\n", 1)[1].split("\n```", 1)[0]
    exec(compile(block, "README.md (Use)", "exec"), {"__name__": "readme_use"})
    assert capsys.readouterr().out.splitlines() == ["1 ('alice', 'bob') {}", "2 ('alice', 'bob') {}"]
