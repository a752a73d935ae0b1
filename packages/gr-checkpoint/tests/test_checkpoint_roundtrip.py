"""save/load of a dense model with Adam: exact round trip, resumed training, mismatches named."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import gr_checkpoint
from gr_checkpoint import CheckpointMismatchError


def _model(hidden: int = 8, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, hidden), nn.ReLU(), nn.LayerNorm(hidden), nn.Linear(hidden, 3)).to(dtype)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        inputs = torch.randn(7, 5, generator=generator)
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()


def _trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.001)
    _train(model, optimizer, steps=3, seed=seed)
    return model, optimizer


def _fresh(seed: int = 1) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _model()
    return model, torch.optim.Adam(model.parameters(), lr=0.5)


def _assert_same_state(a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            _assert_same_state(a[key], b[key])
        else:
            assert a[key] == b[key], key


def test_round_trip_is_exact_for_model_optimizer_and_extra_state(tmp_path: Path) -> None:
    model, optimizer = _trained()
    rng = torch.get_rng_state()
    extra = {"step": 3, "rng": rng, "note": "epoch 0"}
    path = gr_checkpoint.save(tmp_path / "ckpt", model, optimizer, extra_state=extra)

    assert sorted(os.listdir(path)) == ["extra_state.pt", "manifest.json", "torch_module"]
    restored, restored_optimizer = _fresh()
    loaded_extra = gr_checkpoint.load(path, restored, restored_optimizer)

    _assert_same_state(model.state_dict(), restored.state_dict())
    saved_optimizer_state, loaded_optimizer_state = optimizer.state_dict(), restored_optimizer.state_dict()
    assert saved_optimizer_state["param_groups"] == loaded_optimizer_state["param_groups"]
    _assert_same_state(saved_optimizer_state["state"], loaded_optimizer_state["state"])
    assert loaded_extra["step"] == 3 and loaded_extra["note"] == "epoch 0"
    assert torch.equal(loaded_extra["rng"], rng)


def test_resumed_training_matches_uninterrupted_training(tmp_path: Path) -> None:
    model, optimizer = _trained()
    gr_checkpoint.save(tmp_path / "ckpt", model, optimizer)
    restored, restored_optimizer = _fresh()
    gr_checkpoint.load(tmp_path / "ckpt", restored, restored_optimizer)

    _train(model, optimizer, steps=2, seed=7)
    _train(restored, restored_optimizer, steps=2, seed=7)
    _assert_same_state(model.state_dict(), restored.state_dict())


def test_model_only_checkpoint_and_extra_state_none(tmp_path: Path) -> None:
    model, _ = _trained()
    gr_checkpoint.save(tmp_path / "ckpt", model)
    restored, _ = _fresh()
    assert gr_checkpoint.load(tmp_path / "ckpt", restored) is None
    _assert_same_state(model.state_dict(), restored.state_dict())

    with pytest.raises(CheckpointMismatchError, match="holds no optimizer state"):
        gr_checkpoint.load(tmp_path / "ckpt", *_fresh())


def test_model_can_be_loaded_without_its_optimizer(tmp_path: Path) -> None:
    model, optimizer = _trained()
    gr_checkpoint.save(tmp_path / "ckpt", model, optimizer)
    restored, _ = _fresh()
    gr_checkpoint.load(tmp_path / "ckpt", restored)
    _assert_same_state(model.state_dict(), restored.state_dict())


def test_other_optimizer_class_is_named(tmp_path: Path) -> None:
    model, optimizer = _trained()
    gr_checkpoint.save(tmp_path / "ckpt", model, optimizer)
    restored, _ = _fresh()
    with pytest.raises(CheckpointMismatchError, match="holds Adam state; the optimizer given is SGD"):
        gr_checkpoint.load(tmp_path / "ckpt", restored, torch.optim.SGD(restored.parameters(), lr=0.1))


def test_shape_mismatch_names_key_and_both_shapes(tmp_path: Path) -> None:
    model, optimizer = _trained()
    gr_checkpoint.save(tmp_path / "ckpt", model, optimizer)
    wider = _model(hidden=9)
    before = {k: v.clone() for k, v in wider.state_dict().items()}

    with pytest.raises(CheckpointMismatchError) as raised:
        gr_checkpoint.load(tmp_path / "ckpt", wider, torch.optim.Adam(wider.parameters()))

    message = str(raised.value)
    assert "model key '0.weight': checkpoint has shape [8, 5] float32, model has shape [9, 5] float32" in message
    assert "model key '3.weight': checkpoint has shape [3, 8] float32, model has shape [3, 9] float32" in message
    _assert_same_state(before, wider.state_dict())


def test_dtype_mismatch_is_named(tmp_path: Path) -> None:
    model, _ = _trained()
    gr_checkpoint.save(tmp_path / "ckpt", model)
    with pytest.raises(CheckpointMismatchError, match=r"'0.bias': checkpoint has shape \[8\] float32, .* bfloat16"):
        gr_checkpoint.load(tmp_path / "ckpt", _model(dtype=torch.bfloat16))


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    model, _ = _trained()
    gr_checkpoint.save(tmp_path / "ckpt", model)
    extended = nn.Sequential(*_model(), nn.Linear(3, 2))
    with pytest.raises(
        CheckpointMismatchError, match=re.escape("'4.weight' is in the model but not in the checkpoint")
    ):
        gr_checkpoint.load(tmp_path / "ckpt", extended)
    truncated = nn.Sequential(*list(_model())[:3])
    with pytest.raises(CheckpointMismatchError, match=re.escape("'3.bias' is in the checkpoint but not in the model")):
        gr_checkpoint.load(tmp_path / "ckpt", truncated)


def test_saving_into_an_existing_empty_directory_as_in_the_tutorial(tmp_path: Path) -> None:
    save_path = tmp_path / "checkpoint"
    os.makedirs(save_path, exist_ok=True)
    model, optimizer = _trained()
    gr_checkpoint.save(save_path, model, optimizer)
    restored, restored_optimizer = _fresh()
    gr_checkpoint.load(save_path, restored, restored_optimizer)
    _assert_same_state(model.state_dict(), restored.state_dict())


def test_a_directory_that_is_not_a_checkpoint_is_never_replaced(tmp_path: Path) -> None:
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a checkpoint"):
        gr_checkpoint.save(precious, _model())
    assert (precious / "notes.txt").read_text() == "keep me"
