"""Pick the implementation of an op: "torch" | "triton" | "cuda".

Order of precedence: the ``backend=`` keyword of a call, then the
FEDSRD_BACKEND environment variable, then "auto":
  - CUDA tensors: the compiled extension when it is loaded, else Triton when it
    imports, else torch;
  - CPU tensors: torch. Triton runs on CPU tensors only in its interpreter
    (TRITON_INTERPRET=1, set before triton is imported), and only when asked
    for by name; it is ~100x slower than torch there and exists for testing.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings

import torch

from ..errors import ConfigError

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "FEDSRD_BACKEND"


@functools.cache
def triton_available() -> bool:
    """True when triton imports (on a GPU, or on CPU through its interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install is "not available", not a crash
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


CUDA_EXTENSION = "fedsrd_kernels._C"


@functools.cache
def _load_cuda_extension() -> tuple[bool, str]:
    """Import the compiled ops once: (loaded, status for backend_info)."""
    if importlib.util.find_spec(CUDA_EXTENSION) is None:
        return False, ("not built (a pure-Python install; building needs a source checkout with nvcc and torch: "
                       "see the README's \"Kernels and backends\")")
    try:
        from .download import cuda  # noqa: F401  (the op schemas the extension's kernels register against)

        importlib.import_module(CUDA_EXTENSION)
    except Exception as exc:  # a stale or mismatched build: say so once, then use Triton or torch
        status = f"failed to load: {type(exc).__name__}: {exc}"
        warnings.warn(f"fedsrd_kernels: the CUDA extension {CUDA_EXTENSION} {status}; using Triton or torch instead",
                      RuntimeWarning, stacklevel=3)
        return False, status
    return True, "loaded"


def cuda_extension_available() -> bool:
    """True when the compiled CUDA ops (csrc/, module fedsrd_kernels._C) imported; tried once."""
    return _load_cuda_extension()[0]


def cuda_extension_status() -> str:
    """"loaded", "not built (...)" or "failed to load: ..." (the first import's outcome)."""
    return _load_cuda_extension()[1]


def check_backend_name(requested: str | None) -> str:
    """The requested backend (keyword, else FEDSRD_BACKEND, else "auto"), checked by name."""
    choice = requested if requested is not None else os.environ.get(ENV_VAR, "auto")
    if choice not in (*BACKENDS, "auto"):
        raise ConfigError(f"backend must be one of {BACKENDS} or 'auto' (from {ENV_VAR} or backend=), got {choice!r}")
    return choice


def resolve_backend(device: torch.device | str, requested: str | None = None, *, cuda_op: bool = False) -> str:
    """The backend an op on tensors of ``device`` should use.

    ``cuda_op`` says whether the op has a CUDA C++ implementation. Ops without
    one run on Triton when "cuda" is asked for or picked automatically, so
    loading the extension never moves an op from Triton back to torch.
    """
    choice = check_backend_name(requested)
    on_cuda = torch.device(device).type == "cuda"
    if choice == "auto":
        if on_cuda and cuda_op and cuda_extension_available():
            return "cuda"
        if on_cuda and triton_available():
            return "triton"
        return "torch"
    if choice == "cuda":
        if not (on_cuda and cuda_extension_available()):
            raise ConfigError("backend 'cuda' needs CUDA tensors and the compiled extension, which is not loaded")
        if not cuda_op:
            return "triton" if triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise ConfigError("backend 'triton' asked for, but triton does not import")
        if not on_cuda and not triton_interpreted():
            raise ConfigError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return choice


def backend_info() -> dict[str, object]:
    """What is available here, for logs and bug reports."""
    return {
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": triton_available(),
        "triton_interpreter": triton_interpreted(),
        "cuda_extension": cuda_extension_available(),
        "cuda_extension_status": cuda_extension_status(),
        "env": os.environ.get(ENV_VAR),
    }
