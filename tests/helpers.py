"""Builders shared by the tests: random LoRA states with odd shapes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from fedsrd_kernels.runner.loop import stable_seed


def seeded_gen(*parts) -> torch.Generator:
    """A generator seeded from ``parts`` alike in every process (``hash`` of a str is salted per process)."""
    return torch.Generator().manual_seed(stable_seed(*parts))


def lora_state(shapes, rank, *, gen, zero_b=False, extra=True, dtype=torch.float32):
    """A PEFT-like state dict: one pair per (d_out, d_in), plus a bias key."""
    state = {}
    for i, (d_out, d_in) in enumerate(shapes):
        prefix = f"base_model.model.layers.{i}.mlp.proj"
        state[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen, dtype=dtype) / d_in**0.5
        b = torch.zeros(d_out, rank, dtype=dtype) if zero_b else torch.randn(d_out, rank, generator=gen, dtype=dtype)
        state[f"{prefix}.lora_B.weight"] = b / rank**0.5
    if extra:
        state["base_model.model.score.bias"] = torch.randn(7, generator=gen, dtype=dtype)
    return state


def perturbed(state, scale, *, gen, freeze_a=False):
    """A client's locally trained state: every tensor moved by Gaussian noise."""
    out = {}
    for key, value in state.items():
        if freeze_a and key.endswith("lora_A.weight"):
            out[key] = value.clone()
        else:
            out[key] = value + scale * torch.randn(value.shape, generator=gen, dtype=value.dtype)
    return out


def rel_err(got, want) -> float:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    den = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (den if den > 0 else 1.0))


def snapshot(state):
    return {k: v.clone() for k, v in state.items()}


def assert_unchanged(state, before):
    assert state.keys() == before.keys()
    for key in before:
        assert torch.equal(state[key], before[key]), key


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def kernel_device() -> str:
    """Where kernel tests run: the GPU when there is one, else the CPU (Triton's interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same dtype, shape and bits (torch.equal would let -0.0 pass for +0.0)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    got, want = got.cpu().contiguous(), want.cpu().contiguous()
    assert torch.equal(got.view(_BITS[got.dtype]), want.view(_BITS[want.dtype]))


def load_script(path: Path, name: str):
    """A script outside the package (an example, a benchmark driver) imported as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module
