"""Coverage-guided fuzzing of ``wire.decode`` on untrusted bytes (issue 7, item 1).

    python benchmarks/fuzz_decode.py --seconds 60 --stats out.json [--corpus DIR] [--crashes DIR] [-- LIBFUZZER_FLAGS]
    python benchmarks/fuzz_decode.py --replay FILE...     # run the oracle on saved inputs, no fuzzer

Exit status: 0 when the run found no crash, 1 when it found one (inputs saved under --crashes, default
"<stats stem>-crashes" next to the stats file), 2 when the fuzzer could not run. tests/test_fuzz_decode.py
runs it for FEDSRD_FUZZ_SECONDS seconds and imports its oracle and bounds. Its seeds are built with the
tests' payload builders (tests/test_wire.py, tests/helpers.py), so it runs from a checkout.

The property (checked on every input): ``decode(data, max_numel=--max-numel)`` either raises PayloadError
(FormatVersionError included) or returns a SparseUpdate / Broadcast that agrees with its declared entries
(shape, dtype, nnz, finite values, sorted unique in-range int64 indices or, for seeded positions, the
broadcast's SeededMask, which decode does not draw; the declared scale) and that ``encode`` accepts and
round-trips bit-exactly; and decoding stays within memory and CPU bounds derived from
the input's size and its declared elements. Anything else is a crash: the exception propagates to atheris,
which prints it and libFuzzer saves the input.

Process layout. The parent starts the fuzzer in a child process: libFuzzer ends the process with exit()
at -max_total_time and after a crash, and that skips Python's atexit handlers (measured with atheris 3.0.0),
so the child rewrites a small stats file every 0.2 s and before re-raising a finding, and the parent reads
the execution count from libFuzzer's -print_final_stats=1 lines. After a crash the parent starts a fresh
child for the time left (at most --max-crashes times); a child skips findings whose signature (exception
type and innermost package frame, or the failed check) an earlier child already reported, so one run
reports distinct bugs instead of the first one again and again.

Coverage. The child imports numpy, torch, safetensors and zstandard first, uninstrumented, then the whole
``fedsrd_kernels`` package inside ``atheris.instrument_imports`` (wire and what it calls: config, errors,
updates, kernels.download.reference). safetensors (Rust) and zstandard (C) are not instrumented: libFuzzer sees their
effect only through the Python branches that follow them.

Mutator. A custom mutator parses the input as a container (metadata JSON + blobs) and applies one to
three structure-aware edits: shapes (bad dims, more dims, long shapes up to the size budget), nnz, dtype
codes, position kinds, scales, keys, groups, fields, the scalar fields of either kind; swapped, duplicated,
renamed, missing or extra blobs; zstd frames replaced by bombs (up to 2**26 zero bytes in ~2 KB, with and
without a content size), frames with a lying content size, no checksum, two frames, skippable or raw
bytes; decompressed contents edited and recompressed (valid checksum, so the semantic checks run):
duplicate, out-of-range or wrapping (negative) gaps in every width, bitmaps with padding bits or a wrong
popcount, NaN / Inf / subnormal values; bits flipped inside compressed blobs; the metadata text mutated as
bytes; and the serialized payload truncated, bit-flipped, given a lying header length or extended. A
quarter of the time, and whenever the input is not a container, it uses libFuzzer's byte mutation
(``atheris.Mutate``, with a dictionary of the format's tokens). Seeds: valid updates and broadcasts built
with ``sparsify``, ``Aggregator.aggregate`` and ``SparseTensor`` + ``encode`` (bitmap, delta_u8/u16/u32,
dense, seeded and replaced tensors; float32, bfloat16, float16 values; empty and zero-size tensors).

Memory, measured three ways (figures from the 2-core dev box):
* ``tracemalloc`` around each decode call (started and stopped there, so the mutator and the checks run
  untraced; start + stop cost 0.2 us, tracing makes decode ~2.3x slower). It sees Python objects, bytes
  (safetensors' blob copies, zstd output) and numpy buffers, which numpy reports to it: every allocation
  decode sizes from the input except torch's (the values' ``abs``) and Rust's. Bound:
  ``MEM_PER_BYTE * len(data) + MEM_PER_ELEMENT * declared + MEM_FIXED``, ``declared`` being the elements
  the metadata declares, at most --max-numel. Metadata built to inflate when parsed peaks at up to 45x its
  size (nested ``[[[]]]``; ``[{}]`` 33x, nested objects 27x): MEM_PER_BYTE is 64. Valid 2**20-element
  tensors peak at 5 (dense bfloat16) to 28 (delta_u64 gaps) bytes per element: MEM_PER_ELEMENT is 48. The
  seeds peak at 4-16 KiB: MEM_FIXED is 1 MiB.
* The growth of the process's peak RSS over the call (Linux: reset with /proc/self/clear_refs "5", read
  VmHWM; 33 us), which sees torch and Rust too. Bound: ``RSS_PER_BYTE * len(data) + MEM_PER_ELEMENT *
  declared + RSS_FIXED``; tracemalloc's own tables count here (nested-list metadata grew RSS by up to 145x
  its size while traced, 44x untraced): RSS_PER_BYTE is 256; a process's first decode grows it by 6 MB:
  RSS_FIXED is 16 MiB. A zstd bomb (2**26 bytes in 2 KB) breaks both bounds by orders of magnitude.
* libFuzzer's -rss_limit_mb (2048) as the backstop for an allocation too big to return from: it checks the
  peak RSS once a second, so it names whichever input (or mutator call) was running. -malloc_limit_mb does
  nothing here: libFuzzer enforces it only through sanitizer malloc hooks, which atheris' non-sanitizer
  build lacks (a 1.5 GB allocation under -malloc_limit_mb=500 went through).

Time. Each decode may take ``CPU_PER_BYTE * len(data) + CPU_PER_ELEMENT * declared + CPU_FIXED`` seconds of
process CPU time (not wall time, so other work on the cores does not trip it): parsing inflating metadata
costs up to 0.78 us per byte (4e-6 allowed), 2**20 forged delta_u64 positions 33 ns per element (2e-7
allowed); CPU_FIXED is 0.25 s. libFuzzer's -timeout (10 wall seconds) catches true hangs, native code
included.
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import json
import math
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
from pathlib import Path
from typing import NamedTuple

import numpy as np
import safetensors
import safetensors.numpy
import zstandard

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and str(REPO) not in sys.path:  # run as a script: the seeds import tests.* from the checkout
    sys.path.insert(0, str(REPO))

MAX_NUMEL = 2**20  # elements a fuzzed payload may declare: a server passes its model's size
MAX_LEN = 2**20  # bytes (libFuzzer's default is 4096): work quadratic in a shape's length showed past ~0.5 MB
# Bounds per input (measurements in the module docstring): bytes or seconds per payload byte, per declared
# element, and fixed.
MEM_PER_BYTE, MEM_PER_ELEMENT, MEM_FIXED = 64, 48, 2**20
RSS_PER_BYTE, RSS_FIXED = 256, 16 * 2**20
CPU_PER_BYTE, CPU_PER_ELEMENT, CPU_FIXED = 4e-6, 2e-7, 0.25
FLUSH_SECONDS = 0.2
MAX_DECOMPRESS = 2**22  # the mutator edits decompressed blobs up to this size

# The format's names, written out: fedsrd_kernels may be imported only once atheris can instrument it.
VALUE_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
GAP_DTYPES = {"delta_u8": "<u1", "delta_u16": "<u2", "delta_u32": "<u4", "delta_u64": "<u8"}
POSITIONS = ("dense", "seeded", "bitmap", *GAP_DTYPES)
# Values a JSON field should never hold, or holds only at an edge.
NASTY = [None, True, False, 0, -1, 1, 2, 255, 2**16, 2**31 - 1, 2**32, 2**34, 2**34 + 1, 2**53 + 1, 2**63 - 1,
         2**63, 2**64 - 1, 2**64, -(2**63), 0.5, 1.5, -0.0, 1e-45, 5e-324, 3.4028234663852886e38, 1e39, 1e308,
         math.nan, math.inf, -math.inf, "", "0", "x", "\ud800", "\x00", "\u00e9", [], [0], [[]], {}, {"": 0}]
DIMS = [0, 1, 2, 3, 7, 8, 9, 255, 256, 2**16, 2**20, 2**34, 2**34 + 1, -1, 2**63, 1.0, True, "8", None]
SCALES = [1.0, 0.0, -0.0, 2.0, 0.1, 1 / 3, 5e-324, 1e-45, 1.401298464324817e-45, 3.4028234663852886e38,
          3.4028235677973366e38, 1e39, math.nan, math.inf, -math.inf, 1, True, "1.0", None, []]
DTYPE_CODES = ["float32", "bfloat16", "float16", "float64", "int8", "uint8", "bool", "", "Float32", "F32",
               None, 4, [], {}, ["float32"], "\ud800"]
POSITION_CODES = [*POSITIONS, "rle", "", "Bitmap", "delta_u128", "delta_u0", "delta", None, 0, [], {}]
# Bit patterns of non-finite and edge values per dtype (little-endian integers).
SPECIAL_BITS = {
    "float32": [0x7FC00000, 0x7F800000, 0xFF800000, 0x7F800001, 0x80000000, 0x00000001, 0x7F7FFFFF],
    "bfloat16": [0x7FC0, 0x7F80, 0xFF80, 0x7F81, 0x8000, 0x0001, 0x7F7F],
    "float16": [0x7E00, 0x7C00, 0xFC00, 0x7C01, 0x8000, 0x0001, 0x7BFF],
}
DICTIONARY = [t.encode() for t in (
    "fedsrd", "fedsrd-wire", "__metadata__", "update", "broadcast", "tensors", "shape", "nnz", "dtype", "positions",
    "scale", "group", "delta", "replace", "seeded", "moved", "download_drop", "num_samples", "client_id", "base",
    "round", "seed", "method", "format", "version", "key", *VALUE_ITEMSIZE, *POSITIONS, "U8", "F32",
    "data_offsets", "0.values", "0.positions", "1.values", "17179869184", "18446744073709551615", "NaN",
    "Infinity", "\\ud800")] + [b"\x28\xb5\x2f\xfd"]  # the last: zstd's frame magic


# -- bounds ----------------------------------------------------------------------------------------


def metadata_of(data: bytes):
    """The fedsrd metadata as plain JSON, or None; lenient (no validation beyond parsing)."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        return json.loads(header["__metadata__"]["fedsrd"])
    except Exception:
        return None


def _entry_numel(entry, cap: int) -> int:
    """Elements of one entry's shape if it is a list of non-negative ints, else 0; capped (linear time)."""
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        return 0
    if 0 in shape:
        return 0
    numel = 1
    for s in shape:
        numel = min(numel * s, cap + 1)
    return numel


def declared_elements(data: bytes, max_numel: int) -> int:
    """Elements the payload's metadata declares, at most ``max_numel`` (decode rejects more)."""
    meta = metadata_of(data)
    entries = meta.get("tensors") if isinstance(meta, dict) else None
    if not isinstance(entries, list):
        return 0
    total = 0
    for entry in entries:
        total = min(total + _entry_numel(entry, max_numel), max_numel)
    return total


def memory_bound(size: int, declared: int) -> int:
    return MEM_PER_BYTE * size + MEM_PER_ELEMENT * declared + MEM_FIXED


def rss_bound(size: int, declared: int) -> int:
    return RSS_PER_BYTE * size + MEM_PER_ELEMENT * declared + RSS_FIXED


def cpu_bound(size: int, declared: int) -> float:
    return CPU_FIXED + CPU_PER_BYTE * size + CPU_PER_ELEMENT * declared


# -- the oracle ------------------------------------------------------------------------------------


class DecodeFinding(AssertionError):
    """decode broke the property without raising an unexpected exception; ``check`` names what."""

    def __init__(self, check: str, detail: str):
        super().__init__(f"{check}: {detail}")
        self.check = check


def _require(ok: bool, check: str, detail: str) -> None:
    if not ok:
        raise DecodeFinding(check, detail)


class Measured(NamedTuple):
    obj: object  # the decoded SparseUpdate / Broadcast, or None
    rejection: Exception | None  # the PayloadError, or None
    peak: int  # tracemalloc's peak, bytes
    rss: int  # growth of the process's peak RSS during the call, bytes (0 where /proc cannot tell)
    cpu: float  # process CPU seconds


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux clear_refs "5") and return it; 0 where that is not possible."""
    global _RSS_USABLE
    if _RSS_USABLE:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _peak_rss()
        except OSError:
            _RSS_USABLE = False
    return 0


def _peak_rss() -> int:
    if not _RSS_USABLE:
        return 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


_RSS_USABLE = sys.platform.startswith("linux")


def measured_decode(data: bytes, max_numel: int = MAX_NUMEL) -> Measured:
    """decode under tracemalloc, the peak-RSS mark and a CPU clock; exceptions other than PayloadError propagate."""
    from fedsrd_kernels.errors import PayloadError
    from fedsrd_kernels.wire import decode

    rss_before = _reset_peak_rss()
    # The cyclic collector is off while decode runs: a collection triggered by decode's allocations
    # traverses every object the calling process holds, so its cost is the caller's, not decode's
    # (the 100k-dim shape test took 0.38-0.43 s of CPU in one process and 0.43-0.73 s in one with more
    # modules imported, for the same 0.15 s of decode work). Decode's own garbage is freed by refcount.
    collecting = gc.isenabled()
    gc.disable()
    tracemalloc.start()
    start = time.process_time()
    obj = rejection = None
    try:
        obj = decode(data, max_numel=max_numel)
    except PayloadError as exc:
        rejection = exc
    finally:
        cpu = time.process_time() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if collecting:
            gc.enable()
    return Measured(obj, rejection, peak, max(0, _peak_rss() - rss_before), cpu)


def check_bounds(data: bytes, m: Measured, max_numel: int = MAX_NUMEL) -> None:
    # The metadata is parsed only when a bound without declared elements is exceeded.
    size = len(data)
    if m.peak > memory_bound(size, 0) or m.rss > rss_bound(size, 0) or m.cpu > cpu_bound(size, 0):
        declared = declared_elements(data, max_numel)
        what = f"for {size} bytes declaring {declared} elements"
        _require(m.peak <= memory_bound(size, declared), "memory",
                 f"decode allocated {m.peak} bytes, over {memory_bound(size, declared)} {what}")
        _require(m.rss <= rss_bound(size, declared), "rss",
                 f"decode grew the peak RSS by {m.rss} bytes, over {rss_bound(size, declared)} {what}")
        _require(m.cpu <= cpu_bound(size, declared), "time",
                 f"decode took {m.cpu:.3f} s of CPU, over {cpu_bound(size, declared):.3f} s {what}")


def _check_indices(indices, nnz: int, numel: int, where: str) -> None:
    import torch

    _require(isinstance(indices, torch.Tensor) and indices.dtype == torch.int64 and indices.dim() == 1,
             "indices type", f"{where}: indices must be a 1-D int64 tensor")
    _require(indices.numel() == nnz, "indices count", f"{where}: {indices.numel()} indices for nnz {nnz}")
    if nnz:
        _require(int(indices[0]) >= 0 and int(indices[-1]) < numel, "indices range",
                 f"{where}: indices outside [0, {numel})")
        _require(bool((indices[1:] > indices[:-1]).all()), "indices order", f"{where}: indices not increasing")


def check_decoded(obj, data: bytes, max_numel: int = MAX_NUMEL) -> None:
    """A decoded object agrees with the metadata it came from, and encode round-trips it bit-exactly."""
    import torch

    from fedsrd_kernels.config import VALUE_DTYPES
    from fedsrd_kernels.updates import Broadcast, SeededMask, SparseTensor, SparseUpdate
    from fedsrd_kernels.wire import decode, encode

    meta = metadata_of(data)
    _require(isinstance(meta, dict) and isinstance(meta.get("tensors"), list), "metadata",
             "decode accepted a payload whose metadata does not parse")
    kind = SparseUpdate if meta["kind"] == "update" else Broadcast
    _require(type(obj) is kind, "kind", f"{meta['kind']!r} decoded to {type(obj).__name__}")
    replace = getattr(obj, "replace", {})
    _require(len(obj.deltas) + len(replace) == len(meta["tensors"]), "entries",
             f"{len(meta['tensors'])} entries decoded to {len(obj.deltas)} deltas and {len(replace)} replacements")
    total = 0
    for entry in meta["tensors"]:
        where, shape, nnz = f"tensor {entry['key']!r}", tuple(entry["shape"]), entry["nnz"]
        numel = math.prod(shape)
        total += numel
        dtype = VALUE_DTYPES[entry["dtype"]]
        tensor = (replace if entry["group"] == "replace" else obj.deltas).get(entry["key"])
        if entry["group"] == "replace":
            _require(isinstance(tensor, torch.Tensor) and tuple(tensor.shape) == shape and numel == nnz,
                     "replacement", f"{where}: not a tensor of the declared shape {shape}")
            values = tensor.reshape(-1)
        else:
            _require(isinstance(tensor, SparseTensor) and tensor.shape == shape, "shape",
                     f"{where}: not a SparseTensor of the declared shape {shape}")
            _require(tensor.scale == entry["scale"] and math.isfinite(tensor.scale), "scale",
                     f"{where}: scale {tensor.scale} for declared {entry['scale']}")
            values = tensor.values
            if entry["positions"] == "dense":
                _require(tensor.is_dense and nnz == numel, "dense", f"{where}: dense but has positions")
            elif entry["positions"] == "seeded":  # decode draws no mask: its count is apply's to check
                want = SeededMask(meta["seed"], meta["round"], entry["key"], float(meta["download_drop"]))
                _require(tensor.mask == want and tensor._drawn is None, "seeded",
                         f"{where}: mask {tensor.mask} for the broadcast's {want}, or drawn by decode")
            else:
                _require(not tensor.is_seeded, "explicit", f"{where}: explicit positions decoded as seeded")
                _check_indices(tensor.indices, nnz, numel, where)
            _require((entry["positions"] == "seeded") == (entry["key"] in getattr(obj, "seeded", ())), "seeded",
                     f"{where}: seeded positions and Broadcast.seeded disagree")
        _require(values.dtype == dtype and values.dim() == 1 and values.numel() == nnz, "values",
                 f"{where}: {values.numel()} values of {values.dtype}, declared {nnz} of {dtype}")
        _require(bool(torch.isfinite(values).all()), "finite", f"{where}: values hold NaN or Inf")
    _require(total <= max_numel, "max_numel", f"{total} elements decoded under max_numel {max_numel}")
    try:
        again = decode(encode(obj), max_numel=max_numel)
    except Exception as exc:
        raise DecodeFinding("round trip", f"the decoded object does not re-encode: {exc!r}") from exc
    _require(_fingerprint(again) == _fingerprint(obj), "round trip", "decode(encode(obj)) differs from obj")


def _fingerprint(obj) -> tuple:
    """Everything an object carries, as comparable bytes (bit-exact)."""
    import torch

    def tensor_bytes(t):
        if t is None:
            return None
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return str(t.dtype), tuple(t.shape), raw

    def plain(value):
        if isinstance(value, (frozenset, set)):
            return tuple(sorted(value))
        return tuple(sorted(value.items())) if isinstance(value, dict) else repr(value)

    scalars = tuple(sorted((k, plain(v)) for k, v in vars(obj).items() if k not in ("deltas", "replace")))
    deltas = tuple((k, v.shape, struct.pack("<d", v.scale), tensor_bytes(v.values),
                    repr(v.mask) if v.is_seeded else tensor_bytes(v.indices))  # a seeded mask is not drawn
                   for k, v in obj.deltas.items())
    replace = tuple((k, tensor_bytes(v)) for k, v in getattr(obj, "replace", {}).items())
    return scalars, deltas, replace


def signature(exc: BaseException) -> str:
    """A finding's identity: the check it failed, or its type and innermost frame inside the package."""
    if isinstance(exc, DecodeFinding):
        return f"DecodeFinding:{exc.check}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "fedsrd_kernels" in f.filename]
    where = f"{Path(frames[-1].filename).name}:{frames[-1].name}:{frames[-1].lineno}" if frames else "outside"
    return f"{type(exc).__name__}:{where}"


_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_NUMBER = re.compile(r"(?<![\w.-])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?!\w)")  # not the 8 of UTF-8
_BRACKETED = re.compile(r"\[[^\[\]]*\]|\{[^{}]*\}|\([^()]*\)")
_CONSTANT = re.compile(r"\b(?:None|True|False|nan|inf)\b")


def rejection_class(exc: BaseException) -> str:
    """A coarse class of a rejection: exception type and the message's first words, values elided.

    "tensor 'a' positions: 3 positions for nnz 4" -> "PayloadError: tensor positions: _ positions for nnz _".
    """
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = _CONSTANT.sub("_", _NUMBER.sub("_", _QUOTED.sub("_", text)))
    while (shorter := _BRACKETED.sub("_", text)) != text:
        text = shorter
    match = re.match(r"tensor _( values| positions)?:? ?(.*)", text)
    prefix, rest = ("tensor" + (match.group(1) or "") + ": ", match.group(2)) if match else ("", text)
    return f"{type(exc).__name__}: {prefix}{' '.join(rest.split()[:5])}".rstrip(",: ")


def run_oracle(data: bytes, max_numel: int = MAX_NUMEL):
    """The whole property for one input: its Measured, or the finding raised."""
    m = measured_decode(data, max_numel)
    check_bounds(data, m, max_numel)
    if m.obj is not None:
        check_decoded(m.obj, data, max_numel)
    return m


# -- payload surgery (the mutator) ------------------------------------------------------------------


class Container:
    """An editable payload: the fedsrd metadata (any JSON value) and the blobs, rebuilt by ``serialize``."""

    def __init__(self, meta, blobs: dict[str, bytes], size_budget: int):
        self.meta, self.blobs, self.size_budget = meta, blobs, size_budget
        self.raw_metadata: dict[str, str] | None = None
        self.blob_dtypes: dict[str, str] = {}

    @classmethod
    def parse(cls, data: bytes, size_budget: int) -> Container | None:
        meta = metadata_of(data)
        if meta is None:
            return None
        from fedsrd_kernels.wire import unseal

        try:
            blobs = {name: bytes(view["data"]) for name, view in safetensors.deserialize(unseal(data))}
        except Exception:
            return None
        return cls(meta, blobs, size_budget)

    def entries(self) -> list[dict]:
        tensors = self.meta.get("tensors") if isinstance(self.meta, dict) else None
        return [e for e in tensors if isinstance(e, dict)] if isinstance(tensors, list) else []

    def serialize(self) -> bytes:
        from fedsrd_kernels.wire import seal
        from tests.test_wire import build

        if not self.blob_dtypes:
            return build(self.meta, self.blobs, self.raw_metadata)
        arrays = {}
        for name, blob in self.blobs.items():
            dtype = np.dtype(self.blob_dtypes.get(name, "u1"))
            arrays[name] = np.frombuffer(blob[: len(blob) - len(blob) % dtype.itemsize], dtype=dtype)
        return seal(safetensors.numpy.save(arrays, metadata=self.raw_metadata or {"fedsrd": json.dumps(self.meta)}))


def _numel(entry: dict) -> int:
    return _entry_numel(entry, 2**40)


def _nnz(entry: dict) -> int:
    nnz = entry.get("nnz")
    return nnz if isinstance(nnz, int) and 0 <= nnz <= 2**40 else 0


def _expected_size(entry: dict, part: str) -> int:
    """Decompressed bytes decode expects for an entry's blob (lenient about bad fields)."""
    if part == "values":
        return _nnz(entry) * VALUE_ITEMSIZE.get(entry.get("dtype"), 4)
    if entry.get("positions") == "bitmap":
        return (_numel(entry) + 7) // 8
    return _nnz(entry) * np.dtype(GAP_DTYPES.get(entry.get("positions"), "<u4")).itemsize


def compress(raw: bytes, *, content_size: bool = True, checksum: bool = True, level: int = 1) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=content_size,
                                    write_checksum=checksum).compress(raw)


@functools.lru_cache(maxsize=32)
def zero_frame(size: int, content_size: bool = True) -> bytes:
    """``size`` zero bytes as one frame: 2**26 of them take ~2 KB, the shape of a zstd bomb."""
    return compress(bytes(size), content_size=content_size)


def patch_content_size(frame: bytes, declared: int) -> bytes:
    """The frame with its Frame_Content_Size field rewritten (truncated to the field's width), if it has one."""
    if len(frame) < 6 or frame[:4] != b"\x28\xb5\x2f\xfd":
        return frame
    descriptor = frame[4]
    fcs_flag, single, dict_flag = descriptor >> 6, descriptor >> 5 & 1, descriptor & 3
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if width == 0:
        return frame
    start = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    value = declared - 256 if width == 2 else declared
    value %= 2 ** (8 * width)
    return frame[:start] + value.to_bytes(width, "little") + frame[start + width :]


def shuffled(array: np.ndarray) -> bytes:
    """Byte planes, as the encoder writes values and gaps."""
    return array.view(np.uint8).reshape(-1, array.itemsize).T.tobytes()


def _pick_entry(rng: random.Random, c: Container):
    """(index in the tensors list, which names the entry's blobs; the entry), or (None, None)."""
    tensors = c.meta.get("tensors") if isinstance(c.meta, dict) else None
    indices = [i for i, e in enumerate(tensors) if isinstance(e, dict)] if isinstance(tensors, list) else []
    if not indices:
        return None, None
    i = rng.choice(indices)
    return i, tensors[i]


def mutate_shape(rng: random.Random, c: Container) -> None:
    _, entry = _pick_entry(rng, c)
    if entry is None:
        return
    shape = entry.get("shape")
    shape = list(shape) if isinstance(shape, list) else [1]
    choice = rng.randrange(7)
    if choice == 0 and shape:
        shape[rng.randrange(len(shape))] = rng.choice(DIMS)
    elif choice == 1:
        shape.insert(rng.randint(0, len(shape)), rng.choice(DIMS))
    elif choice == 2 and shape:
        del shape[rng.randrange(len(shape))]
    elif choice == 3:
        shape = [_numel(entry)] if rng.random() < 0.5 else shape[::-1]  # the same elements, another layout
    elif choice == 4:
        # Long shapes: the elements stay few (dims of 1) or overflow (dims of 2**34); the longest fill
        # what is left of the size budget, to expose work that grows faster than the input.
        dim = rng.choice([1, 2**34, 2, 0])
        room = max(2, (c.size_budget - 4096) // (len(str(dim)) + 3))
        count = rng.choice([rng.randint(2, 80), rng.randint(80, 1000), rng.randint(room // 2, room)])
        shape = [dim] * min(count, room)
    elif choice == 5:
        shape = rng.choice(NASTY)
    else:
        shape = [rng.choice(DIMS) for _ in range(rng.randint(0, 4))]
    entry["shape"] = shape


def mutate_nnz(rng: random.Random, c: Container) -> None:
    _, entry = _pick_entry(rng, c)
    if entry is not None:
        nnz, numel = _nnz(entry), _numel(entry)
        entry["nnz"] = rng.choice([nnz - 1, nnz + 1, 0, numel, numel - 1, numel + 1, 2 * nnz, rng.choice(NASTY)])


def mutate_code(rng: random.Random, c: Container) -> None:
    """dtype, position kind, scale, group or key of one entry."""
    _, entry = _pick_entry(rng, c)
    if entry is None:
        return
    field = rng.choice(["dtype", "dtype", "positions", "positions", "scale", "group", "key"])
    if field == "dtype":
        entry["dtype"] = rng.choice(DTYPE_CODES)
    elif field == "positions":
        entry["positions"] = rng.choice(POSITION_CODES)
    elif field == "scale":
        entry["scale"] = rng.choice(SCALES)
    elif field == "group":
        entry["group"] = rng.choice(["delta", "replace", "", None, []])
        if entry["group"] == "replace" and rng.random() < 0.7:  # otherwise every replacement fails early
            entry["positions"], entry["scale"] = "dense", 1.0
    else:
        others = [e.get("key") for e in c.entries() if e is not entry]
        old = entry.get("key")
        entry["key"] = rng.choice([*others, "", "\ud800", "k" * 300, "a.lora_B.weight", *NASTY[:6]])
        seeded = c.meta.get("seeded")
        if isinstance(seeded, list) and old in seeded and rng.random() < 0.8:
            seeded[seeded.index(old)] = entry["key"]  # keep Broadcast.seeded in step, to go further


def mutate_fields(rng: random.Random, c: Container) -> None:
    """Scalar fields of the update or broadcast; extra or missing fields."""
    if not isinstance(c.meta, dict):
        c.meta = {"format": "fedsrd-wire", "version": 2, "kind": "update", "round": None, "num_samples": None,
                  "client_id": None, "base": None, "tensors": []}
        return
    choice = rng.randrange(11)
    if choice == 10:  # metadata that is JSON but not an object
        c.meta = rng.choice(NASTY)
        return
    target = c.meta if choice < 6 or not c.entries() else rng.choice(c.entries())
    if choice in (0, 6) and target:
        del target[rng.choice(list(target))]
    elif choice in (1, 7):
        target[rng.choice(["extra", "Shape", "__proto__", "nnz ", ""])] = rng.choice(NASTY)
    elif choice == 2:
        value = c.meta.get("seed")
        c.meta["seed"] = rng.choice([value + 1 if isinstance(value, int) else 0, 2**64 - 1, 2**64, -1, 1.5])
    elif choice == 3:
        c.meta["download_drop"] = rng.choice([0, 0.0, 0.5, 0.8, 0.99, 1 - 2**-53, 1.0, -0.0, 5e-324, -1e-300,
                                              math.nan, "0.8", True, None])
    elif choice == 4:
        name = rng.choice(["kind", "format", "version", "round", "num_samples", "client_id", "base", "method",
                           "moved", "seeded", "tensors"])
        c.meta[name] = rng.choice([*NASTY, "update", "broadcast", "fedsrd-wire", 2, 2.0, 3, "0" * 64,
                                   "0123456789abcdef" * 2, {"a": "AB"}, {"a": "C"}, ["x", "x"]])
    elif choice == 5:
        seeded = c.meta.get("seeded")
        keys = [e.get("key") for e in c.entries()]
        c.meta["seeded"] = rng.choice([[], keys, keys[:1], [*keys, *keys], seeded if seeded else ["x"]])
    else:
        target[rng.choice(list(target) or ["nnz"])] = rng.choice(NASTY)


def mutate_entries(rng: random.Random, c: Container) -> None:
    """Reorder, duplicate or drop entries, with or without their blobs."""
    tensors = c.meta.get("tensors") if isinstance(c.meta, dict) else None
    if not isinstance(tensors, list) or not tensors:
        return
    i = rng.randrange(len(tensors))
    choice = rng.randrange(4)
    if choice == 0:  # a copy at the end, blobs copied: a duplicate key
        tensors.append(json.loads(json.dumps(tensors[i])))
        for part in ("values", "positions"):
            if f"{i}.{part}" in c.blobs:
                c.blobs[f"{len(tensors) - 1}.{part}"] = c.blobs[f"{i}.{part}"]
    elif choice == 1:  # drop one, renumbering the blobs after it
        del tensors[i]
        renamed = {}
        for name, blob in c.blobs.items():
            index, _, part = name.partition(".")
            if index.isdigit() and int(index) != i:
                renamed[f"{int(index) - (int(index) > i)}.{part}"] = blob
        c.blobs = renamed
    elif choice == 2:  # swap two entries but not their blobs
        j = rng.randrange(len(tensors))
        tensors[i], tensors[j] = tensors[j], tensors[i]
    else:  # many entries: the loop over entries and the blob-name check at scale
        count = rng.randint(2, max(2, min(2000, c.size_budget // (len(json.dumps(tensors[i])) + 1))))
        tensors.extend(json.loads(json.dumps(tensors[i])) for _ in range(count))


def mutate_blob_names(rng: random.Random, c: Container) -> None:
    if not c.blobs:
        return
    names = list(c.blobs)
    name = rng.choice(names)
    choice = rng.randrange(6)
    if choice == 0 and len(names) > 1:
        other = rng.choice(names)
        c.blobs[name], c.blobs[other] = c.blobs[other], c.blobs[name]
    elif choice == 1:
        c.blobs[rng.choice(["0.values", "0.positions", "1.values", "9.values", "0.value", "x", ""])] = c.blobs[name]
    elif choice == 2:
        del c.blobs[name]
    elif choice == 3:
        c.blobs[rng.choice([name.replace("values", "positions"), name.replace("positions", "values"),
                            f"{len(c.entries())}.values", "-1.values", "00.values"])] = c.blobs.pop(name)
    elif choice == 4:
        c.blob_dtypes[name] = rng.choice(["<f4", "<u2", "<i8", "|b1", "<f2"])
    else:
        c.blobs[name] = b""


def _frame_target(rng: random.Random, c: Container):
    """(entry, blob name, expected decompressed size) of a random blob."""
    i, entry = _pick_entry(rng, c)
    if entry is None:
        return None, None, 0
    part = "positions" if f"{i}.positions" in c.blobs and rng.random() < 0.4 else "values"
    return entry, f"{i}.{part}", _expected_size(entry, part)


def mutate_frame(rng: random.Random, c: Container) -> None:
    """Replace a blob by a malformed or hostile zstd frame."""
    entry, name, expected = _frame_target(rng, c)
    if entry is None:
        return
    # What we compress stays small: bytes(expected) for a declared 2**34-element tensor would be 64 GiB (a run
    # hit -rss_limit_mb inside the mutator that way). Only frame headers claim the declared sizes.
    size = min(expected, MAX_DECOMPRESS)
    big = rng.choice([size + 1, 2**17 + 3, 2**20, 2**24, 2**26])
    choice = rng.randrange(11)
    if choice == 0:
        frame = zero_frame(big)  # a bomb that says how big it is
    elif choice == 1:
        frame = zero_frame(big, content_size=False)  # a bomb that does not
    elif choice == 2:
        frame = patch_content_size(zero_frame(big), expected)  # a bomb that lies about its size
    elif choice == 3:
        frame = patch_content_size(c.blobs.get(name, b""), rng.choice([expected + 1, expected - 1, 0, 2**40]))
    elif choice == 4:
        frame = compress(bytes(size), checksum=False)
    elif choice == 5:
        frame = compress(bytes(size)) * 2
    elif choice == 6:
        frame = c.blobs.get(name, b"") + bytes(rng.randint(1, 8))
    elif choice == 7:
        blob = c.blobs.get(name, b"")
        frame = blob[: rng.randrange(len(blob))] if blob else b""
    elif choice == 8:  # a skippable frame, alone or in front of the real one
        skip = struct.pack("<II", 0x184D2A50 + rng.randrange(16), 4) + b"skip"
        frame = skip + (c.blobs.get(name, b"") if rng.random() < 0.5 else b"")
    elif choice == 9:
        frame = bytes(size)
    else:
        frame = compress(bytes(size), content_size=False)
    c.blobs[name] = frame


def mutate_bits(rng: random.Random, c: Container) -> None:
    """Flip bits inside a compressed blob: zstd's checksum must catch it."""
    if not c.blobs:
        return
    name = rng.choice(list(c.blobs))
    blob = bytearray(c.blobs[name])
    for _ in range(rng.randint(1, 3)):
        if blob:
            blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
    c.blobs[name] = bytes(blob)


def _decompressed(blob: bytes) -> bytes | None:
    try:
        return zstandard.ZstdDecompressor().decompress(blob, max_output_size=MAX_DECOMPRESS)
    except zstandard.ZstdError:
        return None


def mutate_contents(rng: random.Random, c: Container) -> None:
    """Edit a blob's decompressed bytes and recompress them validly, so decode's semantic checks run."""
    import atheris

    entry, name, expected = _frame_target(rng, c)
    if entry is None:
        return
    raw = _decompressed(c.blobs.get(name, b""))
    raw = bytes(expected if expected <= MAX_DECOMPRESS else 0) if raw is None else raw
    choice = rng.randrange(5)
    if choice == 0:
        raw = atheris.Mutate(raw, len(raw) + 16)
    elif choice == 1:
        raw = raw[: max(0, len(raw) - rng.randint(1, 8))]
    elif choice == 2:
        raw += bytes(rng.randint(1, 8))
    elif choice == 3:
        raw = b"\xff" * len(raw)
    elif name.endswith("values") and entry.get("dtype") in SPECIAL_BITS and raw:
        itemsize = VALUE_ITEMSIZE[entry["dtype"]]
        values = np.frombuffer(raw, np.uint8).reshape(itemsize, -1).T.copy().view(f"<u{itemsize}").reshape(-1)
        values[rng.randrange(values.size)] = rng.choice(SPECIAL_BITS[entry["dtype"]])
        raw = shuffled(values)
    c.blobs[name] = compress(raw)


def mutate_positions(rng: random.Random, c: Container) -> None:
    """Explicit positions with one planted defect (or none), consistent nnz and a fitting values blob."""
    i, entry = _pick_entry(rng, c)
    if entry is None:
        return
    numel = _numel(entry)
    if numel == 0 or numel > 2**24:
        numel = rng.choice([1, 7, 8, 9, 480, 2**16 + 1])
        entry["shape"] = [numel]
    k = rng.randint(0, min(numel, 64))
    indices = sorted(rng.sample(range(numel), k))
    defect = rng.choice(["none", "duplicate", "out of range", "negative", "wrap", "unsorted", "bitmap padding",
                         "bitmap count"])
    if defect.startswith("bitmap"):
        bits = np.zeros((numel + 7) // 8 * 8, dtype=bool)
        bits[indices] = True
        if defect == "bitmap padding" and numel % 8:
            bits[rng.randrange(numel, bits.size)] = True
        nnz = k + (rng.choice([-1, 1]) if defect == "bitmap count" else 0)
        entry["positions"], positions = "bitmap", np.packbits(bits).tobytes()
    else:
        gaps = [b - a for a, b in zip([0, *indices], indices)]
        if defect == "duplicate" and k:
            gaps.insert(rng.randint(1, k), 0)
        elif defect == "out of range":
            gaps.append(numel - (indices[-1] if indices else 0) + rng.choice([0, 1, 2**20]))
        elif defect == "negative":  # a gap of 2**64 - d is -d in int64
            gaps.insert(0 if rng.random() < 0.5 else len(gaps), 2**64 - rng.randint(1, 4))
        elif defect == "wrap":
            gaps = [1] + [2**62] * rng.randint(2, 5)
        elif defect == "unsorted" and k:
            gaps.append(2**64 - 1)  # -1 as int64: one step back
        gaps = np.array(gaps, dtype=np.uint64)
        width = next(w for w in ("<u1", "<u2", "<u4", "<u8")
                     if gaps.size == 0 or int(gaps.max()) <= np.iinfo(w).max)
        width = rng.choice([width, "<u8"])
        entry["positions"] = {"<u1": "delta_u8", "<u2": "delta_u16", "<u4": "delta_u32", "<u8": "delta_u64"}[width]
        nnz, positions = int(gaps.size), shuffled(gaps.astype(width))
    nnz = max(nnz, 0)
    entry["nnz"], entry["group"] = nnz, "delta"
    dtype = entry.get("dtype") if entry.get("dtype") in VALUE_ITEMSIZE else "float32"
    entry["dtype"] = dtype
    if not isinstance(entry.get("scale"), float):
        entry["scale"] = 1.0
    values = np.frombuffer(bytes(nnz * VALUE_ITEMSIZE[dtype]), np.uint8)
    c.blobs[f"{i}.positions"] = compress(positions)
    c.blobs[f"{i}.values"] = compress(values.tobytes())
    seeded = c.meta.get("seeded")
    if isinstance(seeded, list) and entry.get("key") in seeded:
        seeded.remove(entry["key"])


def mutate_metadata_text(rng: random.Random, c: Container) -> None:
    """libFuzzer's byte mutation on the metadata JSON text itself."""
    import atheris

    text = json.dumps(c.meta).encode()
    mutated = atheris.Mutate(text, len(text) + 64).decode("utf-8", "replace")
    c.raw_metadata = rng.choice([{"fedsrd": mutated}, {"fedsrd": mutated, "extra": "x"}, {"other": mutated}])


STRUCTURE_OPS = [
    (mutate_shape, 3), (mutate_nnz, 2), (mutate_code, 4), (mutate_fields, 3), (mutate_entries, 1),
    (mutate_blob_names, 2), (mutate_frame, 3), (mutate_bits, 2), (mutate_contents, 3), (mutate_positions, 3),
    (mutate_metadata_text, 1),
]


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """Whole-payload edits: truncation, flipped bits, a lying header length, trailing bytes."""
    choice = rng.randrange(4)
    if choice == 0:
        return data[: rng.randrange(len(data) + 1)]
    if choice == 1:
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            if out:
                out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if choice == 2 and len(data) >= 8:
        size = int.from_bytes(data[:8], "little")
        lie = rng.choice([size + 1, size - 1, size + 8, 0, 2**63, 2**64 - 1, len(data), 100_000_001])
        return (lie % 2**64).to_bytes(8, "little") + data[8:]
    return data + bytes(rng.randint(1, 64))


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


class Mutator:
    """libFuzzer's custom mutator and crossover: structure-aware edits mixed with byte mutation.

    Structured edits re-seal the payload (a valid tag over edited bytes), so they reach the
    checks behind the tag. Raw byte edits (libFuzzer's own, truncation, flips, splices) do
    not: ``raw`` remembers their outputs, and an input among them that decodes is a payload
    that changed on the way and still decoded to an object, which must never happen.
    """

    RAW_MEMORY = 200_000  # digests kept (8 bytes each); older ones are forgotten

    def __init__(self, seeds: list[bytes]):
        self.seeds = seeds
        self.raw: set[bytes] = set()

    def _raw(self, data: bytes, out: bytes) -> bytes:
        if out != data:
            if len(self.raw) >= self.RAW_MEMORY:
                self.raw.clear()
            self.raw.add(_digest(out))
        return out

    def mutate(self, data: bytes, max_size: int, seed: int) -> bytes:
        import atheris

        rng = random.Random(seed)
        if rng.random() < 0.25:
            return self._raw(data, atheris.Mutate(data, max_size))
        c = Container.parse(data, max_size)
        if c is None:
            if rng.random() < 0.5 or not self.seeds:
                return self._raw(data, atheris.Mutate(data, max_size))
            c = Container.parse(rng.choice(self.seeds), max_size)
        ops, weights = zip(*STRUCTURE_OPS)
        try:
            for op in rng.choices(ops, weights, k=rng.choice([1, 1, 1, 2, 2, 3])):
                op(rng, c)
            out = c.serialize()
        except Exception:  # an edit that does not apply to this input: byte mutation instead
            return self._raw(data, atheris.Mutate(data, max_size))
        if rng.random() < 0.1:
            out = self._raw(out, mutate_bytes(rng, out))
        return out if len(out) <= max_size else self._raw(data, atheris.Mutate(data, max_size))

    def crossover(self, data1: bytes, data2: bytes, max_size: int, seed: int) -> bytes:
        """One payload's blob or entry moved into another; a byte splice when either does not parse."""
        rng = random.Random(seed)
        first, second = Container.parse(data1, max_size), Container.parse(data2, max_size)
        if first is not None and second is not None and first.blobs and second.blobs:
            try:
                name = rng.choice(list(first.blobs))
                first.blobs[name] = second.blobs[rng.choice(list(second.blobs))]
                i, _ = _pick_entry(rng, first)
                if rng.random() < 0.5 and i is not None and second.entries():
                    first.meta["tensors"][i] = rng.choice(second.entries())
                out = first.serialize()
            except Exception:
                out = b""
            if 0 < len(out) <= max_size:
                return out
        cut1, cut2 = rng.randint(0, len(data1)), rng.randint(0, len(data2))
        spliced = (data1[:cut1] + data2[cut2:])[:max_size]
        return spliced if spliced in (data1, data2) else self._raw(b"", spliced)


# -- seeds -------------------------------------------------------------------------------------------


def seed_payloads() -> dict[str, bytes]:
    """Valid payloads of every position encoding and value dtype, built by the package itself."""
    import torch

    from fedsrd_kernels.client import sparsify
    from fedsrd_kernels.config import SparsifyConfig
    from fedsrd_kernels.server import Aggregator
    from fedsrd_kernels.updates import Broadcast, SparseTensor, SparseUpdate
    from fedsrd_kernels.wire import encode
    from tests.helpers import lora_state, perturbed
    from tests.test_wire import make_sparse, make_values, sample_broadcast, sample_update, seeded_delta

    gen = torch.Generator().manual_seed(7)
    global_state = lora_state([(24, 16), (10, 12)], 4, gen=gen)
    local = [perturbed(global_state, 0.01, gen=gen) for _ in range(2)]
    seeds = {"sample-update": encode(sample_update()), "sample-broadcast": encode(sample_broadcast())}
    for dtype in ("float32", "bfloat16", "float16"):
        for selection in ("importance", "random", "dense"):
            config = SparsifyConfig(selection=selection, value_dtype=dtype, seed=3)
            seeds[f"sparsify-{selection}-{dtype}"] = encode(
                sparsify(local[0], global_state, config, num_samples=5, round=2, client_id="c0"))
    for method in ("fedsrd", "flexlora", "fedavg"):
        agg = Aggregator(method=method, seed=5)
        updates = [sparsify(s, global_state, agg.client_config, round=1) for s in local]
        seeds[f"aggregate-{method}"] = encode(agg.aggregate(global_state, updates, round=1))
    wide = torch.tensor([3, 70_000, 2**17 - 1])  # gaps over 2**16: delta_u32
    seeds["delta-u32"] = encode(SparseUpdate({"w": SparseTensor((2**17,), make_values(3, torch.float16, 1), wide)}))
    seeds["delta-u16"] = encode(SparseUpdate({"w": make_sparse((256, 512), 0.002, torch.bfloat16, 0.5, 2)}))
    seeds["edges"] = encode(SparseUpdate({
        "empty": make_sparse((0, 5), 0.1, torch.float32, 1.0, 1), "scalar": make_sparse((), "dense", torch.float16,
                                                                                        1.0, 2),
        "none kept": make_sparse((9, 7), 0.0, torch.float32, 1.0, 3), "all kept": make_sparse((9, 7), 1.0,
                                                                                              torch.bfloat16, 1.0, 4),
    }))
    seeds["empty-update"] = encode(SparseUpdate({}))
    key = "p.lora_A.weight"
    seeds["broadcast-drop0"] = encode(Broadcast(
        0, "fedsrd", 2**64 - 1, 0.0, {key: seeded_delta((3, 5), seed=2**64 - 1, round=0, key=key, drop=0.0,
                                                         dtype=torch.float16)},
        {"r": make_values(6, torch.bfloat16, 9).reshape(2, 3)}, {"p": "AB"}, frozenset({key})))
    return seeds


# -- child: the fuzzer ---------------------------------------------------------------------------------


class ChildStats:
    def __init__(self, path: Path, known: set[str]):
        self.path, self.known = path, known
        self.execs = self.ok = self.repeats = self.peak_max = self.rss_max = self.raw_decodes = 0
        self.cpu_max = self.target_seconds = self.mutator_seconds = 0.0
        self.rejections: dict[str, int] = {}
        self.exceptions: dict[str, int] = {}
        self.crash: dict | None = None
        self.next_flush = 0.0

    def flush(self) -> None:
        state = {k: v for k, v in vars(self).items() if k not in ("path", "known", "next_flush")}
        state["rss_usable"] = _RSS_USABLE
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path)
        self.next_flush = time.monotonic() + FLUSH_SECONDS


def child_main(args: argparse.Namespace, libfuzzer_args: list[str]) -> None:
    import atheris
    import torch  # noqa: F401  (heavy and not ours: imported before the hook, so left uninstrumented)

    with atheris.instrument_imports(include=["fedsrd_kernels"]):
        import fedsrd_kernels  # noqa: F401
        import fedsrd_kernels.kernels.download.reference  # noqa: F401  (imported lazily by wire: instrument it now)
        import fedsrd_kernels.wire  # noqa: F401
    known = set(json.loads(Path(args.known).read_text())) if args.known else set()
    stats = ChildStats(Path(args.child_stats), known)
    seeds = [p.read_bytes() for p in sorted(Path(args.seeds).iterdir())]
    mutator = Mutator(seeds)
    max_numel = args.max_numel

    def timed(function):
        def wrapper(*args):
            start = time.perf_counter()
            try:
                return function(*args)
            finally:
                stats.mutator_seconds += time.perf_counter() - start
        return wrapper

    def test_one_input(data: bytes) -> None:
        stats.execs += 1
        start = time.perf_counter()
        try:
            m = run_oracle(data, max_numel)
        except Exception as exc:
            sig = signature(exc)
            if sig in stats.known:
                stats.repeats += 1
                return
            stats.crash = {"signature": sig, "type": type(exc).__name__, "message": str(exc)[:500]}
            stats.flush()
            raise
        if m.rejection is None:
            stats.ok += 1
            if _digest(data) in mutator.raw:  # bytes changed by a raw edit decoded: the tag let them through
                stats.raw_decodes += 1
        else:
            cls, name = rejection_class(m.rejection), type(m.rejection).__name__
            stats.rejections[cls] = stats.rejections.get(cls, 0) + 1
            stats.exceptions[name] = stats.exceptions.get(name, 0) + 1
        stats.peak_max, stats.rss_max = max(stats.peak_max, m.peak), max(stats.rss_max, m.rss)
        stats.cpu_max = max(stats.cpu_max, m.cpu)
        stats.target_seconds += time.perf_counter() - start
        if time.monotonic() >= stats.next_flush:
            stats.flush()

    stats.flush()
    atheris.Setup([sys.argv[0], *libfuzzer_args], test_one_input, custom_mutator=timed(mutator.mutate),
                  custom_crossover=timed(mutator.crossover))
    atheris.Fuzz()


# -- parent: runs children, collects stats ------------------------------------------------------------


def _dict_escape(token: bytes) -> str:
    """libFuzzer's dictionary syntax: printable ASCII as is, but for quote and backslash; \\xNN otherwise."""
    return "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in token)


def _final_stats(log: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^stat::(\w+):\s+(\d+)", log, re.M)}


def _artifacts(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.split("-")[0] in ("crash", "timeout", "oom", "leak")}


def parent_main(args: argparse.Namespace, extra: list[str]) -> int:
    stats_path = Path(args.stats)
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    crashes = Path(args.crashes) if args.crashes else stats_path.with_name(stats_path.stem + "-crashes")
    crashes.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fuzz-decode-"))
    corpus = Path(args.corpus) if args.corpus else work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    seeds_dir = work / "seeds"
    seeds_dir.mkdir()
    for name, payload in seed_payloads().items():
        (seeds_dir / f"seed-{name}").write_bytes(payload)
    (work / "tokens.dict").write_text("".join(f'"{_dict_escape(t)}"\n' for t in DICTIONARY))
    log_path = stats_path.with_suffix(".log")

    start = time.monotonic()
    deadline = start + args.seconds
    known: list[str] = []
    runs, findings = [], []
    totals = {"ok": 0, "repeats": 0, "raw_decodes": 0, "peak_max": 0, "rss_max": 0, "cpu_max": 0.0,
              "target_seconds": 0.0, "mutator_seconds": 0.0}
    rejections: dict[str, int] = {}
    exceptions: dict[str, int] = {}
    rss_usable = True
    with log_path.open("w") as log:
        while (left := deadline - time.monotonic()) >= 1 and len(findings) < args.max_crashes:
            child_stats = work / f"child-{len(runs)}.json"
            (work / "known.json").write_text(json.dumps(known))
            before = _artifacts(crashes)
            command = [sys.executable, str(Path(__file__).resolve()), "--child", "--child-stats", str(child_stats),
                       "--seeds", str(seeds_dir), "--known", str(work / "known.json"),
                       "--max-numel", str(args.max_numel), "--",
                       f"-max_total_time={int(left)}", f"-timeout={args.timeout}",
                       f"-rss_limit_mb={args.rss_limit_mb}", f"-max_len={args.max_len}", "-len_control=0",
                       "-print_final_stats=1", f"-dict={work / 'tokens.dict'}", f"-artifact_prefix={crashes}/",
                       *extra, str(corpus), str(seeds_dir)]
            t0 = time.monotonic()
            try:
                proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      timeout=left + args.timeout + 120)
                output, rc = proc.stdout, proc.returncode
            except subprocess.TimeoutExpired as exc:  # libFuzzer's own -timeout did not fire: a hang
                output, rc = exc.stdout or b"", "hang"
            output = output.decode("utf-8", "replace")
            log.write(output)
            child = json.loads(child_stats.read_text()) if child_stats.exists() else {}
            final = _final_stats(output)
            done = re.search(r"^Done \d+ runs in (\d+) second", output, re.M)
            execs = final.get("number_of_executed_units", child.get("execs", 0))
            new = sorted(_artifacts(crashes) - before)
            run = {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "iterations": execs,
                   "fuzzing_seconds": int(done.group(1)) if done else None,
                   "libfuzzer": final, "artifacts": new}
            runs.append(run)
            rss_usable = rss_usable and child.get("rss_usable", True)
            for key in ("ok", "repeats", "raw_decodes", "target_seconds", "mutator_seconds"):
                totals[key] += child.get(key, 0)
            for key in ("peak_max", "rss_max", "cpu_max"):
                totals[key] = max(totals[key], child.get(key, 0))
            for source, target in ((child.get("rejections", {}), rejections),
                                   (child.get("exceptions", {}), exceptions)):
                for cls, count in source.items():
                    target[cls] = target.get(cls, 0) + count
            if rc != 0:
                crash = child.get("crash") or {}
                kind = new[0].split("-")[0] if new else "exit"
                sig = crash.get("signature") or f"{kind}:{rc}"
                findings.append({"signature": sig, "kind": kind, "message": crash.get("message", ""),
                                 "inputs": new, "rc": rc})
                known.append(sig)
                if not new and not crash:  # the child did not even start fuzzing: report, do not loop
                    break
    seconds = time.monotonic() - start
    iterations = sum(r["iterations"] for r in runs)
    # libFuzzer's own clock for a run that finished, the child's wall time (startup included) otherwise.
    fuzzing = sum(r["fuzzing_seconds"] if r["fuzzing_seconds"] is not None else r["seconds"] for r in runs)
    stats = {
        "seconds": round(seconds, 1),
        "fuzzing_seconds": round(fuzzing, 1),
        "iterations": iterations,
        "execs_per_second": round(iterations / fuzzing, 1) if fuzzing else 0.0,
        "crashes": len(findings),
        "crash_dir": str(crashes),
        "findings": findings,
        "repeated_findings_skipped": totals["repeats"],
        "successful_decodes": totals["ok"],
        "raw_edit_decodes": totals["raw_decodes"],
        "rejected": sum(rejections.values()),
        "rejection_classes": dict(sorted(rejections.items(), key=lambda kv: -kv[1])),
        "exception_classes": exceptions,
        "peak_traced_bytes_max": totals["peak_max"],
        "peak_rss_growth_bytes_max": totals["rss_max"],
        "cpu_seconds_max": round(totals["cpu_max"], 4),
        "seconds_in_target": round(totals["target_seconds"], 1),
        "seconds_in_mutator": round(totals["mutator_seconds"], 1),
        "corpus_inputs": sum(1 for _ in corpus.iterdir()),
        "runs": runs,
        "settings": {"max_numel": args.max_numel, "max_len": args.max_len, "timeout_s": args.timeout,
                     "rss_limit_mb": args.rss_limit_mb, "seeds": sum(1 for _ in seeds_dir.iterdir()),
                     "memory_bound": f"{MEM_PER_BYTE} B/byte + {MEM_PER_ELEMENT} B/element + {MEM_FIXED} B",
                     "rss_bound": f"{RSS_PER_BYTE} B/byte + {MEM_PER_ELEMENT} B/element + {RSS_FIXED} B"
                                  + ("" if rss_usable else " (not measurable here: not checked)"),
                     "cpu_bound": f"{CPU_PER_BYTE} s/byte + {CPU_PER_ELEMENT} s/element + {CPU_FIXED} s",
                     "libfuzzer_extra": extra},
    }
    stats_path.write_text(json.dumps(stats, indent=1, ensure_ascii=True) + "\n")
    shutil.rmtree(work, ignore_errors=True)  # seeds and child files; a --corpus folder lives outside it
    print(f"fuzz_decode: {stats['seconds']} s, {iterations} iterations ({stats['execs_per_second']}/s), "
          f"{len(findings)} crashes, {totals['ok']} decoded ({totals['raw_decodes']} after a raw byte edit), "
          f"{stats['rejected']} rejected in "
          f"{len(rejections)} classes; log {log_path.name}")
    for finding in findings:
        print(f"  crash {finding['signature']}: {finding['message'][:200]} -> {finding['inputs']}")
    if not runs or (runs[-1]["iterations"] == 0 and not findings):
        return 2
    return 1 if findings else 0


def replay_main(paths: list[str], max_numel: int) -> int:
    """Run the oracle on saved inputs in this process (no instrumentation): a reproducer's outcome."""
    failed = 0
    for path in paths:
        data = Path(path).read_bytes()
        try:
            m = run_oracle(data, max_numel)
            outcome = "decoded" if m.rejection is None else f"rejected: {m.rejection}"
            outcome += f" (traced peak {m.peak} B, peak RSS +{m.rss} B, {m.cpu * 1e3:.1f} ms CPU)"
        except Exception as exc:
            failed += 1
            outcome = f"CRASH {signature(exc)}: {type(exc).__name__}: {str(exc)[:300]}"
        print(f"{Path(path).name} ({len(data)} bytes): {outcome}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="fuzzing budget (wall seconds)")
    parser.add_argument("--stats", help="JSON file the run's figures are written to")
    parser.add_argument("--corpus", help="corpus folder kept between runs (default: a temporary one)")
    parser.add_argument("--crashes", help="where crashing inputs go (default: <stats stem>-crashes)")
    parser.add_argument("--max-numel", type=int, default=MAX_NUMEL, help="decode's max_numel")
    parser.add_argument("--max-len", type=int, default=MAX_LEN, help="largest input, bytes")
    parser.add_argument("--timeout", type=int, default=10, help="libFuzzer -timeout: wall seconds per input")
    parser.add_argument("--rss-limit-mb", type=int, default=2048)
    parser.add_argument("--max-crashes", type=int, default=8, help="distinct findings before the run stops")
    parser.add_argument("--replay", nargs="+", metavar="FILE", help="check these inputs and exit")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-stats", help=argparse.SUPPRESS)
    parser.add_argument("--seeds", help=argparse.SUPPRESS)
    parser.add_argument("--known", help=argparse.SUPPRESS)
    args = parser.parse_args(own)
    if args.child:
        child_main(args, extra)
        return 0
    if args.replay:
        return replay_main(args.replay, args.max_numel)
    if not args.stats:
        parser.error("--stats is required")
    return parent_main(args, extra)


if __name__ == "__main__":
    sys.exit(main())
