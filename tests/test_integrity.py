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
    ([10**400, 1], "finite float64"),
    ([float("inf"), 1], "finite"),
    ([1, -1], ">= 0"),
    ([0, 0.0], "not all zero"),
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
