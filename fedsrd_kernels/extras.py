"""The optional extras and the modules each brings: one home for "which extra do I install?"."""

from __future__ import annotations

import importlib.util

from .errors import MissingExtraError

# What each extra of setup.py adds that the package imports (the data sources of
# single domains are not here: a missing one skips its domain with one line).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "runner": ("transformers", "peft", "gguf", "datasets"),
    "flower": ("flwr",),
}


def require_extra(extra: str, what: str) -> None:
    """Raise MissingExtraError naming the extra and the missing modules when ``what`` cannot run."""
    missing = [name for name in EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(f"{what} needs the {extra!r} extra: pip install 'fedsrd_kernels[{extra}]' "
                                f"(missing: {', '.join(missing)})")
