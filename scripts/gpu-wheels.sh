#!/usr/bin/env bash
# Fetch, on a machine that reaches the package registry, the wheels the GPU machine lacks into .whl/
# (ignored by git; carry it to the GPU machine, where benchmarks/gpu/run.sh installs them offline).
#
# The GPU machine has Python 3.12, torch + CUDA, Triton, safetensors, numpy, pytest, transformers and
# peft (hence tqdm, psutil, setuptools), and no network. Missing there:
#   zstandard        fedsrd_kernels/wire.py imports it, so the package does not import without it
#   hypothesis       tests/test_sparsify_triton.py (and tests/test_gpu.py, which reuses its helpers)
#   sortedcontainers hypothesis's one dependency
#   scipy            benchmarks/bench_client.py times the authors' scipy.stats.kurtosis (~35 MB: SKIP_SCIPY=1
#                    leaves it out, and that one benchmark then fails alone)
# pytest-benchmark (a test extra) is not used by any test; tqdm comes with transformers.
# Versions are pinned to the ones the dev environment tests with.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS=(zstandard==0.25.0 hypothesis==6.155.2 sortedcontainers==2.4.0)
[ "${SKIP_SCIPY:-0}" = 1 ] || WHEELS+=(scipy==1.17.1)
mkdir -p .whl
# --no-deps: each dependency is listed above; binary wheels for CPython 3.12 on x86_64 Linux
# (pure-Python ones, py3-none-any, pass these filters as well).
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
ls -l .whl
du -sh .whl
