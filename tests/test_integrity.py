"""Integrity of what the server computes from what it is given (issue: no silent corruption)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedsrd_kernels as fk
from fedsrd_kernels.errors import AggregationError
from fedsrd_kernels.server import normalised_weights

from .helpers import lora_state, perturbed


def test_huge_weights_do_not_overflow_their_sum():
    assert normalised_weights([1e308, 1e308], 2).tolist() == [0.5, 0.5]
    assert normalised_weights([1e308, 1e307], 2).tolist() == pytest.approx([10 / 11, 1 / 11], rel=1e-15)
    assert normalised_weights([np.int64(3), np.float32(1.0)], 2).tolist() == [0.75, 0.25]
    # the aggregate with weights of 1e308 equals the one with weights of 1
    gen = torch.Generator().manual_seed(3)
    global_state = lora_state([(9, 7), (5, 11)], 3, gen=gen)
    updates = [fk.sparsify(perturbed(global_state, 0.05, gen=gen), global_state, fk.SparsifyConfig(
        selection="dense")) for _ in range(2)]
    agg = fk.Aggregator("fedavg")
    huge = agg.aggregate(global_state, updates, weights=[1e308, 1e308])
    plain = agg.aggregate(global_state, updates, weights=[1, 1])
    for key in plain.deltas:
        assert torch.equal(huge.deltas[key].values, plain.deltas[key].values)


@pytest.mark.parametrize("weights, text", [
    ([True, 1], r"weights\[0\] must be a real number, got True"),
    ([1, "2"], r"weights\[1\] must be a real number, got '2'"),
    ([1, None], r"weights\[1\] must be a real number"),
    ([10**400, 1], r"weights\[0\] must be a finite float64 number > 0, got an int of 401 digits"),
    ([float("inf"), 1], r"weights\[0\] must be a finite number > 0"),
    ([1, -1], r"weights\[1\] must be a finite number > 0, got -1"),
    ([1, 0.0], r"weights\[1\] must be a finite number > 0, got 0.0"),
    ("12", "sequence of numbers"),
    ([1, 2, 3], "3 weights for 2 updates"),
])
def test_bad_weights_are_refused_by_name(weights, text):
    with pytest.raises(AggregationError, match=text):
        normalised_weights(weights, 2)


def test_in_memory_sparse_tensors_with_bad_positions_never_reach_the_server():
    """Out-of-range, negative, float or duplicate indices used to raise IndexError/RuntimeError deep inside
    aggregate, densify and apply (encode caught them; the in-memory path did not)."""
    from fedsrd_kernels.errors import ShapeMismatchError, StateError
    from fedsrd_kernels.updates import SparseTensor

    for indices, text in ((torch.tensor([0, 6]), "within"), (torch.tensor([-1, 2]), "within"),
                          (torch.tensor([1, 1]), "strictly increasing"), (torch.tensor([2, 1]), "strictly increasing"),
                          (torch.tensor([0.0, 1.0]), "int64"), (torch.tensor([[0, 1]]), "1-D"), ([0, 1], "a tensor")):
        with pytest.raises(StateError, match=text):
            SparseTensor((2, 3), torch.ones(2), indices)
    with pytest.raises(ShapeMismatchError, match="floating"):
        SparseTensor((2, 3), torch.ones(6, dtype=torch.int32))
    with pytest.raises(StateError, match="meta"):
        SparseTensor((2, 3), torch.ones(6, device="meta"))


def test_meta_tensors_and_empty_states_get_a_named_error():
    from fedsrd_kernels.errors import StateError

    gen = torch.Generator().manual_seed(4)
    global_state = lora_state([(9, 7)], 3, gen=gen)
    local = perturbed(global_state, 0.05, gen=gen)
    key = next(iter(local))
    on_meta = {**local, key: local[key].to("meta")}
    with pytest.raises(StateError, match=f"local_state\\[{key!r}\\] is on meta"):
        fk.sparsify(on_meta, global_state)
    with pytest.raises(StateError, match="global_state is empty"):
        fk.sparsify({}, {})
    with pytest.raises(StateError, match="is empty"):
        fk.Aggregator().aggregate({}, [fk.SparseUpdate({})], round=1)
    with pytest.raises(StateError, match="is empty"):
        fk.apply({}, fk.Aggregator().aggregate(global_state, [fk.sparsify(local, global_state)], round=1))


def _round(seed: int = 7, method: str = "fedsrd"):
    gen = torch.Generator().manual_seed(seed)
    global_state = lora_state([(9, 7), (5, 11)], 3, gen=gen)
    agg = fk.Aggregator(method)
    updates = [fk.sparsify(perturbed(global_state, 0.05, gen=gen), global_state, agg.client_config)
               for _ in range(2)]
    return global_state, agg, updates


def test_a_broadcast_applies_only_to_the_global_it_was_made_for():
    from fedsrd_kernels.errors import BaseMismatchError

    global_state, agg, updates = _round()
    broadcast = fk.decode(fk.encode(agg.aggregate(global_state, updates, round=1)))
    assert broadcast.base == fk.state_digest(global_state)
    moved = fk.apply(global_state, broadcast)
    assert fk.apply(global_state, broadcast, base=fk.state_digest(global_state)).keys() == moved.keys()
    before = {k: v.clone() for k, v in moved.items()}
    with pytest.raises(BaseMismatchError, match="already applied"):  # twice
        fk.apply(moved, broadcast)
    other = {k: v + 1.0 for k, v in global_state.items()}  # same keys and shapes, another model
    with pytest.raises(BaseMismatchError, match="round-1 broadcast"):
        fk.apply(other, broadcast)
    assert all(torch.equal(moved[k], before[k]) for k in moved)
    # a stream's broadcast names its base too
    stream = agg.stream(global_state, round=1)
    for update in updates:
        stream.add(update)
    assert stream.finish().base == broadcast.base


def test_finite_bytes_cannot_make_a_non_finite_global():
    from fedsrd_kernels.errors import NonFiniteError, PayloadError
    from fedsrd_kernels.updates import Broadcast, SparseTensor, SparseUpdate

    global_state, _, _ = _round(method="fedavg")
    key = next(k for k in global_state if k.endswith("lora_A.weight"))
    shape = tuple(global_state[key].shape)
    huge = SparseUpdate({key: SparseTensor(shape, torch.full((global_state[key].numel(),), 3e38))})
    agg = fk.Aggregator("fedavg")
    big = {k: torch.full_like(v, 3e38) if k == key else v for k, v in global_state.items()}  # finite
    broadcast = agg.aggregate(big, [fk.decode(fk.encode(huge))] * 2, round=1)  # the mean, 3e38, is finite
    before = {k: v.clone() for k, v in big.items()}
    with pytest.raises(NonFiniteError, match=f"{key!r}"):  # 3e38 + 3e38 overflows float32
        fk.apply(big, broadcast)
    assert all(torch.equal(big[k], before[k]) for k in big)
    # an aggregate that overflows float32 is refused before it is broadcast
    with pytest.raises(NonFiniteError, match="overflow float32"):  # 3e38 x 2 cannot even be held
        SparseTensor(shape, torch.full((global_state[key].numel(),), 3e38), scale=2.0)
    # FedSRD multiplies factors: finite uploads can still give a product past float32, which is refused
    big_b = {k: v for k, v in global_state.items()}
    b_key = key.replace("lora_A", "lora_B")
    blown = SparseUpdate({k: SparseTensor(tuple(global_state[k].shape), torch.full((global_state[k].numel(),), 3e38))
                          for k in (key, b_key)})
    with pytest.raises(NonFiniteError, match="not finite"):
        fk.Aggregator("fedsrd").aggregate(big_b, [blown, blown], round=1)
    # a broadcast of 1e30 x scale 1e10 decodes no more: it would apply to Inf on every client
    from tests.test_wire import build, split

    bomb = Broadcast(1, "fedavg", 0, 0.0, {key: SparseTensor(shape, torch.full((global_state[key].numel(),), 1e30))})
    with pytest.raises(NonFiniteError, match="overflow float32"):  # encode refuses to make one
        fk.encode(Broadcast(1, "fedavg", 0, 0.0, {key: SparseTensor(shape, bomb.deltas[key].values, scale=1e10)}))
    meta, blobs = split(fk.encode(bomb))
    meta["tensors"][0]["scale"] = float(torch.tensor(1e10, dtype=torch.float32))  # forged, and sealed again
    with pytest.raises(PayloadError, match="do not fit float32"):
        fk.decode(build(meta, blobs))


def test_norm_bounding_weighs_an_overflowing_client_down_before_anything_overflows():
    """A client sending values of 3e38 (finite) with norm bounding on: clipped to a weight near zero, and the
    round's result is finite and within float rounding of the honest clients' alone."""
    from fedsrd_kernels.updates import SparseTensor, SparseUpdate

    gen = torch.Generator().manual_seed(9)
    global_state = lora_state([(9, 7), (5, 11)], 3, gen=gen)
    honest = [fk.sparsify(perturbed(global_state, 0.05, gen=gen), global_state, fk.SparsifyConfig(
        selection="dense")) for _ in range(4)]
    attacker = SparseUpdate({k: SparseTensor(tuple(v.shape), torch.full((v.numel(),), 3e38))
                             for k, v in global_state.items()})
    bounded = fk.Aggregator("fedavg", norm_bound=2.0)
    result = fk.apply(global_state, bounded.aggregate(global_state, [*honest, attacker], round=1))
    assert all(bool(torch.isfinite(v).all()) for v in result.values())
    assert bounded.last_report.clip_factors[-1] < 1e-30
    clean = fk.apply(global_state, fk.Aggregator("fedavg").aggregate(global_state, honest, round=1))
    for key in clean:  # the attacker's weight went to a zero update: the honest mean, scaled by 4/5
        want = global_state[key] + (clean[key] - global_state[key]) * 4 / 5
        assert torch.allclose(result[key], want, rtol=1e-5, atol=1e-6), key
    unbounded = fk.apply(global_state, fk.Aggregator("fedavg").aggregate(global_state, [*honest, attacker], round=1))
    assert max(float(unbounded[k].abs().max()) for k in unbounded) > 1e37  # what norm bounding held off
