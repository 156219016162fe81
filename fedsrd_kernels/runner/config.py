"""Configuration of a federated fine-tuning run: a TOML file plus flag overrides."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..baselines import METHODS
from ..config import RESCALE_SPACES, SELECTIONS, SparsifyConfig
from ..errors import ConfigError
from ..server import WEIGHTINGS, Aggregator
from ..server.decompose import SCHEDULES

DOMAINS = ("code", "medical", "math", "finance")

# The default learning rate, by upload: each method's best of the lr sweep (benchmarks/quality/sweep.toml:
# SmolLM2-135M, r = 8, 4 AdamW steps of 4 x 128 tokens, completion-only loss, clipping at 1.0, 12 rounds;
# final mean held-out loss in BENCHMARKS.md). The paper's L1 rescale multiplies a top-k upload's kept values
# by ~12-20 under Adam, a hidden step multiplier, so those uploads train best at a third of the others' lr:
# FedSRD 2.374 at 1e-3 against 2.478 at 3e-4, diverging at 3e-3; FedSRD-e 2.374 at 1e-3. Uploads without it
# (dense, random, error feedback) peak at 3e-3: FedAvg 2.207 against 2.314 at 1e-3 and 2.269 at 1e-2;
# FedSRD with error feedback 2.357 against 2.504 at 1e-3; FedSRD with a dense upload 2.285.
LR_L1_RESCALED = 1e-3
LR_UNSCALED = 3e-3


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; checked at construction.

    model:  None = the embedded SmolLM2-135M-Instruct; "tiny" = a random-init
            2-layer Llama (tests, smoke runs); else a local HF folder or hub id.
    domains: one client per domain; jsonl: extra clients as {name: path}.

    Training settings (the paper's scripts use all of them):
    completion_only: loss on the response tokens of instruction pairs only
            (plain texts keep the loss on every token), for training and held-out loss.
    max_grad_norm: clip the local gradient to this norm (None or 0 = no clipping).
    lora_dropout: dropout on the LoRA branch during local training.
    weighting: "equal" (p_i = 1/m, the paper's) or "samples" (p_i = n_i / sum n).
    error_feedback, rescale, rescale_space: the upload's error feedback and
            rescale (see SparsifyConfig); rescale None = on, except with error
            feedback; rescale_space "params" (L1 per matrix, the paper's code) or "dw".
    selection: the upload's selection (see SparsifyConfig); None = the method's.
            Another one makes a study variant: fedsrd with a dense upload
            isolates what the server's SVD_r and download cost from what
            sparsifying the upload costs.
    schedule: which factor the FedSRD server moves per pair: "alternate" (the
            paper's) or "greedy" (the one that keeps more of dW; see Aggregator).
    eval_every: held-out loss every this many rounds (and after the last); the
            base adapter's loss (round 0) is always measured once.
    lr:     AdamW's learning rate; None = the best one the quality study measured
            for this run's upload (``learning_rate``), so that methods compared
            with their defaults are each at their own best lr.

    The defaults finish 3 rounds of SmolLM2-135M with 4 clients on a 2-core CPU
    in minutes: with 16 held-out texts per client and 96-token sequences one
    run took 9 min 48 s while other jobs shared the cores, hence 8 and 64.
    """

    method: str = "fedsrd"
    rounds: int = 3
    model: str | None = None
    domains: tuple[str, ...] = DOMAINS
    jsonl: dict[str, str] = field(default_factory=dict)
    max_examples: int = 400
    heldout_examples: int = 8
    rank: int = 8
    alpha: float = 16.0
    target_modules: str | tuple[str, ...] = "all-linear"
    local_steps: int = 4
    batch_size: int = 4
    seq_len: int = 64
    lr: float | None = None
    completion_only: bool = True
    max_grad_norm: float | None = 1.0
    lora_dropout: float = 0.05
    weighting: str = "equal"
    error_feedback: bool = False
    rescale: bool | None = None
    rescale_space: str = "params"
    selection: str | None = None
    schedule: str = "alternate"
    eval_every: int = 1
    mu: float | None = None
    participation: float = 1.0
    download_drop: float | None = None
    norm_bound: float | None = None
    min_updates: int = 1
    value_dtype: str = "float32"
    seed: int = 0
    out_dir: str | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        for name in ("rounds", "max_examples", "heldout_examples", "rank", "local_steps", "batch_size", "seq_len",
                     "min_updates", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("alpha",) + (("lr",) if self.lr is not None else ()):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a number > 0, got {value!r}")
        for name in ("completion_only", "error_feedback") + (("rescale",) if self.rescale is not None else ()):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.max_grad_norm == 0 and not isinstance(self.max_grad_norm, bool):  # TOML has no null: 0 = off
            object.__setattr__(self, "max_grad_norm", None)
        if self.max_grad_norm is not None and not (
                isinstance(self.max_grad_norm, (int, float)) and not isinstance(self.max_grad_norm, bool)
                and math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ConfigError(f"max_grad_norm must be a number > 0 or None, got {self.max_grad_norm!r}")
        if isinstance(self.lora_dropout, bool) or not (isinstance(self.lora_dropout, (int, float))
                                                       and 0 <= self.lora_dropout < 1):
            raise ConfigError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        if self.rescale_space not in RESCALE_SPACES:
            raise ConfigError(f"rescale_space must be one of {RESCALE_SPACES}, got {self.rescale_space!r}")
        if self.selection is not None and self.selection not in SELECTIONS:
            raise ConfigError(f"selection must be one of {SELECTIONS} or None, got {self.selection!r}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.norm_bound is not None and not (isinstance(self.norm_bound, (int, float)) and
                                                math.isfinite(self.norm_bound) and self.norm_bound > 0):
            raise ConfigError(f"norm_bound must be a number > 0 or None, got {self.norm_bound!r}")
        if not (0 < self.participation <= 1):
            raise ConfigError(f"participation must be in (0, 1], got {self.participation!r}")
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown:
            raise ConfigError(f"unknown domains {unknown}; choose from {DOMAINS} or pass jsonl clients")
        if not self.domains and not self.jsonl:
            raise ConfigError("a run needs at least one client: domains or jsonl")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> RunConfig:
        """Defaults, then the TOML file's [run] table (or top level), then overrides (None = unset)."""
        values: dict[str, Any] = {}
        if path is not None:
            try:
                data = tomllib.loads(Path(path).read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read config {str(path)!r}: {exc}") from exc
            values.update(data.get("run", data))
        values.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}")
        for key in ("domains", "target_modules"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)

    def run_folder(self, command: str = "run") -> Path:
        """Where the run writes: ``out_dir`` when given, else ``runs/<command>/<method>``, so
        that ``run``, ``compare``, the Flower app and each method never share a folder."""
        return Path(self.out_dir) if self.out_dir else Path("runs", command, self.method)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def learning_rate(self) -> float:
        """``lr``, or by default the measured best for this run's upload (see LR_L1_RESCALED)."""
        if self.lr is not None:
            return self.lr
        upload = self.upload_config()
        l1_rescaled = upload.rescale and upload.rescale_space == "params" and upload.selection in ("importance",
                                                                                                   "magnitude")
        return LR_L1_RESCALED if l1_rescaled else LR_UNSCALED

    def upload_config(self) -> SparsifyConfig:
        """How this run's clients sparsify their uploads."""
        selection = METHODS[self.method].selection if self.selection is None else self.selection
        return SparsifyConfig(selection=selection, error_feedback=self.error_feedback,
                              rescale=self.rescale, rescale_space=self.rescale_space)

    def aggregator(self) -> Aggregator:
        """The run's Aggregator: the one place the runner and the Flower apps build it from."""
        return Aggregator(self.method, download_drop=self.download_drop, seed=self.seed, value_dtype=self.value_dtype,
                          mu=self.mu, norm_bound=self.norm_bound, weighting=self.weighting,
                          upload=self.upload_config(), schedule=self.schedule)
