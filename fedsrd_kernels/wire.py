"""SparseUpdate / Broadcast <-> bytes: a versioned, validated wire format (no pickle).

Container: safetensors (bounded, validated header). Its ``__metadata__`` holds one
JSON string under "fedsrd": format, version, kind, the object's scalar fields and
one entry per tensor (key, group, shape, value dtype, nnz, position encoding,
scale). Entry ``i`` owns uint8 blobs "{i}.values" and, for explicit positions,
"{i}.positions": each one zstd frame with content size and checksum. Little-endian.

Values are byte-shuffled (byte planes) before zstd: 1 M Gaussians of std 1e-3 at
level 3 shrink to 0.855 of raw in fp32 (0.925 unshuffled), 0.710 in bf16 (0.777),
0.843 in fp16 (0.917); level 19 gains 1% more at 60x the time.

Positions: "dense" (indices None), "seeded" (Broadcast.seeded keys: regenerated from
seed, round, key and download_drop; decode returns a SparseTensor with a SeededMask
and draws nothing: a full Llama-3.2-3B r=64 broadcast decodes in 0.13-0.15 s of one
CPU core, the BLAKE2b tag, zstd and the byte planes, where drawing its 196 masks
took 0.4 s more; benchmarks/bench_download.py --wire) or explicit, whichever
compresses smaller:
"bitmap" (np.packbits) or "delta_u8/16/32/64" (first index then gaps, narrowest
width, byte-shuffled). Uniform positions in 524,288 elements: at 5.2% the gaps take
19.6 KB vs 25.1 KB for the bitmap (entropy 19.3 KB); at 20% the bitmap wins (48.1
vs 52.1 KB). A byte varint measured within 0.2% of the shuffled gaps: not used.
Llama-3.2-3B r=64 (benchmarks/comm.py): round trip 51.2 MiB with fp32 values,
22.6 MiB with bf16, against 73.8 MiB as the paper counts.

Integrity: the container is followed by a 16-byte BLAKE2b tag of every byte before it
(``seal``). ``decode`` checks it first, so a flipped bit anywhere (header, metadata,
blobs) or a truncation is a PayloadError, never a different object: 12 of 200 random
single-bit flips of a version-2 update used to decode to another update (a key name,
the base digest, the client id). Hashing costs about 1 ms per MB.

``decode`` takes untrusted bytes: a valid object, or PayloadError (FormatVersionError
for an unknown format or version) naming the tensor and the problem. Allocations are
bounded by the declared shapes, capped at ``max_numel`` elements per payload. The one
check decode defers is the value count of a seeded delta against its mask, which needs
the mask drawn: ``server.apply`` checks it on the device it applies on (SeededCountError,
a PayloadError).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import dataclass

import numpy as np
import safetensors
import safetensors.numpy
import torch
import zstandard

from .config import MAX_NUMEL, VALUE_DTYPES
from .errors import FedSRDError, FormatVersionError, NonFiniteError, PayloadError, ShapeMismatchError, StateError
from .lora import DIGEST_HEX_CHARS
from .updates import (
    Broadcast,
    SeededMask,
    SparseTensor,
    SparseUpdate,
    scaled_overflow,  # noqa: F401  (re-exported: tests and callers import it from here)
)

FORMAT_NAME = "fedsrd-wire"
# 2: updates carry "base", the digest of the global state they were made against;
# 3: every payload ends with a BLAKE2b tag of the bytes before it (seal / unseal), and a broadcast
#    carries "base", the digest of the global state it applies to
FORMAT_VERSION = 3
TAG_BYTES = 16
_TAG_PERSON = b"fedsrd-wire-v3"  # domain separation: not the digest of any other use of BLAKE2b
METADATA_KEY = "fedsrd"
# config.MAX_NUMEL (2**34) caps the elements one payload declares, all tensors together: the default of
# decode's max_numel, the most any dimension may hold, and what encode refuses to exceed.
MAX_DIMS = 64  # numpy's limit; it keeps math.prod(shape) cheap (100k dims of 2**34 took 8.5 s of CPU)
ZSTD_LEVEL = 3
MiB = 2**20

_DTYPE_NAMES = {dtype: name for name, dtype in VALUE_DTYPES.items()}
_GAP_DTYPES = {"delta_u8": "<u1", "delta_u16": "<u2", "delta_u32": "<u4", "delta_u64": "<u8"}
_POSITIONS = ("dense", "seeded", "bitmap", *_GAP_DTYPES)
_FIELDS = {
    "update": {"format", "version", "kind", "round", "num_samples", "client_id", "base", "tensors"},
    "broadcast": {"format", "version", "kind", "round", "method", "seed", "download_drop", "moved", "seeded",
                  "base", "tensors"},
}
_ENTRY_FIELDS = {"key", "group", "shape", "dtype", "nnz", "positions", "scale"}


@dataclass(frozen=True)
class CommCost:
    """Bytes of one payload as encoded (split by part) and as the paper counts them.

    Paper accounting: 4 bytes per transmitted value plus a 1-bit-per-element
    bitmap over every transmitted sparse matrix; dense tensors 4 bytes per element.
    """

    encoded_bytes: int
    values_bytes: int
    positions_bytes: int
    paper_bytes: int

    @property
    def header_bytes(self) -> int:
        """Container header, metadata JSON and alignment padding."""
        return self.encoded_bytes - self.values_bytes - self.positions_bytes

    @property
    def encoded_mib(self) -> float:
        return self.encoded_bytes / MiB

    @property
    def paper_mib(self) -> float:
        """The paper's "MB" are MiB: FedAvg's 742 MB = 2 x 97,255,424 x 4 bytes / 2**20."""
        return self.paper_bytes / MiB


def _tag(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=TAG_BYTES, person=_TAG_PERSON).digest()


def seal(container: bytes) -> bytes:
    """The payload: the container followed by its BLAKE2b-128 tag."""
    return bytes(container) + _tag(container)


def unseal(payload: bytes) -> bytes:
    """The container of a sealed payload; PayloadError when the tag does not match (flipped or cut bytes).

    A payload of an older version (no tag) that still parses raises FormatVersionError naming its version.
    """
    body, tag = payload[:-TAG_BYTES], payload[-TAG_BYTES:]
    if len(payload) > TAG_BYTES and hmac.compare_digest(_tag(body), tag):
        return body
    try:
        _read_metadata(payload)  # an untagged payload of another version says which one it is
    except FormatVersionError:
        raise
    except PayloadError:
        pass
    raise PayloadError(f"checksum mismatch: the payload ({len(payload)} bytes) is corrupted or truncated")


def _is_count(value: object, limit: int = 2**64) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit


def _check_fields(meta: dict, error: type[Exception]) -> None:
    """Scalar fields of either kind; ``error`` is StateError for encode, PayloadError for decode."""

    def bad(name: str, want: str) -> None:
        raise error(f"field {name!r} must be {want}, got {meta[name]!r}")

    base = meta["base"]
    if base is not None and not (isinstance(base, str) and len(base) == DIGEST_HEX_CHARS
                                 and all(c in "0123456789abcdef" for c in base)):
        bad("base", f"{DIGEST_HEX_CHARS} lowercase hex chars or None")
    if meta["kind"] == "update":
        for name in ("round", "num_samples"):
            if meta[name] is not None and not _is_count(meta[name]):
                bad(name, "an int in [0, 2**64) or None")
        if meta["client_id"] is not None and not isinstance(meta["client_id"], str):
            bad("client_id", "a str or None")
        return
    for name in ("round", "seed"):
        if not _is_count(meta[name]):
            bad(name, "an int in [0, 2**64)")
    if not isinstance(meta["method"], str):
        bad("method", "a str")
    drop = meta["download_drop"]
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop < 1.0:
        bad("download_drop", "a number in [0, 1)")
    moved, seeded, factors = meta["moved"], meta["seeded"], ("A", "B", "AB")
    if not isinstance(moved, dict) or not all(isinstance(k, str) and v in factors for k, v in moved.items()):
        bad("moved", 'a mapping of str to "A", "B" or "AB"')
    if not isinstance(seeded, list) or not all(isinstance(k, str) for k in seeded) or len(set(seeded)) < len(
            seeded):
        bad("seeded", "a list of distinct str keys")


def _check_entry(entry: dict, kind: str, error: type[Exception]) -> int:
    """One tensor entry's declared layout; returns its numel."""
    key, shape, nnz, positions, scale = (entry[f] for f in ("key", "shape", "nnz", "positions", "scale"))
    where = f"tensor {key!r}"
    if not isinstance(key, str):
        raise error(f"tensor key must be a str, got {key!r}")
    try:
        key.encode("utf-8")  # the seeded mask hashes it (mask_key); JSON can carry a lone surrogate, UTF-8 cannot
    except UnicodeEncodeError:
        raise error(f"{where}: key is not valid UTF-8") from None
    if entry["group"] not in (("delta",) if kind == "update" else ("delta", "replace")):
        raise error(f"{where}: group {entry['group']!r} is not allowed in a {kind}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(s, MAX_NUMEL + 1) for s in shape):
        raise error(f"{where}: shape must be a list of at most {MAX_DIMS} ints in [0, {MAX_NUMEL}], got {shape!r:.200}")
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise error(f"{where}: shape {shape} has {numel} elements, over the limit of {MAX_NUMEL}")
    if not isinstance(entry["dtype"], str) or entry["dtype"] not in VALUE_DTYPES:
        raise error(f"{where}: value dtype must be one of {sorted(VALUE_DTYPES)}, got {entry['dtype']!r}")
    if positions not in _POSITIONS or (positions == "seeded" and kind == "update"):
        raise error(f"{where}: unknown position encoding {positions!r} in a {kind}")
    if not _is_count(nnz, numel + 1) or (positions == "dense" and nnz != numel):
        raise error(f"{where}: nnz {nnz!r} does not fit {numel} elements with {positions} positions")
    if not isinstance(scale, float) or not math.isfinite(scale):
        raise error(f"{where}: scale must be a finite float, got {scale!r}")
    if float(torch.tensor(scale, dtype=torch.float32)) != scale:
        raise error(f"{where}: scale {scale!r} is not a float32 value")
    if entry["group"] == "replace" and (positions != "dense" or scale != 1.0):
        raise error(f"{where}: a replacement must be dense with scale 1.0")
    return numel


def _shuffled(array: np.ndarray, itemsize: int) -> np.ndarray:
    """Byte planes: byte j of every element together, for j = 0 .. itemsize - 1."""
    return array.view(np.uint8).reshape(-1, itemsize).T.copy().reshape(-1)


def _unshuffled(raw: bytes, itemsize: int) -> np.ndarray:
    """Inverse of _shuffled, as a fresh writable array.

    One strided copy per byte plane: 30 ms for 10 M float32 values on the dev box, where the
    transposed copy (``.T.copy()``) took 113 ms, more than the zstd frame's decompression.
    """
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, -1)
    out = np.empty((planes.shape[1], itemsize), dtype=np.uint8)
    for j in range(itemsize):
        out[:, j] = planes[j]
    return out.reshape(-1)


def _compress(data: np.ndarray) -> np.ndarray:
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=True)
    return np.frombuffer(compressor.compress(np.ascontiguousarray(data)), dtype=np.uint8)


def _decompress(blob: bytes, expected: int, where: str) -> bytes:
    """One zstd frame of exactly ``expected`` bytes, checksummed, nothing after it."""
    try:
        params = zstandard.get_frame_parameters(blob)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"{where}: not a zstd frame ({exc})") from None
    # Checked before decompressing: zstd sizes its output by the declared
    # content size and fails a frame that decodes to more.
    if params.content_size != expected or not params.has_checksum:
        raise PayloadError(f"{where}: zstd frame declares {params.content_size} bytes, expected {expected}")
    stream = zstandard.ZstdDecompressor().decompressobj(write_size=max(expected, 1))
    try:
        out = stream.decompress(blob)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"{where}: corrupt zstd frame ({exc})") from None
    if not stream.eof or stream.unused_data or len(out) != expected:
        raise PayloadError(f"{where}: zstd frame is truncated, has trailing bytes or the wrong size")
    return out


def _encode_positions(indices: np.ndarray, numel: int) -> tuple[str, np.ndarray]:
    """The smaller of the compressed bitmap and the compressed, shuffled gaps."""
    mask = np.zeros(numel, dtype=bool)
    mask[indices] = True
    bitmap = _compress(np.packbits(mask))
    gaps = np.diff(indices, prepend=0)
    width = next(n for n, d in _GAP_DTYPES.items() if gaps.size == 0 or gaps.max() <= np.iinfo(d).max)
    gap_dtype = np.dtype(_GAP_DTYPES[width])
    delta = _compress(_shuffled(gaps.astype(gap_dtype), gap_dtype.itemsize))
    return ("bitmap", bitmap) if bitmap.size < delta.size else (width, delta)


def _decode_positions(entry: dict, numel: int, raw: bytes, where: str) -> np.ndarray:
    if entry["positions"] == "bitmap":
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8))
        if bits[numel:].any():
            raise PayloadError(f"{where}: bitmap has bits set past element {numel}")
        indices = np.flatnonzero(bits)
    else:
        dtype = np.dtype(_GAP_DTYPES[entry["positions"]])
        indices = np.cumsum(_unshuffled(raw, dtype.itemsize).view(dtype).astype(np.int64))
    # A wrapped int64 sum shows up as a decrease (compared: a difference could wrap too).
    if indices.size and (indices[0] < 0 or indices[-1] >= numel or not (indices[1:] > indices[:-1]).all()):
        raise PayloadError(f"{where}: positions are not strictly increasing within [0, {numel})")
    if indices.size != entry["nnz"]:
        raise PayloadError(f"{where}: {indices.size} positions for nnz {entry['nnz']}")
    return indices


def _seeded_mask(fields: dict, key: str) -> SeededMask:
    """The download mask of a seeded key: (seed, round, key, download_drop) of its broadcast."""
    return SeededMask(fields["seed"], fields["round"], key, float(fields["download_drop"]))


def _encode_tensor(meta: dict, group: str, key: str, sparse: SparseTensor, blobs: dict, i: int) -> dict:
    """Validate one tensor, add its blobs ("{i}.values", "{i}.positions") and return its entry."""
    if not isinstance(sparse, SparseTensor):
        raise StateError(f"tensor {key!r} is a {type(sparse).__name__}, not a SparseTensor")
    values = sparse.values.detach().cpu().contiguous()
    if values.dtype not in _DTYPE_NAMES:
        raise ShapeMismatchError(f"tensor {key!r}: value dtype {values.dtype} is not a wire dtype")
    seeded = group == "delta" and key in meta.get("seeded", ())  # a replacement of a seeded key is dense
    positions = "seeded" if seeded and not sparse.is_dense else "dense" if sparse.is_dense else "bitmap"
    entry = {"key": key, "group": group, "shape": list(sparse.shape), "dtype": _DTYPE_NAMES[values.dtype],
             "nnz": sparse.nnz, "positions": positions, "scale": sparse.scale}
    numel = _check_entry(entry, meta["kind"], StateError)  # before anything sized by numel
    if not sparse.is_finite:  # read when the SparseTensor was built: no pass over the values here
        raise NonFiniteError(f"tensor {key!r} holds NaN or Inf values")
    if seeded and positions == "dense":
        raise StateError(f"tensor {key!r} is seeded but dense")
    if sparse.is_seeded:  # the mask is sent as the broadcast's (seed, round, download_drop) and the key
        if not seeded:
            raise StateError(f"tensor {key!r} has a seeded mask, but only a broadcast's seeded keys can send one")
        if sparse.mask != _seeded_mask(meta, key):
            raise StateError(f"tensor {key!r}: its mask {sparse.mask} is not this broadcast's download mask")
    elif positions != "dense":
        indices = sparse.indices.detach().cpu()
        if indices.dtype != torch.int64 or indices.dim() != 1:
            raise StateError(f"tensor {key!r}: indices must be 1-D int64, got {indices.dtype}")
        ordered = bool((indices[1:] > indices[:-1]).all())  # a comparison cannot wrap, a difference can
        if indices.numel() and (int(indices[0]) < 0 or int(indices[-1]) >= numel or not ordered):
            raise StateError(f"tensor {key!r}: indices must be sorted, unique and in [0, {numel})")
        if seeded and not torch.equal(indices, _seeded_mask(meta, key).keep_indices(numel)):  # explicit: drawn
            raise StateError(f"tensor {key!r}: indices are not the seeded download mask")
        if not seeded:
            entry["positions"], blobs[f"{i}.positions"] = _encode_positions(indices.numpy(), numel)
    blobs[f"{i}.values"] = _compress(_shuffled(values.view(torch.uint8).numpy(), values.element_size()))
    return entry


def _encode_parts(obj: SparseUpdate | Broadcast) -> tuple[bytes, int, int, int]:
    """(payload, value blob bytes, position blob bytes, paper-counted bytes)."""
    if isinstance(obj, SparseUpdate):
        meta = {"kind": "update", "round": obj.round, "num_samples": obj.num_samples,
                "client_id": obj.client_id, "base": obj.base}
        items = [("delta", k, v) for k, v in obj.deltas.items()]
    elif isinstance(obj, Broadcast):
        meta = {"kind": "broadcast", "round": obj.round, "method": obj.method, "seed": obj.seed,
                "download_drop": obj.download_drop, "moved": dict(obj.moved), "seeded": sorted(obj.seeded),
                "base": obj.base}
        items = [("delta", k, v) for k, v in obj.deltas.items()]
        items += [("replace", k, SparseTensor(v.shape, v.detach().flatten())) for k, v in obj.replace.items()]
        if not set(obj.seeded) <= set(obj.deltas):
            raise StateError(f"seeded keys {sorted(set(obj.seeded) - set(obj.deltas))} are not in deltas")
    else:
        raise StateError(f"encode expects a SparseUpdate or Broadcast, got {type(obj).__name__}")
    _check_fields(meta, StateError)
    entries, blobs, total = [], {}, 0
    for i, (group, key, sparse) in enumerate(items):
        entries.append(_encode_tensor(meta, group, key, sparse, blobs, i))
        total += math.prod(sparse.shape)
        if total > MAX_NUMEL:
            raise StateError(f"tensor {key!r}: the payload exceeds {MAX_NUMEL} elements")
    meta.update(format=FORMAT_NAME, version=FORMAT_VERSION, tensors=entries)
    text = json.dumps(meta, allow_nan=False, separators=(",", ":"))
    payload = seal(safetensors.numpy.save(blobs, metadata={METADATA_KEY: text}))
    values_bytes, positions_bytes = (
        sum(blob.size for name, blob in blobs.items() if name.endswith(part))
        for part in (".values", ".positions")
    )
    return payload, values_bytes, positions_bytes, sum(_paper_bytes(entry) for entry in entries)


def _paper_bytes(entry: dict) -> int:
    """The paper's count: 4 bytes per value, plus a 1-bit-per-element bitmap unless dense."""
    numel = math.prod(entry["shape"])
    return 4 * numel if entry["positions"] == "dense" else 4 * entry["nnz"] + (numel + 7) // 8


def encode(obj: SparseUpdate | Broadcast) -> bytes:
    """Serialise an update or broadcast; validates it (NonFiniteError, StateError) and never modifies it.

    A seeded delta with a SeededMask is sent without drawing the mask: its mask must be the broadcast's
    (seed, round, key, download_drop), and its value count is checked where the mask is drawn (apply).
    One with explicit positions under a seeded key is checked against the mask here, which draws it.
    """
    return _encode_parts(obj)[0]


def comm_cost(obj: SparseUpdate | Broadcast) -> CommCost:
    """Encoded bytes (values / positions / header) next to the paper's accounting."""
    payload, values_bytes, positions_bytes, paper = _encode_parts(obj)
    return CommCost(len(payload), values_bytes, positions_bytes, paper)


def _strict_json(text: bytes | str, what: str) -> object:
    def no_duplicates(pairs: list) -> dict:
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError("duplicate key")
        return dict(pairs)

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not allowed")

    try:
        return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except (ValueError, RecursionError) as exc:
        raise PayloadError(f"{what} is not valid JSON: {exc}") from None


def _read_metadata(data: bytes) -> tuple[dict, dict[str, bytes]]:
    """The checked format description and the raw blobs by name."""
    try:
        blobs = {name: view for name, view in safetensors.deserialize(data)}
    except Exception as exc:  # the Rust parser raises SafetensorError; wrap anything it raises
        raise PayloadError(f"not a valid safetensors container: {exc}") from None
    # deserialize() validated the header length and JSON; read its metadata, which it does not return.
    header = _strict_json(data[8 : 8 + int.from_bytes(data[:8], "little")], "safetensors header")
    outer = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(outer, dict) or set(outer) != {METADATA_KEY}:
        raise PayloadError(f"not a fedsrd payload: metadata must hold exactly the key {METADATA_KEY!r}")
    meta = _strict_json(outer[METADATA_KEY], "fedsrd metadata")
    if not isinstance(meta, dict):
        raise PayloadError("fedsrd metadata must be a JSON object")
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise FormatVersionError(
            f"unknown wire format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this reader knows {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    kind = meta.get("kind")
    if not isinstance(kind, str) or kind not in _FIELDS or set(meta) != _FIELDS[kind]:
        raise PayloadError(f"metadata fields {sorted(meta)} do not match kind {kind!r}")
    _check_fields(meta, PayloadError)
    if not isinstance(meta["tensors"], list) or not all(
        isinstance(e, dict) and set(e) == _ENTRY_FIELDS for e in meta["tensors"]
    ):
        raise PayloadError(f"tensors must be a list of objects with fields {sorted(_ENTRY_FIELDS)}")
    return meta, {name: view["data"] for name, view in blobs.items() if view["dtype"] == "U8"}


def _decode_entry(meta: dict, entry: dict, values_blob: bytes, positions_blob: bytes | None):
    """One entry's tensor: a SparseTensor for a delta, a dense tensor for a replacement.

    A seeded entry becomes a SparseTensor with its SeededMask: nothing is drawn here.
    """
    key, nnz, dtype = entry["key"], entry["nnz"], VALUE_DTYPES[entry["dtype"]]
    shape, where = tuple(entry["shape"]), f"tensor {key!r}"
    numel = math.prod(shape)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = _decompress(values_blob, nnz * itemsize, f"{where} values")
    values = torch.from_numpy(_unshuffled(raw, itemsize)).view(dtype)
    indices = mask = None
    if entry["positions"] == "seeded":
        mask = _seeded_mask(meta, key)
    elif positions_blob is not None:
        gaps = entry["positions"] != "bitmap"
        size = nnz * np.dtype(_GAP_DTYPES[entry["positions"]]).itemsize if gaps else (numel + 7) // 8
        raw = _decompress(positions_blob, size, f"{where} positions")
        indices = torch.from_numpy(_decode_positions(entry, numel, raw, f"{where} positions"))
    try:  # the SparseTensor reads the values once: float32 overflow here, NaN / Inf just below
        tensor = SparseTensor(shape, values, indices, scale=entry["scale"], mask=mask)
    except NonFiniteError:
        raise PayloadError(f"{where}: values x scale {entry['scale']:.3g} do not fit float32") from None
    except PayloadError:
        raise
    except FedSRDError as exc:
        raise PayloadError(f"{where}: {exc}") from None
    if not tensor.is_finite:
        raise PayloadError(f"{where}: values hold NaN or Inf")
    return values.reshape(shape) if entry["group"] == "replace" else tensor


def broadcast_numel(state) -> int:
    """The most elements a valid Broadcast for ``state`` can declare: a delta and a replacement per key.

    Clients pass it to ``decode`` as ``max_numel``, so a forged broadcast cannot make them allocate more
    than twice their adapter (a 1.3 KB seeded broadcast declaring 2**27 elements took 333 MiB and 1.6 s).
    """
    return max(1, 2 * sum(t.numel() for t in state.values()))


def decode(data: bytes, *, max_numel: int = MAX_NUMEL) -> SparseUpdate | Broadcast:
    """Parse and validate untrusted bytes; raises PayloadError (or FormatVersionError) on any fault.

    ``max_numel`` caps the elements the payload may declare (all tensors together), which bounds
    the memory and time decoding may take; a server that knows its model passes the model's size.
    Seeded positions are not drawn: their value count is checked by ``apply`` (SeededCountError).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"decode expects bytes, got {type(data).__name__}")
    data = unseal(bytes(data))
    meta, blobs = _read_metadata(data)
    entries, expected_blobs, total, seen = meta["tensors"], set(), 0, set()
    for i, entry in enumerate(entries):
        total += _check_entry(entry, meta["kind"], PayloadError)
        if total > max_numel:
            raise PayloadError(f"tensor {entry['key']!r}: the payload declares over {max_numel} elements")
        if (entry["group"], entry["key"]) in seen:
            raise PayloadError(f"tensor {entry['key']!r} appears twice in {entry['group']}")
        seen.add((entry["group"], entry["key"]))
        expected_blobs.add(f"{i}.values")
        if entry["positions"] not in ("dense", "seeded"):
            expected_blobs.add(f"{i}.positions")
    if set(blobs) != expected_blobs:
        raise PayloadError(f"blobs {sorted(blobs)} do not match the entries, which need uint8 blobs "
                           f"{sorted(expected_blobs)}")
    seeded = set(meta.get("seeded", ()))
    if seeded != {e["key"] for e in entries if e["positions"] == "seeded"}:
        raise PayloadError(f"seeded keys {sorted(seeded)} do not match the entries with seeded positions")
    deltas, replace = {}, {}
    for i, entry in enumerate(entries):
        tensor = _decode_entry(meta, entry, blobs[f"{i}.values"], blobs.get(f"{i}.positions"))
        (replace if entry["group"] == "replace" else deltas)[entry["key"]] = tensor
    if meta["kind"] == "update":
        return SparseUpdate(deltas, meta["num_samples"], meta["round"], meta["client_id"], meta["base"])
    return Broadcast(meta["round"], meta["method"], meta["seed"], float(meta["download_drop"]), deltas,
                     replace, meta["moved"], frozenset(seeded), meta["base"])
