"""Entry points of the runner: ``run`` one method, ``compare`` several on the same data."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ConfigError
from .config import RunConfig
from .loop import ClientData, federate
from .report import format_table, plot_loss_vs_traffic, summary_rows
from .train import Text, TrainText, adapter_state, lora_model


def as_text(example, tokenizer) -> Text:
    """A training text: plain strings as they are, instruction pairs through the chat template.

    A pair becomes a ``TrainText`` that marks where its prompt (everything up to
    the assistant's turn) ends, for the completion-only loss.
    """
    if isinstance(example, str):
        return example
    if "text" in example:
        return example["text"]
    prompt = [{"role": "user", "content": example["instruction"]}]
    messages = [*prompt, {"role": "assistant", "content": example["response"]}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        # A template whose prompt part is not a prefix of the whole gives no safe cut: keep every token.
        return TrainText(text, len(head) if text.startswith(head) else 0)
    head = f"{example['instruction']}\n"
    return TrainText(head + example["response"], len(head))


def build_clients(cfg: RunConfig, tokenizer, log=print) -> list[ClientData]:
    """One client per domain whose source is present, plus one per JSONL file."""
    from .data import load_domains, load_jsonl

    clients = []
    domains = load_domains(cfg.domains, max_examples=cfg.max_examples, heldout_examples=cfg.heldout_examples,
                           seed=cfg.seed) if cfg.domains else {}
    for name, data in domains.items():
        train = [as_text(x, tokenizer) for x in data.train]
        heldout = [as_text(x, tokenizer) for x in data.heldout]
        clients.append(ClientData(name, train, heldout))
    for name, path in cfg.jsonl.items():
        examples = [as_text(x, tokenizer) for x in load_jsonl(path)]
        cut = max(1, len(examples) // 10)
        clients.append(ClientData(name, examples[cut:][: cfg.max_examples], examples[:cut][: cfg.heldout_examples]))
    clients = [c for c in clients if c.train and c.heldout]
    if not clients:
        raise ConfigError("no client has data: every domain source is missing and no JSONL file was given")
    log("clients: " + ", ".join(f"{c.name} ({len(c.train)} train / {len(c.heldout)} held-out)" for c in clients))
    return clients


def load_base(cfg: RunConfig):
    from .model import load_model, tiny_llama

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    model, tokenizer = tiny_llama(seed=cfg.seed) if cfg.model == "tiny" else load_model(cfg.model)
    return model.to(device), tokenizer


def initial_adapter(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The adapter a run of ``cfg`` starts from (LoRA on the base model after ``torch.manual_seed(seed)``, as
    ``run`` builds it): what the Flower ServerApp loads as its ``initial-adapter``, without the base model."""
    torch.manual_seed(cfg.seed)
    model, _ = load_base(cfg)
    return adapter_state(lora_model(model, cfg))


def run(cfg: RunConfig, *, log=print, show_progress: bool = True) -> list[dict]:
    """Federated fine-tuning with one method; writes rounds.jsonl, adapter/, summary.txt, loss_vs_mb.png."""
    cfg = cfg.replace(out_dir=str(cfg.run_folder("run")))
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_base(cfg)
    clients = build_clients(cfg, tokenizer, log)
    log(f"{cfg.method}: lr {cfg.learning_rate:g}{' (the default for its upload)' if cfg.lr is None else ''}")
    peft_model = lora_model(model, cfg)
    records = federate(peft_model, tokenizer, clients, cfg, log=log, show_progress=show_progress)
    _write_summary({cfg.method: records}, Path(cfg.out_dir), log)
    return records


def _base_heldout(out: Path) -> dict[str, float] | None:
    """The base model's held-out loss (round 0) a run folder's progress.json keeps."""
    progress = out / "progress.json"
    return json.loads(progress.read_text()).get("base_heldout") if progress.exists() else None


def compare(cfg: RunConfig, methods: list[str], *, log=print, show_progress: bool = True) -> dict[str, list[dict]]:
    """Several methods, same seed, data and steps; one run folder each under ``cfg.out_dir``
    (default ``runs/compare``), which gets the joint summary."""
    root = Path(cfg.out_dir or Path("runs", "compare"))
    results = {}
    for method in methods:
        sub = cfg.replace(method=method, out_dir=str(root / method))
        results[method] = run(sub, log=log, show_progress=show_progress)
    _write_summary(results, root, log)
    return results


def _write_summary(results: dict[str, list[dict]], out: Path, log) -> None:
    single = len(results) == 1 and (out / "progress.json").exists()
    bases = {m: _base_heldout(out if single else out / m) for m in results}
    rows = summary_rows(results, bases)
    table = format_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.txt").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    plot = plot_loss_vs_traffic(results, out / "loss_vs_mb.png", bases)
    log(table)
    log(f"plot: {plot}")
