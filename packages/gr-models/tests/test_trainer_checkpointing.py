"""Units of the trainer's checkpoint extras: config differences reported on resume, older checkpoints' state."""

from __future__ import annotations

import torch

from gr_models.trainer import load_config
from gr_models.trainer.checkpointing import config_differences, fill_in_older_state


def test_config_differences_name_the_keys_that_change_the_run() -> None:
    saved = load_config(None, ["optim.learning_rate=1e-3", "train.checkpoint_every=5"]).to_dict()
    current = load_config(None, ["optim.learning_rate=3e-3", "train.checkpoint_every=1", "output_dir=elsewhere"])
    current_tree = current.to_dict()
    current_tree["optim"]["betas"] = tuple(current_tree["optim"]["betas"])  # a checkpoint's extra state keeps tuples
    assert config_differences(saved, current_tree) == ["optim.learning_rate: 0.001 -> 0.003"]
    assert config_differences(saved, saved) == []


def test_older_checkpoint_state_gets_a_layout_position_and_rank_zero_rng() -> None:
    rng = {"torch": torch.get_rng_state()}
    state = {"batches_into_epoch": 3, "config": {"data": {"batch_size": 8}}, "rng": rng}
    fill_in_older_state(state, world_size=2)
    assert state["layout"] == {"world_size": 2, "tensor_model_parallel_size": 1, "data_parallel_size": 2}
    assert state["samples_into_epoch"] == 3 * 8 * 2
    assert state["rng_per_rank"] == [rng]
