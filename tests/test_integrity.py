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
