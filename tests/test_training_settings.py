"""The training settings a quality study relies on: completion-only labels, clipping, dropout,
weights, round-0 loss, and error feedback in the runner (resume, refusal)."""

from __future__ import annotations

import json

import pytest
import torch

import fedsrd_kernels as fk
from fedsrd_kernels.errors import ConfigError, StateError
from fedsrd_kernels.runner.config import RunConfig
from fedsrd_kernels.runner.loop import ClientData, federate
from fedsrd_kernels.runner.run import as_text
from fedsrd_kernels.runner.train import TrainText, adapter_state, encode_batch, lora_model, train_locally

from .helpers import lora_state, perturbed

peft = pytest.importorskip("peft")
model_mod = pytest.importorskip("fedsrd_kernels.runner.model")

PAIRS = [{"instruction": f"What is {i} times {i + 3}?", "response": f"It is {i * (i + 3)}, since {i} x {i + 3}."}
         for i in range(24)]
TEXTS = [f"Account {i} holds {i * 13 % 97} dollars after interest." for i in range(24)]


@pytest.fixture(scope="module")
def tiny():
    return model_mod.tiny_llama(seed=0)


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def test_completion_only_labels_cover_exactly_the_response(tiny):
    _, tokenizer = tiny
    pair = as_text(PAIRS[5], tokenizer)
    assert isinstance(pair, TrainText) and 0 < pair.prompt_chars < len(pair.text)
    assert pair.text[pair.prompt_chars:].startswith(PAIRS[5]["response"])
    plain = TEXTS[3]
    batch = encode_batch(tokenizer, [pair, plain], 512, "cpu", completion_only=True)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    prompt_tokens = len(_tokens(tokenizer, pair.text[:pair.prompt_chars]))  # the byte tokenizer: one per byte
    full = _tokens(tokenizer, pair.text)
    assert ids[0, :len(full)].tolist() == full
    assert (labels[0, :prompt_tokens] == -100).all()
    assert labels[0, prompt_tokens:len(full)].tolist() == full[prompt_tokens:]
    assert (labels[0, len(full):] == -100).all() and (mask[0, len(full):] == 0).all()
    n_plain = len(_tokens(tokenizer, plain))
    assert labels[1, :n_plain].tolist() == ids[1, :n_plain].tolist()  # a plain text keeps every token
    everything = encode_batch(tokenizer, [pair], 512, "cpu", completion_only=False)
    assert everything["labels"][0, :len(full)].tolist() == full


def test_a_long_prompt_keeps_half_the_window_for_the_response(tiny):
    _, tokenizer = tiny
    pair = as_text({"instruction": "x" * 300, "response": "y" * 100}, tokenizer)
    batch = encode_batch(tokenizer, [pair], 64, "cpu", completion_only=True)
    labels = batch["labels"][0]
    assert batch["input_ids"].shape == (1, 64)
    assert int((labels != -100).sum()) == 32 and (labels[:32] == -100).all()
    # the cut removes the prompt's head: the window ends with the response's first 32 tokens
    response_ids = _tokens(tokenizer, pair.text[pair.prompt_chars:])[:32]
    assert batch["input_ids"][0, 32:].tolist() == response_ids


def _local(tiny, cfg, seed=3, texts=None):
    model, tokenizer = tiny
    torch.manual_seed(0)
    peft_model = lora_model(model, cfg)
    start = adapter_state(peft_model)
    result = train_locally(peft_model, tokenizer, start, texts or TEXTS, cfg, seed=seed, freeze_lora_a=False, mu=0.0)
    grads = [p.grad for p in peft_model.parameters() if p.requires_grad and p.grad is not None]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    peft_model.unload()  # the next lora_model starts from the plain model
    return result, norm


def test_clipping_bounds_the_gradient(tiny):
    base = RunConfig(model="tiny", rank=4, local_steps=2, batch_size=2, seq_len=32, lora_dropout=0.0)
    _, unclipped = _local(tiny, base.replace(max_grad_norm=None))
    _, clipped = _local(tiny, base.replace(max_grad_norm=1e-4))
    assert unclipped > 1e-3
    assert clipped <= 1e-4 * (1 + 1e-5)


def test_dropout_is_on_seeded_and_leaves_the_global_rng_alone(tiny):
    cfg = RunConfig(model="tiny", rank=4, local_steps=2, batch_size=2, seq_len=32, lora_dropout=0.5)
    model, _ = tiny
    torch.manual_seed(0)
    peft_model = lora_model(model, cfg)
    drops = [m.lora_dropout["default"] for m in peft_model.modules() if hasattr(m, "lora_dropout")]
    assert drops and all(isinstance(d, torch.nn.Dropout) and d.p == 0.5 for d in drops)
    peft_model.unload()
    rng_before = torch.random.get_rng_state()
    first, _ = _local(tiny, cfg, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    again, _ = _local(tiny, cfg, seed=3)
    other, _ = _local(tiny, cfg, seed=4)
    assert all(torch.equal(first.state[k], again.state[k]) for k in first.state)
    assert any(not torch.equal(first.state[k], other.state[k]) for k in first.state)
    no_drop, _ = _local(tiny, cfg.replace(lora_dropout=0.0), seed=3)
    assert any(not torch.equal(first.state[k], no_drop.state[k]) for k in first.state)


def test_run_config_checks_the_new_settings():
    assert RunConfig(max_grad_norm=0).max_grad_norm is None  # TOML has no null: 0 turns clipping off
    for bad in (dict(max_grad_norm=-1.0), dict(max_grad_norm=True), dict(lora_dropout=1.0), dict(lora_dropout=-0.1),
                dict(weighting="median"), dict(completion_only="yes"), dict(error_feedback=1), dict(rescale="no"),
                dict(eval_every=0), dict(schedule="random")):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            RunConfig(**bad)
    cfg = RunConfig(error_feedback=True)
    assert cfg.upload_config().error_feedback and cfg.upload_config().rescale is False
    assert RunConfig(error_feedback=True, rescale=True).upload_config().rescale is True
    assert cfg.aggregator().weighting == "equal"
    assert RunConfig(schedule="greedy").aggregator().decompose_options.schedule == "greedy"


def test_default_lr_follows_the_upload_and_an_explicit_lr_wins():
    from fedsrd_kernels.runner.config import LR_L1_RESCALED, LR_UNSCALED

    assert LR_L1_RESCALED < LR_UNSCALED
    rescaled = [RunConfig(), RunConfig(method="fedsrd-e"), RunConfig(error_feedback=True, rescale=True)]
    unscaled = [RunConfig(method="fedavg"), RunConfig(method="fed-dare"), RunConfig(method="flexlora"),
                RunConfig(error_feedback=True), RunConfig(selection="dense"), RunConfig(rescale=False)]
    assert [c.learning_rate for c in rescaled] == [LR_L1_RESCALED] * len(rescaled)
    assert [c.learning_rate for c in unscaled] == [LR_UNSCALED] * len(unscaled)
    # compare() swaps the method of one config: each method gets its own default, an explicit lr stays.
    assert RunConfig(method="fedavg").replace(method="fedsrd").learning_rate == LR_L1_RESCALED
    assert RunConfig(lr=2e-5).replace(method="fedavg").learning_rate == 2e-5
    for bad in (0.0, -1e-3, float("nan"), "1e-3"):
        with pytest.raises(ConfigError, match="lr"):
            RunConfig(lr=bad)


def test_equal_weighting_ignores_sample_counts():
    gen = torch.Generator().manual_seed(2)
    global_state = lora_state([(13, 11), (6, 9)], 3, gen=gen)
    updates = [fk.sparsify(perturbed(global_state, 0.05, gen=gen), global_state, fk.SparsifyConfig(
        selection="dense")) for _ in range(3)]
    equal = fk.Aggregator("fedavg", weighting="equal").aggregate(global_state, updates, weights=[1, 50, 400])
    plain = fk.Aggregator("fedavg").aggregate(global_state, updates, weights=None)
    by_samples = fk.Aggregator("fedavg").aggregate(global_state, updates, weights=[1, 50, 400])
    for key, sparse in plain.deltas.items():
        assert torch.equal(equal.deltas[key].values, sparse.values)
        assert not torch.equal(by_samples.deltas[key].values, sparse.values)
    with pytest.raises(ConfigError, match="weighting"):
        fk.Aggregator("fedavg", weighting="median")


def test_selection_override_makes_a_study_variant():
    """fedsrd-e with a dense upload and no download drop moves W = B A by the split (eq. 11-13) of the
    client's whole update B_i A_i - B A: nothing is lost before the server's projection."""
    assert RunConfig(method="fedsrd", selection="dense").upload_config().selection == "dense"
    assert RunConfig(method="fedsrd").upload_config().selection == "importance"
    with pytest.raises(ConfigError, match="selection"):
        RunConfig(selection="topk")
    gen = torch.Generator().manual_seed(5)
    global_state = lora_state([(13, 11), (6, 9)], 3, gen=gen)
    local = perturbed(global_state, 0.05, gen=gen)
    dense = fk.SparsifyConfig(selection="dense")
    aggregator = fk.Aggregator("fedsrd-e", upload=dense, download_drop=0.0)
    assert aggregator.client_config.selection == "dense"
    broadcast = aggregator.aggregate(global_state, [fk.sparsify(local, global_state, dense)], round=2)
    new = fk.apply(global_state, broadcast, base=fk.state_digest(global_state))
    for a_key in [k for k in local if k.endswith("lora_A.weight")]:
        b_key = a_key.replace("lora_A", "lora_B")
        b, a = global_state[b_key].double(), global_state[a_key].double()
        true_update = local[b_key].double() @ local[a_key].double() - b @ a
        assert torch.equal(new[b_key], global_state[b_key])  # an even round: A moves (eq. 12)
        got = b @ (new[a_key].double() - a)
        want = b @ torch.linalg.pinv(b) @ true_update  # the part of the update in B's column space
        assert torch.allclose(got, want, rtol=0, atol=1e-5), a_key


CLIENT_TEXTS = {
    "alpha": [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(30)],
    "beta": [f"The balance of account {i} is {i * 13 % 97} dollars after interest." for i in range(30)],
}


def _federate(tmp_path, rounds, name="run", **kwargs):
    cfg = RunConfig(method="fedsrd", rounds=rounds, model="tiny", rank=4, local_steps=2, batch_size=2, seq_len=32,
                    error_feedback=True, out_dir=str(tmp_path / name), **kwargs)
    model, tokenizer = model_mod.tiny_llama(seed=0)
    torch.manual_seed(cfg.seed)
    peft_model = lora_model(model, cfg)
    clients = [ClientData(n, t[4:], t[:4]) for n, t in CLIENT_TEXTS.items()]
    records = federate(peft_model, tokenizer, clients, cfg, log=lambda _: None, show_progress=False)
    return cfg, adapter_state(peft_model), records


def test_runner_error_feedback_resumes_bit_identical_and_refuses_foreign_residuals(tmp_path):
    _, straight, records = _federate(tmp_path, 3, "straight")
    _, _, first = _federate(tmp_path, 2, "split")
    _, resumed, _ = _federate(tmp_path, 3, "split")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # each client keeps only its newest residual; round 0 is measured once and kept
    for name in CLIENT_TEXTS:
        files = sorted(p.name for p in (tmp_path / "straight" / "clients" / name).iterdir())
        assert files == ["residual-3.safetensors"]
    progress = json.loads((tmp_path / "straight" / "progress.json").read_text())
    assert set(progress["base_heldout"]) == set(CLIENT_TEXTS)
    diag = records[-1]["diagnostics"]["alpha"]
    assert diag["adapter"]["along"] > 0
    assert all(0 < m["kept_fraction"] < 1 for m in diag["matrices"].values())
    # a residual of another run in a client's folder is refused, naming the file
    (tmp_path / "other" / "clients" / "alpha").mkdir(parents=True)
    source = tmp_path / "straight" / "clients" / "alpha" / "residual-3.safetensors"
    (tmp_path / "other" / "clients" / "alpha" / "residual-0.safetensors").write_bytes(source.read_bytes())
    with pytest.raises(StateError, match="residual-0.safetensors"):
        _federate(tmp_path, 1, "other")
