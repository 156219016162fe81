"""Local training and evaluation of a PEFT LoRA model on one client's texts."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import KeyMismatchError
from .config import RunConfig


class TrainText(NamedTuple):
    """A rendered example: its text, and how many leading characters are the prompt.

    Instruction pairs render through the chat template as prompt + response;
    with ``completion_only`` the loss skips the tokens that start inside the
    prompt (the paper's completion-only collator). A plain text is a ``str``
    (or ``prompt_chars == 0``) and keeps the loss on every token.
    """

    text: str
    prompt_chars: int = 0


Text = str | TrainText


def lora_model(model, cfg: RunConfig):
    """Wrap ``model`` with LoRA adapters (rank, alpha, target modules from ``cfg``)."""
    import peft

    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=targets, lora_dropout=cfg.lora_dropout)
    return peft.get_peft_model(model, config)


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The adapter's PEFT state dict, detached copies on the CPU."""
    import peft

    # save_embedding_layers=False: the adapter trains no embeddings, and "auto" looks the base model up on
    # the hub by name (the default model's name is its hub id) on every call.
    state = peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def load_adapter_state(peft_model, state: dict[str, torch.Tensor]) -> None:
    import peft

    result = peft.set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyMismatchError(f"adapter state has keys the model lacks: {unexpected[:3]}")


def batches(tokenizer, texts: list[Text], cfg: RunConfig, rng: random.Random, steps: int, device):
    """``steps`` batches of ``batch_size`` random texts, truncated to ``seq_len`` tokens."""
    for _ in range(steps):
        chosen = [texts[rng.randrange(len(texts))] for _ in range(cfg.batch_size)]
        yield encode_batch(tokenizer, chosen, cfg.seq_len, device, completion_only=cfg.completion_only)


def encode_batch(tokenizer, texts: list[Text], seq_len: int, device, *,
                 completion_only: bool = True) -> dict[str, torch.Tensor]:
    """Token ids, attention mask and labels of at most ``seq_len`` tokens, padded on the right.

    Labels are -100 on padding and, with ``completion_only``, on the prompt of an
    instruction pair. A prompt longer than half the window loses its head (the
    chat template's system line comes first), so the response keeps at least
    half the window: at 128 tokens SmolLM2's prompts (median 59 tokens for
    medical, 70 for math) would otherwise leave many pairs nothing to learn.
    Plain texts are cut at the end, as before.
    """
    plain = [t.text if isinstance(t, TrainText) else t for t in texts]
    prompts = [t.prompt_chars if isinstance(t, TrainText) and completion_only else 0 for t in texts]
    enc = tokenizer(plain, return_offsets_mapping=any(prompts))
    rows, label_rows = [], []
    for row, prompt_chars in enumerate(prompts):
        ids = list(enc["input_ids"][row])
        prompt_tokens = 0
        if prompt_chars:
            offsets = enc["offset_mapping"][row]
            prompt_tokens = next((i for i, (begin, _) in enumerate(offsets) if begin >= prompt_chars), len(ids))
            cut = max(0, prompt_tokens - seq_len // 2)
            ids, prompt_tokens = ids[cut:], prompt_tokens - cut
        ids = ids[:seq_len]
        rows.append(ids)
        label_rows.append([-100] * min(prompt_tokens, len(ids)) + ids[prompt_tokens:])
    width = max(1, max(len(ids) for ids in rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, targets) in enumerate(zip(rows, label_rows)):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, :len(targets)] = torch.tensor(targets, dtype=torch.long)
        attention[row, :len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}


def target_count(batch: dict[str, torch.Tensor]) -> int:
    """How many tokens the causal-LM loss is taken over (labels shift by one)."""
    return int((batch["labels"][:, 1:] != -100).sum())


@dataclass(frozen=True)
class LocalResult:
    state: dict[str, torch.Tensor]
    loss: float
    seconds: float


def train_locally(peft_model, tokenizer, global_state, texts: list[Text], cfg: RunConfig, *, seed: int,
                  freeze_lora_a: bool, mu: float, progress=None) -> LocalResult:
    """Start from the global adapter, take ``cfg.local_steps`` AdamW steps, return the local adapter.

    FedProx adds mu/2 ||theta - theta_global||^2 over the adapter; FFA-LoRA
    freezes lora_A. The gradient is clipped to ``cfg.max_grad_norm``. ``seed``
    fixes the batches and the dropout draws (torch's global RNG is left as it
    was), so a round retrained after a crash is bit-identical. A batch with no
    target token (every prompt fills the window) is skipped: its loss is 0/0.
    """
    start = time.perf_counter()
    load_adapter_state(peft_model, global_state)
    device = next(peft_model.parameters()).device
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    for name, param in trainable.items():
        param.requires_grad_(not (freeze_lora_a and "lora_A" in name))
    params = [p for p in trainable.values() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if mu > 0 else []
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    peft_model.train()
    losses = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for batch in batches(tokenizer, texts, cfg, random.Random(seed), cfg.local_steps, device):
            if progress is not None:
                progress.update(1)
            if target_count(batch) == 0:
                continue
            loss = peft_model(**batch).loss
            if mu > 0:
                loss = loss + 0.5 * mu * sum((p - a).square().sum() for p, a in zip(params, anchors))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            losses.append(float(loss.detach()))
    for param in trainable.values():
        param.requires_grad_(True)
    mean = sum(losses) / len(losses) if losses else float("nan")
    return LocalResult(adapter_state(peft_model), mean, time.perf_counter() - start)


# Held-out texts go through the model in batches of this many, sorted by length so
# little is padding.
EVAL_BATCH = 16


@torch.no_grad()
def heldout_loss(peft_model, tokenizer, global_state, texts: list[Text], cfg: RunConfig) -> float:
    """Mean token loss of the global adapter on held-out texts (response tokens only with ``completion_only``)."""
    load_adapter_state(peft_model, global_state)
    peft_model.eval()
    device = next(peft_model.parameters()).device
    ordered = sorted(texts, key=lambda t: len(t.text if isinstance(t, TrainText) else t))
    total, tokens = 0.0, 0
    for i in range(0, len(ordered), EVAL_BATCH):
        batch = encode_batch(tokenizer, ordered[i:i + EVAL_BATCH], cfg.seq_len, device,
                             completion_only=cfg.completion_only)
        count = target_count(batch)
        if count:
            total += float(peft_model(**batch).loss) * count
            tokens += count
    return total / tokens if tokens else float("nan")
