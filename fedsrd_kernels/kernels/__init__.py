"""Per-op kernels, one subpackage per op (sparsify/, download/, reconstruct/), each with the same
parts: ``reference.py``, the torch reference (the CPU path and the oracle the Triton/CUDA versions
are tested against); ``triton.py``, the Triton kernels; ``cuda.py``, the binding of the compiled
CUDA ops where one exists (download only); ``dispatch.py``, the backend choice where the op has one
entry point. ``_backend.py`` is the shared dispatch policy, ``triton_utils.py`` the helpers the
Triton kernels share (float casts, dtype tables, block tables, launch settings)."""
