"""wire.encode / wire.decode: bit-exact round trips, and untrusted bytes never escape PayloadError."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsrd_kernels.errors import FormatVersionError, NonFiniteError, PayloadError, StateError
from fedsrd_kernels.kernels.download.reference import seeded_keep_indices
from fedsrd_kernels.updates import Broadcast, SparseTensor, SparseUpdate
from fedsrd_kernels.wire import CommCost, comm_cost, decode, encode, scaled_overflow, seal, unseal

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((1, 1), (1, 37), (37, 1), (0, 5), (5, 0), (3, 7), (13, 61), (64, 77), (4999,), (50, 100), ())
DENSITIES = ("dense", 0.0, "one", 0.1, 1.0)
HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- building objects ---------------------------------------------------------------------------


def make_values(n: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Random values with the awkward bit patterns mixed in: -0.0, subnormal, the largest finite value that
    still fits float32 once multiplied by ``scale`` (with a factor 2 to spare for rounding to ``dtype``)."""
    g = torch.Generator().manual_seed(seed)
    values = (torch.randn(n, generator=g) * 10.0 ** float(torch.randint(-6, 2, (), generator=g))).to(dtype)
    finfo = torch.finfo(dtype)
    largest = finfo.max if abs(scale) <= 1 else finfo.max / (2 * abs(scale))
    for i, special in enumerate((-0.0, finfo.smallest_normal / 4, -largest, finfo.tiny)):
        if i < n:
            values[(i * 7919) % n] = special
    return values


def make_sparse(shape: tuple[int, ...], density, dtype: torch.dtype, scale: float, seed: int) -> SparseTensor:
    numel = math.prod(shape)
    if density == "dense":
        return SparseTensor(shape, make_values(numel, dtype, seed, scale), scale=scale)
    k = min(numel, 1) if density == "one" else round(density * numel)
    g = torch.Generator().manual_seed(seed)
    indices = torch.randperm(numel, generator=g)[:k].sort().values
    return SparseTensor(shape, make_values(k, dtype, seed + 1, scale), indices, scale=scale)


def seeded_delta(shape, *, seed: int, round: int, key: str, drop: float, dtype=torch.float32) -> SparseTensor:
    kept = seeded_keep_indices(math.prod(shape), seed=seed, round=round, name=key, drop=drop)
    return SparseTensor(shape, make_values(kept.numel(), dtype, seed % 1000, 1.0 / (1.0 - drop)), kept,
                        scale=1.0 / (1.0 - drop))


sparse_tensors = st.builds(
    make_sparse,
    st.sampled_from(SHAPES),
    st.sampled_from(DENSITIES),
    st.sampled_from(DTYPES),
    # any float32 scale whose product with the values fits float32 (a SparseTensor refuses the rest)
    st.floats(width=32, min_value=-2.0**100, max_value=2.0**100),
    st.integers(0, 2**16),
)
keys = st.text(min_size=0, max_size=12) | st.sampled_from(["m.lora_A.weight", "m.lora_B.weight", "bias"])

updates = st.builds(
    SparseUpdate,
    st.dictionaries(keys, sparse_tensors, max_size=4),
    st.none() | st.integers(0, 2**63),
    st.none() | st.integers(0, 2**64 - 1),
    st.none() | st.text(max_size=20),
)


@st.composite
def broadcasts(draw) -> Broadcast:
    round_, seed = draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**64 - 1))
    drop = draw(st.sampled_from([0.0, 0.5, 0.8, 0.99]))
    deltas = dict(draw(st.dictionaries(keys, sparse_tensors, max_size=3)))
    seeded = set()
    for key in draw(st.lists(st.sampled_from(["p.lora_A.weight", "p.lora_B.weight", "q.lora_B.weight"]),
                             max_size=3, unique=True)):
        shape = draw(st.sampled_from([(64, 8), (8, 77), (1, 1), (0, 3)]))
        deltas[key] = seeded_delta(shape, seed=seed, round=round_, key=key, drop=drop,
                                   dtype=draw(st.sampled_from(DTYPES)))
        seeded.add(key)
    replace = {
        key: make_values(math.prod(shape), dtype, 3).reshape(shape)
        for key, (shape, dtype) in draw(
            st.dictionaries(keys, st.tuples(st.sampled_from(SHAPES), st.sampled_from(DTYPES)), max_size=2)
        ).items()
    }
    moved = draw(st.dictionaries(st.text(max_size=8), st.sampled_from(["A", "B", "AB"]), max_size=3))
    return Broadcast(round_, draw(st.text(max_size=10)), seed, drop, deltas, replace, moved, frozenset(seeded))


def float_bits(x: float) -> bytes:
    return struct.pack("<d", x)


def assert_same_tensor(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_same(a, b) -> None:
    """Bit-exact equality of two updates or broadcasts."""
    assert type(a) is type(b)
    fields = ("num_samples", "round", "client_id", "base") if isinstance(a, SparseUpdate) else (
        "round", "method", "seed", "download_drop", "moved", "seeded", "base")
    for name in fields:
        assert getattr(a, name) == getattr(b, name), name
    assert list(a.deltas) == list(b.deltas)
    for key, x in a.deltas.items():
        y = b.deltas[key]
        assert x.shape == y.shape and float_bits(x.scale) == float_bits(y.scale)
        assert_same_tensor(x.values, y.values)
        assert (x.indices is None) == (y.indices is None)
        if x.indices is not None:
            assert y.indices.dtype == torch.int64 and torch.equal(x.indices, y.indices)
    if isinstance(a, Broadcast):
        assert list(a.replace) == list(b.replace)
        for key, x in a.replace.items():
            assert_same_tensor(x, b.replace[key])


# -- round trips ----------------------------------------------------------------------------------


def round_trips(obj) -> None:
    """Bit-exact through encode and decode, unless some value times its scale is past float32, which
    encode refuses (decode would too: densify would write Inf)."""
    if any(scaled_overflow(t.values, t.scale) for t in obj.deltas.values()):
        with pytest.raises(NonFiniteError, match="overflow float32"):
            encode(obj)
        return
    assert_same(obj, decode(encode(obj)))


@HYPOTHESIS
@given(updates)
def test_update_round_trip_is_bit_exact(update):
    round_trips(update)


@HYPOTHESIS
@given(broadcasts())
def test_broadcast_round_trip_is_bit_exact(broadcast):
    round_trips(broadcast)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_density_dtype(shape, density, dtype):
    update = SparseUpdate({"k": make_sparse(shape, density, dtype, 1.25, 7)}, num_samples=3, round=1)
    assert_same(update, decode(encode(update)))


def test_encode_does_not_modify_its_input():
    sparse = make_sparse((50, 100), 0.1, torch.float32, 2.0, 1)
    values, indices = sparse.values.clone(), sparse.indices.clone()
    encode(SparseUpdate({"k": sparse}))
    assert torch.equal(sparse.values, values) and torch.equal(sparse.indices, indices)


def header_of(payload: bytes) -> dict:
    return json.loads(json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])["__metadata__"]["fedsrd"])


@pytest.mark.parametrize("density, expected", [(0.002, "delta"), (0.5, "bitmap")])
def test_position_encoding_is_the_smaller_one(density, expected):
    numel = 256 * 512
    sparse = make_sparse((256, 512), density, torch.float32, 1.0, 3)
    payload = encode(SparseUpdate({"k": sparse}))
    chosen = header_of(payload)["tensors"][0]["positions"]
    assert chosen.startswith(expected)
    blob = dict(safetensors.deserialize(unseal(payload)))["0.positions"]["data"]
    mask = np.zeros(numel, dtype=bool)
    mask[sparse.indices.numpy()] = True
    bitmap = zstd_frame(np.packbits(mask))
    gaps = np.diff(sparse.indices.numpy(), prepend=0)
    gaps = gaps.astype(next(d for d in ("<u1", "<u2", "<u4") if gaps.max() <= np.iinfo(d).max))
    delta = zstd_frame(gaps.view(np.uint8).reshape(-1, gaps.itemsize).T)
    assert len(blob) == min(len(bitmap), len(delta))
    assert (len(bitmap) < len(delta)) == (expected == "bitmap")


def test_comm_cost_parts_and_paper_accounting():
    sparse = make_sparse((40, 25), 0.052, torch.bfloat16, 1.0, 5)
    dense = make_sparse((3, 4), "dense", torch.float32, 1.0, 6)
    update = SparseUpdate({"s": sparse, "d": dense})
    cost = comm_cost(update)
    assert cost.encoded_bytes == len(encode(update))
    assert cost.values_bytes > 0 and cost.positions_bytes > 0 and cost.header_bytes > 0
    assert cost.paper_bytes == 4 * sparse.nnz + 1000 // 8 + 4 * 12
    fedavg = CommCost(encoded_bytes=0, values_bytes=0, positions_bytes=0, paper_bytes=2 * 97_255_424 * 4)
    assert round(fedavg.paper_mib) == 742


# -- encode rejects bad objects -------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_encode_rejects_non_finite_values(bad):
    values = torch.ones(4)
    values[2] = bad
    with pytest.raises(NonFiniteError, match="'k'"):
        encode(SparseUpdate({"k": SparseTensor((2, 2), values)}))


@pytest.mark.parametrize(
    "indices",
    [[3, 1], [1, 1], [0, 4], [-1, 2], [0, 2**63 - 1, -2, 3], torch.tensor([0, 1], dtype=torch.int32)],
)
def test_bad_indices_are_refused_when_the_sparse_tensor_is_built(indices):
    """Out of range, repeated, unsorted, negative, wrapping or not int64: refused at construction, so no
    in-memory SparseTensor can carry them into aggregate, densify or apply."""
    indices = indices if isinstance(indices, torch.Tensor) else torch.tensor(indices)
    with pytest.raises(StateError, match="strictly increasing|int64"):
        SparseTensor((2, 2), torch.ones(indices.numel()), indices)


def test_encode_rejects_other_bad_objects():
    with pytest.raises(StateError, match="dtype"):
        encode(SparseUpdate({"k": SparseTensor((2,), torch.ones(2, dtype=torch.float64))}))
    with pytest.raises(StateError):
        encode({"k": torch.ones(2)})
    with pytest.raises(StateError, match="round"):
        encode(SparseUpdate({}, round=-1))
    wrong = SparseTensor((4, 4), torch.ones(3), torch.tensor([0, 5, 9]))
    with pytest.raises(StateError, match="seeded"):
        encode(Broadcast(1, "fedsrd", 0, 0.8, {"k": wrong}, seeded=frozenset({"k"})))
    with pytest.raises(StateError, match="seeded"):
        encode(Broadcast(1, "fedsrd", 0, 0.8, {}, seeded=frozenset({"k"})))
    with pytest.raises(StateError, match="download_drop"):
        encode(Broadcast(1, "fedsrd", 0, 1.0))


# -- decode rejects bad bytes ---------------------------------------------------------------------


def zstd_frame(data, **kwargs) -> bytes:
    kwargs = {"write_content_size": True, "write_checksum": True, **kwargs}
    return zstandard.ZstdCompressor(**kwargs).compress(np.ascontiguousarray(data).tobytes())


def split(payload: bytes) -> tuple[dict, dict[str, bytes]]:
    return header_of(payload), {name: view["data"] for name, view in safetensors.deserialize(unseal(payload))}


def build(meta, blobs: dict[str, bytes], raw_metadata: dict[str, str] | None = None) -> bytes:
    arrays = {name: np.frombuffer(blob, dtype=np.uint8) for name, blob in blobs.items()}
    return seal(safetensors.numpy.save(arrays, metadata=raw_metadata or {"fedsrd": json.dumps(meta)}))


def sample_update() -> SparseUpdate:
    return SparseUpdate(
        {
            "a.lora_A.weight": make_sparse((8, 60), 0.05, torch.float32, 1.5, 1),  # delta-coded gaps
            "a.lora_B.weight": make_sparse((30, 8), 0.6, torch.bfloat16, 2.0, 2),  # bitmap
            "bias": make_sparse((30,), "dense", torch.float16, 1.0, 3),
        },
        num_samples=10, round=4, client_id="c1", base="0123456789abcdef" * 2,
    )


def sample_broadcast() -> Broadcast:
    key = "a.lora_B.weight"
    return Broadcast(
        5, "fedsrd", 11, 0.8, {key: seeded_delta((30, 8), seed=11, round=5, key=key, drop=0.8),
                               "bias": make_sparse((30,), "dense", torch.float32, 1.0, 4)},
        {"c.lora_A.weight": torch.randn(4, 6, generator=torch.Generator().manual_seed(6))}, {"a": "B"},
        frozenset({key}),
    )


def assert_rejected_or_valid(data: bytes) -> None:
    try:
        decoded = decode(data)
    except PayloadError:
        return
    assert isinstance(decoded, (SparseUpdate, Broadcast))


@pytest.mark.parametrize("make", [sample_update, sample_broadcast])
def test_truncation_at_every_offset(make):
    payload = encode(make())
    for cut in range(len(payload)):
        with pytest.raises(PayloadError):
            decode(payload[:cut])
    with pytest.raises(PayloadError):
        decode(payload + b"\0")


@pytest.mark.parametrize("make", [sample_update, sample_broadcast])
def test_flipped_bytes_at_every_offset(make):
    payload = encode(make())
    rng = np.random.default_rng(0)
    for offset in range(len(payload)):
        for mask in (0xFF, 0x01, int(rng.integers(1, 256))):
            corrupt = bytearray(payload)
            corrupt[offset] ^= mask
            assert_rejected_or_valid(bytes(corrupt))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_raise_payload_error(data):
    assert_rejected_or_valid(data)
    assert_rejected_or_valid(b"\x40\0\0\0\0\0\0\0" + data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6))
def test_random_edits_raise_payload_error(edits):
    corrupt = bytearray(encode(sample_update()))
    for offset, value in edits:
        corrupt[offset % len(corrupt)] = value
    assert_rejected_or_valid(bytes(corrupt))


def edited(make, edit) -> bytes:
    """A payload whose metadata ``edit(meta, blobs)`` rewrote, re-serialised as a valid container."""
    meta, blobs = split(encode(make()))
    edit(meta, blobs)
    return build(meta, blobs)


def set_field(field, value, entry=None):
    def edit(meta, blobs):
        (meta if entry is None else meta["tensors"][entry])[field] = value
    return edit


def test_unknown_format_or_version_is_a_format_version_error():
    for edit in (set_field("version", 2), set_field("version", 4), set_field("format", "other"), set_field("version", "3")):
        with pytest.raises(FormatVersionError):
            decode(edited(sample_update, edit))


def test_an_old_untagged_payload_names_its_version():
    meta, blobs = split(encode(sample_update()))
    meta["version"] = 2
    old = unseal(build(meta, blobs))  # as version 2 wrote it: no tag
    with pytest.raises(FormatVersionError, match="version 2"):
        decode(old)


@pytest.mark.parametrize("sample", ["update", "broadcast"])
def test_no_flip_or_truncation_decodes_to_another_object(sample):
    """10,000 random corruptions (1 to 8 flipped bits, or a cut) of a real payload: every one is refused."""
    payload = encode(sample_update() if sample == "update" else sample_broadcast())
    rng = np.random.default_rng(20261201)
    data = np.frombuffer(payload, dtype=np.uint8)
    refused = 0
    for trial in range(5000):
        if trial % 10 == 9:
            corrupt = payload[: int(rng.integers(0, len(payload)))]
        else:
            flipped = data.copy()
            for _ in range(int(rng.integers(1, 9))):
                position = int(rng.integers(0, len(payload) * 8))
                flipped[position // 8] ^= np.uint8(1 << (position % 8))
            corrupt = flipped.tobytes()
            if corrupt == payload:  # an even number of flips of one bit
                continue
        with pytest.raises(PayloadError):
            decode(corrupt)
        refused += 1
    assert refused > 4900


def test_bad_json_and_foreign_containers():
    _, blobs = split(encode(sample_update()))
    for raw in ({"fedsrd": "{not json"}, {"fedsrd": '{"a": NaN}'}, {"fedsrd": '{"a": 1, "a": 2}'},
                {"fedsrd": "[" * 100_000}, {"fedsrd": "[]"}, {"other": "{}"},
                {"fedsrd": json.dumps(header_of(encode(sample_update()))), "extra": "x"}):
        with pytest.raises(PayloadError):
            decode(build(None, blobs, raw_metadata=raw))
    foreign = safetensors.numpy.save({"w": np.zeros(3, dtype=np.float32)})
    for payload in (foreign, seal(foreign)):
        with pytest.raises(PayloadError):
            decode(payload)
    for not_bytes in (None, "text", [1, 2]):
        with pytest.raises(PayloadError):
            decode(not_bytes)


def drop_field(name, entry=None):
    def edit(meta, blobs):
        del (meta if entry is None else meta["tensors"][entry])[name]
    return edit


def extra_blob(meta, blobs):
    blobs["9.values"] = zstd_frame(np.zeros(4, np.uint8))


def missing_blob(meta, blobs):
    del blobs["0.positions"]


def lying_meta_edits():
    """Edits of the update's metadata, each one a lie about the blobs or an invalid value."""
    yield from (set_field("extra", 1), drop_field("round"), drop_field("nnz", 0), set_field("extra", 1, 0))
    yield from (set_field("kind", "broadcast"), set_field("kind", "other"), set_field("round", -1),
                set_field("round", "4"), set_field("num_samples", 1.5), set_field("client_id", 3),
                set_field("base", "ABC"), set_field("base", "0" * 31),
                set_field("tensors", {}), set_field("tensors", [1]))
    for nnz in (0, 1, 23, 25, 10**12, -1, True):
        yield set_field("nnz", nnz, 0)  # the real nnz of tensor 0 is 24
    yield from (set_field("nnz", 143, 1), set_field("nnz", 145, 1))  # bitmap popcount is 144
    for shape in ([4, 5], [-8, -60], [2**40, 2**40], [0, 2**40], [8.0, 60], "8x60", [2**17] * 3, [True, 60]):
        yield set_field("shape", shape, 0)
    yield from (set_field("shape", [30, 9], 1), set_field("shape", [31, 8], 1))  # bitmap size changes
    yield from (set_field("dtype", "float64", 0), set_field("dtype", "bfloat16", 0),
                set_field("positions", "rle", 0), set_field("positions", "bitmap", 0),
                set_field("positions", "delta_u16", 1), set_field("positions", "dense", 0),
                set_field("positions", "seeded", 0), set_field("group", "replace", 0),
                set_field("scale", 0.1, 0), set_field("scale", 1, 0), set_field("scale", None, 0),
                set_field("key", 5, 0), set_field("key", None, 0), extra_blob, missing_blob)


@pytest.mark.parametrize("edit", list(lying_meta_edits()))
def test_lying_metadata_is_rejected(edit):
    with pytest.raises(PayloadError):
        decode(edited(sample_update, edit))


def test_max_numel_caps_the_declared_elements():
    payload = encode(sample_update())  # 480 + 240 + 30 elements
    assert isinstance(decode(payload, max_numel=750), SparseUpdate)
    with pytest.raises(PayloadError, match="'bias'.*749"):
        decode(payload, max_numel=749)


def test_duplicate_key_is_rejected():
    def duplicate(meta, blobs):
        meta["tensors"][1]["key"] = meta["tensors"][0]["key"]
    with pytest.raises(PayloadError, match="twice"):
        decode(edited(sample_update, duplicate))


def bump_nnz(entry):
    def edit(meta, blobs):
        meta["tensors"][entry]["nnz"] += 1
    return edit


@pytest.mark.parametrize(
    "edit",
    [set_field("seeded", []), set_field("seeded", ["bias"]), set_field("seeded", ["x", "x"]),
     set_field("seed", -1), set_field("download_drop", 1.0), set_field("download_drop", "0.8"),
     set_field("moved", {"a": "C"}), set_field("moved", []), set_field("method", None),
     bump_nnz(0), set_field("scale", 1.5, 2), set_field("positions", "bitmap", 2)],
)
def test_lying_broadcast_metadata_is_rejected(edit):
    with pytest.raises(PayloadError):
        decode(edited(sample_broadcast, edit))


def with_positions(gaps: list[int], dtype: str, nnz: int | None = None):
    """Replace tensor 0's positions by these gaps (shuffled like the encoder does)."""
    def edit(meta, blobs):
        array = np.array(gaps, dtype=np.uint64).astype(dtype)
        blobs["0.positions"] = zstd_frame(array.view(np.uint8).reshape(-1, array.itemsize).T)
        entry = meta["tensors"][0]
        entry["positions"] = "delta_u" + str(8 * array.itemsize)
        entry["nnz"] = len(gaps) if nnz is None else nnz
        blobs["0.values"] = zstd_frame(np.zeros(4 * entry["nnz"], np.uint8))
    return edit


@pytest.mark.parametrize(
    "gaps, dtype",
    [([0, 480], "<u2"), ([5, 3, 0], "<u1"), ([5, 2**64 - 1], "<u8"), ([479, 1], "<u2"),
     ([2**63, 1], "<u8"), ([1, 2**62, 2**62, 2**62, 2**62], "<u8")],
)
def test_out_of_range_unsorted_or_duplicate_positions(gaps, dtype):
    with pytest.raises(PayloadError, match="'a.lora_A.weight' positions"):
        decode(edited(sample_update, with_positions(gaps, dtype)))
    assert isinstance(decode(edited(sample_update, with_positions([0, 5, 474], "<u2"))), SparseUpdate)


def test_bitmap_with_padding_bits_is_rejected():
    def edit(meta, blobs):
        entry = meta["tensors"][1]  # 240 elements: no padding, so make it 239
        entry["shape"], entry["nnz"] = [239], 1
        bits = np.zeros(30, np.uint8)
        bits[0], bits[-1] = 0x80, 0x01
        blobs["1.positions"] = zstd_frame(bits)
        blobs["1.values"] = zstd_frame(np.zeros(2, np.uint8))
    with pytest.raises(PayloadError, match="past element"):
        decode(edited(sample_update, edit))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_rejected(bad):
    def edit(meta, blobs):
        entry = meta["tensors"][0]
        values = np.full(entry["nnz"], bad, dtype="<f4")
        blobs["0.values"] = zstd_frame(values.view(np.uint8).reshape(-1, 4).T)
    with pytest.raises(PayloadError, match="NaN or Inf"):
        decode(edited(sample_update, edit))


def frame_with_content_size(data: bytes, declared: int) -> bytes:
    """A one-segment frame of ``data`` whose header claims ``declared`` bytes (4-byte size field)."""
    frame = bytearray(zstd_frame(np.frombuffer(data, np.uint8)))
    assert frame[4] >> 6 == 2 and frame[4] & 0x20, "expected a single-segment frame with a 4-byte size"
    frame[5:9] = struct.pack("<I", declared)
    return bytes(frame)


@pytest.mark.parametrize("kind", ["no size", "large size", "lying size", "two frames", "no checksum", "raw"])
def test_zstd_bombs_and_malformed_frames(kind):
    expected = 24 * 4  # tensor 0: 24 float32 values

    def edit(meta, blobs):
        bomb = b"\0" * 2**26
        blobs["0.values"] = {
            "no size": lambda: zstd_frame(np.frombuffer(bomb, np.uint8), write_content_size=False),
            "large size": lambda: zstd_frame(np.frombuffer(bomb, np.uint8)),
            "lying size": lambda: frame_with_content_size(b"\0" * 2**20, expected),
            "two frames": lambda: zstd_frame(np.zeros(expected, np.uint8)) * 2,
            "no checksum": lambda: zstd_frame(np.zeros(expected, np.uint8), write_checksum=False),
            "raw": lambda: b"\0" * expected,
        }[kind]()
    with pytest.raises(PayloadError, match="'a.lora_A.weight' values"):
        decode(edited(sample_update, edit))


# -- seeded positions are lazy: decode draws no mask ----------------------------------------------


def _llama_like_broadcast(drop=0.8):
    """An Aggregator broadcast on odd shapes, with the state it applies to."""
    import fedsrd_kernels as fk
    from tests.helpers import lora_state, perturbed

    gen = torch.Generator().manual_seed(41)
    g = lora_state([(33, 17), (8, 40), (4097, 3)], 3, gen=gen)
    ups = [fk.sparsify(perturbed(g, 0.05, gen=gen), g) for _ in range(2)]
    return g, fk.Aggregator("fedsrd", download_drop=drop, seed=5).aggregate(g, ups, round=3)


def test_encode_and_decode_draw_no_seeded_mask(monkeypatch):
    """The issue's four draws per round were: server, encode (a check), decode, apply. Only the server's
    compaction and apply draw now: with the Philox rounds made to fail, a broadcast still encodes and decodes."""
    from fedsrd_kernels.kernels.download import reference as philox
    from fedsrd_kernels.updates import SeededMask

    g, broadcast = _llama_like_broadcast()
    seeded = [key for key, sparse in broadcast.deltas.items() if sparse.is_seeded]
    assert seeded and set(seeded) == broadcast.seeded

    def no_draw(*args, **kwargs):
        raise AssertionError("the seeded mask was drawn")

    monkeypatch.setattr(philox, "_philox_rounds", no_draw)
    decoded = decode(encode(broadcast))
    for key in seeded:
        sparse = decoded.deltas[key]
        assert sparse.is_seeded and not sparse.is_dense and sparse.mask == SeededMask(5, 3, key, 0.8)
        assert_same_tensor(sparse.values, broadcast.deltas[key].values)
    with pytest.raises(AssertionError, match="drawn"):
        decoded.deltas[seeded[0]].indices  # noqa: B018  (positions are drawn on first use)
    monkeypatch.undo()
    for key in seeded:  # once drawn, they are the mask's
        want = seeded_keep_indices(decoded.deltas[key].numel, seed=5, round=3, name=key, drop=0.8)
        assert torch.equal(decoded.deltas[key].indices, want)
        assert decoded.deltas[key].indices is decoded.deltas[key].indices  # drawn once, kept


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_forged_seeded_count_decodes_and_apply_refuses_it(backend):
    """nnz and the values blob both lowered by one: decode cannot tell without drawing the mask, so apply
    does, on the device it applies on, naming the key; the error is a PayloadError and a ShapeMismatchError."""
    import fedsrd_kernels as fk
    from fedsrd_kernels.errors import SeededCountError, ShapeMismatchError

    if backend == "triton":
        pytest.importorskip("triton")
    g, broadcast = _llama_like_broadcast()
    meta, blobs = split(encode(broadcast))
    i, entry = next((i, e) for i, e in enumerate(meta["tensors"]) if e["positions"] == "seeded")
    entry["nnz"] -= 1
    values = broadcast.deltas[entry["key"]].values.numpy()[:-1]
    blobs[f"{i}.values"] = zstd_frame(values.view(np.uint8).reshape(-1, 4).T)
    forged = decode(build(meta, blobs))
    assert forged.deltas[entry["key"]].nnz == entry["nnz"]
    before = {k: v.clone() for k, v in g.items()}
    for error in (SeededCountError, PayloadError, ShapeMismatchError):
        with pytest.raises(error, match=f"{entry['key']!r}.*keeps"):
            fk.apply(g, forged, backend=backend)
    with pytest.raises(SeededCountError, match="keeps"):
        forged.deltas[entry["key"]].to_dense()
    assert all(torch.equal(g[k], before[k]) for k in g)
    fk.apply(g, decode(encode(broadcast)), backend=backend)  # the honest one applies


def test_a_seeded_count_is_checked_at_decode_where_it_is_cheap():
    """At drop rate 0 the mask keeps every element, and no seeded mask keeps more than numel: no draw needed."""
    from fedsrd_kernels.errors import SeededCountError
    from fedsrd_kernels.updates import SeededMask

    key = "p.lora_B.weight"
    full = Broadcast(2, "fedsrd", 1, 0.0, {key: SparseTensor((6, 4), torch.ones(24), mask=SeededMask(1, 2, key, 0.0))},
                     seeded=frozenset({key}))
    assert torch.equal(decode(encode(full)).deltas[key].to_dense(), torch.ones(6, 4))

    def fewer(meta, blobs):
        meta["tensors"][0]["nnz"] = 23
        blobs["0.values"] = zstd_frame(np.ones(23, "<f4").view(np.uint8).reshape(-1, 4).T)

    meta, blobs = split(encode(full))
    fewer(meta, blobs)
    with pytest.raises(SeededCountError, match=f"{key!r}: 23 values for a seeded mask over 24 elements"):
        decode(build(meta, blobs))
    with pytest.raises(SeededCountError, match="25 values"):
        SparseTensor((6, 4), torch.ones(25), mask=SeededMask(1, 2, key, 0.8))


def test_encode_refuses_seeded_masks_that_are_not_the_broadcasts():
    from fedsrd_kernels.updates import SeededMask

    key = "p.lora_B.weight"
    mask = SeededMask(1, 2, key, 0.8)
    kept = mask.keep_indices(24).numel()
    sparse = SparseTensor((6, 4), torch.ones(kept), scale=5.0, mask=mask)
    encode(Broadcast(2, "fedsrd", 1, 0.8, {key: sparse}, seeded=frozenset({key})))  # the broadcast's own mask
    for bad, match in (
        (Broadcast(2, "fedsrd", 9, 0.8, {key: sparse}, seeded=frozenset({key})), "not this broadcast's"),
        (Broadcast(3, "fedsrd", 1, 0.8, {key: sparse}, seeded=frozenset({key})), "not this broadcast's"),
        (Broadcast(2, "fedsrd", 1, 0.5, {key: sparse}, seeded=frozenset({key})), "not this broadcast's"),
        (Broadcast(2, "fedsrd", 1, 0.8, {key: sparse}), "seeded mask"),
        (SparseUpdate({key: sparse}), "seeded mask"),
    ):
        with pytest.raises(StateError, match=match):
            encode(bad)
    with pytest.raises(StateError, match="not both"):
        SparseTensor((6, 4), torch.ones(kept), mask.keep_indices(24), mask=mask)
    with pytest.raises(StateError, match="SeededMask"):
        SeededMask(1, 2, key, 1.0)


def test_a_seeded_tensor_densifies_like_its_explicit_twin():
    from fedsrd_kernels.updates import SeededMask

    mask = SeededMask(7, 1, "w", 0.7)
    values = make_values(mask.keep_indices(4999).numel(), torch.bfloat16, 9, 1 / 0.3)
    lazy = SparseTensor((4999,), values, scale=1 / 0.3, mask=mask)
    twin = SparseTensor((4999,), values, mask.keep_indices(4999), scale=1 / 0.3)
    assert_same_tensor(lazy.to_dense(), twin.to_dense())
    assert lazy.nnz == twin.nnz and not lazy.is_dense and lazy.is_seeded and not twin.is_seeded
    assert_same_tensor(lazy.with_values(values.float()).to_dense(), twin.to_dense())
    assert "positions=seeded" in repr(lazy)
    with pytest.raises(AttributeError):
        lazy.scale = 2.0
