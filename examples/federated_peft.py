"""Federated LoRA fine-tuning with FedSRD over a real PEFT model: 3 clients, 2 rounds.

    python examples/federated_peft.py                # a tiny random-init Llama: offline, seconds
    python examples/federated_peft.py --model PATH   # any local Hugging Face causal-LM folder

(On a CPU that other jobs share, OMP_NUM_THREADS=1 keeps torch's threads from slowing each other.)

Each round every client loads the global adapter into its PEFT model, takes a few
AdamW steps on its own texts, and uploads a sparsified update as bytes. The server
screens and aggregates them (``fk.run_round``) and sends one broadcast, which the
server and every client apply to their copy of the global adapter. All randomness is
seeded: two runs print the same numbers.
"""

from __future__ import annotations

import argparse

import peft
import torch

import fedsrd_kernels as fk
from fedsrd_kernels.runner.model import load_model, tiny_llama

TEXTS = {
    "alice": ["def add(a, b):\n    return a + b\n", "def sub(a, b):\n    return a - b\n",
              "def mul(a, b):\n    return a * b\n"],
    "bob": ["The patient reported a mild headache.", "Take one tablet twice a day with water.",
            "Blood pressure was normal at the visit."],
    "carol": ["Interest of 5% on 200 dollars is 10 dollars.", "The account balance rose to 310 dollars.",
              "Fees are charged at the end of each month."],
}


def train(model, tokenizer, adapter, texts, steps, lr):
    """Load ``adapter`` into ``model``, take ``steps`` AdamW steps on ``texts``; return (local adapter, mean loss)."""
    peft.set_peft_model_state_dict(model, adapter)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    local = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    return local, sum(losses) / len(losses)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local HF causal-LM folder (default: a tiny random Llama)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="local AdamW steps per round")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)  # LoRA's A matrices are drawn from torch's global RNG
    base, tokenizer = tiny_llama(seed=args.seed, hidden=128) if args.model is None else load_model(args.model)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    # The clients share one model object here; each one loads its own copy of the global adapter into it.
    server_global = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    client_global = {name: dict(server_global) for name in TEXTS}
    initial = dict(server_global)
    dense_bytes = sum(t.numel() * t.element_size() for t in server_global.values())
    agg = fk.Aggregator(method="fedsrd", download_drop=0.8, seed=args.seed)
    history = []

    for t in range(1, args.rounds + 1):  # rounds count from 1
        submissions, losses = [], []
        for name, texts in TEXTS.items():  # client side
            held = client_global[name]
            local, loss = train(model, tokenizer, held, texts, args.steps, args.lr)
            upd = fk.sparsify(local, held, agg.client_config, num_samples=len(texts), round=t, client_id=name,
                              base=fk.state_digest(held))
            submissions.append(fk.Submission(name, fk.encode(upd), weight=len(texts)))
            losses.append(loss)

        base_digest = fk.state_digest(server_global)  # server side
        outcome = fk.run_round(agg, server_global, submissions, round=t, base=base_digest)
        if outcome.rejected:
            raise RuntimeError(f"round {t}: rejected {outcome.rejected}")
        data = fk.encode(outcome.broadcast)  # what every client downloads

        server_global = fk.apply(server_global, fk.decode(data), base=base_digest)
        for name in TEXTS:
            client_global[name] = fk.apply(client_global[name], fk.decode(data))
            assert fk.state_digest(client_global[name]) == fk.state_digest(server_global)

        up = [len(s.payload) for s in submissions]
        loss = sum(losses) / len(losses)
        print(f"round {t}: accepted {', '.join(outcome.accepted)}; upload per client {up} bytes, "
              f"{max(up) / dense_bytes:.1%} of the dense adapter's {dense_bytes}; mean train loss {loss:.4f}")
        history.append({"accepted": outcome.accepted, "upload_bytes": up, "dense_bytes": dense_bytes,
                        "broadcast": data, "loss": loss})

    peft.set_peft_model_state_dict(model, server_global)  # model.save_pretrained(folder) would export it
    return {"initial": initial, "final": server_global, "rounds": history}


if __name__ == "__main__":
    main()
