"""Optimizer state gathered from shard pieces into torch.optim's format (proto.assemble)."""
import pytest
import torch

from shardps.proto.assemble import param_states
from shardps.proto.layout import Layout

LAYOUT = Layout.from_shapes([("w", (4, 3), "float32"), ("b", (3,), "float32")])


def test_pieces_from_every_shard_make_each_parameters_state_in_its_shape():
    w = torch.arange(12.0)
    shards = [{"optim/0/exp_avg": w[:7], "optim/0/step": torch.tensor(3.0)},
              {"optim/0/exp_avg": w[7:], "optim/0/step": torch.tensor(3.0), "optim/1/exp_avg": torch.ones(3)}]
    state = param_states(LAYOUT, shards)
    assert torch.equal(state[0]["exp_avg"], w.reshape(4, 3))
    assert state[0]["step"].item() == 3.0 and state[1]["exp_avg"].shape == (3,)


def test_a_state_found_on_only_some_shards_is_refused_with_the_reason_not_a_reshape_error():
    # What a worker reads while another worker's load_state_dict has reached shard 0 but not yet shard 1.
    shards = [{"optim/0/exp_avg": torch.zeros(7)}, {}]
    with pytest.raises(ValueError, match=r"7 of its 12 elements.*loading a state dict"):
        param_states(LAYOUT, shards)
