"""Robust aggregation: per-client norm bounding of the reconstructed update, against plain float64."""

import dataclasses

import numpy as np
import pytest
import torch

import fedsrd_kernels as fk
from fedsrd_kernels import oracle
from fedsrd_kernels.server import reconstructed_norms
from fedsrd_kernels.updates import SparseTensor
from tests.helpers import lora_state, perturbed, rel_err

SHAPES = [(30, 20), (1, 9), (17, 1)]


def setup(seed, method, scales=(0.02, 0.05, 0.03, 2.0)):
    gen = torch.Generator().manual_seed(seed)
    g = lora_state(SHAPES, 3, gen=gen)
    agg = fk.Aggregator(method, download_drop=0.0, norm_bound=1.5, seed=seed)
    ups = [fk.sparsify(perturbed(g, s, gen=gen), g, agg.client_config) for s in scales]
    return agg, g, ups


def plain_norms(g, ups):
    """||(B + dB_i)(A + dA_i) - B A||_F over every pair, plus the other keys' deltas, in float64."""
    layout = fk.lora_layout(g)
    norms = []
    for up in ups:
        dense = {k: oracle.f64(v) for k, v in fk.densify(up).items()}
        total = 0.0
        for pair in layout.pairs:
            b, a = oracle.f64(g[pair.b_key]), oracle.f64(g[pair.a_key])
            d_b, d_a = dense.get(pair.b_key, 0 * b), dense.get(pair.a_key, 0 * a)
            total += np.sum(((b + d_b) @ (a + d_a) - b @ a) ** 2)
        total += sum(np.sum(v**2) for k, v in dense.items() if k in layout.other_keys)
        norms.append(np.sqrt(total))
    return np.array(norms)


def plain_clip(norms, bound):
    threshold = bound * np.median(norms)
    return np.minimum(1.0, threshold / norms)


@pytest.mark.parametrize("seed", [0, 1])
def test_norms_and_clip_factors_match_float64(seed):
    agg, g, ups = setup(seed, "fedsrd")
    norms = plain_norms(g, ups)
    got = reconstructed_norms(g, ups, fk.lora_layout(g).pairs).numpy()
    assert rel_err(got, norms) < 1e-12
    agg.aggregate(g, ups)
    report = agg.last_report
    assert rel_err(np.array(report.update_norms), norms) < 1e-12
    assert rel_err(np.array(report.clip_factors), plain_clip(norms, 1.5)) < 1e-12
    assert report.clip_factors[3] < 0.2 and report.num_updates == 4  # the outlier is cut, nobody else much


@pytest.mark.parametrize("round_", [1, 2])
def test_fedsrd_aggregates_the_clipped_mean(round_):
    agg, g, ups = setup(3, "fedsrd")
    p = np.full(4, 0.25)
    c = plain_clip(plain_norms(g, ups), 1.5)
    new = fk.apply(g, agg.aggregate(g, ups, round=round_))
    for pair in fk.lora_layout(g).pairs:
        b, a = oracle.f64(g[pair.b_key]), oracle.f64(g[pair.a_key])
        dense = [{k: oracle.f64(v) for k, v in fk.densify(u).items()} for u in ups]
        d_b = [d.get(pair.b_key, 0 * b) for d in dense]
        d_a = [d.get(pair.a_key, 0 * a) for d in dense]
        # B A + sum_i p_i c_i (W_i - B A) equals the eq. 9 mean of the clients plus a zero update carrying
        # the weight clipping took away, which is what the oracle's server_pair takes
        clipped = b @ a + sum(pi * ci * ((b + db) @ (a + da) - b @ a) for pi, ci, db, da in zip(p, c, d_b, d_a))
        weights = [*(p * c), 1.0 - float(np.sum(p * c))]
        as_mean = sum(w * (b + db) @ (a + da) for w, db, da in zip(weights, [*d_b, 0 * b], [*d_a, 0 * a]))
        assert rel_err(as_mean, clipped) < 1e-13
        rtol_b = max(1e-2, max(b.shape) * np.finfo(np.float32).eps)
        rtol_a = max(1e-2, max(a.shape) * np.finfo(np.float32).eps)
        move, delta = oracle.server_pair(b, a, [*d_b, 0 * b], [*d_a, 0 * a], weights, round_, pair.rank,
                                         rtol_b, rtol_a)
        key = pair.b_key if move == "B" else pair.a_key
        assert rel_err(new[key].numpy(), oracle.f64(g[key]) + delta) < 1e-5, key


def test_fedavg_scales_each_clients_factor_deltas():
    agg, g, ups = setup(4, "fedavg")
    c = plain_clip(plain_norms(g, ups), 1.5)
    new = fk.apply(g, agg.aggregate(g, ups))
    for key in g:
        want = oracle.f64(g[key]) + sum(0.25 * ci * oracle.f64(u.deltas[key].to_dense()) for ci, u in zip(c, ups))
        assert rel_err(new[key].numpy(), want) < 1e-6, key


def test_clean_rounds_are_untouched_when_no_update_is_an_outlier():
    agg, g, ups = setup(5, "fedsrd", scales=(0.02, 0.02, 0.02, 0.02))
    agg.norm_bound = 100.0
    bounded = fk.encode(agg.aggregate(g, ups))
    assert set(agg.last_report.clip_factors) == {1.0}
    assert bounded == fk.encode(fk.Aggregator("fedsrd", download_drop=0.0, seed=5).aggregate(g, ups))


def test_norm_bound_is_checked_and_refused_by_streams():
    for bad in (0, -1.0, float("inf"), float("nan"), True, "2"):
        with pytest.raises(fk.ConfigError, match="norm_bound"):
            fk.Aggregator("fedsrd", norm_bound=bad)
    agg, g, _ = setup(6, "fedsrd-e")
    with pytest.raises(fk.ConfigError, match="median"):
        agg.stream(g)


TEXTS = {
    "alpha": [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(40)],
    "beta": [f"The balance of account {i} is {i * 13 % 97} dollars after interest." for i in range(40)],
    "gamma": [f"Patient {i} was given {i % 5 + 1} mg twice a day for {i % 9 + 2} days." for i in range(40)],
    "delta": [f"Solve {i} + {2 * i} = {3 * i}; then {i} * 3 = {3 * i}." for i in range(40)],
}


def scaled_up(factor, attacker="gamma"):
    """The attacker's payload with every delta multiplied by ``factor`` (it re-encodes a valid update)."""
    def intercept(round_, name, payload):
        if name != attacker:
            return payload
        update = fk.decode(payload)
        deltas = {k: SparseTensor(v.shape, v.values, v.indices, v.scale * factor) for k, v in update.deltas.items()}
        return fk.encode(dataclasses.replace(update, deltas=deltas))
    return intercept


@pytest.mark.slow  # three 5-round federations of 4 clients x 8 local steps on the tiny Llama
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_one_client_scaled_x1000_is_held_off_by_norm_bounding(tmp_path):
    """FedAvg on the tiny Llama, 5 rounds, 4 clients, one of them sends its update x1000.

    Measured here: mean held-out loss 4.94 clean, 5.06 attacked with norm_bound=2 (+2.5%),
    5.31 attacked without (+7.4%). FedAvg is used because the tiny random-init model learns
    visibly under it in 5 rounds (5.56 = ln 259 -> 4.94); under FedSRD it stays within noise
    of ln 259, which leaves nothing for an attack to spoil.
    """
    pytest.importorskip("peft")
    from fedsrd_kernels.runner.config import RunConfig
    from fedsrd_kernels.runner.loop import ClientData, federate
    from fedsrd_kernels.runner.model import tiny_llama
    from fedsrd_kernels.runner.train import lora_model

    def final_loss(tag, norm_bound, intercept):
        cfg = RunConfig(method="fedavg", rounds=5, model="tiny", rank=8, local_steps=8, batch_size=2, seq_len=32,
                        lr=3e-3, norm_bound=norm_bound, out_dir=str(tmp_path / tag))
        model, tokenizer = tiny_llama(seed=0)
        torch.manual_seed(cfg.seed)
        clients = [ClientData(name, texts[4:], texts[:4]) for name, texts in TEXTS.items()]
        records = federate(lora_model(model, cfg), tokenizer, clients, cfg, log=lambda _: None, show_progress=False,
                           intercept=intercept)
        return float(np.mean(list(records[-1]["heldout_loss"].values()))), records

    clean, _ = final_loss("clean", None, None)
    bounded, records = final_loss("bounded", 2.0, scaled_up(1000.0))
    unbounded, _ = final_loss("unbounded", None, scaled_up(1000.0))
    print(f"\nmean held-out loss after 5 rounds: clean {clean:.4f}, x1000 attacker with norm_bound=2 {bounded:.4f} "
          f"({bounded / clean - 1:+.1%}), without {unbounded:.4f} ({unbounded / clean - 1:+.1%})")
    assert clean < 5.3, "the clean run must learn for the comparison to mean anything"
    assert abs(bounded - clean) <= 0.05 * clean, (clean, bounded)
    assert unbounded > clean * 1.04 and unbounded > bounded + 0.1, (clean, bounded, unbounded)
    assert all(r["clip_factors"]["gamma"] < 1e-3 for r in records)
    assert all(r["clip_factors"][name] == 1.0 for r in records for name in ("alpha", "beta", "delta"))
