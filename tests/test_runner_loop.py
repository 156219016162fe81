"""The federated runner on a tiny random-init Llama: every method, resume, bytes, CLI."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from fedsrd_kernels.runner.config import RunConfig
from fedsrd_kernels.runner.loop import ClientData, federate
from fedsrd_kernels.runner.train import adapter_state, lora_model

peft = pytest.importorskip("peft")
model_mod = pytest.importorskip("fedsrd_kernels.runner.model")

TEXTS = {
    "alpha": [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(40)],
    "beta": [f"The balance of account {i} is {i * 13 % 97} dollars after interest." for i in range(40)],
}


def clients():
    return [ClientData(name, texts[4:], texts[:4]) for name, texts in TEXTS.items()]


def tiny_run(tmp_path, method, rounds=1, **kwargs):
    cfg = RunConfig(method=method, rounds=rounds, model="tiny", rank=4, local_steps=2, batch_size=2, seq_len=32,
                    out_dir=str(tmp_path / method), **kwargs)
    model, tokenizer = model_mod.tiny_llama(seed=0)
    torch.manual_seed(cfg.seed)  # LoRA's A init draws from the global RNG; runner.run seeds it the same way
    peft_model = lora_model(model, cfg)
    start = adapter_state(peft_model)
    records = federate(peft_model, tokenizer, clients(), cfg, log=lambda _: None, show_progress=False)
    return cfg, peft_model, start, records


@pytest.mark.parametrize("method", ["fedsrd", "fedsrd-e", "fedavg", "fedprox", "ffa-lora", "flexlora", "fed-dare",
                                    "fedavg-magnitude", "fedavg-importance"])
def test_one_round_per_method(tmp_path, method):
    cfg, peft_model, start, records = tiny_run(tmp_path, method)
    (record,) = records
    assert record["round"] == 1 and record["method"] == method
    assert set(record["heldout_loss"]) == set(TEXTS) and all(v > 0 for v in record["heldout_loss"].values())
    assert record["upload_bytes"] > 0 and record["download_bytes"] > 0
    assert record["upload_paper_bytes"] > 0
    end = adapter_state(peft_model)
    assert any(not torch.equal(end[k], start[k]) for k in start), "the round changed nothing"
    fidelity = record["server_fidelity"]["adapter"]  # the applied change against the exact aggregate
    assert fidelity["along"] == fidelity["along"] and fidelity["orthogonal"] >= 0, fidelity
    if method == "ffa-lora":
        assert all(torch.equal(end[k], start[k]) for k in start if "lora_A" in k)
        # A frozen: the mean of the B_i times A is the aggregate itself (float32 states)
        assert fidelity["along"] == pytest.approx(1.0, abs=1e-4) and fidelity["orthogonal"] < 1e-3, fidelity
    saved = json.loads((tmp_path / method / "rounds.jsonl").read_text().splitlines()[0])
    assert saved == record


def test_sparse_methods_upload_less_than_fedavg(tmp_path):
    _, _, _, dense = tiny_run(tmp_path, "fedavg")
    _, _, _, sparse = tiny_run(tmp_path, "fedsrd")
    assert sparse[0]["upload_bytes"] < 0.5 * dense[0]["upload_bytes"]
    assert sparse[0]["download_bytes"] < 0.5 * dense[0]["download_bytes"]


def test_saved_adapter_loads_with_peft(tmp_path):
    cfg, peft_model, _, _ = tiny_run(tmp_path, "fedsrd")
    model, _ = model_mod.tiny_llama(seed=0)
    loaded = peft.PeftModel.from_pretrained(model, str(tmp_path / "fedsrd" / "adapter"))
    want = adapter_state(peft_model)
    got = adapter_state(loaded)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_exported_adapter_names_its_base_model(tmp_path, monkeypatch):
    """adapter_config.json names the default model by its hub id, not the cache folder it was converted into,
    and any other model by the --model value given; PEFT loads the folder onto a freshly loaded base."""
    from fedsrd_kernels.runner.run import load_base

    folder = tmp_path / "base"
    model, tokenizer = model_mod.tiny_llama(seed=0)  # stands in for the converted SmolLM2
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setattr(model_mod, "default_model_dir", lambda: folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for given, want in ((None, "HuggingFaceTB/SmolLM2-135M-Instruct"), (str(folder), str(folder))):
            cfg = RunConfig(method="fedsrd", rounds=1, model=given, rank=4, local_steps=1, batch_size=2, seq_len=16,
                            device="cpu", out_dir=str(tmp_path / ("default" if given is None else "path")))
            base, tok = load_base(cfg)
            torch.manual_seed(cfg.seed)
            peft_model = lora_model(base, cfg)
            with warnings.catch_warnings(record=True) as caught:  # the export must not look the hub up
                warnings.simplefilter("always")
                federate(peft_model, tok, clients(), cfg, log=lambda _: None, show_progress=False)
            assert not [str(w.message)[:150] for w in caught if "remote" in str(w.message) or "config file" in str(w.message)]
            adapter = Path(cfg.out_dir) / "adapter"
            assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == want
            loaded = peft.PeftModel.from_pretrained(model_mod.load_model(given)[0], str(adapter))
            want_state, got_state = adapter_state(peft_model), adapter_state(loaded)
            assert got_state.keys() == want_state.keys()
            assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)
    finally:
        torch.set_num_threads(threads)


def test_resume_continues_without_repeating_a_round(tmp_path):
    _, whole_model, _, whole = tiny_run(tmp_path / "whole", "fedsrd", rounds=3)
    # the same run stopped after round 2, then started again with rounds=3
    tiny_run(tmp_path / "split", "fedsrd", rounds=2)
    _, resumed_model, _, resumed = tiny_run(tmp_path / "split", "fedsrd", rounds=3)
    assert [r["round"] for r in resumed] == [1, 2, 3]
    lines = (tmp_path / "split" / "fedsrd" / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]
    a, b = adapter_state(whole_model), adapter_state(resumed_model)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed[-1]["heldout_loss"] == whole[-1]["heldout_loss"]


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[run]\nmethod = "fedavg"\nrounds = 5\ndomains = ["code"]\n')
    cfg = RunConfig.load(path, rounds=2, seed=None)
    assert (cfg.method, cfg.rounds, cfg.domains, cfg.seed) == ("fedavg", 2, ("code",), 0)
    from fedsrd_kernels import ConfigError

    for bad in ({"rounds": 0}, {"method": "fedbest"}, {"domains": ("poetry",)}, {"participation": 0.0}):
        with pytest.raises(ConfigError):
            RunConfig(**bad)
    path.write_text("[run]\nspeed = 11\n")
    with pytest.raises(ConfigError, match="speed"):
        RunConfig.load(path)
