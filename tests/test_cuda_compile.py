"""CPU checks of the CUDA sources (csrc/): every .cu compiles for sm_80 and sm_90 with plain nvcc,
the host build of the shared bit rules matches the Python references, and the package runs
without the extension.

The .cu files include no torch headers, so nvcc alone builds them; the flags mirror what
torch.utils.cpp_extension passes (C++20, the half/bfloat16 operator defines), so a source that
passes here also compiles in ``setup.py``'s build. All compiles run in parallel at the first test
(~17 s of the 2-core dev box when idle, ~32 s while other jobs load it). Skipped when nvcc is not on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsrd_kernels.kernels.download.reference import drop_threshold, philox4x32_10, seeded_keep_mask

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
NVCC = shutil.which("nvcc")
NVCC_FLAGS = [
    "-O3", "-std=c++20", f"-I{CSRC}", "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]  # fmt: skip
TIMEOUT_S = 300


def needs_nvcc(test):
    """Skipped without nvcc; slow with it (the first such test waits for every compile)."""
    skip = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA sources cannot be compiled here")
    return pytest.mark.slow(skip(test))


def _nvcc(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([NVCC, *args], capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """Every .cu compiled once per architecture to a cubin (device code), and once with its host code.

    The host job (nvcc -c, PTX only) checks the launchers and CUB's host API; it costs about as much as
    both cubins together (codec.cu: 8.5 s vs 4 s per cubin), so it runs once per file, not per arch.
    """
    out = tmp_path_factory.mktemp("cuda_objects")
    jobs = {}
    for src in CU_FILES:
        for arch in ARCHS:
            jobs[(src.name, arch)] = [*NVCC_FLAGS, f"-arch={arch}", "-cubin", str(src),
                                      "-o", str(out / f"{src.stem}.{arch}.cubin")]
        jobs[(src.name, "host")] = [*NVCC_FLAGS, f"-gencode=arch=compute_{ARCHS[-1][3:]},code=compute_{ARCHS[-1][3:]}",
                                    "-c", str(src), "-o", str(out / f"{src.stem}.o")]
    driver = out / "driver.cu"  # the host check of common.cuh / philox.cuh (_DRIVER, below)
    driver.write_text(_DRIVER)
    jobs[("driver", "host")] = ["-O2", "-std=c++20", f"-I{CSRC}", str(driver), "-o", str(out / "driver")]
    # All at once: nvcc alternates CPU-bound and waiting phases, so more jobs than cores still helps.
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return dict(zip(jobs, pool.map(_nvcc, jobs.values())))


def _assert_compiled(result: subprocess.CompletedProcess, what: str) -> None:
    assert result.returncode == 0, f"nvcc failed on {what}:\n{result.stderr[-4000:]}"
    assert "warning" not in result.stderr.lower(), f"nvcc warned on {what}:\n{result.stderr[-4000:]}"


def test_sources_exist():
    assert {p.name for p in CU_FILES} >= {"codec.cu"}
    assert (CSRC / "bindings.cpp").is_file()
    for src in CU_FILES:  # the .cu files must build with plain nvcc: torch stays in bindings.cpp
        includes = [line for line in src.read_text().splitlines() if line.startswith("#include")]
        assert not any("torch" in line or "ATen" in line or "c10" in line for line in includes), src.name


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", [p.name for p in CU_FILES])
def test_cu_compiles(source, arch, compiled):
    _assert_compiled(compiled[(source, arch)], f"{source} for {arch}")


@needs_nvcc
@pytest.mark.parametrize("source", [p.name for p in CU_FILES])
def test_cu_host_code_compiles(source, compiled):
    _assert_compiled(compiled[(source, "host")], f"{source} (host code)")


# --------------------------------------------------------------------------- host build of the shared rules

# Drives the __host__ __device__ helpers of csrc/common.cuh and csrc/philox.cuh over whole tensors,
# run by run, as the kernels call them (one run = the 16 elements of a thread).
_DRIVER = r"""
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>
#include "common.cuh"
using namespace fedsrd;
int main() {
  std::string cmd;
  while (std::cin >> cmd) {
    if (cmd == "philox") {  // key counter -> 4 words
      unsigned long long key; unsigned counter; std::cin >> key >> counter;
      PhiloxWords w = philox_counter_words(key, counter);
      std::printf("%u %u %u %u\n", w.lane[0], w.lane[1], w.lane[2], w.lane[3]);
    } else if (cmd == "seeded") {  // key threshold numel -> keep flags
      unsigned long long key; unsigned threshold; long long numel; std::cin >> key >> threshold >> numel;
      std::string flags(numel, '0');
      for (long long first = 0; first < numel; first += kCodecItems) {
        uint32_t bits = philox_run_bits(key, threshold, numel, first);
        for (int j = 0; j < kCodecItems && first + j < numel; ++j) flags[first + j] = '0' + ((bits >> j) & 1);
      }
      std::printf("%s\n", flags.c_str());
    } else if (cmd == "tile") {  // num_tensors tile_first[0..num_tensors] -> owner of every tile
      long long num_tensors; std::cin >> num_tensors;
      std::vector<int64_t> tile_first(num_tensors + 1);
      for (auto& t : tile_first) { long long v; std::cin >> v; t = v; }
      for (int64_t tile = 0; tile < tile_first[num_tensors]; ++tile)
        std::printf("%lld ", (long long)tensor_of_tile(tile_first.data(), num_tensors, tile));
      std::printf("\n");
    } else if (cmd == "bf16") {  // float bits -> bfloat16 bits
      unsigned u; std::cin >> u;
      std::printf("%u\n", float_to_bfloat16(bits_as_float(u)));
    }
    std::fflush(stdout);
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def driver(compiled) -> Path:
    """The host build of _DRIVER (compiled in the same parallel batch as the .cu files)."""
    result = compiled[("driver", "host")]
    assert result.returncode == 0, result.stderr[-4000:]
    return Path(result.args[-1])


def _run(exe: Path, commands: list[str]) -> list[str]:
    result = subprocess.run([str(exe)], input="\n".join(commands) + "\n", capture_output=True, text=True,
                            timeout=60, check=True)
    return result.stdout.splitlines()


def _flags(mask: np.ndarray) -> str:
    return "".join("1" if m else "0" for m in mask)


SIZES = [1, 7, 8, 9, 15, 16, 17, 31, 33, 100, 1023, 4097]


@needs_nvcc
def test_host_philox_words_match_numpy(driver):
    rng = np.random.default_rng(0)
    keys = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, *(int(k) for k in rng.integers(0, 2**63, 5, dtype=np.int64))]
    counters = [0, 1, 5, 2**31, 2**32 - 1, *(int(c) for c in rng.integers(0, 2**32, 5, dtype=np.int64))]
    cases = [(k, c) for k in keys for c in counters]
    lines = _run(driver, [f"philox {k} {c}" for k, c in cases])
    for (key, counter), line in zip(cases, lines, strict=True):
        want = philox4x32_10(counter, 0, 0, 0, key & 0xFFFFFFFF, key >> 32)
        assert [int(x) for x in line.split()] == [int(w) for w in want], (key, counter)


@needs_nvcc
def test_host_seeded_runs_match_seeded_keep_mask(driver):
    rng = np.random.default_rng(1)
    cases = [(int(rng.integers(0, 2**63)), drop, n) for n in SIZES for drop in (0.0, 0.5, 0.8, 0.999)]
    lines = _run(driver, [f"seeded {key} {drop_threshold(drop)} {n}" for key, drop, n in cases])
    for (key, drop, n), line in zip(cases, lines, strict=True):
        assert line == _flags(seeded_keep_mask(n, key, drop).numpy()), (key, drop, n)


@needs_nvcc
def test_host_tile_owner_skips_empty_tensors(driver):
    sizes = [4096, 0, 10, 0, 0, 8193, 1, 0]
    tiles = [-(-n // 4096) for n in sizes]
    tile_first = np.concatenate([[0], np.cumsum(tiles)]).tolist()
    line = _run(driver, [f"tile {len(sizes)} " + " ".join(map(str, tile_first))])[0]
    want = [t for t, count in enumerate(tiles) for _ in range(count)]
    assert [int(x) for x in line.split()] == want


@needs_nvcc
def test_host_bfloat16_rounding_matches_torch(driver):
    values = torch.cat([torch.randn(2000, generator=torch.Generator().manual_seed(3)),
                        torch.tensor([0.0, -0.0, 1.0, 0.95215, 65504.0, 3.4e38, float("inf"), float("-inf"), 1e-40])])
    bits = values.view(torch.int32).numpy().astype(np.uint32)
    lines = _run(driver, [f"bf16 {b}" for b in bits])
    want = values.to(torch.bfloat16).view(torch.int16).numpy().astype(np.uint16)
    assert [int(x) for x in lines] == want.tolist()


# --------------------------------------------------------------------------- the package without the extension


def test_package_runs_without_the_extension():
    import fedsrd_kernels
    from fedsrd_kernels.kernels._backend import cuda_extension_available, resolve_backend

    info = fedsrd_kernels.backend_info()
    assert info["cuda_extension"] is cuda_extension_available()
    assert isinstance(info["cuda_extension_status"], str)
    if torch.version.cuda is None:  # a CPU torch cannot have built or loaded it
        assert cuda_extension_available() is False
        assert info["cuda_extension_status"].startswith("not built")
        assert resolve_backend("cpu") == "torch"


def test_a_broken_extension_warns_once_and_falls_back(monkeypatch):
    """An extension that is there but does not load (stale build, schema drift): one warning, then Triton or torch."""
    import importlib
    import importlib.util

    from fedsrd_kernels.kernels import _backend

    real_find_spec, real_import = importlib.util.find_spec, importlib.import_module

    def find_spec(name, *args):
        return object() if name == _backend.CUDA_EXTENSION else real_find_spec(name, *args)

    def import_module(name, *args):
        if name == _backend.CUDA_EXTENSION:
            raise ImportError("undefined symbol: _ZN3c104cuda20getCurrentCUDAStreamEa")
        return real_import(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib, "import_module", import_module)
    _backend._load_cuda_extension.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="failed to load") as record:
            assert _backend.cuda_extension_available() is False
            assert _backend.cuda_extension_available() is False  # cached: no second warning
            assert _backend.cuda_extension_status().startswith("failed to load: ImportError")
        assert len(record) == 1
        assert _backend.resolve_backend("cpu") == "torch"
    finally:
        monkeypatch.undo()
        _backend._load_cuda_extension.cache_clear()


def test_cuda_ops_fail_cleanly_without_the_extension():
    from fedsrd_kernels.errors import ConfigError
    from fedsrd_kernels.kernels._backend import cuda_extension_available
    from fedsrd_kernels.kernels.download import cuda as cuda_ops

    if cuda_extension_available():
        pytest.skip("the extension is loaded here")
    with pytest.raises(ConfigError, match="not loaded"):
        cuda_ops.dare_compact_cuda(torch.ones(4), [0, 4], [7], 0.5)
    # The schemas are declared whether or not the kernels are.
    assert "fedsrd::seeded_count" in str(torch.ops.fedsrd.seeded_count.default._schema)
    assert not hasattr(torch.ops.fedsrd, "bitmap_compact")  # deleted with its kernels (no production use)
    assert not hasattr(torch.ops.fedsrd, "segmented_topk_threshold")  # deleted: sparsify selects in Triton
