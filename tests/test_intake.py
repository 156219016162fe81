"""Bad clients do not spoil a round: each bad submission is rejected with its reason, the rest aggregate."""

import dataclasses
import json

import pytest
import torch

import fedsrd_kernels as fk
from fedsrd_kernels.intake import Submission, run_round, screen
from fedsrd_kernels.updates import SparseTensor
from tests.helpers import assert_unchanged, lora_state, perturbed, snapshot

ROUND = 2


def good_round(method="fedsrd", clients=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = lora_state([(30, 20), (17, 9)], 4, gen=gen)
    base = fk.state_digest(g)
    agg = fk.Aggregator(method, seed=seed)
    ups = [fk.sparsify(perturbed(g, 0.05, gen=gen), g, agg.client_config, num_samples=10 + i, round=ROUND,
                       client_id=f"c{i}", base=base) for i in range(clients)]
    return agg, g, base, ups


def with_values(update, fill):
    key = next(iter(update.deltas))
    bad = update.deltas[key]
    values = bad.values.clone()
    values[0] = fill
    return dataclasses.replace(update, deltas={**update.deltas, key: SparseTensor(bad.shape, values, bad.indices,
                                                                                   bad.scale)})


def bad_submissions(g, base, good):
    """(sender, payload, words the reason must contain): one per kind of bad client."""
    key = next(iter(good.deltas))
    shape = good.deltas[key].shape
    wrong_shape = SparseTensor((shape[0] + 1, *shape[1:]), torch.ones(1), torch.tensor([0]))
    other_base = fk.state_digest({k: v + 1 for k, v in g.items()})
    yield "garbage", b"\x00" * 64, "checksum mismatch"
    yield "truncated", fk.encode(good)[:-9], "checksum mismatch"
    yield "broadcast", fk.encode(fk.Broadcast(ROUND, "fedsrd", 0, 0.0)), "not a SparseUpdate"
    yield "nan", with_values(good, float("nan")), "NaN"
    yield "inf", with_values(good, float("inf")), "NaN/Inf"
    yield "shape", dataclasses.replace(good, deltas={key: wrong_shape}, client_id="shape"), "shape"
    yield "key", dataclasses.replace(good, deltas={"x.lora_A.weight": good.deltas[key]}, client_id="key"), "lacks"
    yield "stale", fk.encode(dataclasses.replace(good, round=ROUND - 1, client_id="stale")), "round 1"
    yield "dup", fk.encode(good), "already accepted"
    yield "other-base", fk.encode(dataclasses.replace(good, base=other_base, client_id="ob")), "made against base"
    yield "no-base", dataclasses.replace(good, base=None, client_id="nb"), "no base digest"
    yield "no-samples", dataclasses.replace(good, num_samples=0, client_id="ns"), "weight"


def test_each_bad_client_is_rejected_with_its_reason_and_the_round_aggregates_the_others():
    agg, g, base, ups = good_round()
    before = snapshot(g)
    bad = list(bad_submissions(g, base, ups[0]))
    submissions = [Submission("c0", fk.encode(ups[0]))]
    submissions += [Submission(name, payload) for name, payload, _ in bad]
    submissions += [Submission(u.client_id, fk.encode(u)) for u in ups[1:]]
    outcome = run_round(agg, g, submissions, ROUND, base=base)
    assert outcome.accepted == ("c0", "c1", "c2") and outcome.skipped is None
    assert set(outcome.rejected) == {name for name, _, _ in bad}
    for name, _, words in bad:
        assert words in outcome.rejected[name], (name, outcome.rejected[name])
    want = fk.Aggregator("fedsrd", seed=0).aggregate(g, ups, weights=[10, 11, 12], round=ROUND)
    assert fk.encode(outcome.broadcast) == fk.encode(want)  # the same bytes as a round of the good ones alone
    assert_unchanged(g, before)


def test_too_few_valid_updates_skip_the_round():
    agg, g, base, ups = good_round(clients=2)
    submissions = [Submission("c0", fk.encode(ups[0])), Submission("c1", b"junk")]
    outcome = run_round(agg, g, submissions, ROUND, base=base, min_updates=2)
    assert outcome.broadcast is None and outcome.accepted == ("c0",)
    assert "fewer than min_updates=2" in outcome.skipped and list(outcome.rejected) == ["c1"]
    assert run_round(agg, g, submissions, ROUND, base=base).broadcast is not None  # min_updates=1 aggregates c0
    with pytest.raises(fk.AggregationError, match="min_updates"):
        run_round(agg, g, submissions, ROUND, min_updates=0)


def test_screen_without_base_accepts_updates_without_digest_and_weights_default_to_samples():
    agg, g, _, ups = good_round(clients=2)
    plain = [dataclasses.replace(u, base=None) for u in ups]
    accepted, rejected = screen(agg, g, [Submission(u.client_id, u) for u in plain], ROUND)
    assert not rejected and [w for _, _, w in accepted] == [10.0, 11.0]
    anonymous = dataclasses.replace(plain[0], client_id=None, num_samples=None)
    accepted, _ = screen(agg, g, [Submission("node-7", anonymous)], ROUND)
    assert accepted[0][0] == "node-7" and accepted[0][2] == 1.0
    with pytest.raises(fk.AggregationError, match="not a Submission"):
        screen(agg, g, [plain[0]], ROUND)


def test_a_huge_declared_payload_is_rejected_by_the_server_bound():
    agg, g, base, ups = good_round(clients=1)
    payload = fk.encode(ups[0])
    numel = sum(v.numel() for v in g.values())
    outcome = run_round(agg, g, [Submission("c0", payload)], ROUND, base=base, max_numel=numel // 10)
    assert outcome.broadcast is None and "declares over" in outcome.rejected["c0"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_runner_logs_rejections_and_skips_a_round_whole(tmp_path):
    pytest.importorskip("peft")
    from fedsrd_kernels.runner.config import RunConfig
    from fedsrd_kernels.runner.loop import ClientData, federate
    from fedsrd_kernels.runner.model import tiny_llama
    from fedsrd_kernels.runner.train import adapter_state, lora_model

    texts = {
        "alpha": [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(24)],
        "beta": [f"The balance of account {i} is {i * 13 % 97} dollars after interest." for i in range(24)],
    }
    clients = [ClientData(name, t[4:], t[:4]) for name, t in texts.items()]

    def intercept(round_, name, payload):
        if name != "beta":
            return payload
        if round_ == 1:
            return b"\x00garbage"
        update = fk.decode(payload)
        return fk.encode(dataclasses.replace(update, base="0" * 32))  # trained from some other global

    cfg = RunConfig(method="fedsrd", rounds=3, model="tiny", rank=4, local_steps=2, batch_size=2, seq_len=32,
                    out_dir=str(tmp_path / "run"), min_updates=2)
    model, tokenizer = tiny_llama(seed=0)
    torch.manual_seed(cfg.seed)
    peft_model = lora_model(model, cfg)
    start = adapter_state(peft_model)
    lines = []
    records = federate(peft_model, tokenizer, clients, cfg, log=lines.append, show_progress=False,
                       intercept=lambda r, n, p: intercept(r, n, p) if r < 3 else p)
    first, second, third = records
    assert first["accepted"] == ["alpha"] and "checksum mismatch" in first["rejected"]["beta"]
    assert "made against base 000000000000" in second["rejected"]["beta"]
    for record in (first, second):  # skipped whole: the global adapter did not move at all
        assert "fewer than min_updates=2" in record["skipped"] and record["download_bytes"] == 0
        assert record["digest"] == record["base"] == fk.state_digest(start)
    assert third["skipped"] is None and third["accepted"] == ["alpha", "beta"] and third["digest"] != third["base"]
    assert any("round 1: rejected beta" in line for line in lines)
    saved = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert [r["skipped"] is None for r in saved] == [False, False, True]


def test_by_default_a_payload_may_declare_no_more_elements_than_the_global_state():
    agg, g, base, _ = good_round(clients=1)
    gen = torch.Generator().manual_seed(9)
    big = lora_state([(300, 200), (17, 9)], 4, gen=gen)  # same keys, 10x the elements in the first pair
    update = fk.sparsify(perturbed(big, 0.05, gen=gen), big, agg.client_config, round=ROUND, base=base)
    outcome = run_round(agg, g, [Submission("big", fk.encode(update))], ROUND, base=base)
    numel = sum(t.numel() for t in g.values())
    assert f"declares over {numel} elements" in outcome.rejected["big"]  # refused before decoding a blob


def test_clients_bound_a_broadcast_by_their_adapter():
    agg, g, _, ups = good_round(clients=2)
    data = fk.encode(agg.aggregate(g, ups, round=ROUND))
    assert fk.decode(data, max_numel=fk.wire.broadcast_numel(g)).round == ROUND
    small = {k: v[:1] for k, v in g.items()}
    with pytest.raises(fk.PayloadError, match="declares over"):
        fk.decode(data, max_numel=fk.wire.broadcast_numel(small))
