"""Nothing lost on a crash: the runner SIGKILLed at random instants, restarted each time, ends bit-identical.

Children start from a forkserver that has already imported torch, transformers and
peft, so a restart costs about 0.1 s instead of several seconds of imports; the
forkserver never runs a torch op, so no OpenMP pool is forked.
"""

import multiprocessing
import os
import random
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

import fedsrd_kernels as fk  # noqa: E402
from fedsrd_kernels.runner.loop import STATE_FILE, ServerState  # noqa: E402

pytestmark = pytest.mark.slow  # 20 SIGKILLs over a 16-round run, then 28 crashed and resumed 2-round runs

KILLS = int(os.environ.get("FEDSRD_KILLS", "20"))
ROUNDS = 16
TEXTS = {
    "alpha": [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(24)],
    "beta": [f"The balance of account {i} is {i * 13 % 97} dollars after interest." for i in range(24)],
    "gamma": [f"Patient {i} was given {i % 5 + 1} mg twice a day for {i % 9 + 2} days." for i in range(24)],
}


def run_federation(out_dir: str) -> None:
    """The whole runner (clients and server in one process), started or resumed from ``out_dir``."""
    import warnings

    from fedsrd_kernels.runner.config import RunConfig
    from fedsrd_kernels.runner.loop import ClientData, federate
    from fedsrd_kernels.runner.model import tiny_llama
    from fedsrd_kernels.runner.train import lora_model

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    cfg = RunConfig(method="fedsrd", rounds=ROUNDS, model="tiny", rank=4, local_steps=2, batch_size=2, seq_len=32,
                    participation=0.67, out_dir=out_dir)
    model, tokenizer = tiny_llama(seed=0)
    torch.manual_seed(cfg.seed)
    clients = [ClientData(name, texts[4:], texts[:4]) for name, texts in TEXTS.items()]
    federate(lora_model(model, cfg), tokenizer, clients, cfg, log=lambda _: None, show_progress=False)


def start(ctx, out_dir: Path):
    proc = ctx.Process(target=run_federation, args=(str(out_dir),))
    proc.start()
    return proc


def committed_round(out_dir: Path) -> int:
    """The round the state file says is done; loading it also checks the adapter against its digest."""
    path = out_dir / STATE_FILE
    return ServerState.load(path).round if path.exists() else 0


def test_sigkill_at_random_instants_loses_and_repeats_nothing(tmp_path):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "peft", "fedsrd_kernels.runner.loop",
                                "fedsrd_kernels.runner.model", "fedsrd_kernels.runner.train", __name__])
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    warm = ctx.Process(target=time.sleep, args=(0,))  # starts the forkserver: its imports are not a run's time
    warm.start()
    warm.join()
    began = time.monotonic()
    proc = start(ctx, whole_dir)
    proc.join(300)
    assert proc.exitcode == 0
    whole_seconds = time.monotonic() - began
    whole = ServerState.load(whole_dir / STATE_FILE)
    began = time.monotonic()  # a life with nothing left to do: process start, model build, resume, exports
    proc = start(ctx, whole_dir)
    proc.join(300)
    startup = time.monotonic() - began

    rng = random.Random(2026)
    kills, seen, lives = 0, [0], 0
    while True:
        proc = start(ctx, killed_dir)
        lives += 1
        if kills < KILLS:
            # up to 1.5 x (start-up + a round of work) per life, so kills land anywhere: model build,
            # resume, training, aggregation, commit, exports. A life that ran ahead of the pace that
            # fits 20 kills into the run (a loaded machine makes the measured times poor guides) is
            # killed within its start-up instead.
            ahead = seen[-1] >= (ROUNDS - 4) * (kills + 1) / KILLS
            proc.join(rng.uniform(0.0, 1.0) * startup if ahead else rng.uniform(0.0, 1.5) * (startup + whole_seconds / ROUNDS))
            if proc.is_alive():
                proc.kill()  # SIGKILL: no handler, no flush, no atexit
                proc.join()
                kills += 1
                assert proc.exitcode == -9
                seen.append(committed_round(killed_dir))
                assert seen[-1] >= seen[-2], "a committed round was lost"
                continue
        proc.join(300)
        assert proc.exitcode == 0
        break
    assert kills == KILLS and seen[-1] < ROUNDS, f"only {kills} kills landed before the run finished"

    final = ServerState.load(killed_dir / STATE_FILE)
    assert final.round == whole.round == ROUNDS
    for key in whole.global_state:
        assert torch.equal(final.global_state[key], whole.global_state[key]), key
    # every round exactly once, each starting from the global the previous one ended with
    assert [r["round"] for r in final.records] == list(range(1, ROUNDS + 1))
    chain = [r["base"] for r in final.records] + [fk.state_digest(final.global_state)]
    assert chain[1:] == [r["digest"] for r in final.records]
    for got, want in zip(final.records, whole.records):
        for field in ("clients", "heldout_loss", "train_loss", "upload_bytes", "download_bytes", "base", "digest"):
            assert got[field] == want[field], (got["round"], field)
    exported = (killed_dir / "rounds.jsonl").read_text().splitlines()
    assert len(exported) == ROUNDS and not (killed_dir / "pending").exists()
    print(f"\n{kills} SIGKILLs over {lives} lives; uninterrupted run {whole_seconds:.2f} s, start-up {startup:.2f} s; "
          f"committed rounds after each kill: {seen[1:]}")


class Crash(BaseException):
    """Dies like a kill would: not an Exception, so nothing on the way catches it."""


def crash_at(real_write, index: int, after_rename: bool):
    """An atomic_write_bytes that raises Crash at its ``index``-th call, before or after the rename."""
    seen = []

    def crashing(path, data):
        seen.append(path.name)
        if len(seen) - 1 != index:
            return real_write(path, data)
        if after_rename:
            real_write(path, data)
        else:  # the temporary file is complete, the rename never happens
            path.with_name(path.name + ".tmp").write_bytes(data)
        raise Crash(path.name)

    return crashing


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_crash_at_every_write_of_a_run_resumes_bit_identical(tmp_path, monkeypatch):
    """Every atomic write of a 2-round run, crashed just before its rename and just after it."""
    from fedsrd_kernels.runner import loop

    def run(out_dir):
        from fedsrd_kernels.runner.config import RunConfig
        from fedsrd_kernels.runner.model import tiny_llama
        from fedsrd_kernels.runner.train import lora_model

        cfg = RunConfig(method="fedsrd", rounds=2, model="tiny", rank=4, local_steps=1, batch_size=2, seq_len=16,
                        heldout_examples=2, out_dir=str(out_dir))
        model, tokenizer = tiny_llama(seed=0)
        torch.manual_seed(cfg.seed)
        clients = [loop.ClientData(name, texts[4:12], texts[:4]) for name, texts in list(TEXTS.items())[:2]]
        loop.federate(lora_model(model, cfg), tokenizer, clients, cfg, log=lambda _: None, show_progress=False)
        return ServerState.load(out_dir / STATE_FILE)

    real_write = loop.atomic_write_bytes
    calls = []

    def counting(path, data):
        calls.append(path.name)
        real_write(path, data)

    monkeypatch.setattr(loop, "atomic_write_bytes", counting)
    whole = run(tmp_path / "whole")
    writes = list(calls)
    assert writes.count(STATE_FILE) == 2
    for index in range(len(writes)):
        for after_rename in (False, True):
            out = tmp_path / f"crash-{index}-{after_rename}"
            monkeypatch.setattr(loop, "atomic_write_bytes", crash_at(real_write, index, after_rename))
            with pytest.raises(Crash):
                run(out)
            monkeypatch.setattr(loop, "atomic_write_bytes", real_write)
            resumed = run(out)
            assert [r["round"] for r in resumed.records] == [1, 2], (index, after_rename)
            for key in whole.global_state:
                assert torch.equal(resumed.global_state[key], whole.global_state[key]), (writes[index], key)
            assert [r["digest"] for r in resumed.records] == [r["digest"] for r in whole.records]
