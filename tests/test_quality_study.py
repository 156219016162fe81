"""benchmarks/quality.py end to end on the tiny Llama: runs, resume, report (JSON, tables, plots)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_script

pytest.importorskip("peft")
pytest.importorskip("matplotlib")

pytestmark = pytest.mark.slow  # the study script run 3 times in fresh processes: 3 + 3 runs of the tiny Llama

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"


def _study(tmp_path: Path, rounds: int) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(f"""
[study]
name = "tiny"
runs_dir = "{tmp_path / 'runs'}"
[run]
model = "tiny"
rounds = {rounds}
rank = 4
local_steps = 2
batch_size = 2
seq_len = 32
heldout_examples = 4
max_examples = 60
domains = ["code", "medical"]
[[grid]]
method = "fedavg"
lr = [1e-3, 3e-3]
[[grid]]
method = "fedsrd"
error_feedback = true
lr = [3e-3]
""")
    return path


def _run(study: Path, results: Path, *extra: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), str(study), "--results", str(results), *extra],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def test_study_runs_resumes_and_reports(tmp_path):
    results = tmp_path / "results"
    _run(_study(tmp_path, 1), results)
    first = json.loads((results / "quality-tiny.json").read_text())
    assert set(first["runs"]) == {"fedavg/lr=0.001/seed=0", "fedavg/lr=0.003/seed=0",
                                  "fedsrd+error_feedback/lr=0.003/seed=0"}
    wall = tmp_path / "runs" / "fedavg" / "lr=0.001" / "seed=0" / "wall.json"
    stamp = wall.read_text()
    _run(_study(tmp_path, 1), results)  # nothing left to do: no run is repeated
    assert wall.read_text() == stamp
    _run(_study(tmp_path, 2), results)  # two rounds: every run resumes after its first
    report = json.loads((results / "quality-tiny.json").read_text())
    for key, run in report["runs"].items():
        assert [r["round"] for r in run["records"]] == [1, 2], key
        assert run["records"][0] == first["runs"][key]["records"][0], key  # round 1 was not redone
        assert set(run["base_heldout"]) == {"code", "medical"} and run["wall_seconds"] > 0
    assert {row["variant"] for row in report["best"]} == {"fedavg", "fedsrd+error_feedback"}
    fedsrd = next(r for r in report["rows"] if r["method"] == "fedsrd")
    assert 0 < fedsrd["kept_fraction"] < 0.5 and fedsrd["along"] > 0
    assert all(math.isfinite(r["server_along"]) and r["server_orthogonal"] >= 0 for r in report["rows"])
    table = (results / "quality-tiny.md").read_text()
    assert "base (round 0)" in table and "fedsrd+error_feedback" in table
    for plot in ("rounds", "mib"):
        assert (results / f"quality-tiny-{plot}.png").stat().st_size > 10_000


def test_loss_axis_lets_a_diverged_run_leave_the_chart():
    module = load_script(SCRIPT, "quality_study")
    learning = [2.85, 2.40, 2.30, 2.22]
    diverged = [2.85, 2.52, 2.42, 18.4]
    bottom, top = module.loss_axis([learning, diverged])
    assert bottom < 2.22 < 2.85 < top < 3.0  # every point of the learning curve shows, the 18.4 does not
    assert module.loss_axis([[float("nan"), 2.5, 2.4]]) == pytest.approx((2.395, 2.505))
    assert module.loss_axis([]) == (0.0, 1.0)
