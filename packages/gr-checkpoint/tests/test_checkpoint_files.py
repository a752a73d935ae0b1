"""Damaged, missing and half-written checkpoints; step directories and resume lookup."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from torch import nn

import gr_checkpoint
import gr_checkpoint.atomic as atomic
from gr_checkpoint import CheckpointCorruptError
from gr_checkpoint.manifest import Manifest


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _loads_as(path: Path, expected: nn.Module) -> bool:
    restored = _model(seed=99)
    gr_checkpoint.load(path, restored)
    return _same_weights(restored, expected)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, nn.Module]:
    model = _model(seed=0)
    return gr_checkpoint.save(tmp_path / "ckpt", model, extra_state={"step": 1}), model


def test_corrupt_manifest_names_the_file(saved: tuple[Path, nn.Module]) -> None:
    path, _ = saved
    manifest = path / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(CheckpointCorruptError, match=re.escape(str(manifest)) + ": not valid JSON"):
        gr_checkpoint.load(path, _model(seed=1))


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: m.pop("model_tensors"), "missing fields \\['model_tensors'\\]"),
        (lambda m: m.update(format="other"), "format is 'other'"),
        (lambda m: m.update(format_version=99), "format_version 99; this gr-checkpoint reads versions \\(1, 2, 3\\)"),
        (lambda m: m["model_tensors"]["0.weight"].update(shape="wide"), "malformed field value"),
    ],
)
def test_malformed_manifest_fields_are_named(
    saved: tuple[Path, nn.Module], edit: Callable[[dict], object], problem: str
) -> None:
    path, _ = saved
    manifest = path / "manifest.json"
    content = json.loads(manifest.read_text())
    edit(content)
    manifest.write_text(json.dumps(content))
    with pytest.raises(CheckpointCorruptError, match=re.escape(str(manifest)) + ": " + problem):
        gr_checkpoint.read_manifest(path)


def test_missing_manifest_names_the_file(saved: tuple[Path, nn.Module]) -> None:
    path, _ = saved
    (path / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(path / "manifest.json")) + ": no manifest"):
        gr_checkpoint.load(path, _model(seed=1))


@pytest.mark.parametrize("damage", ["truncate_data", "delete_metadata"])
def test_damaged_torch_module_names_the_file(saved: tuple[Path, nn.Module], damage: str) -> None:
    path, _ = saved
    torch_folder = path / "torch_module"
    if damage == "delete_metadata":
        damaged, problem = torch_folder / ".metadata", "missing; the manifest lists it"
        damaged.unlink()
    else:
        damaged, problem = torch_folder / "__0_0.distcp", "truncated: 100 bytes"
        damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(CheckpointCorruptError, match=re.escape(str(damaged)) + ": " + problem):
        gr_checkpoint.load(path, _model(seed=1))


def test_manifest_describes_the_checkpoint(saved: tuple[Path, nn.Module]) -> None:
    path, _ = saved
    manifest = gr_checkpoint.read_manifest(path)
    assert manifest.world_size == 1 and manifest.has_extra_state and manifest.optimizer_class is None
    assert manifest.model_tensors["2.weight"] == gr_checkpoint.TensorSpec((2, 6), "float32")
    assert set(manifest.versions) == {"gr-checkpoint", "torch", "dynamicemb"}
    assert manifest.versions["torch"] == torch.__version__


def _crash_in_dcp_finish(*args: object, **kwargs: object) -> None:
    raise OSError("disk full (simulated) while DCP finishes")


def _crash_while_writing_manifest(self: Manifest, directory: Path) -> None:
    (directory / "manifest.json").write_text(self.to_json()[:20])
    raise OSError("killed (simulated) while writing the manifest")


@pytest.mark.parametrize(
    ("target", "name", "crash"),
    [
        (dcp_filesystem.FileSystemWriter, "finish", _crash_in_dcp_finish),
        (Manifest, "write", _crash_while_writing_manifest),
    ],
)
def test_crash_mid_save_keeps_the_previous_checkpoint(
    saved: tuple[Path, nn.Module], monkeypatch: pytest.MonkeyPatch, target: type, name: str, crash: Callable[..., None]
) -> None:
    path, first = saved
    monkeypatch.setattr(target, name, crash)
    with pytest.raises(OSError if target is Manifest else RuntimeError, match="simulated"):
        gr_checkpoint.save(path, _model(seed=5), extra_state={"step": 2})

    assert _loads_as(path, first)
    assert gr_checkpoint.load(path, _model(seed=1)) == {"step": 1}
    assert sorted(os.listdir(path.parent)) == ["ckpt"]


def test_crash_between_the_two_renames_loads_the_previous_checkpoint(
    saved: tuple[Path, nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, first = saved
    real_replace, calls = os.replace, []

    def replace_then_crash(src: Path, dst: Path) -> None:
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("power cut (simulated) between renames")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace_then_crash)
    with pytest.raises(OSError, match="power cut"):
        gr_checkpoint.save(path, _model(seed=5))
    monkeypatch.undo()

    assert not path.exists()
    with pytest.warns(UserWarning, match="loading .*\\.ckpt\\.previous"):
        assert _loads_as(path, first)

    second = _model(seed=6)
    gr_checkpoint.save(path, second)
    assert _loads_as(path, second)
    assert sorted(os.listdir(path.parent)) == ["ckpt"]


def test_save_step_and_latest_checkpoint(tmp_path: Path) -> None:
    assert gr_checkpoint.latest_checkpoint(tmp_path) is None
    assert gr_checkpoint.latest_checkpoint(tmp_path / "absent") is None
    models = {step: _model(seed=step) for step in (2, 10, 7)}
    for step, model in models.items():
        path = gr_checkpoint.save_step(tmp_path, step, model, extra_state={"step": step})
        assert path == gr_checkpoint.checkpoint_path(tmp_path, step) == tmp_path / f"step_{step}"

    latest = gr_checkpoint.latest_checkpoint(tmp_path)
    assert latest == tmp_path / "step_10"  # numeric order, not string order
    assert gr_checkpoint.read_manifest(latest).step == 10
    assert _loads_as(latest, models[10])


def test_latest_checkpoint_skips_unfinished_and_corrupt_ones(tmp_path: Path) -> None:
    good = _model(seed=3)
    gr_checkpoint.save_step(tmp_path, 3, good)
    gr_checkpoint.save_step(tmp_path, 8, _model(seed=8))
    (tmp_path / "step_8" / "manifest.json").write_text("{")
    (tmp_path / ".step_9.incomplete" / "torch_module").mkdir(parents=True)  # a save killed mid-way
    (tmp_path / "step_12").mkdir()  # no manifest: never finished
    (tmp_path / "step_x").mkdir()

    with pytest.warns(UserWarning, match="skipping unreadable checkpoint: .*step_8"):
        latest = gr_checkpoint.latest_checkpoint(tmp_path)
    assert latest == tmp_path / "step_3"

    gr_checkpoint.save_step(tmp_path, 9, _model(seed=9))
    assert not (tmp_path / ".step_9.incomplete").exists()


def test_keep_last_prunes_the_oldest_complete_checkpoints(tmp_path: Path) -> None:
    for step in range(1, 6):
        gr_checkpoint.save_step(tmp_path, step, _model(seed=step), keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["step_4", "step_5"]
    with pytest.raises(ValueError, match="keep_last must be a positive int"):
        gr_checkpoint.save_step(tmp_path, 6, _model(seed=6), keep_last=0)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        gr_checkpoint.checkpoint_path(tmp_path, -1)
