"""Configuration dataclasses, validated at construction, and the package's fixed numeric rules.

A bad value fails when the object is built, not rounds later inside a kernel.
The rules below (work dtype, element limit, value and factor dtypes) are defined
here once; every other module imports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import ConfigError

Selection = Literal["importance", "magnitude", "random", "dense"]
SELECTIONS: tuple[str, ...] = ("importance", "magnitude", "random", "dense")
RESCALE_SPACES: tuple[str, ...] = ("params", "dw")

# The dtype of the server's factor math (reconstruction, decompose, the streaming
# sketches, upload diagnostics). W_r - B A (and R - T in diagnostics) subtracts two
# nearly equal matrices: a float32 path loses ~1e-3 relative accuracy there, float64
# keeps ~1e-12 (see server/factored.py). On the factors the float64 working set is
# O(m (d_out + d_in) r), so the precision is cheap.
WORK_DTYPE = torch.float64

# Elements the seeded download mask covers in one tensor, and elements one wire payload
# may declare (all its tensors together, so every tensor of a decoded payload can be
# masked). Philox's element rule (kernels/download/reference.py) runs counter i // 4 as one uint32,
# so it reaches 4 * 2**32 = 2**34 elements; csrc/bindings.cpp holds the C++ copy
# (kMaxSeededNumel), which cannot import this one.
MAX_NUMEL = 4 * 2**32

# Wire dtypes for transmitted values, by name. fp32 is the default; bf16/fp16
# halve the value bytes at the cost of ~3 / ~4 significant decimal digits.
# The download kernels (Triton and CUDA) take exactly these as value dtypes.
VALUE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Factor dtypes the seeded expand-add kernels (Triton and CUDA) take: the adapter
# dtypes trained in practice. They add in float32 and round back with torch's bits,
# to equal server.apply's torch path bit for bit (bfloat16's round-to-nearest-even is
# written out in integer ops: Triton's interpreter truncates). They refuse others.
FACTOR_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)


def check_value_dtype(name: str) -> torch.dtype:
    """Map a value dtype name to the torch dtype, or raise ConfigError."""
    try:
        return VALUE_DTYPES[name]
    except KeyError:
        raise ConfigError(
            f"value_dtype must be one of {sorted(VALUE_DTYPES)}, got {name!r}"
        ) from None


def check_probability(name: str, value: float, *, allow_one: bool = False) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0.0
            and (value <= 1.0 if allow_one else value < 1.0)):  # the type first: None < 1.0 is a TypeError
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ConfigError(f"{name} must be a finite number in {bound}, got {value!r}")


@dataclass(frozen=True)
class SparsifyConfig:
    """How a client sparsifies its upload (spec section 1).

    selection:
      "importance"  FedSRD: keep the top-k of |delta| x (norm of the vector it
                    multiplies in dW), eq. 6; k from the kurtosis ratio, eq. 7-8.
      "magnitude"   Table 7 plug-in: top-k of |delta|, same adaptive ratio.
      "random"      Fed-DARE: keep each element with probability 1 - random_drop
                    and rescale the kept ones by 1 / (1 - random_drop).
      "dense"       FedAvg / FedProx / FFA-LoRA / FlexLoRA: send every element.
    base, coeff, upper: rho = base + min(upper, coeff * ln(max(kurtosis, 1))).
    rescale: scale the kept values so the sparse matrix keeps the dense L1 norm
             (sent as one scalar per matrix; applies to importance/magnitude).
             None (default) = on, except with error feedback, where it is off.
    error_feedback: beyond the paper. What a client does not send this round
             (its ``SparseUpdate.residual``) is added to its next round's delta
             before selection, so nothing is lost in the long run. Under Adam the
             L1 rescale multiplies the kept values by ~12-20 (a hidden step-size
             multiplier); error feedback needs no rescale, hence its default off.
    rescale_space: where the rescale keeps the update's size (beyond the paper):
             "params" (default): the paper's code, L1 per matrix, as above;
             "dw": one least-squares scalar per LoRA pair in dW space,
             s = <R, T> / |R|^2 with T = B_i A_i - B A the trained update and R the
             one rebuilt from the kept values (first order: both kept deltas get s),
             from 2r x 2r Grams. It undoes the loss of length along T without
             blowing up what the kept entries add across it.
    value_dtype: dtype of the transmitted values ("float32", "bfloat16", "float16").
    seed: seed of the "random" selection; None draws from torch's global RNG.
    """

    base: float = 0.85
    coeff: float = 0.1
    upper: float = 0.11
    rescale: bool | None = None
    selection: Selection = "importance"
    random_drop: float = 0.9
    value_dtype: str = "float32"
    seed: int | None = None
    error_feedback: bool = False
    rescale_space: Literal["params", "dw"] = "params"

    def __post_init__(self) -> None:
        for name in ("error_feedback",) + (("rescale",) if self.rescale is not None else ()):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.rescale is None:
            object.__setattr__(self, "rescale", not self.error_feedback)
        if self.rescale_space not in RESCALE_SPACES:
            raise ConfigError(f"rescale_space must be one of {RESCALE_SPACES}, got {self.rescale_space!r}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        check_probability("base", self.base, allow_one=True)
        for name in ("coeff", "upper"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value >= 0.0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.base + self.upper > 1.0:
            raise ConfigError(
                f"base + upper must be <= 1 (rho is a quantile), got {self.base} + {self.upper}"
            )
        check_probability("random_drop", self.random_drop)
        check_value_dtype(self.value_dtype)
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            raise ConfigError(f"seed must be a non-negative int or None, got {self.seed!r}")
